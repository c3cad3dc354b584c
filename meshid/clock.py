"""Time, through one seam: the wall clock, the monotonic clock, and waiting.

Everything in meshid that reads the time or waits for it (the renewal loop of an
:class:`~meshid.IssuerSource`, the interceptor's verifier and authorizer, the CA's issuing
service and rate limits, the CRL watcher) takes a :class:`Clock`, by default
:data:`SYSTEM_CLOCK`. A test, or an application's own simulation, passes a
:class:`ManualClock` instead and moves time on with :meth:`ManualClock.advance`: a renewal
schedule can then be followed step by step without waiting out real seconds.
"""

from __future__ import annotations

import datetime
import threading
import time
from typing import Protocol, runtime_checkable

__all__ = ["SYSTEM_CLOCK", "Clock", "ManualClock", "OffsetClock", "SystemClock"]


@runtime_checkable
class Clock(Protocol):
    """What meshid asks of time."""

    def now(self) -> datetime.datetime:
        """The wall-clock time, timezone-aware UTC (certificates, tokens, CRLs)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (schedules, timeouts)."""
        ...

    def wait(self, event: threading.Event, timeout: float | None) -> bool:
        """Block until ``event`` is set or ``timeout`` seconds of this clock have passed;
        return whether the event is set."""
        ...


class SystemClock:
    """The real clocks: ``datetime.now(UTC)``, ``time.monotonic()``, ``Event.wait``."""

    __slots__ = ()

    def now(self) -> datetime.datetime:
        return datetime.datetime.now(datetime.UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, event: threading.Event, timeout: float | None) -> bool:
        return event.wait(timeout)


SYSTEM_CLOCK = SystemClock()


class OffsetClock:
    """Another clock's time, ``offset`` ahead (or behind): a host whose wall clock is off.
    Its monotonic clock and its waits are the other clock's."""

    __slots__ = ("_base", "_offset")

    def __init__(self, base: Clock, offset: datetime.timedelta) -> None:
        self._base = base
        self._offset = offset

    def now(self) -> datetime.datetime:
        return self._base.now() + self._offset

    def monotonic(self) -> float:
        return self._base.monotonic()

    def wait(self, event: threading.Event, timeout: float | None) -> bool:
        return self._base.wait(event, timeout)


class ManualClock:
    """A clock that moves only when told to; waiters wake when it passes their deadline.

    ``now()`` starts at ``start`` (default: the real time at construction) and ``monotonic()``
    at 0; :meth:`advance` moves both. :meth:`advance_to_next_wakeup` moves the clock to the
    earliest deadline a thread is waiting for, and :meth:`settle` waits until the threads it
    woke are asleep again: that is how a test steps through a schedule.
    """

    def __init__(self, start: datetime.datetime | None = None) -> None:
        if start is not None and start.tzinfo is None:
            raise ValueError("ManualClock: start must be timezone-aware (UTC)")
        self._start = start or datetime.datetime.now(datetime.UTC)
        self._elapsed = 0.0
        self._changed = threading.Condition()
        self._deadlines: dict[int, float] = {}  # waiting thread -> its deadline (monotonic)

    def now(self) -> datetime.datetime:
        return self._start + datetime.timedelta(seconds=self._elapsed)

    def monotonic(self) -> float:
        return self._elapsed

    def wait(self, event: threading.Event, timeout: float | None) -> bool:
        me = threading.get_ident()
        with self._changed:
            deadline = float("inf") if timeout is None else self._elapsed + max(0.0, timeout)
            self._deadlines[me] = deadline
            self._changed.notify_all()  # settle() may be waiting for this thread to fall asleep
            try:
                # Event.set() does not notify this condition: look at the event every 10 ms of
                # real time, so close() is never held up for long.
                while not event.is_set() and self._elapsed < deadline:
                    self._changed.wait(0.01)
            finally:
                del self._deadlines[me]
                self._changed.notify_all()  # settle() may be waiting for this thread to finish
            return event.is_set()

    def advance(self, seconds: float) -> None:
        """Move time on by ``seconds`` (wall and monotonic alike) and wake whoever is due."""
        if seconds < 0:
            raise ValueError("ManualClock: time does not go back")
        with self._changed:
            self._elapsed += seconds
            self._changed.notify_all()

    def settle(self, *, waiters: int = 1, timeout: float = 10.0) -> float:
        """Block until at least ``waiters`` threads wait on this clock, none of them due (each
        deadline lies ahead); return the earliest deadline. After :meth:`advance`, this is how a
        test knows the threads it woke have done their work and gone back to sleep.

        Raises:
            TimeoutError: that did not happen within ``timeout`` real seconds.
        """
        give_up = time.monotonic() + timeout
        with self._changed:
            while True:
                deadlines = list(self._deadlines.values())
                if len(deadlines) >= waiters and all(d > self._elapsed for d in deadlines):
                    return min(deadlines)
                left = give_up - time.monotonic()
                if left <= 0:
                    due = sum(1 for d in deadlines if d <= self._elapsed)
                    raise TimeoutError(f"ManualClock: {len(deadlines)} of {waiters} threads asleep, {due} still due")
                self._changed.wait(left)

    def advance_to_next_wakeup(self, *, waiters: int = 1, timeout: float = 10.0) -> float:
        """Once ``waiters`` threads are asleep, advance to the earliest deadline among them;
        returns the seconds advanced.

        Raises:
            TimeoutError: as :meth:`settle`; or no waiter has a deadline at all.
        """
        with self._changed:
            earliest = self.settle(waiters=waiters, timeout=timeout)
            if earliest == float("inf"):
                raise TimeoutError("ManualClock: every waiter waits without a deadline")
            step = earliest - self._elapsed
            self.advance(step)
        return step

"""Turns taken one at a time, first come first served (``threading.Lock`` makes no such promise).

The CA's node-agent service takes one to check and sign a batch (:mod:`meshid.ca.agents`):
an agent reads its answers in the order it sent its batches.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["Turn", "Turns"]


class Turns:
    """A ticket queue: :meth:`take` waits until every turn asked for before it has ended.

    Args:
        condition: what takers wait on (a new ``threading.Condition``); a test passes its own
            to make a wait fail.
    """

    def __init__(self, condition: threading.Condition | None = None) -> None:
        self._changed = condition if condition is not None else threading.Condition()
        self._issued = 0  # tickets given out
        self._serving = 0  # the ticket whose turn it is
        self._abandoned: set[int] = set()  # tickets whose takers gave up waiting

    @property
    def asked(self) -> int:
        """How many turns have been asked for (taken, waited for or abandoned)."""
        return self._issued

    @property
    def ended(self) -> int:
        """How many turns have ended or been skipped: the ticket whose turn it is now."""
        return self._serving

    def take(self) -> Turn:
        """Wait for this caller's turn and return it, to be left (``with``) when done.

        Raises:
            BaseException: whatever interrupted the wait (a KeyboardInterrupt); the turn is
                given up, so the ones after it are not held.
        """
        with self._changed:
            ticket = self._issued
            self._issued += 1
            try:
                while self._serving != ticket:
                    self._changed.wait()
            except BaseException:  # interrupted while waiting: its turn is skipped, not lost
                if self._serving == ticket:
                    self._advance()
                else:
                    self._abandoned.add(ticket)
                raise
        return Turn(self._next)

    def _next(self) -> None:
        with self._changed:
            self._advance()

    def _advance(self) -> None:
        self._serving += 1
        while self._serving in self._abandoned:
            self._abandoned.discard(self._serving)
            self._serving += 1
        self._changed.notify_all()


class Turn:
    """One turn of :class:`Turns`: entering it again does nothing, leaving it ends it (once), so
    code inside the ``with`` that took it can end it early (the store, after signing).

    Args:
        end: what ends the turn (gives the next ticket its turn); called once.
    """

    def __init__(self, end: Callable[[], None]) -> None:
        self._end = end
        self._ended = False

    def __enter__(self) -> Turn:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._ended:
            self._ended = True
            self._end()

"""meshid.ca.turns: turns one at a time, first come first served, a turn ended once however often
it is left, and a taker interrupted while waiting skipped (the CA's node-agent batches take them)."""

from __future__ import annotations

import threading
import time

import pytest

from meshid.ca.turns import Turns
from support import eventually

pytestmark = pytest.mark.timeout(30)


def test_turns_go_one_at_a_time_in_the_order_they_were_asked_for() -> None:
    turns = Turns()
    first = turns.take()  # held: everyone below queues
    order: list[int] = []
    inside = [0]
    most = [0]

    def worker(n: int) -> None:
        with turns.take():
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            order.append(n)
            time.sleep(0.002)
            inside[0] -= 1

    threads = []
    for n in range(8):  # each asks only once the one before is waiting: the arrival order is known
        thread = threading.Thread(target=worker, args=(n,))
        thread.start()
        threads.append(thread)
        eventually(lambda n=n: turns.asked == n + 2, 10, f"worker {n} did not ask for its turn", interval=0.001)  # type: ignore[misc]
    with first:
        pass
    for thread in threads:
        thread.join(10)
    assert order == list(range(8))  # threading.Lock makes no such promise
    assert most[0] == 1
    assert turns.ended == 9


def test_a_turn_left_twice_ends_once() -> None:
    turns = Turns()
    turn = turns.take()
    with turn:
        with turn:  # the store's `with signing:` inside the agent service's `with`
            pass
        assert turns.ended == 1  # ended by the inner exit
    assert turns.ended == 1  # and not again by the outer one
    with turns.take():
        pass
    assert turns.ended == 2


class _Stop(Exception):
    pass


class _FailingCondition(threading.Condition):
    """A condition whose wait raises in the thread named "interrupted" (as a KeyboardInterrupt would)."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = 0

    def wait(self, timeout: float | None = None) -> bool:
        if threading.current_thread().name == "interrupted":
            self.failed += 1
            raise _Stop
        return super().wait(timeout)


def _interrupted_taker(turns: Turns) -> tuple[threading.Thread, list[BaseException]]:
    """A started thread named "interrupted" that takes a turn; what interrupted it lands in the list."""
    interrupted: list[BaseException] = []

    def take() -> None:
        try:
            turns.take()
        except _Stop as err:
            interrupted.append(err)

    victim = threading.Thread(target=take, name="interrupted")
    victim.start()
    return victim, interrupted


def test_a_taker_interrupted_while_waiting_is_skipped_and_the_next_one_served() -> None:
    condition = _FailingCondition()
    turns = Turns(condition)
    held = turns.take()
    served = threading.Event()
    victim, interrupted = _interrupted_taker(turns)
    victim.join(10)
    assert interrupted and condition.failed == 1

    def next_taker() -> None:
        with turns.take():
            served.set()

    after = threading.Thread(target=next_taker)
    after.start()
    eventually(lambda: turns.asked == 3, 10, "the next taker did not ask", interval=0.001)
    assert not served.is_set()  # the held turn still holds it
    with held:
        pass
    assert served.wait(10), "the turn after the abandoned one never came"
    after.join(10)
    assert turns.ended == 3  # the held one, the abandoned one skipped, the next one


def test_a_taker_interrupted_when_its_turn_had_come_passes_it_on() -> None:
    """Woken for its turn, then interrupted before it returned: the turn goes to the next taker."""

    class WakesThenFails(threading.Condition):
        def wait(self, timeout: float | None = None) -> bool:
            woke = super().wait(timeout)
            if threading.current_thread().name == "interrupted":
                raise _Stop
            return woke

    turns = Turns(WakesThenFails())
    held = turns.take()
    victim, interrupted = _interrupted_taker(turns)
    eventually(lambda: turns.asked == 2, 10, "the interrupted taker did not ask", interval=0.001)
    with held:  # its turn comes, it wakes, and fails
        pass
    victim.join(10)
    assert interrupted
    assert turns.ended == 2  # its turn was given up, not kept
    with turns.take():  # and the next taker is served at once
        pass
    assert turns.ended == 3

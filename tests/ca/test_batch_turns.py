"""The CA's batch turns (meshid.ca.agents._Turns): one at a time, first come first served, a
turn ended once however often it is left, and a taker interrupted while waiting skipped."""

from __future__ import annotations

import threading
import time

import pytest

from meshid.ca.agents import _Turns

pytestmark = pytest.mark.timeout(30)


def _wait_for(predicate, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 10
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.001)


def test_turns_go_one_at_a_time_in_the_order_they_were_asked_for() -> None:
    turns = _Turns()
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
        _wait_for(lambda n=n: turns._issued == n + 2, f"worker {n} did not ask for its turn")
    with first:
        pass
    for thread in threads:
        thread.join(10)
    assert order == list(range(8))  # threading.Lock makes no such promise
    assert most[0] == 1


def test_a_turn_left_twice_ends_once() -> None:
    turns = _Turns()
    turn = turns.take()
    with turn:
        with turn:  # the store's `with signing:` inside the agent service's `with`
            pass
        assert turns._serving == 1  # ended by the inner exit
    assert turns._serving == 1  # and not again by the outer one
    with turns.take():
        pass
    assert turns._serving == 2


def test_a_taker_interrupted_while_waiting_is_skipped_and_the_next_one_served() -> None:
    turns = _Turns()
    held = turns.take()
    interrupted: list[BaseException] = []
    served = threading.Event()

    class Stop(Exception):
        pass

    # A waiter whose wait raises (as a KeyboardInterrupt would): its ticket must not block the queue.
    original_wait = turns._changed.wait
    calls = [0]

    def failing_wait(timeout: float | None = None) -> bool:
        if threading.current_thread().name == "interrupted":
            calls[0] += 1
            raise Stop
        return original_wait(timeout)

    turns._changed.wait = failing_wait  # type: ignore[method-assign]

    def interrupted_taker() -> None:
        try:
            turns.take()
        except Stop as err:
            interrupted.append(err)

    victim = threading.Thread(target=interrupted_taker, name="interrupted")
    victim.start()
    victim.join(10)
    assert interrupted and calls[0] == 1

    def next_taker() -> None:
        with turns.take():
            served.set()

    after = threading.Thread(target=next_taker)
    after.start()
    _wait_for(lambda: turns._issued == 3, "the next taker did not ask")
    with held:
        pass
    assert served.wait(10), "the turn after the abandoned one never came"
    after.join(10)

"""The CA's serials: 20 octets in DER, unpredictable, never repeated, and never shared with a
forked child (they are drawn from os.urandom a few thousand at a time)."""

from __future__ import annotations

import os

from meshid.ca.authority import random_serial


def test_serials_are_159_bits_with_the_top_one_set_and_never_repeat() -> None:
    serials = [random_serial() for _ in range(10_000)]  # more than one buffer's worth
    assert len(set(serials)) == len(serials)
    assert {s.bit_length() for s in serials} == {159}  # DER: 20 octets, no leading zero octet
    for bit in (0, 1, 80, 157):  # the bits below the top are random: each is set about half the time
        share = sum(s >> bit & 1 for s in serials) / len(serials)
        assert 0.45 < share < 0.55, (bit, share)


def test_a_forked_child_never_draws_its_parents_next_serials() -> None:
    random_serial()  # the buffer is filled: the next serials are decided in this process
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next three serials to the parent, then exit at once
        try:
            os.write(write, b",".join(str(random_serial()).encode() for _ in range(3)))
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        child = {int(s) for s in pipe.read().split(b",")}
    os.waitpid(pid, 0)
    ours = {random_serial() for _ in range(3)}
    assert len(child) == 3
    assert not child & ours

"""What a node agent holds for the entries parented to it: the entry, its SVID, when to renew it.

:class:`EntryCache` does no I/O and reads no clock: the :class:`~meshid.agent.NodeAgent` feeds it
what SyncEntries and BatchNewX509Svid answered and the monotonic time of each step, and asks it
which entries are due. That is the whole schedule:

* A new entry is due at once; an entry whose DNS names or TTL changed is due at once (its SVID is
  served meanwhile); an entry whose selectors alone changed keeps its SVID.
* An SVID of lifetime L is renewed ``L * (renew_at - jitter * random())`` after it was issued, and
  may be taken along up to ``L * jitter`` earlier, inside its own jitter window, when another
  entry's renewal starts a batch: after the first batch the entries renew together, in one call.
* A batch that fails as a whole sets every entry in it to retry after one capped, exponential
  delay, never more than half of what is left of the SVID that expires first; a refusal of one
  entry delays that entry alone.
* A deleted entry is forgotten, with its SVID and key, by the sync that no longer lists it.

Per entry only the entry, its parsed selectors, the SVID (certificate chain and private key, in
memory only) and three numbers are kept; the bundles are the agent's, shared by all.
"""

from __future__ import annotations

import datetime
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshid.agent._renewal import renewal_wait
from meshid.svid import X509Svid
from meshid.workloadapi.attestation import Selector

if TYPE_CHECKING:
    from meshid.ca.client import AgentEntry

__all__ = ["EntryCache", "Served", "retry_delay"]

log = logging.getLogger("meshid.agent")

#: The lifetime assumed for the backoff of an entry that has no SVID yet and asks for the CA's default TTL.
_DEFAULT_LIFETIME = 3600.0

#: One entry as the Workload API serves it: its selectors (None: one did not parse, so it matches no
#: process) and its current SVID.
Served = tuple[tuple[Selector, ...] | None, X509Svid]


def retry_delay(
    lifetime: float, failures: int, remaining: float, max_backoff: float, rng: Callable[[], float] = random.random
) -> float:
    """Seconds until the next attempt after ``failures`` failures in a row: exponential from a
    twentieth of the lifetime (at most 1 s), capped by ``max_backoff`` and a quarter of the
    lifetime, and by half of ``remaining`` (the time the SVID has left) so that attempts come
    closer together as expiry nears; randomised by up to half."""
    base = min(1.0, max(lifetime / 20, 0.05))
    cap = max(base, min(max_backoff, lifetime / 4 if lifetime else max_backoff))
    delay = min(cap, base * 2 ** min(failures, 16))
    if remaining > 0:
        delay = min(delay, max(remaining / 2, 0.05))
    return float(delay * (0.5 + rng() / 2))


@dataclass(slots=True)
class _Slot:
    entry: AgentEntry
    selectors: tuple[Selector, ...] | None
    svid: X509Svid | None = None
    lifetime: float = 0.0
    renew_time: float = 0.0  # monotonic; 0: at once
    window: float = 0.0  # may be renewed this much earlier, to join a batch
    failures: int = 0


def _parse(entry: AgentEntry) -> tuple[Selector, ...] | None:
    try:
        return tuple(Selector.parse(s) for s in entry.selectors)
    except (ValueError, TypeError) as err:  # a kind this agent does not know: match nothing
        log.warning(
            "node agent: entry %s has a selector this agent cannot evaluate (%s); serving it to no process",
            entry.spiffe_id,
            err,
        )
        return None


class EntryCache:
    """The entries of one node agent in the CA's order, their SVIDs and renewal times.

    Used from one thread (the agent's worker); :attr:`served` may be read from any thread: it is
    an immutable tuple, replaced whole by :meth:`publish`.
    """

    def __init__(
        self, *, renew_at: float, jitter: float, max_backoff: float, rng: Callable[[], float] = random.random
    ) -> None:
        self._renew_at = renew_at
        self._jitter = jitter
        self._max_backoff = max_backoff
        self._rng = rng
        self._slots: dict[str, _Slot] = {}
        self.served: tuple[Served, ...] = ()

    def __len__(self) -> int:
        return len(self._slots)

    def entries(self) -> tuple[AgentEntry, ...]:
        return tuple(slot.entry for slot in self._slots.values())

    def svids(self) -> list[X509Svid]:
        return [slot.svid for slot in self._slots.values() if slot.svid is not None]

    def sync(self, entries: Sequence[AgentEntry]) -> bool:
        """Take the entries SyncEntries gave, in its order. Returns whether what is served changed
        (an entry with an SVID was deleted, its selectors changed, or the order did)."""
        old, new = self._slots, {}
        for entry in entries:
            sid = str(entry.spiffe_id)
            slot = old.get(sid)
            if slot is None:
                slot = _Slot(entry, _parse(entry))
            elif slot.entry != entry:
                if (slot.entry.dns_names, slot.entry.ttl) != (entry.dns_names, entry.ttl):
                    slot.renew_time, slot.window, slot.failures = 0.0, 0.0, 0  # its SVID no longer fits
                if slot.entry.selectors != entry.selectors:
                    slot.selectors = _parse(entry)
                slot.entry = entry
            new[sid] = slot
        self._slots = new
        return self.publish()

    def expiry(self, spiffe_id: str) -> datetime.datetime | None:
        """When the SVID held for ``spiffe_id`` expires; None without one."""
        slot = self._slots.get(spiffe_id)
        return None if slot is None or slot.svid is None else slot.svid.not_after

    def earliest_expiry(self, spiffe_ids: Sequence[str]) -> datetime.datetime | None:
        return min((e for e in map(self.expiry, spiffe_ids) if e is not None), default=None)

    def next_due(self) -> float:
        """The earliest renewal time (monotonic); infinity with no entries."""
        return min((slot.renew_time for slot in self._slots.values()), default=float("inf"))

    def due(self, now: float) -> list[str]:
        """The SPIFFE IDs to ask for at ``now``, in entry order: none unless one is due; then
        every entry due, and every entry within its jitter window of being due."""
        if self.next_due() > now:
            return []
        return [sid for sid, slot in self._slots.items() if slot.renew_time - slot.window <= now]

    def issued(self, spiffe_id: str, svid: X509Svid, lifetime: float, now: float) -> None:
        """Install a new SVID of ``lifetime`` seconds for ``spiffe_id`` (ignored if the entry is gone)."""
        slot = self._slots.get(spiffe_id)
        if slot is None:
            return
        slot.svid, slot.lifetime, slot.failures = svid, lifetime, 0
        slot.renew_time = now + renewal_wait(lifetime, self._renew_at, self._jitter, self._rng)
        slot.window = lifetime * self._jitter

    def _lifetime(self, slot: _Slot) -> float:
        if slot.lifetime:
            return slot.lifetime
        return slot.entry.ttl.total_seconds() or _DEFAULT_LIFETIME

    def refused(self, spiffe_id: str, now: float, remaining: float) -> float:
        """The CA refused this one entry: retry it alone later. Returns the delay."""
        slot = self._slots.get(spiffe_id)
        if slot is None:
            return 0.0
        slot.failures += 1
        delay = retry_delay(self._lifetime(slot), slot.failures, remaining, self._max_backoff, self._rng)
        slot.renew_time, slot.window = now + delay, 0.0
        return delay

    def failed(self, spiffe_ids: Sequence[str], failures: int, now: float, remaining: float) -> float:
        """A batch failed as a whole (the CA unreachable, say): its entries retry together after
        one delay, from the shortest lifetime among them. Returns the delay."""
        slots = [self._slots[sid] for sid in spiffe_ids if sid in self._slots]
        if not slots:
            return 0.0
        lifetime = min(self._lifetime(slot) for slot in slots)
        delay = retry_delay(lifetime, failures, remaining, self._max_backoff, self._rng)
        for slot in slots:
            slot.renew_time, slot.window = now + delay, 0.0
        return delay

    def publish(self) -> bool:
        """Rebuild :attr:`served` from the slots; returns whether it changed."""
        served = tuple((slot.selectors, slot.svid) for slot in self._slots.values() if slot.svid is not None)
        if len(served) == len(self.served) and all(
            a[0] == b[0] and a[1] is b[1] for a, b in zip(served, self.served, strict=True)
        ):
            return False
        self.served = served
        return True

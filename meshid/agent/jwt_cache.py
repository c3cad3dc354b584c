"""The agents' JWT-SVID cache: one token per (SPIFFE ID, audience) until half its lifetime.

A workload that asks again within that time gets the same token, so a relying party that
calls often costs the CA one signature per half-lifetime (2.5 minutes by default). The half is
measured as the lifetime on the CA's clock (``iat`` to ``exp``) waited out on the local
monotonic clock, as X509-SVID renewals are, so clock skew moves it neither way.

The audience is chosen by the caller, so the cache is bounded by entries and bytes
(:class:`meshid._cache.BoundedCache`): a caller that asks for many audiences costs CA calls,
never memory. Only tokens the CA issued are stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from meshid._cache import BoundedCache
from meshid.clock import SYSTEM_CLOCK, Clock
from meshid.spiffeid import SpiffeId

if TYPE_CHECKING:
    from meshid.jwtsvid import JwtSvid

__all__ = ["JwtSvidCache"]

_Key = tuple[str, tuple[str, ...]]


class JwtSvidCache:
    """JWT-SVIDs by SPIFFE ID and audience (as a set), each until half its lifetime has passed."""

    def __init__(self, *, max_entries: int = 1024, max_bytes: int = 4 << 20, clock: Clock = SYSTEM_CLOCK) -> None:
        self._cache: BoundedCache[_Key, tuple[JwtSvid, float]] = BoundedCache(
            max_entries=max_entries, max_bytes=max_bytes
        )
        self._clock = clock

    @staticmethod
    def _key(spiffe_id: SpiffeId, audience: Sequence[str]) -> _Key:
        return str(spiffe_id), tuple(sorted(set(audience)))

    def get(self, spiffe_id: SpiffeId, audience: Sequence[str]) -> JwtSvid | None:
        """The cached token, if it is not yet half-way through its lifetime."""
        found = self._cache.get(self._key(spiffe_id, audience))
        if found is None or self._clock.monotonic() >= found[1]:
            return None
        return found[0]

    def put(self, svid: JwtSvid) -> None:
        """Keep ``svid`` (just issued) for its audience until half its lifetime has passed."""
        issued_at = svid.issued_at or self._clock.now()
        half = max(0.0, (svid.expiry - issued_at).total_seconds() / 2)
        local_left = (svid.expiry - self._clock.now()).total_seconds()  # a CA clock ahead cannot stretch it
        due = self._clock.monotonic() + min(half, max(0.0, local_left))
        size = len(svid.token) + sum(len(a) for a in svid.audience) + 256
        self._cache.put(self._key(svid.spiffe_id, svid.audience), (svid, due), size)

    def clear(self) -> None:
        self._cache.clear()

    def __len__(self) -> int:
        return len(self._cache)

"""When to renew an SVID: the one formula the issuer source, the node agent and its cache share;
and which failed calls to the CA no retry can mend (the CA refuses the SVID, or it has expired),
how long to wait after one, and what the operator must do then."""

from __future__ import annotations

import contextlib
import datetime
import random
from collections.abc import Callable, Iterator

from meshid.errors import RemoteError
from meshid.svid import X509Svid

#: The shortest wait before a renewal, in seconds: an SVID that arrives (nearly) expired by the
#: local clock (a clock running ahead of the CA's) must not turn into a loop of renewals.
MIN_WAIT = 0.5

#: The status codes by which the CA refuses an SVID whatever the moment: revoked
#: (``UNAUTHENTICATED`` from its revocation check, ``PERMISSION_DENIED`` from the renewal), its
#: entry deleted or the identity not allowed (``PERMISSION_DENIED``, ``NOT_FOUND``).
REFUSED_CODES = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED", "NOT_FOUND"})

#: Seconds before the first attempt after a refusal, and the most between two: minutes, not the
#: seconds of an outage, yet often enough to see an entry registered again.
REFUSED_FIRST_WAIT = 30.0
REFUSED_MAX_WAIT = 300.0

_NO_ANSWER = ("UNAVAILABLE", "DEADLINE_EXCEEDED")


def renewal_wait(lifetime: float, renew_at: float, jitter: float, rng: Callable[[], float] = random.random) -> float:
    """Seconds from issuance to the renewal of an SVID with ``lifetime`` seconds to live: at
    ``renew_at`` of its lifetime, less up to ``jitter`` of it at random (so that many workloads
    do not renew at once), and never less than :data:`MIN_WAIT`."""
    return max(MIN_WAIT, lifetime * (renew_at - jitter * rng()))


def refused_wait(refusals: int, rng: Callable[[], float] = random.random) -> float:
    """Seconds until the next attempt after ``refusals`` (at least 1) refusals in a row: from
    :data:`REFUSED_FIRST_WAIT`, doubling up to :data:`REFUSED_MAX_WAIT`, less up to half at random."""
    delay = min(REFUSED_MAX_WAIT, REFUSED_FIRST_WAIT * 2 ** min(max(refusals, 1) - 1, 16))
    return float(delay * (0.5 + rng() / 2))


def refusal(what: str, err: Exception, svid: X509Svid, now: datetime.datetime) -> str | None:
    """Why ``what`` (a call to the CA with ``svid``, failed with ``err``) cannot succeed however
    often it is tried, and what to do; None when a retry may succeed (the CA unreachable or busy).

    An expired SVID is refused by the CA's TLS layer, which the client sees as the connection
    closed (``UNAVAILABLE``): said as such, for the agent knows when its SVID expired.
    """
    again = (
        f"re-attest with a new join token (`meshid token create --spiffe-id {svid.spiffe_id}`, "
        "then restart the agent with `--join-token-file`)"
    )
    code = err.code if isinstance(err, RemoteError) else None
    if svid.not_after <= now:
        seen = f"the call fails with {code}" if code in _NO_ANSWER else f"{err}"
        return (
            f"{what}: the SVID of {svid.spiffe_id} (serial {svid.serial:x}) EXPIRED at "
            f"{svid.not_after.isoformat()}; the CA refuses an expired SVID (its TLS handshake fails, so "
            f"{seen}): {again}"
        )
    if code in REFUSED_CODES:
        return (
            f"{what}: the CA refuses the SVID of {svid.spiffe_id} (serial {svid.serial:x}): {err}; "
            f"retrying cannot help: {again}"
        )
    return None


@contextlib.contextmanager
def explaining(what: str, svid: X509Svid, now: Callable[[], datetime.datetime]) -> Iterator[None]:
    """Around a call to the CA with ``svid``: a RemoteError that no retry can mend (:func:`refusal`)
    is raised again with the same code and the reason; any other as it is."""
    try:
        yield
    except RemoteError as err:
        why = refusal(what, err, svid, now())
        if why is None:
            raise
        raise RemoteError(why, err.code) from err

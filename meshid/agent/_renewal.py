"""When to renew an SVID: the one formula the issuer source, the node agent and its cache share."""

from __future__ import annotations

import random
from collections.abc import Callable

#: The shortest wait before a renewal, in seconds: an SVID that arrives (nearly) expired by the
#: local clock (a clock running ahead of the CA's) must not turn into a loop of renewals.
MIN_WAIT = 0.5


def renewal_wait(lifetime: float, renew_at: float, jitter: float, rng: Callable[[], float] = random.random) -> float:
    """Seconds from issuance to the renewal of an SVID with ``lifetime`` seconds to live: at
    ``renew_at`` of its lifetime, less up to ``jitter`` of it at random (so that many workloads
    do not renew at once), and never less than :data:`MIN_WAIT`."""
    return max(MIN_WAIT, lifetime * (renew_at - jitter * rng()))

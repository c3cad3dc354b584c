"""The exceptions meshid raises.

Every error meshid raises on purpose derives from :class:`MeshIdError`, so one
``except MeshIdError`` catches them all. Errors about bad input also derive
from :class:`ValueError`, so code that already handles ``ValueError`` keeps
working::

    MeshIdError
    ├── InvalidSpiffeIdError (ValueError)   a SPIFFE ID or trust domain breaks the standard
    ├── InvalidSvidError (ValueError)       a certificate/key pair is not a valid X509-SVID
    ├── InvalidBundleError (ValueError)     a trust bundle cannot be read
    ├── InvalidPolicyError (ValueError)     an authorization policy cannot be loaded
    ├── VerificationError                   a peer's chain does not verify against its bundle
    └── SourceError                         an identity source has nothing to hand out

Messages start with the concept ("SPIFFE ID", "X509-SVID", "policy", ...), say
what is wrong and, where possible, what to do.
"""

from __future__ import annotations

__all__ = [
    "InvalidBundleError",
    "InvalidPolicyError",
    "InvalidSpiffeIdError",
    "InvalidSvidError",
    "MeshIdError",
    "SourceError",
    "VerificationError",
]


class MeshIdError(Exception):
    """The root of every error meshid raises on purpose."""


class InvalidSpiffeIdError(MeshIdError, ValueError):
    """A SPIFFE ID, trust domain or SPIFFE ID pattern breaks the SPIFFE ID standard."""


class InvalidSvidError(MeshIdError, ValueError):
    """A certificate chain and key do not form a valid X509-SVID."""


class InvalidBundleError(MeshIdError, ValueError):
    """A trust bundle (PEM or SPIFFE bundle JSON) cannot be read."""


class InvalidPolicyError(MeshIdError, ValueError):
    """An authorization policy is malformed; the message names the file and the rule."""


class VerificationError(MeshIdError):
    """A peer's certificate chain does not verify against its trust domain's bundle."""


class SourceError(MeshIdError):
    """An identity source cannot hand out an SVID or bundle."""

"""The exceptions meshid raises.

Every error meshid raises on purpose derives from :class:`MeshIdError`, so one
``except MeshIdError`` catches them all. Errors about bad input also derive
from :class:`ValueError`, so code that already handles ``ValueError`` keeps
working::

    MeshIdError
    ├── InvalidSpiffeIdError (ValueError)   a SPIFFE ID or trust domain breaks the standard
    ├── InvalidSvidError (ValueError)       a certificate/key pair is not a valid X509-SVID
    ├── InvalidBundleError (ValueError)     a trust bundle cannot be read
    ├── InvalidJwtSvidError (ValueError)    a JWT-SVID is malformed or refused (the interceptor:
    │                                       UNAUTHENTICATED; the CA and the Workload API, where a
    │                                       caller sent it: INVALID_ARGUMENT)
    ├── InvalidPolicyError (ValueError)     an authorization policy (or a table of its test
    │                                       cases) cannot be loaded
    ├── InvalidAuditLogError (ValueError)   an audit log to replay is not meshid's JSON lines
    ├── InvalidAddressError (ValueError)    not HOST:PORT (or unix:PATH), or a port out of range
    ├── VerificationError                   a peer's chain does not verify against its bundle
    ├── AccessDeniedError                   a policy denies a verified peer (``meshid.pqtls``; the
    │                                       grpc interceptors answer PERMISSION_DENIED instead)
    ├── SourceError                         an identity source has nothing to hand out
    ├── RemoteError                         the CA answered a client with an error (``.code``)
    │   └── UnreachableError                    no answer: nothing listens, the connection or TLS
    │                                           handshake failed, or the call timed out
    ├── DataDirError                        the CA's data folder is missing, incomplete or taken
    ├── ListenError                         a server cannot listen where it was told (in use, ...)
    ├── StoreError                          the CA's database cannot be used       UNAVAILABLE
    └── IssuanceError                       the CA refused a request; one gRPC status code each:
        ├── InvalidRequestError (ValueError)    malformed CSR or request          INVALID_ARGUMENT
        ├── TokenError                          unknown, used or expired token    UNAUTHENTICATED
        ├── AttestationError                    a node agent did not prove its    UNAUTHENTICATED
        │                                       node, or was evicted
        ├── NotAuthorizedError                  asks for what the caller may not  PERMISSION_DENIED
        ├── NotFoundError                       no such entry or serial           NOT_FOUND
        ├── AlreadyExistsError                  the entry exists                  ALREADY_EXISTS
        └── RateLimitedError                    too many creations per minute     RESOURCE_EXHAUSTED

The gRPC status code of each CA error is chosen in one place, ``meshid.ca.grpc_api.status_for``.

Messages start with the concept ("SPIFFE ID", "X509-SVID", "policy", ...), say
what is wrong and, where possible, what to do.
"""

from __future__ import annotations

__all__ = [
    "AccessDeniedError",
    "AlreadyExistsError",
    "AttestationError",
    "DataDirError",
    "InvalidAddressError",
    "InvalidAuditLogError",
    "InvalidBundleError",
    "InvalidJwtSvidError",
    "InvalidPolicyError",
    "InvalidRequestError",
    "InvalidSpiffeIdError",
    "InvalidSvidError",
    "IssuanceError",
    "ListenError",
    "MeshIdError",
    "NotAuthorizedError",
    "NotFoundError",
    "RateLimitedError",
    "RemoteError",
    "SourceError",
    "StoreError",
    "TokenError",
    "UnreachableError",
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


class InvalidJwtSvidError(MeshIdError, ValueError):
    """A JWT-SVID is malformed or fails validation; the message ("JWT-SVID: ...") says why."""


class InvalidPolicyError(MeshIdError, ValueError):
    """An authorization policy is malformed; the message names the file and the rule."""


class InvalidAuditLogError(MeshIdError, ValueError):
    """An audit log given to ``meshid policy replay`` is not the JSON lines meshid writes."""


class InvalidAddressError(MeshIdError, ValueError):
    """An address is not ``HOST:PORT`` (``[IPv6]:PORT``) or, where allowed, ``unix:PATH``: no
    port, a port that is not a number from 1 to 65535 (0 only where it means "pick one"), no
    host, or a host that is not a name or an IP address."""


class VerificationError(MeshIdError):
    """A peer's certificate chain does not verify against its trust domain's bundle."""


class AccessDeniedError(MeshIdError):
    """A verified peer is denied by the authorization policy (outside grpc, which answers PERMISSION_DENIED)."""


class SourceError(MeshIdError):
    """An identity source cannot hand out an SVID or bundle."""


class IssuanceError(MeshIdError):
    """The CA refused a request. Each subclass maps to exactly one gRPC status code."""


class InvalidRequestError(IssuanceError, ValueError):
    """A malformed CSR or request (INVALID_ARGUMENT). Nothing was written for it."""


class TokenError(IssuanceError):
    """A join token is unknown, already used or expired (UNAUTHENTICATED)."""


class AttestationError(IssuanceError):
    """A node agent's attestation failed or no longer holds (UNAUTHENTICATED): an x509pop proof
    that does not verify, an unknown, used or expired challenge, or an agent that was evicted."""


class NotAuthorizedError(IssuanceError):
    """The caller asks for something it may not have, e.g. another SPIFFE ID (PERMISSION_DENIED)."""


class NotFoundError(IssuanceError):
    """No such registration entry or serial (NOT_FOUND)."""


class AlreadyExistsError(IssuanceError):
    """The registration entry already exists (ALREADY_EXISTS)."""


class RateLimitedError(IssuanceError):
    """Too many entries or tokens created per minute by one admin (RESOURCE_EXHAUSTED)."""


class StoreError(MeshIdError):
    """The CA's database cannot be used: locked, full, corrupt (UNAVAILABLE). Not a refusal of
    the request: the same request may succeed once the store is usable again."""


class ListenError(MeshIdError):
    """A server (the CA, the metrics endpoint, the Workload API) cannot listen on its address:
    another process listens there, or the address cannot be bound."""


class DataDirError(MeshIdError):
    """The CA's data folder is missing, incomplete, or already initialised."""


class RemoteError(MeshIdError):
    """The CA refused or could not answer a client call; ``code`` is the gRPC status code name."""

    def __init__(self, message: str, code: str = "UNKNOWN") -> None:
        super().__init__(message)
        self.code = code


class UnreachableError(RemoteError):
    """A server could not be reached or gave no answer: nothing listens at the address, the
    connection or its TLS handshake failed, or the call timed out (``code`` UNAVAILABLE or
    DEADLINE_EXCEEDED). Retrying later may succeed; the command line exits 3 for it."""

    def __init__(self, message: str, code: str = "UNAVAILABLE") -> None:
        super().__init__(message, code)

"""The sync server interceptor: adapts meshid's decision path to ``grpc.server``.

A grpc server interceptor sees only the method and metadata; the peer's certificate is on
the ``ServicerContext``. So the interceptor wraps the handler: the wrapper authorizes with
the context in hand before the servicer's code runs, for all four RPC shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import grpc

from meshid import peer as _peer
from meshid._authorizer import RAW_KEY_NAMES, InterceptorBase, Refusal
from meshid.peer import PeerIdentity

__all__ = ["AuthorizationInterceptor"]

# grpc-stubs declares the server-side classes generic in (request, response); grpc's runtime
# classes are not subscriptable, so the parameterized base exists for the type checker only.
if TYPE_CHECKING:
    _ServerInterceptor = grpc.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.ServerInterceptor


try:  # grpc's own C accessor of a call's auth context, with its keys still bytes
    from grpc._cython import cygrpc as _cygrpc  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - grpcio always ships it
    _cygrpc = None


#: The auth context properties the decision path reads (meshid.peer.PeerVerifier.identify),
#: as grpc's core names them (bytes) and as the decision path does (str).
_READ = tuple(
    (name, name.encode())
    for name in ("x509_pem_cert", "x509_pem_cert_chain", "ssl_tls_version", "ssl_negotiated_key_exchange_group")
)


def _raw_call(context: grpc.ServicerContext) -> Any:
    """The call's core object, whose C accessors the fast path reads; None where it is not
    there (another grpc version, or a context of another kind)."""
    event = getattr(context, "_rpc_event", None)
    return None if _cygrpc is None or event is None else getattr(event, "call", None)


def _raw_auth_context(call: Any) -> Mapping[bytes, Sequence[bytes]] | None:
    """The call's auth context from grpc's own C accessor, keys still bytes; None where that
    accessor does not take ``call``."""
    if call is None:
        return None
    try:
        return _cygrpc.auth_context(call)  # type: ignore[no-any-return]
    except (AttributeError, TypeError):
        return None


def _auth_properties(
    context: grpc.ServicerContext, raw: Mapping[bytes, Sequence[bytes]] | None = None
) -> Mapping[str, Sequence[bytes]]:
    """The auth context properties the decision reads, from grpc's core as they lie.

    ``ServicerContext.auth_context()`` decodes all of its ~13 keys on every call; the decision
    reads four, so this takes those four from grpc's own C accessor (``raw``, or read now), and
    falls back to the public method where that accessor is not there.
    """
    if raw is None:
        raw = _raw_auth_context(_raw_call(context))
    if raw is not None:
        return {name: raw[key] for name, key in _READ if key in raw}
    # grpc returns each auth property as a list of bytes; grpc-stubs declares a bare ``bytes``.
    return cast("Mapping[str, Sequence[bytes]]", context.auth_context())


def _unknown_method(request: Any, context: grpc.ServicerContext) -> Any:
    context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")


class AuthorizationInterceptor(InterceptorBase, _ServerInterceptor):
    """Authorizes every call by the caller's verified identity and a policy.

    Args:
        policy: an :class:`AuthorizationPolicy`, or the path of a policy file (then
            :meth:`start` watches it and :meth:`reload` re-reads it).
        source: where the trust bundles come from (an identity source, a ``BundleSet`` or a
            ``TrustBundle``); each peer is verified against its own trust domain's bundle.
        unauthenticated_methods: full method names open to every caller, verified or not
            (for example a health check, or an issuer's first-issuance call). Only useful
            on a server whose TLS layer admits such callers; the handler finds the caller in
            :func:`meshid.peer_identity` only if it did verify.
        trusted_proxies: SPIFFE IDs of TLS-terminating proxies (nginx, Envoy). From such a
            peer, the client certificate forwarded in ``forwarded_header`` is verified
            against its trust domain's bundle and decides the call; from any other peer the
            header is ignored. A proxy that forwards no certificate is refused (fail closed).
        forwarded_header: ``x-forwarded-client-cert`` (Envoy's XFCC, the default) or the
            header an nginx ``grpc_set_header`` fills with ``$ssl_client_escaped_cert``.
        clock: the time certificates are checked at (:mod:`meshid.clock`; the system clock).
        candidate: a candidate policy (object or path) for a dry run. Calls are still decided
            by ``policy`` alone; each call the candidate decides otherwise is a ``would_allow``
            or ``would_deny`` record on ``meshid.dryrun`` and a count (:mod:`meshid.authz.dryrun`).
            Its file is reloaded and watched as the policy's is; a broken candidate is logged
            and never affects enforcement. Promote it with ``reload(candidate_path)``.

    Every decision the policy audits (its ``audit_condition``; every one if it sets none) is a
    record on the ``meshid.audit`` logger: allows at INFO, denies at WARNING, so the logger at
    INFO keeps both and at WARNING only denies (``logging.getLogger("meshid.audit")
    .setLevel(logging.INFO)`` and a handler). Between :meth:`start` and :meth:`close` (or in a
    ``with`` block) records are formatted and written on a thread of their own, in batches;
    ``close()`` writes the rest. Otherwise they are written in the call.

    No verified certificate gives ``UNAUTHENTICATED``; a denial gives ``PERMISSION_DENIED``
    naming the method and the caller, never the policy's contents. An unknown method is
    authorized like any other before it is reported ``UNIMPLEMENTED``, so callers cannot
    probe which methods exist.

    Raises:
        TypeError: bad argument types.
        InvalidPolicyError: the policy file cannot be loaded.
    """

    def _check(self, context: grpc.ServicerContext, method: str, known: bool = True) -> PeerIdentity | None:
        result = raw = None
        # _raw_call and _raw_auth_context written out: two Python frames fewer on every call
        call = getattr(getattr(context, "_rpc_event", None), "call", None) if known else None
        if call is not None and _cygrpc is not None:
            try:
                raw = _cygrpc.auth_context(call)
            except (AttributeError, TypeError):
                raw = None
            if raw is not None:
                result = self._authorizer.repeat_call(raw.get, RAW_KEY_NAMES, method, call.peer)
        if result is None:  # not a repeat call decided by the memo: the whole path
            auth = _auth_properties(context, raw)
            # metadata and the peer address are fetched only if the policy or the audit log needs them
            result = self._authorizer.authorize(auth, method, context.invocation_metadata, context.peer, known=known)
        if isinstance(result, Refusal):
            context.abort(result.code, result.message)
        if result is not None:
            _peer.attach(context, result)
        return result

    def _recheck(self, context: grpc.ServicerContext, identity: PeerIdentity) -> None:
        refusal = self._authorizer.recheck(identity)
        if refusal is not None:
            context.abort(refusal.code, refusal.message)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is not None:  # a repeat call: one lookup, inline (no frame more per call)
            kept = self._wrapped.get((id(handler), method))
            if kept is not None and kept[0] is handler:
                return kept[1]
        return self._guarded(handler, method)

    def _wrap(self, handler: grpc.RpcMethodHandler[Any, Any], method: str) -> grpc.RpcMethodHandler[Any, Any]:
        return _wrap(handler, method, self._check, self._recheck)

    def _wrap_unknown(self, method: str) -> grpc.RpcMethodHandler[Any, Any]:
        return _wrap(_UNKNOWN, method, lambda context, m: self._check(context, m, False), self._recheck)


_UNKNOWN = grpc.stream_stream_rpc_method_handler(_unknown_method)
Check = Callable[[grpc.ServicerContext, str], "PeerIdentity | None"]
Recheck = Callable[[grpc.ServicerContext, PeerIdentity], None]


def _rechecked(
    items: Iterator[Any], context: grpc.ServicerContext, identity: PeerIdentity | None, recheck: Recheck
) -> Iterator[Any]:
    """``items`` (a request or response stream), with the peer re-checked before each message:
    a stream outlives neither the peer's certificate nor its revocation."""
    if identity is None:  # an unauthenticated method called by an unverified peer
        yield from items
        return
    for item in items:
        recheck(context, identity)
        yield item


def _wrap(
    handler: grpc.RpcMethodHandler[Any, Any], method: str, check: Check, recheck: Recheck
) -> grpc.RpcMethodHandler[Any, Any]:
    """The handler with ``check`` run first, for each of the four RPC shapes; streams re-check
    the peer at every message."""
    deser, ser = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
            check(context, method)
            return inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, deser, ser)
    if handler.unary_stream is not None:
        inner_us = handler.unary_stream

        def unary_stream(request: Any, context: grpc.ServicerContext, *callback: Any) -> Any:
            identity = check(context, method)
            responses = inner_us(request, context, *callback)
            return responses if callback else _rechecked(responses, context, identity, recheck)

        return grpc.unary_stream_rpc_method_handler(_keep_non_blocking(unary_stream, inner_us), deser, ser)
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        def stream_unary(request_iterator: Any, context: grpc.ServicerContext) -> Any:
            identity = check(context, method)
            return inner_su(_rechecked(request_iterator, context, identity, recheck), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, deser, ser)
    inner_ss = handler.stream_stream

    def stream_stream(request_iterator: Any, context: grpc.ServicerContext, *callback: Any) -> Any:
        identity = check(context, method)
        assert inner_ss is not None, "a grpc method handler carries one behaviour; none is set"
        requests = _rechecked(request_iterator, context, identity, recheck)
        responses = inner_ss(requests, context, *callback)
        return responses if callback else _rechecked(responses, context, identity, recheck)

    return grpc.stream_stream_rpc_method_handler(_keep_non_blocking(stream_stream, inner_ss), deser, ser)


def _keep_non_blocking(wrapper: Callable[..., Any], inner: Any) -> Callable[..., Any]:
    """Carry grpc's experimental non-blocking marks over, so a behaviour that answers through
    ``send_response_callback`` (grpc's own health Watch) does not hold a worker thread."""
    if getattr(inner, "experimental_non_blocking", False):
        wrapper.experimental_non_blocking = True  # type: ignore[attr-defined]
        wrapper.experimental_thread_pool = getattr(inner, "experimental_thread_pool", None)  # type: ignore[attr-defined]
    return wrapper

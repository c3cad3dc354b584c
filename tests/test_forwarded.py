"""Envoy's x-forwarded-client-cert, read the same way as nginx's header (nginx itself: test_nginx.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import time
import urllib.parse

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given, settings
from hypothesis import strategies as st

import meshid
from meshid.ca import Authority
from meshid.forwarded import XFCC_HEADER, ForwardedIdentities, parse_xfcc
from support import FRONTEND_ID, INTRUDER_ID, SAY_HELLO, SERVER_ID, call, sync_server

PROXY_ID = "spiffe://example.org/ns/edge/sa/envoy"


def _xfcc(svid: meshid.X509Svid, *, hops: int = 1) -> str:
    cert = urllib.parse.quote(svid.leaf.public_bytes(Encoding.PEM).decode())
    digest = hashlib.sha256(svid.leaf.public_bytes(Encoding.DER)).hexdigest()
    element = f'By=spiffe://example.org/ns/edge/sa/envoy;Hash={digest};Cert="{cert}";Subject="CN=x,O=y";URI={svid.spiffe_id}'
    earlier = 'By=spiffe://a/b;Hash=def;Subject="CN=earlier, hop";URI=spiffe://example.org/earlier'
    return ",".join([earlier] * (hops - 1) + [element])


def _proxy(ca: Authority, group: str = "X25519MLKEM768") -> meshid.PeerIdentity:
    svid = ca.issue_svid(PROXY_ID)
    peer = meshid.PeerIdentity.from_certificate(svid.leaf, spiffe_id=svid.spiffe_id)
    return dataclasses.replace(peer, tls_version="TLSv1.3", key_exchange_group=group)


def test_xfcc_last_element_decides_and_is_verified(ca: Authority, bundles) -> None:
    reader = ForwardedIdentities([PROXY_ID], lambda: bundles)
    frontend = ca.issue_svid(FRONTEND_ID)
    proxy = _proxy(ca)
    identity = reader.identify([(XFCC_HEADER, _xfcc(frontend, hops=3))], proxy, time.time())
    assert identity.spiffe_id == frontend.spiffe_id
    assert identity.thumbprint == frontend.thumbprint
    # the hop meshid sees is the proxy's: its TLS parameters are what policies check
    assert (identity.tls_version, identity.key_exchange_group) == ("TLSv1.3", "X25519MLKEM768")
    stranger = Authority.create_root("example.org").issue_svid(FRONTEND_ID)
    cases = [
        ([("other", "x")], "forwarded no client certificate"),
        ([(XFCC_HEADER, _xfcc(frontend)), (XFCC_HEADER, _xfcc(frontend))], "appears 2 times"),
        ([(XFCC_HEADER, _xfcc(stranger))], "does not verify"),
        ([(XFCC_HEADER, 'Cert="garbage"')], "not a PEM certificate"),
        ([(XFCC_HEADER, "x" * 40_000)], "larger than"),
    ]
    for metadata, message in cases:
        with pytest.raises(meshid.VerificationError, match=message):
            reader.identify(metadata, proxy, time.time())


def test_interceptor_decides_on_the_forwarded_identity_only_from_the_proxy(ca, bundles, server_source) -> None:
    policy = meshid.AuthorizationPolicy.from_dict(
        {"allow": [{"name": "fe", "methods": ["*"], "spiffe_ids": [FRONTEND_ID]}]}
    )
    interceptor = meshid.AuthorizationInterceptor(policy, source=server_source, trusted_proxies=[PROXY_ID])
    header = [(XFCC_HEADER, _xfcc(ca.issue_svid(FRONTEND_ID)))]
    with sync_server(server_source, interceptor) as port:
        outcomes = {}
        for direct in (PROXY_ID, INTRUDER_ID):
            source = meshid.StaticSource(ca.issue_svid(direct), bundles)
            with meshid.secure_channel(f"127.0.0.1:{port}", source, server_id=SERVER_ID) as channel:
                outcomes[direct] = call(channel, metadata=header)
        assert outcomes[PROXY_ID] == ("OK", FRONTEND_ID)  # the forwarded caller decides
        assert outcomes[INTRUDER_ID][0] == "PERMISSION_DENIED"  # the header from a non-proxy is ignored
        assert INTRUDER_ID in outcomes[INTRUDER_ID][1]
        proxy = meshid.StaticSource(ca.issue_svid(PROXY_ID), bundles)
        with meshid.secure_channel(f"127.0.0.1:{port}", proxy, server_id=SERVER_ID) as channel:
            code, details = call(channel)
        assert code == "UNAUTHENTICATED"  # a trusted proxy that forwards nothing is refused, never the caller
        assert "forwarded no client certificate" in details


def test_an_unauthenticated_method_called_through_the_proxy_names_the_forwarded_caller(
    ca, bundles, server_source
) -> None:
    """An open method is open to all, but the caller the handler is told is the same one an
    authenticated method would decide on: the forwarded client, never the proxy itself."""
    policy = meshid.AuthorizationPolicy.from_dict(
        {"allow": [{"name": "nobody", "methods": ["*"], "spiffe_ids": ["spiffe://example.org/nobody"]}]}
    )
    interceptor = meshid.AuthorizationInterceptor(
        policy, source=server_source, trusted_proxies=[PROXY_ID], unauthenticated_methods=[SAY_HELLO]
    )
    stranger = Authority.create_root("example.org").issue_svid(FRONTEND_ID)
    with sync_server(server_source, interceptor) as port:
        proxy = meshid.StaticSource(ca.issue_svid(PROXY_ID), bundles)
        with meshid.secure_channel(f"127.0.0.1:{port}", proxy, server_id=SERVER_ID) as channel:
            forwarded = call(channel, metadata=[(XFCC_HEADER, _xfcc(ca.issue_svid(FRONTEND_ID)))])
            unverified = call(channel, metadata=[(XFCC_HEADER, _xfcc(stranger))])
            nothing = call(channel)
        direct = meshid.StaticSource(ca.issue_svid(INTRUDER_ID), bundles)
        with meshid.secure_channel(f"127.0.0.1:{port}", direct, server_id=SERVER_ID) as channel:
            not_from_a_proxy = call(channel, metadata=[(XFCC_HEADER, _xfcc(ca.issue_svid(FRONTEND_ID)))])
    assert forwarded == ("OK", FRONTEND_ID)
    assert not_from_a_proxy == ("OK", INTRUDER_ID)  # the header from a non-proxy is ignored
    # Open to all, so neither is refused; the handler is told of no caller (support.Greeter's
    # peer_identity raises, grpc answers UNKNOWN with its message): the forwarded certificate
    # does not verify, or there is none, and a proxy is never the caller.
    named_nobody = ("UNKNOWN", "Exception calling application: peer identity: none for this call; build the server "
                    "with meshid's AuthorizationInterceptor")  # fmt: skip
    assert unverified == named_nobody
    assert nothing == named_nobody


# --- the XFCC grammar, strictly (issue #10) ---------------------------------------------------------

_KEYS = st.sampled_from(["By", "Hash", "Cert", "Chain", "Subject", "URI", "DNS"])
_VALUES = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@settings(max_examples=300, deadline=None)
@given(st.lists(st.dictionaries(_KEYS, _VALUES, min_size=1, max_size=7), min_size=1, max_size=4))
def test_xfcc_round_trips_what_envoy_writes(elements: list[dict[str, str]]) -> None:
    header = ",".join(";".join(f"{k}={_quote(v)}" for k, v in element.items()) for element in elements)
    parsed = parse_xfcc(header)
    assert parsed == [{k.lower(): [v] for k, v in element.items()} for element in elements]


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet='By=Cert;,"\\ x', max_size=60))
def test_xfcc_parser_returns_or_refuses_never_crashes(header: str) -> None:
    try:
        parsed = parse_xfcc(header)
    except meshid.VerificationError as err:
        assert str(err).startswith("forwarded certificate: XFCC")
    else:
        assert parsed and all(parsed)


def test_xfcc_grammar_table() -> None:
    ok = {
        'By=a;URI=spiffe://x/1;URI=spiffe://x/2;DNS=a;DNS=b': [{"by": ["a"], "uri": ["spiffe://x/1", "spiffe://x/2"], "dns": ["a", "b"]}],
        'Subject="CN=a\\"b, O=c;d"': [{"subject": ['CN=a"b, O=c;d']}],
        'By=a,By=b': [{"by": ["a"]}, {"by": ["b"]}],
        'hash=ab; cert=""': [{"hash": ["ab"], "cert": [""]}],
    }
    for header, expected in ok.items():
        assert parse_xfcc(header) == expected, header
    refused = {
        'Cert="abc': "unbalanced quote",
        'Cert="a"b': "text after a closing quote",
        "Cert=a;;By=b": "empty pair",
        "Cert=a,,By=b": "empty element",
        "Cert=a,": "empty element",
        "Cert=a;": "empty pair",
        "=a": "empty key",
        "Cert=a;cert=b": "appears twice",
        "Evil=1": "not one Envoy writes",
        'By=a"b': "unquoted",
        "By=a=b": "unquoted",
        "": "not key=value",
        "Cert": "not key=value",
    }
    for header, message in refused.items():
        with pytest.raises(meshid.VerificationError, match=message):
            parse_xfcc(header)


def test_require_pq_signature_refuses_an_ml_dsa_certificate_forwarded_over_a_classical_hop(ca: Authority) -> None:
    """A forwarded certificate is public and proves nothing by itself: what authenticated the
    call to this server is the proxy's classical handshake, so whoever forges the proxy's ECDSA
    identity could forward anyone's ML-DSA certificate."""
    from meshid.ca import generate_key

    pq = Authority.create_root("example.org", key=generate_key("ml-dsa-65"))
    both = meshid.BundleSet.of(meshid.TrustBundle(ca.trust_domain, (*ca.roots, *pq.roots)))
    server_source = meshid.StaticSource(ca.issue_svid(SERVER_ID, dns_names=["localhost"]), both)
    policy = meshid.AuthorizationPolicy.from_dict(
        {"require_pq_signature": True, "allow": [{"name": "fe", "methods": ["*"], "spiffe_ids": [FRONTEND_ID]}]}
    )
    interceptor = meshid.AuthorizationInterceptor(policy, source=server_source, trusted_proxies=[PROXY_ID])
    header = [(XFCC_HEADER, _xfcc(pq.issue_svid(FRONTEND_ID, key_kind="ml-dsa-65")))]
    # An ML-DSA certificate makes an ~8.6 KB header: past grpc's 8 KiB soft limit, where grpc
    # refuses a random share of calls (RESOURCE_EXHAUSTED); raised so meshid is what decides.
    big_metadata = [("grpc.max_metadata_size", 64 * 1024), ("grpc.absolute_max_metadata_size", 64 * 1024)]
    with sync_server(server_source, interceptor, options=big_metadata) as port:
        proxy = meshid.StaticSource(ca.issue_svid(PROXY_ID), both)
        with meshid.secure_channel(f"127.0.0.1:{port}", proxy, server_id=SERVER_ID) as channel:
            code, details = call(channel, metadata=header)
    assert code == "PERMISSION_DENIED", (code, details)
    assert "post-quantum" in details and "ECDSA" in details, details

"""Property tests over every parser meshid exposes to untrusted input (issue #6).

SPIFFE IDs and trust domains, policies (both formats, as dicts and as files), X509-SVIDs,
trust bundles (PEM and SPIFFE JSON), CSRs (``parse_csr``, the issuing service over a real
SQLite store, and the running CA over gRPC) and ``meshid svid inspect`` get random input and
mutations of real input made with meshid's own CA. The property everywhere: the only exceptions
are meshid's own (:class:`MeshIdError`), or ``TypeError`` where a docstring promises it for a
value of the wrong Python type, always with a non-empty message; nothing else escapes, and
nothing hangs (a hypothesis deadline per example, a pytest-timeout per test).

BUGs found. Each defect these properties found has a minimal reproducer below (the
``test_regression_*`` tests); all are fixed. There is one mode, strict: any exception that
is not meshid's (or a promised ``TypeError``) fails the property, and the running CA must
answer every bad CSR with ``INVALID_ARGUMENT`` (never ``INTERNAL``).

The figures (cases tried per target, meshid errors, accepted inputs and other exceptions) are
printed when the module finishes (run with ``-s`` to see them).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime
import io
import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from meshid import (
    AuthorizationPolicy,
    MeshIdError,
    PeerIdentity,
    SpiffeId,
    TrustBundle,
    TrustDomain,
    X509Svid,
    identity_dns_name,
)

# The generated protobuf module is private. It is imported only to send IssueWithToken requests
# carrying arbitrary CSR bytes, which the public client (meshid.ca.client) never builds: it always
# sends a CSR it made itself from a fresh key.
from meshid._proto import issuer_pb2
from meshid.ca import Authority, generate_key
from meshid.ca.bootstrap import anonymous_client
from meshid.ca.client import AdminClient, fetch_svid
from meshid.ca.csr import MAX_CSR_BYTES, build_csr, parse_csr
from meshid.ca.datadir import init_data_dir
from meshid.ca.issuing import IssuingService
from meshid.ca.server import CaServer
from meshid.ca.store import SqliteStore
from meshid.cli import main as cli_main
from meshid.errors import InvalidRequestError

pytestmark = pytest.mark.timeout(120)

TD = "example.org"
WEB_ID = f"spiffe://{TD}/ns/prod/sa/web"


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        derandomize=True,  # the same examples on every run, so CI failures reproduce
        database=None,
        deadline=datetime.timedelta(seconds=2),
        print_blob=False,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
    )


# --- the bookkeeping of outcomes -------------------------------------------------------------

STATS: dict[str, Counter[str]] = defaultdict(Counter)


@dataclass(frozen=True)
class Outcome:
    status: str  # "accepted" | "meshid" | "type"
    value: Any  # the result, or the exception


def outcome(
    target: str,
    call: Callable[[], Any],
    *,
    type_error: bool = False,
) -> Outcome:
    """Run ``call`` once and hold it to the property; count the case under ``target``."""
    STATS[target]["tried"] += 1
    try:
        result = call()
    except MeshIdError as err:
        assert str(err).strip(), f"{target}: {type(err).__name__} with an empty message"
        STATS[target]["meshid"] += 1
        return Outcome("meshid", err)
    except TypeError as err:
        if not type_error:
            STATS[target]["other"] += 1
            raise
        assert str(err).strip(), f"{target}: TypeError with an empty message"
        STATS[target]["type"] += 1
        return Outcome("type", err)
    except Exception:
        STATS[target]["other"] += 1
        raise
    STATS[target]["accepted"] += 1
    return Outcome("accepted", result)


@pytest.fixture(scope="module", autouse=True)
def _print_figures() -> Iterator[None]:
    yield
    rows = [f"{'target':44} {'tried':>6} {'meshid':>7} {'accepted':>8} {'TypeError':>9} {'other':>6}"]
    for target, c in STATS.items():
        rows.append(f"{target:44} {c['tried']:>6} {c['meshid']:>7} {c['accepted']:>8} {c['type']:>9} {c['other']:>6}")
    total = sum((c for c in STATS.values()), Counter())
    rows.append(
        f"{'total':44} {total['tried']:>6} {total['meshid']:>7} {total['accepted']:>8} {total['type']:>9} "
        f"{total['other']:>6}"
    )
    print("\n[fuzz] " + "\n[fuzz] ".join(rows))
    print(f"[fuzz] other exceptions: {total['other']} (must be 0)")


# --- real material made with meshid's own CA ------------------------------------------------------


@dataclass(frozen=True)
class Seeds:
    svids: tuple[tuple[bytes, bytes], ...]  # (chain PEM, key PEM), each pair a valid SVID
    bundles_pem: tuple[bytes, ...]
    bundles_json: tuple[str, ...]
    csrs: tuple[bytes, ...]
    peer_cert: x509.Certificate


@cache
def seeds() -> Seeds:
    root = Authority.create_root(TD)
    upstream = Authority.create_root("upstream.example")
    inter = Authority.from_upstream(TD, upstream.certificate, upstream.private_key)
    svids = [
        root.issue_svid(WEB_ID, dns_names=["web.example.org"]),
        inter.issue_svid(WEB_ID),  # leaf + intermediate
        root.issue_svid(f"spiffe://{TD}/rsa", key_kind="rsa-2048"),
        root.issue_svid(f"spiffe://{TD}/ed", key_kind="ed25519"),
    ]
    pairs = [(s.chain_pem(), s.key_pem()) for s in svids]
    # The same EC key in the traditional (SEC1) encoding, which the loader accepts too.
    sec1 = svids[0].private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    pairs.append((svids[0].chain_pem(), sec1))
    bundles = [
        TrustBundle(root.trust_domain, root.roots),
        TrustBundle(root.trust_domain, (*root.roots, *upstream.roots), 7, 300),
    ]
    csrs = [
        build_csr(generate_key()),
        build_csr(generate_key("ec-p384"), uri=WEB_ID),
        build_csr(generate_key("rsa-2048")),
        build_csr(generate_key("ed25519"), uri=f"spiffe://{TD}/ed"),
    ]
    return Seeds(
        tuple(pairs),
        tuple(b.to_pem() for b in bundles),
        tuple(b.to_spiffe_json() for b in bundles),
        tuple(csrs),
        svids[0].leaf,
    )


# --- strategies ------------------------------------------------------------------------------------

#: Any text, lone surrogates included (hypothesis leaves them out unless asked).
ANY_TEXT = st.text(st.characters(exclude_categories=[]), max_size=120)
WRONG_TYPES = st.one_of(
    st.none(), st.integers(), st.floats(), st.binary(max_size=20), st.lists(st.integers(), max_size=3)
)
_PEM_BLOCK = re.compile(rb"-----BEGIN ([^-]+)-----\r?\n(.*?)-----END [^-]+-----\r?\n?", re.DOTALL)
_LABELS = [
    "CERTIFICATE",
    "PRIVATE KEY",
    "EC PRIVATE KEY",
    "RSA PRIVATE KEY",
    "PUBLIC KEY",
    "X509 CRL",
    "certificate",
    "CERTIFICATE REQUEST",
    "ENCRYPTED PRIVATE KEY",
]


def _mutate_bytes(draw: st.DrawFn, data: bytes, *, most: int = 4) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(1, most))):
        if not out:
            break
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "duplicate"]))
        at = draw(st.integers(0, len(out) - 1))
        if op == "flip":
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            out[at] = draw(st.sampled_from([0x00, 0x01, 0x02, 0x05, 0x30, 0x7F, 0x80, 0x81, 0x82, 0xA0, 0xFF]))
        elif op == "truncate":
            del out[at:]
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del out[at : at + draw(st.integers(1, 16))]
        else:
            out[at:at] = out[at : at + draw(st.integers(1, 32))]
    return bytes(out)


@st.composite
def mutated_der(draw: st.DrawFn, seeds_of: Callable[[], tuple[bytes, ...]]) -> bytes:
    return _mutate_bytes(draw, draw(st.sampled_from(seeds_of())))


def _render(blocks: list[tuple[bytes, bytes, bytes]], wrap: int = 64, newline: bytes = b"\n") -> bytes:
    out = b""
    for begin, body, end in blocks:
        text = base64.b64encode(body)
        lines = [text[i : i + wrap] for i in range(0, len(text), wrap)] if wrap else [text]
        out += b"-----BEGIN " + begin + b"-----" + newline + newline.join(lines) + newline
        out += b"-----END " + end + b"-----" + newline
    return out


@st.composite
def mutated_pem(draw: st.DrawFn, pem: bytes) -> bytes:
    """Real PEM, broken one way: inside the DER, in the base64 text, in the framing, or cut short."""
    blocks = [(label, base64.b64decode(b"".join(body.split())), label) for label, body in _PEM_BLOCK.findall(pem)]
    how = draw(st.sampled_from(["der", "der", "der", "base64", "truncate", "blocks", "labels", "layout", "junk"]))
    if how == "der":
        i = draw(st.integers(0, len(blocks) - 1))
        begin, der, end = blocks[i]
        blocks[i] = (begin, _mutate_bytes(draw, der), end)
        return _render(blocks)
    if how == "base64":
        out = bytearray(pem)
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, len(out) - 1))
            out[at] = draw(st.sampled_from(b"AZaz09+/=*-_ \n\x00\xff"))
        return bytes(out)
    if how == "truncate":
        return pem[: draw(st.integers(0, len(pem) - 1))]
    if how == "blocks":
        picked = draw(st.lists(st.integers(0, len(blocks) - 1), min_size=0, max_size=4))
        return _render([blocks[i] for i in picked])
    if how == "labels":
        i = draw(st.integers(0, len(blocks) - 1))
        begin, der, end = blocks[i]
        label = draw(st.sampled_from(_LABELS)).encode()
        blocks[i] = draw(st.sampled_from([(label, der, label), (label, der, end), (begin, der, label)]))
        return _render(blocks)
    if how == "layout":
        return _render(
            blocks,
            wrap=draw(st.sampled_from([0, 1, 63, 76])),
            newline=draw(st.sampled_from([b"\n", b"\r\n", b"\r", b" "])),
        )
    at = draw(st.integers(0, len(pem)))
    return pem[:at] + draw(st.binary(min_size=1, max_size=40)) + pem[at:]


# --- 1. SPIFFE IDs and trust domains: an independent oracle of the standard -------------------------

_ORACLE_TD = re.compile(r"[a-z0-9._-]+")
_ORACLE_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


def oracle_spiffe_id(text: str) -> bool:
    """Whether ``text`` is a SPIFFE ID, read straight from the standard (not from meshid's code)."""
    if not text.startswith("spiffe://") or len(text.encode("utf-8", "surrogatepass")) > 2048:
        return False
    td, sep, path = text[len("spiffe://") :].partition("/")
    if not (td and len(td) <= 255 and _ORACLE_TD.fullmatch(td)):
        return False
    return not sep or all(_ORACLE_SEGMENT.fullmatch(s) and s not in (".", "..") for s in path.split("/"))


_ID_CHARS = "abcXYZ019.-_/:@%?#* \u00e4\u0130\uff41\n\x00"
spiffe_id_like = st.one_of(
    ANY_TEXT,
    st.builds(
        lambda td, path: f"spiffe://{td}{path}", st.text(_ID_CHARS, max_size=12), st.text(_ID_CHARS, max_size=24)
    ),
    st.builds(
        lambda scheme, td, segs: scheme + td + "".join("/" + s for s in segs),
        st.sampled_from(["spiffe://", "SPIFFE://", "Spiffe://", "spiffe:/", "spiffe:", "spiffe:///", "https://"]),
        st.sampled_from(
            ["example.org", "Example.org", "a", "", "xn--bcher-kva.example", "example.org:443", "u@example.org"]
        ),
        st.lists(
            st.sampled_from(["ns", "prod", "", ".", "..", "...", "a%2F", "x?y", "x#y", "*", "A-Z_0.9"]), max_size=5
        ),
    ),
    st.builds(lambda n, m: "spiffe://" + "a" * n + "/" + "b" * m, st.integers(250, 260), st.integers(1, 1800)),
    st.builds(lambda m: f"spiffe://{TD}/" + "b" * m, st.integers(2020, 2050)),
)


@fuzz_settings(400)
@given(text=spiffe_id_like)
def test_spiffe_id_parse_agrees_with_the_standard(text: str) -> None:
    result = outcome("SpiffeId.parse", lambda: SpiffeId.parse(text))
    if oracle_spiffe_id(text):
        assert result.status == "accepted", (text, result.value)
        assert str(result.value) == text and SpiffeId.parse(str(result.value)) == result.value
    else:
        assert result.status == "meshid", (text, result.value)


@fuzz_settings(300)
@given(
    text=st.one_of(
        spiffe_id_like,
        st.text("abcXYZ019.-_:@%/* \u00e4", max_size=20),
        st.builds(lambda n: "a" * n, st.integers(250, 260)),
    )
)
def test_trust_domain_parse_agrees_with_the_standard(text: str) -> None:
    result = outcome("TrustDomain.parse", lambda: TrustDomain.parse(text))
    if "://" in text or text.startswith("spiffe:"):
        expected = text[len("spiffe://") :].partition("/")[0] if oracle_spiffe_id(text) else None
    else:
        expected = text if text and len(text) <= 255 and _ORACLE_TD.fullmatch(text) else None
    if expected is None:
        assert result.status == "meshid", (text, result.value)
    else:
        assert result.status == "accepted" and result.value.name == expected, (text, result.value)


@fuzz_settings(100)
@given(value=WRONG_TYPES)
def test_spiffe_id_and_trust_domain_refuse_other_types_with_type_error(value: Any) -> None:
    for target, parse in (
        ("SpiffeId.parse (wrong type)", SpiffeId.parse),
        ("TrustDomain.parse (wrong type)", TrustDomain.parse),
    ):
        assert outcome(target, lambda p=parse: p(value), type_error=True).status == "type"  # documented


# --- 2. policies: dicts (both formats) and files ---------------------------------------------------

VALID_NATIVE: dict[str, Any] = {
    "name": "greeter",
    "allow_non_spiffe_peers": False,
    "require_pq_key_exchange": False,
    "allow_tls12": False,
    "deny": [{"name": "no-legacy", "methods": ["*"], "trust_domains": ["legacy.example.org"]}],
    "allow": [
        {
            "name": "frontend",
            "methods": ["/helloworld.Greeter/SayHello", "/helloworld.Greeter/*"],
            "spiffe_ids": ["spiffe://example.org/ns/prod/sa/frontend"],
            "spiffe_id_patterns": ["spiffe://example.org/ns/*/sa/frontend", "spiffe://example.org/**"],
            "subject_patterns": ["CN=frontend,O=Example"],
            "thumbprints": ["ab" * 32],
            "dns_names": ["frontend.example.org"],
        },
        {"name": "health", "methods": ["/grpc.health.v1.Health/Check"], "any_peer": True},
    ],
}
VALID_GRPC: dict[str, Any] = {
    "name": "greeter",
    "deny_rules": [{"name": "no-secrets", "request": {"paths": ["*/Secret"]}}],
    "allow_rules": [
        {"name": "admins", "source": {"principals": ["spiffe://example.org/sa/admin*"]}},
        {
            "name": "health",
            "request": {
                "paths": ["/grpc.health.v1.Health/*"],
                "headers": [{"key": "x-env", "values": ["prod", "staging*", "*-canary", "*"]}],
            },
        },
    ],
    "audit_logging_options": {
        "audit_condition": "ON_DENY",
        "audit_loggers": [{"name": "stdout_logger", "config": {}}, {"name": "syslog", "is_optional": True}],
    },
}
_POLICY_KEYS = sorted(
    {
        *VALID_NATIVE, "deny", "allow", "methods", "any_peer", "spiffe_ids", "spiffe_id_patterns", "trust_domains",
        "subject_patterns", "thumbprints", "dns_names", *VALID_GRPC, "source", "request", "principals", "paths",
        "headers", "key", "values", "audit_condition", "audit_loggers", "config", "is_optional",
    }
)  # fmt: skip
_POLICY_STRINGS = [
    "*", "**", "", "/a.B/C", "/a.B/*", "/a.B/C*", "a.B/C", "spiffe://example.org/x", "spiffe://example.org/*",
    "spiffe://example.org/**", "spiffe://*.org/x", "spiffe://Example.org/x", "*abc*", "*abc", "abc*", "grpc-x",
    ":path", "host", "X-Env", "CN=(a", "a{4294967296}", "(" * 40, "example.org", "stdout_logger", "ON_DENY",
    "ON_DENY_AND_ALLOW", "NONE", "ab" * 32, "AB:" * 31 + "AB", "frontend.example.org", "*.example.org", "-x-.org",
    "x" * 300, "\ud800", "\x00",
]  # fmt: skip
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12), st.sampled_from(_POLICY_STRINGS)
)
json_keys = st.one_of(st.sampled_from(_POLICY_KEYS), st.text(max_size=8), st.integers(-2, 2), st.none(), st.booleans())
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(json_keys, inner, max_size=4),
    max_leaves=16,
)


def _slots(doc: Any) -> Iterator[tuple[Any, Any]]:
    """(container, key) for every value inside ``doc``."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in list(items):
        yield doc, key
        yield from _slots(value)


@st.composite
def mutated_policy(draw: st.DrawFn) -> Any:
    doc = copy.deepcopy(draw(st.sampled_from([VALID_NATIVE, VALID_GRPC])))
    for _ in range(draw(st.integers(1, 3))):
        container, key = draw(st.sampled_from(list(_slots(doc))))
        how = draw(st.sampled_from(["replace", "delete", "rename", "wrap", "add", "duplicate"]))
        if how == "replace":
            container[key] = draw(json_values)
        elif how == "delete":
            del container[key]
        elif how == "rename" and isinstance(container, dict):
            container[draw(json_keys)] = container.pop(key)
        elif how == "wrap":
            container[key] = draw(st.sampled_from([[container[key]], {"x": container[key]}, [[container[key]]]]))
        elif how == "add" and isinstance(container, dict):
            container[draw(json_keys)] = draw(json_values)
        elif how == "duplicate" and isinstance(container, list):
            container.append(copy.deepcopy(container[key]))
        elif isinstance(container, list):
            container.insert(key, draw(json_values))
        if not _slots_exist(doc):
            break
    return doc


def _slots_exist(doc: Any) -> bool:
    return any(True for _ in _slots(doc))


policy_documents = st.one_of(mutated_policy(), mutated_policy(), json_values)


def test_the_material_the_mutations_start_from_is_valid() -> None:
    """Mutations of valid input reach the deep checks only if the input is valid to begin with."""
    for doc in (VALID_NATIVE, VALID_GRPC):
        AuthorizationPolicy.from_dict(doc)
    material = seeds()
    for chain, key in material.svids:
        X509Svid.from_pem(chain, key)
    for pem, spiffe_json in zip(material.bundles_pem, material.bundles_json, strict=True):
        assert TrustBundle.from_pem(TD, pem).roots == TrustBundle.from_spiffe_json(TD, spiffe_json).roots
    for csr in material.csrs:
        parse_csr(csr)


def _check_decide(policy: AuthorizationPolicy, method: str) -> None:
    """An accepted policy must also decide without raising, for a SPIFFE peer and a non-SPIFFE one."""
    cert = seeds().peer_cert
    for peer in (
        PeerIdentity.from_certificate(cert, spiffe_id=SpiffeId.parse(WEB_ID)),
        PeerIdentity.from_certificate(cert),
    ):
        decision = outcome("AuthorizationPolicy.decide", lambda p=peer: policy.decide(p, method, {"x-env": "prod"}))
        assert decision.status == "accepted", decision.value


@fuzz_settings(400)
@given(
    doc=policy_documents,
    method=st.one_of(st.sampled_from(["/helloworld.Greeter/SayHello", "/a.B/C", "", "/"]), ANY_TEXT),
)
def test_policy_from_dict_on_random_and_mutated_documents(doc: Any, method: str) -> None:
    result = outcome("AuthorizationPolicy.from_dict", lambda: AuthorizationPolicy.from_dict(doc))
    if result.status == "accepted":
        _check_decide(result.value, method)


YAML_TOKENS = [
    "name: ", "allow:", "deny:", "allow_rules:", "methods: ", "spiffe_ids: ", "any_peer: true", "audit_condition: ",
    "\n", "\n  ", "\n    ", "- ", "[", "]", "{", "}", ", ", ": ", "'", '"', "#", "---\n", "...\n", "%YAML 1.1\n",
    "&a ", "*a", "<<: *a", "? ", "!!binary ", "!!set ", "!!omap ", "!!python/name:os.system ", "!!int ", "!!float ", "!!bool ", "!!int ''",
    "!!timestamp ", "2024-13-45", "2024-02-30", "2001-12-14t21:59:43.10-05:00", "9" * 5000, "0x" + "f" * 20,
    "1e400", ".nan", ".inf", "~", "null", "yes", "0o17", "1_000", "190:20:30", "\t", "\ufeff", "\x00", "\x85",
    "*", "/a.B/C", "spiffe://example.org/x", "example.org",
]  # fmt: skip
yaml_text = st.lists(st.one_of(st.sampled_from(YAML_TOKENS), st.text(max_size=6)), max_size=40).map("".join)


@st.composite
def policy_file_bytes(draw: st.DrawFn) -> bytes:
    how = draw(st.sampled_from(["random", "yaml-tokens", "yaml-dump", "json-dump", "mutated-dump"]))
    if how == "random":
        return draw(st.binary(max_size=400))
    if how == "yaml-tokens":
        return draw(yaml_text).encode("utf-8", "surrogatepass")
    doc = draw(policy_documents)
    text = json.dumps(doc)
    if how != "json-dump" and draw(st.booleans()):
        with contextlib.suppress(yaml.YAMLError, ValueError):
            text = yaml.safe_dump(doc, sort_keys=False)
    data = text.encode("utf-8", "surrogatepass")
    return _mutate_bytes(draw, data) if how == "mutated-dump" and data else data


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@fuzz_settings(400)
@given(data=policy_file_bytes(), suffix=st.sampled_from([".yaml", ".json", ".yml", ""]))
def test_policy_load_on_random_and_mutated_files(scratch: Path, data: bytes, suffix: str) -> None:
    path = scratch / f"policy{suffix}"
    path.write_bytes(data)
    result = outcome("AuthorizationPolicy.load", lambda: AuthorizationPolicy.load(path))
    if result.status == "accepted":
        _check_decide(result.value, "/a.B/C")


# --- 3. X509-SVIDs -----------------------------------------------------------------------------------


@st.composite
def svid_inputs(draw: st.DrawFn) -> tuple[bytes | str, bytes | str]:
    chain, key = draw(st.sampled_from(seeds().svids))
    how = draw(st.sampled_from(["random", "text", "chain", "chain", "key", "both", "swap"]))
    if how == "random":
        return draw(st.binary(max_size=600)), draw(st.binary(max_size=300))
    if how == "text":
        return draw(ANY_TEXT), key.decode()
    if how == "swap":
        return key, chain
    if how in ("chain", "both"):
        chain = draw(mutated_pem(chain))
    if how in ("key", "both"):
        key = draw(mutated_pem(key))
    return chain, key


@fuzz_settings(400)
@given(pair=svid_inputs())
def test_x509svid_from_pem_on_random_and_mutated_chains_and_keys(pair: tuple[bytes | str, bytes | str]) -> None:
    result = outcome("X509Svid.from_pem", lambda: X509Svid.from_pem(*pair))
    if result.status == "accepted":
        assert result.value.spiffe_id.path  # a leaf names a workload


# --- 4. trust bundles --------------------------------------------------------------------------------


@st.composite
def bundle_json_inputs(draw: st.DrawFn) -> bytes | str:
    text = draw(st.sampled_from(seeds().bundles_json))
    how = draw(st.sampled_from(["random", "text", "structure", "structure", "x5c", "bytes", "nesting"]))
    if how == "random":
        return draw(st.binary(max_size=400))
    if how == "text":
        return draw(ANY_TEXT)
    if how == "bytes":
        return _mutate_bytes(draw, text.encode())
    if how == "nesting":
        depth = draw(st.integers(1, 3000))
        return '{"keys": ' + "[" * depth + "]" * draw(st.integers(0, depth)) + "}"
    doc = json.loads(text)
    if how == "x5c":
        key = draw(st.sampled_from(doc["keys"]))
        der = base64.b64decode(key["x5c"][0])
        key["x5c"][0] = base64.b64encode(_mutate_bytes(draw, der)).decode()
        return json.dumps(doc)
    container, slot = draw(st.sampled_from(list(_slots(doc))))
    container[slot] = draw(json_values)
    return json.dumps(doc)


@fuzz_settings(300)
@given(data=st.one_of(st.binary(max_size=600), st.sampled_from(seeds().bundles_pem).flatmap(mutated_pem), ANY_TEXT))
def test_trust_bundle_from_pem_on_random_and_mutated_input(data: bytes | str) -> None:
    result = outcome("TrustBundle.from_pem", lambda: TrustBundle.from_pem(TD, data))
    if result.status == "accepted":
        assert result.value.roots


@fuzz_settings(300)
@given(data=bundle_json_inputs())
def test_trust_bundle_from_spiffe_json_on_random_and_mutated_input(data: bytes | str) -> None:
    result = outcome("TrustBundle.from_spiffe_json", lambda: TrustBundle.from_spiffe_json(TD, data))
    if result.status == "accepted":
        assert result.value.roots


# --- 5. CSRs: parse_csr, the issuing service, the running CA over gRPC -------------------------------

csr_bytes = st.one_of(
    st.binary(max_size=1200),
    mutated_der(lambda: seeds().csrs),
    mutated_der(lambda: seeds().csrs),
    st.builds(
        lambda seed, extra: (seed * (MAX_CSR_BYTES // len(seed) + 2))[: MAX_CSR_BYTES + extra],
        st.binary(min_size=1, max_size=8),
        st.integers(1, 4096),
    ),
    st.builds(lambda body: b"\x30\x82" + len(body).to_bytes(2, "big") + body, st.binary(max_size=300)),
)


def _locally(csr: bytes) -> str:
    """How parse_csr itself answers: "meshid" or "accepted" (anything else escapes and fails the test)."""
    try:
        parse_csr(csr)
    except MeshIdError:
        return "meshid"
    return "accepted"


@fuzz_settings(400)
@given(csr=csr_bytes)
def test_parse_csr_on_random_and_mutated_requests(csr: bytes) -> None:
    result = outcome("ca.csr.parse_csr", lambda: parse_csr(csr))
    if result.status == "meshid":
        assert isinstance(result.value, InvalidRequestError)


def test_issuing_service_refuses_bad_csrs_and_never_consumes_the_token(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "meshid.db")
    try:
        service = IssuingService(Authority.create_root(TD), store)
        service.create_entry("admin", WEB_ID)
        token, _ = service.create_token("admin", WEB_ID)

        @fuzz_settings(300)
        @given(csr=csr_bytes)
        def fuzz(csr: bytes) -> None:
            assume(_locally(csr) != "accepted")  # a valid CSR would (rightly) spend the token
            result = outcome(
                "IssuingService.issue_with_token", lambda: service.issue_with_token(token, csr)
            )
            if result.status == "meshid":
                assert isinstance(result.value, InvalidRequestError), result.value

        fuzz()
        assert store.list_issued() == []
        issued = service.issue_with_token(token, build_csr(generate_key()))  # the token is still good
        assert issued.spiffe_id == SpiffeId.parse(WEB_ID)
    finally:
        store.close()


@dataclass
class RunningCa:
    address: str
    folder: Path

    def token(self, path: str) -> str:
        spiffe_id = f"spiffe://{TD}/{path}"
        with AdminClient(self.address, self.folder) as admin:
            admin.create_entry(spiffe_id)
            return str(admin.create_token(spiffe_id).token)

    @contextlib.contextmanager
    def issue_with_token(self) -> Iterator[Callable[[str, bytes], tuple[grpc.StatusCode, str]]]:
        """A raw IssueWithToken over the anonymous bootstrap client, as a workload without an SVID uses."""
        key_pem, cert_pem = anonymous_client()
        creds = grpc.ssl_channel_credentials((self.folder / "bundle.pem").read_bytes(), key_pem, cert_pem)
        pin = [("grpc.ssl_target_name_override", identity_dns_name(SpiffeId.parse(f"spiffe://{TD}/meshid/ca")))]
        with grpc.secure_channel(self.address, creds, options=pin) as channel:
            rpc = channel.unary_unary(
                "/meshid.v1.Issuer/IssueWithToken",
                request_serializer=issuer_pb2.IssueWithTokenRequest.SerializeToString,
                response_deserializer=issuer_pb2.SvidResponse.FromString,
            )

            def call(token: str, csr: bytes) -> tuple[grpc.StatusCode, str]:
                try:
                    rpc(issuer_pb2.IssueWithTokenRequest(join_token=token, csr=csr), timeout=10)
                except grpc.RpcError as err:
                    return err.code(), err.details() or ""
                return grpc.StatusCode.OK, ""

            yield call


@pytest.fixture(scope="module")
def running_ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCa]:
    folder = tmp_path_factory.mktemp("fuzz-ca") / "ca"
    init_data_dir(folder, TD)
    server = CaServer(folder, "127.0.0.1:0")
    port = server.start()
    try:
        yield RunningCa(f"127.0.0.1:{port}", folder)
    finally:
        server.stop()


def test_running_ca_answers_invalid_argument_to_bad_csrs_and_keeps_serving(running_ca: RunningCa) -> None:
    token = running_ca.token("ns/prod/sa/fuzzed")
    with running_ca.issue_with_token() as issue:

        @fuzz_settings(250)
        @given(csr=csr_bytes)
        def fuzz(csr: bytes) -> None:
            local = _locally(csr)
            assume(local != "accepted")
            STATS["CA IssueWithToken over gRPC"]["tried"] += 1
            code, details = issue(token, csr)
            if code != grpc.StatusCode.INVALID_ARGUMENT or not details.startswith("CSR"):
                STATS["CA IssueWithToken over gRPC"]["other"] += 1
                raise AssertionError(f"{code.name}: {details!r} for a CSR of {len(csr)} bytes")
            STATS["CA IssueWithToken over gRPC"]["meshid"] += 1

        fuzz()
    # Never a server that stops serving, and never a token spent on a refused request.
    svid, bundle = fetch_svid(running_ca.address, running_ca.folder / "bundle.pem", token)
    assert str(svid.spiffe_id) == f"spiffe://{TD}/ns/prod/sa/fuzzed"
    assert bundle.trust_domain == TrustDomain.parse(TD)


# --- 6. `meshid svid inspect`, in process --------------------------------------------------------------


@fuzz_settings(250)
@given(chain=st.sampled_from([c for c, _ in seeds().svids]).flatmap(mutated_pem))
def test_cli_svid_inspect_on_mutated_chains(scratch: Path, chain: bytes) -> None:
    path = scratch / "inspect.pem"
    path.write_bytes(chain)
    err, out = io.StringIO(), io.StringIO()

    def inspect() -> int:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            return cli_main(["svid", "inspect", str(path)])

    result = outcome("meshid svid inspect", inspect)
    if result.status == "accepted":
        assert result.value in (0, 1, 2), result.value
        if result.value == 1:  # a certificate read whole but outside its validity (a mutated date): said so
            lines = err.getvalue().strip().splitlines()
            assert len(lines) == 1 and (": expired: " in lines[0] or ": not yet valid: " in lines[0]), err.getvalue()
        if result.value == 2:  # the CLI's refusal: count it as the meshid error it printed
            STATS["meshid svid inspect"].update(accepted=-1, meshid=1)
            lines = err.getvalue().strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("meshid: X509-SVID"), err.getvalue()


# --- the BUGs these properties found, one minimal reproducer each, now regression tests ------------------


def _patch(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) >= 1, old
    return data.replace(old, new, 1)


def _svid_der() -> tuple[bytes, bytes]:
    svid = Authority.create_root(TD).issue_svid(WEB_ID, dns_names=["web.example.org"])
    return svid.leaf.public_bytes(serialization.Encoding.DER), svid.key_pem()


def _pem(label: str, der: bytes) -> bytes:
    return _render([(label.encode(), der, label.encode())])


def _refused(call: Callable[[], Any]) -> None:
    """The property, for one input: a MeshIdError with a message, nothing else."""
    try:
        call()
    except MeshIdError as err:
        assert str(err).strip()
        return
    raise AssertionError("accepted")


def _san_not_ascii() -> tuple[bytes, bytes]:
    der, key = _svid_der()
    return _pem("CERTIFICATE", _patch(der, b"web.example.org", b"\xc3eb.example.org")), key


def _duplicate_extension() -> tuple[bytes, bytes]:
    der, key = _svid_der()  # the subjectKeyIdentifier's OID rewritten to subjectAltName's
    return _pem("CERTIFICATE", _patch(der, b"\x06\x03\x55\x1d\x0e", b"\x06\x03\x55\x1d\x11")), key


def _invalid_version() -> tuple[bytes, bytes]:
    der, key = _svid_der()
    return _pem("CERTIFICATE", _patch(der, b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x05")), key


def _key_unknown_algorithm() -> tuple[bytes, bytes]:
    svid = Authority.create_root(TD).issue_svid(WEB_ID)
    pkcs8 = svid.private_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )  # id-ecPublicKey 1.2.840.10045.2.1 rewritten to the unassigned .2.9
    return svid.chain_pem(), _pem(
        "PRIVATE KEY", _patch(pkcs8, b"\x2a\x86\x48\xce\x3d\x02\x01", b"\x2a\x86\x48\xce\x3d\x02\x09")
    )


def _leaf_key_unknown_curve() -> tuple[bytes, bytes]:
    der, key = _svid_der()  # the leaf's curve OID (P-256, 1.2.840.10045.3.1.7) rewritten to .3.1.9
    return _pem(
        "CERTIFICATE", _patch(der, b"\x2a\x86\x48\xce\x3d\x03\x01\x07", b"\x2a\x86\x48\xce\x3d\x03\x01\x09")
    ), key


@pytest.mark.parametrize(
    "make",
    [_san_not_ascii, _duplicate_extension, _invalid_version, _key_unknown_algorithm, _leaf_key_unknown_curve],
    ids=["san-dns-not-ascii:ValueError", "duplicate-extension:DuplicateExtension", "version-5:InvalidVersion",
         "key-oid:UnsupportedAlgorithm", "leaf-curve-oid:UnsupportedAlgorithm"],
)  # fmt: skip
def test_regression_x509svid_from_pem_leaks_cryptography_errors(make: Callable[[], tuple[bytes, bytes]]) -> None:
    chain, key = make()
    _refused(lambda: X509Svid.from_pem(chain, key))


@pytest.mark.parametrize("which", ["svid", "bundle"])
def test_regression_from_pem_str_with_a_lone_surrogate(which: str) -> None:
    if which == "svid":
        _refused(lambda: X509Svid.from_pem("\ud800", "\ud800"))
    else:
        _refused(lambda: TrustBundle.from_pem(TD, "\ud800"))


def _root_with_malformed_san() -> bytes:
    der = Authority.create_root(TD).certificate.public_bytes(serialization.Encoding.DER)
    return _patch(der, b"spiffe://", b"\xffpiffe://")


@pytest.mark.parametrize("fmt", ["pem", "spiffe-json"])
def test_regression_trust_bundle_leaks_value_error_from_a_malformed_extension(fmt: str) -> None:
    der = _root_with_malformed_san()
    if fmt == "pem":
        _refused(lambda: TrustBundle.from_pem(TD, _pem("CERTIFICATE", der)))
    else:
        doc = {"keys": [{"use": "x509-svid", "kty": "EC", "x5c": [base64.b64encode(der).decode()]}]}
        _refused(lambda: TrustBundle.from_spiffe_json(TD, json.dumps(doc)))


def test_regression_trust_bundle_json_deep_nesting_raises_recursion_error() -> None:
    _refused(lambda: TrustBundle.from_spiffe_json(TD, '{"keys": ' + "[" * 100_000))


def _csr_parts(der: bytes) -> tuple[bytes, bytes]:
    """(CertificationRequestInfo, signatureAlgorithm) of a DER CSR (lengths in long form)."""
    start = 2 + (der[1] & 0x7F if der[1] & 0x80 else 0)

    def end(at: int) -> int:
        n = der[at + 1]
        if n < 0x80:
            return at + 2 + n
        return at + 2 + (n & 0x7F) + int.from_bytes(der[at + 2 : at + 2 + (n & 0x7F)], "big")

    info_end = end(start)
    return der[start:info_end], der[info_end : end(info_end)]


def _der_length(n: int) -> bytes:
    return bytes([n]) if n < 0x80 else bytes([0x80 | 2]) + n.to_bytes(2, "big")


def _csr_with_two_sans() -> bytes:
    """A CSR whose signature verifies but which carries the subjectAltName extension twice."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(WEB_ID)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    info, algorithm = _csr_parts(csr)
    info = _patch(info, b"\x06\x03\x55\x1d\x0e", b"\x06\x03\x55\x1d\x11")
    signature = key.sign(info, ec.ECDSA(hashes.SHA256()))
    body = info + algorithm + b"\x03" + _der_length(len(signature) + 1) + b"\x00" + signature
    return b"\x30" + _der_length(len(body)) + body


def _csr_unknown_key_algorithm() -> bytes:
    return _patch(build_csr(generate_key()), b"\x2a\x86\x48\xce\x3d\x02\x01", b"\x2a\x86\x48\xce\x3d\x02\x09")


def _csr_invalid_version() -> bytes:
    der = build_csr(generate_key())
    info, _ = _csr_parts(der)
    at = der.index(info) + 2 + (info[1] & 0x7F if info[1] & 0x80 else 0)  # version INTEGER 0 comes first
    assert der[at : at + 3] == b"\x02\x01\x00"
    return der[:at] + b"\x02\x01\x05" + der[at + 3 :]


CSR_BUGS = [
    pytest.param(_csr_unknown_key_algorithm, id="key-oid:UnsupportedAlgorithm"),
    pytest.param(_csr_invalid_version, id="version-5:InvalidVersion"),
    pytest.param(_csr_with_two_sans, id="signed-two-sans:DuplicateExtension"),
]


@pytest.mark.parametrize("make", CSR_BUGS)
def test_regression_parse_csr_leaks_cryptography_errors(make: Callable[[], bytes]) -> None:
    csr = make()
    try:
        parse_csr(csr)
    except InvalidRequestError as err:
        assert str(err).strip()
        return
    raise AssertionError("accepted")


@pytest.mark.parametrize("make", CSR_BUGS)
def test_regression_running_ca_answers_internal_to_a_malformed_csr(running_ca: RunningCa, make: Callable[[], bytes]) -> None:
    token = running_ca.token(f"ns/prod/sa/bug-{make.__name__.strip('_').replace('_', '-')}")
    with running_ca.issue_with_token() as issue:
        code, details = issue(token, make())
    assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{code.name}: {details}"


@pytest.mark.parametrize(
    ("name", "text"),
    [
        pytest.param("p.yaml", "name: 2024-13-45\n", id="yaml-invalid-date:ValueError"),
        pytest.param("p.yaml", "name: !!float x\n", id="yaml-float-tag:ValueError"),
        pytest.param("p.yaml", "name: !!timestamp x\n", id="yaml-timestamp-tag:AttributeError"),
        pytest.param("p.yaml", "name: !!bool x\n", id="yaml-bool-tag:KeyError"),
        pytest.param("p.yaml", "name: !!int ''\n", id="yaml-empty-int:IndexError"),
        pytest.param("p.yaml", "name: " + "9" * 5000 + "\n", id="yaml-5000-digits:ValueError"),
        pytest.param("p.json", '{"name": ' + "9" * 5000 + "}", id="json-5000-digits:ValueError"),
    ],
)
def test_regression_policy_load_leaks_parser_errors(scratch: Path, name: str, text: str) -> None:
    path = scratch / name
    path.write_text(text)
    _refused(lambda: AuthorizationPolicy.load(path))


def test_regression_cli_svid_inspect_traceback_on_an_undecodable_issuer(scratch: Path) -> None:
    svid = Authority.create_root(TD).issue_svid(WEB_ID)
    der = svid.leaf.public_bytes(serialization.Encoding.DER)
    # The issuer's CN (a UTF8String, "meshid root CA ...") gets a byte that is not UTF-8; the leaf
    # rules (SAN, key usage, basic constraints) still hold, so only `describe` reads the issuer.
    path = scratch / "issuer-not-utf8.pem"
    path.write_bytes(_pem("CERTIFICATE", _patch(der, b"meshid root CA", b"\xffeshid root CA")))
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert cli_main(["svid", "inspect", str(path)]) == 2

"""The bad-input corpus (issue #6): every file in ``tests/corpus/`` goes through meshid's loaders
in process and through the ``meshid`` CLI as a real process, and must be refused with a clear
message: the loader with a :class:`MeshIdError` whose message names the flaw, the CLI with exit
code 2 and one line on stderr, never a traceback.

``CASES`` is the table of every committed file (a test keeps it in step with the folder); the files
too large to commit are generated here (``GENERATED``). The two list files hold one bad SPIFFE ID
or trust domain per entry, and their ``words`` give one fragment per entry: 134 inputs in all (86
committed single inputs, 4 generated files, 29 + 15 list entries). Every input's ``words`` names
its own flaw and is looked for after the message's concept prefix (``X509-SVID:``, ``policy
FILE:``...) with the file's own path taken out, so neither the prefix nor the file name can satisfy
it. No case is tolerated as a known bug: every check is an ordinary one. The CLI cannot be given a
NUL in an argument (execve ends it there), so the two inputs holding one are a visible skip of the
CLI check; a lone surrogate reaches the CLI as the bytes of its UTF-8 form, as it would from a
shell. Files that could hang or exhaust memory are loaded in a child process with a time limit and
a memory limit, since a regular expression or ``repr`` running in C cannot be interrupted from
inside the process.

``policy-regex-bomb.yaml`` is the one file meshid may accept: a catastrophic-backtracking subject
pattern must be either refused at load (with a message quoting the pattern) or evaluated
safely, so there the check is that a decision for a peer whose subject is a long run of ``a``
comes back in time.

Run this file directly (``python test_corpus.py KIND FILE ...``) and it loads one input and
prints the outcome as JSON: that is the child process used for the risky files.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from meshid import AuthorizationPolicy, MeshIdError, PeerIdentity, SpiffeId, TrustBundle, TrustDomain, X509Svid

CORPUS = Path(__file__).resolve().parent.parent / "corpus"
NOT_CORPUS = {"make_corpus.py", "__pycache__"}
TD = "example.org"
WEB_ID = f"spiffe://{TD}/ns/prod/sa/web"
METHOD = "/a.B/C"
#: A child that has not answered by then is taken to hang (a refusal takes well under a second).
HANG_SECONDS = 10.0
#: The address-space limit of children that load risky files: a memory bomb fails instead of swapping.
CHILD_MEMORY = 2 << 30
#: A long run of a's in the regex bomb's trigger subject: (a+)+ needs about 2^40 steps to give up.
BOMB_AS = 40

#: The kinds whose file is a JSON list of strings, each entry one input.
LIST_KINDS = ("spiffe-id", "trust-domain")


@dataclass(frozen=True)
class Case:
    """What a corpus file is and what meshid must say about it.

    ``kind``: cert | key | pair | bundle | policy | spiffe-id | trust-domain.
    ``words``: what the loader's message must contain, naming this flaw and not another; for a
    list file (spiffe-id, trust-domain), one fragment per entry, in the file's order.
    ``risky``: may hang or blow up; loaded in a child process with limits.
    """

    kind: str
    words: str | tuple[tuple[str, str], ...]
    risky: bool = False


def _cert(words: str, **kw: Any) -> Case:
    return Case("cert", words, **kw)


def _key(words: str) -> Case:
    return Case("key", words)


def _bundle(words: str, **kw: Any) -> Case:
    return Case("bundle", words, **kw)


def _policy(words: str, **kw: Any) -> Case:
    return Case("policy", words, **kw)


CASES: dict[str, Case] = {
    # the same message for the three: it cannot tell empty, DER and a lone END apart
    "cert-empty.pem": _cert("no PEM certificate found"),
    "cert-truncated.pem": _cert("a PEM 'CERTIFICATE' block is truncated"),
    "cert-truncated-der.pem": _cert("not a valid certificate: error parsing asn1 value: ParseError { kind: ShortData"),
    # cryptography reads the text's first bytes as a long length: said the same as truncated DER
    "cert-der-garbage.pem": _cert("not a valid certificate: error parsing asn1 value: ParseError { kind: ShortData"),
    "cert-bad-base64.pem": _cert("Invalid symbol 42"),
    "cert-wrong-label-key-in-cert.pem": _cert("is a 'PRIVATE KEY', expected 'CERTIFICATE'"),
    "cert-der-not-pem.pem": _cert("no PEM certificate found"),
    "cert-end-without-begin.pem": _cert("no PEM certificate found"),
    "cert-no-uri-san.pem": _cert("no URI SAN"),
    "cert-two-uri-sans.pem": _cert("2 URI SANs"),
    "cert-uri-san-not-spiffe.pem": _cert("scheme is missing or invalid; it must start with 'spiffe://'"),
    "cert-uri-san-uppercase-trust-domain.pem": _cert("trust domain must be lowercase"),
    "cert-spiffe-id-no-path.pem": _cert("has no path"),
    "cert-leaf-is-ca.pem": _cert("is a CA"),
    "cert-no-key-usage.pem": _cert("no key usage"),
    "cert-key-usage-no-digital-signature.pem": _cert("lacks the digitalSignature key usage"),
    "cert-key-usage-key-cert-sign.pem": _cert("has the keyCertSign key usage"),
    "cert-key-usage-crl-sign.pem": _cert("has the cRLSign key usage"),
    # meshid says only "a certificate cannot be read"; cryptography's parse location names the SAN
    "cert-san-dns-name-not-ascii.pem": _cert('"subject_alternative_name", 1, "GeneralName::DNSName"'),
    "cert-duplicate-extension.pem": _cert("Duplicate 2.5.29.17 extension"),
    "cert-invalid-version.pem": _cert("5 is not a valid X509 version"),
    # the same message for the four; it names neither what was found nor the key file (it cites the chain's)
    "key-empty.pem": _key("exactly one PEM 'PRIVATE KEY' block"),
    "key-truncated.pem": _key("a PEM 'PRIVATE KEY' block is truncated"),
    "key-wrong-label-cert-in-key.pem": _key("exactly one PEM 'PRIVATE KEY' block"),
    "key-two-keys.pem": _key("exactly one PEM 'PRIVATE KEY' block"),
    "key-public-key-not-private.pem": _key("exactly one PEM 'PRIVATE KEY' block"),
    "key-encrypted.pem": _key("private key is encrypted"),
    "key-der-garbage.pem": _key("Could not deserialize key data"),
    "key-unknown-algorithm-oid.pem": _key("Unknown key type: 1.2.840.10045.2.9"),
    "key-wrong-for-cert": Case("pair", "the private key does not match the leaf certificate"),
    "bundle-empty.pem": _bundle("no PEM certificate found"),
    "bundle-not-a-ca.pem": _bundle("certificate 0 is not a CA"),
    "bundle-truncated.pem": _bundle("a PEM 'CERTIFICATE' block is truncated"),
    "bundle-wrong-label-key.pem": _bundle("is a 'PRIVATE KEY', expected 'CERTIFICATE'"),
    "bundle-der-garbage.pem": _bundle(
        "not a valid certificate: error parsing asn1 value: ParseError { kind: UnexpectedTag"
    ),
    # meshid says only "not a valid certificate"; cryptography's parse location names the SAN
    "bundle-ca-malformed-extension.pem": _bundle(
        '"subject_alternative_name", 0, "GeneralName::UniformResourceIdentifier"'
    ),
    "bundle-json-broken.json": _bundle("not valid JSON: Unterminated string"),
    # the same message for the two: it does not say whether 'keys' is missing or not a list
    "bundle-json-no-keys.json": _bundle("a JSON object with a 'keys' list"),
    "bundle-json-keys-not-list.json": _bundle("a JSON object with a 'keys' list"),
    "bundle-json-key-not-object.json": _bundle("key 0 is not an object"),
    "bundle-json-only-jwt-keys.json": _bundle("no 'x509-svid' key with a certificate"),
    "bundle-json-x5c-not-base64.json": _bundle("is not a DER certificate: Only base64 data is allowed"),
    "bundle-json-x5c-not-der.json": _bundle("is not a DER certificate: error parsing asn1 value"),
    "bundle-json-x5c-leaf-not-ca.json": _bundle("holds a certificate that is not a CA"),
    "bundle-json-deep-nesting.json": _bundle("JSON nested too deeply"),
    "policy-broken.yaml": _policy("invalid YAML at line 5 column 5: while parsing a flow sequence"),
    "policy-broken.json": _policy("invalid JSON at line 1 column 63"),
    "policy-unknown-key.yaml": _policy("unknown top-level key(s) 'alow'"),
    "policy-unknown-rule-key.yaml": _policy("unknown key(s) 'spiffe_id'"),
    "policy-regex-bomb.yaml": _policy("'CN=(a+)+$'", risky=True),  # if refused; accepted, it must decide in time
    "policy-yaml-billion-laughs.yaml": _policy("'spiffe_ids' must be a list of strings", risky=True),
    "policy-billion-laughs-in-audit-condition.yaml": _policy("audit_condition a list is not one of", risky=True),
    "policy-deep-nesting.json": _policy("nested too deeply"),
    "policy-deep-nesting.yaml": _policy("nested too deeply"),
    # a tagged or typed scalar that cannot be built: its line, the value, and what it is not
    "policy-yaml-invalid-date.yaml": _policy("line 1 column 7: '2024-13-45' is not a valid date or timestamp"),
    "policy-yaml-huge-integer.yaml": _policy("for integer string conversion: value has 5000 digits"),
    "policy-huge-integer.json": _policy("for integer string conversion: value has 5000 digits"),
    "policy-yaml-timestamp-tag-not-a-date.yaml": _policy("'not-a-date' is not a valid date or timestamp"),
    "policy-yaml-bool-tag-not-a-bool.yaml": _policy("line 2 column 14: 'maybe' is not a valid boolean"),
    "policy-yaml-python-tag.yaml": _policy("could not determine a constructor for the tag 'tag:yaml.org,2002:python/"),
    "policy-yaml-non-string-keys.yaml": _policy("unknown top-level key(s) 1, None"),
    "policy-empty.yaml": _policy("is empty; a policy needs at least one allow rule"),
    "policy-top-level-list.json": _policy("the top level must be a mapping, not list"),
    "policy-no-allow-rule.yaml": _policy("has no allow rule"),
    "policy-rule-without-methods.yaml": _policy("needs 'methods'"),
    "policy-rule-names-nobody.yaml": _policy("names nobody"),
    "policy-duplicate-rule-name.yaml": _policy("rule 'web': the name is used by another rule"),
    "policy-method-without-service.yaml": _policy("method 'SayHello': write '/package.Service/Method'"),
    "policy-method-partial-glob.yaml": _policy("'*' must stand for the whole method name"),
    "policy-spiffe-id-uppercase-trust-domain.yaml": _policy("trust domain must be lowercase"),
    "policy-spiffe-id-glob-in-spiffe-ids.yaml": _policy("put globs under 'spiffe_id_patterns'"),
    "policy-spiffe-id-pattern-glob-trust-domain.yaml": _policy("the trust domain cannot be a glob"),
    "policy-subject-pattern-invalid-regex.yaml": _policy("is not a valid regular expression (RE2 syntax): missing )"),
    "policy-subject-pattern-repeat-overflow.yaml": _policy("repetition {4294967296} is larger than 1000"),
    "policy-thumbprint-not-hex.yaml": _policy("not a SHA-256 hex digest"),
    "policy-dns-name-invalid.yaml": _policy("not a valid host name"),
    "policy-flag-not-boolean.yaml": _policy("'require_pq_key_exchange' must be true or false"),
    "policy-not-utf8.yaml": _policy("not UTF-8"),
    "policy-grpc-unknown-field.json": _policy("unknown field(s) 'extra'"),
    "policy-grpc-empty-allow-rules.json": _policy("'allow_rules' is empty"),
    "policy-grpc-allow-rules-not-list.json": _policy("must be a list of rules"),
    "policy-grpc-ambiguous-star.json": _policy("'*' at both ends is ambiguous"),
    "policy-grpc-pseudo-header.json": _policy("header ':path' cannot be matched"),
    "policy-grpc-duplicate-rule-name.json": _policy("the name is used by another rule in 'allow_rules'"),
    "policy-grpc-unknown-audit-logger.json": _policy("audit logger 'syslog' is not supported"),
    "policy-grpc-missing-name.json": _policy("'name' is required"),
    "spiffe-ids-invalid.json": Case(
        "spiffe-id",
        (
            ("", "cannot be empty"),
            ("example.org/ns/prod/sa/web", "scheme is missing or invalid"),
            ("SPIFFE://example.org/web", "scheme must be lowercase"),
            ("spiffe:/example.org/web", "scheme is missing or invalid"),
            ("spiffe://", "trust domain is missing"),
            ("spiffe:///web", "trust domain is missing"),
            ("spiffe://Example.org/web", "trust domain must be lowercase"),
            ("spiffe://example.org:8443/web", "a port is not allowed"),
            ("spiffe://user@example.org/web", "userinfo is not allowed"),
            ("spiffe://example.org/web?x=1", "a query is not allowed"),
            ("spiffe://example.org/web#x", "a fragment is not allowed"),
            ("spiffe://example.org/web/", "path cannot have a trailing slash"),
            ("spiffe://example.org//web", "path cannot contain empty segments"),
            ("spiffe://example.org/./web", "path cannot contain dot segments"),
            ("spiffe://example.org/../web", "path cannot contain dot segments"),
            ("spiffe://example.org/a%20b", "percent-encoding is not allowed"),
            ("spiffe://exa mple.org/web", "trust domain characters are limited"),
            ("spiffe://example.org/ns/\u00fc", "path segment characters are limited"),
            ("spiffe://ex\u00e4mple.org/web", "trust domain characters are limited"),
            ("spiffe://example.org/web\u0000x", "path segment characters are limited"),
            ("spiffe://example.org/\ud800", "path segment characters are limited"),
            ("spiffe://example.org/web\n", "path segment characters are limited"),
            (" spiffe://example.org/web", "scheme is missing or invalid"),
            ("\uff53\uff50\uff49\uff46\uff46\uff45://example.org/web", "scheme is missing or invalid"),
            ("spiffe://example.org/ns/*", "path segment characters are limited"),
            ("spiffe://" + "a" * 256 + "/web", "trust domain is longer than 255 bytes"),
            ("spiffe://example.org/" + "a" * 2048, "longer than 2048 bytes"),
            ("spiffe://example.org/web\u200b", "path segment characters are limited"),
            ("spiffe://example.org\\web", "trust domain characters are limited"),
        ),
    ),
    # TrustDomain.parse starts most messages with "SPIFFE ID '...'", not "trust domain"
    "trust-domains-invalid.json": Case(
        "trust-domain",
        (
            ("", "cannot be empty"),
            ("Example.org", "trust domain must be lowercase"),
            ("example.org:443", "a port is not allowed"),
            ("user@example.org", "userinfo is not allowed"),
            ("exa mple.org", "trust domain characters are limited"),
            ("example.org/", "a trust domain name has no path"),
            ("example.org/web", "a trust domain name has no path"),
            ("ex%41mple.org", "percent-encoding is not allowed"),
            ("ex\u00e4mple.org", "trust domain characters are limited"),
            ("a" * 256, "trust domain is longer than 255 bytes"),
            ("spiffe://", "trust domain is missing"),
            ("spiffe:example.org", "scheme is missing or invalid"),
            ("*.example.org", "trust domain characters are limited"),
            ("example.org\u0000", "trust domain characters are limited"),
            ("spiffe://Example.org", "trust domain must be lowercase"),
        ),
    ),
}

#: Generated at test time: too large to commit, or a megabyte of one repeated line.
GENERATED: dict[str, Case] = {
    "cert-huge-2mib.pem": _cert("is larger than 1048576 bytes"),
    "bundle-huge-2mib.pem": _bundle("larger than 1048576 bytes"),
    "policy-huge-9mib.yaml": _policy("larger than 8388608 bytes"),
    "cert-pem-begin-flood-1mib.pem": _cert("BEGIN without matching END", risky=True),
}


def _generate(folder: Path, chain_pem: bytes, root_pem: bytes) -> None:
    def repeat(block: bytes, size: int) -> bytes:
        return block * (size // len(block) + 1)

    (folder / "cert-huge-2mib.pem").write_bytes(repeat(chain_pem, 2 << 20))
    (folder / "bundle-huge-2mib.pem").write_bytes(repeat(root_pem, 2 << 20))
    (folder / "policy-huge-9mib.yaml").write_bytes(repeat(b"# padding padding padding padding\n", 9 << 20))
    line = b"-----BEGIN CERTIFICATE-----\n"
    (folder / "cert-pem-begin-flood-1mib.pem").write_bytes(line * ((1 << 20) // len(line)))


# --- one input through one loader: also what the child process runs -----------------------------


@dataclass(frozen=True)
class Fixtures:
    """Good files the corpus files are paired with (a bad key needs a good chain, and so on)."""

    chain: Path
    key: Path
    upstream_ca: Path
    policy: Path
    bomb_peer: Path
    scratch: Path


def _load(kind: str, target: str, fx: Fixtures) -> None:
    if kind == "cert":
        X509Svid.load(target, fx.key)
    elif kind == "key":
        X509Svid.load(fx.chain, target)
    elif kind == "pair":
        X509Svid.load(Path(target) / "svid.pem", Path(target) / "svid.key")
    elif kind == "bundle":
        TrustBundle.load(TD, target)
    elif kind == "policy":
        policy = AuthorizationPolicy.load(target)
        # Accepted: it must then at least decide in time, even for the regex bomb's trigger peer.
        leaf = x509.load_pem_x509_certificates(fx.bomb_peer.read_bytes())[0]
        peer = PeerIdentity.from_certificate(leaf, spiffe_id=SpiffeId.parse(f"spiffe://{TD}/" + "a" * BOMB_AS))
        # decided as a server of the bomb peer's own trust domain, so its subject rules apply
        policy.decide(peer, METHOD, local_trust_domain=peer.trust_domain)
    elif kind == "spiffe-id":
        SpiffeId.parse(target)
    elif kind == "trust-domain":
        TrustDomain.parse(target)
    else:
        raise AssertionError(kind)


def _outcome(kind: str, target: str, fx: Fixtures) -> dict[str, str]:
    """``{"result": "rejected" | "accepted" | "crash", "type": ..., "message": ...}``."""
    try:
        _load(kind, target, fx)
    except MeshIdError as err:
        return {"result": "rejected", "type": type(err).__name__, "message": str(err)}
    except Exception as err:
        return {"result": "crash", "type": type(err).__qualname__, "message": str(err)[:500]}
    return {"result": "accepted", "type": "", "message": ""}


# `python -c PRELUDE SCRIPT ARGS...` or `python -c PRELUDE -m MODULE ARGS...`, under a memory limit.
_CHILD_PRELUDE = (
    "import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit})); "
    "module = sys.argv[1] == '-m'; sys.argv = sys.argv[2:] if module else sys.argv[1:]; "
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True) if module "
    "else runpy.run_path(sys.argv[0], run_name='__main__')"
)


def _child(argv: list[str | bytes], timeout: float) -> tuple[int | None, str, str, float]:
    """Run ``argv`` (a script and its arguments) in a child Python with a memory limit.

    Returns (exit code or None on timeout, stdout, stderr, seconds).
    """
    prelude = _CHILD_PRELUDE.format(limit=CHILD_MEMORY)
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-c", prelude, *argv], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return None, "", "", time.monotonic() - started
    return done.returncode, done.stdout, done.stderr, time.monotonic() - started


def _isolated_outcome(kind: str, target: str, fx: Fixtures) -> dict[str, str]:
    argv: list[str | bytes] = [__file__, kind, target, *(str(getattr(fx, f)) for f in Fixtures.__dataclass_fields__)]
    code, out, err, took = _child(argv, HANG_SECONDS)
    if code is None:
        return {"result": "crash", "type": "hang", "message": f"no answer within {took:.0f} s (killed)"}
    try:
        return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]
    except (ValueError, IndexError):
        last = (err.strip().splitlines() or ["(nothing)"])[-1]
        return {"result": "crash", "type": f"exit {code}", "message": last}


# --- the CLI as a real process -----------------------------------------------------------------------


@dataclass(frozen=True)
class CliRun:
    code: int | None  # None: killed after HANG_SECONDS
    stdout: str
    stderr: str


def _cli_unpassable(target: str) -> str:
    """Why ``target`` cannot be a process argument at all ('' when it can)."""
    if "\x00" in target:
        return "a NUL cannot be in a process argument (execve ends the argument there); the loader check covers it"
    return ""


def _as_argument(text: str) -> str | bytes:
    """``text`` as a process argument: a lone surrogate as the bytes of its UTF-8 form (b'\\xed\\xa0\\x80'),
    which is how it reaches a process from a shell (Python then reads it surrogate-escaped)."""
    if any("\ud800" <= c <= "\udfff" for c in text):
        return text.encode("utf-8", "surrogatepass")
    return text


def _cli_argv(kind: str, target: str, fx: Fixtures, index: int) -> list[str | bytes]:
    """The command a user would run on this input (see :func:`_cli_unpassable` for the exception)."""
    data_dir = f"--data-dir={fx.scratch / f'ca-{index}'}"
    if kind == "cert":
        return ["svid", "inspect", target]
    if kind == "key":
        return [
            "ca",
            "init",
            data_dir,
            f"--trust-domain={TD}",
            f"--upstream-cert={fx.upstream_ca}",
            f"--upstream-key={target}",
        ]
    if kind == "pair":
        pair = Path(target)
        return [
            "ca",
            "init",
            data_dir,
            f"--trust-domain={TD}",
            f"--upstream-cert={pair / 'svid.pem'}",
            f"--upstream-key={pair / 'svid.key'}",
        ]
    if kind == "bundle":
        return ["policy", "check", str(fx.policy), "--cert", str(fx.chain), "--bundle", target, "--method", METHOD]
    if kind == "policy" and target.endswith("policy-regex-bomb.yaml"):
        return ["policy", "check", target, "--cert", str(fx.bomb_peer), "--method", METHOD]
    if kind == "policy":
        return ["policy", "check", target, f"--spiffe-id={WEB_ID}", "--method", METHOD]
    if kind == "spiffe-id":
        return ["policy", "check", str(fx.policy), _as_argument(f"--spiffe-id={target}"), "--method", METHOD]
    return ["ca", "init", data_dir, _as_argument(f"--trust-domain={target}")]


def _run_cli(argv: list[str | bytes], risky: bool) -> CliRun:
    if risky:  # the same `python -m meshid.cli`, under a memory limit
        code, out, err, _ = _child(["-m", "meshid.cli", *argv], HANG_SECONDS)
        return CliRun(code, out, err)
    done = subprocess.run(
        [sys.executable, "-m", "meshid.cli", *argv], capture_output=True, text=True, timeout=60, check=False
    )
    return CliRun(done.returncode, done.stdout, done.stderr)


# --- collecting every outcome once ---------------------------------------------------------------


@dataclass(frozen=True)
class Input:
    id: str
    file: str
    case: Case
    target: str  # a file's path, or a list file's entry
    words: str  # what the loader's message must contain for this input


def _inputs(generated: Path | None) -> list[Input]:
    inputs: list[Input] = []
    for name, case in {**CASES, **GENERATED}.items():
        path = (generated if name in GENERATED and generated else CORPUS) / name
        if isinstance(case.words, tuple):  # a list file: one input per entry, words given per entry
            entries = json.loads((CORPUS / name).read_text(encoding="utf-8"))
            inputs += [Input(f"{name}[{i}]", name, case, entry, words) for i, (entry, words) in enumerate(case.words)]
            assert entries == [entry for entry, _ in case.words], f"{name}: the table's entries are not the file's"
        else:
            inputs.append(Input(name, name, case, str(path), case.words))
    return inputs


@dataclass
class Results:
    inputs: dict[str, Input]
    loader: dict[str, dict[str, str]]
    cli: dict[str, CliRun | None]  # None: not passable as an argument (a visible skip)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> Fixtures:
    from meshid.ca import Authority

    folder = tmp_path_factory.mktemp("corpus-fixtures")
    ca = Authority.create_root(TD)
    svid = ca.issue_svid(WEB_ID)
    (folder / "svid.pem").write_bytes(svid.chain_pem())
    (folder / "svid.key").write_bytes(svid.key_pem())
    (folder / "upstream-ca.pem").write_bytes(TrustBundle(ca.trust_domain, ca.roots).to_pem())
    (folder / "policy.yaml").write_text(
        f"name: corpus\nallow:\n  - name: web\n    methods: ['*']\n    spiffe_ids: ['{WEB_ID}']\n"
    )
    (folder / "bomb-peer.pem").write_bytes(ca.issue_svid(f"spiffe://{TD}/" + "a" * BOMB_AS).chain_pem())
    (folder / "scratch").mkdir()
    _generate(folder, svid.chain_pem(), TrustBundle(ca.trust_domain, ca.roots).to_pem())
    return Fixtures(
        folder / "svid.pem", folder / "svid.key", folder / "upstream-ca.pem", folder / "policy.yaml",
        folder / "bomb-peer.pem", folder / "scratch",
    )  # fmt: skip


@pytest.fixture(scope="module")
def results(fixtures: Fixtures) -> Iterator[Results]:
    """Every input through its loader and through the CLI; the slow and risky runs go in parallel."""
    inputs = _inputs(fixtures.chain.parent)
    loader: dict[str, dict[str, str]] = {}
    cli: dict[str, CliRun | None] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(4, os.cpu_count() or 1)) as pool:
        pending: dict[concurrent.futures.Future[Any], tuple[str, str]] = {}
        for index, item in enumerate(inputs):
            if item.case.risky:
                pending[pool.submit(_isolated_outcome, item.case.kind, item.target, fixtures)] = ("loader", item.id)
            else:
                loader[item.id] = _outcome(item.case.kind, item.target, fixtures)
            if _cli_unpassable(item.target):
                cli[item.id] = None
            else:
                argv = _cli_argv(item.case.kind, item.target, fixtures, index)
                pending[pool.submit(_run_cli, argv, item.case.risky)] = ("cli", item.id)
        for future in concurrent.futures.as_completed(pending):
            which, key = pending[future]
            (loader if which == "loader" else cli)[key] = future.result()
    res = Results({i.id: i for i in inputs}, loader, cli)
    yield res
    _print_figures(res)


# --- the checks -----------------------------------------------------------------------------------


def _detail(item: Input, message: str) -> str:
    """The part of ``message`` that can name the flaw: after the concept prefix (``X509-SVID: ``,
    ``policy FILE: ``...), with the input's own path taken out (a file is named after its flaw)."""
    if item.case.kind not in LIST_KINDS:
        message = message.replace(item.target, "<the input>")
    return message.partition(": ")[2]


def _loader_problem(item: Input, outcome: dict[str, str]) -> str:
    """Why the loader's answer is not a clear refusal of the flaw ('' when it is)."""
    if item.file == "policy-regex-bomb.yaml" and outcome["result"] == "accepted":
        return ""  # accepted, and (in the child, under HANG_SECONDS) decided in time: safe
    if outcome["result"] != "rejected":
        return f"{outcome['result']} ({outcome['type']}): {outcome['message']}"
    if not outcome["message"].strip():
        return "refused with an empty message"
    if item.words not in _detail(item, outcome["message"]):
        return f"the message does not name the flaw ({item.words!r}): {outcome['message']}"
    return ""


def _cli_problem(item: Input, run: CliRun | None) -> str:
    """Why the CLI's answer is not exit 2 with one clear line ('' when it is)."""
    if run is None:
        return ""  # not passable as an argument: the test skips it, visibly
    if run.code is None:
        return f"no answer within {HANG_SECONDS:.0f} s (killed)"
    if "Traceback" in run.stderr:
        return f"traceback (exit {run.code}): {run.stderr.strip().splitlines()[-1]}"
    lines = run.stderr.strip().splitlines()
    if item.file == "policy-regex-bomb.yaml" and run.code in (0, 1):
        return ""  # evaluated in time: allowed or denied
    if run.code != 2:
        return f"exit code {run.code}, expected 2: {run.stdout.strip()} {run.stderr.strip()}"
    if len(lines) != 1 or not lines[0].startswith("meshid: ") or len(lines[0]) < len("meshid: ") + 10:
        return f"not one clear line on stderr ({len(lines)} lines): {run.stderr.strip()[:300]}"
    return ""


def test_the_table_lists_every_corpus_file() -> None:
    on_disk = {p.name for p in CORPUS.iterdir()} - NOT_CORPUS
    assert on_disk == set(CASES), (sorted(on_disk - set(CASES)), sorted(set(CASES) - on_disk))
    assert not set(CASES) & set(GENERATED)
    inputs = _inputs(None)  # also checks each list file's entries against the table's
    assert all(isinstance(c.words, tuple) == (c.kind in LIST_KINDS) for c in CASES.values())
    assert not [i.id for i in inputs if not i.words.strip()], "every input names its flaw"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("input_id", [i.id for i in _inputs(None)])
def test_loader_refuses_with_a_message_naming_the_flaw(results: Results, input_id: str) -> None:
    problem = _loader_problem(results.inputs[input_id], results.loader[input_id])
    assert not problem, problem


@pytest.mark.timeout(300)
@pytest.mark.parametrize("input_id", [i.id for i in _inputs(None)])
def test_cli_refuses_with_exit_2_and_one_line(results: Results, input_id: str) -> None:
    unpassable = _cli_unpassable(results.inputs[input_id].target)
    if unpassable:
        pytest.skip(unpassable)
    problem = _cli_problem(results.inputs[input_id], results.cli[input_id])
    assert not problem, problem


def _print_figures(res: Results) -> None:
    """``[corpus] N files tried (I inputs), R refused naming the flaw, F failing``, the CLI runs
    skipped, then each failing file's first failing input."""
    files = sorted({i.file for i in res.inputs.values()})
    failing: dict[str, str] = {}
    kinds: Counter[str] = Counter()
    for item in res.inputs.values():
        checks = (("loader", _loader_problem(item, res.loader[item.id])), ("cli", _cli_problem(item, res.cli[item.id])))
        found = [(where, problem) for where, problem in checks if problem]
        if found and item.file not in failing:
            where, problem = found[0]
            kind = (
                "hang" if "within" in problem
                else "multi-line message" if "lines)" in problem
                else "wrong message" if "does not name the flaw" in problem
                else "crash"
            )  # fmt: skip
            kinds[kind] += 1
            failing[item.file] = f"    {item.id} [{where}, {kind}]: {problem[:150]}"
    accepted = [i.id for i in res.inputs.values() if res.loader[i.id]["result"] == "accepted"]
    skipped = sum(1 for run in res.cli.values() if run is None)
    plural = {"crash": "crashes", "hang": "hangs", "multi-line message": "multi-line messages"}
    plural["wrong message"] = "wrong messages"
    detail = ", ".join(f"{n} {plural[k] if n > 1 else k}" for k, n in sorted(kinds.items()))
    print(
        f"\n[corpus] {len(files)} files tried ({len(res.inputs)} inputs, each through its loader and the CLI), "
        f"{len(files) - len(failing)} refused with a message naming the flaw"
        + (f" or accepted and decided in time ({', '.join(accepted)})" if accepted else "")
        + f", {len(failing)} failing"
        + (f" ({detail})" if failing else "")
    )
    print(f"[corpus] {skipped} of {len(res.inputs)} CLI runs skipped: a NUL cannot be in a process argument")
    if failing:
        print("\n".join(failing.values()))


if __name__ == "__main__":  # the child process of _isolated_outcome
    kind, target, *paths = sys.argv[1:]
    print(json.dumps(_outcome(kind, target, Fixtures(*(Path(p) for p in paths)))))

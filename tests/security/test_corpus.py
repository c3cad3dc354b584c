"""The bad-input corpus (issue #6): every file in ``tests/corpus/`` goes through meshid's loaders
in process and through the ``meshid`` CLI as a real process, and must be refused with a clear
message: the loader with a :class:`MeshIdError` whose message names the flaw, the CLI with exit
code 2 and one line on stderr, never a traceback.

``CASES`` is the table of every committed file (a test keeps it in step with the folder); the
files too large to commit are generated here (``GENERATED``). A case given a ``BUG`` reason is a
known defect of meshid, kept as ``xfail(strict=True)`` so that fixing it makes the test pass
loudly; every BUG this corpus found is fixed, so no case has one now. Files that could hang or exhaust memory are loaded in a child process with a time
limit and a memory limit, since a regular expression or ``repr`` running in C cannot be
interrupted from inside the process.

``policy-regex-bomb.yaml`` is the one file meshid may accept: a catastrophic-backtracking subject
pattern must be either refused at load or evaluated safely, so there the check is that a
decision for a peer whose subject is a long run of ``a`` comes back in time.

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

BUG_LAZY_X509 = ""  # fixed; the case is an ordinary check now
BUG_JSON_RECURSION = ""  # fixed; the case is an ordinary check now
BUG_PARSER_ERRORS = ""  # fixed; the case is an ordinary check now
BUG_YAML_MULTILINE = ""  # fixed; the case is an ordinary check now
BUG_LAUGHS = ""  # fixed; the case is an ordinary check now
BUG_PEM_QUADRATIC = ""  # fixed; the case is an ordinary check now
BUG_REGEX_BOMB = ""  # fixed; the case is an ordinary check now


@dataclass(frozen=True)
class Case:
    """What a corpus file is and what meshid must say about it.

    ``kind``: cert | key | pair | bundle | policy | spiffe-id | trust-domain.
    ``words``: what the loader's message must contain, naming the flaw.
    ``loader_bug``/``cli_bug``: a known BUG (the check is xfail, strict).
    ``risky``: may hang or blow up; loaded in a child process with limits.
    """

    kind: str
    words: str
    loader_bug: str = ""
    cli_bug: str = ""
    risky: bool = False


def _cert(words: str, bug: str = "", **kw: Any) -> Case:
    return Case("cert", words, loader_bug=bug, cli_bug=bug, **kw)


def _bundle(words: str, bug: str = "", **kw: Any) -> Case:
    return Case("bundle", words, loader_bug=bug, cli_bug=bug, **kw)


def _policy(words: str, bug: str = "", cli_bug: str = "", **kw: Any) -> Case:
    return Case("policy", words, loader_bug=bug, cli_bug=cli_bug or bug, **kw)


CASES: dict[str, Case] = {
    "cert-empty.pem": _cert("no PEM certificate found"),
    "cert-truncated.pem": _cert("truncated"),
    "cert-truncated-der.pem": _cert("not a valid certificate"),
    "cert-der-garbage.pem": _cert("not a valid certificate"),
    "cert-bad-base64.pem": _cert("not a valid certificate"),
    "cert-wrong-label-key-in-cert.pem": _cert("expected 'CERTIFICATE'"),
    "cert-der-not-pem.pem": _cert("no PEM certificate found"),
    "cert-end-without-begin.pem": _cert("no PEM certificate found"),
    "cert-no-uri-san.pem": _cert("no URI SAN"),
    "cert-two-uri-sans.pem": _cert("2 URI SANs"),
    "cert-uri-san-not-spiffe.pem": _cert("not a valid SPIFFE ID"),
    "cert-uri-san-uppercase-trust-domain.pem": _cert("must be lowercase"),
    "cert-spiffe-id-no-path.pem": _cert("has no path"),
    "cert-leaf-is-ca.pem": _cert("is a CA"),
    "cert-no-key-usage.pem": _cert("no key usage"),
    "cert-key-usage-no-digital-signature.pem": _cert("digitalSignature"),
    "cert-key-usage-key-cert-sign.pem": _cert("keyCertSign"),
    "cert-key-usage-crl-sign.pem": _cert("cRLSign"),
    "cert-san-dns-name-not-ascii.pem": _cert("X509-SVID", BUG_LAZY_X509),
    "cert-duplicate-extension.pem": _cert("X509-SVID", BUG_LAZY_X509),
    "cert-invalid-version.pem": _cert("X509-SVID", BUG_LAZY_X509),
    "key-empty.pem": Case("key", "exactly one PEM 'PRIVATE KEY' block"),
    "key-truncated.pem": Case("key", "truncated"),
    "key-wrong-label-cert-in-key.pem": Case("key", "exactly one PEM 'PRIVATE KEY' block"),
    "key-two-keys.pem": Case("key", "exactly one PEM 'PRIVATE KEY' block"),
    "key-public-key-not-private.pem": Case("key", "exactly one PEM 'PRIVATE KEY' block"),
    "key-encrypted.pem": Case("key", "encrypted"),
    "key-der-garbage.pem": Case("key", "cannot be read"),
    "key-unknown-algorithm-oid.pem": Case("key", "private key", loader_bug=BUG_LAZY_X509, cli_bug=BUG_LAZY_X509),
    "key-wrong-for-cert": Case("pair", "does not match"),
    "bundle-empty.pem": _bundle("no PEM certificate found"),
    "bundle-not-a-ca.pem": _bundle("is not a CA"),
    "bundle-truncated.pem": _bundle("truncated"),
    "bundle-wrong-label-key.pem": _bundle("expected 'CERTIFICATE'"),
    "bundle-der-garbage.pem": _bundle("not a valid certificate"),
    "bundle-ca-malformed-extension.pem": _bundle("trust bundle", BUG_LAZY_X509),
    "bundle-json-broken.json": _bundle("not valid JSON"),
    "bundle-json-no-keys.json": _bundle("'keys' list"),
    "bundle-json-keys-not-list.json": _bundle("'keys' list"),
    "bundle-json-key-not-object.json": _bundle("not an object"),
    "bundle-json-only-jwt-keys.json": _bundle("no 'x509-svid' key"),
    "bundle-json-x5c-not-base64.json": _bundle("not a DER certificate"),
    "bundle-json-x5c-not-der.json": _bundle("not a DER certificate"),
    "bundle-json-x5c-leaf-not-ca.json": _bundle("not a CA"),
    "bundle-json-deep-nesting.json": _bundle("trust bundle", BUG_JSON_RECURSION),
    "policy-broken.yaml": _policy("invalid YAML", cli_bug=BUG_YAML_MULTILINE),
    "policy-broken.json": _policy("invalid JSON at line 1"),
    "policy-unknown-key.yaml": _policy("unknown top-level key(s) 'alow'"),
    "policy-unknown-rule-key.yaml": _policy("unknown key(s) 'spiffe_id'"),
    "policy-regex-bomb.yaml": _policy("", BUG_REGEX_BOMB, risky=True),
    "policy-yaml-billion-laughs.yaml": _policy("'spiffe_ids' must be a list of strings", risky=True),
    "policy-billion-laughs-in-audit-condition.yaml": _policy("audit_condition", BUG_LAUGHS, risky=True),
    "policy-deep-nesting.json": _policy("nested too deeply"),
    "policy-deep-nesting.yaml": _policy("nested too deeply"),
    "policy-yaml-invalid-date.yaml": _policy("policy", BUG_PARSER_ERRORS),
    "policy-yaml-huge-integer.yaml": _policy("policy", BUG_PARSER_ERRORS),
    "policy-huge-integer.json": _policy("policy", BUG_PARSER_ERRORS),
    "policy-yaml-timestamp-tag-not-a-date.yaml": _policy("policy", BUG_PARSER_ERRORS),
    "policy-yaml-bool-tag-not-a-bool.yaml": _policy("policy", BUG_PARSER_ERRORS),
    "policy-yaml-python-tag.yaml": _policy("could not determine a constructor", cli_bug=BUG_YAML_MULTILINE),
    "policy-yaml-non-string-keys.yaml": _policy("unknown top-level key(s)"),
    "policy-empty.yaml": _policy("top level must be a mapping"),
    "policy-top-level-list.json": _policy("top level must be a mapping"),
    "policy-no-allow-rule.yaml": _policy("no allow rule"),
    "policy-rule-without-methods.yaml": _policy("needs 'methods'"),
    "policy-rule-names-nobody.yaml": _policy("names nobody"),
    "policy-duplicate-rule-name.yaml": _policy("used by another rule"),
    "policy-method-without-service.yaml": _policy("'/package.Service/Method'"),
    "policy-method-partial-glob.yaml": _policy("whole method name"),
    "policy-spiffe-id-uppercase-trust-domain.yaml": _policy("must be lowercase"),
    "policy-spiffe-id-glob-in-spiffe-ids.yaml": _policy("put globs under 'spiffe_id_patterns'"),
    "policy-spiffe-id-pattern-glob-trust-domain.yaml": _policy("cannot be a glob"),
    "policy-subject-pattern-invalid-regex.yaml": _policy("not a valid regular expression"),
    "policy-subject-pattern-repeat-overflow.yaml": _policy("not a valid regular expression"),
    "policy-thumbprint-not-hex.yaml": _policy("not a SHA-256 hex digest"),
    "policy-dns-name-invalid.yaml": _policy("not a valid host name"),
    "policy-flag-not-boolean.yaml": _policy("must be true or false"),
    "policy-not-utf8.yaml": _policy("not UTF-8"),
    "policy-grpc-unknown-field.json": _policy("unknown field(s) 'extra'"),
    "policy-grpc-empty-allow-rules.json": _policy("'allow_rules' is empty"),
    "policy-grpc-allow-rules-not-list.json": _policy("must be a list of rules"),
    "policy-grpc-ambiguous-star.json": _policy("ambiguous"),
    "policy-grpc-pseudo-header.json": _policy("cannot be matched"),
    "policy-grpc-duplicate-rule-name.json": _policy("used by another rule"),
    "policy-grpc-unknown-audit-logger.json": _policy("is not supported"),
    "policy-grpc-missing-name.json": _policy("'name' is required"),
    "spiffe-ids-invalid.json": Case("spiffe-id", "SPIFFE ID"),
    "trust-domains-invalid.json": Case("trust-domain", ""),
}

#: Generated at test time: too large to commit, or a megabyte of one repeated line.
GENERATED: dict[str, Case] = {
    "cert-huge-2mib.pem": _cert("larger than"),
    "bundle-huge-2mib.pem": _bundle("larger than"),
    "policy-huge-9mib.yaml": _policy("larger than"),
    "cert-pem-begin-flood-1mib.pem": _cert("X509-SVID", BUG_PEM_QUADRATIC, risky=True),
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


def _child(argv: list[str], timeout: float) -> tuple[int | None, str, str, float]:
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
    argv = [__file__, kind, target, *(str(getattr(fx, f)) for f in Fixtures.__dataclass_fields__)]
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


def _cli_argv(kind: str, target: str, fx: Fixtures, index: int) -> list[str] | None:
    """The command a user would run on this input; None when it cannot be passed as an argument."""
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
    if "\x00" in target or any("\ud800" <= c <= "\udfff" for c in target):
        return None  # no process can be given a NUL or a lone surrogate in its arguments
    if kind == "spiffe-id":
        return ["policy", "check", str(fx.policy), f"--spiffe-id={target}", "--method", METHOD]
    return ["ca", "init", data_dir, f"--trust-domain={target}"]


def _run_cli(argv: list[str], risky: bool) -> CliRun:
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
    target: str


def _inputs(generated: Path | None) -> list[Input]:
    inputs: list[Input] = []
    for name, case in {**CASES, **GENERATED}.items():
        path = (generated if name in GENERATED and generated else CORPUS) / name
        if case.kind in ("spiffe-id", "trust-domain"):
            entries = json.loads((CORPUS / name).read_text(encoding="utf-8")) if path.exists() else []
            inputs += [Input(f"{name}[{i}]", name, case, entry) for i, entry in enumerate(entries)]
        else:
            inputs.append(Input(name, name, case, str(path)))
    return inputs


def _params(check: str) -> list[Any]:
    """One pytest param per input, xfail(strict=True) where ``check`` (loader or cli) has a known BUG."""
    params = []
    for item in _inputs(None):
        bug = item.case.loader_bug if check == "loader" else item.case.cli_bug
        marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=bug)] if bug else []
        params.append(pytest.param(item.id, marks=marks, id=item.id))
    return params


@dataclass
class Results:
    inputs: dict[str, Input]
    loader: dict[str, dict[str, str]]
    cli: dict[str, CliRun | None]


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
            argv = _cli_argv(item.case.kind, item.target, fixtures, index)
            if argv is None:
                cli[item.id] = None
            else:
                pending[pool.submit(_run_cli, argv, item.case.risky)] = ("cli", item.id)
        for future in concurrent.futures.as_completed(pending):
            which, key = pending[future]
            (loader if which == "loader" else cli)[key] = future.result()
    res = Results({i.id: i for i in inputs}, loader, cli)
    yield res
    _print_figures(res)


# --- the checks -----------------------------------------------------------------------------------


def _loader_problem(item: Input, outcome: dict[str, str]) -> str:
    """Why the loader's answer is not a clear refusal of the flaw ('' when it is)."""
    if item.file == "policy-regex-bomb.yaml":  # refused at load, or decided in time: both are safe
        return "" if outcome["result"] in ("rejected", "accepted") else f"{outcome['type']}: {outcome['message']}"
    if outcome["result"] != "rejected":
        return f"{outcome['result']} ({outcome['type']}): {outcome['message']}"
    if not outcome["message"].strip():
        return "refused with an empty message"
    if item.case.words not in outcome["message"]:
        return f"the message does not name the flaw ({item.case.words!r}): {outcome['message']}"
    return ""


def _cli_problem(item: Input, run: CliRun | None) -> str:
    """Why the CLI's answer is not exit 2 with one clear line ('' when it is)."""
    if run is None:
        return ""  # not passable as an argument; the loader check covers it
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


@pytest.mark.timeout(300)
@pytest.mark.parametrize("input_id", _params("loader"))
def test_loader_refuses_with_a_message_naming_the_flaw(results: Results, input_id: str) -> None:
    problem = _loader_problem(results.inputs[input_id], results.loader[input_id])
    assert not problem, problem


@pytest.mark.timeout(300)
@pytest.mark.parametrize("input_id", _params("cli"))
def test_cli_refuses_with_exit_2_and_one_line(results: Results, input_id: str) -> None:
    problem = _cli_problem(results.inputs[input_id], results.cli[input_id])
    assert not problem, problem


def _print_figures(res: Results) -> None:
    """``[corpus] N files tried, R rejected with a message, C crashes``, then what each crash was."""
    files = sorted({i.file for i in res.inputs.values()})
    failures: list[str] = []
    kinds: Counter[str] = Counter()
    unexpected = 0
    for name in files:
        for item in (i for i in res.inputs.values() if i.file == name):
            checks = (
                ("loader", _loader_problem(item, res.loader[item.id]), item.case.loader_bug),
                ("cli", _cli_problem(item, res.cli[item.id]), item.case.cli_bug),
            )
            found = [(where, problem, bug) for where, problem, bug in checks if problem]
            if found:
                where, problem, bug = found[0]
                kind = "hang" if "within" in problem else "multi-line message" if "lines)" in problem else "crash"
                kinds[kind] += 1
                unexpected += sum(1 for _, _, b in found if not b)
                failures.append(f"    {item.id} [{where}, {kind}{'' if bug else ', NOT a known bug'}]: {problem[:150]}")
                break
    clean = len(files) - len(failures)
    plural = {"crash": "crashes", "hang": "hangs", "multi-line message": "multi-line messages"}
    detail = ", ".join(f"{n} {plural[k] if n > 1 else k}" for k, n in sorted(kinds.items()))
    print(
        f"\n[corpus] {len(files)} files tried ({len(res.inputs)} inputs, each through its loader and the CLI), "
        f"{clean} rejected with a message, {len(failures)} crashes" + (f" ({detail})" if failures else "")
    )
    if failures:
        known = "all known BUGs, xfail strict" if not unexpected else f"{unexpected} NOT known: see the failures above"
        print(f"[corpus] {known}:")
        print("\n".join(failures))


if __name__ == "__main__":  # the child process of _isolated_outcome
    kind, target, *paths = sys.argv[1:]
    print(json.dumps(_outcome(kind, target, Fixtures(*(Path(p) for p in paths)))))

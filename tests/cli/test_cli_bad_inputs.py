"""Every bad input the operator's first hour met (issue #13), as a real ``python -m meshid``
process: exactly one line on stderr, never a traceback, the documented exit code (README,
"Exit codes"): 1 a negative answer, 2 bad input, 3 a server that could not be reached."""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from meshid import TrustBundle
from meshid.ca import Authority

TD = "acme.test"
NEGATIVE, BAD_INPUT, UNREACHABLE = 1, 2, 3


def meshid(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshid", *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture(scope="module")
def closed_port() -> Iterator[int]:
    """A loopback port bound but never listened on: a connection to it is refused, and no other
    process can take the port while the tests run."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bad-inputs")
    init = meshid("ca", "init", "--data-dir", str(folder / "ca"), "--trust-domain", TD)
    assert init.returncode == 0, init.stderr
    ca = Authority.create_root(TD)
    (folder / "bundle.pem").write_bytes(TrustBundle(ca.trust_domain, ca.roots).to_pem())
    now = datetime.datetime.now(datetime.UTC)
    svids = {
        "svid.pem": ca.issue_svid(f"spiffe://{TD}/web"),
        "expired.pem": ca.issue_svid(
            f"spiffe://{TD}/web", ttl=datetime.timedelta(hours=1), now=now - datetime.timedelta(days=1)
        ),
        "future.pem": ca.issue_svid(f"spiffe://{TD}/web", now=now + datetime.timedelta(days=1)),
        "foreign.pem": Authority.create_root(TD).issue_svid(f"spiffe://{TD}/web"),  # another CA of the same name
    }
    for name, svid in svids.items():
        (folder / name).write_bytes(svid.chain_pem())
    (folder / "key.pem").write_bytes(
        ca.private_key.private_bytes(  # type: ignore[union-attr]
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    (folder / "policy.yaml").write_text(
        f"allow:\n  - name: web\n    methods: ['*']\n    spiffe_ids: [spiffe://{TD}/web]\n"
    )
    (folder / "two.token").write_text(f"{TD}:first-secret\n{TD}:second-secret\n")  # `>>` twice
    (folder / "empty.token").write_text("\n")
    (folder / "big.pem").write_bytes(svids["svid.pem"].chain_pem() * (1 + (1 << 20) // len(svids["svid.pem"].chain_pem())))
    (folder / "prose.token").write_text("paste the token here\n")
    (folder / "upper.token").write_text("Acme.Test:secret\n")
    (folder / "long.token").write_text(f"{TD}:first-secret" + " " * 2000 + f"{TD}:second-secret\n")
    (folder / "empty.yaml").write_text("")
    (folder / "broken.yaml").write_text("allow: [\n")
    (folder / "bad-pattern.yaml").write_text(
        f"allow:\n  - name: svc\n    methods: ['*']\n    spiffe_id_patterns: ['spiffe://{TD}/svc/[a-z']\n"
    )
    return folder


CA = "{dir}/ca"
ADMIN = ("--data-dir", CA)
CHECK = ("policy", "check", "{dir}/policy.yaml", "--spiffe-id", f"spiffe://{TD}/web")
# (argv, exit code, words the one line must hold); {dir} is the fixture folder, {closed} a refused port
CASES = [
    # addresses: one parser for every HOST:PORT option; nothing wraps round, nothing defaults to 443
    (("ca", "serve", *ADMIN, "--listen", "nonsense"), BAD_INPUT, ["--listen", "'nonsense'", "no port"]),
    (("ca", "serve", *ADMIN, "--listen", "127.0.0.1:abc"), BAD_INPUT, ["--listen", "port 'abc' is not a number"]),
    (("ca", "serve", *ADMIN, "--listen", "127.0.0.1:99999"), BAD_INPUT, ["--listen", "port 99999 is out of range"]),
    (("ca", "serve", *ADMIN, "--listen", "127.0.0.1"), BAD_INPUT, ["--listen", "no port"]),
    (("ca", "serve", *ADMIN, "--listen", ":8443"), BAD_INPUT, ["--listen", "no host"]),
    (("ca", "serve", *ADMIN, "--listen", "::1:8443"), BAD_INPUT, ["--listen", "in brackets, e.g. [::1]:8443"]),
    (("ca", "serve", *ADMIN, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:99999"), BAD_INPUT, ["--metrics", "out of range"]),
    (("ca", "serve", *ADMIN, "--listen", "127.0.0.1:0", "--metrics", "nonsense"), BAD_INPUT, ["--metrics", "no port"]),
    (("entry", "list", *ADMIN, "--server", "127.0.0.1"), BAD_INPUT, ["--server", "no port"]),
    (("entry", "list", *ADMIN, "--server", "127.0.0.1:0"), BAD_INPUT, ["--server", "port 0 is out of range"]),
    (("token", "create", *ADMIN, "--server", "127.0.0.1:65536", "--spiffe-id", f"spiffe://{TD}/web"), BAD_INPUT, ["port 65536"]),
    (("svid", "revoke", *ADMIN, "--server", "nonsense", "--serial", "ab"), BAD_INPUT, ["--server", "no port"]),
    (("agent", "list", *ADMIN, "--server", "a..b:80"), BAD_INPUT, ["--server", "not a host name"]),
    (("svid", "fetch", "--server", "127.0.0.1:abc", "--bundle", "{dir}/bundle.pem", "--out", "{dir}/out"), BAD_INPUT, ["--server", "'abc'"]),
    (("bundle", "show", "--server", "999.0.0.1:443", "--bundle", "{dir}/bundle.pem", "--trust-domain", TD), BAD_INPUT, ["not an IPv4 address"]),
    (("agent", "--server", "127.0.0.1", "--bundle", "{dir}/bundle.pem", "--out", "{dir}/out"), BAD_INPUT, ["--server", "no port"]),
    (("agent", "--server", "127.0.0.1:1", "--bundle", "{dir}/bundle.pem", "--workload-api", "tcp://x:1"), BAD_INPUT, ["--workload-api", "only Unix sockets"]),
    # durations and numbers
    (("token", "create", *ADMIN, "--server", "127.0.0.1:1", "--spiffe-id", f"spiffe://{TD}/web", "--ttl", "0"), BAD_INPUT, ["--ttl", "a duration must be positive", "30s, 10m, 1h, 7d"]),
    (("token", "create", *ADMIN, "--server", "127.0.0.1:1", "--spiffe-id", f"spiffe://{TD}/web", "--ttl", "-1h"), BAD_INPUT, ["--ttl", "'-1h': a duration must be positive"]),
    (("entry", "create", *ADMIN, "--server", "127.0.0.1:1", "--spiffe-id", f"spiffe://{TD}/web", "--ttl", "5"), BAD_INPUT, ["--ttl", "needs a unit"]),
    (("ca", "init", "--data-dir", "{dir}/new", "--trust-domain", TD, "--ttl", "soon"), BAD_INPUT, ["--ttl", "'soon' is not a duration"]),
    (("bundle", "show", "--server", "127.0.0.1:1", "--bundle", "{dir}/bundle.pem", "--trust-domain", TD, "--refresh-hint", "-5"), BAD_INPUT, ["--refresh-hint", "greater than 0"]),
    (("bundle", "show", "--server", "127.0.0.1:1", "--bundle", "{dir}/bundle.pem", "--trust-domain", TD, "--refresh-hint", "0"), BAD_INPUT, ["--refresh-hint", "greater than 0"]),
    (("agent", "--server", "127.0.0.1:1", "--bundle", "{dir}/bundle.pem", "--out", "{dir}/out", "--renew-at", "7"), BAD_INPUT, ["--renew-at", "between 0 and 1"]),
    # options that count seconds take a bare number or a duration, as the README says of every duration
    (("agent", "--server", "127.0.0.1:1", "--bundle", "{dir}/bundle.pem", "--sync-interval", "soon"), BAD_INPUT, ["--sync-interval", "'soon' is not a number of seconds", "30s, 10m, 1h, 7d"]),
    (("agent", "--server", "127.0.0.1:1", "--bundle", "{dir}/bundle.pem", "--sync-interval", "2d"), BAD_INPUT, ["--sync-interval", "'2d': must be at most 1d"]),
    (("agent", "--server", "127.0.0.1:1", "--bundle", "{dir}/bundle.pem", "--sync-interval", "1m", "--exec-timeout", "2m", "--crl-refresh", "0.5"), BAD_INPUT, ["give --out DIR, --workload-api"]),
    (("bundle", "show", "--server", "127.0.0.1:1", "--bundle", "{dir}/bundle.pem", "--trust-domain", TD, "--refresh-hint", "0.5"), BAD_INPUT, ["--refresh-hint", "whole number of seconds"]),
    (("bundle", "show", "--server", "127.0.0.1:{closed}", "--bundle", "{dir}/bundle.pem", "--trust-domain", TD, "--refresh-hint", "5m"), UNREACHABLE, ["cannot reach the CA"]),
    # a join token file that holds no one token: said of the file, before the CA is called
    (("svid", "fetch", "--server", "127.0.0.1:{closed}", "--bundle", "{dir}/bundle.pem", "--join-token-file", "{dir}/two.token", "--out", "{dir}/out"), BAD_INPUT, ["two.token' holds 2 lines", "'<trust domain>:<secret>'"]),
    (("svid", "fetch", "--server", "127.0.0.1:{closed}", "--bundle", "{dir}/bundle.pem", "--join-token-file", "{dir}/empty.token", "--out", "{dir}/out"), BAD_INPUT, ["empty.token' is empty", "meshid token create"]),
    (("agent", "--server", "127.0.0.1:{closed}", "--bundle", "{dir}/bundle.pem", "--join-token-file", "{dir}/prose.token", "--out", "{dir}/out"), BAD_INPUT, ["prose.token' holds spaces"]),
    (("svid", "fetch", "--server", "127.0.0.1:{closed}", "--bundle", "{dir}/bundle.pem", "--join-token-file", "{dir}/upper.token", "--out", "{dir}/out"), BAD_INPUT, ["upper.token' is not a join token", "lowercase"]),
    (("svid", "fetch", "--server", "127.0.0.1:{closed}", "--bundle", "{dir}/bundle.pem", "--join-token-file", "{dir}/long.token", "--out", "{dir}/out"), BAD_INPUT, ["long.token' is larger than 1024 characters"]),
    # policy check: the method as the policy loader checks it, and the loader's own messages
    ((*CHECK, "--method", "SayHello"), BAD_INPUT, ["--method", "'SayHello'", "write '/package.Service/Method'"]),
    ((*CHECK, "--method", "/SayHello"), BAD_INPUT, ["--method", "write '/package.Service/Method'"]),
    ((*CHECK, "--method", "/acme.Greeter/*"), BAD_INPUT, ["--method", "the one method called"]),
    (("policy", "check", "{dir}/empty.yaml", "--spiffe-id", f"spiffe://{TD}/web", "--method", "/a.B/C"), BAD_INPUT, ["empty.yaml: is empty"]),
    (("policy", "check", "{dir}/broken.yaml", "--spiffe-id", f"spiffe://{TD}/web", "--method", "/a.B/C"), BAD_INPUT, ["broken.yaml: invalid YAML at line 2 column 1"]),
    (("policy", "check", "{dir}/bad-pattern.yaml", "--spiffe-id", f"spiffe://{TD}/web", "--method", "/a.B/C"), BAD_INPUT, [f"SPIFFE ID pattern 'spiffe://{TD}/svc/[a-z'", "not a regular expression"]),
    # certificates and bundles: what was wrong with which file, in meshid's words
    ((*CHECK[:3], "--cert", "{dir}/foreign.pem", "--bundle", "{dir}/bundle.pem", "--method", "/a.B/C"), BAD_INPUT, ["no root of the bundle signed it"]),
    ((*CHECK[:3], "--cert", "{dir}/expired.pem", "--bundle", "{dir}/bundle.pem", "--method", "/a.B/C"), BAD_INPUT, ["the certificate expired at", "renew it"]),
    (("svid", "inspect", "{dir}/expired.pem"), NEGATIVE, ["expired.pem", "expired", "ago", "meshid svid fetch"]),
    (("svid", "inspect", "{dir}/future.pem"), NEGATIVE, ["future.pem", "not yet valid", "valid from"]),
    (("svid", "inspect", "{dir}/key.pem"), BAD_INPUT, ["key.pem", "'PRIVATE KEY', expected 'CERTIFICATE'", "give the certificate file (svid.pem), not its key"]),
    (("svid", "inspect", "{dir}/big.pem"), BAD_INPUT, ["big.pem", "larger than 1048576 bytes"]),
    (("ca", "init", "--data-dir", "{dir}/up", "--trust-domain", "up.test", "--upstream-cert", "{dir}/key.pem", "--upstream-key", "{dir}/key.pem"), BAD_INPUT, ["key.pem", "(--upstream-cert) holds a 'PRIVATE KEY'", "the certificate goes in --upstream-cert"]),
    (("svid", "fetch", "--server", "127.0.0.1:1", "--bundle", "{dir}/key.pem", "--out", "{dir}/out"), BAD_INPUT, ["CA bundle", "key.pem", "'PRIVATE KEY'"]),
    (("bundle", "show", "--server", "127.0.0.1:1", "--bundle", "{dir}/bundle.pem", "--trust-domain", "Acme.Test"), BAD_INPUT, ["trust domain 'Acme.Test'", "lowercase"]),
    # the admin commands' --data-dir: the CA's folder, named as such when it is another
    (("entry", "list", "--data-dir", "{dir}", "--server", "127.0.0.1:{closed}"), BAD_INPUT, ["--data-dir", "no admin SVID in it (admin/svid.pem)", "`meshid ca init --data-dir` made"]),
    (("svid", "revoke", "--data-dir", "{dir}/nowhere", "--server", "127.0.0.1:{closed}", "--serial", "ab"), BAD_INPUT, ["--data-dir", "'{dir}/nowhere': no such folder"]),
    # usage
    (("svid",  "inspect"), BAD_INPUT, ["the following arguments are required: file", "meshid svid inspect --help"]),
    (("nonsense",), BAD_INPUT, ["invalid choice: 'nonsense'"]),
    # could not reach a server: 3, not 2
    (("entry", "list", *ADMIN, "--server", "127.0.0.1:{closed}"), UNREACHABLE, ["UNAVAILABLE", "cannot reach the CA at 127.0.0.1:{closed}"]),
    (("svid", "revoke", *ADMIN, "--server", "127.0.0.1:{closed}", "--spiffe-id", f"spiffe://{TD}/web"), UNREACHABLE, ["cannot reach the CA"]),
    (("bundle", "show", "--server", "127.0.0.1:{closed}", "--bundle", "{dir}/bundle.pem", "--trust-domain", TD), UNREACHABLE, ["cannot reach the CA"]),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "code", "words"), CASES, ids=[" ".join(c[0])[:70] for c in CASES])
def test_bad_input_gets_one_line_and_the_documented_exit_code(
    files: Path, closed_port: int, argv: tuple[str, ...], code: int, words: list[str]
) -> None:
    def fill(text: str) -> str:
        return text.replace("{dir}", str(files)).replace("{closed}", str(closed_port))

    result = meshid(*(fill(a) for a in argv))
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("meshid: "), lines[0]
    for word in words:
        assert fill(word) in lines[0], lines[0]
    assert result.returncode == code, (result.returncode, result.stderr)


@pytest.mark.parametrize("argv", [(), ("ca",), ("ca", "rotate"), ("entry",), ("svid",)], ids=repr)
def test_a_group_without_a_command_prints_its_usage_and_commands(argv: tuple[str, ...]) -> None:
    result = meshid(*argv)
    assert result.returncode == BAD_INPUT
    assert "the following arguments are required" not in result.stderr
    assert result.stderr.startswith(f"usage: meshid {' '.join(argv)}".rstrip()), result.stderr
    if not argv:
        for group in ("ca", "agent", "bundle", "entry", "token", "svid", "policy"):
            assert f"\n    {group} " in result.stderr, result.stderr
        assert "fetch, inspect and revoke X509-SVIDs" in result.stderr
        assert "Exit codes: 0 ok" in result.stderr
    elif argv == ("ca",):
        assert "init" in result.stderr and "serve" in result.stderr and "rotate" in result.stderr


def test_stdout_closed_early_exits_141_without_a_message(files: Path) -> None:
    """``meshid ... | head``: the reader went away; no "meshid: Broken pipe" line, SIGPIPE's code."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # closed before the process writes: every write fails with EPIPE
    try:
        result = subprocess.run(
            [sys.executable, "-m", "meshid", "svid", "inspect", "--json", str(files / "svid.pem")],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (141, "")


def test_token_create_help_says_which_entries_take_a_token() -> None:
    result = meshid("token", "create", "--help")
    assert result.returncode == 0, result.stderr
    assert "an entry made without --parent-id" in " ".join(result.stdout.split()), result.stdout

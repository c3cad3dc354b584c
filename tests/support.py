"""Shared test helpers: a greeter servicer (sync and aio) and servers started on loopback."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

import meshid
import meshid.aio
from meshid._proto import greeter_pb2, greeter_pb2_grpc

TD = "example.org"
SERVER_ID = "spiffe://example.org/ns/prod/sa/greeter"
FRONTEND_ID = "spiffe://example.org/ns/prod/sa/frontend"
INTRUDER_ID = "spiffe://example.org/ns/dev/sa/intruder"

SERVICE = "meshid.examples.v1.Greeter"
SAY_HELLO = f"/{SERVICE}/SayHello"


def _caller(context: Any) -> str:
    identity = meshid.peer_identity(context)
    return str(identity.spiffe_id) if identity.spiffe_id else identity.subject


class Greeter(greeter_pb2_grpc.GreeterServicer):
    def SayHello(self, request: Any, context: Any) -> Any:
        return greeter_pb2.HelloReply(message=f"hello {request.name}", caller=_caller(context))

    def SayHelloStream(self, request: Any, context: Any) -> Any:
        for i in range(3):
            yield greeter_pb2.HelloReply(message=f"hello {request.name} {i}", caller=_caller(context))

    def CollectHellos(self, request_iterator: Any, context: Any) -> Any:
        names = [r.name for r in request_iterator]
        return greeter_pb2.HelloReply(message="hello " + ",".join(names), caller=_caller(context))

    def Chat(self, request_iterator: Any, context: Any) -> Any:
        for r in request_iterator:
            yield greeter_pb2.HelloReply(message=f"hello {r.name}", caller=_caller(context))


class AioGreeter(greeter_pb2_grpc.GreeterServicer):
    async def SayHello(self, request: Any, context: Any) -> Any:
        return greeter_pb2.HelloReply(message=f"hello {request.name}", caller=_caller(context))

    async def SayHelloStream(self, request: Any, context: Any) -> Any:
        for i in range(3):
            yield greeter_pb2.HelloReply(message=f"hello {request.name} {i}", caller=_caller(context))

    async def CollectHellos(self, request_iterator: Any, context: Any) -> Any:
        names = [r.name async for r in request_iterator]
        return greeter_pb2.HelloReply(message="hello " + ",".join(names), caller=_caller(context))

    async def Chat(self, request_iterator: Any, context: Any) -> Any:
        async for r in request_iterator:
            yield greeter_pb2.HelloReply(message=f"hello {r.name}", caller=_caller(context))


@contextlib.contextmanager
def sync_server(
    source: meshid.Source,
    interceptor: grpc.ServerInterceptor | None,
    *,
    servicer: Any = None,
    require_client_certificate: bool = True,
    options: Sequence[tuple[str, Any]] = (),
    guarded: bool = False,
) -> Iterator[int]:
    """A greeter (``servicer``, default :class:`Greeter`) on 127.0.0.1 with meshid credentials;
    yields its port and always stops it."""
    if guarded:  # the interceptor attached by meshid.server instead
        assert isinstance(interceptor, meshid.AuthorizationInterceptor)
        server = meshid.server(interceptor, futures.ThreadPoolExecutor(max_workers=8), options=options)
    else:
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8), interceptors=[interceptor] if interceptor else [], options=options
        )
    greeter_pb2_grpc.add_GreeterServicer_to_server(servicer or Greeter(), server)
    creds = meshid.server_credentials(source, require_client_certificate=require_client_certificate)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        yield port
    finally:
        server.stop(None).wait()


@contextlib.asynccontextmanager
async def aio_server(
    source: meshid.Source, interceptor: grpc.aio.ServerInterceptor | None, *, guarded: bool = False
) -> AsyncIterator[int]:
    """A grpc.aio Greeter server on a free loopback port, always stopped; ``interceptor`` is
    passed as an interceptor, or with ``guarded`` to :func:`meshid.aio.server` instead."""
    if guarded:
        assert isinstance(interceptor, meshid.aio.AuthorizationInterceptor)
        server = meshid.aio.server(interceptor)
    else:
        server = grpc.aio.server(interceptors=[interceptor] if interceptor else [])
    greeter_pb2_grpc.add_GreeterServicer_to_server(AioGreeter(), server)
    port = server.add_secure_port("127.0.0.1:0", meshid.server_credentials(source))
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


def tls_channel(
    port: int,
    bundles: meshid.BundleSet,
    call_credentials: grpc.CallCredentials | None = None,
    *,
    server_id: str = SERVER_ID,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A TLS channel to 127.0.0.1:``port`` that presents no client certificate (what is left
    after a TLS-terminating hop): the server is verified against example.org's roots in
    ``bundles`` and pinned to ``server_id``'s identity name; ``call_credentials`` (such as
    :func:`meshid.jwt_call_credentials`) ride on each call."""
    creds = grpc.ssl_channel_credentials(bundles[meshid.TrustDomain.parse(TD)].to_pem())
    if call_credentials is not None:
        creds = grpc.composite_channel_credentials(creds, call_credentials)
    pin = ("grpc.ssl_target_name_override", meshid.identity_dns_name(meshid.SpiffeId.parse(server_id)))
    return grpc.secure_channel(f"127.0.0.1:{port}", creds, options=[pin, *options])


def hello(name: str = "world") -> Any:
    return greeter_pb2.HelloRequest(name=name)


def stub(channel: Any) -> Any:
    return greeter_pb2_grpc.GreeterStub(channel)


def forge(
    authority: Any,
    *,
    uris: list[str],
    ca: bool = False,
    key_cert_sign: bool = False,
    digital_signature: bool = True,
    not_before: Any = None,
    not_after: Any = None,
    subject_cn: str = "forged",
    self_signed: bool = False,
) -> meshid.X509Svid | tuple[Any, Any]:
    """A certificate meshid's CA would never issue, for refusal tests.

    Signed by ``authority``'s key (or self-signed). Returns an X509Svid when the result passes
    the SVID rules, else the raw ``(chain, key)`` pair.
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    issuer_cert = None if self_signed else authority.certificate
    signing_key = key if self_signed else authority.private_key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if self_signed else issuer_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after or now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=digital_signature,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=key_cert_sign,
                crl_sign=key_cert_sign,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    )
    if not self_signed:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()), critical=False
        )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=False
        )
    cert = builder.sign(signing_key, hashes.SHA256())
    chain = [cert]
    try:
        return meshid.X509Svid.from_parts(chain, key)
    except meshid.InvalidSvidError:
        return chain, key


class RawSource:
    """A source handing out a raw (chain, key) pair that is not a valid SVID, for refusal tests."""

    def __init__(self, chain: Any, key: Any, bundles: meshid.BundleSet) -> None:
        from cryptography.hazmat.primitives import serialization

        chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        self._svid = _Raw(chain_pem, key_pem)
        self._bundles = bundles

    def get_svid(self) -> Any:
        return self._svid

    def get_bundles(self) -> meshid.BundleSet:
        return self._bundles

    def subscribe(self, callback: Any) -> Any:
        return lambda: None


class _Raw:
    def __init__(self, chain_pem: bytes, key_pem: bytes) -> None:
        self._chain, self._key = chain_pem, key_pem

    def chain_pem(self) -> bytes:
        return self._chain

    def key_pem(self) -> bytes:
        return self._key


def handshake_failed(code: str, details: str) -> bool:
    """Whether a call failed because a *listening* server refused the TLS handshake: grpc says
    UNAVAILABLE for that and for a dead server alike, but a dead one refuses the connection."""
    return code == "UNAVAILABLE" and "failed to connect to all addresses" in details and "Connection refused" not in details


def call(channel: Any, metadata: Any = None) -> tuple[str, str]:
    """One SayHello: ("OK", caller) or (status code name, details)."""
    try:
        reply = stub(channel).SayHello(hello(), metadata=metadata, timeout=10)
    except grpc.RpcError as err:
        return err.code().name, err.details() or ""
    return "OK", reply.caller


def stop_process(proc: subprocess.Popen[str], timeout: float = 15) -> tuple[int, str, str]:
    """Stop a process a test started: SIGTERM (if it still runs), then up to ``timeout`` seconds
    for it to exit, then SIGKILL. Its exit code, stdout and stderr ("" for a stream not piped)."""
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out or "", err or ""


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``meshid ARGS...`` as a real process (60 s at most); ``env`` is the whole environment,
    by default this one with grpc's own logging kept to errors, so stderr holds what meshid says."""
    import os
    import sys

    return subprocess.run(
        [sys.executable, "-m", "meshid.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "GRPC_VERBOSITY": "ERROR"} if env is None else env,
    )


def assert_refused(result: subprocess.CompletedProcess[str], *words: str) -> None:
    """Exit code 2 and one line on stderr, never a traceback."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("meshid: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def require_program(name: str, *fallbacks: str) -> str:
    """The path of an outside program a test runs. Missing: skip, unless MESHID_REQUIRE_INTEROP=1
    (set by .ci/run, which installs them) makes it a failure, so CI never passes by skipping."""
    import os
    import shutil

    import pytest

    found = shutil.which(name) or next((f for f in fallbacks if os.path.exists(f)), None)
    if found is None:
        message = f"{name} is not installed; .ci/run installs it with apt-get"
        if os.environ.get("MESHID_REQUIRE_INTEROP") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return found


def eventually(predicate: Callable[[], object], timeout: float, what: str, *, interval: float = 0.02) -> object:
    """Poll ``predicate`` until it returns something truthy (returned), or fail after ``timeout``
    seconds saying ``what`` was awaited. The one way tests wait: never sleep-then-assert."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    """A loopback port that was free a moment ago, for an outside program to listen on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def nginx_process(run: Path, port: int, nginx: str | None = None) -> Iterator[subprocess.Popen[str]]:
    """nginx in the foreground with prefix ``run`` and config ``run/nginx.conf``; entered once it
    accepts connections on loopback ``port`` and has written its pid file; always stopped.

    ``nginx`` is the program (default: found by :func:`require_program`, or the test skips).
    """
    nginx = nginx or require_program("nginx", "/usr/sbin/nginx")
    proc = subprocess.Popen(
        [nginx, "-p", str(run), "-c", str(run / "nginx.conf"), "-g", "daemon off;"], stderr=subprocess.PIPE, text=True
    )

    def up() -> bool:
        if proc.poll() is not None:  # what it said: on stderr before it opened its error log, then there
            assert proc.stderr is not None
            log = (run / "error.log").read_text() if (run / "error.log").exists() else ""
            raise AssertionError(f"nginx exited: {proc.stderr.read()}{log}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except OSError:
            return False
        return (run / "nginx.pid").exists()

    try:
        eventually(up, 10, "nginx to listen")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


@contextlib.contextmanager
def aio_server_in_a_thread(
    source: meshid.Source, interceptor: grpc.aio.ServerInterceptor | None, *, guarded: bool = False
) -> Iterator[int]:
    """:func:`aio_server` on an event loop of its own thread, so sync clients and the same test
    bodies as :func:`sync_server` can exercise the aio interceptor; always stopped."""
    started: concurrent.futures.Future[tuple[int, asyncio.Event, asyncio.AbstractEventLoop]] = concurrent.futures.Future()

    async def serve() -> None:
        try:
            async with aio_server(source, interceptor, guarded=guarded) as port:
                stop = asyncio.Event()
                started.set_result((port, stop, asyncio.get_running_loop()))
                await stop.wait()
        except BaseException as err:
            if not started.done():
                started.set_exception(err)
            raise

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="test-aio-server")
    thread.start()
    try:
        port, stop, loop = started.result(timeout=30)
        yield port
    finally:
        if started.done() and started.exception() is None:
            loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=30)


def grpclib_context(svid: meshid.X509Svid, bundles: meshid.BundleSet, folder: Path) -> ssl.SSLContext:
    """A Python ``ssl`` client context presenting ``svid`` (for grpclib, an independent gRPC stack)."""
    cert, key = folder / f"{svid.serial:x}.pem", folder / f"{svid.serial:x}.key"
    cert.write_bytes(svid.chain_pem())
    key.write_bytes(svid.key_pem())
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=bundles.all_roots_pem().decode())
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2"])
    return ctx


def grpclib_say_hello(port: int, ctx: ssl.SSLContext) -> tuple[str, str]:
    """One SayHello from grpclib: ("OK", caller) or (status name, message)."""
    from grpclib.client import Channel
    from grpclib.config import Configuration
    from grpclib.const import Cardinality
    from grpclib.exceptions import GRPCError

    async def run() -> tuple[str, str]:
        # grpclib checks the server's name like grpcio: pin the greeter's identity DNS name.
        pin = Configuration(ssl_target_name_override=meshid.identity_dns_name(meshid.SpiffeId.parse(SERVER_ID)))
        channel = Channel("127.0.0.1", port, ssl=ctx, config=pin)
        try:
            async with channel.request(
                SAY_HELLO, Cardinality.UNARY_UNARY, greeter_pb2.HelloRequest, greeter_pb2.HelloReply
            ) as stream:
                await stream.send_message(greeter_pb2.HelloRequest(name="grpclib"), end=True)
                reply = await stream.recv_message()
                await stream.recv_trailing_metadata()
            return "OK", reply.caller if reply is not None else ""
        except GRPCError as err:
            return err.status.name, err.message or ""
        finally:
            channel.close()

    return asyncio.run(run())


def signal_another_thread(pid: int, signum: int) -> int:
    """Send ``signum`` to one thread of process ``pid`` other than its main one (tgkill(2), through
    glibc's wrapper): where the kernel may deliver a process's signal when the main thread does not
    take it first. Returns the thread's id."""
    import ctypes
    import os

    others = [int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid]
    assert others, f"process {pid} runs no thread besides its main one"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.tgkill(pid, others[-1], signum) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return others[-1]

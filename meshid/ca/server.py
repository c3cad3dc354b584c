"""``meshid ca serve``: the issuer and registration services on one mTLS port.

The CA presents an SVID for ``spiffe://<td>/meshid/ca`` (issued by itself, refreshed while it
runs) and guards every call with meshid's own interceptor and this policy: the admin SVID may
call Registration; workloads of the trust domain may call Issuer; node agents
(``spiffe://<td>/meshid/agent/*``) may call Agent. First issuance, node attestation, the bundle
and the CRL are open to callers without an SVID (see :mod:`meshid.ca.bootstrap` for how one
port serves both).
"""

from __future__ import annotations

import datetime
import logging
import os
import pathlib
import threading
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from meshid._grpc import ServerConfigs
from meshid._listen import NO_REUSEPORT, parse_address, refuse_tcp_in_use
from meshid._proto import agent_pb2_grpc, issuer_pb2_grpc, registration_pb2_grpc
from meshid.authz.policy import AuthorizationPolicy
from meshid.bundle import BundleSet
from meshid.ca.agents import AgentService
from meshid.ca.authority import Authority, generate_key
from meshid.ca.bootstrap import anonymous_root_pem
from meshid.ca.datadir import (
    load_authority,
    load_jwt_keys,
    load_pq_authority,
    load_retired_authorities,
    load_x509pop,
    open_service,
    refresh_admin_svid,
    retire_due_jwt_keys,
    retire_due_roots,
)
from meshid.ca.grpc_api import AgentServicer, IssuerServicer, RegistrationServicer
from meshid.ca.http import RevocationHttpServer
from meshid.ca.issuing import AGENT_PREFIX, IssuingService, admin_id, ca_id
from meshid.clock import SYSTEM_CLOCK, Clock
from meshid.errors import DataDirError, ListenError, MeshIdError
from meshid.guard import server as guarded_server
from meshid.interceptors import AuthorizationInterceptor
from meshid.sources import StaticSource
from meshid.spiffeid import SpiffeId
from meshid.svid import X509Svid

__all__ = ["CaServer"]

log = logging.getLogger("meshid.ca")

ISSUER = "/meshid.v1.Issuer/"
AGENT = "/meshid.v1.Agent/"
HEALTH = "/grpc.health.v1.Health/"
OPEN_METHODS = (
    f"{ISSUER}IssueWithToken",
    f"{ISSUER}GetBundle",
    f"{ISSUER}GetCrl",
    f"{AGENT}GetAttestationChallenge",  # costs no memory: see meshid.ca.x509pop.Challenges
    f"{AGENT}AttestAgent",
    f"{HEALTH}Check",  # not Watch: a stream per anonymous caller would be a cheap way to tie the CA up
)
#: Requests larger than this are refused by grpc before any handler runs (a CSR is at most 16 KiB).
MAX_REQUEST_BYTES = 64 * 1024
#: Calls beyond this many at once are refused with RESOURCE_EXHAUSTED rather than queued.
MAX_CONCURRENT_RPCS = 512
#: The files of the data folder whose change makes a running CA reload it.
_WATCHED = ("ca.key", "ca.pem", "bundle.pem", "config.json", "ml-dsa-65/ca.key", "ml-dsa-65/ca.pem", "jwt-keys.json")
#: The health-check service name of the OCSP responder (with ``ca serve --ocsp-listen``).
OCSP_HEALTH = "meshid.ocsp"


def ca_policy(service: IssuingService) -> AuthorizationPolicy:
    return AuthorizationPolicy.from_dict(
        {
            "name": "meshid-ca",
            "allow": [
                {
                    "name": "admins",
                    "methods": ["/meshid.v1.Registration/*"],
                    "spiffe_ids": [str(admin_id(service.authority))],
                },
                {
                    "name": "workloads",
                    "methods": [f"{ISSUER}*", f"{HEALTH}*"],
                    "trust_domains": [service.authority.trust_domain.name],
                },
                {
                    "name": "node-agents",
                    "methods": [
                        f"{AGENT}RenewAgent",
                        f"{AGENT}SyncEntries",
                        f"{AGENT}BatchNewX509Svid",
                        f"{AGENT}BatchNewJwtSvid",
                    ],
                    "spiffe_id_patterns": [f"spiffe://{service.authority.trust_domain.name}{AGENT_PREFIX}*"],
                },
            ],
        },
        origin="<meshid CA built-in policy>",
    )


class CaServer:
    """The CA's gRPC server over a data folder. ``start()`` binds and serves; ``stop()`` ends it.

    Raises:
        InvalidAddressError: ``listen`` is not ``HOST:PORT`` (port 0 to 65535) or ``unix:PATH``;
            checked before the data folder is opened.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        listen: str,
        *,
        max_workers: int = 16,
        poll_interval: float = 0.5,
        clock: Clock | None = None,
        datastore: str | None = None,
        ocsp_listen: str | None = None,
        ocsp_validity: datetime.timedelta | None = None,
    ) -> None:
        parse_address(listen, port_zero=True, unix=True)  # before the store is opened
        self._poll_interval = poll_interval
        self._ocsp_listen, self._ocsp_validity = ocsp_listen, ocsp_validity
        self._http: RevocationHttpServer | None = None
        self._retired: tuple[Authority, ...] = ()
        self.ocsp_port: int | None = None
        service_options: dict[str, Any] = {} if clock is None else {"clock": clock}
        self._data_dir = pathlib.Path(data_dir)
        self._listen = listen
        self._max_workers = max_workers
        self.service = open_service(data_dir, datastore, **service_options)
        try:
            if self.service.authority.post_quantum:
                raise DataDirError(
                    "CA serve: this CA signs with ML-DSA only, and grpcio (its API's transport) refuses ML-DSA "
                    "certificates in the handshake; serve a classical CA and add the ML-DSA CA beside it with "
                    "`meshid ca key add --key-type ml-dsa-65`"
                )
            x509pop = load_x509pop(data_dir, self.service.authority)
        except BaseException:
            self.service.store.close()
            raise
        self.agents = AgentService(self.service, x509pop=x509pop)
        self._source: StaticSource | None = None
        self._server: grpc.Server | None = None
        self._stop = threading.Event()
        self._lifecycle = threading.Lock()  # start() and stop() run in one thread at a time
        self._closed = False
        self._refresher: threading.Thread | None = None
        self.port: int | None = None
        self._clock = clock or SYSTEM_CLOCK  # the admin SVID is signed, and falls due, on the CA's clock
        self._admin_due = datetime.datetime.min.replace(tzinfo=datetime.UTC)
        self._healthy: bool | None = None

    def _own_svid(self) -> X509Svid:
        key = generate_key()
        chain = self.service.issue_internal(ca_id(self.service.authority), key.public_key())
        return X509Svid.from_parts(chain, key)

    def _bundles(self) -> BundleSet:
        return BundleSet.of(self.service.bundle())

    def start(self) -> int:
        """Bind ``listen`` and serve. Returns the bound port.

        Raises:
            StoreError, DataDirError: the store or data folder is unusable.
            ListenError: the address is in use by another process, or cannot be bound; checked
                before anything is signed or written.
        """
        with self._lifecycle:
            if self._closed:
                raise DataDirError("CA: this server was stopped and its store closed; make a new CaServer")
            return self._start()

    def _start(self) -> int:
        refuse_tcp_in_use(
            self._listen, who="CA", hint=" (another `meshid ca serve`?); stop it or choose another --listen address"
        )
        self.service.publish_jwt_keys()  # every CA on the store carries this one's JWT keys
        self._source = StaticSource(self._own_svid(), self._bundles())
        self._admin_due = refresh_admin_svid(self.service, self._data_dir / "admin")
        interceptor = AuthorizationInterceptor(
            ca_policy(self.service), source=self._source, unauthenticated_methods=OPEN_METHODS
        )
        interceptor.set_revocation_check(lambda peer: self.service.is_revoked(peer.serial))
        # guarded as handlers are registered (meshid.server): no interceptor runs per call
        server = guarded_server(
            interceptor,
            futures.ThreadPoolExecutor(max_workers=self._max_workers, thread_name_prefix="meshid-ca"),
            maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
            options=[
                ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                ("grpc.max_send_message_length", 4 * 1024 * 1024),
                # Without it grpc sets SO_REUSEPORT and a second CA on this port starts and
                # silently takes a share of the connections.
                NO_REUSEPORT,
            ],
        )
        issuer_pb2_grpc.add_IssuerServicer_to_server(IssuerServicer(self.service), server)  # type: ignore[no-untyped-call]
        registration_pb2_grpc.add_RegistrationServicer_to_server(  # type: ignore[no-untyped-call]
            RegistrationServicer(self.service, self.agents), server
        )
        agent_pb2_grpc.add_AgentServicer_to_server(AgentServicer(self.agents), server)  # type: ignore[no-untyped-call]
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self._check_health()
        # The TLS layer also admits the anonymous bootstrap client (see meshid.ca.bootstrap);
        # meshid's interceptor never trusts it.
        configs = ServerConfigs(self._source, extra_client_roots=anonymous_root_pem())
        creds = grpc.dynamic_ssl_server_credentials(
            configs.current(), configs.fetch, require_client_authentication=True
        )
        try:
            port = server.add_secure_port(self._listen, creds)
        except RuntimeError as err:  # in use since the probe, or not an address grpc can bind
            raise ListenError(f"CA: cannot listen on {self._listen}: {err}") from err
        server.start()
        self._server, self.port = server, port
        if self._ocsp_listen is not None:
            try:
                self.ocsp_port = self._start_http(self._ocsp_listen)
            except BaseException:
                server.stop(None).wait()
                self._server = None
                raise
            self._check_health()
        self._stop.clear()
        self._refresher = threading.Thread(target=self._refresh_loop, name="meshid-ca-refresh", daemon=True)
        self._refresher.start()
        # DEBUG: `meshid ca serve` announces itself on stdout, with the port bound.
        log.debug("CA: serving trust domain %s on %s", self.service.authority.trust_domain, self._address())
        return port

    def _address(self) -> str:
        """Where it listens, with the port it was given (``--listen HOST:0`` picks one)."""
        return f"{self._listen.rsplit(':', 1)[0]}:{self.port}"

    def _start_http(self, listen: str) -> int:
        """The OCSP responder and the CRL over HTTP (see :mod:`meshid.ca.http`).

        Each OCSP answer reads the serial's record from the store: a revocation, made by this
        replica or another on the same database, shows in the next answer.
        """
        from meshid.ca.ocsp import DEFAULT_VALIDITY, OcspResponder
        from meshid.metrics import OCSP_RESPONSES, OCSP_SECONDS

        self._retired = load_retired_authorities(self._data_dir)
        responder = OcspResponder(
            lambda: self.service.authority,
            self.service.store.get_issued,
            previous=lambda: self._retired,
            validity=self._ocsp_validity or DEFAULT_VALIDITY,
            now=self.service.now,
        )

        def observe(answer: Any, seconds: float) -> None:
            OCSP_RESPONSES.labels(answer.outcome).inc()
            OCSP_SECONDS.observe(seconds)

        self._http = RevocationHttpServer(listen, responder, lambda: self.service.crl()[0], observe=observe)
        port = self._http.start()
        log.info("CA: OCSP responder and CRL on http://%s", f"{listen.rsplit(':', 1)[0]}:{port}")
        return port

    def _stamp(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        # config.json: `ca config set`; ml-dsa-65/: `ca key add`, and that CA's rotation;
        # jwt-keys.json: a JWT key rotation
        for name in _WATCHED:
            try:
                st = (self._data_dir / name).stat()
            except OSError:
                out.append((0, 0, 0))
            else:
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(out)

    def _reload(self) -> None:
        """Pick up a CA key rotation or a bundle change made in the data folder."""
        assert self._source is not None
        try:
            authority, _ = load_authority(self._data_dir)
            jwt_keys = load_jwt_keys(self._data_dir)
        except MeshIdError as err:  # e.g. mid-way through `ca rotate activate`: retry on the next poll
            log.warning("CA: data folder changed but cannot be loaded yet: %s", err)
            return
        self.service.set_authority(authority)
        if jwt_keys is not None:
            self.service.set_jwt_keys(jwt_keys)
        try:
            self.service.set_pq_authority(load_pq_authority(self._data_dir))
        except MeshIdError as err:  # mid-way through its rotation: the one loaded before still signs
            log.warning("CA: the ML-DSA CA changed but cannot be loaded yet: %s", err)
        if self._http is not None:  # after a rotation, the old key still answers for its SVIDs
            self._retired = load_retired_authorities(self._data_dir)
        self._source.update(self._own_svid(), self._bundles())
        self._admin_due = refresh_admin_svid(self.service, self._data_dir / "admin")
        jwt = self.service.jwt_keys
        log.info(
            "CA: now signing with %s and JWT key %s; bundle holds %d root(s) and %d JWT key(s), sequence %s",
            authority.certificate.subject.rfc4514_string(),
            jwt.signing.kid if jwt is not None else "(none)",
            len(authority.roots),
            len(jwt.published) if jwt is not None else 0,
            self.service.bundle().sequence,
        )

    def _check_health(self) -> bool:
        """SERVING when the store answers and the signing key signs; NOT_SERVING otherwise."""
        try:
            self.service.store.check()
            self.service.authority.issue_svid(
                SpiffeId.from_parts(self.service.authority.trust_domain, "meshid", "probe")
            )
        except Exception as err:
            if self._healthy is not False:
                log.error("CA: not serving: %s", err)
            self._healthy = False
        else:
            if self._healthy is False:
                log.info("CA: serving again")
            self._healthy = True
        status = health_pb2.HealthCheckResponse.SERVING if self._healthy else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", "meshid.v1.Issuer", "meshid.v1.Registration", "meshid.v1.Agent"):
            self.health.set(service, status)
        if self._http is not None:  # the OCSP responder: the CA's health, and its listener alive
            serving = self._healthy and self._http.serving
            self.health.set(OCSP_HEALTH, status if serving else health_pb2.HealthCheckResponse.NOT_SERVING)
        return self._healthy

    def _refresh_loop(self) -> None:
        # Follow the data folder (key rotation, retirement of old roots) and re-issue the CA's
        # own SVID and the admin's at half their lifetime. Each due time is compared with the
        # clock it was set by: retirements with the machine's (`meshid ca rotate` writes them
        # from it), the SVIDs' with the CA's own (it signed them).
        stamp = self._stamp()
        while not self._stop.wait(self._poll_interval):
            assert self._source is not None
            try:
                self._check_health()
                retire_due_roots(self._data_dir)
                jwt = self.service.jwt_keys  # the file is read only when a key is due (RSA keys load slowly)
                machine_now = datetime.datetime.now(datetime.UTC)
                if jwt is not None and any(old.retire_after <= machine_now for old in jwt.retiring):
                    retire_due_jwt_keys(self._data_dir, machine_now)
                self.service.publish_jwt_keys(if_due=True)
                current = self._stamp()
                if current != stamp:
                    stamp = current
                    self._reload()
                    continue
                svid = self._source.get_svid()
                if self._clock.now() >= svid.not_before + (svid.not_after - svid.not_before) / 2:
                    self._source.update(self._own_svid(), self._bundles())
                if self._clock.now() >= self._admin_due:  # the admin SVID is capped by the max TTL: it may be due first
                    self._admin_due = refresh_admin_svid(self.service, self._data_dir / "admin")
            except Exception:
                log.exception("CA: background refresh failed; will retry")

    def wait(self) -> None:
        if self._server is not None:
            self._server.wait_for_termination()

    def stop(self, grace: float | None = 2.0) -> None:
        """Stop serving (calls in flight get ``grace`` seconds) and close the store. Safe from
        several threads at once (a signal's and the main one): each returns once it is stopped."""
        with self._lifecycle:
            self._stop.set()
            if self._http is not None:
                self._http.stop()
                self._http = None
            if self._server is not None:
                self._server.stop(grace).wait()
                self._server = None
                # DEBUG: `meshid ca serve` says on stdout when it stopped.
                log.debug(
                    "CA: stopped serving trust domain %s on %s", self.service.authority.trust_domain, self._address()
                )
            if self._refresher is not None:
                self._refresher.join()
                self._refresher = None
            if not self._closed:
                self._closed = True
                self.service.store.close()

    def __enter__(self) -> CaServer:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

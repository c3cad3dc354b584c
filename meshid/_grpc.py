"""What meshid's servers and channels share in their grpc setup: the message size limit, how
channel options are merged, and the server's certificate configuration that follows a source.
Internal: :mod:`meshid.credentials` is the public face."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from meshid.bundle import BundleSet
from meshid.sources import Source
from meshid.svid import X509Svid

__all__ = ["MAX_MESSAGE_BYTES", "ServerConfigs", "merge_options"]

#: Default message size limit for meshid's channels and servers (grpc's own default receive limit).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class ServerConfigs:
    """Turns the source's current state into a grpc certificate configuration, once per change.

    ``extra_client_roots`` are added to the roots the TLS layer accepts client certificates
    from, and never to the bundles meshid verifies peers against (the CA uses it; see
    :mod:`meshid.ca.bootstrap`).
    """

    def __init__(self, source: Source, *, extra_client_roots: bytes = b"") -> None:
        self._source = source
        self._extra_roots = extra_client_roots
        self._key: tuple[X509Svid, BundleSet] | None = None
        self._config: Any = None

    def current(self) -> Any:
        svid, bundles = self._source.get_svid(), self._source.get_bundles()
        key = (svid, bundles)
        if self._key is None or self._key[0] is not svid or self._key[1] is not bundles:
            self._config = grpc.ssl_server_certificate_configuration(
                [(svid.key_pem(), svid.chain_pem())], root_certificates=bundles.all_roots_pem() + self._extra_roots
            )
            self._key = key
            return self._config
        return None

    def fetch(self) -> Any:
        # grpc asks on every new handshake; None means "keep the current one".
        try:
            return self.current()
        except Exception:  # never let a failing source break the handshake path
            return None


def merge_options(ours: Sequence[tuple[str, Any]], theirs: Sequence[tuple[str, Any]] | None) -> list[tuple[str, Any]]:
    """Channel options: meshid's defaults and pins, then the caller's (which win on a clash, except pins)."""
    merged = {
        "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
        "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
    }
    merged.update(dict(theirs or ()))
    merged.update(dict(ours))  # a server_id pin is never overridden by a caller's option
    return list(merged.items())

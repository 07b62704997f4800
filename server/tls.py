"""TLS for the serving ports: certificate files that are read again when they change.

Rotation needs no restart: before each new connection's handshake the files' modification times
are compared with those last loaded, and changed files are loaded for that and later connections
(connections already open keep the certificate they started with). A half-written file during a
rotation is not fatal: the previous certificate stays in use and a warning is logged.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)


class TLSConfigError(ValueError):
    """The certificate files cannot be used; the message names the file and the problem."""


class CertificateFiles:
    def __init__(self, cert: str | os.PathLike, key: str | os.PathLike, client_ca: str | os.PathLike | None = None):
        self.cert, self.key = Path(cert), Path(key)
        self.client_ca = Path(client_ca) if client_ca else None
        self._lock = threading.Lock()
        self._stamp = self._stamps()
        self._pem = self._read()
        self._check(*self._pem)
        self._ssl_context = self._new_ssl_context()

    @property
    def requires_client_certificates(self) -> bool:
        return self.client_ca is not None

    def _paths(self) -> list[Path]:
        return [p for p in (self.cert, self.key, self.client_ca) if p is not None]

    def _stamps(self) -> tuple[Any, ...]:
        stamps = []
        for path in self._paths():
            try:
                st = os.stat(path)
            except OSError as err:
                raise TLSConfigError(f"TLS file {path} cannot be read: {err.strerror or err}") from None
            stamps.append((st.st_mtime_ns, st.st_size))
        return tuple(stamps)

    def _read(self) -> tuple[bytes, bytes, bytes | None]:
        def read(path: Path) -> bytes:
            try:
                return path.read_bytes()
            except OSError as err:
                raise TLSConfigError(f"TLS file {path} cannot be read: {err.strerror or err}") from None

        return read(self.cert), read(self.key), read(self.client_ca) if self.client_ca else None

    def _check(self, cert: bytes, key: bytes, ca: bytes | None) -> None:
        """Refuse files that would fail every handshake: a key that is not the certificate's, no PEM."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError) as err:
            raise TLSConfigError(f"--tls-cert {self.cert} and --tls-key {self.key} do not form a usable "
                                 f"certificate and private key ({err})") from None
        if ca is not None:
            try:
                context.load_verify_locations(cadata=ca.decode("ascii", "replace"))
            except (ssl.SSLError, ValueError) as err:
                raise TLSConfigError(f"--tls-client-ca {self.client_ca} holds no usable CA certificate "
                                     f"({err})") from None

    def _reload_if_changed(self) -> bool:
        """True when the files changed and were loaded."""
        try:
            stamp = self._stamps()
        except TLSConfigError as err:
            log.warning("TLS files not reloaded: %s", err)
            return False
        if stamp == self._stamp:
            return False
        with self._lock:
            if stamp == self._stamp:
                return False
            try:
                pem = self._read()
                self._check(*pem)
            except TLSConfigError as err:
                log.warning("TLS files changed but cannot be used yet; keeping the previous ones: %s", err)
                return False
            self._pem, self._stamp = pem, stamp
            self._ssl_context = self._new_ssl_context()
        log.info("TLS certificate reloaded", extra={"cert": str(self.cert)})
        return True

    # -- gRPC -----------------------------------------------------------------------------------

    def _grpc_configuration(self) -> Any:
        cert, key, ca = self._pem
        return grpc.ssl_server_certificate_configuration(((key, cert),), root_certificates=ca)

    def grpc_credentials(self) -> grpc.ServerCredentials:
        def fetch() -> Any:
            return self._grpc_configuration() if self._reload_if_changed() else None

        return grpc.dynamic_ssl_server_credentials(self._grpc_configuration(), fetch,
                                                   require_client_authentication=self.requires_client_certificates)

    # -- the HTTP port (uvicorn) ------------------------------------------------------------------

    def _new_ssl_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        if self.client_ca is not None:
            context.load_verify_locations(cadata=self._pem[2].decode("ascii", "replace"))
            context.verify_mode = ssl.CERT_REQUIRED
        context.set_alpn_protocols(["http/1.1"])
        context.sni_callback = self._sni_callback
        return context

    def ssl_context(self) -> ssl.SSLContext:
        """A server context whose handshakes switch to the newest certificate files."""
        return self._ssl_context

    def _sni_callback(self, connection: ssl.SSLObject, _server_name: str | None, context: ssl.SSLContext) -> None:
        self._reload_if_changed()
        if self._ssl_context is not context:
            connection.context = self._ssl_context

"""What a TLS connection tells about itself, as ``ssl.SSLSocket`` does: :class:`TLSInformation`, one definition
for the blocking :class:`~ktls.Stream` and the asyncio :class:`~ktls.asyncio.KTLSTransport` (whose
``get_extra_info`` answers from it too). A connection built from keys (another library's handshake) has no
OpenSSL object: it knows its version and cipher suite, and answers ``None`` for the rest."""

from __future__ import annotations

import ssl
from typing import Any

from .core.connection import ConnectionState
from .core.control import Role
from .engine import Engine

__all__ = ["TLSInformation"]


class TLSInformation(ConnectionState):
    """``ssl.SSLSocket``'s TLS information, and the kernel's part (:class:`~ktls.core.connection.ConnectionState`)."""

    _engine: Engine

    def version(self) -> str | None:
        sslobj = self._engine.ssl_object
        return self._connection.control.version.label if sslobj is None else sslobj.version()

    def cipher(self) -> tuple[str, str, int] | None:
        return self._engine.cipher()

    def shared_ciphers(self) -> list[tuple[str, str, int]] | None:
        sslobj = self._engine.ssl_object
        return sslobj.shared_ciphers() if sslobj is not None else None

    def compression(self) -> str | None:
        sslobj = self._engine.ssl_object
        return sslobj.compression() if sslobj is not None else None

    def getpeercert(self, binary_form: bool = False) -> Any:
        sslobj = self._engine.ssl_object
        return sslobj.getpeercert(binary_form) if sslobj is not None else None

    def selected_alpn_protocol(self) -> str | None:
        sslobj = self._engine.ssl_object
        return sslobj.selected_alpn_protocol() if sslobj is not None else None

    def get_channel_binding(self, cb_type: str = "tls-unique") -> bytes | None:
        sslobj = self._engine.ssl_object
        return sslobj.get_channel_binding(cb_type) if sslobj is not None else None

    @property
    def session(self) -> ssl.SSLSession | None:
        """The session, for a resumption (TLS 1.3: once the server's tickets arrived)."""
        sslobj = self._engine.ssl_object
        return sslobj.session if sslobj is not None else None

    @property
    def session_reused(self) -> bool:
        sslobj = self._engine.ssl_object
        return sslobj.session_reused if sslobj is not None else False

    @property
    def server_hostname(self) -> str | None:
        sslobj = self._engine.ssl_object
        return sslobj.server_hostname if sslobj is not None else None

    @property
    def server_side(self) -> bool:
        return self._connection.role is Role.SERVER

    @property
    def context(self) -> ssl.SSLContext | None:
        sslobj = self._engine.ssl_object
        return sslobj.context if sslobj is not None else None

    def pending(self) -> int:
        """Decrypted bytes waiting to be read."""
        return self._engine.pending()

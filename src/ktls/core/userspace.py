"""OpenSSL as the record layer, sans I/O: the directions the kernel did not take, and the deferred window.

After the handshake the same ``SSLObject`` (over its memory BIOs, :class:`ktls.core.handshake.Handshake`) keeps
working wherever the kernel does not: the whole connection on fallback (no ``tls`` ULP, a cipher or version
the kernel lacks), receive alone when the kernel took only the send key, and a TLS 1.3 client's reads before
its first application record (:meth:`ktls.core.connection.Connection.deferred_record`). :class:`UserspaceTLS`
is that record layer for both front ends: they move its ciphertext to and from the socket; what the
plaintext means for the connection (the peer's close_notify, a ragged EOF, the deferred window's end) is
told to the :class:`~ktls.core.connection.Connection` here, once.

Edge cases, each handled where named: OpenSSL's ``read`` returning ``b""`` for a close_notify it has only
received (:meth:`UserspaceTLS.read`); a TCP EOF without close_notify (:meth:`UserspaceTLS.read`, the
connection's ragged-EOF policy); our close_notify while the peer's has not arrived
(:meth:`UserspaceTLS.close_notify`).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import TypeVar

from .connection import Action, Connection
from .control import ReadClosed
from .handshake import Handshake

__all__ = ["UserspaceTLS"]

_T = TypeVar("_T", bytes, int)


class UserspaceTLS:
    """OpenSSL's record layer over memory BIOs for one connection (module docstring)."""

    def __init__(self, handshake: Handshake, connection: Connection) -> None:
        self._handshake = handshake
        self._sslobj = handshake.ssl_object
        self._connection = connection

    # -- receiving ----------------------------------------------------------------------------------------------

    def received(self, ciphertext: bytes) -> None:
        """Bytes read from the socket; ``b""`` is the peer's TCP EOF."""
        if ciphertext:
            self._handshake.incoming.write(ciphertext)
        else:
            self._handshake.incoming.write_eof()

    def read(self, size: int) -> bytes | None:
        """Up to ``size`` bytes of plaintext; ``b""`` once the read side ended (the connection knows why:
        close_notify, or a ragged EOF — :class:`~ktls.errors.RaggedEOF` unless suppressed); ``None`` when
        OpenSSL needs more ciphertext (:meth:`received`)."""
        return self._attempt(lambda: self._sslobj.read(size), b"")

    def read_into(self, buffer: memoryview) -> int | None:
        """:meth:`read` into ``buffer``: how many bytes; 0 at the end; ``None`` when more ciphertext is needed."""
        return self._attempt(lambda: int(self._sslobj.read(len(buffer), buffer)), 0)  # typeshed says bytes

    def _attempt(self, read: Callable[[], _T], end: _T) -> _T | None:
        try:
            data = read()
        except ssl.SSLWantReadError:
            return None
        except ssl.SSLZeroReturnError:
            self._connection.closed_by_peer()
            return end
        except ssl.SSLEOFError:
            self._connection.end_of_stream()  # a TCP EOF without close_notify: the ragged-EOF policy decides
            return end
        if not data:  # SSLObject.read returns b"" for a close_notify it has only received
            self._connection.closed_by_peer()
        return data

    @property
    def pending(self) -> int:
        """Decrypted bytes OpenSSL holds, not yet read."""
        return self._sslobj.pending()

    # -- the deferred window (a TLS 1.3 client before its first application record) ------------------------------

    def deferred_wanted(self) -> int:
        """How many bytes to read now: never past the current record (the kernel takes over at a record
        boundary)."""
        return self._handshake.bytes_needed()

    def deferred_received(self, data: bytes) -> list[Action]:
        """Bytes read in the deferred window (``b""``: the peer's TCP EOF, which ends the read side). Once a
        record is whole, the connection says what it meant (:meth:`Connection.deferred_record`)."""
        if not data:
            self._connection.end_of_stream()
            return [ReadClosed()]
        record = self._handshake.receive(data)
        if record is None:  # the record is not whole yet
            return []
        return self._connection.deferred_record(self._handshake, record)

    # -- sending ------------------------------------------------------------------------------------------------

    def encrypt(self, data: bytes | bytearray | memoryview) -> tuple[int, bytes]:
        """``data`` as records: how much OpenSSL took, and the ciphertext to send. ``ssl.SSLError`` propagates."""
        written = self._sslobj.write(data)
        return written, self._handshake.outgoing.read()

    def close_notify(self) -> bytes:
        """Our close_notify as ciphertext. OpenSSL writes it even though the peer's has not arrived yet (it then
        says ``SSLWantReadError``, which here means: done)."""
        try:
            self._sslobj.unwrap()
        except ssl.SSLError:
            pass
        return self._handshake.outgoing.read()

    def output(self) -> bytes:
        """What OpenSSL wrote on its own while reading: an alert, an answer to the peer's KeyUpdate."""
        outgoing = self._handshake.outgoing
        return outgoing.read() if outgoing.pending else b""

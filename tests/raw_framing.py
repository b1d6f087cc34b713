"""Record and handshake-message framing shared by the raw test clients (``raw_tls13``, ``raw_tls12``).

Written from RFC 8446 §5.1 / RFC 5246 §6.2.1 (records) and §4 / §7.4 (handshake messages); independent of
ktls. A subclass gets whole records in ``_record`` and whole handshake messages in ``_message``.
"""

from __future__ import annotations

import struct

from reference_tls import TLS12


def vector(width: int, data: bytes) -> bytes:
    """A TLS vector: ``width`` bytes of length, then the data."""
    return len(data).to_bytes(width, "big") + data


def extension(kind: int, data: bytes) -> bytes:
    return struct.pack("!H", kind) + vector(2, data)


def handshake_message(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + vector(3, body)


def record(content_type: int, payload: bytes, version: int = TLS12) -> bytes:
    return struct.pack("!BHH", content_type, version, len(payload)) + payload


class Framing:
    """Bytes from the peer, cut into records and handshake messages as they complete."""

    def __init__(self) -> None:
        self._buffer = b""
        self._handshake_bytes = b""

    def receive(self, data: bytes) -> None:
        """Bytes from the server: records are processed as they complete."""
        if not data:
            raise ConnectionError("the server closed the connection")
        self._buffer += data
        while len(self._buffer) >= 5:
            length = int.from_bytes(self._buffer[3:5], "big")
            if len(self._buffer) < 5 + length:
                return
            whole, self._buffer = self._buffer[: 5 + length], self._buffer[5 + length :]
            self._record(whole)

    def _handshake_fragment(self, fragment: bytes) -> None:
        """A handshake record's (plaintext) fragment: messages may span records or share one."""
        self._handshake_bytes += fragment
        while len(self._handshake_bytes) >= 4:
            length = int.from_bytes(self._handshake_bytes[1:4], "big")
            if len(self._handshake_bytes) < 4 + length:
                return
            message = self._handshake_bytes[: 4 + length]
            self._handshake_bytes = self._handshake_bytes[4 + length :]
            self._message(message)

    def _record(self, whole: bytes) -> None:
        raise NotImplementedError

    def _message(self, message: bytes) -> None:
        raise NotImplementedError

"""The hostile side of a connection: a raw TCP socket and the independent record layer (``reference_tls``).

It seals exactly the records it wants (forged, truncated, mistyped) and decrypts what our side answers. After
``Stream.from_keys``/``connect_with_keys`` its TLS 1.3 KeyUpdates derive the next key with an
HKDF-Expand-Label written here (``cryptography``'s HKDF), not ktls's.
"""

from __future__ import annotations

import dataclasses
import socket
import struct
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from ktls.constants import ContentType, HandshakeType
from reference_tls import TLS13, OpenedRecord, RecordProtection, split_records

__all__ = ["AES_GCM_128", "TIMEOUT", "Hostile", "hkdf_expand_label", "tls13_protection"]

AES_GCM_128 = 51  # include/uapi/linux/tls.h TLS_CIPHER_AES_GCM_128, the reference's cipher id
#: Every socket's timeout and every wait's bound: a hang fails the test instead of stalling the run.
TIMEOUT = 10.0


def hkdf_expand_label(secret: bytes, label: bytes, length: int) -> bytes:
    """RFC 8446 §7.1 with SHA-256, written here independently of ``ktls.tls.keyschedule``."""
    full = b"tls13 " + label
    info = struct.pack("!HB", length, len(full)) + full + b"\x00"
    return HKDFExpand(hashes.SHA256(), length, info).derive(secret)


def tls13_protection(secret: bytes) -> RecordProtection:
    """TLS_AES_128_GCM_SHA256's record protection from a traffic secret, at sequence number 0."""
    key, iv = hkdf_expand_label(secret, b"key", 16), hkdf_expand_label(secret, b"iv", 12)
    return RecordProtection(AES_GCM_128, TLS13, key, iv, 0)


@dataclasses.dataclass
class Hostile:
    """The peer: a raw socket, the record protection of each direction, and how its send key moves on."""

    sock: socket.socket
    out: RecordProtection  # hostile → ours: our receive key
    into: RecordProtection  # ours → hostile: our send key
    #: TLS 1.3 with keys chosen here: the peer's send secret (KeyUpdates derive from it independently).
    out_secret: bytes | None = None
    #: TLS 1.3 after a real handshake: the peer's next send key, from its own key log.
    next_out: Callable[[], RecordProtection] | None = None
    #: NewSessionTickets our side sends before anything else (a TLS 1.3 server after a real handshake).
    tickets: int = 0

    def seal(self, content_type: int, payload: bytes) -> bytes:
        return self.out.seal(content_type, payload)

    def send(self, content_type: int, payload: bytes) -> None:
        self.sock.sendall(self.seal(content_type, payload))

    def key_update(self, *, split: int = 0) -> bytes:
        """A KeyUpdate(update_not_requested) under the current key — in two records cut after ``split`` bytes
        when given (RFC 8446 §5.1 allows it) —; later records use the next key."""
        message = bytes([HandshakeType.KEY_UPDATE, 0, 0, 1, 0])
        if split:
            record = self.seal(ContentType.HANDSHAKE, message[:split]) + self.seal(
                ContentType.HANDSHAKE, message[split:]
            )
        else:
            record = self.seal(ContentType.HANDSHAKE, message)
        if self.out_secret is not None:
            self.out_secret = hkdf_expand_label(self.out_secret, b"traffic upd", 32)
            self.out = tls13_protection(self.out_secret)
        else:
            assert self.next_out is not None, "TLS 1.2 has no KeyUpdate"
            self.out = self.next_out()
        return record

    def read_records(self) -> list[OpenedRecord]:
        """Everything our side sent until its FIN (or a reset after it), decrypted independently."""
        data = bytearray()
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
        return [self.into.open(record) for record in split_records(bytes(data))]

"""An independent TLS record layer for checking the kernel on the wire.

Written from RFC 8446 §5.2-5.3 (TLS 1.3), RFC 5246 §6.2.3.3 + RFC 5288 §3 + RFC 6655 (TLS 1.2 AES-GCM/CCM)
and RFC 7905 §2 (ChaCha20-Poly1305 in TLS 1.2), RFC 8998 (SM4 in TLS 1.3) and RFC 6209 (ARIA-GCM in TLS 1.2),
with the ``cryptography`` package's AEADs and, for SM4-CCM and ARIA-GCM, which it lacks, reference_block_aeads.
SM4 in TLS 1.2 and ARIA are framed like AES-GCM (4-byte salt, 8-byte explicit nonce), as the kernel does. It shares no
code with ktls: nonces and additional data are built here from the RFCs, so a wrong struct layout, nonce or
sequence number in ktls shows up as an authentication failure or a mismatch here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM, ChaCha20Poly1305

from reference_block_aeads import SM4GCM, aria_gcm, sm4_ccm

TLS12 = 0x0303
TLS13 = 0x0304
APPLICATION_DATA = 23
TAG_SIZE = 16


class AEAD(Protocol):
    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None, /) -> bytes: ...

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None, /) -> bytes: ...


#: Kernel cipher id (include/uapi/linux/tls.h) → (AEAD factory, key size, "gcm-like" explicit nonce in TLS 1.2).
AEADS: dict[int, tuple[Callable[[bytes], AEAD], int, bool]] = {
    51: (AESGCM, 16, True),
    52: (AESGCM, 32, True),
    53: (AESCCM, 16, True),
    54: (ChaCha20Poly1305, 32, False),
    55: (SM4GCM, 16, True),
    56: (sm4_ccm, 16, True),
    57: (aria_gcm, 16, True),
    58: (aria_gcm, 32, True),
}


def xor_nonce(iv: bytes, seq: int) -> bytes:
    """RFC 8446 §5.3: the 64-bit sequence number, left-padded to the IV length, XORed with the IV."""
    padded = seq.to_bytes(len(iv), "big")
    return bytes(a ^ b for a, b in zip(iv, padded, strict=True))


@dataclasses.dataclass
class RecordProtection:
    """One direction's keys and sequence number, as a peer outside the kernel keeps them."""

    cipher_id: int
    version: int
    key: bytes
    #: TLS 1.3 / ChaCha20: the 12-byte write IV. TLS 1.2 GCM/CCM: the 4-byte implicit salt.
    iv: bytes
    seq: int
    #: TLS 1.2 GCM/CCM: explicit nonce of the next record sent (ignored when opening: read from the wire).
    explicit_nonce: int = 0

    def _aead(self) -> AEAD:
        factory, key_size, _ = AEADS[self.cipher_id]
        assert len(self.key) == key_size
        return factory(self.key)

    @property
    def has_explicit_nonce(self) -> bool:
        return self.version == TLS12 and AEADS[self.cipher_id][2]

    def seal(self, content_type: int, plaintext: bytes, padding: int = 0) -> bytes:
        """Encrypt one record and advance the sequence number."""
        aead = self._aead()
        if self.version == TLS13:
            inner = plaintext + bytes([content_type]) + bytes(padding)
            header = bytes([APPLICATION_DATA]) + TLS12.to_bytes(2, "big") + (len(inner) + TAG_SIZE).to_bytes(2, "big")
            body = aead.encrypt(xor_nonce(self.iv, self.seq), inner, header)
        else:
            aad = self.seq.to_bytes(8, "big") + bytes([content_type]) + TLS12.to_bytes(2, "big")
            aad += len(plaintext).to_bytes(2, "big")
            if self.has_explicit_nonce:
                explicit = self.explicit_nonce.to_bytes(8, "big")
                body = explicit + aead.encrypt(self.iv + explicit, plaintext, aad)
                self.explicit_nonce += 1
            else:
                body = aead.encrypt(xor_nonce(self.iv, self.seq), plaintext, aad)
            header = bytes([content_type]) + TLS12.to_bytes(2, "big") + len(body).to_bytes(2, "big")
        self.seq += 1
        return header + body

    def open(self, record: bytes) -> OpenedRecord:
        """Decrypt one whole record (header included) and advance the sequence number."""
        outer_type, version, length = record[0], int.from_bytes(record[1:3], "big"), int.from_bytes(record[3:5], "big")
        assert version == TLS12, f"legacy_record_version {version:#06x}"
        assert length == len(record) - 5
        body = record[5:]
        aead = self._aead()
        explicit: int | None = None
        if self.version == TLS13:
            assert outer_type == APPLICATION_DATA, "TLS 1.3 records are sent as application_data"
            inner = aead.decrypt(xor_nonce(self.iv, self.seq), body, record[:5])
            stripped = inner.rstrip(b"\0")
            content_type, plaintext = stripped[-1], stripped[:-1]
        else:
            content_type = outer_type
            plain_len = len(body) - TAG_SIZE - (8 if self.has_explicit_nonce else 0)
            aad = self.seq.to_bytes(8, "big") + bytes([content_type]) + TLS12.to_bytes(2, "big")
            aad += plain_len.to_bytes(2, "big")
            if self.has_explicit_nonce:
                explicit = int.from_bytes(body[:8], "big")
                plaintext = aead.decrypt(self.iv + body[:8], body[8:], aad)
            else:
                plaintext = aead.decrypt(xor_nonce(self.iv, self.seq), body, aad)
        opened = OpenedRecord(self.seq, content_type, plaintext, explicit)
        self.seq += 1
        return opened


@dataclasses.dataclass(frozen=True)
class OpenedRecord:
    seq: int
    content_type: int
    plaintext: bytes
    explicit_nonce: int | None


def split_records(data: bytes) -> list[bytes]:
    """Cut a byte stream into whole records (asserting it ends on a record boundary)."""
    records = []
    offset = 0
    while offset < len(data):
        assert len(data) - offset >= 5, "stream ends inside a record header"
        length = int.from_bytes(data[offset + 3 : offset + 5], "big")
        end = offset + 5 + length
        assert end <= len(data), "stream ends inside a record"
        records.append(data[offset:end])
        offset = end
    return records

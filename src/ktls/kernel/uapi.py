"""The kernel's TLS interface, as ``include/uapi/linux/tls.h`` declares it.

Every kernel AEAD is one row of :data:`CIPHERS`; every ``struct tls12_crypto_info_*`` is the same shape::

    struct tls_crypto_info {
            __u16 version;
            __u16 cipher_type;
    };

    struct tls12_crypto_info_aes_gcm_128 {          /* and _aes_gcm_256, _aes_ccm_128, _chacha20_poly1305, */
            struct tls_crypto_info info;            /* _sm4_gcm, _sm4_ccm, _aria_gcm_128, _aria_gcm_256    */
            unsigned char iv[TLS_CIPHER_AES_GCM_128_IV_SIZE];
            unsigned char key[TLS_CIPHER_AES_GCM_128_KEY_SIZE];
            unsigned char salt[TLS_CIPHER_AES_GCM_128_SALT_SIZE];
            unsigned char rec_seq[TLS_CIPHER_AES_GCM_128_REC_SEQ_SIZE];
    };

The struct is not packed, but every member after the two ``__u16`` is a byte array, so there is no padding:
its size is ``4 + iv + key + salt + rec_seq``. The ``__u16`` fields are in host byte order; ``rec_seq`` is
big-endian (the kernel increments it from its last byte).

What the fields mean depends on the TLS version (this is where libraries get nonces wrong):

* TLS 1.3, and ChaCha20-Poly1305 in TLS 1.2 (RFC 7905): the per-record nonce is the 12-byte static
  ``write_iv`` XOR the 64-bit sequence number (RFC 8446 §5.3). The kernel keeps ``write_iv`` as
  ``salt || iv``: for the GCM/CCM ciphers ``salt`` is its first 4 bytes and ``iv`` the last 8; ChaCha20 has
  no salt and a 12-byte ``iv``.
* TLS 1.2 AES-GCM/CCM (RFC 5288, RFC 6655) and the SM4/ARIA GCM ciphers: the nonce is ``salt`` (the 4-byte
  implicit part from the key block) followed by an 8-byte explicit part sent in front of each record.
  ``iv`` is the explicit part of the *next* record; the kernel sends it and increments it per record,
  independently of ``rec_seq``.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
import sys
from collections.abc import Mapping
from types import MappingProxyType

from ..constants import TLSVersion

__all__ = [
    "CIPHERS",
    "SOL_TLS",
    "TCP_ULP",
    "TLS_GET_RECORD_TYPE",
    "TLS_RX",
    "TLS_RX_EXPECT_NO_PAD",
    "TLS_SET_RECORD_TYPE",
    "TLS_TX",
    "TLS_TX_MAX_PAYLOAD_LEN",
    "TLS_TX_ZEROCOPY_RO",
    "CipherType",
    "CryptoInfo",
    "Direction",
    "KernelCipher",
]

# <linux/socket.h>, <linux/tcp.h>: Python's socket module does not export these.
SOL_TLS = 282
TCP_ULP = 31

# TLS socket options (SOL_TLS level).
TLS_TX = 1  #: set transmit parameters
TLS_RX = 2  #: set receive parameters
TLS_TX_ZEROCOPY_RO = 3  #: TX zerocopy for sendfile; only device offload uses it (Linux 5.19)
TLS_RX_EXPECT_NO_PAD = 4  #: TLS 1.3 RX: expect no padding, decrypt in place (Linux 6.0)
TLS_TX_MAX_PAYLOAD_LEN = 5  #: largest plaintext per record sent, RFC 8449 record_size_limit (late 2025)

# Control message types (SOL_TLS level cmsg).
TLS_SET_RECORD_TYPE = 1  #: sendmsg: content type of the record being sent
TLS_GET_RECORD_TYPE = 2  #: recvmsg: content type of the record received

#: struct tls_crypto_info: version, cipher_type — host byte order, no padding.
_INFO_HEADER = struct.Struct("=HH")
_REC_SEQ_SIZE = 8


class Direction(enum.IntEnum):
    """Which half of the connection a key is for, named as the kernel names its socket options."""

    TX = TLS_TX
    RX = TLS_RX


class CipherType(enum.IntEnum):
    """``TLS_CIPHER_*``: the kernel's identifier of each AEAD."""

    AES_GCM_128 = 51
    AES_GCM_256 = 52
    AES_CCM_128 = 53
    CHACHA20_POLY1305 = 54
    SM4_GCM = 55
    SM4_CCM = 56
    ARIA_GCM_128 = 57
    ARIA_GCM_256 = 58


_BOTH = frozenset(TLSVersion)


@dataclasses.dataclass(frozen=True)
class KernelCipher:
    """One kernel AEAD: the sizes of its crypto-info fields and what the kernel accepts it for."""

    cipher_type: CipherType
    key_size: int
    iv_size: int
    salt_size: int
    tag_size: int
    #: TLS versions ``setsockopt(TLS_TX/TLS_RX)`` accepts this cipher for.
    versions: frozenset[TLSVersion]
    #: First mainline kernel with this cipher (TX, RX and TLS 1.3 may have come later for AES-GCM-128).
    since: tuple[int, int]

    @property
    def name(self) -> str:
        return self.cipher_type.name

    @property
    def rec_seq_size(self) -> int:
        return _REC_SEQ_SIZE

    @property
    def struct_size(self) -> int:
        """``sizeof(struct tls12_crypto_info_*)`` for this cipher."""
        return _INFO_HEADER.size + self.iv_size + self.key_size + self.salt_size + _REC_SEQ_SIZE

    @property
    def nonce_size(self) -> int:
        """Size of the AEAD nonce: ``salt || iv`` (12 bytes for every kernel cipher)."""
        return self.salt_size + self.iv_size

    def explicit_nonce_size(self, version: TLSVersion) -> int:
        """Bytes of per-record explicit nonce in front of the ciphertext (TLS 1.2 GCM/CCM only)."""
        if version is TLSVersion.TLS1_3 or self.salt_size == 0:
            return 0
        return self.iv_size


#: The kernel's AEADs, one row each, as in ``include/uapi/linux/tls.h`` (and ``net/tls/tls_main.c`` for
#: which TLS versions each is valid with: ARIA is TLS 1.2 only, RFC 6209).
CIPHERS: Mapping[CipherType, KernelCipher] = MappingProxyType(
    {
        c.cipher_type: c
        for c in (
            KernelCipher(CipherType.AES_GCM_128, 16, 8, 4, 16, _BOTH, (4, 13)),
            KernelCipher(CipherType.AES_GCM_256, 32, 8, 4, 16, _BOTH, (5, 1)),
            KernelCipher(CipherType.AES_CCM_128, 16, 8, 4, 16, _BOTH, (5, 2)),
            KernelCipher(CipherType.CHACHA20_POLY1305, 32, 12, 0, 16, _BOTH, (5, 11)),
            KernelCipher(CipherType.SM4_GCM, 16, 8, 4, 16, _BOTH, (5, 16)),
            KernelCipher(CipherType.SM4_CCM, 16, 8, 4, 16, _BOTH, (5, 16)),
            KernelCipher(CipherType.ARIA_GCM_128, 16, 8, 4, 16, frozenset({TLSVersion.TLS1_2}), (6, 1)),
            KernelCipher(CipherType.ARIA_GCM_256, 32, 8, 4, 16, frozenset({TLSVersion.TLS1_2}), (6, 1)),
        )
    }
)


@dataclasses.dataclass(frozen=True, repr=False)
class CryptoInfo:
    """The value of one ``struct tls12_crypto_info_*``: what ``setsockopt(SOL_TLS, TLS_TX/TLS_RX)`` takes.

    Build it with :meth:`tls13` or :meth:`tls12` from what the TLS handshake produced; :meth:`pack` gives the
    exact bytes; :meth:`unpack` reads back what ``getsockopt(SOL_TLS, TLS_TX/TLS_RX)`` returns. Its ``repr``
    never shows key material.
    """

    version: TLSVersion
    cipher_type: CipherType
    key: bytes
    #: The struct's ``iv`` field (see the module docstring for what it holds per version).
    iv: bytes
    salt: bytes
    #: Sequence number of the next record (64-bit, RFC 8446 §5.3, RFC 5246 §6.1).
    rec_seq: int

    def __post_init__(self) -> None:
        cipher = self.cipher
        for field, want in (("key", cipher.key_size), ("iv", cipher.iv_size), ("salt", cipher.salt_size)):
            got = len(getattr(self, field))
            if got != want:
                raise ValueError(f"{cipher.name} needs a {want}-byte {field}, got {got} bytes")
        if not 0 <= self.rec_seq < 2**64:
            raise ValueError(f"record sequence number out of range: {self.rec_seq}")

    @property
    def cipher(self) -> KernelCipher:
        return CIPHERS[self.cipher_type]

    @classmethod
    def tls13(cls, cipher_type: CipherType, key: bytes, iv: bytes, rec_seq: int = 0) -> CryptoInfo:
        """From a TLS 1.3 traffic key and 12-byte ``write_iv`` (RFC 8446 §7.3)."""
        cipher = CIPHERS[cipher_type]
        if len(iv) != cipher.nonce_size:
            raise ValueError(f"TLS 1.3 write_iv must be {cipher.nonce_size} bytes, got {len(iv)}")
        return cls(TLSVersion.TLS1_3, cipher_type, key, iv[cipher.salt_size :], iv[: cipher.salt_size], rec_seq)

    @classmethod
    def tls12(
        cls,
        cipher_type: CipherType,
        key: bytes,
        fixed_iv: bytes,
        rec_seq: int = 0,
        explicit_nonce: int | None = None,
    ) -> CryptoInfo:
        """From a TLS 1.2 key block: write key and fixed IV (4-byte implicit nonce for GCM/CCM, RFC 5288 §3;
        12 bytes for ChaCha20-Poly1305, RFC 7905 §2).

        ``explicit_nonce`` is the explicit nonce of the next record for GCM/CCM; by default the sequence
        number, which is what most TLS stacks send. A hand-off from a stack that counts from another start
        (OpenSSL's) passes its next value.
        """
        cipher = CIPHERS[cipher_type]
        if cipher.salt_size == 0:
            if explicit_nonce is not None:
                raise ValueError(f"{cipher.name} has no explicit nonce in TLS 1.2")
            return cls(TLSVersion.TLS1_2, cipher_type, key, fixed_iv, b"", rec_seq)
        nonce = rec_seq if explicit_nonce is None else explicit_nonce
        if not 0 <= nonce < 2 ** (8 * cipher.iv_size):
            raise ValueError(f"explicit nonce out of range: {nonce}")
        return cls(TLSVersion.TLS1_2, cipher_type, key, nonce.to_bytes(cipher.iv_size, "big"), fixed_iv, rec_seq)

    @property
    def write_iv(self) -> bytes:
        """TLS 1.3 (and TLS 1.2 ChaCha20) static IV: ``salt || iv``; XORed with the sequence number per record."""
        return self.salt + self.iv

    def pack(self) -> bytes:
        """The exact bytes of the ``struct tls12_crypto_info_*`` for this cipher."""
        return b"".join(
            (
                _INFO_HEADER.pack(self.version, self.cipher_type),
                self.iv,
                self.key,
                self.salt,
                self.rec_seq.to_bytes(_REC_SEQ_SIZE, "big"),
            )
        )

    @classmethod
    def unpack(cls, data: bytes) -> CryptoInfo:
        """Parse a ``struct tls12_crypto_info_*`` (e.g. as read back by ``getsockopt``)."""
        if len(data) < _INFO_HEADER.size:
            raise ValueError(f"crypto info too short: {len(data)} bytes")
        version, cipher_id = _INFO_HEADER.unpack_from(data)
        try:
            cipher = CIPHERS[CipherType(cipher_id)]
            tls_version = TLSVersion(version)
        except ValueError:
            raise ValueError(f"unknown TLS version {version:#06x} or cipher type {cipher_id}") from None
        if len(data) != cipher.struct_size:
            raise ValueError(f"{cipher.name} crypto info is {cipher.struct_size} bytes, got {len(data)}")
        offset = _INFO_HEADER.size
        fields = []
        for size in (cipher.iv_size, cipher.key_size, cipher.salt_size, _REC_SEQ_SIZE):
            fields.append(data[offset : offset + size])
            offset += size
        iv, key, salt, rec_seq = fields
        return cls(tls_version, cipher.cipher_type, key, iv, salt, int.from_bytes(rec_seq, "big"))

    def next_generation(self, key: bytes, iv: bytes) -> CryptoInfo:
        """The crypto info after a TLS 1.3 KeyUpdate: new key and IV, sequence number back to 0 (§4.6.3)."""
        if self.version is not TLSVersion.TLS1_3:
            raise ValueError("KeyUpdate exists only in TLS 1.3")
        return CryptoInfo.tls13(self.cipher_type, key, iv, 0)

    def __repr__(self) -> str:
        return f"CryptoInfo({self.version.label}, {self.cipher_type.name}, rec_seq={self.rec_seq})"


assert sys.byteorder in ("little", "big")  # "=HH" is host order, as the kernel's __u16 fields

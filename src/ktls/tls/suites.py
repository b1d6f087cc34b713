"""The TLS cipher suites whose record protection the kernel may carry: one table, one row per suite.

Theory of operation
-------------------
Kernel TLS does only record protection. Once the handshake is over, what is left of a cipher suite is

* its **AEAD** (algorithm, key size, tag size): the kernel must have it (:data:`ktls.kernel.uapi.CIPHERS`);
* its **hash**, which the key schedule uses to turn the secrets in the key log into keys and IVs
  (HKDF in TLS 1.3, the PRF in TLS 1.2);
* how its **nonce** is built, which depends on the TLS version and the AEAD:

  - TLS 1.3 (RFC 8446 §5.3): a 12-byte ``write_iv`` XOR the sequence number;
  - TLS 1.2 AES-GCM (RFC 5288 §3), AES-CCM (RFC 6655 §3) and ARIA-GCM (RFC 6209 §2): a 4-byte implicit
    ``salt`` from the key block followed by an 8-byte explicit nonce sent in front of each record;
  - TLS 1.2 ChaCha20-Poly1305 (RFC 7905 §2): like TLS 1.3, a 12-byte IV XOR the sequence number.

Key exchange and authentication (ECDHE-RSA, DHE, PSK, ...) are over by then, so every suite with a kernel
AEAD is in the table whatever its key exchange: the kernel cannot tell ``ECDHE-RSA-AES128-GCM-SHA256`` from
``PSK-AES128-GCM-SHA256``. Suites whose AEAD the kernel lacks (AES-256-CCM, the CCM_8 family with its 8-byte
tag) are in the table too, with the reason, so a fallback to userspace TLS can say *why* rather than
"unknown suite". CBC (MAC-then-encrypt) suites are not here: the kernel has no such cipher.

Names: ``openssl_name`` is what :meth:`ssl.SSLSocket.cipher` returns (``[0]``); TLS 1.3 suites have the same
name in OpenSSL and IANA. The rows were checked against ``openssl ciphers -stdname -V`` (OpenSSL 3.0), and
the tests check them again against the linked OpenSSL. Not in OpenSSL 3.0, hence not here: the RFC 8442
ECDHE-PSK AES-GCM/CCM suites (0xD001-0xD005). The RFC 8998 SM4 suites are here although mainline OpenSSL
cannot negotiate them (forks such as Tongsuo can); there are no IANA SM4 suites for TLS 1.2.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Literal

from ..constants import TLSVersion
from ..kernel.uapi import CIPHERS, CipherType, KernelCipher

__all__ = [
    "AEADS",
    "SUITES",
    "Aead",
    "CipherSuite",
    "HashName",
    "suite_by_code",
    "suite_by_name",
    "suite_by_openssl_name",
]

#: The hashes TLS suites with kernel AEADs use, spelled as :func:`hashlib.new` and :mod:`hmac` accept them.
HashName = Literal["sha256", "sha384", "sm3"]

_HASH_SIZE: Mapping[str, int] = MappingProxyType({"sha256": 32, "sha384": 48, "sm3": 32})

_TLS13_IV_SIZE = 12  # RFC 8446 §5.3: iv_length is max(8, N_MIN) = 12 for every AEAD TLS 1.3 defines
_SALT_SIZE = 4  # RFC 5288 §3 (and RFC 6655, RFC 6209): the implicit part of the GCM/CCM nonce
_EXPLICIT_NONCE_SIZE = 8  # ... and the explicit part, sent in front of each TLS 1.2 record


@dataclasses.dataclass(frozen=True)
class Aead:
    """One record-protection algorithm as TLS suites use it, and whether the kernel has it."""

    name: str
    key_size: int
    tag_size: int
    #: The kernel's cipher for it; ``None`` when the kernel has none (``unsupported_reason`` says why).
    cipher_type: CipherType | None
    #: TLS 1.2 ``fixed_iv_length`` (RFC 5246 §6.3): 4 for GCM/CCM (the salt), 12 for ChaCha20 (RFC 7905).
    tls12_fixed_iv_size: int
    unsupported_reason: str | None = None

    @property
    def tls12_explicit_nonce_size(self) -> int:
        """Bytes of explicit nonce in front of each TLS 1.2 record (8 for GCM/CCM, 0 for ChaCha20)."""
        return _EXPLICIT_NONCE_SIZE if self.tls12_fixed_iv_size == _SALT_SIZE else 0


# (name, key size, tag size, kernel cipher, TLS 1.2 fixed IV size). The kernel's only CCM is
# TLS_CIPHER_AES_CCM_128: 128-bit key, 16-byte tag (include/uapi/linux/tls.h).
_NO_CCM = "the kernel's only AES-CCM is AES-128-CCM with a 16-byte tag"
AES128_GCM = Aead("AES-128-GCM", 16, 16, CipherType.AES_GCM_128, _SALT_SIZE)
AES256_GCM = Aead("AES-256-GCM", 32, 16, CipherType.AES_GCM_256, _SALT_SIZE)
CHACHA20_POLY1305 = Aead("ChaCha20-Poly1305", 32, 16, CipherType.CHACHA20_POLY1305, 12)
AES128_CCM = Aead("AES-128-CCM", 16, 16, CipherType.AES_CCM_128, _SALT_SIZE)
AES256_CCM = Aead("AES-256-CCM", 32, 16, None, _SALT_SIZE, f"{_NO_CCM} (this one has a 256-bit key)")
AES128_CCM8 = Aead("AES-128-CCM-8", 16, 8, None, _SALT_SIZE, f"{_NO_CCM} (this one has an 8-byte tag)")
AES256_CCM8 = Aead("AES-256-CCM-8", 32, 8, None, _SALT_SIZE, f"{_NO_CCM} (this one: 256-bit key, 8-byte tag)")
ARIA128_GCM = Aead("ARIA-128-GCM", 16, 16, CipherType.ARIA_GCM_128, _SALT_SIZE)
ARIA256_GCM = Aead("ARIA-256-GCM", 32, 16, CipherType.ARIA_GCM_256, _SALT_SIZE)
SM4_GCM = Aead("SM4-GCM", 16, 16, CipherType.SM4_GCM, _SALT_SIZE)
SM4_CCM = Aead("SM4-CCM", 16, 16, CipherType.SM4_CCM, _SALT_SIZE)

#: Every AEAD of the table below, by name.
AEADS: Mapping[str, Aead] = MappingProxyType(
    {
        a.name: a
        for a in (
            AES128_GCM,
            AES256_GCM,
            CHACHA20_POLY1305,
            AES128_CCM,
            AES256_CCM,
            AES128_CCM8,
            AES256_CCM8,
            ARIA128_GCM,
            ARIA256_GCM,
            SM4_GCM,
            SM4_CCM,
        )
    }
)


@dataclasses.dataclass(frozen=True)
class CipherSuite:
    """One TLS cipher suite: its wire code point, its names, and what record protection needs of it."""

    #: IANA code point, e.g. ``0x1301`` (the two bytes on the wire, big-endian).
    code: int
    iana_name: str
    #: What ``ssl.SSLSocket.cipher()[0]`` returns for it.
    openssl_name: str
    version: TLSVersion
    aead: Aead
    hash_name: HashName

    @property
    def cipher_type(self) -> CipherType | None:
        """The kernel cipher of this suite's AEAD, or ``None`` when the kernel has none."""
        return self.aead.cipher_type

    @property
    def kernel_cipher(self) -> KernelCipher | None:
        """The kernel cipher, if the kernel accepts it for this suite's TLS version (else ``None``)."""
        if self.aead.cipher_type is None:
            return None
        cipher = CIPHERS[self.aead.cipher_type]
        return cipher if self.version in cipher.versions else None

    @property
    def unsupported_reason(self) -> str | None:
        """Why the kernel cannot carry this suite, in words; ``None`` when it can (given a recent kernel)."""
        if self.aead.unsupported_reason is not None:
            return f"{self.openssl_name}: {self.aead.unsupported_reason}"
        if self.kernel_cipher is None:
            return f"{self.openssl_name}: the kernel accepts {self.aead.name} only for other TLS versions"
        return None

    @property
    def key_size(self) -> int:
        return self.aead.key_size

    @property
    def tag_size(self) -> int:
        return self.aead.tag_size

    @property
    def fixed_iv_size(self) -> int:
        """IV bytes the key schedule derives per direction: TLS 1.3 ``iv_length`` (12); TLS 1.2
        ``fixed_iv_length`` (4-byte salt for GCM/CCM, 12 for ChaCha20)."""
        return _TLS13_IV_SIZE if self.version is TLSVersion.TLS1_3 else self.aead.tls12_fixed_iv_size

    @property
    def explicit_nonce_size(self) -> int:
        """Bytes of explicit nonce at the start of each record's body (TLS 1.2 GCM/CCM only)."""
        return 0 if self.version is TLSVersion.TLS1_3 else self.aead.tls12_explicit_nonce_size

    @property
    def hash_size(self) -> int:
        """Output size of the suite's hash: the size of its TLS 1.3 secrets."""
        return _HASH_SIZE[self.hash_name]


_V12, _V13 = TLSVersion.TLS1_2, TLSVersion.TLS1_3
_CHACHA = CHACHA20_POLY1305

#: Every suite, in code-point order. TLS 1.3 first (RFC 8446 §B.4, RFC 8998), then TLS 1.2 by family:
#: AES-GCM (RFC 5288, RFC 5289, RFC 5487), ARIA-GCM (RFC 6209), AES-CCM (RFC 6655, RFC 7251),
#: ChaCha20-Poly1305 (RFC 7905).
_ROWS: tuple[tuple[int, str, str, TLSVersion, Aead, HashName], ...] = (
    (0x00C6, "TLS_SM4_GCM_SM3", "TLS_SM4_GCM_SM3", _V13, SM4_GCM, "sm3"),
    (0x00C7, "TLS_SM4_CCM_SM3", "TLS_SM4_CCM_SM3", _V13, SM4_CCM, "sm3"),
    (0x1301, "TLS_AES_128_GCM_SHA256", "TLS_AES_128_GCM_SHA256", _V13, AES128_GCM, "sha256"),
    (0x1302, "TLS_AES_256_GCM_SHA384", "TLS_AES_256_GCM_SHA384", _V13, AES256_GCM, "sha384"),
    (0x1303, "TLS_CHACHA20_POLY1305_SHA256", "TLS_CHACHA20_POLY1305_SHA256", _V13, _CHACHA, "sha256"),
    (0x1304, "TLS_AES_128_CCM_SHA256", "TLS_AES_128_CCM_SHA256", _V13, AES128_CCM, "sha256"),
    (0x1305, "TLS_AES_128_CCM_8_SHA256", "TLS_AES_128_CCM_8_SHA256", _V13, AES128_CCM8, "sha256"),
    # TLS 1.2, AES-GCM.
    (0x009C, "TLS_RSA_WITH_AES_128_GCM_SHA256", "AES128-GCM-SHA256", _V12, AES128_GCM, "sha256"),
    (0x009D, "TLS_RSA_WITH_AES_256_GCM_SHA384", "AES256-GCM-SHA384", _V12, AES256_GCM, "sha384"),
    (0x009E, "TLS_DHE_RSA_WITH_AES_128_GCM_SHA256", "DHE-RSA-AES128-GCM-SHA256", _V12, AES128_GCM, "sha256"),
    (0x009F, "TLS_DHE_RSA_WITH_AES_256_GCM_SHA384", "DHE-RSA-AES256-GCM-SHA384", _V12, AES256_GCM, "sha384"),
    (0x00A2, "TLS_DHE_DSS_WITH_AES_128_GCM_SHA256", "DHE-DSS-AES128-GCM-SHA256", _V12, AES128_GCM, "sha256"),
    (0x00A3, "TLS_DHE_DSS_WITH_AES_256_GCM_SHA384", "DHE-DSS-AES256-GCM-SHA384", _V12, AES256_GCM, "sha384"),
    (0x00A6, "TLS_DH_anon_WITH_AES_128_GCM_SHA256", "ADH-AES128-GCM-SHA256", _V12, AES128_GCM, "sha256"),
    (0x00A7, "TLS_DH_anon_WITH_AES_256_GCM_SHA384", "ADH-AES256-GCM-SHA384", _V12, AES256_GCM, "sha384"),
    (0x00A8, "TLS_PSK_WITH_AES_128_GCM_SHA256", "PSK-AES128-GCM-SHA256", _V12, AES128_GCM, "sha256"),
    (0x00A9, "TLS_PSK_WITH_AES_256_GCM_SHA384", "PSK-AES256-GCM-SHA384", _V12, AES256_GCM, "sha384"),
    (0x00AA, "TLS_DHE_PSK_WITH_AES_128_GCM_SHA256", "DHE-PSK-AES128-GCM-SHA256", _V12, AES128_GCM, "sha256"),
    (0x00AB, "TLS_DHE_PSK_WITH_AES_256_GCM_SHA384", "DHE-PSK-AES256-GCM-SHA384", _V12, AES256_GCM, "sha384"),
    (0x00AC, "TLS_RSA_PSK_WITH_AES_128_GCM_SHA256", "RSA-PSK-AES128-GCM-SHA256", _V12, AES128_GCM, "sha256"),
    (0x00AD, "TLS_RSA_PSK_WITH_AES_256_GCM_SHA384", "RSA-PSK-AES256-GCM-SHA384", _V12, AES256_GCM, "sha384"),
    (0xC02B, "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "ECDHE-ECDSA-AES128-GCM-SHA256", _V12, AES128_GCM, "sha256"),
    (0xC02C, "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", "ECDHE-ECDSA-AES256-GCM-SHA384", _V12, AES256_GCM, "sha384"),
    (0xC02F, "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "ECDHE-RSA-AES128-GCM-SHA256", _V12, AES128_GCM, "sha256"),
    (0xC030, "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384", "ECDHE-RSA-AES256-GCM-SHA384", _V12, AES256_GCM, "sha384"),
    # TLS 1.2, ARIA-GCM (kernel ≥ 6.1, TLS 1.2 only).
    (0xC050, "TLS_RSA_WITH_ARIA_128_GCM_SHA256", "ARIA128-GCM-SHA256", _V12, ARIA128_GCM, "sha256"),
    (0xC051, "TLS_RSA_WITH_ARIA_256_GCM_SHA384", "ARIA256-GCM-SHA384", _V12, ARIA256_GCM, "sha384"),
    (0xC052, "TLS_DHE_RSA_WITH_ARIA_128_GCM_SHA256", "DHE-RSA-ARIA128-GCM-SHA256", _V12, ARIA128_GCM, "sha256"),
    (0xC053, "TLS_DHE_RSA_WITH_ARIA_256_GCM_SHA384", "DHE-RSA-ARIA256-GCM-SHA384", _V12, ARIA256_GCM, "sha384"),
    (0xC056, "TLS_DHE_DSS_WITH_ARIA_128_GCM_SHA256", "DHE-DSS-ARIA128-GCM-SHA256", _V12, ARIA128_GCM, "sha256"),
    (0xC057, "TLS_DHE_DSS_WITH_ARIA_256_GCM_SHA384", "DHE-DSS-ARIA256-GCM-SHA384", _V12, ARIA256_GCM, "sha384"),
    (0xC05C, "TLS_ECDHE_ECDSA_WITH_ARIA_128_GCM_SHA256", "ECDHE-ECDSA-ARIA128-GCM-SHA256", _V12, ARIA128_GCM, "sha256"),
    (0xC05D, "TLS_ECDHE_ECDSA_WITH_ARIA_256_GCM_SHA384", "ECDHE-ECDSA-ARIA256-GCM-SHA384", _V12, ARIA256_GCM, "sha384"),
    # OpenSSL drops "RSA" from these two names (ECDHE-ARIA…, not ECDHE-RSA-ARIA…).
    (0xC060, "TLS_ECDHE_RSA_WITH_ARIA_128_GCM_SHA256", "ECDHE-ARIA128-GCM-SHA256", _V12, ARIA128_GCM, "sha256"),
    (0xC061, "TLS_ECDHE_RSA_WITH_ARIA_256_GCM_SHA384", "ECDHE-ARIA256-GCM-SHA384", _V12, ARIA256_GCM, "sha384"),
    (0xC06A, "TLS_PSK_WITH_ARIA_128_GCM_SHA256", "PSK-ARIA128-GCM-SHA256", _V12, ARIA128_GCM, "sha256"),
    (0xC06B, "TLS_PSK_WITH_ARIA_256_GCM_SHA384", "PSK-ARIA256-GCM-SHA384", _V12, ARIA256_GCM, "sha384"),
    (0xC06C, "TLS_DHE_PSK_WITH_ARIA_128_GCM_SHA256", "DHE-PSK-ARIA128-GCM-SHA256", _V12, ARIA128_GCM, "sha256"),
    (0xC06D, "TLS_DHE_PSK_WITH_ARIA_256_GCM_SHA384", "DHE-PSK-ARIA256-GCM-SHA384", _V12, ARIA256_GCM, "sha384"),
    (0xC06E, "TLS_RSA_PSK_WITH_ARIA_128_GCM_SHA256", "RSA-PSK-ARIA128-GCM-SHA256", _V12, ARIA128_GCM, "sha256"),
    (0xC06F, "TLS_RSA_PSK_WITH_ARIA_256_GCM_SHA384", "RSA-PSK-ARIA256-GCM-SHA384", _V12, ARIA256_GCM, "sha384"),
    # TLS 1.2, AES-CCM. Every TLS 1.2 CCM suite uses the SHA-256 PRF (RFC 6655 §6, RFC 7251 §2).
    (0xC09C, "TLS_RSA_WITH_AES_128_CCM", "AES128-CCM", _V12, AES128_CCM, "sha256"),
    (0xC09D, "TLS_RSA_WITH_AES_256_CCM", "AES256-CCM", _V12, AES256_CCM, "sha256"),
    (0xC09E, "TLS_DHE_RSA_WITH_AES_128_CCM", "DHE-RSA-AES128-CCM", _V12, AES128_CCM, "sha256"),
    (0xC09F, "TLS_DHE_RSA_WITH_AES_256_CCM", "DHE-RSA-AES256-CCM", _V12, AES256_CCM, "sha256"),
    (0xC0A0, "TLS_RSA_WITH_AES_128_CCM_8", "AES128-CCM8", _V12, AES128_CCM8, "sha256"),
    (0xC0A1, "TLS_RSA_WITH_AES_256_CCM_8", "AES256-CCM8", _V12, AES256_CCM8, "sha256"),
    (0xC0A2, "TLS_DHE_RSA_WITH_AES_128_CCM_8", "DHE-RSA-AES128-CCM8", _V12, AES128_CCM8, "sha256"),
    (0xC0A3, "TLS_DHE_RSA_WITH_AES_256_CCM_8", "DHE-RSA-AES256-CCM8", _V12, AES256_CCM8, "sha256"),
    (0xC0A4, "TLS_PSK_WITH_AES_128_CCM", "PSK-AES128-CCM", _V12, AES128_CCM, "sha256"),
    (0xC0A5, "TLS_PSK_WITH_AES_256_CCM", "PSK-AES256-CCM", _V12, AES256_CCM, "sha256"),
    (0xC0A6, "TLS_DHE_PSK_WITH_AES_128_CCM", "DHE-PSK-AES128-CCM", _V12, AES128_CCM, "sha256"),
    (0xC0A7, "TLS_DHE_PSK_WITH_AES_256_CCM", "DHE-PSK-AES256-CCM", _V12, AES256_CCM, "sha256"),
    (0xC0A8, "TLS_PSK_WITH_AES_128_CCM_8", "PSK-AES128-CCM8", _V12, AES128_CCM8, "sha256"),
    (0xC0A9, "TLS_PSK_WITH_AES_256_CCM_8", "PSK-AES256-CCM8", _V12, AES256_CCM8, "sha256"),
    # IANA's spelling (RFC 6655): PSK_DHE, not DHE_PSK, for these two.
    (0xC0AA, "TLS_PSK_DHE_WITH_AES_128_CCM_8", "DHE-PSK-AES128-CCM8", _V12, AES128_CCM8, "sha256"),
    (0xC0AB, "TLS_PSK_DHE_WITH_AES_256_CCM_8", "DHE-PSK-AES256-CCM8", _V12, AES256_CCM8, "sha256"),
    (0xC0AC, "TLS_ECDHE_ECDSA_WITH_AES_128_CCM", "ECDHE-ECDSA-AES128-CCM", _V12, AES128_CCM, "sha256"),
    (0xC0AD, "TLS_ECDHE_ECDSA_WITH_AES_256_CCM", "ECDHE-ECDSA-AES256-CCM", _V12, AES256_CCM, "sha256"),
    (0xC0AE, "TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8", "ECDHE-ECDSA-AES128-CCM8", _V12, AES128_CCM8, "sha256"),
    (0xC0AF, "TLS_ECDHE_ECDSA_WITH_AES_256_CCM_8", "ECDHE-ECDSA-AES256-CCM8", _V12, AES256_CCM8, "sha256"),
    # TLS 1.2, ChaCha20-Poly1305 (RFC 7905): no explicit nonce, IV XOR sequence number as in TLS 1.3.
    (0xCCA8, "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256", "ECDHE-RSA-CHACHA20-POLY1305", _V12, _CHACHA, "sha256"),
    (0xCCA9, "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305", _V12, _CHACHA, "sha256"),
    (0xCCAA, "TLS_DHE_RSA_WITH_CHACHA20_POLY1305_SHA256", "DHE-RSA-CHACHA20-POLY1305", _V12, _CHACHA, "sha256"),
    (0xCCAB, "TLS_PSK_WITH_CHACHA20_POLY1305_SHA256", "PSK-CHACHA20-POLY1305", _V12, _CHACHA, "sha256"),
    (0xCCAC, "TLS_ECDHE_PSK_WITH_CHACHA20_POLY1305_SHA256", "ECDHE-PSK-CHACHA20-POLY1305", _V12, _CHACHA, "sha256"),
    (0xCCAD, "TLS_DHE_PSK_WITH_CHACHA20_POLY1305_SHA256", "DHE-PSK-CHACHA20-POLY1305", _V12, _CHACHA, "sha256"),
    (0xCCAE, "TLS_RSA_PSK_WITH_CHACHA20_POLY1305_SHA256", "RSA-PSK-CHACHA20-POLY1305", _V12, _CHACHA, "sha256"),
)
SUITES: tuple[CipherSuite, ...] = tuple(CipherSuite(*row) for row in _ROWS)

_BY_CODE: Mapping[int, CipherSuite] = MappingProxyType({s.code: s for s in SUITES})
_BY_OPENSSL_NAME: Mapping[str, CipherSuite] = MappingProxyType({s.openssl_name: s for s in SUITES})
_BY_IANA_NAME: Mapping[str, CipherSuite] = MappingProxyType({s.iana_name: s for s in SUITES})

# One row per code point and per name: a duplicate would make a lookup silently pick one.
assert len(_BY_CODE) == len(_BY_OPENSSL_NAME) == len(_BY_IANA_NAME) == len(SUITES)


def suite_by_code(code: int) -> CipherSuite | None:
    """The suite with this IANA code point (e.g. ``0xC02F``), or ``None`` if it is not in the table."""
    return _BY_CODE.get(code)


def suite_by_openssl_name(name: str) -> CipherSuite | None:
    """The suite ``ssl.SSLSocket.cipher()[0]`` names (e.g. ``"ECDHE-RSA-AES128-GCM-SHA256"``), or ``None``."""
    return _BY_OPENSSL_NAME.get(name)


def suite_by_name(name: str) -> CipherSuite | None:
    """The suite with this OpenSSL *or* IANA name, or ``None``."""
    return _BY_OPENSSL_NAME.get(name) or _BY_IANA_NAME.get(name)

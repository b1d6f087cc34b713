"""The cipher suite table: against the kernel's cipher table, the suite names, and the linked OpenSSL."""

from __future__ import annotations

import re
import shutil
import ssl
import subprocess

import pytest

from ktls.constants import TLSVersion
from ktls.kernel.uapi import CIPHERS, CipherType
from ktls.tls.suites import AEADS, SUITES, CipherSuite, suite_by_code, suite_by_name, suite_by_openssl_name

TLS13 = [s for s in SUITES if s.version is TLSVersion.TLS1_3]
TLS12 = [s for s in SUITES if s.version is TLSVersion.TLS1_2]


def _ids(suite: CipherSuite) -> str:
    return suite.openssl_name


def test_tls13_rows() -> None:
    """RFC 8446 §B.4 and RFC 8998 §2: seven suites; only CCM_8 lacks a kernel cipher."""
    assert {s.code: s.iana_name for s in TLS13} == {
        0x00C6: "TLS_SM4_GCM_SM3",
        0x00C7: "TLS_SM4_CCM_SM3",
        0x1301: "TLS_AES_128_GCM_SHA256",
        0x1302: "TLS_AES_256_GCM_SHA384",
        0x1303: "TLS_CHACHA20_POLY1305_SHA256",
        0x1304: "TLS_AES_128_CCM_SHA256",
        0x1305: "TLS_AES_128_CCM_8_SHA256",
    }
    assert [s.iana_name for s in TLS13 if s.kernel_cipher is None] == ["TLS_AES_128_CCM_8_SHA256"]
    for suite in TLS13:
        assert suite.openssl_name == suite.iana_name
        assert (suite.fixed_iv_size, suite.explicit_nonce_size) == (12, 0)


@pytest.mark.parametrize("suite", SUITES, ids=_ids)
def test_row_agrees_with_its_iana_name(suite: CipherSuite) -> None:
    """Key size, tag size and hash read back from the IANA name, independently of the table's columns."""
    name = suite.iana_name
    bits = re.search(r"(?:AES|ARIA)_(128|256)|(CHACHA20)|(SM4)", name)
    assert bits is not None
    key_size = {"128": 16, "256": 32}[bits[1]] if bits[1] else 32 if bits[2] else 16
    assert suite.key_size == key_size
    assert suite.tag_size == (8 if "CCM_8" in name else 16)
    # TLS 1.2 CCM suites carry no hash in their name: they use the SHA-256 PRF (RFC 6655 §3, RFC 7251 §2).
    assert suite.hash_name == ("sha384" if name.endswith("SHA384") else "sm3" if name.endswith("SM3") else "sha256")
    assert suite.hash_size == (48 if suite.hash_name == "sha384" else 32)
    assert suite.aead.name.split("-")[0].upper() in name.replace("CHACHA20_POLY1305", "CHACHA20")


@pytest.mark.parametrize("suite", TLS12, ids=_ids)
def test_tls12_nonce_layout(suite: CipherSuite) -> None:
    """GCM/CCM (RFC 5288 §3, RFC 6655 §3, RFC 6209): 4-byte salt + 8-byte explicit nonce per record.
    ChaCha20-Poly1305 (RFC 7905 §2): 12-byte IV XOR the sequence number, no explicit nonce."""
    if "CHACHA20" in suite.iana_name:
        assert (suite.fixed_iv_size, suite.explicit_nonce_size) == (12, 0)
    else:
        assert (suite.fixed_iv_size, suite.explicit_nonce_size) == (4, 8)


@pytest.mark.parametrize("suite", SUITES, ids=_ids)
def test_row_fits_the_kernel_cipher(suite: CipherSuite) -> None:
    """Sizes match the kernel's struct, so CryptoInfo.tls12/tls13 accept what the key schedule derives."""
    cipher = suite.kernel_cipher
    if cipher is None:
        assert suite.unsupported_reason is not None
        assert suite.openssl_name in suite.unsupported_reason
        return
    assert suite.unsupported_reason is None
    assert suite.version in cipher.versions
    assert (cipher.key_size, cipher.tag_size) == (suite.key_size, suite.tag_size)
    if suite.version is TLSVersion.TLS1_3:
        assert cipher.nonce_size == suite.fixed_iv_size
    else:
        # TLS 1.2: the key block's fixed IV is the kernel's salt (GCM/CCM), or its whole iv (ChaCha20).
        assert suite.fixed_iv_size == (cipher.salt_size or cipher.iv_size)
        assert suite.explicit_nonce_size == cipher.explicit_nonce_size(TLSVersion.TLS1_2)


def test_every_kernel_cipher_is_used_and_unsupported_aeads_say_why() -> None:
    used = {s.cipher_type for s in SUITES} - {None}
    assert used == set(CipherType)
    assert {a.name for a in AEADS.values() if a.cipher_type is None} == {
        "AES-256-CCM",
        "AES-128-CCM-8",
        "AES-256-CCM-8",
    }
    ccm8 = suite_by_openssl_name("TLS_AES_128_CCM_8_SHA256")
    assert ccm8 is not None
    assert ccm8.unsupported_reason is not None
    assert "8-byte tag" in ccm8.unsupported_reason
    aes256ccm = suite_by_openssl_name("DHE-RSA-AES256-CCM")
    assert aes256ccm is not None
    assert "256-bit key" in (aes256ccm.unsupported_reason or "")


def test_version_the_kernel_refuses() -> None:
    """A kernel AEAD outside the TLS versions the kernel takes it for (ARIA is TLS 1.2 only, RFC 6209)."""
    aria = suite_by_openssl_name("ECDHE-ARIA128-GCM-SHA256")
    assert aria is not None
    assert aria.kernel_cipher is CIPHERS[CipherType.ARIA_GCM_128]
    hypothetical = CipherSuite(0xFFFF, "TLS_ARIA_128_GCM_SHA256", "X", TLSVersion.TLS1_3, aria.aead, "sha256")
    assert hypothetical.kernel_cipher is None
    assert hypothetical.unsupported_reason == "X: the kernel accepts ARIA-128-GCM only for other TLS versions"


def test_lookups() -> None:
    suite = suite_by_code(0xC02F)
    assert suite is not None
    assert suite.openssl_name == "ECDHE-RSA-AES128-GCM-SHA256"
    assert suite.iana_name == "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"
    assert suite_by_openssl_name("ECDHE-RSA-AES128-GCM-SHA256") is suite
    assert suite_by_name("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256") is suite
    assert suite_by_name("ECDHE-RSA-AES128-GCM-SHA256") is suite
    assert suite_by_openssl_name("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256") is None  # not an OpenSSL name
    assert suite_by_code(0x002F) is None  # TLS_RSA_WITH_AES_128_CBC_SHA: no kernel cipher, not in the table
    assert suite_by_openssl_name("ECDHE-RSA-AES128-SHA256") is None
    assert suite_by_name("") is None


def test_every_aead_suite_of_the_linked_openssl_is_in_the_table() -> None:
    """The OpenSSL that ssl links: every AEAD suite it knows is a row, with the same code, name, version,
    cipher and key size (``SSLSocket.cipher()[0]`` is ``name`` here)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    seen = 0
    for cipher in ctx.get_ciphers():
        if not cipher["aead"]:
            continue
        suite = suite_by_openssl_name(cipher["name"])
        assert suite is not None, f"{cipher['name']} is missing from the table"
        assert suite.code == cipher["id"] & 0xFFFF
        assert suite.version.label == cipher["protocol"]
        assert suite.key_size * 8 == cipher["alg_bits"]
        # OpenSSL calls CCM_8 "aes-128-ccm" too: compare the name without the tag length.
        assert suite.aead.name.lower().removesuffix("-8") == cipher["symmetric"]
        seen += 1
    assert seen >= 30


def _openssl_rows(*args: str) -> list[tuple[int, str, str, str, str]]:
    """(code, IANA name, OpenSSL name, version, Enc) of ``openssl ciphers -stdname -V …`` AEAD lines."""
    binary = shutil.which("openssl")
    if binary is None:
        pytest.skip("no openssl binary")
    out = subprocess.run([binary, "ciphers", "-stdname", "-V", *args], capture_output=True, text=True, check=True)
    rows = []
    for line in out.stdout.splitlines():
        fields = line.split()
        if "Mac=AEAD" not in fields:
            continue
        high, low = (int(x, 16) for x in fields[0].split(","))
        enc = next(f for f in fields if f.startswith("Enc="))
        rows.append((high << 8 | low, fields[2], fields[4], fields[5], enc.removeprefix("Enc=")))
    return rows


_ENC = re.compile(r"(AES|ARIA)(GCM|CCM8|CCM)\((128|256)\)|CHACHA20/POLY1305\(256\)")


def test_iana_names_and_table_match_openssl_cli() -> None:
    """``openssl ciphers -stdname`` prints the IANA names: every OpenSSL AEAD suite matches its row, and
    every row (bar RFC 8998 SM4, which mainline OpenSSL lacks) is one OpenSSL knows."""
    rows = _openssl_rows("ALL:@SECLEVEL=0")
    rows += _openssl_rows("-ciphersuites", ":".join(s.iana_name for s in TLS13 if "SM4" not in s.iana_name))
    codes = set()
    for code, iana, openssl_name, version, enc in rows:
        suite = suite_by_code(code)
        assert suite is not None, iana
        assert (suite.iana_name, suite.openssl_name, suite.version.label) == (iana, openssl_name, version)
        match = _ENC.fullmatch(enc)
        assert match is not None, enc
        if match[1]:
            mode = {"GCM": "GCM", "CCM": "CCM", "CCM8": "CCM-8"}[match[2]]
            assert suite.aead.name == f"{match[1]}-{match[3]}-{mode}"
        else:
            assert suite.aead.name == "ChaCha20-Poly1305"
        codes.add(code)
    assert {s.code for s in SUITES} - codes == {0x00C6, 0x00C7}

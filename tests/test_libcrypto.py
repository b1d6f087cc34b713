"""The proof's AEAD opens through the ``libcrypto`` the ``ssl`` module runs on (:mod:`ktls.tls.libcrypto`).

``tests/test_aead.py`` runs every AEAD property and published vector through both this path and the
pure-Python one. Here: that the library is the one ``ssl`` reports, that it is really what opens AES-GCM and
ChaCha20-Poly1305, and that every way it can be unavailable or fail ends in the pure-Python check of the same
tag — never in a tag accepted unchecked.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from ktls.tls import aead, libcrypto
from ktls.tls.aead import AuthenticationFailed, open_aead
from ktls.tls.suites import AES128_CCM, AES128_GCM, AES256_GCM, CHACHA20_POLY1305, Aead

NATIVE = [AES128_GCM, AES256_GCM, CHACHA20_POLY1305]

needs_libcrypto = pytest.mark.skipif(
    libcrypto.opener(AES128_GCM.name) is None, reason="no libcrypto reachable here (static _ssl, no /proc)"
)


@needs_libcrypto
def test_the_library_is_the_build_ssl_reports() -> None:
    # Catches: a second libcrypto on the system (another version, another ABI) taken instead of _ssl's.
    library = libcrypto._library
    assert isinstance(library, libcrypto._Library)
    version = library.library.OpenSSL_version_num
    assert version() == ssl.OPENSSL_VERSION_NUMBER


@needs_libcrypto
@pytest.mark.parametrize("which", NATIVE, ids=lambda a: a.name)
def test_gcm_and_chacha_are_opened_by_libcrypto(which: Aead, monkeypatch: pytest.MonkeyPatch) -> None:
    # Catches: a libcrypto path that silently never runs (every open falling back to Python).
    def not_here(*args: object) -> None:
        raise AssertionError("the pure-Python AEAD ran")

    monkeypatch.setitem(aead._OPENERS, which.name, not_here)
    key, nonce = os.urandom(which.key_size), os.urandom(12)
    sealer = ChaCha20Poly1305(key) if which is CHACHA20_POLY1305 else AESGCM(key)
    sealed = sealer.encrypt(nonce, b"\x14\x00\x00\x20" + bytes(32) + b"\x16", b"\x17\x03\x03\x00\x35")
    assert open_aead(which, key, nonce, sealed, b"\x17\x03\x03\x00\x35")[-1] == 0x16
    with pytest.raises(AuthenticationFailed):
        open_aead(which, key, nonce, sealed[:-1] + bytes([sealed[-1] ^ 0x80]), b"\x17\x03\x03\x00\x35")


def test_ccm_is_never_opened_by_libcrypto() -> None:
    assert libcrypto.opener(AES128_CCM.name) is None


@needs_libcrypto
def test_a_libcrypto_error_falls_back_to_the_python_check(monkeypatch: pytest.MonkeyPatch) -> None:
    # Catches: an EVP failure (a FIPS provider refusing the cipher…) taken as "tag verified" or as a refusal.
    def failing(*args: object) -> bytes | None:
        raise ValueError("EVP_DecryptInit_ex refused the key")

    monkeypatch.setitem(libcrypto._openers, AES128_GCM.name, failing)
    key, nonce = os.urandom(16), os.urandom(12)
    sealed = AESGCM(key).encrypt(nonce, b"hello", b"aad")
    assert open_aead(AES128_GCM, key, nonce, sealed, b"aad") == b"hello"  # the Python path ran
    with pytest.raises(AuthenticationFailed):
        open_aead(AES128_GCM, key, nonce, sealed[:-1] + bytes([sealed[-1] ^ 1]), b"aad")


@needs_libcrypto
@pytest.mark.parametrize("which", NATIVE, ids=lambda a: a.name)
def test_a_library_that_fails_its_vector_is_not_used(which: Aead, monkeypatch: pytest.MonkeyPatch) -> None:
    # Catches: a libcrypto whose cipher misbehaves (wrong getter, ABI mismatch) used without its self-check.
    library = libcrypto._library
    assert isinstance(library, libcrypto._Library)
    getter, key_size, (key, nonce, aad, plaintext, sealed) = libcrypto._CIPHERS[which.name]
    assert libcrypto._checked(library, which.name) is not None
    wrong = f"{int(sealed[:2], 16) ^ 1:02x}{sealed[2:]}"
    monkeypatch.setitem(libcrypto._CIPHERS, which.name, (getter, key_size, (key, nonce, aad, plaintext, wrong)))
    assert libcrypto._checked(library, which.name) is None
    accepting = libcrypto._Library(library.library)
    monkeypatch.setattr(accepting, "opener", lambda cipher: lambda *args: plaintext and bytes.fromhex(plaintext))
    monkeypatch.setitem(libcrypto._CIPHERS, which.name, (getter, key_size, (key, nonce, aad, plaintext, sealed)))
    assert libcrypto._checked(accepting, which.name) is None  # one that accepts a changed tag is refused too


def test_the_environment_forces_the_python_aeads() -> None:
    code = "from ktls.tls import libcrypto; print(libcrypto.opener('AES-128-GCM') is None)"
    env = {**os.environ, "KTLS_PURE_PYTHON_AEAD": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"

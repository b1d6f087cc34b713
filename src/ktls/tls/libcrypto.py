"""AEAD opens by the OpenSSL that Python's ``ssl`` module already runs on — when it can be found.

Why
---
The proof (:mod:`ktls.tls.proof`) opens a handful of records per connection. Written out in Python
(:mod:`ktls.tls.aead`), an AES-GCM open costs ~65 µs on a desktop CPU (a key expansion, two block
encryptions, a GHASH): the largest part of what ktls adds to a handshake, and that code is not constant-time.
The ``ssl`` module is linked against OpenSSL's ``libcrypto``, which has the same AEADs in constant-time,
hardware-accelerated C. ktls has no runtime dependency, and this adds none: it is the library that
``import ssl`` has already loaded into this process, called through :mod:`ctypes` (standard library).

Which library, and when it is not used
--------------------------------------
* The ``libcrypto`` shared object mapped into this process (``/proc/self/maps``) once ``ssl`` is imported:
  the copy ``_ssl`` itself calls. It is used only if its ``OpenSSL_version_num()`` equals
  ``ssl.OPENSSL_VERSION_NUMBER`` (the same build ``ssl`` reports), and each AEAD only once it has opened a
  published vector and refused that vector with one bit changed (checked on first use, per AEAD).
* Otherwise — no ``/proc``, an ``_ssl`` that links OpenSSL statically, a ``libcrypto`` without the cipher, a
  failed self-check, ``KTLS_PURE_PYTHON_AEAD=1`` in the environment (the tests run both ways) — :func:`opener`
  returns ``None`` and :mod:`ktls.tls.aead` opens in pure Python. Either way the same tag is checked.

Only calls that OpenSSL 1.1.0 to 3.x all have, with the same C signatures: ``EVP_CIPHER_CTX_new``/``_free``
(``free`` wipes the key schedule), ``EVP_aes_128_gcm``/``EVP_aes_256_gcm``/``EVP_chacha20_poly1305`` (on
OpenSSL 3, ``EVP_CIPHER_fetch`` by the same names instead, once),
``EVP_DecryptInit_ex``, ``EVP_CIPHER_CTX_ctrl(EVP_CTRL_AEAD_SET_TAG)``, ``EVP_DecryptUpdate`` and
``EVP_DecryptFinal_ex`` (which compares the tag). The nonce is 12 bytes, these AEADs' default. Every output
buffer is allocated here, sized for the whole input, before the call.
"""

from __future__ import annotations

import ctypes
import os
import ssl
import threading
from collections.abc import Callable

__all__ = ["Opener", "opener"]

#: ``open(key, nonce, ciphertext, tag, associated_data)`` → the plaintext, or ``None`` when the tag does not
#: verify.
Opener = Callable[[bytes, bytes, bytes, bytes, bytes], "bytes | None"]

_EVP_CTRL_AEAD_SET_TAG = 0x11  # include/openssl/evp.h: EVP_CTRL_AEAD_SET_TAG == EVP_CTRL_GCM_SET_TAG
_TAG_SIZE = 16
_NONCE_SIZE = 12

#: The AEADs opened here: their ``EVP_CIPHER`` getter, key size, and a published vector (key, nonce, AAD,
#: plaintext, ciphertext ‖ tag; hex) checked before first use. The same vectors are in tests/test_aead.py.
_CIPHERS: dict[str, tuple[str, int, tuple[str, str, str, str, str]]] = {
    # McGrew & Viega, "The Galois/Counter Mode of Operation (GCM)", test cases 4 (AES-128) and 16 (AES-256).
    "AES-128-GCM": (
        "EVP_aes_128_gcm",
        16,
        (
            "feffe9928665731c6d6a8f9467308308",
            "cafebabefacedbaddecaf888",
            "feedfacedeadbeeffeedfacedeadbeefabaddad2",
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525"
            "b16aedf5aa0de657ba637b39",
            "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e21d514b25466931c7d8f6a5aac84aa05"
            "1ba30b396a0aac973d58e0915bc94fbc3221a5db94fae95ae7121a47",
        ),
    ),
    "AES-256-GCM": (
        "EVP_aes_256_gcm",
        32,
        (
            "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
            "cafebabefacedbaddecaf888",
            "feedfacedeadbeeffeedfacedeadbeefabaddad2",
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525"
            "b16aedf5aa0de657ba637b39",
            "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838"
            "c5f61e6393ba7a0abcc9f66276fc6ece0f4e1768cddf8853bb2d551b",
        ),
    ),
    # RFC 8439 §2.8.2.
    "ChaCha20-Poly1305": (
        "EVP_chacha20_poly1305",
        32,
        (
            "808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f",
            "070000004041424344454647",
            "50515253c0c1c2c3c4c5c6c7",
            b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, "
            b"sunscreen would be it.".hex(),
            "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d63dbea45e8ca9671282fafb69da92728b"
            "1a71de0a9e060b2905d6a5b67ecd3b3692ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc"
            "3ff4def08e4b7a9de576d26586cec64b61161ae10b594f09e26a7e902ecbd0600691",
        ),
    ),
}


class _Library:
    """The ``EVP_*`` functions of one ``libcrypto``, with their C signatures."""

    def __init__(self, library: ctypes.CDLL) -> None:
        pointer, c_int = ctypes.c_void_p, ctypes.c_int
        self.library = library
        self.ctx_new = library.EVP_CIPHER_CTX_new
        self.ctx_new.argtypes, self.ctx_new.restype = (), pointer
        self.ctx_free = library.EVP_CIPHER_CTX_free
        self.ctx_free.argtypes, self.ctx_free.restype = (pointer,), None
        self.init = library.EVP_DecryptInit_ex
        self.init.argtypes, self.init.restype = (pointer, pointer, pointer, ctypes.c_char_p, ctypes.c_char_p), c_int
        self.ctrl = library.EVP_CIPHER_CTX_ctrl
        self.ctrl.argtypes, self.ctrl.restype = (pointer, c_int, c_int, ctypes.c_char_p), c_int
        self.update = library.EVP_DecryptUpdate
        self.update.argtypes = (pointer, ctypes.c_char_p, ctypes.POINTER(c_int), ctypes.c_char_p, c_int)
        self.update.restype = c_int
        self.final = library.EVP_DecryptFinal_ex
        self.final.argtypes, self.final.restype = (pointer, pointer, ctypes.POINTER(c_int)), c_int

    def cipher(self, name: str, getter: str) -> int | None:
        """The ``EVP_CIPHER`` to decrypt with. OpenSSL 3: fetched once (``EVP_CIPHER_fetch``, kept for the
        process's life) — the legacy ``EVP_aes_128_gcm()`` object makes every ``EVP_DecryptInit_ex`` look the
        implementation up again (locks and atomics: 0.7 ms an open in an emulated guest). OpenSSL 1.1: the
        legacy getter, which is the implementation."""
        fetch = getattr(self.library, "EVP_CIPHER_fetch", None)
        if fetch is not None:
            fetch.argtypes, fetch.restype = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p), ctypes.c_void_p
            fetched: int | None = fetch(None, name.encode("ascii"), None)
            if fetched:
                return fetched
        try:
            function = getattr(self.library, getter)
        except AttributeError:
            return None
        function.argtypes, function.restype = (), ctypes.c_void_p
        value: int | None = function()
        return value

    def opener(self, cipher: int) -> Opener:
        ctx_new, ctx_free, init, ctrl, update, final = (
            self.ctx_new,
            self.ctx_free,
            self.init,
            self.ctrl,
            self.update,
            self.final,
        )

        def open_(key: bytes, nonce: bytes, ciphertext: bytes, tag: bytes, associated_data: bytes) -> bytes | None:
            ctx = ctx_new()
            if not ctx:
                raise MemoryError("EVP_CIPHER_CTX_new failed")
            try:
                written = ctypes.c_int(0)
                count = ctypes.byref(written)
                # The plaintext, then room for what a final step may add (these AEADs add nothing).
                out = ctypes.create_string_buffer(len(ciphertext) + _TAG_SIZE)
                if init(ctx, cipher, None, key, nonce) != 1:
                    raise ValueError("EVP_DecryptInit_ex refused the key")
                if associated_data and update(ctx, None, count, associated_data, len(associated_data)) != 1:
                    raise ValueError("EVP_DecryptUpdate refused the associated data")
                length = 0
                if ciphertext:
                    if update(ctx, out, count, ciphertext, len(ciphertext)) != 1:
                        raise ValueError("EVP_DecryptUpdate refused the ciphertext")
                    length = written.value
                if length > len(ciphertext) or ctrl(ctx, _EVP_CTRL_AEAD_SET_TAG, _TAG_SIZE, tag) != 1:
                    raise ValueError("EVP_CIPHER_CTX_ctrl refused the tag")
                if final(ctx, ctypes.addressof(out) + length, count) != 1:
                    return None  # the tag does not verify
                return out.raw[: length + written.value]
            finally:
                ctx_free(ctx)  # also wipes the key schedule

        return open_


def _libcrypto_path() -> str | None:
    """The ``libcrypto`` shared object mapped into this process (``_ssl``'s, once ``ssl`` is imported)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split(maxsplit=5)[-1].strip() if line.count(" ") >= 5 else ""
                if "/libcrypto" in path and ".so" in path:
                    return path
    except OSError:
        return None
    return None


def _load() -> _Library | None:
    if os.environ.get("KTLS_PURE_PYTHON_AEAD"):
        return None
    path = _libcrypto_path()
    if path is None:
        return None
    try:
        library = ctypes.CDLL(path)
        version = library.OpenSSL_version_num
        version.argtypes, version.restype = (), ctypes.c_ulong
        if version() != ssl.OPENSSL_VERSION_NUMBER:
            return None
        return _Library(library)
    except (OSError, AttributeError):
        return None


def _checked(library: _Library, name: str) -> Opener | None:
    """``name``'s opener if this library has the cipher and it opens its published vector, and refuses the
    vector with one bit of the tag changed."""
    getter, key_size, vector = _CIPHERS[name]
    cipher = library.cipher(name, getter)
    if not cipher:
        return None
    open_ = library.opener(cipher)
    key, nonce, aad, plaintext, sealed = (bytes.fromhex(field) for field in vector)
    ciphertext, tag = sealed[:-_TAG_SIZE], sealed[-_TAG_SIZE:]
    try:
        if len(key) != key_size or open_(key, nonce, ciphertext, tag, aad) != plaintext:
            return None
        if open_(key, nonce, ciphertext, tag[:-1] + bytes([tag[-1] ^ 1]), aad) is not None:
            return None
    except (ValueError, MemoryError):
        return None
    return open_


_lock = threading.Lock()
_library: _Library | bool | None = False  # False: not looked for yet
_openers: dict[str, Opener | None] = {}


def opener(name: str) -> Opener | None:
    """The ``libcrypto`` opener of the AEAD ``name`` (``"AES-128-GCM"``, ``"AES-256-GCM"``,
    ``"ChaCha20-Poly1305"``), checked; ``None`` when there is none here (module docstring)."""
    try:
        return _openers[name]
    except KeyError:
        pass
    global _library  # noqa: PLW0603 - loaded once, on first use
    with _lock:
        if name not in _openers:
            if _library is False:
                _library = _load()
            library = _library if isinstance(_library, _Library) else None
            _openers[name] = _checked(library, name) if library is not None and name in _CIPHERS else None
        return _openers[name]

"""Opening (decrypting and authenticating) one small AEAD message in pure Python — for proofs, not traffic.

Why this exists
---------------
Before the kernel is keyed, ktls proves that the secrets it read from the key log are this connection's
own: it opens a record this very connection sent or received (:mod:`ktls.tls.proof`). ktls has no runtime
dependency and the standard library has no AEAD (``hashlib``/``hmac`` only), so the AEADs that kernel TLS
and OpenSSL share are written out here, from their specifications:

* AES (FIPS 197), encryption only — GCM and CCM never run the inverse cipher;
* AES-GCM (NIST SP 800-38D; RFC 5288 / RFC 8446 use a 12-byte nonce and a 16-byte tag), and the same GCM
  over ARIA (:mod:`ktls.tls.aria`, RFC 5794) for the TLS 1.2 ARIA-GCM suites (RFC 6209);
* AES-CCM (NIST SP 800-38C, RFC 3610 notation; TLS: 12-byte nonce, so L = 3, and a 16-byte tag — RFC 6655);
* ChaCha20-Poly1305 (RFC 8439 §2.8).

The messages are a few hundred bytes (a Finished, an EncryptedExtensions, a NewSessionTicket); correctness is
checked against the ``cryptography`` package in the tests, and a tag is compared with
:func:`hmac.compare_digest`. This is **not** constant-time code (table look-ups, Python integers): it is used
once per connection, on a handful of records, and nowhere else — see ``SECURITY.md``. The kernel does all
record protection after the hand-off.

Where the ``libcrypto`` that the ``ssl`` module runs on can be reached (:mod:`ktls.tls.libcrypto`: the same
build ``ssl`` reports, checked against published vectors before first use), AES-GCM and ChaCha20-Poly1305
are opened by it instead — the same tag checked, ten times faster and constant-time; :func:`authenticate`
falls back to the code here when it cannot. AES-CCM and ARIA-GCM are always opened here.

SM4 is not here: mainline OpenSSL negotiates no SM4 suite (RFC 8998's are TLS 1.3 and need a fork such as
Tongsuo), so no connection ktls takes over can use it. A suite without an entry here cannot be proven, so it
stays in userspace TLS.
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Callable
from typing import Protocol

from . import libcrypto
from .aria import ARIA
from .suites import AES128_CCM, AES128_GCM, AES256_GCM, ARIA128_GCM, ARIA256_GCM, CHACHA20_POLY1305, Aead

__all__ = ["AuthenticationFailed", "Opened", "authenticate", "can_open", "open_aead"]

_TAG_SIZE = 16
_NONCE_SIZE = 12


class AuthenticationFailed(ValueError):
    """The tag did not match: wrong key, wrong nonce, wrong additional data, or altered bytes."""


def can_open(aead: Aead) -> bool:
    """Whether :func:`open_aead` implements ``aead``."""
    return aead.name in _OPENERS


class Opened:
    """A message whose tag has verified. Its plaintext is decrypted on demand, one byte range at a time: a
    proof needs only a record's content type (its last bytes, in TLS 1.3) or its first bytes, and the
    counter-mode AEADs can decrypt any range alone, so most of a large record is never decrypted."""

    def __init__(self, length: int, decrypt: Callable[[int, int], bytes]) -> None:
        self._length = length
        self._decrypt = decrypt

    def __len__(self) -> int:
        return self._length

    def read(self, start: int = 0, end: int | None = None) -> bytes:
        """The plaintext bytes ``[start:end]`` (Python slice bounds, clamped to the message)."""
        start, end, _ = slice(start, end).indices(self._length)
        return self._decrypt(start, end) if end > start else b""


def authenticate(aead: Aead, key: bytes, nonce: bytes, ciphertext: bytes, associated_data: bytes) -> Opened:
    """Verify ``ciphertext``'s tag (last 16 bytes) under ``key``, ``nonce`` and ``associated_data``, or raise
    :class:`AuthenticationFailed`; the plaintext is then read from the :class:`Opened` message.

    Raises :class:`ValueError` for an AEAD this module does not implement or sizes that do not fit it.
    """
    opener = _OPENERS.get(aead.name)
    if opener is None:
        raise ValueError(f"{aead.name} cannot be opened in pure Python")
    if len(key) != aead.key_size or len(nonce) != _NONCE_SIZE:
        raise ValueError(f"{aead.name} takes a {aead.key_size}-byte key and a {_NONCE_SIZE}-byte nonce")
    if len(ciphertext) < _TAG_SIZE:
        raise AuthenticationFailed("shorter than the tag")
    body, tag = ciphertext[:-_TAG_SIZE], ciphertext[-_TAG_SIZE:]
    native = libcrypto.opener(aead.name)
    if native is not None:
        try:
            plaintext = native(key, nonce, body, tag, associated_data)
        except (ValueError, MemoryError):
            pass  # libcrypto would not run it (module docstring of libcrypto): the same check in Python
        else:
            if plaintext is None:
                raise AuthenticationFailed(f"{aead.name} tag mismatch")
            return Opened(len(plaintext), lambda start, end: plaintext[start:end])
    return opener(key, nonce, body, tag, associated_data)


def open_aead(aead: Aead, key: bytes, nonce: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
    """Decrypt ``ciphertext`` (tag last) and return the whole plaintext, or raise :class:`AuthenticationFailed`
    (:func:`authenticate`, then all of it read)."""
    return authenticate(aead, key, nonce, ciphertext, associated_data).read()


# --- AES (FIPS 197), encryption ------------------------------------------------------------------------


def _xtime(byte: int) -> int:
    byte <<= 1
    return (byte ^ 0x11B) if byte & 0x100 else byte


def _make_tables() -> tuple[list[int], list[list[int]]]:
    """The S-box (FIPS 197 §5.1.1: inverse in GF(2^8), then the affine map) and the four round tables that
    fold SubBytes, ShiftRows' byte positions and MixColumns into look-ups."""
    inverse = [0] * 256
    log, antilog = [0] * 256, [0] * 255
    value = 1
    for power in range(255):  # 3 generates GF(2^8)*
        antilog[power] = value
        log[value] = power
        value ^= _xtime(value)
    for byte in range(1, 256):
        inverse[byte] = antilog[(255 - log[byte]) % 255]
    sbox = []
    for byte in range(256):
        b = inverse[byte]
        s = b
        for shift in range(1, 5):
            s ^= ((b << shift) | (b >> (8 - shift))) & 0xFF
        sbox.append(s ^ 0x63)
    t0 = []
    for byte in range(256):
        s = sbox[byte]
        s2 = _xtime(s)
        t0.append((s2 << 24) | (s << 16) | (s << 8) | (s2 ^ s))
    rotations = [t0]
    for _ in range(3):
        rotations.append([((t >> 8) | (t << 24)) & 0xFFFFFFFF for t in rotations[-1]])
    return sbox, rotations


_SBOX, (_T0, _T1, _T2, _T3) = _make_tables()
_RCON = (0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0x1B, 0x36)


class _AES:
    """One expanded AES key (128 or 256 bits); :meth:`encrypt_block` is the forward cipher."""

    def __init__(self, key: bytes) -> None:
        nk = len(key) // 4
        if len(key) not in (16, 32):
            raise ValueError("AES-128 or AES-256 only")
        self._rounds = nk + 6
        words = list(struct.unpack(f">{nk}I", key))
        for i in range(nk, 4 * (self._rounds + 1)):
            temp = words[i - 1]
            if i % nk == 0:
                temp = ((temp << 8) | (temp >> 24)) & 0xFFFFFFFF
                temp = self._sub_word(temp) ^ (_RCON[i // nk - 1] << 24)
            elif nk > 6 and i % nk == 4:
                temp = self._sub_word(temp)
            words.append(words[i - nk] ^ temp)
        self._round_keys = words

    @staticmethod
    def _sub_word(word: int) -> int:
        return (
            (_SBOX[word >> 24] << 24)
            | (_SBOX[(word >> 16) & 0xFF] << 16)
            | (_SBOX[(word >> 8) & 0xFF] << 8)
            | _SBOX[word & 0xFF]
        )

    def encrypt_block(self, block: bytes) -> bytes:
        rk = self._round_keys
        s0, s1, s2, s3 = struct.unpack(">4I", block)
        s0, s1, s2, s3 = s0 ^ rk[0], s1 ^ rk[1], s2 ^ rk[2], s3 ^ rk[3]
        for r in range(1, self._rounds):
            k = 4 * r
            t0 = _T0[s0 >> 24] ^ _T1[(s1 >> 16) & 0xFF] ^ _T2[(s2 >> 8) & 0xFF] ^ _T3[s3 & 0xFF] ^ rk[k]
            t1 = _T0[s1 >> 24] ^ _T1[(s2 >> 16) & 0xFF] ^ _T2[(s3 >> 8) & 0xFF] ^ _T3[s0 & 0xFF] ^ rk[k + 1]
            t2 = _T0[s2 >> 24] ^ _T1[(s3 >> 16) & 0xFF] ^ _T2[(s0 >> 8) & 0xFF] ^ _T3[s1 & 0xFF] ^ rk[k + 2]
            t3 = _T0[s3 >> 24] ^ _T1[(s0 >> 16) & 0xFF] ^ _T2[(s1 >> 8) & 0xFF] ^ _T3[s2 & 0xFF] ^ rk[k + 3]
            s0, s1, s2, s3 = t0, t1, t2, t3
        k = 4 * self._rounds
        out = []
        for a, b, c, d, key_word in (
            (s0, s1, s2, s3, 0),
            (s1, s2, s3, s0, 1),
            (s2, s3, s0, s1, 2),
            (s3, s0, s1, s2, 3),
        ):
            word = (_SBOX[a >> 24] << 24) | (_SBOX[(b >> 16) & 0xFF] << 16) | (_SBOX[(c >> 8) & 0xFF] << 8)
            out.append((word | _SBOX[d & 0xFF]) ^ rk[k + key_word])
        return struct.pack(">4I", *out)


def _xor(data: bytes, stream: bytes) -> bytes:
    return (int.from_bytes(data, "big") ^ int.from_bytes(stream[: len(data)], "big")).to_bytes(len(data), "big")


def _ctr(cipher: _AES, counter_block: bytes, data: bytes, counter_bytes: int) -> bytes:
    """CTR mode from ``counter_block`` (its last ``counter_bytes`` count up, wrapping)."""
    prefix, counter = counter_block[:-counter_bytes], int.from_bytes(counter_block[-counter_bytes:], "big")
    modulus = 1 << (8 * counter_bytes)
    stream = bytearray()
    for _ in range((len(data) + 15) // 16):
        stream += cipher.encrypt_block(prefix + counter.to_bytes(counter_bytes, "big"))
        counter = (counter + 1) % modulus
    return _xor(data, bytes(stream))


class _BlockCipher(Protocol):
    def encrypt_block(self, block: bytes) -> bytes: ...


def _gcm_ctr_range(cipher: _BlockCipher, first_counter: bytes, data: bytes, start: int, end: int) -> bytes:
    """``data[start:end]`` through GCM's CTR mode (a 32-bit counter from ``first_counter``), computing only the
    key stream blocks that range needs."""
    first, last = start // 16, (end - 1) // 16
    prefix, counter = first_counter[:-4], int.from_bytes(first_counter[-4:], "big")
    stream = b"".join(
        cipher.encrypt_block(prefix + ((counter + block) % 2**32).to_bytes(4, "big"))
        for block in range(first, last + 1)
    )
    skip = start - 16 * first
    return _xor(data[start:end], stream[skip : skip + end - start])


# --- GCM (NIST SP 800-38D), over AES or ARIA --------------------------------------------------------------------------

_GCM_R = 0xE1 << 120  # the reduction polynomial x^128 + x^7 + x^2 + x + 1, in GCM's reflected bit order


def _times_x(value: int) -> int:
    """value • x in GCM's bit order (SP 800-38D §6.3: a right shift, reduced)."""
    return (value >> 1) ^ _GCM_R if value & 1 else value >> 1


def _make_reduction_table() -> list[int]:
    """What the 8 bits shifted out of ``Z`` by a multiplication by x^8 fold back in as: ``RED[b] = b • x^8``."""
    table = []
    for low in range(256):
        value = low
        for _ in range(8):
            value = _times_x(value)
        table.append(value)
    return table


_GCM_REDUCTION = _make_reduction_table()


class _GHash:
    """GHASH with one key H, a byte at a time (Shoup's table method): ``M[b] = b • H`` for every byte value b,
    so multiplying a block by H is 16 look-ups, shifts and XORs instead of 128 conditional ones."""

    def __init__(self, h: int) -> None:
        # The byte's bit 0x80 is x^0, 0x40 is x^1, ...: M[0x80] = H, M[0x40] = H • x, ...
        powers = {0x80: h}
        for bit in (0x40, 0x20, 0x10, 0x08, 0x04, 0x02, 0x01):
            powers[bit] = _times_x(powers[bit << 1])
        table = [0] * 256
        for value in range(1, 256):
            low_bit = value & -value
            table[value] = table[value ^ low_bit] ^ powers[low_bit]
        self._table = table

    def _multiply(self, x: int) -> int:
        """x • H: Horner's rule over x's bytes, last byte first (x = b0 + x^8 (b1 + x^8 (...)))."""
        table, reduction = self._table, _GCM_REDUCTION
        z = 0
        for byte in x.to_bytes(16, "little"):  # b15 first
            z = (z >> 8) ^ reduction[z & 0xFF] ^ table[byte]
        return z

    def digest(self, associated_data: bytes, ciphertext: bytes) -> int:
        y = 0
        for data in (associated_data, ciphertext):
            for offset in range(0, len(data), 16):
                block = data[offset : offset + 16].ljust(16, b"\0")
                y = self._multiply(y ^ int.from_bytes(block, "big"))
        lengths = struct.pack(">QQ", 8 * len(associated_data), 8 * len(ciphertext))
        return self._multiply(y ^ int.from_bytes(lengths, "big"))


def _open_gcm_with(
    cipher: _BlockCipher, name: str, nonce: bytes, ciphertext: bytes, tag: bytes, *, associated_data: bytes
) -> Opened:
    h = int.from_bytes(cipher.encrypt_block(bytes(16)), "big")
    j0 = nonce + b"\0\0\0\1"  # a 96-bit IV (§7.1)
    expected = _xor(_GHash(h).digest(associated_data, ciphertext).to_bytes(16, "big"), cipher.encrypt_block(j0))
    if not hmac.compare_digest(expected, tag):
        raise AuthenticationFailed(f"{name} tag mismatch")
    first_counter = nonce + b"\0\0\0\2"
    return Opened(len(ciphertext), lambda start, end: _gcm_ctr_range(cipher, first_counter, ciphertext, start, end))


def _open_gcm(key: bytes, nonce: bytes, ciphertext: bytes, tag: bytes, associated_data: bytes) -> Opened:
    return _open_gcm_with(_AES(key), "AES-GCM", nonce, ciphertext, tag, associated_data=associated_data)


def _open_aria_gcm(key: bytes, nonce: bytes, ciphertext: bytes, tag: bytes, associated_data: bytes) -> Opened:
    return _open_gcm_with(ARIA(key), "ARIA-GCM", nonce, ciphertext, tag, associated_data=associated_data)


# --- AES-CCM (NIST SP 800-38C / RFC 3610), 12-byte nonce, 16-byte tag ----------------------------------------

_CCM_L = 15 - _NONCE_SIZE  # bytes of the message-length / counter field


def _open_ccm(key: bytes, nonce: bytes, ciphertext: bytes, tag: bytes, associated_data: bytes) -> Opened:
    cipher = _AES(key)
    counter0 = bytes([_CCM_L - 1]) + nonce + bytes(_CCM_L)
    plaintext = _ctr(cipher, counter0[:-_CCM_L] + (1).to_bytes(_CCM_L, "big"), ciphertext, _CCM_L)
    if len(associated_data) >= 0xFF00:
        raise ValueError("CCM associated data this long needs the 6-byte length form; TLS never has it")
    flags = (0x40 if associated_data else 0) | (((_TAG_SIZE - 2) // 2) << 3) | (_CCM_L - 1)
    mac_input = bytes([flags]) + nonce + len(plaintext).to_bytes(_CCM_L, "big")
    if associated_data:
        encoded = len(associated_data).to_bytes(2, "big") + associated_data
        mac_input += encoded + bytes(-len(encoded) % 16)
    mac_input += plaintext + bytes(-len(plaintext) % 16)
    mac = bytes(16)
    for offset in range(0, len(mac_input), 16):
        mac = cipher.encrypt_block(_xor(mac_input[offset : offset + 16], mac))
    expected = _xor(mac, cipher.encrypt_block(counter0))
    if not hmac.compare_digest(expected, tag):
        raise AuthenticationFailed("AES-CCM tag mismatch")
    return Opened(len(plaintext), lambda start, end: plaintext[start:end])  # CCM's MAC needed all of it


# --- ChaCha20-Poly1305 (RFC 8439) ---------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF


def _chacha20_block(key_words: tuple[int, ...], counter: int, nonce_words: tuple[int, ...]) -> bytes:
    """RFC 8439 §2.3: one 64-byte block of key stream."""
    state = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574, *key_words, counter, *nonce_words]
    x = list(state)

    def quarter(a: int, b: int, c: int, d: int) -> None:
        x[a] = (x[a] + x[b]) & _MASK32
        x[d] ^= x[a]
        x[d] = ((x[d] << 16) | (x[d] >> 16)) & _MASK32
        x[c] = (x[c] + x[d]) & _MASK32
        x[b] ^= x[c]
        x[b] = ((x[b] << 12) | (x[b] >> 20)) & _MASK32
        x[a] = (x[a] + x[b]) & _MASK32
        x[d] ^= x[a]
        x[d] = ((x[d] << 8) | (x[d] >> 24)) & _MASK32
        x[c] = (x[c] + x[d]) & _MASK32
        x[b] ^= x[c]
        x[b] = ((x[b] << 7) | (x[b] >> 25)) & _MASK32

    for _ in range(10):  # 20 rounds: a column round and a diagonal round each time
        quarter(0, 4, 8, 12)
        quarter(1, 5, 9, 13)
        quarter(2, 6, 10, 14)
        quarter(3, 7, 11, 15)
        quarter(0, 5, 10, 15)
        quarter(1, 6, 11, 12)
        quarter(2, 7, 8, 13)
        quarter(3, 4, 9, 14)
    return struct.pack("<16I", *((a + b) & _MASK32 for a, b in zip(x, state, strict=True)))


def _poly1305(key: bytes, message: bytes) -> bytes:
    """RFC 8439 §2.5."""
    r = int.from_bytes(key[:16], "little") & 0x0FFFFFFC0FFFFFFC0FFFFFFC0FFFFFFF
    s = int.from_bytes(key[16:], "little")
    p = (1 << 130) - 5
    accumulator = 0
    for offset in range(0, len(message), 16):
        block = message[offset : offset + 16] + b"\1"
        accumulator = ((accumulator + int.from_bytes(block, "little")) * r) % p
    return ((accumulator + s) & ((1 << 128) - 1)).to_bytes(16, "little")


def _open_chacha20_poly1305(key: bytes, nonce: bytes, ciphertext: bytes, tag: bytes, associated_data: bytes) -> Opened:
    key_words = struct.unpack("<8I", key)
    nonce_words = struct.unpack("<3I", nonce)
    one_time_key = _chacha20_block(key_words, 0, nonce_words)[:32]
    mac_data = associated_data + bytes(-len(associated_data) % 16) + ciphertext + bytes(-len(ciphertext) % 16)
    mac_data += struct.pack("<QQ", len(associated_data), len(ciphertext))
    if not hmac.compare_digest(_poly1305(one_time_key, mac_data), tag):
        raise AuthenticationFailed("ChaCha20-Poly1305 tag mismatch")

    def decrypt(start: int, end: int) -> bytes:
        first, last = start // 64, (end - 1) // 64
        stream = b"".join(_chacha20_block(key_words, 1 + i, nonce_words) for i in range(first, last + 1))
        skip = start - 64 * first
        return _xor(ciphertext[start:end], stream[skip : skip + end - start])

    return Opened(len(ciphertext), decrypt)


_OPENERS = {
    AES128_GCM.name: _open_gcm,
    AES256_GCM.name: _open_gcm,
    AES128_CCM.name: _open_ccm,
    CHACHA20_POLY1305.name: _open_chacha20_poly1305,
    ARIA128_GCM.name: _open_aria_gcm,
    ARIA256_GCM.name: _open_aria_gcm,
}

"""From the secrets in the key log to the keys and IVs the kernel takes.

Theory of operation
-------------------
Python's :mod:`ssl` hides the keys; its only door is ``SSLContext.keylog_filename``, which writes each
connection's *secrets* in the NSS key log format (:mod:`ktls.tls.keylog`). What is left to do is the last
step of each key schedule, with nothing but :mod:`hmac` and :mod:`hashlib`:

**TLS 1.3** (RFC 8446 §7). The key log holds the traffic secrets themselves (``CLIENT_TRAFFIC_SECRET_0``,
``SERVER_TRAFFIC_SECRET_0``), so of the whole schedule only §7.3 is needed::

    [sender]_write_key = HKDF-Expand-Label(Secret, "key", "", key_length)
    [sender]_write_iv  = HKDF-Expand-Label(Secret, "iv", "", iv_length)

and, for a KeyUpdate (§7.2), the next generation of a traffic secret::

    application_traffic_secret_N+1 = HKDF-Expand-Label(application_traffic_secret_N, "traffic upd", "", Hash.length)

HKDF-Expand-Label is HKDF-Expand (RFC 5869) whose ``info`` is the ``HkdfLabel`` struct of §7.1, built here
byte for byte. The hash is the suite's (SHA-384 for TLS_AES_256_GCM_SHA384, SHA-256 otherwise).

**TLS 1.2** (RFC 5246 §5, §6.3). The key log holds the 48-byte master secret (``CLIENT_RANDOM`` line);
the key block is ``PRF(master_secret, "key expansion", server_random + client_random)`` (note the order:
server first), with the PRF P_<hash> of the suite (SHA-384 for the ``_SHA384`` suites, SHA-256 for all
others, CCM included). The block is cut, in this order, into::

    client_write_MAC_key, server_write_MAC_key   (empty: AEAD suites have no MAC key)
    client_write_key,     server_write_key       (key_size each)
    client_write_IV,      server_write_IV        (fixed_iv_size each: 4 for GCM/CCM, 12 for ChaCha20)

The server random is not in the key log: the handshake driver reads it from the ServerHello
(:func:`ktls.tls.records.server_random_from_server_hello`).

The extended master secret (RFC 7627) changes only how the *master secret* is computed from the pre-master
secret (over the session hash instead of the two randoms). The key block is derived from the master secret
exactly as above, and the key log gives the master secret actually in use, so kTLS needs nothing else:
the end-to-end tests check both with and without it.

Everything returned here is key material: :class:`TrafficKeys` never shows it in its ``repr``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Iterator
from typing import Any

from ..constants import TLSVersion
from ..errors import CipherUnavailable
from ..kernel.uapi import CryptoInfo
from .suites import CipherSuite, HashName

__all__ = [
    "KeyBlock",
    "TrafficKeys",
    "crypto_info",
    "hkdf_expand",
    "hkdf_expand_label",
    "key_block",
    "next_traffic_secret",
    "prf",
    "tls13_crypto_info",
    "traffic_key_and_iv",
]

_MASTER_SECRET_SIZE = 48  # RFC 5246 §8.1: master_secret is always 48 bytes
_RANDOM_SIZE = 32  # RFC 5246 §7.4.1.2, RFC 8446 §4.1.2
_LABEL_PREFIX = b"tls13 "  # RFC 8446 §7.1


@functools.cache
def _digest_size(hash_name: HashName) -> int:
    return hashlib.new(hash_name).digest_size


_IPAD = bytes(byte ^ 0x36 for byte in range(256))  # RFC 2104: the key XOR ipad, as a translation table
_OPAD = bytes(byte ^ 0x5C for byte in range(256))
#: One empty hash object per algorithm, copied for each HMAC (``hashlib``'s ``copy``): ``hmac.digest`` asks
#: OpenSSL 3 to look the algorithm up on every call (``EVP_MAC_fetch``: locks and atomics, measured at
#: 0.33 ms a call in an emulated guest), a copy does not.
_EMPTY: dict[str, Any] = {}


def _hmac(key: bytes, message: bytes, hash_name: HashName) -> bytes:
    """HMAC (RFC 2104) — ``hmac.digest(key, message, hash_name)``, from copies of one hash object."""
    return _hmacs(key, (message,), hash_name)[0]


def _hmacs(key: bytes, messages: tuple[bytes, ...], hash_name: HashName) -> list[bytes]:
    """``_hmac(key, message)`` of each message, the key's inner and outer pads hashed once for all."""
    empty = _EMPTY.get(hash_name)
    if empty is None:
        empty = _EMPTY.setdefault(hash_name, hashlib.new(hash_name))
    if len(key) > empty.block_size:
        key = hashlib.new(hash_name, key).digest()
    key = key.ljust(empty.block_size, b"\0")
    inner_keyed = empty.copy()
    inner_keyed.update(key.translate(_IPAD))
    outer_keyed = empty.copy()
    outer_keyed.update(key.translate(_OPAD))
    digests = []
    for message in messages:
        inner = inner_keyed.copy()
        inner.update(message)
        outer = outer_keyed.copy()
        outer.update(inner.digest())
        digests.append(bytes(outer.digest()))
    return digests


# --- TLS 1.3 ---------------------------------------------------------------------------------------------


def hkdf_expand(prk: bytes, info: bytes, length: int, hash_name: HashName) -> bytes:
    """HKDF-Expand (RFC 5869 §2.3): ``T(i) = HMAC(PRK, T(i-1) | info | i)``, concatenated, cut to ``length``."""
    hash_len = _digest_size(hash_name)
    if not 0 <= length <= 255 * hash_len:
        raise ValueError(f"HKDF-Expand can give 0..{255 * hash_len} bytes with {hash_name}, not {length}")
    okm = b""
    block = b""
    counter = 1
    while len(okm) < length:
        block = _hmac(prk, block + info + bytes([counter]), hash_name)
        okm += block
        counter += 1
    return okm[:length]


def hkdf_expand_label(secret: bytes, label: bytes, context: bytes, length: int, hash_name: HashName) -> bytes:
    """HKDF-Expand-Label (RFC 8446 §7.1)::

        HKDF-Expand-Label(Secret, Label, Context, Length) = HKDF-Expand(Secret, HkdfLabel, Length)

        struct {
            uint16 length = Length;
            opaque label<7..255> = "tls13 " + Label;
            opaque context<0..255> = Context;
        } HkdfLabel;

    ``label`` is given without the ``"tls13 "`` prefix, as the RFC writes it (``b"key"``, ``b"c ap traffic"``).
    """
    if not context and length <= _digest_size(hash_name):
        # The one shape ktls itself derives (keys, IVs, the next secret): one HMAC, its info prepared once.
        return _hmac(secret, _single_block_info(label, length), hash_name)[:length]
    return hkdf_expand(secret, _hkdf_label(label, context, length), length, hash_name)


def _hkdf_label(label: bytes, context: bytes, length: int) -> bytes:
    full_label = _LABEL_PREFIX + label
    if not 7 <= len(full_label) <= 255:
        raise ValueError(f"HkdfLabel.label must be 7..255 bytes, got {len(full_label)}")
    if len(context) > 255:
        raise ValueError(f"HkdfLabel.context must be at most 255 bytes, got {len(context)}")
    if not 0 <= length <= 0xFFFF:
        raise ValueError(f"HkdfLabel.length is a uint16, got {length}")
    return (
        length.to_bytes(2, "big")
        + len(full_label).to_bytes(1, "big")
        + full_label
        + len(context).to_bytes(1, "big")
        + context
    )


@functools.lru_cache(maxsize=64)
def _single_block_info(label: bytes, length: int) -> bytes:
    """HKDF-Expand's input for its first (and, up to Hash.length bytes, only) block: ``HkdfLabel`` with an
    empty context, then the counter 1 (RFC 5869 §2.3: ``T(1) = HMAC(PRK, info | 0x01)``)."""
    return _hkdf_label(label, b"", length) + b"\x01"


def _check_tls13(secret: bytes, suite: CipherSuite) -> None:
    if suite.version is not TLSVersion.TLS1_3:
        raise ValueError(f"{suite.openssl_name} is a TLS 1.2 suite: use key_block()")
    if len(secret) != suite.hash_size:
        raise ValueError(f"{suite.openssl_name} traffic secrets are {suite.hash_size} bytes, got {len(secret)}")


@dataclasses.dataclass(frozen=True, repr=False)
class TrafficKeys:
    """One direction's write key and IV. Unpacks as ``key, iv = keys``; its ``repr`` hides both.

    ``iv`` is the TLS 1.3 ``write_iv`` (12 bytes), or the TLS 1.2 ``fixed_iv`` from the key block (the
    4-byte salt for GCM/CCM, 12 bytes for ChaCha20).
    """

    key: bytes
    iv: bytes

    def __iter__(self) -> Iterator[bytes]:
        yield self.key
        yield self.iv

    def __repr__(self) -> str:
        return f"TrafficKeys(key=<{len(self.key)} bytes>, iv=<{len(self.iv)} bytes>)"


def traffic_key_and_iv(secret: bytes, suite: CipherSuite) -> TrafficKeys:
    """A TLS 1.3 traffic secret's write key and IV (RFC 8446 §7.3)."""
    _check_tls13(secret, suite)
    key_size, iv_size, hash_name = suite.key_size, suite.fixed_iv_size, suite.hash_name
    if max(key_size, iv_size) > _digest_size(hash_name):  # pragma: no cover - no TLS 1.3 suite has it
        key = hkdf_expand_label(secret, b"key", b"", key_size, hash_name)
        return TrafficKeys(key, hkdf_expand_label(secret, b"iv", b"", iv_size, hash_name))
    # Both are HKDF-Expand-Label's one-block case under the same key: one keyed HMAC state for the two.
    key, iv = _hmacs(secret, (_single_block_info(b"key", key_size), _single_block_info(b"iv", iv_size)), hash_name)
    return TrafficKeys(key[:key_size], iv[:iv_size])


def next_traffic_secret(secret: bytes, suite: CipherSuite) -> bytes:
    """The traffic secret after a KeyUpdate (RFC 8446 §7.2)."""
    _check_tls13(secret, suite)
    return hkdf_expand_label(secret, b"traffic upd", b"", suite.hash_size, suite.hash_name)


# --- TLS 1.2 ---------------------------------------------------------------------------------------------


def prf(secret: bytes, label: bytes, seed: bytes, length: int, hash_name: HashName) -> bytes:
    """The TLS 1.2 PRF (RFC 5246 §5): ``P_<hash>(secret, label + seed)`` cut to ``length`` bytes::

        P_hash(secret, seed) = HMAC_hash(secret, A(1) + seed) + HMAC_hash(secret, A(2) + seed) + ...
        A(0) = seed,  A(i) = HMAC_hash(secret, A(i-1))

    ``hash_name`` is the suite's PRF hash: SHA-384 for the ``_SHA384`` suites, SHA-256 for all others.
    """
    if length < 0:
        raise ValueError(f"PRF output length must be ≥ 0, got {length}")
    seed = label + seed
    out = b""
    a = seed
    while len(out) < length:
        a = _hmac(secret, a, hash_name)
        out += _hmac(secret, a + seed, hash_name)
    return out[:length]


@dataclasses.dataclass(frozen=True)
class KeyBlock:
    """The write keys of both sides of a TLS 1.2 connection (RFC 5246 §6.3), MAC keys left out (AEAD)."""

    client: TrafficKeys
    server: TrafficKeys

    def tx_rx(self, *, server_side: bool) -> tuple[TrafficKeys, TrafficKeys]:
        """``(tx, rx)`` for one end: a client sends with the client keys and receives with the server's."""
        return (self.server, self.client) if server_side else (self.client, self.server)


def key_block(master_secret: bytes, client_random: bytes, server_random: bytes, suite: CipherSuite) -> KeyBlock:
    """Cut the TLS 1.2 key block of an AEAD suite into the client and server write keys and IVs."""
    if suite.version is not TLSVersion.TLS1_2:
        raise ValueError(f"{suite.openssl_name} is a TLS 1.3 suite: use traffic_key_and_iv()")
    if len(master_secret) != _MASTER_SECRET_SIZE:
        raise ValueError(f"a TLS 1.2 master secret is {_MASTER_SECRET_SIZE} bytes, got {len(master_secret)}")
    if len(client_random) != _RANDOM_SIZE or len(server_random) != _RANDOM_SIZE:
        raise ValueError(f"client and server randoms are {_RANDOM_SIZE} bytes each")
    key_len, iv_len = suite.key_size, suite.fixed_iv_size
    # mac_key_length is 0 for AEAD ciphers (RFC 5246 §6.2.3.3), so the block starts with the write keys.
    block = prf(master_secret, b"key expansion", server_random + client_random, 2 * (key_len + iv_len), suite.hash_name)
    client_key, server_key = block[:key_len], block[key_len : 2 * key_len]
    ivs = block[2 * key_len :]
    return KeyBlock(TrafficKeys(client_key, ivs[:iv_len]), TrafficKeys(server_key, ivs[iv_len:]))


# --- To the kernel ---------------------------------------------------------------------------------------


def crypto_info(
    suite: CipherSuite, keys: TrafficKeys, rec_seq: int = 0, *, explicit_nonce: int | None = None
) -> CryptoInfo:
    """What ``setsockopt(SOL_TLS, TLS_TX/TLS_RX)`` takes for one direction of a connection using ``suite``.

    ``keys`` come from :func:`traffic_key_and_iv` (TLS 1.3) or :func:`key_block` (TLS 1.2); ``rec_seq`` is
    the sequence number of the next record in that direction. ``explicit_nonce`` (TLS 1.2 GCM/CCM, TX only)
    is the explicit nonce of the next record sent; by default the sequence number (see
    :meth:`CryptoInfo.tls12`).

    Raises :class:`~ktls.errors.CipherUnavailable` when the kernel has no cipher for the suite.
    """
    kernel_cipher = suite.kernel_cipher
    if kernel_cipher is None:
        raise CipherUnavailable(None, suite.unsupported_reason or f"{suite.openssl_name}: no kernel cipher")
    if len(keys.key) != suite.key_size or len(keys.iv) != suite.fixed_iv_size:
        raise ValueError(f"{suite.openssl_name} needs a {suite.key_size}-byte key and {suite.fixed_iv_size}-byte IV")
    if suite.version is TLSVersion.TLS1_3:
        if explicit_nonce is not None:
            raise ValueError("TLS 1.3 records have no explicit nonce")
        return CryptoInfo.tls13(kernel_cipher.cipher_type, keys.key, keys.iv, rec_seq)
    return CryptoInfo.tls12(kernel_cipher.cipher_type, keys.key, keys.iv, rec_seq, explicit_nonce)


def tls13_crypto_info(suite: CipherSuite, traffic_secret: bytes, rec_seq: int = 0) -> CryptoInfo:
    """:func:`crypto_info` straight from a TLS 1.3 traffic secret (RFC 8446 §7.3)."""
    return crypto_info(suite, traffic_key_and_iv(traffic_secret, suite), rec_seq)

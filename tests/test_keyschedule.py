"""The key schedules against published vectors, and end to end against real OpenSSL connections.

Oracles (nothing here trusts the code under test):

* RFC 8448 §3 "Simple 1-RTT Handshake": secrets, the HkdfLabel ``info`` bytes, keys and IVs, and whole
  encrypted records that must *authenticate* with the derived keys (an AEAD tag is a 128-bit checksum of
  every byte we derived);
* the ``cryptography`` package's HKDFExpand (SHA-256, SHA-384) for HKDF-Expand-Label and "traffic upd";
* the TLS 1.2 PRF vectors posted to the IETF TLS WG list
  (https://www.ietf.org/mail-archive/web/tls/current/msg03416.html), P_SHA256 and P_SHA384;
* real TLS connections between two ``ssl.SSLContext`` over ``MemoryBIO`` pairs with ``keylog_filename``
  set: the secrets parsed from the key log must decrypt what OpenSSL actually sent, at the sequence numbers
  we predict, and a ``CryptoInfo`` built from them must decrypt it as the kernel would.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import hmac
import json
import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from ktls.constants import ContentType, HandshakeType, TLSVersion
from ktls.errors import CipherUnavailable
from ktls.kernel.uapi import CipherType, CryptoInfo
from ktls.tls import keyschedule
from ktls.tls.keylog import ConnectionSecrets, KeylogLabel, KeylogParser
from ktls.tls.keyschedule import (
    KeyBlock,
    TrafficKeys,
    crypto_info,
    hkdf_expand,
    hkdf_expand_label,
    key_block,
    next_traffic_secret,
    prf,
    tls13_crypto_info,
    traffic_key_and_iv,
)
from ktls.tls.records import (
    RecordReader,
    TLSRecord,
    client_random_from_client_hello,
    parse_handshake_messages,
    server_random_from_server_hello,
)
from ktls.tls.suites import SUITES, CipherSuite, HashName, suite_by_openssl_name


def h(text: str) -> bytes:
    """Hex as the RFCs print it (spaces and line breaks allowed)."""
    return bytes.fromhex("".join(text.split()))


def _suite(name: str) -> CipherSuite:
    suite = suite_by_openssl_name(name)
    assert suite is not None, name
    return suite


AES128GCM_SHA256 = _suite("TLS_AES_128_GCM_SHA256")
AES256GCM_SHA384 = _suite("TLS_AES_256_GCM_SHA384")

# --- RFC 8448 §3, Simple 1-RTT Handshake (TLS_AES_128_GCM_SHA256) ------------------------------------------
# https://www.rfc-editor.org/rfc/rfc8448#section-3

RFC8448_MASTER_SECRET = h(
    "18 df 06 84 3d 13 a0 8b f2 a4 49 84 4c 5f 8a 47 80 01 bc 4d 4c 62 79 84 d5 a4 1d a8 d0 40 29 19"
)
# Transcript-Hash(ClientHello..server Finished): the context of "c ap traffic" / "s ap traffic".
RFC8448_SERVER_FINISHED_HASH = h(
    "96 08 10 2a 0f 1c cc 6d b6 25 0b 7b 7e 41 7b 1a 00 0e aa da 3d aa e4 77 7a 76 86 c9 ff 83 df 13"
)
RFC8448_C_AP_INFO = h(
    """00 20 12 74 6c 73 31 33 20 63 20 61 70 20 74 72 61 66 66 69 63 20 96 08 10 2a 0f 1c cc 6d b6 25 0b 7b
    7e 41 7b 1a 00 0e aa da 3d aa e4 77 7a 76 86 c9 ff 83 df 13"""
)
RFC8448_KEY_INFO = h("00 10 09 74 6c 73 31 33 20 6b 65 79 00")
RFC8448_IV_INFO = h("00 0c 08 74 6c 73 31 33 20 69 76 00")

# (traffic secret, key, iv) for the four traffic secrets of the trace.
RFC8448_TRAFFIC = {
    "client handshake": (
        h("b3 ed db 12 6e 06 7f 35 a7 80 b3 ab f4 5e 2d 8f 3b 1a 95 07 38 f5 2e 96 00 74 6a 0e 27 a5 5a 21"),
        h("db fa a6 93 d1 76 2c 5b 66 6a f5 d9 50 25 8d 01"),
        h("5b d3 c7 1b 83 6e 0b 76 bb 73 26 5f"),
    ),
    "server handshake": (
        h("b6 7b 7d 69 0c c1 6c 4e 75 e5 42 13 cb 2d 37 b4 e9 c9 12 bc de d9 10 5d 42 be fd 59 d3 91 ad 38"),
        h("3f ce 51 60 09 c2 17 27 d0 f2 e4 e8 6e e4 03 bc"),
        h("5d 31 3e b2 67 12 76 ee 13 00 0b 30"),
    ),
    "client application": (
        h("9e 40 64 6c e7 9a 7f 9d c0 5a f8 88 9b ce 65 52 87 5a fa 0b 06 df 00 87 f7 92 eb b7 c1 75 04 a5"),
        h("17 42 2d da 59 6e d5 d9 ac d8 90 e3 c6 3f 50 51"),
        h("5b 78 92 3d ee 08 57 90 33 e5 23 d9"),
    ),
    "server application": (
        h("a1 1a f9 f0 55 31 f8 56 ad 47 11 6b 45 a9 50 32 82 04 b4 f4 4b fb 6b 3a 4b 4f 1f 3f cb 63 16 43"),
        h("9f 02 28 3b 6c 9c 07 ef c2 6b b9 f2 ac 92 e3 56"),
        h("cf 78 2b 88 dd 83 54 9a ad f1 e9 84"),
    ),
}

# {server} send handshake record: the NewSessionTicket, the first record of the server application epoch.
RFC8448_NEW_SESSION_TICKET_RECORD = h(
    """17 03 03 00 de 3a 6b 8f 90 41 4a 97 d6 95 9c 34 87 68 0d e5 13 4a 2b 24 0e 6c ff ac 11 6e 95 d4 1d 6a
    f8 f6 b5 80 dc f3 d1 1d 63 c7 58 db 28 9a 01 59 40 25 2f 55 71 3e 06 1d c1 3e 07 88 91 a3 8e fb cf 57 53
    ad 8e f1 70 ad 3c 73 53 d1 6d 9d a7 73 b9 ca 7f 2b 9f a1 b6 c0 d4 a3 d0 3f 75 e0 9c 30 ba 1e 62 97 2a c4
    6f 75 f7 b9 81 be 63 43 9b 29 99 ce 13 06 46 15 13 98 91 d5 e4 c5 b4 06 f1 6e 3f c1 81 a7 7c a4 75 84 00
    25 db 2f 0a 77 f8 1b 5a b0 5b 94 c0 13 46 75 5f 69 23 2c 86 51 9d 86 cb ee ac 87 aa c3 47 d1 43 f9 60 5d
    64 f6 50 db 4d 02 3e 70 e9 52 ca 49 fe 51 37 12 1c 74 bc 26 97 68 7e 24 87 46 d6 df 35 30 05 f3 bc e1 86
    96 12 9c 81 53 55 6b 3b 6c 67 79 b3 7b f1 59 85 68 4f"""
)
# {client} send application_data record; its payload is 00 01 02 … 31, as is the server's.
RFC8448_CLIENT_APP_RECORD = h(
    """17 03 03 00 43 a2 3f 70 54 b6 2c 94 d0 af fa fe 82 28 ba 55 cb ef ac ea 42 f9 14 aa 66 bc ab 3f 2b 98
    19 a8 a5 b4 6b 39 5b d5 4a 9a 20 44 1e 2b 62 97 4e 1f 5a 62 92 a2 97 70 14 bd 1e 3d ea e6 3a ee bb 21 69
    49 15 e4"""
)
RFC8448_SERVER_APP_RECORD = h(
    """17 03 03 00 43 2e 93 7e 11 ef 4a c7 40 e5 38 ad 36 00 5f c4 a4 69 32 fc 32 25 d0 5f 82 aa 1b 36 e3 0e
    fa f9 7d 90 e6 df fc 60 2d cb 50 1a 59 a8 fc c4 9c 4b f2 e5 f0 a2 1c 00 47 c2 ab f3 32 54 0d d0 32 e1 67
    c2 95 5d"""
)
RFC8448_APP_PAYLOAD = bytes(range(50))

# The first KeyUpdate of the trace's application secrets. Not in RFC 8448: from Botan's TLS 1.3 cipher-state
# test (src/tests/test_tls_cipher_state.cpp); cross-checked below against the `cryptography` HKDF as well.
UPDATED_TRAFFIC_SECRETS = {
    "client application": h(
        "fc df cc 72 72 5a ae e4 8b f6 4e 4f d8 b7 49 cd bd ba b3 9d 90 da 0b 26 e2 24 5c a6 ea 16 72 07"
    ),
    "server application": h(
        "51 92 1b 8a a3 00 19 76 eb 40 1d 0a 43 19 a8 51 64 16 a6 c5 60 01 a3 57 e5 d1 62 03 1e 84 f9 16"
    ),
}

# --- TLS 1.2 PRF vectors (IETF TLS WG list, msg03416) ----------------------------------------------------------

PRF_SHA256 = (
    h("9b be 43 6b a9 40 f0 17 b1 76 52 84 9a 71 db 35"),
    h("a0 ba 9f 93 6c da 31 18 27 a6 f7 96 ff d5 19 8c"),
    h(
        """e3 f2 29 ba 72 7b e1 7b 8d 12 26 20 55 7c d4 53 c2 aa b2 1d 07 c3 d4 95 32 9b 52 d4 e6 1e db 5a
        6b 30 17 91 e9 0d 35 c9 c9 a4 6b 4e 14 ba f9 af 0f a0 22 f7 07 7d ef 17 ab fd 37 97 c0 56 4b ab
        4f bc 91 66 6e 9d ef 9b 97 fc e3 4f 79 67 89 ba a4 80 82 d1 22 ee 42 c5 a7 2e 5a 51 10 ff f7 01
        87 34 7b 66"""
    ),
)
PRF_SHA384 = (
    h("b8 0b 73 3d 6c ee fc dc 71 56 6e a4 8e 55 67 df"),
    h("cd 66 5c f6 a8 44 7d d6 ff 8b 27 55 5e db 74 65"),
    h(
        """7b 0c 18 e9 ce d4 10 ed 18 04 f2 cf a3 4a 33 6a 1c 14 df fb 49 00 bb 5f d7 94 21 07 e8 1c 83 cd
        e9 ca 0f aa 60 be 9f e3 4f 82 b1 23 3c 91 46 a0 e5 34 cb 40 0f ed 27 00 88 4f 9d c2 36 f8 0e dd
        8b fa 96 11 44 c9 e8 d7 92 ec a7 22 a7 b3 2f c3 d4 16 d4 73 eb c2 c5 fd 4a bf da d0 5d 91 84 25
        9b 5b f8 cd 4d 90 fa 0d 31 e2 de c4 79 e4 f1 a2 60 66 f2 ee a9 a6 92 36 a3 e5 26 55 c9 e9 ae e6
        91 c8 f3 a2 68 54 30 8d 5e aa 3b e8 5e 09 90 70 3d 73 e5 6f"""
    ),
)


# --- AEAD helpers: an independent record decryption, built from the RFCs with `cryptography` -------------------

Aead = AESGCM | AESCCM | ChaCha20Poly1305


def make_aead(suite: CipherSuite, key: bytes) -> Aead:
    name = suite.aead.name
    if name.startswith("AES") and name.endswith("GCM"):
        return AESGCM(key)
    if name.startswith("AES-") and "CCM" in name:
        return AESCCM(key, tag_length=suite.tag_size)
    if name == "ChaCha20-Poly1305":
        return ChaCha20Poly1305(key)
    pytest.skip(f"the cryptography package has no {name}")


def xor_seq(iv: bytes, seq: int) -> bytes:
    """RFC 8446 §5.3 / RFC 7905 §2: the sequence number, left-padded to the IV's length, XOR the IV."""
    return bytes(a ^ b for a, b in zip(iv, seq.to_bytes(len(iv), "big"), strict=True))


def open13(suite: CipherSuite, keys: TrafficKeys, seq: int, record: TLSRecord) -> tuple[int, bytes]:
    """Decrypt a TLS 1.3 record (RFC 8446 §5.2): (inner content type, content)."""
    assert record.content_type is ContentType.APPLICATION_DATA
    inner = make_aead(suite, keys.key).decrypt(xor_seq(keys.iv, seq), record.fragment, record.header.to_bytes())
    stripped = inner.rstrip(b"\0")
    return stripped[-1], stripped[:-1]


def open12(suite: CipherSuite, keys: TrafficKeys, seq: int, record: TLSRecord) -> bytes:
    """Decrypt a TLS 1.2 AEAD record (RFC 5246 §6.2.3.3; nonce per RFC 5288 §3 or RFC 7905 §2)."""
    explicit = suite.explicit_nonce_size
    if explicit:
        nonce, body = keys.iv + record.fragment[:explicit], record.fragment[explicit:]
    else:
        nonce, body = xor_seq(keys.iv, seq), record.fragment
    aad = seq.to_bytes(8, "big") + record.header.to_bytes()[:3] + (len(body) - suite.tag_size).to_bytes(2, "big")
    return make_aead(suite, keys.key).decrypt(nonce, body, aad)


_KERNEL_AEADS: dict[CipherType, type[AESGCM] | type[AESCCM] | type[ChaCha20Poly1305]] = {
    CipherType.AES_GCM_128: AESGCM,
    CipherType.AES_GCM_256: AESGCM,
    CipherType.AES_CCM_128: AESCCM,
    CipherType.CHACHA20_POLY1305: ChaCha20Poly1305,
}


def open_as_kernel(info: CryptoInfo, record: TLSRecord) -> bytes:
    """Decrypt a record using only a ``CryptoInfo``, with the nonce rules the uapi module documents for the
    kernel: TLS 1.3 and ChaCha20 ``(salt || iv) XOR rec_seq``; TLS 1.2 GCM/CCM ``salt || explicit``, where the
    kernel would have *sent* ``iv`` as the explicit part (so the record's must equal it)."""
    aead: Aead = _KERNEL_AEADS[info.cipher_type](info.key)
    header = record.header.to_bytes()
    if info.version is TLSVersion.TLS1_3:
        return aead.decrypt(xor_seq(info.write_iv, info.rec_seq), record.fragment, header)
    if info.cipher.salt_size == 0:
        nonce, body = xor_seq(info.write_iv, info.rec_seq), record.fragment
    else:
        explicit = record.fragment[: info.cipher.iv_size]
        assert explicit == info.iv, "the kernel would have sent another explicit nonce"
        nonce, body = info.salt + explicit, record.fragment[len(explicit) :]
    aad = info.rec_seq.to_bytes(8, "big") + header[:3] + (len(body) - info.cipher.tag_size).to_bytes(2, "big")
    return aead.decrypt(nonce, body, aad)


# --- RFC 8448 ---------------------------------------------------------------------------------------------------


def test_hkdf_label_is_built_as_the_rfc_prints_it() -> None:
    secret = RFC8448_TRAFFIC["server handshake"][0]
    assert hkdf_expand_label(secret, b"key", b"", 16, "sha256") == hkdf_expand(secret, RFC8448_KEY_INFO, 16, "sha256")
    assert hkdf_expand_label(secret, b"iv", b"", 12, "sha256") == hkdf_expand(secret, RFC8448_IV_INFO, 12, "sha256")


def test_derive_secret_with_a_transcript_hash_context() -> None:
    """Derive-Secret(master, "c ap traffic", hash) = HKDF-Expand-Label(…, hash, 32): the context is encoded."""
    client, server = RFC8448_TRAFFIC["client application"][0], RFC8448_TRAFFIC["server application"][0]
    ctx = RFC8448_SERVER_FINISHED_HASH
    assert hkdf_expand(RFC8448_MASTER_SECRET, RFC8448_C_AP_INFO, 32, "sha256") == client
    assert hkdf_expand_label(RFC8448_MASTER_SECRET, b"c ap traffic", ctx, 32, "sha256") == client
    assert hkdf_expand_label(RFC8448_MASTER_SECRET, b"s ap traffic", ctx, 32, "sha256") == server


@pytest.mark.parametrize("name", sorted(RFC8448_TRAFFIC))
def test_rfc8448_traffic_keys(name: str) -> None:
    secret, key, iv = RFC8448_TRAFFIC[name]
    assert tuple(traffic_key_and_iv(secret, AES128GCM_SHA256)) == (key, iv)
    info = tls13_crypto_info(AES128GCM_SHA256, secret, rec_seq=7)
    assert (info.cipher_type, info.key, info.write_iv, info.rec_seq) == (CipherType.AES_GCM_128, key, iv, 7)


def test_rfc8448_records_authenticate_with_the_derived_keys() -> None:
    """The trace's encrypted records open with keys we derived, at the sequence numbers we expect: the
    server's NewSessionTicket is application record 0, its data record 1; the client's data record 0."""
    client_keys = traffic_key_and_iv(RFC8448_TRAFFIC["client application"][0], AES128GCM_SHA256)
    server_keys = traffic_key_and_iv(RFC8448_TRAFFIC["server application"][0], AES128GCM_SHA256)
    records = {}
    for name, raw in (
        ("ticket", RFC8448_NEW_SESSION_TICKET_RECORD),
        ("client", RFC8448_CLIENT_APP_RECORD),
        ("server", RFC8448_SERVER_APP_RECORD),
    ):
        reader = RecordReader()
        reader.feed(raw)
        record = reader.next_record()
        assert record is not None
        assert reader.buffered == 0
        records[name] = record

    content_type, content = open13(AES128GCM_SHA256, server_keys, 0, records["ticket"])
    assert content_type == ContentType.HANDSHAKE
    messages, tail = parse_handshake_messages(content)
    assert [m.handshake_type for m in messages] == [HandshakeType.NEW_SESSION_TICKET]
    assert tail == b""
    assert open13(AES128GCM_SHA256, client_keys, 0, records["client"]) == (23, RFC8448_APP_PAYLOAD)
    assert open13(AES128GCM_SHA256, server_keys, 1, records["server"]) == (23, RFC8448_APP_PAYLOAD)
    # ... and as the kernel would, from the CryptoInfo alone.
    info = crypto_info(AES128GCM_SHA256, server_keys, rec_seq=1)
    assert open_as_kernel(info, records["server"]) == RFC8448_APP_PAYLOAD + b"\x17"


@pytest.mark.parametrize("name", sorted(UPDATED_TRAFFIC_SECRETS))
def test_key_update_secret(name: str) -> None:
    secret = RFC8448_TRAFFIC[name][0]
    assert next_traffic_secret(secret, AES128GCM_SHA256) == UPDATED_TRAFFIC_SECRETS[name]


# --- HKDF against `cryptography` ----------------------------------------------------------------------------------

_HASHES: dict[str, hashes.HashAlgorithm] = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384()}


def reference_hkdf_label(length: int, label: bytes, context: bytes) -> bytes:
    """RFC 8446 §7.1 HkdfLabel, written out again independently."""
    full = b"tls13 " + label
    return length.to_bytes(2, "big") + bytes([len(full)]) + full + bytes([len(context)]) + context


@given(
    hash_name=st.sampled_from(["sha256", "sha384"]),
    secret=st.binary(min_size=32, max_size=48),
    label=st.binary(min_size=1, max_size=249),
    context=st.binary(max_size=255),
    length=st.integers(min_value=1, max_value=255 * 32),
)
def test_hkdf_expand_label_matches_cryptography(
    hash_name: HashName, secret: bytes, label: bytes, context: bytes, length: int
) -> None:
    expected = HKDFExpand(_HASHES[hash_name], length, reference_hkdf_label(length, label, context)).derive(secret)
    assert hkdf_expand_label(secret, label, context, length, hash_name) == expected


@pytest.mark.parametrize("suite", [s for s in SUITES if s.version is TLSVersion.TLS1_3], ids=lambda s: s.openssl_name)
def test_tls13_suite_keys_match_cryptography(suite: CipherSuite) -> None:
    """Every TLS 1.3 row: key and IV sizes, and its hash (SHA-384 for AES-256-GCM), as HKDF derives them."""
    if suite.hash_name not in hashlib.algorithms_available:
        pytest.skip(f"this OpenSSL has no {suite.hash_name}")
    secret = bytes(range(suite.hash_size))
    algorithm: hashes.HashAlgorithm = hashes.SM3() if suite.hash_name == "sm3" else _HASHES[suite.hash_name]

    def expand(label: bytes, length: int) -> bytes:
        return HKDFExpand(algorithm, length, reference_hkdf_label(length, label, b"")).derive(secret)

    assert tuple(traffic_key_and_iv(secret, suite)) == (expand(b"key", suite.key_size), expand(b"iv", 12))
    assert next_traffic_secret(secret, suite) == expand(b"traffic upd", suite.hash_size)


def test_hkdf_limits() -> None:
    with pytest.raises(ValueError, match=r"HkdfLabel\.label"):
        hkdf_expand_label(b"s" * 32, b"x" * 250, b"", 16, "sha256")
    with pytest.raises(ValueError, match="context"):
        hkdf_expand_label(b"s" * 32, b"key", b"c" * 256, 16, "sha256")
    with pytest.raises(ValueError, match="HKDF-Expand"):
        hkdf_expand(b"s" * 32, b"", 255 * 32 + 1, "sha256")
    assert len(hkdf_expand(b"s" * 32, b"", 255 * 32, "sha256")) == 255 * 32


def test_tls13_functions_refuse_wrong_input() -> None:
    tls12 = _suite("ECDHE-RSA-AES128-GCM-SHA256")
    with pytest.raises(ValueError, match=r"TLS 1\.2 suite"):
        traffic_key_and_iv(b"s" * 32, tls12)
    with pytest.raises(ValueError, match="48 bytes"):
        traffic_key_and_iv(b"s" * 32, AES256GCM_SHA384)  # a SHA-256-sized secret for a SHA-384 suite
    with pytest.raises(ValueError, match="32 bytes"):
        next_traffic_secret(b"s" * 48, AES128GCM_SHA256)


# --- TLS 1.2 ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("vector", "hash_name"), [(PRF_SHA256, "sha256"), (PRF_SHA384, "sha384")])
def test_prf_vectors(vector: tuple[bytes, bytes, bytes], hash_name: HashName) -> None:
    secret, seed, output = vector
    assert prf(secret, b"test label", seed, len(output), hash_name) == output
    # P_hash is a stream: a shorter output is a prefix (an off-by-one in the A(i) chain would break this).
    assert prf(secret, b"test label", seed, 33, hash_name) == output[:33]
    assert prf(secret, b"test label", seed, 0, hash_name) == b""


def test_key_block_layout() -> None:
    """RFC 5246 §6.3: the PRF over server_random + client_random, cut into keys then IVs, client first."""
    master, client_random, server_random = bytes(range(48)), b"C" * 32, b"S" * 32
    for name, key_len, iv_len in (
        ("ECDHE-RSA-AES128-GCM-SHA256", 16, 4),
        ("ECDHE-RSA-AES256-GCM-SHA384", 32, 4),
        ("ECDHE-RSA-CHACHA20-POLY1305", 32, 12),
    ):
        suite = _suite(name)
        raw = prf(master, b"key expansion", server_random + client_random, 2 * (key_len + iv_len), suite.hash_name)
        block = key_block(master, client_random, server_random, suite)
        assert block.client.key + block.server.key + block.client.iv + block.server.iv == raw
        assert block.tx_rx(server_side=False) == (block.client, block.server)
        assert block.tx_rx(server_side=True) == (block.server, block.client)


def test_key_block_refuses_wrong_input() -> None:
    suite = _suite("ECDHE-RSA-AES128-GCM-SHA256")
    with pytest.raises(ValueError, match="48 bytes"):
        key_block(b"m" * 47, b"c" * 32, b"s" * 32, suite)
    with pytest.raises(ValueError, match="randoms"):
        key_block(b"m" * 48, b"c" * 31, b"s" * 32, suite)
    with pytest.raises(ValueError, match=r"TLS 1\.3 suite"):
        key_block(b"m" * 48, b"c" * 32, b"s" * 32, AES128GCM_SHA256)


# --- To CryptoInfo ------------------------------------------------------------------------------------------------


def test_crypto_info_tls12_gcm_and_chacha() -> None:
    gcm = _suite("ECDHE-RSA-AES128-GCM-SHA256")
    info = crypto_info(gcm, TrafficKeys(b"k" * 16, b"salt"), rec_seq=1, explicit_nonce=0x1122334455667788)
    assert (info.version, info.cipher_type, info.salt, info.iv) == (
        TLSVersion.TLS1_2,
        CipherType.AES_GCM_128,
        b"salt",
        h("1122334455667788"),
    )
    chacha = _suite("ECDHE-RSA-CHACHA20-POLY1305")
    info = crypto_info(chacha, TrafficKeys(b"k" * 32, b"i" * 12), rec_seq=5)
    assert (info.salt, info.iv, info.rec_seq) == (b"", b"i" * 12, 5)


def test_crypto_info_refusals() -> None:
    with pytest.raises(CipherUnavailable, match="8-byte tag"):
        crypto_info(_suite("ECDHE-ECDSA-AES128-CCM8"), TrafficKeys(b"k" * 16, b"salt"))
    with pytest.raises(CipherUnavailable, match="256-bit key"):
        crypto_info(_suite("ECDHE-ECDSA-AES256-CCM"), TrafficKeys(b"k" * 32, b"salt"))
    with pytest.raises(ValueError, match="16-byte key and 12-byte IV"):
        crypto_info(AES128GCM_SHA256, TrafficKeys(b"k" * 16, b"salt"))
    with pytest.raises(ValueError, match="no explicit nonce"):
        crypto_info(AES128GCM_SHA256, TrafficKeys(b"k" * 16, b"i" * 12), explicit_nonce=1)


def test_key_material_never_in_repr() -> None:
    keys = TrafficKeys(b"\xaa" * 16, b"\xbb" * 12)
    block = KeyBlock(keys, keys)
    for text in (repr(keys), str(keys), repr(block), f"{block}"):
        assert "aa" not in text
        assert "xaa" not in text
        assert "bb" not in text
    assert repr(keys) == "TrafficKeys(key=<16 bytes>, iv=<12 bytes>)"
    key, iv = keys
    assert (key, iv) == (b"\xaa" * 16, b"\xbb" * 12)


# --- End to end: real OpenSSL connections over MemoryBIOs ---------------------------------------------------------

CLIENT_DATA = (b"GET / HTTP/1.1\r\n\r\n", b"second client record")
SERVER_DATA = (b"HTTP/1.1 200 OK\r\n\r\n", b"second server record")
# OpenSSL's default SSL_OP_NO_EXTENDED_MASTER_SECRET (SSL_OP_BIT(0), OpenSSL 3.0): Python has no name for it.
OP_NO_EXTENDED_MASTER_SECRET = 1 << 0


@dataclasses.dataclass(frozen=True)
class Capture:
    """Everything one in-process connection left behind: the cipher, both key logs, both byte streams."""

    cipher: str
    version: str
    client_keylog: bytes
    server_keylog: bytes
    c2s: bytes
    s2c: bytes
    num_tickets: int

    def to_json(self) -> str:
        fields = dataclasses.asdict(self)
        return json.dumps({k: v.hex() if isinstance(v, bytes) else v for k, v in fields.items()})

    @classmethod
    def from_json(cls, text: str) -> Capture:
        raw = json.loads(text)
        return cls(
            cipher=str(raw["cipher"]),
            version=str(raw["version"]),
            client_keylog=bytes.fromhex(raw["client_keylog"]),
            server_keylog=bytes.fromhex(raw["server_keylog"]),
            c2s=bytes.fromhex(raw["c2s"]),
            s2c=bytes.fromhex(raw["s2c"]),
            num_tickets=int(raw["num_tickets"]),
        )


def _make_cert(directory: Path, kind: str) -> tuple[Path, Path]:
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    key = rsa.generate_private_key(65537, 2048) if kind == "rsa" else ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{kind}.crt", directory / f"{kind}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    directory = tmp_path_factory.mktemp("certs")
    return {kind: _make_cert(directory, kind) for kind in ("rsa", "ecdsa")}


def _move(source: ssl.MemoryBIO, sink: ssl.MemoryBIO, log: bytearray) -> None:
    data = source.read()
    log += data
    sink.write(data)


def _read_exactly(obj: ssl.SSLObject, size: int) -> bytes:
    data = b""
    while len(data) < size:
        data += obj.read(size - len(data))
    return data


def run_connection(cert: Path, key: Path, workdir: Path, tls12_ciphers: str | None = None, options: int = 0) -> Capture:
    """One TLS connection between two SSLContexts in this process, bytes shuttled by hand between BIOs."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE  # verification is not what is tested here
    client_ctx.options |= options
    if tls12_ciphers is not None:
        for ctx in (client_ctx, server_ctx):
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            ctx.set_ciphers(tls12_ciphers + ":@SECLEVEL=0")
    client_ctx.keylog_filename = str(workdir / "client.keys")
    server_ctx.keylog_filename = str(workdir / "server.keys")

    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    c2s, s2c = bytearray(), bytearray()
    for _ in range(10):
        pending = False
        for obj in (client, server):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pending = True
        _move(c_out, s_in, c2s)
        _move(s_out, c_in, s2c)
        if not pending:
            break
    else:
        raise AssertionError("handshake did not finish")

    for data in CLIENT_DATA:
        client.write(data)
    _move(c_out, s_in, c2s)
    assert _read_exactly(server, sum(map(len, CLIENT_DATA))) == b"".join(CLIENT_DATA)
    for data in SERVER_DATA:
        server.write(data)
    _move(s_out, c_in, s2c)
    assert _read_exactly(client, sum(map(len, SERVER_DATA))) == b"".join(SERVER_DATA)
    _move(c_out, s_in, c2s)  # nothing expected, but keep the transcript complete

    cipher = client.cipher()
    assert cipher is not None
    assert cipher == server.cipher()
    return Capture(
        cipher=cipher[0],
        version=cipher[1],
        client_keylog=(workdir / "client.keys").read_bytes(),
        server_keylog=(workdir / "server.keys").read_bytes(),
        c2s=bytes(c2s),
        s2c=bytes(s2c),
        num_tickets=server_ctx.num_tickets,
    )


def split_records(stream: bytes) -> list[TLSRecord]:
    reader = RecordReader()
    reader.feed(stream)
    records = list(reader)
    assert reader.buffered == 0, "the stream ends inside a record"
    return records


def connection_secrets(capture: Capture, require: list[KeylogLabel]) -> ConnectionSecrets:
    """The connection's secrets from the client's key log, checked equal to the server's."""
    client_random = client_random_from_client_hello(capture.c2s)
    assert client_random is not None
    found = []
    for keylog in (capture.client_keylog, capture.server_keylog):
        parser = KeylogParser()
        # Byte by byte: every line is cut everywhere, as a reader racing the writer would see it.
        for i in range(len(keylog)):
            parser.feed(keylog[i : i + 1])
        secrets = parser.take(client_random, require=require)
        assert secrets is not None, f"no {require} for {client_random.hex()} in the key log"
        found.append(secrets)
    assert dict(found[0].secrets) == dict(found[1].secrets), "both ends logged the same secrets"
    return found[0]


def verify_tls13(capture: Capture) -> None:
    suite = suite_by_openssl_name(capture.cipher)
    assert suite is not None
    assert suite.version is TLSVersion.TLS1_3
    assert capture.version == "TLSv1.3"
    secrets = connection_secrets(
        capture,
        [
            KeylogLabel.CLIENT_HANDSHAKE_TRAFFIC_SECRET,
            KeylogLabel.SERVER_HANDSHAKE_TRAFFIC_SECRET,
            KeylogLabel.CLIENT_TRAFFIC_SECRET_0,
            KeylogLabel.SERVER_TRAFFIC_SECRET_0,
        ],
    )
    assert secrets.version is TLSVersion.TLS1_3

    def keys(label: KeylogLabel) -> TrafficKeys:
        secret = secrets.get(label)
        assert secret is not None
        return traffic_key_and_iv(bytes(secret), suite)

    pair = secrets.traffic_secrets(server_side=False)
    assert pair is not None
    client_app, server_app = (bytes(s) for s in pair)

    for stream, hs_label, app_secret, app_data, is_server in (
        (capture.c2s, KeylogLabel.CLIENT_HANDSHAKE_TRAFFIC_SECRET, client_app, CLIENT_DATA, False),
        (capture.s2c, KeylogLabel.SERVER_HANDSHAKE_TRAFFIC_SECRET, server_app, SERVER_DATA, True),
    ):
        # Handshake epoch: encrypted records up to and including the one that ends with Finished.
        encrypted = iter([r for r in split_records(stream) if r.content_type is ContentType.APPLICATION_DATA])
        hs_keys, handshake, seq = keys(hs_label), b"", 0
        while True:
            content_type, content = open13(suite, hs_keys, seq, next(encrypted))
            assert content_type == ContentType.HANDSHAKE
            handshake += content
            seq += 1
            messages, tail = parse_handshake_messages(handshake)
            if messages and messages[-1].handshake_type is HandshakeType.FINISHED and not tail:
                assert len(messages[-1].body) == suite.hash_size  # verify_data is Hash.length
                break
        # Application epoch, from sequence number 0.
        app_keys = traffic_key_and_iv(app_secret, suite)
        opened = [(seq, *open13(suite, app_keys, seq, record)) for seq, record in enumerate(encrypted)]
        tickets = [(s, c) for s, t, c in opened if t == ContentType.HANDSHAKE]
        data = [(s, c) for s, t, c in opened if t == ContentType.APPLICATION_DATA]
        if is_server:
            # The server's first application-epoch records are its NewSessionTickets (sent during the final
            # handshake step): its first data record's sequence number is their count, not 0.
            assert len(tickets) == capture.num_tickets > 0
            for _, content in tickets:
                messages, tail = parse_handshake_messages(content)
                assert [m.handshake_type for m in messages] == [HandshakeType.NEW_SESSION_TICKET]
                assert not tail
        else:
            assert tickets == []
        assert [c for _, c in data] == list(app_data)
        first_data_seq = data[0][0]
        assert first_data_seq == len(tickets)
        # What the kernel would do with a CryptoInfo handed over at that point.
        if suite.kernel_cipher is not None and suite.cipher_type in _KERNEL_AEADS:
            info = tls13_crypto_info(suite, app_secret, rec_seq=first_data_seq)
            record = [r for r in split_records(stream) if r.content_type is ContentType.APPLICATION_DATA][
                seq + first_data_seq
            ]
            assert open_as_kernel(info, record) == app_data[0] + bytes([ContentType.APPLICATION_DATA])


def hello_extensions(stream: bytes) -> list[int]:
    """The extension types of the hello at the start of ``stream`` (RFC 5246 §7.4.1.2-3), parsed here
    independently of ktls.tls.records."""
    body = stream[5 + 4 :]  # one record header, one handshake header
    is_client = stream[5] == HandshakeType.CLIENT_HELLO
    offset = 2 + 32
    offset += 1 + body[offset]  # session_id
    if is_client:
        offset += 2 + int.from_bytes(body[offset : offset + 2], "big")  # cipher_suites
        offset += 1 + body[offset]  # compression_methods
    else:
        offset += 2 + 1  # cipher_suite, compression_method
    end = offset + 2 + int.from_bytes(body[offset : offset + 2], "big")
    offset += 2
    types = []
    while offset < end:
        types.append(int.from_bytes(body[offset : offset + 2], "big"))
        offset += 4 + int.from_bytes(body[offset + 2 : offset + 4], "big")
    return types


EXTENDED_MASTER_SECRET = 23  # RFC 7627 §5.1 extension type


def verify_tls12(capture: Capture) -> list[list[int]]:
    """Check a TLS 1.2 capture; returns the explicit nonces of each direction's encrypted records."""
    suite = suite_by_openssl_name(capture.cipher)
    assert suite is not None
    assert suite.version is TLSVersion.TLS1_2
    assert capture.version == "TLSv1.2"
    secrets = connection_secrets(capture, [KeylogLabel.CLIENT_RANDOM])
    master = secrets.master_secret
    assert master is not None
    assert secrets.version is TLSVersion.TLS1_2
    server_random = server_random_from_server_hello(capture.s2c)
    assert server_random is not None
    block = key_block(bytes(master), secrets.client_random, server_random, suite)

    all_nonces = []
    for stream, keys, app_data in ((capture.c2s, block.client, CLIENT_DATA), (capture.s2c, block.server, SERVER_DATA)):
        records = split_records(stream)
        ccs = [i for i, r in enumerate(records) if r.content_type is ContentType.CHANGE_CIPHER_SPEC]
        assert len(ccs) == 1
        encrypted = records[ccs[0] + 1 :]  # sequence numbers restart at 0 after ChangeCipherSpec
        finished = open12(suite, keys, 0, encrypted[0])
        messages, tail = parse_handshake_messages(finished)
        assert [(m.handshake_type, len(m.body)) for m in messages] == [(HandshakeType.FINISHED, 12)]
        assert not tail
        assert [open12(suite, keys, seq, r) for seq, r in enumerate(encrypted[1:], 1)] == list(app_data)
        nonces = [int.from_bytes(r.fragment[: suite.explicit_nonce_size], "big") for r in encrypted]
        all_nonces.append(nonces if suite.explicit_nonce_size else [])
        # What the kernel would do with a CryptoInfo handed over after Finished: sequence number 1 and, for
        # GCM/CCM, the explicit nonce that follows Finished's.
        if suite.kernel_cipher is not None and suite.cipher_type in _KERNEL_AEADS:
            explicit = nonces[0] + 1 if suite.explicit_nonce_size else None
            info = crypto_info(suite, keys, rec_seq=1, explicit_nonce=explicit)
            assert open_as_kernel(info, encrypted[1]) == app_data[0]
    return all_nonces


def test_tls13_default_suite_end_to_end(certs: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    capture = run_connection(*certs["rsa"], tmp_path)
    assert capture.cipher == "TLS_AES_256_GCM_SHA384"  # OpenSSL's first choice: the SHA-384 schedule
    verify_tls13(capture)


# TLS 1.3 suites cannot be chosen through the ssl module (it has no SSL_CTX_set_ciphersuites); an OpenSSL
# configuration file can, for a fresh process.
_OPENSSL_CONF = """\
openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_module
[ssl_module]
system_default = tls_defaults
[tls_defaults]
Ciphersuites = {suite}
"""


@pytest.mark.parametrize(
    "name",
    [
        "TLS_AES_128_GCM_SHA256",
        "TLS_AES_256_GCM_SHA384",
        "TLS_CHACHA20_POLY1305_SHA256",
        "TLS_AES_128_CCM_SHA256",
        "TLS_AES_128_CCM_8_SHA256",
    ],
)
def test_tls13_every_suite_end_to_end(name: str, certs: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    conf = tmp_path / "openssl.cnf"
    conf.write_text(_OPENSSL_CONF.format(suite=name))
    cert, key = certs["ecdsa"]
    proc = subprocess.run(
        [sys.executable, __file__, str(cert), str(key), str(tmp_path)],
        env={**os.environ, "OPENSSL_CONF": str(conf)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    capture = Capture.from_json(proc.stdout)
    if capture.cipher != name:
        pytest.skip(f"this Python's OpenSSL ignored OPENSSL_CONF (negotiated {capture.cipher}, not {name})")
    verify_tls13(capture)


TLS12_CASES = [
    ("rsa", "ECDHE-RSA-AES128-GCM-SHA256", 0),
    ("rsa", "ECDHE-RSA-AES128-GCM-SHA256", OP_NO_EXTENDED_MASTER_SECRET),
    ("rsa", "ECDHE-RSA-AES256-GCM-SHA384", 0),
    ("rsa", "ECDHE-RSA-CHACHA20-POLY1305", 0),
    ("rsa", "AES128-GCM-SHA256", 0),  # RSA key exchange
    ("ecdsa", "ECDHE-ECDSA-AES128-CCM", 0),
    ("ecdsa", "ECDHE-ECDSA-AES256-CCM", 0),  # no kernel cipher: keys still right, CryptoInfo refused
    ("ecdsa", "ECDHE-ECDSA-AES128-CCM8", 0),  # 8-byte tag
]


@pytest.mark.parametrize(("cert", "name", "options"), TLS12_CASES)
def test_tls12_end_to_end(
    cert: str, name: str, options: int, certs: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    capture = run_connection(*certs[cert], tmp_path, tls12_ciphers=name, options=options)
    assert capture.cipher == name
    ems = not options & OP_NO_EXTENDED_MASTER_SECRET
    assert (EXTENDED_MASTER_SECRET in hello_extensions(capture.s2c)) is ems  # the server accepted it, or not
    nonces = verify_tls12(capture)
    # OpenSSL counts the explicit nonce up by one per record (from a start of its choosing): the hand-off
    # continues at the last one + 1, which is what verify_tls12 checked the kernel would send.
    for direction in nonces:
        assert direction == [direction[0] + i for i in range(len(direction))]
    suite = _suite(name)
    if suite.kernel_cipher is None:
        with pytest.raises(CipherUnavailable):
            crypto_info(suite, TrafficKeys(b"k" * suite.key_size, b"s" * suite.fixed_iv_size))


def _capture_main(argv: list[str]) -> None:
    """Subprocess entry point: one connection under the OPENSSL_CONF the parent set; the capture as JSON."""
    cert, key, workdir = (Path(arg) for arg in argv)
    print(run_connection(cert, key, workdir).to_json())


if __name__ == "__main__":
    _capture_main(sys.argv[1:])


@pytest.mark.parametrize("hash_name", ["sha256", "sha384"])
@settings(max_examples=200, deadline=None)
@given(key=st.binary(max_size=300), message=st.binary(max_size=300))
def test_hmac_from_hash_copies_is_hmac(hash_name: HashName, key: bytes, message: bytes) -> None:
    # Catches: a pad, block size or long-key rule of RFC 2104 got wrong in the copy-based HMAC that every
    # HKDF and PRF step runs on (keys longer than a block are hashed first: up to 300 bytes here).
    assert keyschedule._hmac(key, message, hash_name) == hmac.digest(key, message, hash_name)

"""The pure-Python AEAD *open* of :mod:`ktls.tls.aead` against the ``cryptography`` package and published vectors.

:func:`ktls.tls.aead.open_aead` is what proves, before the kernel is keyed, that the key log's secrets are the
connection's own (:mod:`ktls.tls.proof`). Two ways it could be wrong, and what catches each here:

* it *rejects* a good message (a wrong S-box, GHASH, CCM formatting, Poly1305 clamp, a counter that does not
  carry…): every connection would fall back to userspace TLS. The property tests open what ``cryptography``
  (OpenSSL) sealed, for random keys, nonces, plaintexts of 0..300 bytes and AAD of 0..40 bytes, and one long
  record (counters past 256 blocks); the published vectors pin the exact bytes independently of both.
* it *accepts* a bad one (a tag compare that ignores some bytes, a nonce or AAD that is not authenticated):
  the proof would prove nothing. Every single-bit change of ciphertext, tag, nonce or AAD must raise
  :class:`~ktls.tls.aead.AuthenticationFailed`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Protocol

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM, ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from ktls.tls import libcrypto
from ktls.tls.aead import AuthenticationFailed, authenticate, can_open, open_aead
from ktls.tls.aria import ARIA
from ktls.tls.suites import AEADS, AES128_CCM, AES128_GCM, AES256_GCM, ARIA128_GCM, ARIA256_GCM, CHACHA20_POLY1305, Aead
from reference_block_aeads import aria_gcm


class Sealer(Protocol):
    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None, /) -> bytes: ...


def _ccm16(key: bytes) -> Sealer:
    return AESCCM(key, tag_length=16)  # TLS: RFC 6655's AES-128-CCM, 16-byte tag (the kernel's only CCM)


#: The AEADs ktls opens, each with the ``cryptography`` AEAD that seals the same way.
SEALERS: dict[str, tuple[Aead, Callable[[bytes], Sealer]]] = {
    AES128_GCM.name: (AES128_GCM, AESGCM),
    AES256_GCM.name: (AES256_GCM, AESGCM),
    AES128_CCM.name: (AES128_CCM, _ccm16),
    CHACHA20_POLY1305.name: (CHACHA20_POLY1305, ChaCha20Poly1305),
    # cryptography has no ARIA: the tests' own ARIA-GCM (tests/reference_block_aeads.py, separate code,
    # checked against RFC 5794 and, as a mode, against cryptography's AES-GCM).
    ARIA128_GCM.name: (ARIA128_GCM, aria_gcm),
    ARIA256_GCM.name: (ARIA256_GCM, aria_gcm),
}
NAMES = sorted(SEALERS)

PROPERTY_SETTINGS = settings(max_examples=150, deadline=None)


@pytest.fixture(autouse=True, scope="module", params=["libcrypto", "python"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test runs twice: AES-GCM and ChaCha20-Poly1305 opened by the ``libcrypto`` that ``ssl`` runs on
    (:mod:`ktls.tls.libcrypto`), then all six AEADs by the pure-Python code it falls back to."""
    if request.param == "libcrypto":
        if libcrypto.opener(AES128_GCM.name) is None:
            pytest.skip("no libcrypto reachable here: only the pure-Python AEADs")
        yield request.param
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(libcrypto, "opener", lambda name: None)
        yield request.param


def seal(name: str, key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    _, factory = SEALERS[name]
    return factory(key).encrypt(nonce, plaintext, aad)


def draw_message(data: st.DataObject, aead: Aead) -> tuple[bytes, bytes, bytes, bytes]:
    key = data.draw(st.binary(min_size=aead.key_size, max_size=aead.key_size), label="key")
    nonce = data.draw(st.binary(min_size=12, max_size=12), label="nonce")
    plaintext = data.draw(st.binary(max_size=300), label="plaintext")
    aad = data.draw(st.binary(max_size=40), label="aad")
    return key, nonce, plaintext, aad


def flip(data: bytes, bit: int) -> bytes:
    changed = bytearray(data)
    changed[bit // 8] ^= 0x80 >> (bit % 8)
    return bytes(changed)


# --- Property tests against cryptography ---------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_any_byte_range_decrypts_alone(name: str, data: st.DataObject) -> None:
    # Catches: a wrong counter for a range that starts mid-message (GCM's 16-byte and ChaCha20's 64-byte key
    # stream blocks, counters from 2 and 1), an off-by-one at block edges — the proof and the deferred window
    # read only a record's last bytes or its message headers.
    aead, _ = SEALERS[name]
    key, nonce, plaintext, aad = draw_message(data, aead)
    opened = authenticate(aead, key, nonce, seal(name, key, nonce, plaintext, aad), aad)
    assert len(opened) == len(plaintext)
    start = data.draw(st.integers(0, len(plaintext)), label="start")
    end = data.draw(st.integers(start, len(plaintext)), label="end")
    assert opened.read(start, end) == plaintext[start:end]
    assert opened.read(-5) == plaintext[-5:]


@pytest.mark.parametrize("name", NAMES)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_opens_what_cryptography_sealed(name: str, data: st.DataObject) -> None:
    # Catches: any arithmetic slip in AES / GHASH / CCM's B0 and length encodings / ChaCha20 / Poly1305, and
    # edge cases of lengths (empty plaintext, empty AAD, partial last blocks) — a good record that would not open.
    aead, _ = SEALERS[name]
    key, nonce, plaintext, aad = draw_message(data, aead)
    sealed = seal(name, key, nonce, plaintext, aad)
    assert open_aead(aead, key, nonce, sealed, aad) == plaintext


@pytest.mark.parametrize("name", NAMES)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_any_flipped_bit_fails_authentication(name: str, data: st.DataObject) -> None:
    # Catches: a byte of ciphertext, tag, nonce or AAD that does not take part in the tag (e.g. a tag
    # compared on a prefix, AAD not padded/hashed, the nonce only used for the key stream).
    aead, _ = SEALERS[name]
    key, nonce, plaintext, aad = draw_message(data, aead)
    sealed = seal(name, key, nonce, plaintext, aad)
    fields = {"sealed": sealed, "nonce": nonce, "aad": aad}
    where = data.draw(st.sampled_from([field for field, value in fields.items() if value]), label="field")
    bit = data.draw(st.integers(0, 8 * len(fields[where]) - 1), label="bit")
    fields[where] = flip(fields[where], bit)
    with pytest.raises(AuthenticationFailed):
        open_aead(aead, key, fields["nonce"], fields["sealed"], fields["aad"])


@pytest.mark.parametrize("name", NAMES)
def test_every_bit_of_tag_nonce_and_aad_counts(name: str) -> None:
    # Catches the same as above, exhaustively for the 128 tag bits, 96 nonce bits and every AAD bit of a
    # TLS 1.3 record header (the AAD a proof actually uses), where random sampling could miss one.
    aead, _ = SEALERS[name]
    key, nonce, aad = os.urandom(aead.key_size), os.urandom(12), bytes.fromhex("1703030025")
    plaintext = b"\x14\x00\x00\x20" + os.urandom(32) + b"\x16"  # a Finished and its inner content type
    sealed = seal(name, key, nonce, plaintext, aad)
    assert open_aead(aead, key, nonce, sealed, aad) == plaintext
    tag_start = 8 * (len(sealed) - 16)
    for bit in range(tag_start, 8 * len(sealed)):
        with pytest.raises(AuthenticationFailed):
            open_aead(aead, key, nonce, flip(sealed, bit), aad)
    for bit in range(8 * len(nonce)):
        with pytest.raises(AuthenticationFailed):
            open_aead(aead, key, flip(nonce, bit), sealed, aad)
    for bit in range(8 * len(aad)):
        with pytest.raises(AuthenticationFailed):
            open_aead(aead, key, nonce, sealed, flip(aad, bit))
    with pytest.raises(AuthenticationFailed):
        open_aead(aead, key, nonce, sealed, aad + b"\0")  # AAD length is authenticated, not just its bytes
    with pytest.raises(AuthenticationFailed):
        open_aead(aead, os.urandom(aead.key_size), nonce, sealed, aad)  # another key


@pytest.mark.parametrize("name", NAMES)
def test_a_full_size_record(name: str) -> None:
    # Catches: a block counter that does not carry past its low byte (16 KiB + 256 = 1040 blocks), or a CCM
    # length field that truncates lengths above 255.
    aead, _ = SEALERS[name]
    key, nonce, aad = os.urandom(aead.key_size), os.urandom(12), os.urandom(13)
    plaintext = os.urandom(2**14 + 256)
    sealed = seal(name, key, nonce, plaintext, aad)
    assert open_aead(aead, key, nonce, sealed, aad) == plaintext


# --- Sizes and what cannot be opened -------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_wrong_key_and_nonce_sizes_are_value_errors(name: str) -> None:
    # Catches: a key of the wrong size silently accepted (AES-256 keys given to AES-128-GCM would "work" and
    # fail every tag, making a configuration error look like an attack), or a crash other than ValueError.
    aead, _ = SEALERS[name]
    key, nonce = os.urandom(aead.key_size), os.urandom(12)
    sealed = seal(name, key, nonce, b"payload", b"aad")
    for size in (0, 1, 15, 16, 17, 24, 31, 32, 33, 64):
        if size == aead.key_size:
            continue
        with pytest.raises(ValueError, match="key") as caught:
            open_aead(aead, os.urandom(size), nonce, sealed, b"aad")
        assert not isinstance(caught.value, AuthenticationFailed), size
    for size in (0, 8, 11, 13, 16, 24):
        with pytest.raises(ValueError, match="nonce") as caught:
            open_aead(aead, key, os.urandom(size), sealed, b"aad")
        assert not isinstance(caught.value, AuthenticationFailed), size


@pytest.mark.parametrize("name", NAMES)
def test_shorter_than_a_tag_fails_authentication(name: str) -> None:
    # Catches: a truncated record read as an empty ciphertext with a short tag (IndexError or, worse, a
    # tag comparison over fewer than 16 bytes).
    aead, _ = SEALERS[name]
    for length in range(16):
        with pytest.raises(AuthenticationFailed):
            open_aead(aead, bytes(aead.key_size), bytes(12), bytes(length), b"")


@pytest.mark.parametrize("name", sorted(AEADS))
def test_can_open_exactly_the_six_aeads(name: str) -> None:
    # Catches: an SM4, AES-256-CCM or CCM-8 entry reported as openable (its proof would then run the wrong
    # algorithm: CCM-8's tag is 8 bytes, SM4 is another cipher) or an openable one reported as not.
    aead = AEADS[name]
    assert can_open(aead) is (name in SEALERS)
    if name not in SEALERS:
        with pytest.raises(ValueError, match="cannot be opened") as caught:
            open_aead(aead, bytes(aead.key_size), bytes(12), bytes(32), b"")
        assert not isinstance(caught.value, AuthenticationFailed)


def test_the_unopenable_are_the_ones_the_brief_names() -> None:
    # Catches: a table change that makes one of these openable without a test of its own.
    unopenable = {name for name, aead in AEADS.items() if not can_open(aead)}
    assert {"SM4-GCM", "SM4-CCM", "AES-128-CCM-8", "AES-256-CCM-8"} <= unopenable
    assert unopenable.isdisjoint(SEALERS)


# --- Published test vectors ----------------------------------------------------------------------------------
# (name, key, nonce, plaintext, aad, ciphertext, tag), all hex. Each vector is also sealed with ``cryptography``
# below, so a typo in a constant fails loudly instead of testing nothing.

_GCM_KEY_128 = "feffe9928665731c6d6a8f9467308308"
_GCM_NONCE = "cafebabefacedbaddecaf888"
_GCM_PLAINTEXT = (
    "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39"
)
_GCM_AAD = "feedfacedeadbeeffeedfacedeadbeefabaddad2"

VECTORS: list[tuple[str, str, str, str, str, str, str]] = [
    # McGrew & Viega, "The Galois/Counter Mode of Operation (GCM)", test case 4 (AES-128, 96-bit IV,
    # 20-byte AAD, 60-byte plaintext: a partial last block in both).
    (
        AES128_GCM.name,
        _GCM_KEY_128,
        _GCM_NONCE,
        _GCM_PLAINTEXT,
        _GCM_AAD,
        "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e"
        "21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091",
        "5bc94fbc3221a5db94fae95ae7121a47",
    ),
    # Same document, test case 16 (AES-256, same IV, AAD and plaintext).
    (
        AES256_GCM.name,
        _GCM_KEY_128 * 2,
        _GCM_NONCE,
        _GCM_PLAINTEXT,
        _GCM_AAD,
        "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
        "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662",
        "76fc6ece0f4e1768cddf8853bb2d551b",
    ),
    # RFC 8439 §2.8.2 (ChaCha20-Poly1305 AEAD): the "sunscreen" example.
    (
        CHACHA20_POLY1305.name,
        "808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f",
        "070000004041424344454647",
        b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, "
        b"sunscreen would be it.".hex(),
        "50515253c0c1c2c3c4c5c6c7",
        "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6"
        "3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36"
        "92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc"
        "3ff4def08e4b7a9de576d26586cec64b6116",
        "1ae10b594f09e26a7e902ecbd0600691",
    ),
    # Project Wycheproof, testvectors/aes_ccm_test.json, group ivSize 96 / keySize 128 / tagSize 128 — the
    # TLS shape (12-byte nonce, 16-byte tag), which neither RFC 3610 nor SP 800-38C's examples use.
    # tcId 1: empty plaintext, empty AAD (the tag alone).
    (
        AES128_CCM.name,
        "bedcfb5a011ebc84600fcb296c15af0d",
        "438a547a94ea88dce46c6c85",
        "",
        "",
        "",
        "25d1a38495a7dea45bda049705627d10",
    ),
    # tcId 9: 65-byte plaintext, no AAD.
    (
        AES128_CCM.name,
        "42e38abef2dd7573248c5aefb3ecca54",
        "064b3cfbe04d94d4d5c19b30",
        "2c763b9ec84903bcbb8aec15e678a3a955e4870edbf62d9d3c81c4f9ed6154877875779ca33cce8f73a55ca7af1d8d817fc6baac"
        "00ef962c5a0da339ce81427a3d59",
        "",
        "4ca01b5b2a5e57bcc1a4b7f63f049dc477e3ee2e5c268efb346ff95b7dcd67f86ed0f11bb17c1dd7fb511d2f37b9684550c0d84b"
        "e0f10030ccc4e0de5b74ef92ea54",
        "c5a57dd6fa16aa9de8de20e6bd321396",
    ),
    # tcId 34: 16-byte AAD, 16-byte plaintext.
    (
        AES128_CCM.name,
        "875b0b4a84150524eb1f50f9d8de1388",
        "fdc5014ed1ad706129d57322",
        "2f575dfb2dbe9d238de576fc63e4ac32",
        "35a6d9829c8449c4402e385cc5c6fe98",
        "3469c3ff738aa32aacc1ac48d89b1d75",
        "fa68720a3171a54c4b3690bffde7b610",
    ),
    # tcId 36: 16-byte AAD, 17-byte plaintext (a partial second block).
    (
        AES128_CCM.name,
        "e3d3ec41f28eb35fb53f5fa91804e051",
        "89d270fc8b583bc631cefd39",
        "847acf521995b33f8bc474c8befbca3bb2",
        "3d2f458c67c5b6c794b1f12dad409e0f",
        "28aaec53493cd6252cf6410ed141bdafb7",
        "47bf3e16c227ca11fd68a16d407c2cc3",
    ),
]


@pytest.mark.parametrize("vector", VECTORS, ids=[f"{v[0]}-{i}" for i, v in enumerate(VECTORS)])
def test_published_vector(vector: tuple[str, str, str, str, str, str, str]) -> None:
    # Catches: an implementation that agrees with cryptography only because both are fed by this test's own
    # helpers (e.g. a swapped key/nonce order in ``seal``) — these bytes come from the specifications.
    name = vector[0]
    key, nonce, plaintext, aad, ciphertext, tag = (bytes.fromhex(field) for field in vector[1:])
    aead, _ = SEALERS[name]
    sealed = ciphertext + tag
    assert seal(name, key, nonce, plaintext, aad) == sealed  # the constant itself is right
    assert open_aead(aead, key, nonce, sealed, aad) == plaintext
    with pytest.raises(AuthenticationFailed):
        open_aead(aead, key, nonce, sealed[:-1] + bytes([sealed[-1] ^ 1]), aad)


@pytest.mark.parametrize(
    ("key_size", "ciphertext"),
    [
        (16, "d718fbd6ab644c739da95f3be6451778"),
        (24, "26449c1805dbe7aa25a468ce263a9e79"),
        (32, "f92bd7c79fb72e2f2b8f80c1972d24fc"),
    ],
)
def test_aria_block_matches_rfc_5794(key_size: int, ciphertext: str) -> None:
    # RFC 5794 Appendix A: key 00 01 02 ..., plaintext 00 11 22 ... ff. Catches a wrong S-box entry, diffusion
    # term, key-schedule constant order or rotation, which the GCM property tests would only show as a mismatch.
    block = ARIA(bytes(range(key_size))).encrypt_block(bytes.fromhex("00112233445566778899aabbccddeeff"))
    assert block.hex() == ciphertext

"""The kernel structs, byte for byte, against the uapi layout rebuilt independently with ctypes."""

from __future__ import annotations

import ctypes
import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ktls.constants import TLSVersion
from ktls.errors import CipherUnavailable, KernelTLSUnavailable, RecordAuthenticationError
from ktls.kernel import CIPHERS, CipherType, CryptoInfo, parse_tls_stat

# include/uapi/linux/tls.h, transcribed: (TLS_CIPHER_* value, IV, KEY, SALT, TAG, REC_SEQ sizes).
UAPI = {
    "AES_GCM_128": (51, 8, 16, 4, 16, 8),
    "AES_GCM_256": (52, 8, 32, 4, 16, 8),
    "AES_CCM_128": (53, 8, 16, 4, 16, 8),
    "CHACHA20_POLY1305": (54, 12, 32, 0, 16, 8),
    "SM4_GCM": (55, 8, 16, 4, 16, 8),
    "SM4_CCM": (56, 8, 16, 4, 16, 8),
    "ARIA_GCM_128": (57, 8, 16, 4, 16, 8),
    "ARIA_GCM_256": (58, 8, 32, 4, 16, 8),
}


class TlsCryptoInfo(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint16), ("cipher_type", ctypes.c_uint16))


def uapi_struct(name: str) -> type[ctypes.Structure]:
    """``struct tls12_crypto_info_<name>`` as the C compiler would lay it out (not packed)."""
    _, iv, key, salt, _, rec_seq = UAPI[name]
    return type(
        f"tls12_crypto_info_{name.lower()}",
        (ctypes.Structure,),
        {
            "_fields_": (
                ("info", TlsCryptoInfo),
                ("iv", ctypes.c_ubyte * iv),
                ("key", ctypes.c_ubyte * key),
                ("salt", ctypes.c_ubyte * salt),
                ("rec_seq", ctypes.c_ubyte * rec_seq),
            )
        },
    )


def test_table_has_every_kernel_cipher_once() -> None:
    assert sorted(c.name for c in CIPHERS.values()) == sorted(UAPI)
    assert len({c.cipher_type for c in CIPHERS.values()}) == 8


@pytest.mark.parametrize("name", sorted(UAPI))
def test_sizes_match_uapi(name: str) -> None:
    value, iv, key, salt, tag, rec_seq = UAPI[name]
    cipher = CIPHERS[CipherType[name]]
    assert (cipher.cipher_type, cipher.iv_size, cipher.key_size, cipher.salt_size) == (value, iv, key, salt)
    assert (cipher.tag_size, cipher.rec_seq_size) == (tag, rec_seq)
    assert cipher.struct_size == ctypes.sizeof(uapi_struct(name))
    assert cipher.nonce_size == 12


def test_aria_is_tls12_only_and_the_rest_take_both() -> None:
    for cipher in CIPHERS.values():
        expected = {TLSVersion.TLS1_2} if cipher.name.startswith("ARIA") else set(TLSVersion)
        assert cipher.versions == expected


def _info_for(name: str, version: TLSVersion, seq: int) -> CryptoInfo:
    cipher = CIPHERS[CipherType[name]]
    key = bytes(range(1, cipher.key_size + 1))
    if version is TLSVersion.TLS1_3:
        return CryptoInfo.tls13(cipher.cipher_type, key, bytes(range(100, 112)), seq)
    fixed = bytes(range(100, 100 + (cipher.salt_size or cipher.iv_size)))
    return CryptoInfo.tls12(cipher.cipher_type, key, fixed, seq)


@pytest.mark.parametrize("version", list(TLSVersion))
@pytest.mark.parametrize("name", sorted(UAPI))
def test_pack_matches_ctypes_layout(name: str, version: TLSVersion) -> None:
    seq = 0x0000_0001_FFFF_FFFE
    info = _info_for(name, version, seq)
    expected = uapi_struct(name)()
    expected.info.version = int(version)
    expected.info.cipher_type = UAPI[name][0]
    ctypes.memmove(expected.key, info.key, len(info.key))
    # What the fields must hold, from the RFCs rather than from CryptoInfo:
    if version is TLSVersion.TLS1_3 or name == "CHACHA20_POLY1305":
        write_iv = bytes(range(100, 112))
        salt_size = UAPI[name][3]
        ctypes.memmove(expected.salt, write_iv[:salt_size], salt_size)
        ctypes.memmove(expected.iv, write_iv[salt_size:], 12 - salt_size)
    else:  # TLS 1.2 GCM/CCM: salt = implicit nonce, iv = explicit nonce of the next record = seq by default
        ctypes.memmove(expected.salt, bytes(range(100, 104)), 4)
        ctypes.memmove(expected.iv, seq.to_bytes(8, "big"), 8)
    ctypes.memmove(expected.rec_seq, seq.to_bytes(8, "big"), 8)
    assert info.pack() == bytes(expected)
    assert CryptoInfo.unpack(bytes(expected)) == info


def test_tls12_explicit_nonce_is_independent_of_sequence_number() -> None:
    info = CryptoInfo.tls12(CipherType.AES_GCM_128, bytes(16), b"salt", rec_seq=5, explicit_nonce=0xAABB)
    assert info.rec_seq == 5
    assert info.iv == (0xAABB).to_bytes(8, "big")
    with pytest.raises(ValueError, match="no explicit nonce"):
        CryptoInfo.tls12(CipherType.CHACHA20_POLY1305, bytes(32), bytes(12), explicit_nonce=1)


@given(
    name=st.sampled_from(sorted(UAPI)),
    version=st.sampled_from(list(TLSVersion)),
    seq=st.integers(0, 2**64 - 1),
    data=st.data(),
)
def test_pack_unpack_round_trip(name: str, version: TLSVersion, seq: int, data: st.DataObject) -> None:
    cipher = CIPHERS[CipherType[name]]
    if version not in cipher.versions:
        version = TLSVersion.TLS1_2
    key = data.draw(st.binary(min_size=cipher.key_size, max_size=cipher.key_size))
    iv = data.draw(st.binary(min_size=12, max_size=12))
    info = (
        CryptoInfo.tls13(cipher.cipher_type, key, iv, seq)
        if version is TLSVersion.TLS1_3
        else CryptoInfo(version, cipher.cipher_type, key, iv[: cipher.iv_size], iv[: cipher.salt_size], seq)
    )
    raw = info.pack()
    assert len(raw) == cipher.struct_size
    assert CryptoInfo.unpack(raw) == info


def test_invalid_values_are_refused_with_words() -> None:
    with pytest.raises(ValueError, match="16-byte key"):
        CryptoInfo.tls13(CipherType.AES_GCM_128, bytes(15), bytes(12))
    with pytest.raises(ValueError, match="write_iv must be 12 bytes"):
        CryptoInfo.tls13(CipherType.AES_GCM_128, bytes(16), bytes(8))
    with pytest.raises(ValueError, match="out of range"):
        CryptoInfo.tls13(CipherType.AES_GCM_128, bytes(16), bytes(12), 2**64)
    with pytest.raises(ValueError, match="crypto info is 40 bytes"):
        CryptoInfo.unpack(_info_for("AES_GCM_128", TLSVersion.TLS1_3, 0).pack()[:-1])
    with pytest.raises(ValueError, match="unknown"):
        CryptoInfo.unpack(b"\x04\x03\x63\x00" + bytes(36))


def test_repr_never_shows_key_material() -> None:
    key = bytes.fromhex("deadbeef" * 8)
    info = CryptoInfo.tls13(CipherType.AES_GCM_256, key, bytes.fromhex("c0ffee" * 4), 7)
    text = repr(info) + str(info)
    assert "dead" not in text.lower()
    assert "c0ffee" not in text.lower()
    assert "AES_GCM_256" in text
    assert "rec_seq=7" in text


def test_next_generation_resets_the_sequence_number() -> None:
    info = _info_for("AES_GCM_128", TLSVersion.TLS1_3, 99)
    updated = info.next_generation(bytes(16), bytes(12))
    assert (updated.rec_seq, updated.key, updated.write_iv) == (0, bytes(16), bytes(12))
    with pytest.raises(ValueError, match=r"only in TLS 1\.3"):
        _info_for("AES_GCM_128", TLSVersion.TLS1_2, 0).next_generation(bytes(16), bytes(12))


def test_errors_keep_errno_and_say_what_happened() -> None:
    exc = CipherUnavailable(errno.ENOENT, "this kernel cannot load the crypto algorithm of SM4_GCM")
    assert isinstance(exc, KernelTLSUnavailable)
    assert isinstance(exc, OSError)
    assert exc.errno == errno.ENOENT
    assert str(exc).startswith("this kernel cannot load")
    assert "ENOENT" in str(exc)
    assert RecordAuthenticationError.alert.name == "bad_record_mac"


def test_parse_tls_stat() -> None:
    text = "TlsCurrTxSw                     \t1\nTlsCurrRxSw  2\nTlsTxSw 10\nbogus line here\nTlsRxSw x\n"
    assert parse_tls_stat(text) == {"TlsCurrTxSw": 1, "TlsCurrRxSw": 2, "TlsTxSw": 10}

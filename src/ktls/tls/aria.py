"""The ARIA block cipher (RFC 5794), encryption only, in pure Python — for proving ARIA-GCM secrets.

ARIA-GCM is a kernel TLS cipher (TLS 1.2, Linux ≥ 6.1 built with ``CONFIG_CRYPTO_ARIA``) that OpenSSL
negotiates (RFC 6209 suites). Before the kernel gets a connection's keys, :mod:`ktls.tls.proof` opens a
Finished record with them (:mod:`ktls.tls.aead`), and GCM only ever runs the forward cipher, so only that is
here. Not constant-time and slow (about 10k blocks/s): used on a handful of short records per connection.

ARIA is a 128-bit substitution-permutation network: 12/14/16 rounds for 128/192/256-bit keys, each an XOR
with the round key, a substitution layer (two kinds, alternating) and the involutive diffusion layer A.
"""

from __future__ import annotations

__all__ = ["ARIA"]


def _aes_sbox() -> list[int]:
    """ARIA's S1 is AES's S-box (FIPS 197 §5.1.1): x^-1 in GF(2^8) mod x^8+x^4+x^3+x+1, then an affine map."""
    exp, log = [0] * 510, [0] * 256
    value = 1
    for power in range(255):  # 3 generates the multiplicative group
        exp[power] = exp[power + 255] = value
        log[value] = power
        value ^= (value << 1) ^ (0x11B if value & 0x80 else 0)
    sbox = []
    for byte in range(256):
        inverse = exp[255 - log[byte]] if byte else 0
        rotated = inverse
        for shift in range(1, 5):
            rotated ^= ((inverse << shift) | (inverse >> (8 - shift))) & 0xFF
        sbox.append(rotated ^ 0x63)
    return sbox


#: RFC 5794 §2.4.2, S2 (the algebraic S-box x^247 under an affine map), row by row.
_S2 = list(
    bytes.fromhex(
        "e24e54fc94c24acc620d6a463c4d8bd15efa64cbb497be2bbc772e03d31959c1"
        "1d06416b55f09969ea9c18ae63dfe7bb007366fb964c85e43a0945aa0fee10eb"
        "2d7ff429accfad918d78c895f92fcecd087a88385c832a2847dbb8c793a41253"
        "ff870e3136215848018e377432cae9b1b7ab0cd7c4564226079860d9b6b91140"
        "ec208cbda0c984044923f14f501f13dcd8c09e57e3c37b653b028f3ee82592e5"
        "15ddfd17a9bfd49a7ec53967fe769d43a7e1d0f568f21b347005a38ad57986a8"
        "30c6514b1ea627f635d26e2416825fdae675a2ef2cb21c9f5d6f800a72449b6c"
        "900b5b337d5a52f361a1f7b0d63f7c6ded14e0a53d22b3f889de711aafbab581"
    )
)
_S1 = _aes_sbox()
_S1_INVERSE = [_S1.index(value) for value in range(256)]
_S2_INVERSE = [_S2.index(value) for value in range(256)]
#: Substitution layers: type 1 (odd rounds) S1 S2 S1⁻¹ S2⁻¹ repeated; type 2 (even rounds) the inverse of it.
_LAYER_ODD = (_S1, _S2, _S1_INVERSE, _S2_INVERSE) * 4
_LAYER_EVEN = (_S1_INVERSE, _S2_INVERSE, _S1, _S2) * 4

#: The key schedule's constants C1, C2, C3 (fractional digits of 1/π), RFC 5794 §2.2.
_C1 = 0x517CC1B727220A94FE13ABE8FA9A6EE0
_C2 = 0x6DB14ACC9E21C820FF28B1D5EF5DE2B0
_C3 = 0xDB92371D2126E9700324977504E8C90E
_MASK = (1 << 128) - 1


def _diffusion(x: list[int]) -> list[int]:
    """The layer A of RFC 5794 §2.4.3: each output byte is the XOR of seven input bytes."""
    return [
        x[3] ^ x[4] ^ x[6] ^ x[8] ^ x[9] ^ x[13] ^ x[14],
        x[2] ^ x[5] ^ x[7] ^ x[8] ^ x[9] ^ x[12] ^ x[15],
        x[1] ^ x[4] ^ x[6] ^ x[10] ^ x[11] ^ x[12] ^ x[15],
        x[0] ^ x[5] ^ x[7] ^ x[10] ^ x[11] ^ x[13] ^ x[14],
        x[0] ^ x[2] ^ x[5] ^ x[8] ^ x[11] ^ x[14] ^ x[15],
        x[1] ^ x[3] ^ x[4] ^ x[9] ^ x[10] ^ x[14] ^ x[15],
        x[0] ^ x[2] ^ x[7] ^ x[9] ^ x[10] ^ x[12] ^ x[13],
        x[1] ^ x[3] ^ x[6] ^ x[8] ^ x[11] ^ x[12] ^ x[13],
        x[0] ^ x[1] ^ x[4] ^ x[7] ^ x[10] ^ x[13] ^ x[15],
        x[0] ^ x[1] ^ x[5] ^ x[6] ^ x[11] ^ x[12] ^ x[14],
        x[2] ^ x[3] ^ x[5] ^ x[6] ^ x[8] ^ x[13] ^ x[15],
        x[2] ^ x[3] ^ x[4] ^ x[7] ^ x[9] ^ x[12] ^ x[14],
        x[1] ^ x[2] ^ x[6] ^ x[7] ^ x[9] ^ x[11] ^ x[12],
        x[0] ^ x[3] ^ x[6] ^ x[7] ^ x[8] ^ x[10] ^ x[13],
        x[0] ^ x[3] ^ x[4] ^ x[5] ^ x[9] ^ x[11] ^ x[14],
        x[1] ^ x[2] ^ x[4] ^ x[5] ^ x[8] ^ x[10] ^ x[15],
    ]


def _round(state: int, round_key: int, layer: tuple[list[int], ...]) -> int:
    """FO (odd layer) or FE (even layer): A(SL(state ^ key)), on 128-bit integers."""
    mixed = (state ^ round_key).to_bytes(16, "big")
    substituted = [box[byte] for box, byte in zip(layer, mixed, strict=True)]
    return int.from_bytes(bytes(_diffusion(substituted)), "big")


def _rotr(value: int, bits: int) -> int:
    bits %= 128
    return ((value >> bits) | (value << (128 - bits))) & _MASK


class ARIA:
    """One expanded ARIA key (128, 192 or 256 bits); :meth:`encrypt_block` is the forward cipher."""

    def __init__(self, key: bytes) -> None:
        if len(key) not in (16, 24, 32):
            raise ValueError("ARIA takes a 128-, 192- or 256-bit key")
        self._rounds = {16: 12, 24: 14, 32: 16}[len(key)]
        ck1, ck2, ck3 = {16: (_C1, _C2, _C3), 24: (_C2, _C3, _C1), 32: (_C3, _C1, _C2)}[len(key)]
        kl = int.from_bytes(key[:16], "big")
        kr = int.from_bytes(key[16:].ljust(16, b"\0"), "big")
        w0 = kl
        w1 = _round(w0, ck1, _LAYER_ODD) ^ kr
        w2 = _round(w1, ck2, _LAYER_EVEN) ^ w0
        w3 = _round(w2, ck3, _LAYER_ODD) ^ w1
        w = (w0, w1, w2, w3)
        # ek1..ek17 (RFC 5794 §2.3.2): W_i XOR W_{i+1} rotated right by 19, 31, left by 61, 31, 19.
        keys = [w[i] ^ _rotr(w[(i + 1) % 4], rotation) for rotation in (19, 31, -61, -31, -19) for i in range(4)]
        self._round_keys = keys[: self._rounds + 1]

    def encrypt_block(self, block: bytes) -> bytes:
        keys = self._round_keys
        state = int.from_bytes(block, "big")
        for index in range(self._rounds - 1):
            state = _round(state, keys[index], _LAYER_ODD if index % 2 == 0 else _LAYER_EVEN)
        last = (state ^ keys[self._rounds - 1]).to_bytes(16, "big")
        substituted = bytes(box[byte] for box, byte in zip(_LAYER_EVEN, last, strict=True))
        return (int.from_bytes(substituted, "big") ^ keys[self._rounds]).to_bytes(16, "big")

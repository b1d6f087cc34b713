"""SM4-GCM, SM4-CCM and ARIA-GCM for the independent record layer (``reference_tls``), which the
``cryptography`` package lacks as AEADs: GCM (NIST SP 800-38D) and CCM (RFC 3610, NIST SP 800-38C) written
over any 128-bit block cipher, and ARIA (RFC 5794) written here in pure Python. SM4's block cipher and
SM4-GCM come from ``cryptography`` (OpenSSL). Shares no code with ktls; checked in test_reference_block_aeads.py
against RFC 8998's SM4 vectors, RFC 5794's ARIA vectors, and ``cryptography``'s AES-GCM/AES-CCM (the same
modes over AES). Slow (pure-Python GHASH and ARIA), which is fine for the few records a kernel test seals.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

BlockEncrypt = Callable[[bytes], bytes]
TAG_SIZE = 16


def _xor(left: bytes, right: bytes) -> bytes:
    return bytes(a ^ b for a, b in zip(left, right, strict=False))


# -- GCM (NIST SP 800-38D), 12-byte nonces only, as TLS uses ---------------------------------------------------


def _gf128_multiply(x: int, y: int) -> int:
    """Multiplication in GF(2^128) with GCM's bit order (SP 800-38D §6.3, Algorithm 1)."""
    reduction = 0xE1 << 120
    product = 0
    for bit in range(127, -1, -1):
        if (x >> bit) & 1:
            product ^= y
        y = (y >> 1) ^ reduction if y & 1 else y >> 1
    return product


def _ghash(h: int, associated_data: bytes, ciphertext: bytes) -> bytes:
    state = 0

    def absorb(data: bytes) -> None:
        nonlocal state
        for offset in range(0, len(data), 16):
            block = data[offset : offset + 16].ljust(16, b"\0")
            state = _gf128_multiply(state ^ int.from_bytes(block, "big"), h)

    absorb(associated_data)
    absorb(ciphertext)
    lengths = (len(associated_data) * 8).to_bytes(8, "big") + (len(ciphertext) * 8).to_bytes(8, "big")
    state = _gf128_multiply(state ^ int.from_bytes(lengths, "big"), h)
    return state.to_bytes(16, "big")


def _ctr(encrypt_block: BlockEncrypt, counter_block: bytes, data: bytes, counter_bytes: int) -> bytes:
    """CTR keystream XOR, incrementing the last ``counter_bytes`` of the counter block (mod 2^(8n))."""
    prefix, counter = counter_block[:-counter_bytes], int.from_bytes(counter_block[-counter_bytes:], "big")
    out = bytearray()
    for offset in range(0, len(data), 16):
        block = prefix + (counter % (1 << (8 * counter_bytes))).to_bytes(counter_bytes, "big")
        out += _xor(data[offset : offset + 16], encrypt_block(block))
        counter += 1
    return bytes(out)


class GCM:
    """AEAD with ``cryptography``'s interface (encrypt/decrypt(nonce, data, associated_data), tag last)."""

    def __init__(self, encrypt_block: BlockEncrypt) -> None:
        self._encrypt_block = encrypt_block
        self._h = int.from_bytes(encrypt_block(bytes(16)), "big")

    def _tag(self, nonce: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
        return _xor(self._encrypt_block(nonce + b"\0\0\0\1"), _ghash(self._h, associated_data, ciphertext))

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        associated_data = associated_data or b""
        assert len(nonce) == 12
        ciphertext = _ctr(self._encrypt_block, nonce + b"\0\0\0\2", data, 4)
        return ciphertext + self._tag(nonce, ciphertext, associated_data)

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        associated_data = associated_data or b""
        assert len(nonce) == 12
        ciphertext, tag = data[:-TAG_SIZE], data[-TAG_SIZE:]
        if self._tag(nonce, ciphertext, associated_data) != tag:
            raise InvalidTag
        return _ctr(self._encrypt_block, nonce + b"\0\0\0\2", ciphertext, 4)


# -- CCM (RFC 3610 / SP 800-38C) with a 12-byte nonce (L = 3) and a 16-byte tag, as TLS uses -------------------


class CCM:
    def __init__(self, encrypt_block: BlockEncrypt) -> None:
        self._encrypt_block = encrypt_block

    def _mac(self, nonce: bytes, data: bytes, associated_data: bytes) -> bytes:
        length_size = 15 - len(nonce)
        flags = (0x40 if associated_data else 0) | ((TAG_SIZE - 2) // 2) << 3 | (length_size - 1)
        blocks = bytes([flags]) + nonce + len(data).to_bytes(length_size, "big")
        if associated_data:
            assert len(associated_data) < 0xFF00
            encoded = len(associated_data).to_bytes(2, "big") + associated_data
            blocks += encoded.ljust(-(-len(encoded) // 16) * 16, b"\0")
        blocks += data.ljust(-(-len(data) // 16) * 16, b"\0")
        mac = bytes(16)
        for offset in range(0, len(blocks), 16):
            mac = self._encrypt_block(_xor(mac, blocks[offset : offset + 16]))
        return mac

    def _counter(self, nonce: bytes, index: int) -> bytes:
        length_size = 15 - len(nonce)
        return bytes([length_size - 1]) + nonce + index.to_bytes(length_size, "big")

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        associated_data = associated_data or b""
        assert len(nonce) == 12
        tag = _xor(self._mac(nonce, data, associated_data), self._encrypt_block(self._counter(nonce, 0)))
        return _ctr(self._encrypt_block, self._counter(nonce, 1), data, 3) + tag

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        associated_data = associated_data or b""
        assert len(nonce) == 12
        ciphertext, tag = data[:-TAG_SIZE], data[-TAG_SIZE:]
        plaintext = _ctr(self._encrypt_block, self._counter(nonce, 1), ciphertext, 3)
        expected = _xor(self._mac(nonce, plaintext, associated_data), self._encrypt_block(self._counter(nonce, 0)))
        if expected != tag:
            raise InvalidTag
        return plaintext


# -- ARIA (RFC 5794) --------------------------------------------------------------------------------------------


def _aes_sbox() -> bytes:
    """SB1 is the AES S-box: the inverse in GF(2^8) mod x^8+x^4+x^3+x+1, then the affine map (FIPS 197 §5.1.1)."""

    def multiply(a: int, b: int) -> int:
        product = 0
        while b:
            if b & 1:
                product ^= a
            a = (a << 1) ^ (0x11B if a & 0x80 else 0)
            b >>= 1
        return product

    inverse = [0] * 256
    for a in range(1, 256):
        for b in range(1, 256):
            if multiply(a, b) == 1:
                inverse[a] = b
                break

    def rotl8(value: int, shift: int) -> int:
        return ((value << shift) | (value >> (8 - shift))) & 0xFF

    return bytes(
        inverse[x] ^ rotl8(inverse[x], 1) ^ rotl8(inverse[x], 2) ^ rotl8(inverse[x], 3) ^ rotl8(inverse[x], 4) ^ 0x63
        for x in range(256)
    )


# RFC 5794 §2.4.2's second S-box (its first is AES's; the other two are their inverses).
_SB2 = bytes.fromhex(
    "e24e54fc94c24acc620d6a463c4d8bd15efa64cbb497be2bbc772e03d31959c1"
    "1d06416b55f09969ea9c18ae63dfe7bb007366fb964c85e43a0945aa0fee10eb"
    "2d7ff429accfad918d78c895f92fcecd087a88385c832a2847dbb8c793a41253"
    "ff870e3136215848018e377432cae9b1b7ab0cd7c4564226079860d9b6b91140"
    "ec208cbda0c984044923f14f501f13dcd8c09e57e3c37b653b028f3ee82592e5"
    "15ddfd17a9bfd49a7ec53967fe769d43a7e1d0f568f21b347005a38ad57986a8"
    "30c6514b1ea627f635d26e2416825fdae675a2ef2cb21c9f5d6f800a72449b6c"
    "900b5b337d5a52f361a1f7b0d63f7c6ded14e0a53d22b3f889de711aafbab581"
)
_SB1 = _aes_sbox()


def _inverse(sbox: bytes) -> bytes:
    table = bytearray(256)
    for index, value in enumerate(sbox):
        table[value] = index
    return bytes(table)


_SB3, _SB4 = _inverse(_SB1), _inverse(_SB2)
_SL1 = (_SB1, _SB2, _SB3, _SB4) * 4  # substitution layer of odd rounds (type 1)
_SL2 = (_SB3, _SB4, _SB1, _SB2) * 4  # of even rounds (type 2)
# RFC 5794 §2.4.3: output byte i of the diffusion layer A is the XOR of these input bytes.
_DIFFUSION = (
    (3, 4, 6, 8, 9, 13, 14), (2, 5, 7, 8, 9, 12, 15), (1, 4, 6, 10, 11, 12, 15), (0, 5, 7, 10, 11, 13, 14),
    (0, 2, 5, 8, 11, 14, 15), (1, 3, 4, 9, 10, 14, 15), (0, 2, 7, 9, 10, 12, 13), (1, 3, 6, 8, 11, 12, 13),
    (0, 1, 4, 7, 10, 13, 15), (0, 1, 5, 6, 11, 12, 14), (2, 3, 5, 6, 8, 13, 15), (2, 3, 4, 7, 9, 12, 14),
    (1, 2, 6, 7, 9, 11, 12), (0, 3, 6, 7, 8, 10, 13), (0, 3, 4, 5, 9, 11, 14), (1, 2, 4, 5, 8, 10, 15),
)  # fmt: skip
_KEY_CONSTANTS = (
    0x517CC1B727220A94FE13ABE8FA9A6EE0,
    0x6DB14ACC9E21C820FF28B1D5EF5DE2B0,
    0xDB92371D2126E9700324977504E8C90E,
)
_MASK128 = (1 << 128) - 1


def _substitute(block: bytes, layer: tuple[bytes, ...]) -> bytes:
    return bytes(sbox[byte] for sbox, byte in zip(layer, block, strict=True))


def _diffuse(block: bytes) -> bytes:
    out = bytearray(16)
    for index, sources in enumerate(_DIFFUSION):
        value = 0
        for source in sources:
            value ^= block[source]
        out[index] = value
    return bytes(out)


def _odd_round(block: bytes, key: bytes) -> bytes:  # FO
    return _diffuse(_substitute(_xor(block, key), _SL1))


def _even_round(block: bytes, key: bytes) -> bytes:  # FE
    return _diffuse(_substitute(_xor(block, key), _SL2))


def _rotate_right(value: int, shift: int) -> int:
    shift %= 128
    return ((value >> shift) | (value << (128 - shift))) & _MASK128


class ARIA:
    """The ARIA block cipher's encryption direction (all CTR-based modes need)."""

    def __init__(self, key: bytes) -> None:
        if len(key) not in (16, 24, 32):
            raise ValueError("ARIA keys are 128, 192 or 256 bits")
        self.rounds = {16: 12, 24: 14, 32: 16}[len(key)]
        first = (0, 1, 2) if len(key) == 16 else (1, 2, 0) if len(key) == 24 else (2, 0, 1)
        ck1, ck2, ck3 = (_KEY_CONSTANTS[index].to_bytes(16, "big") for index in first)
        kl, kr = key[:16], key[16:].ljust(16, b"\0")
        w0 = kl
        w1 = _xor(_odd_round(w0, ck1), kr)
        w2 = _xor(_even_round(w1, ck2), w0)
        w3 = _xor(_odd_round(w2, ck3), w1)
        words = [int.from_bytes(w, "big") for w in (w0, w1, w2, w3)]
        keys = []
        # RFC 5794 §2.3.2: ek1..ek17 from (W_i, W_{i+1} rotated right by 19, 31, then left by 61, 31, 19).
        for shift in (19, 31, -61, -31, -19):
            for index in range(4):
                keys.append(words[index] ^ _rotate_right(words[(index + 1) % 4], shift))
        self._round_keys = [value.to_bytes(16, "big") for value in keys[: self.rounds + 1]]

    def encrypt_block(self, block: bytes) -> bytes:
        state = block
        for index in range(self.rounds - 1):
            round_function = _odd_round if index % 2 == 0 else _even_round
            state = round_function(state, self._round_keys[index])
        state = _substitute(_xor(state, self._round_keys[self.rounds - 1]), _SL2)
        return _xor(state, self._round_keys[self.rounds])


# -- The AEADs the kernel offers beyond cryptography's ---------------------------------------------------------


def sm4_encrypt_block(key: bytes) -> BlockEncrypt:
    encryptor = Cipher(algorithms.SM4(key), modes.ECB()).encryptor()
    return encryptor.update


class SM4GCM:
    """SM4-GCM from ``cryptography`` itself (OpenSSL's), which has it as a cipher mode, not as an AEAD class."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        associated_data = associated_data or b""
        encryptor = Cipher(algorithms.SM4(self._key), modes.GCM(nonce)).encryptor()
        encryptor.authenticate_additional_data(associated_data)
        ciphertext = encryptor.update(data) + encryptor.finalize()
        return ciphertext + encryptor.tag

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        associated_data = associated_data or b""
        decryptor = Cipher(algorithms.SM4(self._key), modes.GCM(nonce, data[-TAG_SIZE:])).decryptor()
        decryptor.authenticate_additional_data(associated_data)
        return decryptor.update(data[:-TAG_SIZE]) + decryptor.finalize()


def sm4_ccm(key: bytes) -> CCM:
    return CCM(sm4_encrypt_block(key))


def aria_gcm(key: bytes) -> GCM:
    return GCM(ARIA(key).encrypt_block)

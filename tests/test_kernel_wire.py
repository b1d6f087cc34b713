"""The kernel ABI layer on the wire, against an independent record layer (``reference_tls``).

Kernel TX → userspace: a kTLS socket sends; a plain socket receives the raw records, which the reference
decrypts, checking header, nonce, additional data, inner content type and sequence numbers.
Userspace → kernel RX: the reference encrypts; the kernel decrypts and reports each record's type.
Sequence numbers start just below 2^32, so the 64-bit counters must carry across 32 bits.
"""

from __future__ import annotations

import errno
import os
import socket

import pytest

from ktls.constants import AlertDescription, ContentType, TLSVersion
from ktls.errors import (
    CipherUnavailable,
    RecordAuthenticationError,
    RecordHeaderError,
    RecordOverflowError,
    RekeyPending,
    RekeyUnsupported,
)
from ktls.kernel import (
    CIPHERS,
    CipherType,
    CryptoInfo,
    Direction,
    KernelSupport,
    get_crypto_info,
    kernel_version,
    read_tls_stat,
    recv_record,
    send_record,
    set_crypto_info,
    set_rx_expect_no_pad,
    set_tx_max_payload_len,
    setup_ulp,
)
from reference_tls import AEADS, TLS13, RecordProtection, split_records

pytestmark = pytest.mark.kernel

Pair = tuple[socket.socket, socket.socket]

COMBOS = [(c.cipher_type, v) for c in CIPHERS.values() for v in TLSVersion if v in c.versions]
SEQ0 = 2**32 - 2  # two records later the sequence number needs bit 32
#: TLS 1.2 GCM/CCM explicit nonce start: unrelated to SEQ0, low half about to carry.
NONCE0 = 0x5A5A_0000_FFFF_FFFF
AES_CIPHERS = {CipherType.AES_GCM_128, CipherType.AES_GCM_256, CipherType.AES_CCM_128}
SM4_AND_ARIA = {CipherType.SM4_GCM, CipherType.SM4_CCM, CipherType.ARIA_GCM_128, CipherType.ARIA_GCM_256}
#: Matrix guests whose kernels are built with SM4 and ARIA (scripts/kernel-configs/all-aeads.config); no
#: Debian kernel is.
ALL_AEAD_GUESTS = {"7.2-all"}
#: Before Linux 5.16 ("net/tls: getsockopt supports complete algorithm list") getsockopt(TLS_TX/TLS_RX)
#: read back only AES-GCM: AES-CCM-128 and ChaCha20-Poly1305 could be set but not read (EINVAL, which
#: get_crypto_info reports as None, "the kernel cannot say", so the send budget assumes the worst).
READBACK_ONLY_GCM_BEFORE = (5, 16)

KEY_UPDATE = bytes([24, 0, 0, 1, 0])  # HandshakeType.key_update, length 1, update_not_requested
TICKET = bytes([4, 0, 0, 9]) + b"\x00\x00\x0e\x10\x01\x02\x03\x04\x00"  # shaped like a NewSessionTicket


def keys(cipher: CipherType, version: TLSVersion, seq: int = SEQ0) -> tuple[CryptoInfo, RecordProtection]:
    """Random keys as both sides see them: ktls's CryptoInfo and the reference's own state."""
    spec = CIPHERS[cipher]
    key = os.urandom(spec.key_size)
    if version is TLSVersion.TLS1_3:
        iv = os.urandom(12)
        return CryptoInfo.tls13(cipher, key, iv, seq), RecordProtection(cipher, TLS13, key, iv, seq)
    if spec.salt_size:
        salt = os.urandom(4)
        info = CryptoInfo.tls12(cipher, key, salt, seq, explicit_nonce=NONCE0)
        return info, RecordProtection(cipher, 0x0303, key, salt, seq, NONCE0)
    iv = os.urandom(12)
    return CryptoInfo.tls12(cipher, key, iv, seq), RecordProtection(cipher, 0x0303, key, iv, seq)


def need_cipher(support: KernelSupport, cipher: CipherType, version: TLSVersion) -> None:
    """Skip (with the reason) a combination the kernel refuses; ``test_refusals_are_typed`` covers those."""
    if not support.supports(cipher, version):
        pytest.skip(f"this kernel refuses {cipher.name} with {version.label} (checked by test_refusals_are_typed)")
    if cipher not in AEADS:
        pytest.skip(f"no independent implementation of {cipher.name} to check the kernel against")


def read_back(sock: socket.socket, direction: Direction, cipher: CipherType) -> CryptoInfo | None:
    """getsockopt's view of one direction; None where the kernel cannot read this cipher back (checked)."""
    info = get_crypto_info(sock, direction)
    unreadable = cipher in {CipherType.AES_CCM_128, CipherType.CHACHA20_POLY1305}
    assert (info is None) == (unreadable and kernel_version() < READBACK_ONLY_GCM_BEFORE)
    return info


def recv_exactly_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def combo_id(combo: tuple[CipherType, TLSVersion]) -> str:
    return f"{combo[0].name}-{combo[1].label}"


# -- probe agrees with the kernel ---------------------------------------------------------------------------


def expected_ciphers(guest: str, version: tuple[int, ...]) -> set[CipherType]:
    """What a matrix guest's kernel must accept: AES-GCM/CCM everywhere; ChaCha20-Poly1305 from Linux 5.11
    (5.10's do_tls_setsockopt_conf knows only the three AES ciphers); SM4 (5.16) and ARIA (6.1) only where
    the kernel is built with them."""
    expected = set(AES_CIPHERS)
    if version >= (5, 11):
        expected.add(CipherType.CHACHA20_POLY1305)
    if guest in ALL_AEAD_GUESTS:
        expected |= SM4_AND_ARIA
    return expected


def test_guest_kernel_offers_exactly_its_ciphers(support: KernelSupport) -> None:
    """The probe finds what this guest's kernel is built with, no more and no less, in both directions and for
    every TLS version the kernel allows the cipher (ARIA: TLS 1.2 only, validate_crypto_info)."""
    guest = os.environ.get("KTLS_GUEST", "")
    if not guest:
        pytest.skip("not a kernel-matrix guest: which ciphers this kernel is built with is unknown")
    expected = expected_ciphers(guest, kernel_version())
    for spec in CIPHERS.values():
        for version in spec.versions:
            offered = support.supports(spec.cipher_type, version)  # both directions
            assert offered == (spec.cipher_type in expected), f"{spec.name} {version.label} on {guest}"


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_refusals_are_typed(support: KernelSupport, tcp_pair: Pair, combo: tuple[CipherType, TLSVersion]) -> None:
    """Whatever probe() says about a combination is what the kernel does when asked again."""
    cipher, version = combo
    sock, _ = tcp_pair
    setup_ulp(sock)
    info, _ = keys(cipher, version)
    if support.supports(cipher, version, Direction.TX):
        set_crypto_info(sock, Direction.TX, info)
        return
    with pytest.raises(CipherUnavailable) as caught:
        set_crypto_info(sock, Direction.TX, info)
    assert caught.value.errno in (errno.ENOENT, errno.EINVAL)
    assert cipher.name in str(caught.value)


def test_aria_with_tls13_is_not_even_asked(support: KernelSupport) -> None:
    assert not any(c.cipher.name.startswith("ARIA") and c.version is TLSVersion.TLS1_3 for c in support.ciphers)


def test_rekey_support_follows_the_kernel_version(support: KernelSupport) -> None:
    assert support.rekey_tx == (kernel_version() >= (6, 14))
    assert support.rekey_rx == (kernel_version() >= (6, 14))
    assert support.rx_expect_no_pad == (kernel_version() >= (6, 0))  # TLS_RX_EXPECT_NO_PAD: Linux 6.0


# -- kernel TX → independent decryption ---------------------------------------------------------------------


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_kernel_tx_decrypts_independently(
    support: KernelSupport, tcp_pair: Pair, combo: tuple[CipherType, TLSVersion]
) -> None:
    cipher, version = combo
    need_cipher(support, cipher, version)
    sender, receiver = tcp_pair
    info, reference = keys(cipher, version)
    setup_ulp(sender)
    set_crypto_info(sender, Direction.TX, info)

    bulk = os.urandom(20000)  # more than one record: the kernel must split at 2^14
    sender.sendall(b"first")
    assert send_record(sender, ContentType.HANDSHAKE, KEY_UPDATE) == len(KEY_UPDATE)
    sender.sendall(bulk)
    send_record(sender, ContentType.ALERT, bytes([1, AlertDescription.close_notify]))
    sent_after = read_back(sender, Direction.TX, cipher)
    sender.shutdown(socket.SHUT_WR)

    records = [reference.open(r) for r in split_records(recv_exactly_eof(receiver))]
    assert [r.seq for r in records] == list(range(SEQ0, SEQ0 + len(records)))
    types = [r.content_type for r in records]
    assert types[:2] == [ContentType.APPLICATION_DATA, ContentType.HANDSHAKE]
    assert types[-1] == ContentType.ALERT
    assert set(types[2:-1]) == {ContentType.APPLICATION_DATA}
    assert records[0].plaintext == b"first"
    assert records[1].plaintext == KEY_UPDATE
    assert b"".join(r.plaintext for r in records[2:-1]) == bulk
    assert all(len(r.plaintext) <= 2**14 for r in records)
    assert records[-1].plaintext == b"\x01\x00"
    if reference.has_explicit_nonce:  # the kernel sends the iv it was given, then counts up per record
        assert [r.explicit_nonce for r in records] == list(range(NONCE0, NONCE0 + len(records)))

    # getsockopt reads back what the kernel will use next.
    if sent_after is None:
        return  # this kernel cannot read it back (READBACK_ONLY_GCM_BEFORE)
    assert sent_after.rec_seq == SEQ0 + len(records)
    assert sent_after.key == info.key
    assert sent_after.salt == info.salt
    if reference.has_explicit_nonce:
        assert sent_after.iv == (NONCE0 + len(records)).to_bytes(8, "big")
    else:
        assert sent_after.iv == info.iv


# -- independent encryption → kernel RX ---------------------------------------------------------------------


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_kernel_rx_decrypts_independent_records(
    support: KernelSupport, tcp_pair: Pair, combo: tuple[CipherType, TLSVersion]
) -> None:
    cipher, version = combo
    need_cipher(support, cipher, version)
    sender, receiver = tcp_pair
    info, reference = keys(cipher, version)
    setup_ulp(receiver)
    set_crypto_info(receiver, Direction.RX, info)

    # TLS 1.3 padding is stripped by the kernel; content + type + padding may reach 2^14 + 1 (RFC 8446 §5.4).
    padding = 7 if version is TLSVersion.TLS1_3 else 0
    bulk = os.urandom(2**14 - padding)
    sender.sendall(
        reference.seal(ContentType.APPLICATION_DATA, b"hello")
        + reference.seal(ContentType.HANDSHAKE, TICKET)
        + reference.seal(ContentType.APPLICATION_DATA, bulk, padding=padding)
        + reference.seal(ContentType.ALERT, bytes([1, AlertDescription.close_notify]))
    )
    assert recv_record(receiver, 65536)[:2] == (ContentType.APPLICATION_DATA, b"hello")
    ticket = recv_record(receiver, 65536)
    assert (ticket.content_type, ticket.data) == (ContentType.HANDSHAKE, TICKET)
    received = b""
    while len(received) < len(bulk):
        record = recv_record(receiver, 65536)
        assert record.content_type == ContentType.APPLICATION_DATA
        received += record.data
    assert received == bulk
    alert = recv_record(receiver, 65536)
    assert (alert.content_type, alert.data) == (ContentType.ALERT, b"\x01\x00")
    state = read_back(receiver, Direction.RX, cipher)
    assert state is None or state.rec_seq == SEQ0 + 4


def test_plain_recv_refuses_a_control_record(support: KernelSupport, tcp_pair: Pair) -> None:
    """A recv without room for the type cmsg must not swallow a control record (rustls/ktls#24)."""
    sender, receiver = tcp_pair
    info, reference = keys(CipherType.AES_GCM_128, TLSVersion.TLS1_3)
    setup_ulp(receiver)
    set_crypto_info(receiver, Direction.RX, info)
    sender.sendall(reference.seal(ContentType.ALERT, b"\x02\x28"))
    with pytest.raises(OSError, match="Input/output error") as caught:
        receiver.recv(100)
    assert caught.value.errno == errno.EIO
    # ... and the record is still there for a read that can take its type.
    assert recv_record(receiver, 100)[:2] == (ContentType.ALERT, b"\x02\x28")


def test_control_record_read_in_pieces(support: KernelSupport, tcp_pair: Pair) -> None:
    """A control record larger than the buffer comes back in pieces, each typed, the last with MSG_EOR."""
    sender, receiver = tcp_pair
    info, reference = keys(CipherType.AES_GCM_128, TLSVersion.TLS1_3)
    setup_ulp(receiver)
    set_crypto_info(receiver, Direction.RX, info)
    message = bytes([4, 0, 0, 96]) + os.urandom(96)
    sender.sendall(reference.seal(ContentType.HANDSHAKE, message) + reference.seal(ContentType.APPLICATION_DATA, b"x"))
    pieces = []
    while True:
        piece = recv_record(receiver, 40)
        assert piece.content_type == ContentType.HANDSHAKE
        pieces.append(piece)
        if piece.end_of_record or sum(len(p.data) for p in pieces) >= len(message):
            break
    assert b"".join(p.data for p in pieces) == message
    assert recv_record(receiver, 40).data == b"x"


# -- hostile input gets the typed error ---------------------------------------------------------------------


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_flipped_bit_is_an_authentication_error(
    support: KernelSupport, tcp_pair: Pair, combo: tuple[CipherType, TLSVersion]
) -> None:
    cipher, version = combo
    need_cipher(support, cipher, version)
    sender, receiver = tcp_pair
    info, reference = keys(cipher, version)
    setup_ulp(receiver)
    set_crypto_info(receiver, Direction.RX, info)
    before = (read_tls_stat() or {}).get("TlsDecryptError", 0)
    record = bytearray(reference.seal(ContentType.APPLICATION_DATA, b"attack at dawn"))
    record[-20] ^= 0x01
    sender.sendall(bytes(record))
    with pytest.raises(RecordAuthenticationError) as caught:
        recv_record(receiver, 65536)
    assert caught.value.errno == errno.EBADMSG
    assert caught.value.alert is AlertDescription.bad_record_mac
    assert (read_tls_stat() or {}).get("TlsDecryptError", 0) == before + 1


def test_oversized_record_is_a_record_overflow(support: KernelSupport, tcp_pair: Pair) -> None:
    sender, receiver = tcp_pair
    info, _ = keys(CipherType.AES_GCM_128, TLSVersion.TLS1_3)
    setup_ulp(receiver)
    set_crypto_info(receiver, Direction.RX, info)
    length = 2**14 + 256 + 1  # one byte over TLSCiphertext's limit (RFC 8446 §5.2)
    sender.sendall(bytes([23, 3, 3]) + length.to_bytes(2, "big") + bytes(length))
    with pytest.raises(RecordOverflowError) as caught:
        recv_record(receiver, 65536)
    assert caught.value.alert is AlertDescription.record_overflow


def test_wrong_record_version_is_a_header_error(support: KernelSupport, tcp_pair: Pair) -> None:
    sender, receiver = tcp_pair
    info, reference = keys(CipherType.AES_GCM_128, TLSVersion.TLS1_2)
    setup_ulp(receiver)
    set_crypto_info(receiver, Direction.RX, info)
    record = bytearray(reference.seal(ContentType.APPLICATION_DATA, b"x"))
    record[2] = 0x01  # legacy_record_version 0x0301
    sender.sendall(bytes(record))
    with pytest.raises(RecordHeaderError) as caught:
        recv_record(receiver, 65536)
    assert caught.value.alert is AlertDescription.decode_error


# -- TLS 1.3 rekey --------------------------------------------------------------------------------------------


def test_tx_rekey(support: KernelSupport, tcp_pair: Pair) -> None:
    sender, receiver = tcp_pair
    info, reference = keys(CipherType.AES_GCM_128, TLSVersion.TLS1_3)
    setup_ulp(sender)
    set_crypto_info(sender, Direction.TX, info)
    sender.sendall(b"old key")
    new_info, new_reference = keys(CipherType.AES_GCM_128, TLSVersion.TLS1_3, seq=0)
    if not support.rekey_tx:
        with pytest.raises(RekeyUnsupported) as caught:
            set_crypto_info(sender, Direction.TX, new_info)
        assert caught.value.errno == errno.EBUSY
        assert kernel_version() < (6, 14)
        return
    set_crypto_info(sender, Direction.TX, new_info)
    sender.sendall(b"new key")
    sender.shutdown(socket.SHUT_WR)
    first, second = split_records(recv_exactly_eof(receiver))
    assert reference.open(first).plaintext == b"old key"
    opened = new_reference.open(second)
    assert (opened.seq, opened.plaintext) == (0, b"new key")


def test_rx_key_update(support: KernelSupport, tcp_pair: Pair) -> None:
    """After a KeyUpdate the kernel (≥ 6.14) holds records until the new key is set; older kernels cannot
    take a new key and fail the next record as unauthenticated, which is why the layer above must stop at
    the KeyUpdate itself."""
    sender, receiver = tcp_pair
    info, reference = keys(CipherType.AES_GCM_128, TLSVersion.TLS1_3)
    new_info, new_reference = keys(CipherType.AES_GCM_128, TLSVersion.TLS1_3, seq=0)
    setup_ulp(receiver)
    set_crypto_info(receiver, Direction.RX, info)
    sender.sendall(
        reference.seal(ContentType.HANDSHAKE, KEY_UPDATE) + new_reference.seal(ContentType.APPLICATION_DATA, b"fresh")
    )
    update = recv_record(receiver, 65536)
    assert (update.content_type, update.data) == (ContentType.HANDSHAKE, KEY_UPDATE)
    if not support.rekey_rx:
        with pytest.raises(RecordAuthenticationError):
            recv_record(receiver, 65536)
        with pytest.raises(RekeyUnsupported):
            set_crypto_info(receiver, Direction.RX, new_info)
        return
    receiver.setblocking(False)
    with pytest.raises(RekeyPending) as caught:
        recv_record(receiver, 65536)
    assert caught.value.errno == errno.EKEYEXPIRED
    receiver.settimeout(20)
    before = (read_tls_stat() or {}).get("TlsRxRekeyOk", 0)
    set_crypto_info(receiver, Direction.RX, new_info)
    assert recv_record(receiver, 65536)[:2] == (ContentType.APPLICATION_DATA, b"fresh")
    assert (read_tls_stat() or {}).get("TlsRxRekeyOk", 0) == before + 1


# -- optional socket options ----------------------------------------------------------------------------------


def test_rx_expect_no_pad_still_decrypts(support: KernelSupport, tcp_pair: Pair) -> None:
    if not support.rx_expect_no_pad:
        pytest.skip(f"TLS_RX_EXPECT_NO_PAD is not in {support.kernel_release} (added in Linux 6.0)")
    sender, receiver = tcp_pair
    info, reference = keys(CipherType.AES_GCM_128, TLSVersion.TLS1_3)
    setup_ulp(receiver)
    set_crypto_info(receiver, Direction.RX, info)
    set_rx_expect_no_pad(receiver)
    data = os.urandom(5000)
    # A padded record breaks the promise: the kernel retries and still delivers it.
    sender.sendall(
        reference.seal(ContentType.APPLICATION_DATA, data) + reference.seal(ContentType.APPLICATION_DATA, b"p", 3)
    )
    got = b""
    while len(got) < len(data) + 1:
        got += recv_record(receiver, 65536).data
    assert got == data + b"p"


def test_tx_max_payload_len_limits_records_on_the_wire(support: KernelSupport, tcp_pair: Pair) -> None:
    if not support.tx_max_payload_len:
        pytest.skip(f"TLS_TX_MAX_PAYLOAD_LEN is not in {support.kernel_release} (added late 2025)")
    sender, receiver = tcp_pair
    info, reference = keys(CipherType.AES_GCM_128, TLSVersion.TLS1_3)
    setup_ulp(sender)
    set_crypto_info(sender, Direction.TX, info)
    set_tx_max_payload_len(sender, 1000)
    data = os.urandom(4500)
    sender.sendall(data)
    sender.shutdown(socket.SHUT_WR)
    opened = [reference.open(r) for r in split_records(recv_exactly_eof(receiver))]
    assert b"".join(r.plaintext for r in opened) == data
    assert max(len(r.plaintext) for r in opened) <= 1000


def test_tls_stat_counts_kernel_sockets(support: KernelSupport, tcp_pair: Pair) -> None:
    before = read_tls_stat()
    assert before is not None
    sock, _ = tcp_pair
    setup_ulp(sock)
    info, _ = keys(CipherType.AES_GCM_128, TLSVersion.TLS1_3)
    set_crypto_info(sock, Direction.TX, info)
    set_crypto_info(sock, Direction.RX, info)
    after = read_tls_stat()
    assert after is not None
    assert after["TlsTxSw"] == before["TlsTxSw"] + 1
    assert after["TlsRxSw"] == before["TlsRxSw"] + 1
    assert after["TlsCurrTxSw"] >= 1

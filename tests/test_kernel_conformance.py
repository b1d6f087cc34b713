"""What the kernel answers to records the RFCs want answered in other ways (issue: RFC conformance, rule 5).

Each case sends one malformed-or-odd record from an independent record layer (``reference_tls``) to a socket
whose receive key is in the kernel, and records the kernel's answer together with ``/proc/net/tls_stat``'s
``TlsDecryptError`` — which counts failed *authentications* only (``net/tls/tls_sw.c``: incremented where
``tls_decrypt_sg`` returns ``-EBADMSG``, not for the padding scan ``tls_padding_length`` nor for the length
check in ``tls_rx_msg_size``). The README's *Conformance* section is this file's table; what ktls sends
instead of the RFC's alert is written next to each case. The guests run tests one at a time in one network
namespace, so the counter is this socket's.
"""

from __future__ import annotations

import errno
import os
import socket

import pytest

from ktls.constants import ContentType, TLSVersion
from ktls.errors import RecordAuthenticationError
from ktls.kernel import (
    CipherType,
    CryptoInfo,
    Direction,
    KernelSupport,
    read_tls_stat,
    recv_record,
    set_crypto_info,
    setup_ulp,
)
from reference_tls import TLS12, TLS13, RecordProtection

pytestmark = pytest.mark.kernel

Pair = tuple[socket.socket, socket.socket]
AES_GCM_128 = 51


def receiving(receiver: socket.socket, version: TLSVersion) -> RecordProtection:
    """Give ``receiver``'s kernel a fresh receive key; the reference seals records under it."""
    key = os.urandom(16)
    setup_ulp(receiver)
    if version is TLSVersion.TLS1_3:
        iv = os.urandom(12)
        set_crypto_info(receiver, Direction.RX, CryptoInfo.tls13(CipherType.AES_GCM_128, key, iv, 0))
        return RecordProtection(AES_GCM_128, TLS13, key, iv, 0)
    salt = os.urandom(4)
    set_crypto_info(receiver, Direction.RX, CryptoInfo.tls12(CipherType.AES_GCM_128, key, salt, 0, explicit_nonce=7))
    return RecordProtection(AES_GCM_128, TLS12, key, salt, 0, explicit_nonce=7)


def decrypt_errors() -> int:
    return (read_tls_stat() or {}).get("TlsDecryptError", 0)


def refused_without_authentication_failure(receiver: socket.socket) -> None:
    """The kernel says ``EBADMSG`` (ktls: ``RecordAuthenticationError``, ``bad_record_mac``) although no
    authentication failed: ``TlsDecryptError`` does not move."""
    before = decrypt_errors()
    with pytest.raises(RecordAuthenticationError) as caught:
        recv_record(receiver, 65536)
    assert caught.value.errno == errno.EBADMSG
    assert decrypt_errors() == before


def test_tls13_inner_plaintext_of_zeros_only(tcp_pair: Pair, support: KernelSupport) -> None:
    """RFC 8446 §5.4: no non-zero byte, no content type → unexpected_message. Kernel: ``tls_padding_length``
    finds none and returns ``-EBADMSG`` (since 4.17, TLS 1.3 receive; 6.0 for the zero-copy path)."""
    sender, receiver = tcp_pair
    reference = receiving(receiver, TLSVersion.TLS1_3)
    record = reference.seal(0, b"", padding=16)  # content type 0 is what "no type" decrypts to
    sender.sendall(record)
    refused_without_authentication_failure(receiver)


def test_plaintext_change_cipher_spec_after_the_handshake(tcp_pair: Pair, support: KernelSupport) -> None:
    """RFC 8446 §5: an unprotected change_cipher_spec after the peer's Finished → unexpected_message. The
    kernel decrypts every record whatever its outer type: one byte is shorter than a tag, and
    ``tls_rx_msg_size`` says ``-EBADMSG``."""
    sender, receiver = tcp_pair
    receiving(receiver, TLSVersion.TLS1_3)
    sender.sendall(bytes([ContentType.CHANGE_CIPHER_SPEC, 3, 3, 0, 1, 1]))
    refused_without_authentication_failure(receiver)


@pytest.mark.parametrize("version", [TLSVersion.TLS1_3, TLSVersion.TLS1_2], ids=lambda v: v.label)
def test_record_shorter_than_its_overhead(tcp_pair: Pair, support: KernelSupport, version: TLSVersion) -> None:
    """A record shorter than its tag (TLS 1.2: than explicit nonce + tag). OpenSSL answers bad_record_mac, and
    so does ktls; the kernel's ``tls_rx_msg_size`` says ``-EBADMSG`` before any decryption."""
    sender, receiver = tcp_pair
    receiving(receiver, version)
    sender.sendall(bytes([ContentType.APPLICATION_DATA, 3, 3, 0, 10]) + bytes(10))
    refused_without_authentication_failure(receiver)


@pytest.mark.parametrize("version", [TLSVersion.TLS1_3, TLSVersion.TLS1_2], ids=lambda v: v.label)
def test_zero_length_application_data_is_skipped(tcp_pair: Pair, support: KernelSupport, version: TLSVersion) -> None:
    """RFC 8446 §5.1 / RFC 5246 §6.2.1: zero-length application data records are legal. The kernel skips them:
    the next read returns the next record's data, never a 0 that would read as the end of the stream."""
    sender, receiver = tcp_pair
    reference = receiving(receiver, version)
    sender.sendall(
        reference.seal(ContentType.APPLICATION_DATA, b"") + reference.seal(ContentType.APPLICATION_DATA, b"after")
    )
    record = recv_record(receiver, 65536)
    assert (record.content_type, record.data) == (ContentType.APPLICATION_DATA, b"after")

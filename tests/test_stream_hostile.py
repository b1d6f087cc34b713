"""Hostile peers against a kernel TLS :class:`ktls.Stream`: raw sockets and an independent record layer.

The stream is built with :meth:`ktls.Stream.from_keys` from keys chosen here, so the hostile side — a plain
TCP socket and ``reference_tls`` (the ``cryptography`` AEADs, written from the RFCs) — can forge exactly the
records it wants and decrypt what the stream answers. TLS 1.3 keys are derived here from traffic secrets
with an HKDF-Expand-Label of our own (``cryptography``'s HKDF), not ktls's, so KeyUpdates are independent too.

Every case checks, on the wire: the typed exception from ``recv``; the alert the stream sent, decrypted by
the hostile side after the stream was closed (so a TCP reset cannot have destroyed it); no hang (every socket
has a timeout); and that ``close()`` released the descriptor (``/proc/self/fd``).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from ktls import Stream
from ktls.constants import AlertDescription, AlertLevel, ContentType, HandshakeType, TLSVersion
from ktls.core.control import MAX_KEY_UPDATES_WITHOUT_DATA
from ktls.core.keys import ConnectionKeys
from ktls.errors import (
    AlertReceived,
    KTLSError,
    PeerMisbehaved,
    RaggedEOF,
    RecordAuthenticationError,
    RecordOverflowError,
    RekeyUnsupported,
    StreamClosed,
)
from ktls.kernel import KernelSupport
from ktls.tls.keyschedule import TrafficKeys
from ktls.tls.suites import suite_by_openssl_name
from reference_tls import TLS12, TLS13, OpenedRecord, RecordProtection, split_records

pytestmark = pytest.mark.kernel

AES_GCM_128 = 51  # include/uapi/linux/tls.h TLS_CIPHER_AES_GCM_128, the reference's cipher id
TIMEOUT = 10.0
VERSIONS = [TLSVersion.TLS1_3, TLSVersion.TLS1_2]


def hkdf_expand_label(secret: bytes, label: bytes, length: int) -> bytes:
    """RFC 8446 §7.1 with SHA-256, written here independently of ``ktls.tls.keyschedule``."""
    full = b"tls13 " + label
    info = struct.pack("!HB", length, len(full)) + full + b"\x00"
    return HKDFExpand(hashes.SHA256(), length, info).derive(secret)


def tls13_protection(secret: bytes) -> RecordProtection:
    key, iv = hkdf_expand_label(secret, b"key", 16), hkdf_expand_label(secret, b"iv", 12)
    return RecordProtection(AES_GCM_128, TLS13, key, iv, 0)


def open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:  # the descriptor listdir itself used
            continue
    return fds


@dataclasses.dataclass
class Hostile:
    """The peer: a raw socket, the record protection of each direction, and (TLS 1.3) its send secret."""

    sock: socket.socket
    out: RecordProtection  # hostile → stream: the stream's receive key
    into: RecordProtection  # stream → hostile: the stream's send key
    out_secret: bytes | None = None

    def seal(self, content_type: int, payload: bytes) -> bytes:
        return self.out.seal(content_type, payload)

    def send(self, content_type: int, payload: bytes) -> None:
        self.sock.sendall(self.seal(content_type, payload))

    def key_update(self) -> bytes:
        """A KeyUpdate(update_not_requested) under the current key; later records use the next key."""
        assert self.out_secret is not None
        record = self.seal(ContentType.HANDSHAKE, bytes([HandshakeType.KEY_UPDATE, 0, 0, 1, 0]))
        self.out_secret = hkdf_expand_label(self.out_secret, b"traffic upd", 32)
        self.out = tls13_protection(self.out_secret)
        return record

    def read_records(self) -> list[OpenedRecord]:
        """Everything the stream sent until its FIN (or a reset after it), decrypted independently."""
        data = bytearray()
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
        return [self.into.open(record) for record in split_records(bytes(data))]


@dataclasses.dataclass
class Case:
    stream: Stream
    hostile: Hostile
    version: TLSVersion


def make_case(version: TLSVersion, *, server_side: bool = True, suppress_ragged_eofs: bool = True) -> Case:
    """A connected loopback pair: our kernel stream on one end, the hostile peer on the other."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        theirs = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        ours, _ = listener.accept()
    ours.settimeout(TIMEOUT)
    if version is TLSVersion.TLS1_3:
        suite = suite_by_openssl_name("TLS_AES_128_GCM_SHA256")
        assert suite is not None
        ours_secret, theirs_secret = os.urandom(32), os.urandom(32)
        keys = ConnectionKeys(suite, tx=ours_secret, rx=theirs_secret)
        stream = Stream.from_keys(
            ours, keys, server_side=server_side, tx_seq=0, rx_seq=0, suppress_ragged_eofs=suppress_ragged_eofs
        )
        hostile = Hostile(theirs, tls13_protection(theirs_secret), tls13_protection(ours_secret), theirs_secret)
        return Case(stream, hostile, version)
    suite = suite_by_openssl_name("ECDHE-RSA-AES128-GCM-SHA256")
    assert suite is not None
    ours_keys, theirs_keys = TrafficKeys(os.urandom(16), os.urandom(4)), TrafficKeys(os.urandom(16), os.urandom(4))
    nonce = int.from_bytes(os.urandom(8), "big") >> 1  # OpenSSL starts explicit nonces at random values too
    stream = Stream.from_keys(
        ours,
        ConnectionKeys(suite, tx=ours_keys, rx=theirs_keys),
        server_side=server_side,
        tx_seq=1,  # TLS 1.2: each side's Finished was record 0
        rx_seq=1,
        tx_explicit_nonce=nonce,
        suppress_ragged_eofs=suppress_ragged_eofs,
    )
    out = RecordProtection(AES_GCM_128, TLS12, theirs_keys.key, theirs_keys.iv, 1, explicit_nonce=12345)
    into = RecordProtection(AES_GCM_128, TLS12, ours_keys.key, ours_keys.iv, 1)
    return Case(stream, Hostile(theirs, out, into), version)


@pytest.fixture
def cases(support: KernelSupport) -> Iterator[list[Case]]:
    """Builds cases on demand; afterwards, every descriptor they opened must be closed again."""
    before = open_fds()
    made: list[Case] = []
    yield made
    for case in made:
        case.stream.close()
        case.hostile.sock.close()
    # Descriptors opened before may close meanwhile (garbage-collected contexts of earlier tests); none
    # may be open now that was not before.
    after = open_fds()
    assert {fd: target for fd, target in after.items() if before.get(fd) != target} == {}, "a descriptor leaked"


def new_case(cases: list[Case], version: TLSVersion, **options: bool) -> Case:
    case = make_case(version, **options)
    cases.append(case)
    assert case.stream.kernel_tx
    assert case.stream.kernel_rx
    return case


def close_and_read(case: Case) -> list[OpenedRecord]:
    """Close our stream (it must release its descriptor), then read what reached the hostile side."""
    fd = case.stream.fileno()
    case.stream.close()
    assert case.stream.fileno() == -1
    assert not os.path.exists(f"/proc/self/fd/{fd}")
    return case.hostile.read_records()


def expect_fatal(case: Case, error: type[KTLSError], alert: AlertDescription) -> KTLSError:
    """``recv`` fails with ``error``; the hostile side gets exactly one fatal ``alert`` and then our FIN."""
    started = time.monotonic()
    with pytest.raises(error) as caught:
        case.stream.recv(65536)
    assert time.monotonic() - started < TIMEOUT / 2, "the stream waited instead of failing"
    assert getattr(caught.value, "alert", alert) is alert
    with pytest.raises(StreamClosed):  # the failure is sticky: no more writes
        case.stream.sendall(b"after the failure")
    records = close_and_read(case)
    assert [(r.content_type, r.plaintext) for r in records] == [
        (ContentType.ALERT, bytes([AlertLevel.FATAL, alert])),
    ]
    return caught.value


def trailing_garbage(case: Case) -> None:
    """More data after the offending record. Left unread, it would make our close a TCP reset, which can
    destroy the alert at the peer: the stream half-closes after the alert and drains before closing."""
    case.hostile.send(ContentType.APPLICATION_DATA, b"unread " * 100)


# -- record-layer attacks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.label)
def test_tampered_record_is_bad_record_mac(cases: list[Case], version: TLSVersion) -> None:
    case = new_case(cases, version)
    good = case.hostile.seal(ContentType.APPLICATION_DATA, b"hello")
    bad = bytearray(case.hostile.seal(ContentType.APPLICATION_DATA, b"attack at dawn"))
    bad[-20] ^= 0x01  # one ciphertext bit
    case.hostile.sock.sendall(good + bytes(bad))
    trailing_garbage(case)
    assert case.stream.recv(100) == b"hello"
    error = expect_fatal(case, RecordAuthenticationError, AlertDescription.bad_record_mac)
    assert error.errno == errno.EBADMSG


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.label)
def test_oversized_record_is_record_overflow(cases: list[Case], version: TLSVersion) -> None:
    case = new_case(cases, version)
    length = 2**14 + 256 + 1  # over TLSCiphertext's limit in both versions (RFC 8446 §5.2, RFC 5246 §6.2.3)
    case.hostile.send(ContentType.APPLICATION_DATA, b"hello")
    case.hostile.sock.sendall(bytes([ContentType.APPLICATION_DATA, 3, 3]) + length.to_bytes(2, "big") + bytes(4096))
    assert case.stream.recv(100) == b"hello"
    error = expect_fatal(case, RecordOverflowError, AlertDescription.record_overflow)
    assert error.errno == errno.EMSGSIZE


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.label)
def test_truncated_record_then_fin_is_a_ragged_eof(cases: list[Case], version: TLSVersion) -> None:
    """The peer's FIN arrives in the middle of a record: the kernel drops the partial record and reports the
    end of the stream (no EBADMSG: nothing was forged, the rest can never come). Like ``ssl``, an EOF
    without close_notify: ``RaggedEOF`` (or ``b""`` with ``suppress_ragged_eofs``, and ``ragged_eof``)."""
    case = new_case(cases, version, suppress_ragged_eofs=False)
    case.hostile.send(ContentType.APPLICATION_DATA, b"hello")
    record = case.hostile.seal(ContentType.APPLICATION_DATA, b"x" * 1000)
    case.hostile.sock.sendall(record[:500])
    case.hostile.sock.shutdown(socket.SHUT_WR)
    assert case.stream.recv(100) == b"hello"
    with pytest.raises(RaggedEOF):
        case.stream.recv(100)
    assert case.stream.ragged_eof
    assert case.stream.recv(100) == b""  # the end stays the end
    records = close_and_read(case)
    # Our side ends cleanly: whatever the peer did, our own writes were complete.
    assert [(r.content_type, r.plaintext) for r in records] == [(ContentType.ALERT, b"\x01\x00")]


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.label)
def test_reset_in_the_middle_of_a_record(cases: list[Case], version: TLSVersion) -> None:
    """A TCP reset while a record is half received: ``ConnectionResetError``, as a plain socket gives."""
    case = new_case(cases, version)
    case.hostile.send(ContentType.APPLICATION_DATA, b"hello")
    record = case.hostile.seal(ContentType.APPLICATION_DATA, b"x" * 1000)
    case.hostile.sock.sendall(record[:500])
    assert case.stream.recv(100) == b"hello"
    case.hostile.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    case.hostile.sock.close()  # SO_LINGER 0: RST
    started = time.monotonic()
    with pytest.raises(ConnectionResetError):
        case.stream.recv(100)
    assert time.monotonic() - started < TIMEOUT / 2
    fd = case.stream.fileno()
    case.stream.close()
    assert not os.path.exists(f"/proc/self/fd/{fd}")


# -- records the kernel decrypts but the protocol forbids -----------------------------------------------------


def test_change_cipher_spec_after_the_handshake(cases: list[Case]) -> None:
    """TLS 1.2: a protected ChangeCipherSpec would start an epoch nobody negotiated."""
    case = new_case(cases, TLSVersion.TLS1_2)
    case.hostile.send(ContentType.CHANGE_CIPHER_SPEC, b"\x01")
    trailing_garbage(case)
    expect_fatal(case, PeerMisbehaved, AlertDescription.unexpected_message)


def test_unknown_content_type(cases: list[Case]) -> None:
    """TLS 1.3: the inner content type is only known after decryption; 99 is none of TLS's."""
    case = new_case(cases, TLSVersion.TLS1_3)
    case.hostile.send(99, b"what is this")
    trailing_garbage(case)
    expect_fatal(case, PeerMisbehaved, AlertDescription.unexpected_message)


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.label)
def test_malformed_alert_is_a_decode_error(cases: list[Case], version: TLSVersion) -> None:
    case = new_case(cases, version)
    case.hostile.send(ContentType.ALERT, bytes([AlertLevel.WARNING, AlertDescription.close_notify, 0]))
    expect_fatal(case, PeerMisbehaved, AlertDescription.decode_error)


def test_peer_fatal_alert_is_typed_and_not_answered(cases: list[Case]) -> None:
    case = new_case(cases, TLSVersion.TLS1_3)
    case.hostile.send(ContentType.ALERT, bytes([AlertLevel.FATAL, AlertDescription.handshake_failure]))
    with pytest.raises(AlertReceived) as caught:
        case.stream.recv(100)
    assert caught.value.alert is AlertDescription.handshake_failure
    case.hostile.sock.shutdown(socket.SHUT_WR)
    assert close_and_read(case) == []  # RFC 8446 §6.2: no alert goes back


def test_key_update_flood(cases: list[Case], support: KernelSupport) -> None:
    """KeyUpdates with no data between them, each under the key the previous one announced. Linux ≥ 6.14
    follows them up to the limit and then the stream refuses the flood; older kernels cannot take a new
    receive key at all, which the stream says at the first one (instead of an opaque EBADMSG later)."""
    case = new_case(cases, TLSVersion.TLS1_3)
    case.hostile.send(ContentType.APPLICATION_DATA, b"hello")
    flood = b"".join(case.hostile.key_update() for _ in range(MAX_KEY_UPDATES_WITHOUT_DATA + 1))
    case.hostile.sock.sendall(flood + case.hostile.seal(ContentType.APPLICATION_DATA, b"never read"))
    assert case.stream.recv(100) == b"hello"
    if not support.rekey:
        error = expect_fatal(case, RekeyUnsupported, AlertDescription.internal_error)
        assert "6.14" in str(error)
        return
    error = expect_fatal(case, PeerMisbehaved, AlertDescription.unexpected_message)
    assert "KeyUpdates without application data" in str(error)


def test_key_updates_with_data_between_are_no_flood(cases: list[Case], support: KernelSupport) -> None:
    """More KeyUpdates than the flood limit, but with application data between them: all followed."""
    if not support.rekey:
        pytest.skip(f"{support.kernel_release} cannot take a new receive key (Linux < 6.14)")
    case = new_case(cases, TLSVersion.TLS1_3)
    wire = b""
    for index in range(2 * MAX_KEY_UPDATES_WITHOUT_DATA):
        wire += case.hostile.key_update()
        if index % 16 == 15:
            wire += case.hostile.seal(ContentType.APPLICATION_DATA, b"%d;" % index)
    case.hostile.sock.sendall(wire)
    received = b""
    while received.count(b";") < 4:
        received += case.stream.recv(100)
    assert received == b"15;31;47;63;"
    case.stream.sendall(b"still here")  # our send key never changed: nobody asked
    case.hostile.sock.shutdown(socket.SHUT_WR)
    records = close_and_read(case)
    assert [(r.content_type, r.plaintext) for r in records] == [
        (ContentType.APPLICATION_DATA, b"still here"),
        (ContentType.ALERT, b"\x01\x00"),
    ]


# -- renegotiation is refused, the connection goes on ------------------------------------------------------


@pytest.mark.parametrize("server_side", [True, False], ids=["ClientHello-to-server", "HelloRequest-to-client"])
def test_renegotiation_refused_connection_usable(cases: list[Case], server_side: bool) -> None:
    """TLS 1.2: a renegotiation attempt gets a ``no_renegotiation`` warning (RFC 5246 §7.2.2, RFC 5746 §4)
    and data keeps flowing both ways, which real OpenSSL/GnuTLS peers never try (they give up at once)."""
    case = new_case(cases, TLSVersion.TLS1_2, server_side=server_side)
    if server_side:
        body = b"\x03\x03" + os.urandom(32) + b"\x00\x00\x02\xc0\x2f\x01\x00"  # a small ClientHello
        hello = bytes([HandshakeType.CLIENT_HELLO]) + len(body).to_bytes(3, "big") + body
    else:
        hello = bytes([HandshakeType.HELLO_REQUEST, 0, 0, 0])
    case.hostile.send(ContentType.HANDSHAKE, hello)
    case.hostile.send(ContentType.APPLICATION_DATA, b"still talking")
    assert case.stream.recv(100) == b"still talking"
    case.stream.sendall(b"so am I")
    case.hostile.send(ContentType.ALERT, bytes([AlertLevel.WARNING, AlertDescription.close_notify]))
    assert case.stream.recv(100) == b""
    assert not case.stream.ragged_eof
    records = close_and_read(case)
    assert [(r.content_type, r.plaintext) for r in records] == [
        (ContentType.ALERT, bytes([AlertLevel.WARNING, AlertDescription.no_renegotiation])),
        (ContentType.APPLICATION_DATA, b"so am I"),
        (ContentType.ALERT, b"\x01\x00"),  # TLS 1.2: the peer's close_notify is answered
    ]

"""Hostile peers against both front ends: one table of cases, each run against the blocking ``ktls.Stream`` and
the asyncio ``KTLSTransport`` (``frontends``), with the outcome written once and asserted identically.

The peer is a plain TCP socket with the independent record layer (``reference_tls``, the ``cryptography``
AEADs, written from the RFCs), so it can forge exactly the records it wants and decrypt what we answer. Our
side is built one of two ways (a :class:`Setup`): from keys chosen here (``Stream.from_keys`` /
``ktls.asyncio.connect_with_keys``; TLS 1.3 KeyUpdates then derived independently, ``hostile_peer``), or by a
real handshake with the peer (our handshake driver and its key log on the peer's side), which also takes the
hand-off, the server's session tickets and the client's deferred receive window.

Every case checks, on the wire: the data delivered before the end; how the receive side ended (the typed
error from ``ktls.errors`` with its ``alert``, a ragged EOF, or the peer's close_notify); that no more writes
are taken after a failure; exactly the records we sent, decrypted by the peer after our FIN (so a TCP reset
cannot have destroyed them) — a fatal alert, or nothing after a fatal alert received; no hang (every socket and
wait is bounded by ``TIMEOUT``); and that the descriptor was released and nothing leaked (``/proc/self/fd``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import socket
import ssl
import struct
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from certs import CertFiles
from frontends import FRONT_ENDS, End, FrontEnd, Ours, Public
from hostile_peer import AES_GCM_128, TIMEOUT, Hostile, tls13_protection
from ktls.constants import AlertDescription, AlertLevel, ContentType, HandshakeType, TLSVersion
from ktls.core.control import MAX_KEY_UPDATES_WITHOUT_DATA
from ktls.core.keys import ConnectionKeys
from ktls.errors import (
    AlertReceived,
    KernelTLSUnavailable,
    KTLSError,
    PeerMisbehaved,
    RecordAuthenticationError,
    RecordHeaderError,
    RecordOverflowError,
    RekeyUnsupported,
    TLSProtocolError,
)
from ktls.kernel import CryptoInfo, Direction, KernelSupport
from ktls.tls.keyschedule import TrafficKeys
from ktls.tls.suites import suite_by_openssl_name
from reference_tls import TLS12, TLS13, RecordProtection
from support import contexts, handshake_keys

pytestmark = pytest.mark.kernel

Record = tuple[int, bytes]
CLOSE_NOTIFY: Record = (ContentType.ALERT, bytes([AlertLevel.WARNING, AlertDescription.close_notify]))


def fatal(alert: AlertDescription) -> Record:
    return (ContentType.ALERT, bytes([AlertLevel.FATAL, alert]))


# -- how our side is built ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setup:
    name: str
    version: TLSVersion
    #: A real handshake with the peer; else ``from_keys``/``connect_with_keys`` with keys chosen here.
    handshake: bool
    server_side: bool = True

    @property
    def deferred(self) -> bool:
        """A TLS 1.3 client after a real handshake: OpenSSL reads until the first application record."""
        return self.handshake and not self.server_side and self.version is TLSVersion.TLS1_3


KEYS13 = Setup("keys-1.3", TLSVersion.TLS1_3, handshake=False)
KEYS12 = Setup("keys-1.2", TLSVersion.TLS1_2, handshake=False)
HANDSHAKE13 = Setup("handshake-1.3", TLSVersion.TLS1_3, handshake=True)
HANDSHAKE12 = Setup("handshake-1.2", TLSVersion.TLS1_2, handshake=True)
KEYS12_CLIENT = Setup("keys-1.2-client", TLSVersion.TLS1_2, handshake=False, server_side=False)
KEYS13_CLIENT = Setup("keys-1.3-client", TLSVersion.TLS1_3, handshake=False, server_side=False)
HANDSHAKE13_CLIENT = Setup("handshake-1.3-client", TLSVersion.TLS1_3, handshake=True, server_side=False)
EVERY_VERSION = (KEYS13, KEYS12, HANDSHAKE13, HANDSHAKE12)
TLS13_ONLY = (KEYS13, HANDSHAKE13)


def with_keys(front_end: FrontEnd, setup: Setup, read_size: int) -> tuple[Ours, Hostile]:
    """A loopback pair: ours from keys chosen here, the peer holding the other end of each key."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        theirs = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        sock, _ = listener.accept()
    sock.settimeout(TIMEOUT)
    if setup.version is TLSVersion.TLS1_3:
        suite = suite_by_openssl_name("TLS_AES_128_GCM_SHA256")
        assert suite is not None
        ours_secret, theirs_secret = os.urandom(32), os.urandom(32)
        ours = front_end.with_keys(
            sock,
            ConnectionKeys(suite, tx=ours_secret, rx=theirs_secret),
            server_side=setup.server_side,
            tx_seq=0,
            rx_seq=0,
            tx_explicit_nonce=None,
            read_size=read_size,
        )
        return ours, Hostile(theirs, tls13_protection(theirs_secret), tls13_protection(ours_secret), theirs_secret)
    suite = suite_by_openssl_name("ECDHE-RSA-AES128-GCM-SHA256")
    assert suite is not None
    ours_keys, theirs_keys = TrafficKeys(os.urandom(16), os.urandom(4)), TrafficKeys(os.urandom(16), os.urandom(4))
    ours = front_end.with_keys(
        sock,
        ConnectionKeys(suite, tx=ours_keys, rx=theirs_keys),
        server_side=setup.server_side,
        tx_seq=1,  # TLS 1.2: each side's Finished was record 0
        rx_seq=1,
        tx_explicit_nonce=int.from_bytes(os.urandom(8), "big") >> 1,  # OpenSSL starts at random values too
        read_size=read_size,
    )
    out = RecordProtection(AES_GCM_128, TLS12, theirs_keys.key, theirs_keys.iv, 1, explicit_nonce=12345)
    into = RecordProtection(AES_GCM_128, TLS12, ours_keys.key, ours_keys.iv, 1)
    return ours, Hostile(theirs, out, into)


def reference(info: CryptoInfo) -> RecordProtection:
    """The independent record layer's state for one direction of the peer's key log."""
    if info.version is TLSVersion.TLS1_3 or not info.salt:
        version = TLS13 if info.version is TLSVersion.TLS1_3 else TLS12
        return RecordProtection(info.cipher_type, version, info.key, info.salt + info.iv, info.rec_seq)
    return RecordProtection(info.cipher_type, TLS12, info.key, info.salt, info.rec_seq, int.from_bytes(info.iv, "big"))


def peer_handshake(sock: socket.socket, context: ssl.SSLContext, *, server_side: bool, ours_server: bool) -> Hostile:
    """The peer's side of a real handshake; afterwards it writes its records by hand."""
    result, keys = handshake_keys(sock, context, server_side=server_side)
    out = reference(keys.crypto_info(Direction.TX, result.tx_seq, result.tx_explicit_nonce))
    into = reference(keys.crypto_info(Direction.RX, result.rx_seq))
    tls13 = result.version is TLSVersion.TLS1_3
    return Hostile(
        sock,
        out,
        into,
        next_out=(lambda: reference(keys.next_key(Direction.TX))) if tls13 else None,
        tickets=2 if tls13 and ours_server else 0,  # OpenSSL's default num_tickets
    )


SSL_VERSIONS = {TLSVersion.TLS1_3: ssl.TLSVersion.TLSv1_3, TLSVersion.TLS1_2: ssl.TLSVersion.TLSv1_2}


def with_handshake(front_end: FrontEnd, setup: Setup, read_size: int, cert: CertFiles) -> tuple[Ours, Hostile]:
    server_ctx, client_ctx = contexts(cert, SSL_VERSIONS[setup.version])
    with ThreadPoolExecutor(1) as pool:
        if setup.server_side:
            listening = front_end.listen(server_ctx, read_size=read_size)
            try:

                def client() -> Hostile:
                    sock = socket.create_connection(("127.0.0.1", listening.port), timeout=TIMEOUT)
                    return peer_handshake(sock, client_ctx, server_side=False, ours_server=True)

                peer = pool.submit(client)
                ours = listening.accept()
            finally:
                listening.close()
        else:
            with socket.create_server(("127.0.0.1", 0)) as listener:
                listener.settimeout(TIMEOUT)

                def server() -> Hostile:
                    sock, _ = listener.accept()
                    sock.settimeout(TIMEOUT)
                    return peer_handshake(sock, server_ctx, server_side=True, ours_server=False)

                peer = pool.submit(server)
                sock = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
                ours = front_end.connect(sock, client_ctx, read_size=read_size)
        return ours, peer.result(TIMEOUT)


# -- what must happen -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Fails:
    """The receive side ends with ``error``. ``alert``: the ``alert`` it carries — the fatal alert we sent the
    peer, or (``answered=False``) the peer's own, to which nothing goes back (RFC 8446 §6.2)."""

    error: type[BaseException]
    alert: AlertDescription | None = None
    answered: bool = True
    errno: int | None = None
    says: str | None = None


@dataclasses.dataclass(frozen=True)
class Closes:
    """The receive side ends without an error: the peer's close_notify, or (``ragged``) a bare TCP FIN."""

    ragged: bool = False


Outcome = Fails | Closes


def nothing(peer: Hostile) -> None:
    pass


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    #: What the peer sends first.
    wire: Callable[[Hostile], bytes]
    #: The application data we must deliver before the end.
    data: bytes
    #: How the receive side ends (a function of the kernel where its abilities decide).
    end: Outcome | Callable[[KernelSupport], Outcome]
    #: Once ``data`` arrived: what we send, then the peer's next move.
    reply: bytes = b""
    then: Callable[[Hostile], None] = nothing
    #: ``Closes``: the records we send the peer (after a server's session tickets).
    sent: tuple[Record, ...] = (CLOSE_NOTIFY,)
    setups: tuple[Setup, ...] = EVERY_VERSION
    needs_rekey: bool = False
    #: Our reads: ``recv_into`` a buffer of this size / a ``BufferedProtocol`` of it when small.
    read_size: int = 65536
    #: More about the connection's public state at the end.
    check: Callable[[Public], None] = lambda public: None


def hello(peer: Hostile) -> bytes:
    return peer.seal(ContentType.APPLICATION_DATA, b"hello")


def trailing_garbage(peer: Hostile) -> bytes:
    """More data after the offending record. Left unread, it would make our close a TCP reset, which can
    destroy the alert at the peer: we half-close after the alert and drain before closing."""
    return peer.seal(ContentType.APPLICATION_DATA, b"unread " * 100)


def flip(record: bytes, offset: int) -> bytes:
    """``record`` with one bit of the byte at ``offset`` (negative: from the end) inverted."""
    changed = bytearray(record)
    changed[offset] ^= 0x01
    return bytes(changed)


def record_header(content_type: int, version: int, length: int) -> bytes:
    return struct.pack("!BHH", content_type, version, length)


def tampered_ciphertext(peer: Hostile) -> bytes:
    good = hello(peer)
    bad = flip(peer.seal(ContentType.APPLICATION_DATA, b"attack at dawn"), -20)  # one ciphertext bit
    return good + bad + trailing_garbage(peer)


def tampered_tag(peer: Hostile) -> bytes:
    return hello(peer) + flip(peer.seal(ContentType.APPLICATION_DATA, b"x" * 100), -3)


def truncated_ciphertext(peer: Hostile) -> bytes:
    """A whole record whose header says 4 bytes less: the tag is cut."""
    good = hello(peer)
    record = peer.seal(ContentType.APPLICATION_DATA, b"y" * 100)
    return good + record_header(ContentType.APPLICATION_DATA, TLS12, len(record) - 5 - 4) + record[5:-4]


#: Over TLSCiphertext's limit in both versions (RFC 8446 §5.2, RFC 5246 §6.2.3).
OVERSIZED = 2**14 + 256 + 1


def oversized_header_only(peer: Hostile) -> bytes:
    """Only 4 KiB of the body follow: the header alone must be refused (no waiting for 16 KiB)."""
    return hello(peer) + record_header(ContentType.APPLICATION_DATA, TLS12, OVERSIZED) + bytes(4096)


def oversized(peer: Hostile) -> bytes:
    return hello(peer) + record_header(ContentType.APPLICATION_DATA, TLS12, OVERSIZED) + os.urandom(OVERSIZED)


def bad_record_version(peer: Hostile) -> bytes:
    good = hello(peer)
    record = peer.seal(ContentType.APPLICATION_DATA, b"z")
    return good + record_header(record[0], 0x0301, len(record) - 5) + record[5:]


def sealed(content_type: int, payload: bytes, *, garbage: bool = False) -> Callable[[Hostile], bytes]:
    """``hello``, then one record of ``content_type`` (then ``trailing_garbage``)."""

    def wire(peer: Hostile) -> bytes:
        return hello(peer) + peer.seal(content_type, payload) + (trailing_garbage(peer) if garbage else b"")

    return wire


def half_record(peer: Hostile) -> bytes:
    return peer.seal(ContentType.APPLICATION_DATA, b"x" * 1000)[:500]


def half_record_then_fin(peer: Hostile) -> None:
    peer.sock.sendall(half_record(peer))
    peer.sock.shutdown(socket.SHUT_WR)


def half_record_then_reset(peer: Hostile) -> None:
    peer.sock.sendall(half_record(peer))
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.sock.close()  # SO_LINGER 0: RST


def close_notify(peer: Hostile) -> None:
    peer.send(ContentType.ALERT, CLOSE_NOTIFY[1])


KEY_UPDATE = bytes([HandshakeType.KEY_UPDATE, 0, 0, 1, 0])


def key_update_flood(peer: Hostile) -> bytes:
    """KeyUpdates with no data between them, each under the key the previous one announced."""
    good = hello(peer)
    flood = b"".join(peer.key_update() for _ in range(MAX_KEY_UPDATES_WITHOUT_DATA + 1))
    return good + flood + peer.seal(ContentType.APPLICATION_DATA, b"never read")


def flood_outcome(support: KernelSupport) -> Outcome:
    """Linux ≥ 6.14 follows KeyUpdates up to the limit and then we refuse the flood; older kernels cannot take
    a new receive key at all, which we say at the first one (instead of an opaque EBADMSG later)."""
    if support.rekey:
        return Fails(PeerMisbehaved, AlertDescription.unexpected_message, says="KeyUpdates without application data")
    return Fails(RekeyUnsupported, AlertDescription.internal_error, says="6.14")


def key_updates_with_data_between(peer: Hostile) -> bytes:
    """More KeyUpdates than the flood limit, with application data after every 16th."""
    wire = b""
    for index in range(2 * MAX_KEY_UPDATES_WITHOUT_DATA):
        wire += peer.key_update()
        if index % 16 == 15:
            wire += peer.seal(ContentType.APPLICATION_DATA, b"%d;" % index)
    return wire


def key_update_mid_stream(peer: Hostile) -> bytes:
    out = hello(peer) + peer.key_update()
    return out + peer.seal(ContentType.APPLICATION_DATA, b" world") + peer.seal(ContentType.ALERT, CLOSE_NOTIFY[1])


def renegotiation(message: bytes) -> Callable[[Hostile], bytes]:
    def wire(peer: Hostile) -> bytes:
        return peer.seal(ContentType.HANDSHAKE, message) + peer.seal(ContentType.APPLICATION_DATA, b"still talking")

    return wire


CLIENT_HELLO_BODY = b"\x03\x03" + bytes(32) + b"\x00\x00\x02\xc0\x2f\x01\x00"  # a small ClientHello
CLIENT_HELLO = bytes([HandshakeType.CLIENT_HELLO]) + len(CLIENT_HELLO_BODY).to_bytes(3, "big") + CLIENT_HELLO_BODY
HELLO_REQUEST = bytes([HandshakeType.HELLO_REQUEST, 0, 0, 0])
NO_RENEGOTIATION: Record = (ContentType.ALERT, bytes([AlertLevel.WARNING, AlertDescription.no_renegotiation]))
#: A NewSessionTicket (lifetime 3600, age_add, empty nonce, a 6000-byte ticket, no extensions).
TICKET_BODY = (
    b"\x00\x00\x0e\x10" + b"\x01\x02\x03\x04" + b"\x00" + (6000).to_bytes(2, "big") + bytes(6000) + b"\x00\x00"
)
LARGE_TICKET = bytes([HandshakeType.NEW_SESSION_TICKET]) + len(TICKET_BODY).to_bytes(3, "big") + TICKET_BODY


def large_ticket_between_data(peer: Hostile) -> bytes:
    out = peer.seal(ContentType.APPLICATION_DATA, b"first record, read by OpenSSL;")
    out += peer.seal(ContentType.HANDSHAKE, LARGE_TICKET)
    out += peer.seal(ContentType.APPLICATION_DATA, b" then the kernel")
    return out + peer.seal(ContentType.ALERT, CLOSE_NOTIFY[1])


def split_key_update(split: int) -> Callable[[Hostile], bytes]:
    """A KeyUpdate in two records (RFC 8446 §5.1): Linux ≥ 6.14 pauses after the first, whose first byte is 24."""

    def wire(peer: Hostile) -> bytes:
        out = hello(peer) + peer.key_update(split=split)
        return out + peer.seal(ContentType.APPLICATION_DATA, b" world") + peer.seal(ContentType.ALERT, CLOSE_NOTIFY[1])

    return wire


#: A small NewSessionTicket whose second fragment starts with byte 24 (its ticket_age_add): the kernel sees a
#: handshake record starting like a KeyUpdate.
SMALL_TICKET_BODY = b"\x00\x00\x0e\x10" + b"\x18\x02\x03\x04" + b"\x00" + b"\x00\x01\x07" + b"\x00\x00"
SMALL_TICKET = bytes([HandshakeType.NEW_SESSION_TICKET]) + len(SMALL_TICKET_BODY).to_bytes(3, "big") + SMALL_TICKET_BODY


def ticket_fragment_starting_with_24(peer: Hostile) -> bytes:
    out = peer.seal(ContentType.HANDSHAKE, SMALL_TICKET[:8]) + peer.seal(ContentType.HANDSHAKE, SMALL_TICKET[8:])
    return (
        out
        + peer.seal(ContentType.APPLICATION_DATA, b"after the ticket")
        + peer.seal(ContentType.ALERT, CLOSE_NOTIFY[1])
    )


def fragment_then(content_type: int, payload: bytes) -> Callable[[Hostile], bytes]:
    """``hello``, the first 5 bytes of a handshake message, then a record of another type (RFC 8446 §5.1)."""

    def wire(peer: Hostile) -> bytes:
        return hello(peer) + peer.seal(ContentType.HANDSHAKE, SMALL_TICKET[:5]) + peer.seal(content_type, payload)

    return wire


def hello_request_around_data(peer: Hostile) -> bytes:
    """TLS 1.2 lets record types interleave (RFC 5246 §6.2.1): a HelloRequest in two records, data between."""
    out = peer.seal(ContentType.HANDSHAKE, HELLO_REQUEST[:2]) + peer.seal(ContentType.APPLICATION_DATA, b"still ")
    return (
        out + peer.seal(ContentType.HANDSHAKE, HELLO_REQUEST[2:]) + peer.seal(ContentType.APPLICATION_DATA, b"talking")
    )


def empty_application_data(peer: Hostile) -> bytes:
    out = (
        hello(peer) + peer.seal(ContentType.APPLICATION_DATA, b"") + peer.seal(ContentType.APPLICATION_DATA, b" world")
    )
    return out + peer.seal(ContentType.ALERT, CLOSE_NOTIFY[1])


def inner_plaintext_of_zeros(peer: Hostile) -> bytes:
    """TLS 1.3: a record whose inner plaintext has no non-zero byte, so no content type (RFC 8446 §5.4)."""
    return hello(peer) + peer.out.seal(0, b"", padding=32)


def key_updates_received(count: int) -> Callable[[Public], None]:
    def check(public: Public) -> None:
        assert public.key_updates_received == count

    return check


def kernel_rx(public: Public) -> None:
    assert public.kernel_rx, "the kernel took over receiving after the deferred window"


UNEXPECTED = Fails(PeerMisbehaved, AlertDescription.unexpected_message)
DECODE_ERROR = Fails(PeerMisbehaved, AlertDescription.decode_error)
BAD_RECORD_MAC = Fails(RecordAuthenticationError, AlertDescription.bad_record_mac, errno=errno.EBADMSG)
RECORD_OVERFLOW = Fails(RecordOverflowError, AlertDescription.record_overflow, errno=errno.EMSGSIZE)

CASES = [
    # -- record-layer attacks: the kernel refuses the record ----------------------------------------------------
    Case("tampered-ciphertext", tampered_ciphertext, b"hello", BAD_RECORD_MAC),
    Case("tampered-tag", tampered_tag, b"hello", BAD_RECORD_MAC),
    Case("truncated-ciphertext", truncated_ciphertext, b"hello", BAD_RECORD_MAC),
    Case("oversized-header-only", oversized_header_only, b"hello", RECORD_OVERFLOW),
    Case("oversized", oversized, b"hello", RECORD_OVERFLOW),
    Case("bad-record-version", bad_record_version, b"hello", Fails(RecordHeaderError, AlertDescription.decode_error)),
    # The peer's FIN in the middle of a record: the kernel drops the partial record and reports the end of the
    # stream (nothing was forged; the rest can never come). Like ``ssl``: an EOF without close_notify. Our
    # side ends cleanly: whatever the peer did, our own writes were complete.
    Case("half-a-record-then-fin", hello, b"hello", Closes(ragged=True), then=half_record_then_fin),
    # A TCP reset while a record is half received: ``ConnectionResetError``, as a plain socket gives.
    Case("half-a-record-then-reset", hello, b"hello", Fails(ConnectionResetError), then=half_record_then_reset),
    # -- records the kernel decrypts but the protocol forbids ---------------------------------------------------
    # A protected ChangeCipherSpec would start an epoch nobody negotiated (TLS 1.2); TLS 1.3 has none after the
    # handshake.
    Case("change-cipher-spec", sealed(ContentType.CHANGE_CIPHER_SPEC, b"\x01", garbage=True), b"hello", UNEXPECTED),
    # 99 is none of TLS's content types (TLS 1.3: only known after decryption).
    Case("unknown-content-type", sealed(99, b"what is this", garbage=True), b"hello", UNEXPECTED),
    Case(
        "alert-of-3-bytes-warning",
        sealed(ContentType.ALERT, bytes([AlertLevel.WARNING, AlertDescription.close_notify, 0])),
        b"hello",
        DECODE_ERROR,
    ),
    Case(
        "alert-of-3-bytes-fatal",
        sealed(ContentType.ALERT, bytes([AlertLevel.FATAL, AlertDescription.handshake_failure, 0])),
        b"hello",
        DECODE_ERROR,
    ),
    Case(
        "peer-fatal-alert",
        sealed(ContentType.ALERT, bytes([AlertLevel.FATAL, AlertDescription.handshake_failure])),
        b"hello",
        Fails(AlertReceived, AlertDescription.handshake_failure, answered=False),
    ),
    Case(
        "ticket-to-a-server",
        sealed(ContentType.HANDSHAKE, bytes([4, 0, 0, 9]) + b"\x00\x00\x0e\x10\x01\x02\x03\x04\x00"),
        b"hello",
        UNEXPECTED,
        setups=TLS13_ONLY,
    ),
    Case(
        "key-update-with-trailing-message",
        sealed(ContentType.HANDSHAKE, KEY_UPDATE + KEY_UPDATE),
        b"hello",
        UNEXPECTED,
        setups=TLS13_ONLY,
    ),
    Case("key-update-flood", key_update_flood, b"hello", flood_outcome, setups=TLS13_ONLY),
    # -- RFC 8446 §5.1 framing rules (README, Conformance) -------------------------------------------------------
    Case("empty-alert-record", sealed(ContentType.ALERT, b""), b"hello", UNEXPECTED),
    Case("alert-of-1-byte", sealed(ContentType.ALERT, bytes([AlertLevel.FATAL])), b"hello", DECODE_ERROR),
    Case("two-alerts-in-one-record", sealed(ContentType.ALERT, CLOSE_NOTIFY[1] * 2), b"hello", DECODE_ERROR),
    Case("empty-handshake-record", sealed(ContentType.HANDSHAKE, b""), b"hello", UNEXPECTED),
    Case(
        "data-between-handshake-fragments",
        fragment_then(ContentType.APPLICATION_DATA, b"interleaved"),
        b"hello",
        UNEXPECTED,
        setups=TLS13_ONLY,
    ),
    Case(
        "alert-between-handshake-fragments",
        fragment_then(ContentType.ALERT, bytes([AlertLevel.WARNING, AlertDescription.user_canceled])),
        b"hello",
        UNEXPECTED,
        setups=TLS13_ONLY,
    ),
    # What the kernel conflates: no content type is an unexpected_message to the RFC, EBADMSG to the kernel.
    Case("inner-plaintext-of-zeros", inner_plaintext_of_zeros, b"hello", BAD_RECORD_MAC, setups=TLS13_ONLY),
    Case("zero-length-application-data", empty_application_data, b"hello world", Closes()),
    *(
        Case(
            f"key-update-split-after-{split}",
            split_key_update(split),
            b"hello world",
            Closes(),
            setups=TLS13_ONLY,
            needs_rekey=True,
            check=key_updates_received(1),
        )
        for split in (1, 2, 4)
    ),
    Case(
        "ticket-fragment-starting-with-24",
        ticket_fragment_starting_with_24,
        b"after the ticket",
        Closes(),
        setups=(KEYS13_CLIENT, HANDSHAKE13_CLIENT),
    ),
    Case(
        "tls12-data-between-handshake-fragments",
        hello_request_around_data,
        b"still talking",
        Closes(),
        reply=b"so am I",
        then=close_notify,
        sent=(NO_RENEGOTIATION, (ContentType.APPLICATION_DATA, b"so am I"), CLOSE_NOTIFY),
        setups=(KEYS12_CLIENT,),
    ),
    # -- what a peer may do, followed ---------------------------------------------------------------------------
    # More KeyUpdates than the flood limit, with data between: all followed; our send key never changed (nobody
    # asked), so our data goes out under it.
    Case(
        "key-updates-with-data-between",
        key_updates_with_data_between,
        b"15;31;47;63;",
        Closes(),
        reply=b"still here",
        then=close_notify,
        sent=((ContentType.APPLICATION_DATA, b"still here"), CLOSE_NOTIFY),
        setups=TLS13_ONLY,
        needs_rekey=True,
        check=key_updates_received(2 * MAX_KEY_UPDATES_WITHOUT_DATA),
    ),
    Case(
        "key-update-mid-stream",
        key_update_mid_stream,
        b"hello world",
        Closes(),
        setups=TLS13_ONLY,
        needs_rekey=True,
        check=key_updates_received(1),
    ),
    # Renegotiation gets a ``no_renegotiation`` warning (RFC 5246 §7.2.2, RFC 5746 §4) and data keeps flowing
    # both ways, which real OpenSSL/GnuTLS peers never try (they give up at once). TLS 1.2 answers the peer's
    # close_notify.
    *(
        Case(
            name,
            renegotiation(message),
            b"still talking",
            Closes(),
            reply=b"so am I",
            then=close_notify,
            sent=(NO_RENEGOTIATION, (ContentType.APPLICATION_DATA, b"so am I"), CLOSE_NOTIFY),
            setups=setups,
        )
        for name, message, setups in [
            ("client-hello-to-a-server", CLIENT_HELLO, (KEYS12, HANDSHAKE12)),
            ("hello-request-to-a-client", HELLO_REQUEST, (KEYS12_CLIENT,)),
        ]
    ),
    # Our client reading 7 bytes at a time: after a real handshake the first record arrives through OpenSSL
    # (deferred receive), then the kernel; a 6 KiB NewSessionTicket comes from the kernel in pieces up to
    # MSG_EOR and is reassembled; the data around it arrives whole.
    Case(
        "large-ticket-between-small-reads",
        large_ticket_between_data,
        b"first record, read by OpenSSL; then the kernel",
        Closes(),
        setups=(HANDSHAKE13_CLIENT, KEYS13_CLIENT),
        read_size=7,
        check=kernel_rx,
    ),
]


# -- running a case -------------------------------------------------------------------------------------------


def open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:  # the descriptor listdir itself used
            continue
    return fds


@dataclasses.dataclass
class Opened:
    front_end: FrontEnd
    connections: list[tuple[Ours, Hostile]] = dataclasses.field(default_factory=list)


@pytest.fixture(params=list(FRONT_ENDS))
def opened(request: pytest.FixtureRequest, support: KernelSupport) -> Iterator[Opened]:
    """A front end; afterwards every descriptor the case opened must be closed again."""
    before = open_fds()
    state = Opened(FRONT_ENDS[request.param]())
    try:
        yield state
    finally:
        for ours, peer in state.connections:
            with contextlib.suppress(Exception):
                ours.close()
            peer.sock.close()
        state.front_end.shut_down()
    # Descriptors opened before may close meanwhile (garbage-collected contexts of earlier tests), and a new
    # context keeps an in-memory key-log file (memfd) while it lives; no other may be open now that was not.
    after = open_fds()
    leaked = {fd: target for fd, target in after.items() if before.get(fd) != target and "memfd:" not in target}
    assert leaked == {}, "a descriptor leaked"


def assert_end(expected: Outcome, end: End, ours: Ours) -> None:
    """How the receive side ended is ``expected``."""
    if isinstance(expected, Closes):
        assert end.error is None, repr(end.error)
        assert end.ragged is expected.ragged
        assert ours.public.ragged_eof is expected.ragged
        return
    assert isinstance(end.error, expected.error), repr(end)
    if expected.alert is not None:
        # A TLS error carries its alert; "this kernel cannot" (RekeyUnsupported) does not: the wire tells.
        assert getattr(end.error, "alert", expected.alert) is expected.alert
        assert isinstance(end.error, (TLSProtocolError, KernelTLSUnavailable))
    if expected.errno is not None:
        assert getattr(end.error, "errno", None) == expected.errno
    if expected.says is not None:
        assert expected.says in str(end.error)
    if isinstance(end.error, KTLSError):  # a TLS failure is sticky (a reset is the socket's business)
        ours.assert_refuses_writes()


def read_then_end(peer: Hostile) -> list[tuple[int, bytes]]:
    """What our side sent until its FIN, decrypted independently; then the peer's own FIN."""
    records = [(record.content_type, record.plaintext) for record in peer.read_records()]
    with contextlib.suppress(OSError):  # ENOTCONN: our side's close already ended the connection
        peer.sock.shutdown(socket.SHUT_WR)
    return records


def case_params() -> list[object]:
    return [pytest.param(case, setup, id=f"{case.name}-{setup.name}") for case in CASES for setup in case.setups]


@pytest.mark.parametrize(("case", "setup"), case_params())
def test_hostile_peer(opened: Opened, support: KernelSupport, rsa_cert: CertFiles, case: Case, setup: Setup) -> None:
    if case.needs_rekey and not support.rekey:
        pytest.skip(f"{support.kernel_release} cannot take a new receive key (Linux < 6.14): {case.name}")
    expected = case.end if isinstance(case.end, (Fails, Closes)) else case.end(support)
    if setup.handshake:
        ours, peer = with_handshake(opened.front_end, setup, case.read_size, rsa_cert)
    else:
        ours, peer = with_keys(opened.front_end, setup, case.read_size)
    opened.connections.append((ours, peer))
    assert ours.public.kernel_tx
    assert ours.public.kernel_rx is not setup.deferred

    peer.sock.sendall(case.wire(peer))
    data = ours.read_until(len(case.data))
    if case.reply:
        ours.send(case.reply)
    case.then(peer)
    with ThreadPoolExecutor(1) as pool:
        # The peer reads everything we send until our FIN, then ends its side at once, as a real peer would:
        # our side, which waits (boundedly) for the peer's end after a fatal alert or at close, lets go then.
        reading = pool.submit(read_then_end, peer) if peer.sock.fileno() != -1 else None
        rest, end = ours.finish()

        assert data + rest == case.data
        assert_end(expected, end, ours)
        case.check(ours.public)

        ours.close()
        if reading is None:  # the peer reset the connection: nothing of ours can reach it
            ours.assert_released()
            return
        records = reading.result(TIMEOUT)
    ours.assert_released()
    tickets, records = records[: peer.tickets], records[peer.tickets :]
    assert [(kind, body[0]) for kind, body in tickets] == [
        (ContentType.HANDSHAKE, HandshakeType.NEW_SESSION_TICKET)
    ] * peer.tickets
    if isinstance(expected, Fails):
        assert records == ([fatal(expected.alert)] if expected.alert is not None and expected.answered else [])
    else:
        assert records == list(case.sent)

"""Splice on kernel TLS streams (:mod:`ktls.splice`), checked on the wire against the independent record layer.

The peer is ``hostile_peer``'s: a raw socket and ``reference_tls`` (the ``cryptography`` AEADs), with
TLS 1.3 keys derived by an HKDF of its own, so it seals exactly the records a test wants — data, then a
control record (alert, NewSessionTicket, KeyUpdate, close_notify) in the middle, then more data — and
decrypts what the stream sent. What the kernel does at a control record met by ``splice`` is asserted first,
raw (``test_what_splice_returns_at_a_control_record``); then that ``splice_to`` delivers every byte around
it, in order, and the connection followed the record. The userspace fallback is tested on the host.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import select
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

import ktls
import ktls.asyncio
import ktls.splice
from certs import CertFiles
from hostile_peer import TIMEOUT, Hostile, tls13_protection
from ktls import Stream
from ktls.constants import ContentType, HandshakeType
from ktls.core.keys import ConnectionKeys
from ktls.errors import StreamClosed
from ktls.kernel import KernelSupport, recv_record
from ktls.kernel.probe import kernel_version as _kernel_version
from ktls.tls.suites import suite_by_openssl_name
from reference_tls import OpenedRecord
from support import contexts

USER_CANCELED = bytes([1, 90])  # RFC 8446 §6.1: a warning-level alert that TLS 1.3 still allows
CLOSE_NOTIFY = b"\x01\x00"


@dataclasses.dataclass
class Case:
    stream: Stream
    hostile: Hostile


def make_case() -> Case:
    """Our kernel stream (a TLS 1.3 client, keys chosen here) on one end of a loopback pair, the peer on the other."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        theirs = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        ours, _ = listener.accept()
    ours.settimeout(TIMEOUT)
    suite = suite_by_openssl_name("TLS_AES_128_GCM_SHA256")
    assert suite is not None
    ours_secret, theirs_secret = os.urandom(32), os.urandom(32)
    keys = ConnectionKeys(suite, tx=ours_secret, rx=theirs_secret)
    stream = Stream.from_keys(ours, keys, server_side=False, tx_seq=0, rx_seq=0)
    return Case(stream, Hostile(theirs, tls13_protection(theirs_secret), tls13_protection(ours_secret), theirs_secret))


def _ticket() -> bytes:
    body = (7200).to_bytes(4, "big") + bytes(4) + b"\x01n" + (4).to_bytes(2, "big") + b"tkt!" + bytes(2)
    return bytes([HandshakeType.NEW_SESSION_TICKET]) + len(body).to_bytes(3, "big") + body


@pytest.fixture
def case() -> Iterator[Case]:
    made = make_case()  # a client: it may receive tickets
    yield made
    made.stream.close()
    made.hostile.sock.close()


def _control(case: Case, kind: str, support: KernelSupport | None) -> bytes:
    """The sealed control record of ``kind``; with ``support``, skips a KeyUpdate on kernels that cannot
    follow it (without, the raw record is wanted anyway: the kernel only sees a handshake record)."""
    if kind == "alert":
        return case.hostile.seal(ContentType.ALERT, USER_CANCELED)
    if kind == "ticket":
        return case.hostile.seal(ContentType.HANDSHAKE, _ticket())
    if support is not None and not support.rekey:
        pytest.skip("the kernel cannot take a new receive key (Linux < 6.14)")
    return case.hostile.key_update()


@pytest.mark.kernel
@pytest.mark.parametrize("kind", ["alert", "ticket", "key_update"])
def test_what_splice_returns_at_a_control_record(case: Case, kind: str, support: KernelSupport) -> None:
    """The kernel fact ``ktls.splice`` is built on: application data splices; a control record next makes
    ``splice`` fail with ``EINVAL`` without consuming it; ``recvmsg`` then returns it whole with its type."""
    first = os.urandom(3000)
    records = case.hostile.seal(ContentType.APPLICATION_DATA, first) + _control(case, kind, None)
    case.hostile.sock.sendall(records)
    read_fd, write_fd = os.pipe()
    try:
        assert os.splice(case.stream.fileno(), write_fd, 65536) == len(first)
        assert os.read(read_fd, 65536) == first
        with pytest.raises(OSError, match="Invalid argument") as refused:
            os.splice(case.stream.fileno(), write_fd, 65536)
        assert refused.value.errno == errno.EINVAL
        with pytest.raises(
            OSError, match="Invalid argument"
        ) as again:  # not consumed: the same answer until it is read
            os.splice(case.stream.fileno(), write_fd, 65536)
        assert again.value.errno == errno.EINVAL
    finally:
        os.close(read_fd)
        os.close(write_fd)
    record = recv_record(case.stream.socket, 65536, socket.MSG_DONTWAIT)
    expected_type = ContentType.ALERT if kind == "alert" else ContentType.HANDSHAKE
    assert record.content_type == expected_type
    assert record.end_of_record
    if kind == "alert":
        assert record.data == USER_CANCELED
    elif kind == "ticket":
        assert record.data == _ticket()
    else:
        assert record.data[0] == HandshakeType.KEY_UPDATE


def _readable(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(TIMEOUT * 1000))


@pytest.mark.kernel
def test_what_a_nonblocking_splice_does(case: Case) -> None:
    """The kernel fact behind ``ktls.splice.SPLICE_NONBLOCK_PEEKS``. Before Linux 5.14 ``tls_sw_splice_read``
    advances only ``if (!(flags & MSG_PEEK))``, on the splice flags, where 0x2 is ``SPLICE_F_NONBLOCK``: a
    non-blocking splice leaves the record queued and the next returns the same bytes (the 5.10 "hang": a relay
    of the first record without end). From 5.14 (d8654f4f9300) it is consumed. A splice without the flag, into
    a blocking pipe, consumes it on every kernel: what ktls does on the older ones."""
    first, second = os.urandom(3000), os.urandom(2000)
    case.hostile.sock.sendall(
        case.hostile.seal(ContentType.APPLICATION_DATA, first) + case.hostile.seal(ContentType.APPLICATION_DATA, second)
    )
    read_fd, write_fd = os.pipe()  # blocking, both ends
    fd = case.stream.fileno()
    try:
        assert _readable(fd)
        nonblocking = os.splice(fd, write_fd, 65536, flags=os.SPLICE_F_NONBLOCK)
        assert nonblocking == len(first)
        assert os.read(read_fd, 65536) == first
        assert _readable(fd)
        again = os.splice(fd, write_fd, 65536, flags=os.SPLICE_F_NONBLOCK)
        peeked = os.read(read_fd, 65536)
        assert peeked in (first, second)
        assert (peeked == first) is ktls.splice.SPLICE_NONBLOCK_PEEKS
        assert ktls.splice.SPLICE_NONBLOCK_PEEKS is (_kernel_version() < (5, 14))
        assert again == len(peeked)
        if peeked == first:  # a blocking splice takes it for good; then the second record comes
            assert os.splice(fd, write_fd, 65536) == len(first)
            assert os.read(read_fd, 65536) == first
            assert os.splice(fd, write_fd, 65536) == len(second)
            assert os.read(read_fd, 65536) == second
    finally:
        os.close(read_fd)
        os.close(write_fd)


@pytest.mark.kernel
def test_nonblocking_splice_to_never_waits_for_the_rest_of_a_record(case: Case) -> None:
    """A non-blocking stream: ``splice_to`` raises ``BlockingIOError`` while nothing, or only the first half of a
    record, has arrived (on Linux < 5.14, where the splice itself cannot be non-blocking, the kernel may wait
    one jiffy, never more), then moves the record whole, byte-exact."""
    payload = os.urandom(10_000)
    record = case.hostile.seal(ContentType.APPLICATION_DATA, payload)
    case.stream.setblocking(False)
    near, far = socket.socketpair()
    with near, far:
        far.settimeout(TIMEOUT)
        with pytest.raises(BlockingIOError):
            case.stream.splice_to(near.fileno(), 65536)
        case.hostile.sock.sendall(record[:5000])
        for _ in range(3):  # whatever the kernel has parsed of it by now
            with pytest.raises(BlockingIOError):
                case.stream.splice_to(near.fileno(), 65536)
        case.hostile.sock.sendall(record[5000:])
        assert _readable(case.stream.fileno())
        assert case.stream.splice_to(near.fileno(), 65536) == len(payload)
        assert far.recv(len(payload), socket.MSG_WAITALL) == payload
        with pytest.raises(BlockingIOError):
            case.stream.splice_to(near.fileno(), 65536)


@pytest.mark.kernel
@pytest.mark.parametrize("kind", ["alert", "ticket", "key_update"])
def test_splice_to_delivers_every_byte_around_a_control_record(case: Case, kind: str, support: KernelSupport) -> None:
    """Many records, a control record in the middle, more records, then close_notify: every byte arrives at
    the far end of a socket pair in order, the connection followed the record, and the end reads as 0."""
    before = os.urandom(200_000)
    after = os.urandom(300_000)
    if kind == "key_update" and not support.rekey:
        pytest.skip("the kernel cannot take a new receive key (Linux < 6.14)")
    wire = bytearray()
    for chunk in range(0, len(before), 16384):  # sealed in wire order: each record takes the next sequence number
        wire += case.hostile.seal(ContentType.APPLICATION_DATA, before[chunk : chunk + 16384])
    wire += _control(case, kind, support)
    for chunk in range(0, len(after), 10000):
        wire += case.hostile.seal(ContentType.APPLICATION_DATA, after[chunk : chunk + 10000])
    wire += case.hostile.seal(ContentType.ALERT, CLOSE_NOTIFY)
    sender = threading.Thread(target=case.hostile.sock.sendall, args=(bytes(wire),), daemon=True)
    sender.start()
    near, far = socket.socketpair()
    received = bytearray()
    with near, far:
        far.settimeout(TIMEOUT)
        while moved := case.stream.splice_to(near.fileno(), 1 << 20):
            received += far.recv(moved, socket.MSG_WAITALL)
        sender.join(TIMEOUT)
    assert bytes(received) == before + after
    assert case.stream.key_updates_received == (1 if kind == "key_update" else 0)
    sink = os.open(os.devnull, os.O_WRONLY)
    try:
        assert case.stream.splice_to(sink, 100) == 0  # closed stays closed
    finally:
        os.close(sink)


@pytest.mark.kernel
def test_splice_to_after_recv_keeps_every_byte_in_order(case: Case) -> None:
    """``recv`` first, then ``splice_to``: a ``recvmsg`` that ends inside a record leaves the rest of it decrypted
    in the kernel (``rx_list``), and the splice must not pass over it (Linux < 5.16 would: there ktls copies
    after a ``recv``); every byte arrives once, in order."""
    chunks = [os.urandom(10_000) for _ in range(5)]
    wire = b"".join(case.hostile.seal(ContentType.APPLICATION_DATA, chunk) for chunk in chunks)
    case.hostile.sock.sendall(wire + case.hostile.seal(ContentType.ALERT, CLOSE_NOTIFY))
    assert _readable(case.stream.fileno())
    received = bytearray(case.stream.recv(100))
    near, far = socket.socketpair()
    with near, far:
        far.settimeout(TIMEOUT)
        while moved := case.stream.splice_to(near.fileno(), 1 << 20):
            received += far.recv(moved, socket.MSG_WAITALL)
    assert bytes(received) == b"".join(chunks)


@pytest.mark.kernel
def test_splice_from_is_encrypted_by_the_kernel(case: Case) -> None:
    """Bytes spliced from a socket pair arrive at the peer as records it decrypts to the same bytes."""
    payload = os.urandom(1_000_000)
    near, far = socket.socketpair()
    with near, far:
        writer = threading.Thread(target=far.sendall, args=(payload,), daemon=True)
        writer.start()
        total = 0
        while total < len(payload):
            moved = case.stream.splice_from(near.fileno(), len(payload) - total)
            assert moved
            total += moved
        writer.join(TIMEOUT)
    case.stream.shutdown(socket.SHUT_WR)
    records = case.hostile.read_records()
    data = b"".join(r.plaintext for r in records if r.content_type == ContentType.APPLICATION_DATA)
    assert data == payload
    assert (records[-1].content_type, records[-1].plaintext) == (ContentType.ALERT, CLOSE_NOTIFY)


class _Paused(asyncio.Protocol):
    def __init__(self) -> None:
        self.eof = False
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        return True


async def _async_relay(ours: socket.socket, keys: ConnectionKeys, payload: bytes) -> bytes:
    transport, protocol = await ktls.asyncio.connect_with_keys(
        _Paused, ours, keys, server_side=False, tx_seq=0, rx_seq=0
    )
    assert isinstance(transport, ktls.asyncio.KTLSTransport)
    assert isinstance(protocol, _Paused)
    near, far = socket.socketpair()
    near.setblocking(False)
    received = bytearray()
    loop = asyncio.get_running_loop()
    with near, far:
        far.settimeout(TIMEOUT)
        while moved := await asyncio.wait_for(transport.splice_to(near.fileno(), 1 << 20), TIMEOUT):
            received += await loop.run_in_executor(None, far.recv, moved, socket.MSG_WAITALL)
        assert protocol.eof

        # And back: what the far end sends is spliced into the connection and encrypted by the kernel.
        def send() -> None:
            far.sendall(payload)
            far.shutdown(socket.SHUT_WR)

        sender = loop.run_in_executor(None, send)
        while await asyncio.wait_for(transport.splice_from(near.fileno(), 1 << 20), TIMEOUT):
            pass
        await sender
    transport.close()
    assert await asyncio.wait_for(protocol.lost, TIMEOUT) is None
    return bytes(received)


@pytest.mark.kernel
def test_transport_splices_both_ways_across_a_key_update(support: KernelSupport) -> None:
    """The asyncio transport: records with a KeyUpdate (where the kernel can follow it) and close_notify in
    the middle arrive byte-exact through ``splice_to``; ``splice_from`` sends what the peer decrypts."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        theirs = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        ours, _ = listener.accept()
    suite = suite_by_openssl_name("TLS_AES_128_GCM_SHA256")
    assert suite is not None
    ours_secret, theirs_secret = os.urandom(32), os.urandom(32)
    keys = ConnectionKeys(suite, tx=ours_secret, rx=theirs_secret)
    hostile = Hostile(theirs, tls13_protection(theirs_secret), tls13_protection(ours_secret), theirs_secret)
    first, second, back = os.urandom(100_000), os.urandom(100_000), os.urandom(500_000)
    wire = b"".join(
        hostile.seal(ContentType.APPLICATION_DATA, first[i : i + 16384]) for i in range(0, len(first), 16384)
    )
    if support.rekey:
        wire += hostile.key_update()
    wire += hostile.seal(ContentType.ALERT, USER_CANCELED)
    wire += b"".join(
        hostile.seal(ContentType.APPLICATION_DATA, second[i : i + 9000]) for i in range(0, len(second), 9000)
    )
    wire += hostile.seal(ContentType.ALERT, CLOSE_NOTIFY)
    sender = threading.Thread(target=theirs.sendall, args=(wire,), daemon=True)
    sender.start()
    records: list[OpenedRecord] = []
    reader = threading.Thread(target=lambda: records.extend(hostile.read_records()), daemon=True)
    reader.start()  # reads while the transport sends: the socket buffers cannot hold it all
    try:
        received = asyncio.run(asyncio.wait_for(_async_relay(ours, keys, back), 6 * TIMEOUT))
        reader.join(TIMEOUT)
        sender.join(TIMEOUT)
    finally:
        theirs.close()
    assert received == first + second
    data = b"".join(r.plaintext for r in records if r.content_type == ContentType.APPLICATION_DATA)
    assert data == back


# -- the userspace fallback, on the host (no kTLS) -------------------------------------------------------------


def _fallback_pair(cert: CertFiles) -> tuple[Stream, ssl.SSLSocket]:
    server_context, client_context = contexts(cert, ssl.TLSVersion.TLSv1_3)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        raw = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        accepted, _ = listener.accept()
    accepted.settimeout(TIMEOUT)
    result: list[ssl.SSLSocket] = []
    thread = threading.Thread(
        target=lambda: result.append(client_context.wrap_socket(raw, server_hostname="localhost")), daemon=True
    )
    thread.start()
    stream = ktls.wrap_socket(accepted, server_context, server_side=True)
    thread.join(TIMEOUT)
    return stream, result[0]


def test_fallback_splices_by_copying(rsa_cert: CertFiles) -> None:
    """Without kTLS (the host) ``splice_to``/``splice_from`` keep their meaning, by a copy through Python."""
    if ktls.kernel.probe().available:
        pytest.skip("the host has kTLS: the fallback path is not taken")
    stream, peer = _fallback_pair(rsa_cert)
    assert stream.fallback_reason
    payload = os.urandom(300_000)
    near, far = socket.socketpair()
    with stream, peer, near, far:
        far.settimeout(TIMEOUT)
        back = os.urandom(200_000)
        far.sendall(back)
        total = 0
        while total < len(back):
            total += stream.splice_from(near.fileno(), len(back) - total)
        echoed = bytearray()
        while len(echoed) < len(back):
            echoed += peer.recv(65536)
        assert bytes(echoed) == back

        def send() -> None:
            peer.sendall(payload)
            peer.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        received = bytearray()
        while moved := stream.splice_to(near.fileno(), 1 << 20):
            received += far.recv(moved, socket.MSG_WAITALL)
        sender.join(TIMEOUT)
        assert bytes(received) == payload


async def _served(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> tuple[asyncio.AbstractServer, asyncio.StreamReader, asyncio.StreamWriter]:
    """A ktls asyncio server running ``handler``, and a ktls client connected to it."""
    server = await ktls.asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await ktls.asyncio.open_connection(
        "127.0.0.1", port, ssl=client_context, server_hostname="localhost"
    )
    return server, reader, writer


def test_the_callers_mistakes_are_not_the_connections_failure(rsa_cert: CertFiles) -> None:
    """A descriptor that refuses the bytes (``EBADF``: a pipe's read end) raises its own error and nothing that
    was read is lost: the bytes are read next. ``splice_from`` once our write side is closed raises
    ``StreamClosed`` before any I/O. Either way the connection goes on: the Stream still reads, the transport is
    not failed. Both front ends, on whatever TLS they run (the host: userspace)."""
    refuses, other_end = os.pipe()
    stream, peer = _fallback_pair(rsa_cert)
    near, far = socket.socketpair()
    with stream, peer, near, far:
        peer.sendall(b"kept")
        with pytest.raises(OSError, match="Bad file descriptor") as refused:
            stream.splice_to(refuses, 100)
        assert refused.value.errno == errno.EBADF
        assert stream.recv(100) == b"kept"
        far.sendall(b"x")
        stream.shutdown(socket.SHUT_WR)
        with pytest.raises(StreamClosed):
            stream.splice_from(near.fileno(), 1)
        peer.sendall(b"still read")
        assert stream.recv(100) == b"still read"

    async def transport_side() -> None:
        server_context, client_context = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3)

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"kept")
            await reader.read()
            writer.write(b"after your close_notify")
            await writer.drain()
            writer.close()

        server, reader, writer = await _served(answer, server_context, client_context)
        transport: Any = writer.transport
        with pytest.raises(OSError, match="Bad file descriptor") as refused:
            await asyncio.wait_for(transport.splice_to(refuses, 100), TIMEOUT)
        assert refused.value.errno == errno.EBADF
        assert not transport.is_closing()
        transport.resume_reading()
        assert await asyncio.wait_for(reader.readexactly(4), TIMEOUT) == b"kept"
        writer.write_eof()
        with pytest.raises(StreamClosed):
            await transport.splice_from(near.fileno(), 1)
        assert not transport.is_closing()
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b"after your close_notify"
        writer.close()
        server.close()
        await server.wait_closed()

    near, far = socket.socketpair()
    with near, far:
        far.sendall(b"x")
        asyncio.run(transport_side())
    os.close(refuses)
    os.close(other_end)


def test_a_splice_waiting_when_the_transport_is_lost_ends(rsa_cert: CertFiles) -> None:
    """``abort()`` while a ``splice_to`` waits for the peer and a ``splice_from`` for its descriptor: both end at
    once (``splice_to`` with 0, as after a close; ``splice_from`` with ``ConnectionError``) instead of waiting on
    a descriptor that is gone — their waits watch a duplicate of the socket, which keeps it open, so without a
    wake-up they would wait for the peer that will now never send. The host: userspace TLS."""

    async def main() -> None:
        server_context, client_context = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3)
        peer_done = asyncio.Event()

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # sends nothing; ends when we do
            peer_done.set()
            writer.close()

        server, _, writer = await _served(silent, server_context, client_context)
        transport: Any = writer.transport
        near, far = socket.socketpair()
        with near, far:
            near.setblocking(False)
            sink, source = os.pipe()
            try:
                into = asyncio.ensure_future(transport.splice_to(source, 100))
                out_of = asyncio.ensure_future(transport.splice_from(near.fileno(), 100))
                await asyncio.sleep(0.2)
                assert not into.done()  # waiting for the peer
                assert not out_of.done()  # waiting for near
                transport.abort()
                assert await asyncio.wait_for(into, TIMEOUT) == 0
                with pytest.raises(ConnectionError):
                    await asyncio.wait_for(out_of, TIMEOUT)
                await asyncio.wait_for(peer_done.wait(), TIMEOUT)  # our socket really closed
            finally:
                os.close(sink)
                os.close(source)
        server.close()
        await server.wait_closed()

    asyncio.run(main())

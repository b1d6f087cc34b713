"""Hostile peers against ktls.asyncio transports: each bad record gives the typed error, the right alert on the
wire, a closed transport and no leaked descriptor — never a hang.

The peer does a real TLS 1.3 handshake (the record-exact driver, its own key log), then builds its records with
the independent record layer (``reference_tls``), so it can tamper, truncate, lie about types and flood.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

import pytest

import ktls.asyncio
from aio_support import run
from certs import CertFiles
from ktls.constants import AlertDescription, ContentType, TLSVersion
from ktls.core.keys import ConnectionKeys
from ktls.errors import (
    AlertReceived,
    PeerMisbehaved,
    RecordAuthenticationError,
    RecordHeaderError,
    RecordOverflowError,
    RekeyUnsupported,
)
from ktls.kernel import CryptoInfo, Direction, KernelSupport
from reference_tls import TLS13, RecordProtection
from support import contexts, handshake_keys

pytestmark = pytest.mark.kernel


def reference(info: CryptoInfo) -> RecordProtection:
    """The independent record layer's state for one direction (as ``test_handoff.reference_for``)."""
    if info.version is TLSVersion.TLS1_3 or not info.salt:
        version = TLS13 if info.version is TLSVersion.TLS1_3 else 0x0303
        return RecordProtection(info.cipher_type, version, info.key, info.salt + info.iv, info.rec_seq)
    return RecordProtection(info.cipher_type, 0x0303, info.key, info.salt, info.rec_seq, int.from_bytes(info.iv, "big"))


@dataclass
class RawPeer:
    """One end of a TLS 1.3 connection whose records after the handshake we write by hand."""

    sock: socket.socket
    keys: ConnectionKeys
    tx: RecordProtection
    rx: RecordProtection

    @classmethod
    def handshake(cls, sock: socket.socket, context: ssl.SSLContext, *, server_side: bool) -> RawPeer:
        result, keys = handshake_keys(sock, context, server_side=server_side)
        tx = reference(keys.crypto_info(Direction.TX, result.tx_seq, result.tx_explicit_nonce))
        rx = reference(keys.crypto_info(Direction.RX, result.rx_seq))
        return cls(sock, keys, tx, rx)

    def seal(self, content_type: int, payload: bytes) -> bytes:
        return self.tx.seal(content_type, payload)

    def next_tx_key(self) -> None:
        self.tx = reference(self.keys.next_key(Direction.TX))

    def read_records_until_eof(self) -> list[tuple[int, bytes]]:
        """Every record until the other side's FIN, opened: (content type, plaintext)."""
        data = b""
        self.sock.settimeout(20)
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
        records = []
        while len(data) >= 5:
            length = int.from_bytes(data[3:5], "big")
            record, data = data[: 5 + length], data[5 + length :]
            opened = self.rx.open(record)
            records.append((opened.content_type, opened.plaintext))
        return records


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.got_data = threading.Event()
        self.transport: ktls.asyncio.KTLSTransport | None = None
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, ktls.asyncio.KTLSTransport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.got_data.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


def fatal(description: AlertDescription) -> tuple[int, bytes]:
    return (ContentType.ALERT, bytes((2, description)))


def record_header(content_type: int, version: int, length: int) -> bytes:
    return struct.pack("!BHH", content_type, version, length)


KEY_UPDATE = bytes((24, 0, 0, 1, 0))
Attack = Callable[[RawPeer], bytes]


def tampered(peer: RawPeer) -> bytes:
    record = peer.seal(ContentType.APPLICATION_DATA, b"x" * 100)
    return record[:-3] + bytes([record[-3] ^ 1]) + record[-2:]


def truncated_ciphertext(peer: RawPeer) -> bytes:
    record = peer.seal(ContentType.APPLICATION_DATA, b"y" * 100)
    return record_header(23, 0x0303, len(record) - 5 - 4) + record[5:-4]


def oversized(peer: RawPeer) -> bytes:
    return record_header(23, 0x0303, 2**14 + 256 + 1) + os.urandom(2**14 + 256 + 1)


def bad_record_version(peer: RawPeer) -> bytes:
    record = peer.seal(ContentType.APPLICATION_DATA, b"z")
    return record_header(23, 0x0301, len(record) - 5) + record[5:]


#: name → (what the peer sends after a good record, the error our transport must report, alert it must send)
ATTACKS: dict[str, tuple[Attack, type[Exception], AlertDescription | None]] = {
    "tampered": (tampered, RecordAuthenticationError, AlertDescription.bad_record_mac),
    "truncated-ciphertext": (truncated_ciphertext, RecordAuthenticationError, AlertDescription.bad_record_mac),
    "oversized": (oversized, RecordOverflowError, AlertDescription.record_overflow),
    "bad-record-version": (bad_record_version, RecordHeaderError, AlertDescription.decode_error),
    "change-cipher-spec": (
        lambda p: p.seal(ContentType.CHANGE_CIPHER_SPEC, b"\x01"),
        PeerMisbehaved,
        AlertDescription.unexpected_message,
    ),
    "unknown-type": (lambda p: p.seal(99, b"??"), PeerMisbehaved, AlertDescription.unexpected_message),
    "alert-of-3-bytes": (
        lambda p: p.seal(ContentType.ALERT, b"\x02\x28\x00"),
        PeerMisbehaved,
        AlertDescription.decode_error,
    ),
    "ticket-to-a-server": (
        lambda p: p.seal(ContentType.HANDSHAKE, bytes((4, 0, 0, 9)) + b"\x00\x00\x0e\x10\x01\x02\x03\x04\x00"),
        PeerMisbehaved,
        AlertDescription.unexpected_message,
    ),
    "key-update-with-trailing-message": (
        lambda p: p.seal(ContentType.HANDSHAKE, KEY_UPDATE + KEY_UPDATE),
        PeerMisbehaved,
        AlertDescription.unexpected_message,
    ),
    "peer-fatal-alert": (lambda p: p.seal(ContentType.ALERT, b"\x02\x28"), AlertReceived, None),
}


def open_sockets() -> int:
    """Sockets this process holds (other descriptors come and go: key-log memory files of new contexts)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return count


def attack_server(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, send: Attack
) -> tuple[Recorder, list[tuple[int, bytes]]]:
    """Our asyncio server; the raw peer connects, sends one good record, then ``send(peer)``; what each saw."""

    async def main() -> tuple[Recorder, list[tuple[int, bytes]]]:
        loop = asyncio.get_running_loop()
        protocols: list[Recorder] = []

        def factory() -> Recorder:
            protocols.append(Recorder())
            return protocols[-1]

        server = await ktls.asyncio.create_server(factory, "127.0.0.1", 0, ssl=server_ctx, require_kernel=True)
        port = server.sockets[0].getsockname()[1]

        def peer() -> list[tuple[int, bytes]]:
            with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
                raw = RawPeer.handshake(sock, client_ctx, server_side=False)
                sock.sendall(raw.seal(ContentType.APPLICATION_DATA, b"hello"))
                sock.sendall(send(raw))
                return raw.read_records_until_eof()

        records = await loop.run_in_executor(None, peer)
        await asyncio.wait_for(protocols[0].lost, 10)
        await asyncio.sleep(0)
        server.close()
        await server.wait_closed()
        return protocols[0], records

    return run(main(), timeout=60)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_hostile_record_to_our_server(support: KernelSupport, rsa_cert: CertFiles, name: str) -> None:
    send, error_type, alert = ATTACKS[name]
    server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3)
    before = open_sockets()
    protocol, records = attack_server(server_ctx, client_ctx, send)
    error = protocol.lost.result()
    assert isinstance(error, error_type), repr(error)
    assert bytes(protocol.data) == b"hello"
    tickets = [r for r in records if r[0] == ContentType.HANDSHAKE]
    assert len(tickets) == 2  # the server's tickets, then only the alert
    assert records[len(tickets) :] == ([fatal(alert)] if alert is not None else [])
    if alert is not None:
        assert getattr(error, "alert", None) == alert
    assert protocol.transport is not None
    assert protocol.transport.is_closing()
    assert protocol.transport._sock.fileno() == -1, "the descriptor must be closed"
    assert open_sockets() <= before, "descriptor leaked"


def test_key_update_flood(support: KernelSupport, rsa_cert: CertFiles) -> None:
    """KeyUpdates with no data between them: accepted up to the limit, then unexpected_message. Kernels
    before 6.14 stop at the first with RekeyUnsupported and internal_error."""

    def flood(peer: RawPeer) -> bytes:
        out = b""
        for _ in range(40):
            out += peer.seal(ContentType.HANDSHAKE, KEY_UPDATE)
            peer.next_tx_key()
        return out

    server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3)
    protocol, records = attack_server(server_ctx, client_ctx, flood)
    error = protocol.lost.result()
    if support.rekey:
        assert isinstance(error, PeerMisbehaved), repr(error)
        assert records[-1] == fatal(AlertDescription.unexpected_message)
    else:
        assert isinstance(error, RekeyUnsupported), repr(error)
        assert records[-1] == fatal(AlertDescription.internal_error)


def test_peer_key_update_mid_stream(support: KernelSupport, rsa_cert: CertFiles) -> None:
    """A KeyUpdate between data records (not requested): the data after it arrives (≥ 6.14)."""
    if not support.rekey:
        pytest.skip("needs TLS 1.3 rekey (Linux 6.14); older kernels: test_key_update_flood")

    def update_then_data(peer: RawPeer) -> bytes:
        out = peer.seal(ContentType.HANDSHAKE, KEY_UPDATE)
        peer.next_tx_key()
        out += peer.seal(ContentType.APPLICATION_DATA, b" world")
        return out + peer.seal(ContentType.ALERT, b"\x01\x00")  # close_notify

    server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3)
    protocol, records = attack_server(server_ctx, client_ctx, update_then_data)
    assert protocol.lost.result() is None
    assert bytes(protocol.data) == b"hello world"
    assert protocol.transport is not None
    assert protocol.transport.key_updates_received == 1
    assert records[-1] == (ContentType.ALERT, b"\x01\x00"), "our close_notify in answer"


class SmallBuffers(asyncio.BufferedProtocol):
    """Reads through a 7-byte buffer: control records come from the kernel in typed pieces."""

    def __init__(self) -> None:
        self.buffer = bytearray(7)
        self.data = bytearray()
        self.eof = asyncio.get_running_loop().create_future()
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data += self.buffer[:nbytes]

    def eof_received(self) -> bool:
        self.eof.set_result(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


def test_buffered_protocol_client_and_a_large_ticket_after_the_hand_off(
    support: KernelSupport, rsa_cert: CertFiles
) -> None:
    """Our client with a BufferedProtocol of 7 bytes: the first record arrives through OpenSSL (deferred
    receive), then the kernel; a 6 KiB NewSessionTicket after that comes in pieces up to MSG_EOR and is
    reassembled; the data around it arrives whole."""
    server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3)
    ticket_body = b"\x00\x00\x0e\x10" + b"\x01\x02\x03\x04" + b"\x00" + (6000).to_bytes(2, "big") + os.urandom(6000)
    ticket_body += b"\x00\x00"
    ticket = bytes((4,)) + len(ticket_body).to_bytes(3, "big") + ticket_body

    async def main() -> tuple[SmallBuffers, list[tuple[int, bytes]]]:
        loop = asyncio.get_running_loop()
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]

        def peer() -> list[tuple[int, bytes]]:
            sock, _ = listener.accept()
            with sock, listener:
                sock.settimeout(20)
                raw = RawPeer.handshake(sock, server_ctx, server_side=True)
                out = raw.seal(ContentType.APPLICATION_DATA, b"first record, read by OpenSSL;")
                out += raw.seal(ContentType.HANDSHAKE, ticket)
                out += raw.seal(ContentType.APPLICATION_DATA, b" then the kernel")
                out += raw.seal(ContentType.ALERT, b"\x01\x00")
                sock.sendall(out)
                return raw.read_records_until_eof()

        future = loop.run_in_executor(None, peer)
        transport, protocol = await ktls.asyncio.create_connection(
            SmallBuffers, "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost", require_kernel=True
        )
        assert isinstance(protocol, SmallBuffers)
        await asyncio.wait_for(protocol.eof, 20)
        assert transport.get_extra_info("ktls_rx")
        records = await future
        await asyncio.wait_for(protocol.lost, 10)
        return protocol, records

    protocol, records = run(main(), timeout=60)
    assert bytes(protocol.data) == b"first record, read by OpenSSL; then the kernel"
    assert protocol.lost.result() is None
    assert records == [(ContentType.ALERT, b"\x01\x00")], "our close_notify, nothing else"


@pytest.mark.parametrize("ending", ["fin", "rst"])
def test_half_a_record_then_the_connection_ends(support: KernelSupport, rsa_cert: CertFiles, ending: str) -> None:
    """Half a record, then FIN (the kernel reports a plain EOF: a ragged one, no close_notify) or RST
    (ConnectionResetError): connection_lost either way, no hang, the descriptor closed."""
    server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3)

    async def main() -> Recorder:
        loop = asyncio.get_running_loop()
        protocols: list[Recorder] = []

        got_data = threading.Event()

        def factory() -> Recorder:
            protocols.append(Recorder())
            protocols[-1].got_data = got_data
            return protocols[-1]

        server = await ktls.asyncio.create_server(factory, "127.0.0.1", 0, ssl=server_ctx, require_kernel=True)
        port = server.sockets[0].getsockname()[1]

        def peer() -> None:
            sock = socket.create_connection(("127.0.0.1", port), timeout=20)
            raw = RawPeer.handshake(sock, client_ctx, server_side=False)
            sock.sendall(raw.seal(ContentType.APPLICATION_DATA, b"hello"))
            record = raw.seal(ContentType.APPLICATION_DATA, b"q" * 1000)
            assert got_data.wait(10), "the server did not read the first record"
            sock.sendall(record[:500])
            if ending == "rst":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                sock.shutdown(socket.SHUT_WR)
                raw.read_records_until_eof()
            sock.close()

        await loop.run_in_executor(None, peer)
        await asyncio.wait_for(protocols[0].lost, 10)
        await asyncio.sleep(0)
        server.close()
        await server.wait_closed()
        return protocols[0]

    before = open_sockets()
    protocol = run(main(), timeout=60)
    error = protocol.lost.result()
    assert protocol.transport is not None
    if ending == "fin":
        assert error is None
        assert protocol.transport.ragged_eof
    else:
        assert isinstance(error, ConnectionResetError), repr(error)
    assert protocol.transport._sock.fileno() == -1
    assert open_sockets() <= before

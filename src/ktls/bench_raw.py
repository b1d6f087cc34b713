"""Raw kTLS for ``ktls bench``: the kernel's own limit, which ktls's rows are measured against (``×raw``).

A raw pair is two connected sockets keyed straight with :mod:`ktls.kernel` — ``setsockopt(TCP_ULP, "tls")``
and ``setsockopt(SOL_TLS, TLS_TX/TLS_RX)`` — after an ``ssl`` handshake, and then driven by bare syscalls: no
``Stream``, no asyncio transport, no connection state machine, no proof, no key-log capture. What ktls adds
on top of this floor is ktls's own cost.

The handshake runs over memory BIOs one whole record at a time, so that OpenSSL never reads past its last
handshake record (the kernel must start at a record boundary). Secrets come from a plain key-log file of the
server's context (``keylog_filename``), matched by the ClientHello's random. TLS 1.3 only (the bench's
contexts negotiate it): the server's NewSessionTickets are the only records with the application keys before
the kernel takes over, so the server's send sequence number is their count, and the client's kernel, keyed at
sequence 0, reads them as handshake records (``recvmsg`` + cmsg) before any data — outside every timed span.

:func:`key_pair` returns the seconds spent reading the key log and deriving keys, so the handshake floor
(``ssl`` handshake + the three ``setsockopt`` calls per end, keys already derived) can leave them out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .constants import RECORD_HEADER_SIZE, ContentType
from .kernel import CryptoInfo, Direction, recv_record, set_crypto_info, setup_ulp
from .tls.keylog import KeylogLabel, iter_keylog
from .tls.keyschedule import tls13_crypto_info
from .tls.suites import suite_by_openssl_name

__all__ = ["RawKeying", "receive_bare", "send_bare", "sendfile_bare"]

_HELLO_RANDOM = slice(RECORD_HEADER_SIZE + 4 + 2, RECORD_HEADER_SIZE + 4 + 2 + 32)  # record, message header, version


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the peer closed the connection during the handshake")
        data += chunk
    return bytes(data)


def _read_record(sock: socket.socket) -> bytes:
    header = _recv_exactly(sock, RECORD_HEADER_SIZE)
    return header + _recv_exactly(sock, int.from_bytes(header[3:5], "big"))


def _count_records(data: bytes) -> int:
    count, offset = 0, 0
    while offset < len(data):
        offset += RECORD_HEADER_SIZE + int.from_bytes(data[offset + 3 : offset + 5], "big")
        count += 1
    return count


def _handshake(sock: socket.socket, sslobj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> bytes:
    """Run the handshake one record at a time; returns the first record read (a server's ClientHello)."""
    first = b""
    while True:
        try:
            sslobj.do_handshake()
            break
        except ssl.SSLWantReadError:
            if outgoing.pending:
                sock.sendall(outgoing.read())
            record = _read_record(sock)
            first = first or record
            incoming.write(record)
    return first


@dataclasses.dataclass
class _ServerEnd:
    """What the server's handshake thread leaves: the ClientHello record, its tickets' count, or its error."""

    hello: bytes = b""
    tickets: int = 0
    error: BaseException | None = None


class RawKeying:
    """Handshakes with ``ssl`` and keys both ends of loopback pairs with ``ktls.kernel`` alone.

    ``server_context`` gets ``keylog`` as its key-log file (set here: give it a context of its own, not one
    another stack captures).
    """

    def __init__(self, server_context: ssl.SSLContext, client_context: ssl.SSLContext, keylog: Path) -> None:
        self._server_context = server_context
        self._client_context = client_context
        self._keylog = keylog
        self._keylog.touch()
        server_context.keylog_filename = str(self._keylog)
        self._read = 0
        self._lock = threading.Lock()

    def key_pair(self, client: socket.socket, server: socket.socket) -> float:
        """Handshake over the connected pair and hand both ends to the kernel; returns the seconds spent
        reading the key log, deriving keys and reading the tickets (not part of any floor)."""
        server_end = _ServerEnd()

        def serve() -> None:
            try:
                incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
                sslobj = self._server_context.wrap_bio(incoming, outgoing, server_side=True)
                hello = _handshake(server, sslobj, incoming, outgoing)
                tickets = outgoing.read()  # written in the step that completed the handshake: application keys
                server.sendall(tickets)
                server_end.hello, server_end.tickets = hello, _count_records(tickets)
            except BaseException as exc:  # re-raised in the caller's thread
                server_end.error = exc

        thread = threading.Thread(target=serve)
        thread.start()
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        sslobj = self._client_context.wrap_bio(incoming, outgoing, server_side=False)
        _handshake(client, sslobj, incoming, outgoing)
        client.sendall(outgoing.read())  # the client's Finished
        thread.join()
        if server_end.error is not None:
            raise RuntimeError("raw kTLS server handshake failed") from server_end.error
        untimed = time.perf_counter()
        if sslobj.version() != "TLSv1.3":
            raise RuntimeError(f"raw kTLS rows need TLS 1.3, not {sslobj.version()}")
        cipher = sslobj.cipher()
        assert cipher is not None
        tickets = server_end.tickets
        client_info, server_info = self._crypto_infos(server_end.hello[_HELLO_RANDOM], cipher[0], tickets)
        untimed = time.perf_counter() - untimed
        # The client's kernel reads the tickets (server records 0 … tickets-1) itself, below.
        client_tx, client_rx = client_info, server_info[0]
        server_tx, server_rx = server_info[1], client_info
        for sock, tx, rx in ((client, client_tx, client_rx), (server, server_tx, server_rx)):
            setup_ulp(sock)
            set_crypto_info(sock, Direction.TX, tx)
            set_crypto_info(sock, Direction.RX, rx)
        start = time.perf_counter()
        for _ in range(tickets):
            record = recv_record(client, 65536)
            if record.content_type != ContentType.HANDSHAKE:
                raise RuntimeError(f"expected a NewSessionTicket record, got type {record.content_type}")
        return untimed + time.perf_counter() - start

    def _crypto_infos(
        self, client_random: bytes, cipher: str, server_records: int
    ) -> tuple[CryptoInfo, tuple[CryptoInfo, CryptoInfo]]:
        """The client's crypto info (at sequence 0), and the server's at 0 and at ``server_records``."""
        suite = suite_by_openssl_name(cipher)
        if suite is None:
            raise RuntimeError(f"no kernel cipher for {cipher}")
        with self._lock:
            with self._keylog.open("rb") as log:
                log.seek(self._read)
                data = log.read()
            self._read += len(data)
        secrets = {e.label: bytes(e.secret) for e in iter_keylog(data) if e.client_random == client_random}
        client_secret = secrets[KeylogLabel.CLIENT_TRAFFIC_SECRET_0]
        server_secret = secrets[KeylogLabel.SERVER_TRAFFIC_SECRET_0]
        server = (tls13_crypto_info(suite, server_secret), tls13_crypto_info(suite, server_secret, server_records))
        return tls13_crypto_info(suite, client_secret), server


# -- bare event-loop drivers: add_reader / add_writer and one syscall per step -----------------------------------


async def send_bare(sock: socket.socket, payload: bytes, size: int) -> None:
    """Send ``size`` bytes (``payload`` repeated): ``send`` until ``EAGAIN``, at once and then from an
    ``add_writer`` callback."""
    view, chunk, sent = memoryview(payload), len(payload), 0

    def step() -> bool:
        nonlocal sent
        while sent < size:
            offset = sent % chunk
            sent += sock.send(view[offset : min(chunk, offset + size - sent)])
        return True

    await _until_sent(sock, step)


async def sendfile_bare(sock: socket.socket, file: int, size: int) -> None:
    """``os.sendfile`` ``size`` bytes of ``file`` until ``EAGAIN``, at once and then from an ``add_writer``
    callback."""
    sent = 0
    fd = sock.fileno()

    def step() -> bool:
        nonlocal sent
        while sent < size:
            sent += os.sendfile(fd, file, sent, size - sent)
        return True

    await _until_sent(sock, step)


async def _until_sent(sock: socket.socket, step: Callable[[], bool]) -> None:
    """Run ``step`` (which raises ``BlockingIOError`` when the socket is full) now, then on every writable
    event until it returns."""
    try:
        step()
        return
    except BlockingIOError:
        pass
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def writable() -> None:
        try:
            step()
        except BlockingIOError:
            return
        except OSError as exc:
            loop.remove_writer(fd)
            done.set_exception(exc)
            return
        loop.remove_writer(fd)
        done.set_result(None)

    loop.add_writer(fd, writable)
    await done


async def receive_bare(socks: list[socket.socket], total: int, buffer: bytearray) -> None:
    """Count ``total`` bytes arriving on ``socks`` into one reused ``buffer``: ``recv_into`` until ``EAGAIN``
    from each ``add_reader`` callback."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    received = 0

    def reader(sock: socket.socket) -> None:
        nonlocal received
        error: OSError | None = None
        try:
            while received < total:
                n = sock.recv_into(buffer)
                if not n:
                    error = ConnectionError(f"the connection ended after {received} of {total} bytes")
                    break
                received += n
        except BlockingIOError:
            return
        except OSError as exc:
            error = exc
        if error is not None:
            loop.remove_reader(sock.fileno())
            if not done.done():
                done.set_exception(error)
            return
        if received >= total and not done.done():
            done.set_result(None)

    for sock in socks:
        loop.add_reader(sock.fileno(), reader, sock)
    try:
        await done
    finally:
        for sock in socks:
            loop.remove_reader(sock.fileno())

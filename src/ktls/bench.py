"""``ktls bench``: the same workloads over plain TCP, stdlib ``ssl``, asyncio's SSL, ktls and raw kTLS — ratios
from one run.

Every workload runs both ends in this process over loopback (127.0.0.1), so the CPU time (user + system, all
threads, from ``getrusage``) is the whole cost of moving the bytes, the kernel's crypto included. Absolute
numbers depend on the machine (under software emulation AES is very slow); the ratios between rows measured
side by side in one run are what to read. The ``raw kTLS`` rows (:mod:`ktls.bench_raw`) are the kernel's own
limit: sockets keyed with :mod:`ktls.kernel` alone and driven by bare syscalls, so ``×raw`` on a ktls row is
what ktls's own code costs on top of the kernel. Rows (workload: variants):

* ``bulk``: one-way transfer of ``--size`` MiB in 64 KiB writes; the reader discards.

  - ``plain TCP``, ``ssl`` (``ssl.SSLSocket``), ``ktls`` (``ktls.Stream``), ``raw kTLS`` (``send`` /
    ``recv_into``): a sending thread and a ``recv_into`` thread; with kTLS also ``ktls RX_EXPECT_NO_PAD``
    (``wrap_socket(..., rx_expect_no_pad=True)``).
  - ``asyncio SSL`` (``asyncio.open_connection``/``loop.create_server`` with ``ssl=``), ``ktls asyncio``
    (``ktls.asyncio.open_connection``/``create_server``, the same code) and ``raw kTLS asyncio`` (a bare
    ``add_writer`` loop of ``send`` to a bare ``add_reader`` loop of ``recv_into``): the receiver runs its own
    event loop in another thread, so encryption and decryption run in parallel as in the sync rows. The
    client does ``writer.write`` + ``await writer.drain()``, the server is a ``BufferedProtocol`` that counts
    into one reused buffer.

* ``file``: the same bytes from a file.

  - ``plain TCP``, ``ssl``, ``ktls``, ``raw kTLS``: ``socket.sendfile`` — ``os.sendfile`` for plain TCP, ktls
    and raw, ``SSLSocket.sendfile`` falls back to read + send.
  - ``asyncio SSL loop.sendfile``, ``ktls loop.sendfile`` and ``raw kTLS add_writer sendfile``:
    ``await loop.sendfile(writer.transport, file)`` to the same counting protocol; asyncio's SSL transport gets
    the loop's read + write fallback, the ktls transport the loop's native ``os.sendfile`` path
    (``fallback=False`` where the kernel sends, so a silent fallback cannot pass for zero-copy); raw:
    ``os.sendfile`` from an ``add_writer`` callback.

* ``limit``: ``kTLS sendfile, raw receiver``, the kernel-crypto ceiling of encryption alone — kTLS TX of the
  file with ``sendfile`` to a receiver that discards the raw records without decrypting them. Only with kTLS.
* ``rr``: ``plain TCP``, ``ssl``, ``ktls``, ``raw kTLS``: 1 KiB request / 1 KiB response round trips per
  second on one connection.
* ``handshake``: ``ssl``, ``ktls``, ``raw kTLS``: connections per second: the ``ssl`` handshake alone,
  handshake + ktls's hand-off, and the floor — the ``ssl`` handshake plus the three ``setsockopt`` calls per end
  with keys already derived (both ends in this process, so each connection costs both sides; closing is not
  counted).
* ``idle``: ``plain TCP``, ``ssl``, ``ktls``: memory per idle connection (RSS growth / connections), both ends
  in this process.
* with ``--scale`` (long under emulation): ``scale N`` for N = 1, 10, 100 concurrent bulk connections moving
  ``--size`` MiB between them, ``ssl``/``ktls``/``raw kTLS`` (a thread per end of each connection) and
  ``asyncio SSL``/``ktls asyncio``/``raw kTLS asyncio`` (one loop per side); and ``rr p50``/``rr p99``: the
  latency of 1 KiB round trips sent at a fixed ``--rate`` (from the time each was due, so a stall delays
  the ones behind it too), ``ssl``/``ktls``/``raw kTLS``.

Without kTLS the ktls variants run over their userspace fallback and say so in their label
(``ktls asyncio (fallback: no kTLS)``) and there are no raw rows; with it they insist on the kernel
(``require_kernel=True``), so a row labelled ktls is kernel TLS. :func:`targets` relates the rows to the goals
of the benchmark issues; a goal whose rows are missing or fallback is ``n/a``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import resource
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TextIO

from .asyncio import create_server as ktls_create_server
from .asyncio import open_connection as ktls_open_connection
from .bench_raw import RawKeying, receive_bare, send_bare, sendfile_bare
from .kernel.probe import probe
from .serve.certificate import load_default_certificate
from .stream import Stream, wrap_socket

__all__ = ["BenchResult", "Target", "format_table", "format_targets", "main", "ratios", "run", "targets"]

CHUNK = 64 * 1024
MIB = 1024 * 1024

# Variant labels, shared by the rows, the ratio columns and the targets.
PLAIN = "plain TCP"
SSL = "ssl"
KTLS = "ktls"
KTLS_NO_PAD = "ktls RX_EXPECT_NO_PAD"
RAW = "raw kTLS"
ASYNCIO_SSL = "asyncio SSL"
KTLS_ASYNCIO = "ktls asyncio"
RAW_ASYNCIO = "raw kTLS asyncio"
ASYNCIO_SSL_SENDFILE = "asyncio SSL loop.sendfile"
KTLS_SENDFILE = "ktls loop.sendfile"
RAW_SENDFILE = "raw kTLS add_writer sendfile"
LIMIT = "kTLS sendfile, raw receiver"
FALLBACK = " (fallback: no kTLS)"

#: The raw kTLS row each ktls row is measured against (``×raw``), in the same workload.
RAW_BASE = {KTLS: RAW, KTLS_NO_PAD: RAW, KTLS_ASYNCIO: RAW_ASYNCIO, KTLS_SENDFILE: RAW_SENDFILE}

#: Concurrent connections of the scale rows.
SCALE_CONNECTIONS = (1, 10, 100)

#: A transfer that takes longer than this is stuck, not slow (64 MiB at TCG's worst is well under it).
_ASYNC_TIMEOUT = 900.0


@dataclasses.dataclass
class BenchResult:
    workload: str
    variant: str
    #: MiB/s for transfers, operations/s for rr and handshake, KiB per connection for idle, ms for latency.
    value: float
    unit: str
    cpu_per_gib: float | None = None
    note: str = ""


def _contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    certificate = load_default_certificate()
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certificate.cert_path, certificate.key_path)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    return server, client


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Pair:
    """A connected loopback pair, the server end accepted from a fresh listener."""

    def __init__(self) -> None:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            self.client = socket.create_connection(listener.getsockname())
            self.server, _ = listener.accept()
        for sock in (self.client, self.server):
            sock.settimeout(120)


Wrap = Callable[[socket.socket, bool], Any]
#: Makes one connected, ready (client, server) pair of some stack.
Connect = Callable[[], tuple[Any, Any]]


def _plain(sock: socket.socket, server_side: bool) -> socket.socket:
    return sock


def _stdlib(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> Wrap:
    def wrap(sock: socket.socket, server_side: bool) -> ssl.SSLSocket:
        context = server_ctx if server_side else client_ctx
        return context.wrap_socket(sock, server_side=server_side)

    return wrap


def _ktls(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, require_kernel: bool, *, rx_expect_no_pad: bool = False
) -> Wrap:
    def wrap(sock: socket.socket, server_side: bool) -> Stream:
        context = server_ctx if server_side else client_ctx
        return wrap_socket(
            sock, context, server_side=server_side, require_kernel=require_kernel, rx_expect_no_pad=rx_expect_no_pad
        )

    return wrap


def _wrap_pair(wrap: Wrap) -> tuple[Any, Any]:
    pair = _Pair()
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.setdefault("server", wrap(pair.server, True)))
    thread.start()
    client = wrap(pair.client, False)
    thread.join()
    return client, result["server"]


def _wrapped(wrap: Wrap) -> Connect:
    return lambda: _wrap_pair(wrap)


_KERNEL_TIMEOUT = struct.pack("ll", 120, 0)  # struct timeval


def _raw(keying: RawKeying) -> Connect:
    """Raw kTLS pairs: blocking sockets with the kernel's own timeouts (a Python timeout would ``poll`` before
    every call: not the thinnest loop)."""

    def connect() -> tuple[socket.socket, socket.socket]:
        pair = _Pair()
        keying.key_pair(pair.client, pair.server)
        for sock in (pair.client, pair.server):
            sock.settimeout(None)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _KERNEL_TIMEOUT)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _KERNEL_TIMEOUT)
        return pair.client, pair.server

    return connect


def _close_pair(client: Any, server: Any) -> None:
    client.close()
    server.close()


def _drain(conn: Any, total: int) -> None:
    buffer = bytearray(CHUNK * 4)
    got = 0
    while got < total:
        n = conn.recv_into(buffer)
        if not n:
            break
        got += n


def _send(conn: Any, payload: memoryview, size: int) -> None:
    for sent in range(0, size, CHUNK):
        conn.sendall(payload[: min(CHUNK, size - sent)])


def _transfer(connect: Connect, size: int, *, file: Path | None = None) -> tuple[float, float]:
    """Seconds and CPU seconds to move ``size`` bytes client → server."""
    client, server = connect()
    reader = threading.Thread(target=_drain, args=(server, size))
    payload = memoryview(os.urandom(CHUNK))
    cpu, start = _cpu(), time.perf_counter()
    reader.start()
    if file is not None:
        with file.open("rb") as handle:
            client.sendfile(handle, 0, size)
    else:
        _send(client, payload, size)
    reader.join()
    elapsed, cpu_used = time.perf_counter() - start, _cpu() - cpu
    _close_pair(client, server)
    return elapsed, cpu_used


def _parallel_transfer(connect: Connect, connections: int, size: int) -> tuple[float, float]:
    """Seconds and CPU seconds to move ``size`` bytes in all (a multiple of ``connections``) over
    ``connections`` pairs at once, a sending and a receiving thread per pair (set-up untimed)."""
    pairs = [connect() for _ in range(connections)]
    each = size // connections
    payload = memoryview(os.urandom(CHUNK))
    threads = [threading.Thread(target=_drain, args=(server, each)) for _, server in pairs]
    threads += [threading.Thread(target=_send, args=(client, payload, each)) for client, _ in pairs]
    cpu, start = _cpu(), time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed, cpu_used = time.perf_counter() - start, _cpu() - cpu
    for client, server in pairs:
        _close_pair(client, server)
    return elapsed, cpu_used


def _limit(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, size: int, file: Path) -> tuple[float, float]:
    """kTLS sendfile to a receiver that discards the raw records (no decryption): the crypto ceiling."""
    pair = _Pair()
    done: dict[str, Any] = {}

    def serve() -> None:
        done["stream"] = wrap_socket(pair.server, server_ctx, server_side=True, require_kernel=True)

    thread = threading.Thread(target=serve)
    thread.start()
    # A plain ssl client does the handshake; then its raw socket reads ciphertext without decrypting.
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(incoming, outgoing, server_side=False)
    _handshake_over(pair.client, client, incoming, outgoing)
    thread.join()
    stream: Stream = done["stream"]
    reader = threading.Thread(target=_drain, args=(pair.client, size))
    cpu, start = _cpu(), time.perf_counter()
    reader.start()
    with file.open("rb") as handle:
        stream.sendfile(handle, 0, size)
    reader.join()
    elapsed, cpu_used = time.perf_counter() - start, _cpu() - cpu
    _close_pair(stream, pair.client)
    return elapsed, cpu_used


def _handshake_over(
    sock: socket.socket, sslobj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO
) -> None:
    while True:
        try:
            sslobj.do_handshake()
            break
        except ssl.SSLWantReadError:
            if outgoing.pending:
                sock.sendall(outgoing.read())
            incoming.write(sock.recv(65536))
    if outgoing.pending:
        sock.sendall(outgoing.read())


# -- asyncio: the receiving side on its own thread and event loop -----------------------------------------------

OpenConnection = Callable[..., Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
CreateServer = Callable[..., Awaitable[asyncio.AbstractServer]]


@dataclasses.dataclass(frozen=True)
class _Asyncio:
    """One asyncio TLS stack, by asyncio's own names and keywords: the rows differ only in these."""

    open_connection: OpenConnection
    create_server: CreateServer
    #: Extra keywords for both calls (``require_kernel`` for ktls on a kTLS kernel).
    options: dict[str, Any]
    #: ``loop.sendfile`` must take the native (zero-copy) path: no silent read + write fallback.
    native_sendfile: bool


async def _stdlib_create_server(
    protocol_factory: Callable[[], asyncio.BaseProtocol], **kwds: Any
) -> asyncio.AbstractServer:
    return await asyncio.get_running_loop().create_server(protocol_factory, **kwds)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Receiver:
    """The receiving side of an asyncio row: its own thread and event loop, so the sender's loop and this one
    run in parallel (as the sync rows' two threads do). It notes the time and CPU when the last byte arrived."""

    def __init__(self, total: int, connections: int = 1) -> None:
        self.total = total
        self.connections = connections
        self.received = 0
        self.accepted = 0
        self.ready = threading.Event()  # the loop runs; ``stop`` exists
        self.connected = threading.Event()  # every connection is made (handshakes done)
        self.done = threading.Event()  # every byte arrived, or it failed
        self.end = self.cpu_end = 0.0
        self.error: BaseException | None = None
        self.transports: list[asyncio.BaseTransport] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Future[None] | None = None
        self._thread: threading.Thread | None = None

    def start(self, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``main`` on a fresh loop in a new thread; it should end when :meth:`stopped` does."""

        async def body() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = self._loop.create_future()
            self.ready.set()
            try:
                await main()
            finally:
                for transport in self.transports:
                    transport.close()

        def run() -> None:
            try:
                asyncio.run(asyncio.wait_for(body(), _ASYNC_TIMEOUT))
            except BaseException as exc:
                self.fail(exc)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        if not self.ready.wait(_ASYNC_TIMEOUT):
            raise TimeoutError("the receiving loop did not start")

    async def stopped(self) -> None:
        assert self._stop is not None
        await self._stop

    def stop(self) -> None:
        """From any thread: end ``main`` and wait for the thread."""
        if self._loop is not None and self._stop is not None:
            # The loop may be closed already (a main that ended on its own, as the raw receiver does).
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(_resolve, self._stop)
        if self._thread is not None:
            self._thread.join(_ASYNC_TIMEOUT)

    def made(self, transport: asyncio.BaseTransport) -> None:
        self.transports.append(transport)
        self.accepted += 1
        if self.accepted >= self.connections:
            self.connected.set()

    def count(self, nbytes: int) -> None:
        self.received += nbytes
        if self.received >= self.total and not self.done.is_set():
            self.end, self.cpu_end = time.perf_counter(), _cpu()
            self.done.set()

    def fail(self, exc: BaseException) -> None:
        if not self.done.is_set():
            self.error = exc
            self.connected.set()
            self.done.set()

    def wait(self, event: threading.Event) -> None:
        if not event.wait(_ASYNC_TIMEOUT):
            raise TimeoutError("the receiving side is stuck")
        if self.error is not None:
            raise ConnectionError("the receiving side failed") from self.error


class _Sink(asyncio.BufferedProtocol):
    """Counts and discards what arrives, into one reused buffer: no allocation per read on either stack."""

    def __init__(self, receiver: _Receiver, buffer: bytearray) -> None:
        self._receiver = receiver
        self._buffer = buffer  # asyncio's transports read at most 256 KiB at a time
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self._receiver.made(transport)

    def get_buffer(self, sizehint: int) -> bytearray:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self._receiver.count(nbytes)

    def eof_received(self) -> bool | None:
        self._ended(None)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended(exc)

    def _ended(self, exc: Exception | None) -> None:
        receiver = self._receiver
        error = ConnectionError(f"a connection ended after {receiver.received} of {receiver.total} bytes")
        error.__cause__ = exc
        receiver.fail(error)


async def _write_all(writer: asyncio.StreamWriter, payload: bytes, size: int) -> None:
    for sent in range(0, size, CHUNK):
        writer.write(payload if size - sent >= CHUNK else payload[: size - sent])
        await writer.drain()


def _async_transfer(
    stack: _Asyncio,
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    size: int,
    *,
    file: Path | None = None,
    connections: int = 1,
) -> tuple[float, float]:
    """Seconds and CPU seconds to move ``size`` bytes in all (a multiple of ``connections``) client → server
    over ``connections`` connections, the client on a fresh loop in this thread, the server on one in another
    (handshakes untimed)."""
    receiver = _Receiver(size, connections)
    buffer = bytearray(4 * CHUNK)
    # Our own listener, passed as sock=: both stacks take it, and the port needs no Server.sockets.
    listener = socket.create_server(("127.0.0.1", 0), backlog=max(128, connections))
    port = listener.getsockname()[1]

    async def serve() -> None:
        try:
            server = await stack.create_server(
                lambda: _Sink(receiver, buffer), sock=listener, ssl=server_ctx, **stack.options
            )
        except BaseException:
            listener.close()  # the server owns it only once created
            raise
        try:
            await receiver.stopped()
        finally:
            server.close()
            await server.wait_closed()

    async def send() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        writers = [
            writer
            for _, writer in await asyncio.gather(
                *(
                    stack.open_connection(
                        "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost", **stack.options
                    )
                    for _ in range(connections)
                )
            )
        ]
        try:
            await asyncio.to_thread(receiver.wait, receiver.connected)
            payload = os.urandom(CHUNK)
            each = size // connections
            cpu, start = _cpu(), time.perf_counter()
            if file is None:
                await asyncio.gather(*(_write_all(writer, payload, each) for writer in writers))
            else:
                with file.open("rb") as handle:
                    await loop.sendfile(writers[0].transport, handle, 0, size, fallback=not stack.native_sendfile)
            await asyncio.to_thread(receiver.wait, receiver.done)
            return receiver.end - start, receiver.cpu_end - cpu
        finally:
            for writer in writers:
                writer.close()
            await asyncio.gather(*(writer.wait_closed() for writer in writers), return_exceptions=True)

    receiver.start(serve)
    try:
        # A fresh loop per row: no row inherits another's executor threads, transports or callbacks.
        return asyncio.run(asyncio.wait_for(send(), _ASYNC_TIMEOUT))
    finally:
        receiver.stop()


def _raw_async_transfer(
    connect: Connect, size: int, file: Path | None = None, connections: int = 1
) -> tuple[float, float]:
    """:func:`_async_transfer` over raw kTLS pairs: bare ``add_writer`` senders on this thread's loop, one bare
    ``add_reader`` receiver loop in another thread."""
    pairs = [connect() for _ in range(connections)]
    for client, server in pairs:
        client.setblocking(False)
        server.setblocking(False)
    receiver = _Receiver(size, connections)
    buffer = bytearray(4 * CHUNK)

    async def receive() -> None:
        await receive_bare([server for _, server in pairs], size, buffer)
        receiver.count(size)

    async def send() -> None:
        if file is None:
            payload = os.urandom(CHUNK)
            await asyncio.gather(*(send_bare(client, payload, size // connections) for client, _ in pairs))
        else:
            with file.open("rb") as handle:
                await sendfile_bare(pairs[0][0], handle.fileno(), size)

    try:
        receiver.start(receive)
        cpu, start = _cpu(), time.perf_counter()
        asyncio.run(asyncio.wait_for(send(), _ASYNC_TIMEOUT))
        receiver.wait(receiver.done)
        return receiver.end - start, receiver.cpu_end - cpu
    finally:
        for client, _ in pairs:
            client.close()  # first: if sending failed, the receiver sees the end of the stream and stops
        receiver.stop()
        for _, server in pairs:
            server.close()


# -- request / response, handshakes, memory ---------------------------------------------------------------------


def _echo(server: Any) -> threading.Thread:
    """Echo 1 KiB requests until EOF, in a thread."""

    def echo() -> None:
        buffer = bytearray(1024)
        try:
            while True:
                got = 0
                while got < 1024:
                    n = server.recv_into(memoryview(buffer)[got:])
                    if not n:
                        return
                    got += n
                server.sendall(buffer)
        finally:
            server.close()  # here, on the client's EOF: the client's close then sees our FIN at once

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    return thread


def _round_trip(client: Any, message: bytes, buffer: bytearray) -> None:
    client.sendall(message)
    got = 0
    while got < 1024:
        got += client.recv_into(memoryview(buffer)[got:])


def _round_trips(connect: Connect, seconds: float) -> float:
    client, server = connect()
    thread = _echo(server)
    message, buffer = os.urandom(1024), bytearray(1024)
    count, deadline = 0, time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < deadline:
        _round_trip(client, message, buffer)
        count += 1
    rate = count / (time.perf_counter() - start)
    client.close()
    thread.join(5)
    return rate


def _percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of a sorted, non-empty list."""
    rank = max(1, -(-len(ordered) * fraction // 1))  # ceil
    return ordered[int(rank) - 1]


def _latencies(connect: Connect, rate: float, seconds: float) -> tuple[float, float]:
    """p50 and p99 seconds of 1 KiB round trips due every ``1/rate`` s, each from the time it was due."""
    client, server = connect()
    thread = _echo(server)
    message, buffer = os.urandom(1024), bytearray(1024)
    latencies: list[float] = []
    start = time.perf_counter()
    for due in (start + i / rate for i in range(max(1, int(rate * seconds)))):
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        _round_trip(client, message, buffer)
        latencies.append(time.perf_counter() - due)
    client.close()
    thread.join(5)
    latencies.sort()
    return _percentile(latencies, 0.5), _percentile(latencies, 0.99)


def _handshakes(wrap: Wrap, seconds: float) -> float:
    """Connections set up per second of setting up: the closes (ktls sends close_notify, ``SSLSocket.close``
    sends nothing) are not part of the figure."""
    count, spent = 0, 0.0
    while spent < seconds:
        start = time.perf_counter()
        client, server = _wrap_pair(wrap)
        spent += time.perf_counter() - start
        _close_pair(client, server)
        count += 1
    return count / spent


def _handshake_floor(keying: RawKeying, seconds: float) -> float:
    """Like :func:`_handshakes` for raw kTLS: the ``ssl`` handshake and the three ``setsockopt`` calls per end;
    reading the key log and deriving the keys are not counted."""
    count, spent = 0, 0.0
    while spent < seconds:
        start = time.perf_counter()
        pair = _Pair()
        untimed = keying.key_pair(pair.client, pair.server)
        spent += time.perf_counter() - start - untimed
        _close_pair(pair.client, pair.server)
        count += 1
    return count / spent


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _idle_memory(wrap: Wrap, connections: int) -> float:
    before = _rss_kib()
    held = [_wrap_pair(wrap) for _ in range(connections)]
    per_connection = (_rss_kib() - before) / connections
    for client, server in held:
        _close_pair(client, server)
    return per_connection


class _Run:
    """One run's stacks, scratch files and rows; each method adds the rows of one group of workloads."""

    def __init__(self, size_mib: int, seconds: float, scratch: Path, progress: TextIO | None) -> None:
        self.server_ctx, self.client_ctx = _contexts()
        self.kernel = probe().available
        # With kTLS a ktls row must be kernel TLS (require_kernel); without it, the label says fallback.
        self.suffix = "" if self.kernel else FALLBACK
        stdlib = _stdlib(self.server_ctx, self.client_ctx)
        ktls = _ktls(self.server_ctx, self.client_ctx, self.kernel)
        self.variants: list[tuple[str, Wrap]] = [(PLAIN, _plain), (SSL, stdlib), (KTLS + self.suffix, ktls)]
        self.stdlib_asyncio = _Asyncio(asyncio.open_connection, _stdlib_create_server, {}, native_sendfile=False)
        ktls_only = {"require_kernel": True} if self.kernel else {}
        self.ktls_asyncio = _Asyncio(ktls_open_connection, ktls_create_server, ktls_only, native_sendfile=self.kernel)
        self.size_mib, self.size, self.seconds = size_mib, size_mib * MIB, seconds
        self.scratch, self.progress = scratch, progress
        # Raw kTLS gets contexts of its own: its key log is a plain file, not ktls's capture.
        self.raw = _raw(RawKeying(*_contexts(), scratch / "raw.keylog")) if self.kernel else None
        #: Request/response variants: ssl, ktls, raw kTLS (plain TCP first, for the rr rows).
        self.rr: list[tuple[str, Connect]] = [(name, _wrapped(wrap)) for name, wrap in self.variants]
        if self.raw is not None:
            self.rr.append((RAW, self.raw))
        self.results: list[BenchResult] = []

    def note(self, result: BenchResult) -> None:
        self.results.append(result)
        if self.progress is not None:
            print(
                f"  {result.workload:<10} {result.variant:<40} {result.value:12.1f} {result.unit}",
                file=self.progress,
                flush=True,
            )

    def transfer(
        self, workload: str, variant: str, timing: tuple[float, float], how: str = "", *, size: int | None = None
    ) -> None:
        elapsed, cpu = timing
        moved = self.size if size is None else size
        self.note(BenchResult(workload, variant, moved / MIB / elapsed, "MiB/s", cpu / (moved / 2**30), how))

    def bulk(self) -> None:
        size, raw = self.size, self.raw
        if raw is not None:
            # Untimed: the first kTLS transfer of a run must not pay alone for warming the kernel's TLS paths
            # (under emulation the first use of kernel code costs its translation).
            _transfer(raw, min(size, 4 * MIB))
        for name, wrap in self.variants:
            self.transfer("bulk", name, _transfer(_wrapped(wrap), size))
        if raw is not None:
            self.transfer("bulk", RAW, _transfer(raw, size), "send / recv_into on raw kTLS sockets")
            no_pad = _ktls(self.server_ctx, self.client_ctx, True, rx_expect_no_pad=True)
            how = "TLS 1.3 receive with TLS_RX_EXPECT_NO_PAD"
            self.transfer("bulk", KTLS_NO_PAD, _transfer(_wrapped(no_pad), size), how)
        contexts = (self.server_ctx, self.client_ctx)
        self.transfer("bulk", ASYNCIO_SSL, _async_transfer(self.stdlib_asyncio, *contexts, size))
        self.transfer("bulk", KTLS_ASYNCIO + self.suffix, _async_transfer(self.ktls_asyncio, *contexts, size))
        if raw is not None:
            how = "bare add_writer send / add_reader recv_into"
            self.transfer("bulk", RAW_ASYNCIO, _raw_async_transfer(raw, size), how)

    def file(self) -> None:
        size, raw = self.size, self.raw
        file = self.scratch / "payload.bin"
        with file.open("wb") as out:
            block = os.urandom(MIB)
            for _ in range(self.size_mib):
                out.write(block)
        for name, wrap in self.variants:
            how = "read+send (SSLSocket.sendfile)" if name == SSL else "sendfile"
            self.transfer("file", name, _transfer(_wrapped(wrap), size, file=file), how)
        if raw is not None:
            self.transfer("file", RAW, _transfer(raw, size, file=file), "sendfile")
        # asyncio's SSL transport is FALLBACK for loop.sendfile: 16 KiB readinto in the executor, then write.
        contexts = (self.server_ctx, self.client_ctx)
        timing = _async_transfer(self.stdlib_asyncio, *contexts, size, file=file)
        self.transfer("file", ASYNCIO_SSL_SENDFILE, timing, "read+write (asyncio fallback)")
        timing = _async_transfer(self.ktls_asyncio, *contexts, size, file=file)
        how = "sendfile (native)" if self.kernel else "read+write (asyncio fallback)"
        self.transfer("file", KTLS_SENDFILE + self.suffix, timing, how)
        if raw is not None:
            self.transfer("file", RAW_SENDFILE, _raw_async_transfer(raw, size, file), "os.sendfile in add_writer")
            self.transfer("limit", LIMIT, _limit(*contexts, size, file))
        file.unlink()

    def short(self, connections: int) -> None:
        """Round trips, handshakes, idle memory."""
        for name, connect in self.rr:
            self.note(BenchResult("rr", name, _round_trips(connect, self.seconds), "round trips/s"))
        for name, wrap in self.variants[1:]:
            self.note(BenchResult("handshake", name, _handshakes(wrap, self.seconds), "connections/s"))
        if self.raw is not None:
            floor = _handshake_floor(RawKeying(*_contexts(), self.scratch / "floor.keylog"), self.seconds)
            how = "ssl handshake + 3 setsockopt per end (keys derived untimed)"
            self.note(BenchResult("handshake", RAW, floor, "connections/s", note=how))
        for name, wrap in self.variants:
            self.note(BenchResult("idle", name, _idle_memory(wrap, connections), "KiB/connection"))

    def scale(self, counts: tuple[int, ...], rate: float) -> None:
        """Concurrent bulk connections, and latency at a fixed rate: ssl, ktls, raw kTLS."""
        sync = self.rr[1:]  # no plain TCP
        stacks = [(ASYNCIO_SSL, self.stdlib_asyncio), (KTLS_ASYNCIO + self.suffix, self.ktls_asyncio)]
        for count in counts:
            workload, size = f"scale {count}", self.size // count * count  # the same bytes on each connection
            for name, connect in sync:
                timing = _parallel_transfer(connect, count, size)
                self.transfer(workload, name, timing, f"{count} × 2 threads", size=size)
            for name, stack in stacks:
                timing = _async_transfer(stack, self.server_ctx, self.client_ctx, size, connections=count)
                self.transfer(workload, name, timing, "a loop per side", size=size)
            if self.raw is not None:
                timing = _raw_async_transfer(self.raw, size, connections=count)
                self.transfer(workload, RAW_ASYNCIO, timing, "a bare loop per side", size=size)
        for name, connect in sync:
            p50, p99 = _latencies(connect, rate, self.seconds)
            how = f"1 KiB round trips due at {rate:g}/s"
            self.note(BenchResult("rr p50", name, p50 * 1000, "ms", note=how))
            self.note(BenchResult("rr p99", name, p99 * 1000, "ms", note=how))


def run(
    size_mib: int = 64,
    seconds: float = 3.0,
    connections: int = 100,
    progress: TextIO | None = None,
    *,
    scale: bool = False,
    rate: float = 100.0,
    scale_connections: tuple[int, ...] = SCALE_CONNECTIONS,
) -> list[BenchResult]:
    """Run every workload (the scale rows only with ``scale``); returns the rows (see the module docstring)."""
    with tempfile.TemporaryDirectory() as scratch:
        bench = _Run(size_mib, seconds, Path(scratch), progress)
        bench.bulk()
        bench.file()
        bench.short(connections)
        if scale:
            bench.scale(scale_connections, rate)
    return bench.results


@dataclasses.dataclass
class Target:
    """A goal of the benchmark issue: ``value`` (``None`` when its rows are missing) against ``target``."""

    name: str
    value: float | None
    target: float
    met: bool | None


#: (name, numerator row, denominator row, at least): the issues' goals, as ratios of rows of one run.
TARGETS: list[tuple[str, tuple[str, str], tuple[str, str], float]] = [
    ("ktls bulk ÷ limit", ("bulk", KTLS), ("limit", LIMIT), 0.95),
    ("ktls asyncio bulk ÷ ktls bulk", ("bulk", KTLS_ASYNCIO), ("bulk", KTLS), 0.9),
    ("ktls loop.sendfile ÷ asyncio SSL loop.sendfile", ("file", KTLS_SENDFILE), ("file", ASYNCIO_SSL_SENDFILE), 4.0),
    ("ktls loop.sendfile ÷ limit", ("file", KTLS_SENDFILE), ("limit", LIMIT), 0.95),
    ("ktls handshake ÷ ssl handshake", ("handshake", KTLS), ("handshake", SSL), 0.9),
    ("ktls rr ÷ ssl rr", ("rr", KTLS), ("rr", SSL), 1.3),
    # Against the kernel's own limit (raw kTLS): what ktls's code costs.
    ("ktls bulk ÷ raw", ("bulk", KTLS), ("bulk", RAW), 0.95),
    ("ktls asyncio bulk ÷ raw asyncio", ("bulk", KTLS_ASYNCIO), ("bulk", RAW_ASYNCIO), 0.95),
    ("ktls file ÷ raw", ("file", KTLS), ("file", RAW), 0.95),
    ("ktls loop.sendfile ÷ raw", ("file", KTLS_SENDFILE), ("file", RAW_SENDFILE), 0.95),
    ("ktls rr ÷ raw", ("rr", KTLS), ("rr", RAW), 0.95),
    ("ktls handshake ÷ raw floor", ("handshake", KTLS), ("handshake", RAW), 0.9),
]


def targets(results: list[BenchResult]) -> list[Target]:
    """The issue's goals computed from ``results``; rows looked up by exact label, so fallback rows give n/a."""
    by_key = {(r.workload, r.variant): r for r in results}
    measured: list[Target] = []
    for name, top, bottom, goal in TARGETS:
        num, den = by_key.get(top), by_key.get(bottom)
        value = num.value / den.value if num is not None and den is not None and den.value else None
        measured.append(Target(name, value, goal, None if value is None else value >= goal))
    return measured


def format_targets(measured: list[Target]) -> str:
    """The targets block printed after the table: measured ratio, goal, met (``n/a`` without the rows)."""
    width = max(len(t.name) for t in measured)
    lines = [f"{'target':<{width}} {'value':>7} {'goal':>6}  met"]
    for t in measured:
        # Three decimals: 0.895 against ≥0.90 must not print as a failed "0.90".
        value = f"{t.value:7.3f}" if t.value is not None else "    n/a"
        met = "n/a" if t.met is None else ("yes" if t.met else "no")
        lines.append(f"{t.name:<{width}} {value} {'≥' + format(t.target, '.2f'):>6}  {met}")
    return "\n".join(lines)


#: The ratio columns, in order: key in :func:`ratios`, column heading.
RATIO_COLUMNS = [("tcp", "×TCP"), ("ssl", "×ssl"), ("raw", "×raw"), ("limit", "×limit")]


def ratios(results: list[BenchResult]) -> list[dict[str, float | None]]:
    """Per row: its value ÷ plain TCP's and ÷ ssl's in the same workload, ÷ its raw kTLS counterpart's
    (:data:`RAW_BASE`; ktls rows only) and, for transfers, ÷ the kernel-crypto limit. ``None`` where that row
    is missing. For latency rows (ms) a ratio above 1 is slower."""
    by_key = {(r.workload, r.variant): r for r in results}
    limit = by_key.get(("limit", LIMIT))

    def ratio(value: float, base: BenchResult | None) -> float | None:
        return value / base.value if base is not None and base.value else None

    rows: list[dict[str, float | None]] = []
    for r in results:
        raw = RAW_BASE.get(r.variant)
        rows.append(
            {
                "tcp": ratio(r.value, by_key.get((r.workload, PLAIN))),
                "ssl": ratio(r.value, by_key.get((r.workload, SSL))),
                "raw": ratio(r.value, by_key.get((r.workload, raw))) if raw is not None else None,
                "limit": ratio(r.value, limit) if r.workload in ("bulk", "file") else None,
            }
        )
    return rows


def format_table(results: list[BenchResult]) -> str:
    """One line per row, with the ratios of :func:`ratios`."""
    width = max([30, *(len(r.variant) for r in results)])
    lines = [
        f"{'workload':<10} {'variant':<{width}} {'value':>12} {'unit':<16} {'CPU s/GiB':>9} "
        + " ".join(f"{heading:>6}" for _, heading in RATIO_COLUMNS)
    ]
    for r, row in zip(results, ratios(results), strict=True):
        cpu = f"{r.cpu_per_gib:9.2f}" if r.cpu_per_gib is not None else "        -"
        cells = " ".join(f"{row[key]:6.2f}" if row[key] is not None else "     -" for key, _ in RATIO_COLUMNS)
        lines.append(f"{r.workload:<10} {r.variant:<{width}} {r.value:12.1f} {r.unit:<16} {cpu} {cells}")
    return "\n".join(lines)


def main(
    size_mib: int,
    seconds: float,
    connections: int,
    as_json: bool,
    out: TextIO,
    *,
    scale: bool = False,
    rate: float = 100.0,
) -> int:
    support = probe()
    header = f"ktls bench: kernel {support.kernel_release}, kTLS {'yes' if support.available else 'no'}, {size_mib} MiB"
    print(header, file=sys.stderr)
    results = run(size_mib, seconds, connections, progress=sys.stderr, scale=scale, rate=rate)
    measured = targets(results)
    if as_json:
        json.dump(
            {
                "kernel": support.kernel_release,
                "ktls": support.available,
                "results": [
                    {**dataclasses.asdict(r), "ratios": row} for r, row in zip(results, ratios(results), strict=True)
                ],
                "targets": [dataclasses.asdict(t) for t in measured],
            },
            out,
            indent=2,
        )
        out.write("\n")
    else:
        print(format_table(results), file=out)
        print(file=out)
        print(format_targets(measured), file=out)
    return 0

"""``ktls bench``: the same workloads over plain TCP, stdlib ``ssl``, asyncio's SSL and ktls — ratios from one run.

Every workload runs both ends in this process over loopback (127.0.0.1), so the CPU time (user + system, all
threads, from ``getrusage``) is the whole cost of moving the bytes, the kernel's crypto included. Absolute
numbers depend on the machine (under software emulation AES is very slow); the ratios between rows measured
side by side in one run are what to read. Rows (workload: variants):

* ``bulk``: one-way transfer of ``--size`` MiB in 64 KiB writes; the reader discards.

  - ``plain TCP``, ``ssl`` (``ssl.SSLSocket``), ``ktls`` (``ktls.Stream``): a sending thread and a
    ``recv_into`` thread; with kTLS also ``ktls RX_EXPECT_NO_PAD`` (``wrap_socket(..., rx_expect_no_pad=True)``).
  - ``asyncio SSL`` (``asyncio.open_connection``/``loop.create_server`` with ``ssl=``) and ``ktls asyncio``
    (``ktls.asyncio.open_connection``/``create_server``, the same code): one event loop (``asyncio.run``,
    fresh per row) holds both ends; the client does ``writer.write`` + ``await writer.drain()``, the server is
    a ``BufferedProtocol`` that counts into one reused buffer.

* ``file``: the same bytes from a file.

  - ``plain TCP``, ``ssl``, ``ktls``: ``socket.sendfile`` — ``os.sendfile`` for plain TCP and ktls,
    ``SSLSocket.sendfile`` falls back to read + send.
  - ``asyncio SSL loop.sendfile`` and ``ktls loop.sendfile``: ``await loop.sendfile(writer.transport, file)``
    to the same counting protocol; asyncio's SSL transport gets the loop's read + write fallback, the ktls
    transport the loop's native ``os.sendfile`` path (``fallback=False`` where the kernel sends, so a silent
    fallback cannot pass for zero-copy).

* ``limit``: ``kTLS sendfile, raw receiver``, the kernel-crypto ceiling — kTLS TX of the file with
  ``sendfile`` to a receiver that discards the raw records without decrypting them. Only with kTLS.
* ``rr``: ``plain TCP``, ``ssl``, ``ktls``: 1 KiB request / 1 KiB response round trips per second on one
  connection.
* ``handshake``: ``ssl``, ``ktls``: connections per second: the ``ssl`` handshake alone vs handshake + kernel
  hand-off (both ends in this process, so each connection costs both sides; closing is not counted).
* ``idle``: ``plain TCP``, ``ssl``, ``ktls``: memory per idle connection (RSS growth / connections), both ends
  in this process.

Without kTLS the ktls variants run over their userspace fallback and say so in their label
(``ktls asyncio (fallback: no kTLS)``); with it they insist on the kernel (``require_kernel=True``), so a row
labelled ktls is kernel TLS. :func:`targets` relates the rows to the goals of the benchmark issue; a goal whose
rows are missing or fallback is ``n/a``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import resource
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

from .asyncio import create_server as ktls_create_server
from .asyncio import open_connection as ktls_open_connection
from .kernel.probe import probe
from .serve.certificate import load_default_certificate
from .stream import Stream, wrap_socket

__all__ = ["BenchResult", "Target", "format_table", "format_targets", "main", "run", "targets"]

CHUNK = 64 * 1024
MIB = 1024 * 1024

# Variant labels, shared by the rows, the ratio columns and the targets.
PLAIN = "plain TCP"
SSL = "ssl"
KTLS = "ktls"
KTLS_NO_PAD = "ktls RX_EXPECT_NO_PAD"
ASYNCIO_SSL = "asyncio SSL"
KTLS_ASYNCIO = "ktls asyncio"
ASYNCIO_SSL_SENDFILE = "asyncio SSL loop.sendfile"
KTLS_SENDFILE = "ktls loop.sendfile"
LIMIT = "kTLS sendfile, raw receiver"
FALLBACK = " (fallback: no kTLS)"

#: A transfer that takes longer than this is stuck, not slow (64 MiB at TCG's worst is well under it).
_ASYNC_TIMEOUT = 900.0


@dataclasses.dataclass
class BenchResult:
    workload: str
    variant: str
    #: MiB/s for transfers, operations/s for rr and handshake, KiB per connection for idle.
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


def _transfer(wrap: Wrap, size: int, *, file: Path | None = None) -> tuple[float, float]:
    """Seconds and CPU seconds to move ``size`` bytes client → server."""
    client, server = _wrap_pair(wrap)
    reader = threading.Thread(target=_drain, args=(server, size))
    payload = memoryview(os.urandom(CHUNK))
    cpu, start = _cpu(), time.perf_counter()
    reader.start()
    if file is not None:
        with file.open("rb") as handle:
            client.sendfile(handle, 0, size)
    else:
        sent = 0
        while sent < size:
            client.sendall(payload[: min(CHUNK, size - sent)])
            sent += CHUNK
    reader.join()
    elapsed, cpu_used = time.perf_counter() - start, _cpu() - cpu
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


# -- asyncio: both ends on one event loop -----------------------------------------------------------------------

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


class _Sink(asyncio.BufferedProtocol):
    """Counts and discards what arrives, into one reused buffer: no allocation per read on either stack."""

    def __init__(self, total: int, connected: asyncio.Future[_Sink], done: asyncio.Future[None]) -> None:
        self._buffer = bytearray(4 * CHUNK)  # asyncio's transports read at most 256 KiB at a time
        self._total = total
        self._connected = connected
        self._done = done
        self.received = 0
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if not self._connected.done():
            self._connected.set_result(self)

    def get_buffer(self, sizehint: int) -> bytearray:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.received += nbytes
        if self.received >= self._total and not self._done.done():
            self._done.set_result(None)

    def eof_received(self) -> bool | None:
        self._ended(None)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended(exc)

    def _ended(self, exc: Exception | None) -> None:
        for waiter in (self._connected, self._done):
            if not waiter.done():
                error = ConnectionError(f"the connection ended after {self.received} of {self._total} bytes")
                error.__cause__ = exc
                waiter.set_exception(error)


async def _async_transfer(
    stack: _Asyncio, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, size: int, file: Path | None
) -> tuple[float, float]:
    """Seconds and CPU seconds to move ``size`` bytes client → server on the running loop (handshakes untimed)."""
    loop = asyncio.get_running_loop()
    connected: asyncio.Future[_Sink] = loop.create_future()
    done: asyncio.Future[None] = loop.create_future()
    # Our own listener, passed as sock=: both stacks take it, and the port needs no Server.sockets.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        server = await stack.create_server(
            lambda: _Sink(size, connected, done), sock=listener, ssl=server_ctx, **stack.options
        )
    except BaseException:
        listener.close()  # the server owns it only once created
        raise
    try:
        _, writer = await stack.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost", **stack.options
        )
        sink = await connected
        payload = os.urandom(CHUNK)
        cpu, start = _cpu(), time.perf_counter()
        if file is None:
            for sent in range(0, size, CHUNK):
                writer.write(payload if size - sent >= CHUNK else payload[: size - sent])
                await writer.drain()
        else:
            with file.open("rb") as handle:
                await loop.sendfile(writer.transport, handle, 0, size, fallback=not stack.native_sendfile)
        await done
        elapsed, cpu_used = time.perf_counter() - start, _cpu() - cpu
        writer.close()
        if sink.transport is not None:
            sink.transport.close()
        await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
    return elapsed, cpu_used


def _run_async_transfer(
    stack: _Asyncio, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, size: int, file: Path | None = None
) -> tuple[float, float]:
    # A fresh loop per row: no row inherits another's executor threads, transports or callbacks.
    return asyncio.run(asyncio.wait_for(_async_transfer(stack, server_ctx, client_ctx, size, file), _ASYNC_TIMEOUT))


def _round_trips(wrap: Wrap, seconds: float) -> float:
    client, server = _wrap_pair(wrap)
    message = os.urandom(1024)

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
    count, deadline = 0, time.perf_counter() + seconds
    start = time.perf_counter()
    buffer = bytearray(1024)
    while time.perf_counter() < deadline:
        client.sendall(message)
        got = 0
        while got < 1024:
            got += client.recv_into(memoryview(buffer)[got:])
        count += 1
    rate = count / (time.perf_counter() - start)
    client.close()
    thread.join(5)
    return rate


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


def run(
    size_mib: int = 64, seconds: float = 3.0, connections: int = 100, progress: TextIO | None = None
) -> list[BenchResult]:
    """Run every workload; returns the rows (see the module docstring)."""
    server_ctx, client_ctx = _contexts()
    kernel = probe().available
    # With kTLS a ktls row must be kernel TLS (require_kernel); without it, the label says fallback.
    suffix = "" if kernel else FALLBACK
    ktls_only = {"require_kernel": True} if kernel else {}
    variants: list[tuple[str, Wrap]] = [(PLAIN, _plain), (SSL, _stdlib(server_ctx, client_ctx))]
    variants.append((KTLS + suffix, _ktls(server_ctx, client_ctx, kernel)))
    stdlib_asyncio = _Asyncio(asyncio.open_connection, _stdlib_create_server, {}, native_sendfile=False)
    ktls_asyncio = _Asyncio(ktls_open_connection, ktls_create_server, ktls_only, native_sendfile=kernel)
    size = size_mib * MIB
    gib = size / 2**30
    results: list[BenchResult] = []

    def note(result: BenchResult) -> None:
        results.append(result)
        if progress is not None:
            print(
                f"  {result.workload:<10} {result.variant:<40} {result.value:12.1f} {result.unit}",
                file=progress,
                flush=True,
            )

    def transfer(workload: str, variant: str, timing: tuple[float, float], how: str = "") -> None:
        elapsed, cpu = timing
        note(BenchResult(workload, variant, size / MIB / elapsed, "MiB/s", cpu / gib, how))

    with tempfile.TemporaryDirectory() as scratch:
        file = Path(scratch) / "payload.bin"
        with file.open("wb") as out:
            block = os.urandom(MIB)
            for _ in range(size_mib):
                out.write(block)
        for name, wrap in variants:
            transfer("bulk", name, _transfer(wrap, size))
        if kernel:
            no_pad = _ktls(server_ctx, client_ctx, True, rx_expect_no_pad=True)
            transfer("bulk", KTLS_NO_PAD, _transfer(no_pad, size), "TLS 1.3 receive with TLS_RX_EXPECT_NO_PAD")
        transfer("bulk", ASYNCIO_SSL, _run_async_transfer(stdlib_asyncio, server_ctx, client_ctx, size))
        transfer("bulk", KTLS_ASYNCIO + suffix, _run_async_transfer(ktls_asyncio, server_ctx, client_ctx, size))
        for name, wrap in variants:
            how = "read+send (SSLSocket.sendfile)" if name == SSL else "sendfile"
            transfer("file", name, _transfer(wrap, size, file=file), how)
        # asyncio's SSL transport is FALLBACK for loop.sendfile: 16 KiB readinto in the executor, then write.
        timing = _run_async_transfer(stdlib_asyncio, server_ctx, client_ctx, size, file)
        transfer("file", ASYNCIO_SSL_SENDFILE, timing, "read+write (asyncio fallback)")
        timing = _run_async_transfer(ktls_asyncio, server_ctx, client_ctx, size, file)
        how = "sendfile (native)" if kernel else "read+write (asyncio fallback)"
        transfer("file", KTLS_SENDFILE + suffix, timing, how)
        if kernel:
            transfer("limit", LIMIT, _limit(server_ctx, client_ctx, size, file))
    for name, wrap in variants:
        note(BenchResult("rr", name, _round_trips(wrap, seconds), "round trips/s"))
    for name, wrap in variants[1:]:
        note(BenchResult("handshake", name, _handshakes(wrap, seconds), "connections/s"))
    for name, wrap in variants:
        note(BenchResult("idle", name, _idle_memory(wrap, connections), "KiB/connection"))
    return results


@dataclasses.dataclass
class Target:
    """A goal of the benchmark issue: ``value`` (``None`` when its rows are missing) against ``target``."""

    name: str
    value: float | None
    target: float
    met: bool | None


#: (name, numerator row, denominator row, at least): the issue's goals, as ratios of rows of one run.
TARGETS: list[tuple[str, tuple[str, str], tuple[str, str], float]] = [
    ("ktls bulk ÷ limit", ("bulk", KTLS), ("limit", LIMIT), 0.95),
    ("ktls asyncio bulk ÷ ktls bulk", ("bulk", KTLS_ASYNCIO), ("bulk", KTLS), 0.9),
    ("ktls loop.sendfile ÷ asyncio SSL loop.sendfile", ("file", KTLS_SENDFILE), ("file", ASYNCIO_SSL_SENDFILE), 4.0),
    ("ktls loop.sendfile ÷ limit", ("file", KTLS_SENDFILE), ("limit", LIMIT), 0.95),
    ("ktls handshake ÷ ssl handshake", ("handshake", KTLS), ("handshake", SSL), 0.9),
    ("ktls rr ÷ ssl rr", ("rr", KTLS), ("rr", SSL), 1.3),
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


def format_table(results: list[BenchResult]) -> str:
    """One line per row, with ratios against plain TCP and stdlib ssl of the same workload, and (transfers)
    against the kernel-crypto limit."""
    by_key = {(r.workload, r.variant): r for r in results}
    limit = by_key.get(("limit", LIMIT))
    width = max([30, *(len(r.variant) for r in results)])

    def ratio(value: float, base: BenchResult | None) -> str:
        return f"{value / base.value:6.2f}" if base is not None and base.value else "     -"

    lines = [
        f"{'workload':<10} {'variant':<{width}} {'value':>12} {'unit':<16} {'CPU s/GiB':>9}"
        f" {'×TCP':>6} {'×ssl':>6} {'×limit':>6}"
    ]
    for r in results:
        cpu = f"{r.cpu_per_gib:9.2f}" if r.cpu_per_gib is not None else "        -"
        to_limit = ratio(r.value, limit) if r.workload in ("bulk", "file") else "     -"
        lines.append(
            f"{r.workload:<10} {r.variant:<{width}} {r.value:12.1f} {r.unit:<16} {cpu}"
            f" {ratio(r.value, by_key.get((r.workload, PLAIN)))} {ratio(r.value, by_key.get((r.workload, SSL)))}"
            f" {to_limit}"
        )
    return "\n".join(lines)


def main(size_mib: int, seconds: float, connections: int, as_json: bool, out: TextIO) -> int:
    support = probe()
    header = f"ktls bench: kernel {support.kernel_release}, kTLS {'yes' if support.available else 'no'}, {size_mib} MiB"
    print(header, file=sys.stderr)
    results = run(size_mib, seconds, connections, progress=sys.stderr)
    measured = targets(results)
    if as_json:
        json.dump(
            {
                "kernel": support.kernel_release,
                "ktls": support.available,
                "results": [dataclasses.asdict(r) for r in results],
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

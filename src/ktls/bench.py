"""``ktls bench``: the same workloads over plain TCP, stdlib ``ssl``, and ktls — ratios from one run.

Every workload runs both ends in this process over loopback, so the CPU time (user + system, all threads,
from ``getrusage``) is the whole cost of moving the bytes, the kernel's crypto included. Absolute numbers
depend on the machine (under software emulation AES is very slow); the ratios between rows measured side by
side in one run are what to read. Rows:

* ``bulk``: one-way transfer of ``--size`` MiB in 64 KiB writes; the reader discards.
* ``file``: the same bytes from a file: ``sendfile`` where the path allows it (plain TCP, ktls), the best
  each baseline can do otherwise (``SSLSocket.sendfile`` falls back to read + send).
* ``limit``: the kernel-crypto ceiling — kTLS TX of the file with ``sendfile`` to a receiver that discards
  the raw records without decrypting them.
* ``rr``: 1 KiB request / 1 KiB response round trips per second on one connection.
* ``handshake``: connections per second: the ``ssl`` handshake alone vs handshake + kernel hand-off.
* ``idle``: memory per idle connection (RSS growth / connections), both ends in this process.
"""

from __future__ import annotations

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
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from .kernel.probe import probe
from .serve.certificate import load_default_certificate
from .stream import Stream, wrap_socket

__all__ = ["BenchResult", "main", "run"]

CHUNK = 64 * 1024
MIB = 1024 * 1024


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


def _ktls(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> Wrap:
    def wrap(sock: socket.socket, server_side: bool) -> Stream:
        return wrap_socket(sock, server_ctx if server_side else client_ctx, server_side=server_side)

    return wrap


def _wrap_pair(wrap: Wrap) -> tuple[Any, Any]:
    pair = _Pair()
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.setdefault("server", wrap(pair.server, True)))
    thread.start()
    client = wrap(pair.client, False)
    thread.join()
    return client, result["server"]


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
    client.close()
    server.close()
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
    stream.close()
    pair.client.close()
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


def _round_trips(wrap: Wrap, seconds: float) -> float:
    client, server = _wrap_pair(wrap)
    message = os.urandom(1024)
    stop = threading.Event()

    def echo() -> None:
        buffer = bytearray(1024)
        while True:
            got = 0
            while got < 1024:
                n = server.recv_into(memoryview(buffer)[got:])
                if not n:
                    return
                got += n
            server.sendall(buffer)

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    count, deadline = 0, time.perf_counter() + seconds
    start = time.perf_counter()
    buffer = bytearray(1024)
    while time.perf_counter() < deadline and not stop.is_set():
        client.sendall(message)
        got = 0
        while got < 1024:
            got += client.recv_into(memoryview(buffer)[got:])
        count += 1
    rate = count / (time.perf_counter() - start)
    client.close()
    thread.join(5)
    server.close()
    return rate


def _handshakes(wrap: Wrap, seconds: float) -> float:
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        client, server = _wrap_pair(wrap)
        client.close()
        server.close()
        count += 1
    return count / (time.perf_counter() - start)


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
        client.close()
        server.close()
    return per_connection


def run(
    size_mib: int = 64, seconds: float = 3.0, connections: int = 100, progress: TextIO | None = None
) -> list[BenchResult]:
    """Run every workload; returns the rows (see the module docstring)."""
    server_ctx, client_ctx = _contexts()
    kernel = probe().available
    variants: list[tuple[str, Wrap]] = [("plain TCP", _plain), ("ssl", _stdlib(server_ctx, client_ctx))]
    variants.append(("ktls" if kernel else "ktls (fallback: no kTLS)", _ktls(server_ctx, client_ctx)))
    size = size_mib * MIB
    results: list[BenchResult] = []

    def note(result: BenchResult) -> None:
        results.append(result)
        if progress is not None:
            print(
                f"  {result.workload:<10} {result.variant:<28} {result.value:12.1f} {result.unit}",
                file=progress,
                flush=True,
            )

    with tempfile.TemporaryDirectory() as scratch:
        file = Path(scratch) / "payload.bin"
        with file.open("wb") as out:
            block = os.urandom(MIB)
            for _ in range(size_mib):
                out.write(block)
        for name, wrap in variants:
            elapsed, cpu = _transfer(wrap, size)
            note(BenchResult("bulk", name, size / MIB / elapsed, "MiB/s", cpu / (size / 2**30)))
        for name, wrap in variants:
            elapsed, cpu = _transfer(wrap, size, file=file)
            how = "sendfile" if name != "ssl" else "read+send (SSLSocket.sendfile)"
            note(BenchResult("file", name, size / MIB / elapsed, "MiB/s", cpu / (size / 2**30), how))
        if kernel:
            elapsed, cpu = _limit(server_ctx, client_ctx, size, file)
            note(
                BenchResult("limit", "kTLS sendfile, raw receiver", size / MIB / elapsed, "MiB/s", cpu / (size / 2**30))
            )
    for name, wrap in variants:
        note(BenchResult("rr", name, _round_trips(wrap, seconds), "round trips/s"))
    for name, wrap in variants[1:]:
        note(BenchResult("handshake", name, _handshakes(wrap, seconds), "connections/s"))
    for name, wrap in variants:
        note(BenchResult("idle", name, _idle_memory(wrap, connections), "KiB/connection"))
    return results


def format_table(results: list[BenchResult]) -> str:
    """One line per row, with ratios against plain TCP and stdlib ssl of the same workload."""
    by_key = {(r.workload, r.variant): r for r in results}
    lines = [f"{'workload':<10} {'variant':<30} {'value':>12} {'unit':<16} {'CPU s/GiB':>9} {'×TCP':>6} {'×ssl':>6}"]
    for r in results:
        tcp = by_key.get((r.workload, "plain TCP"))
        stdlib = by_key.get((r.workload, "ssl"))
        ratio_tcp = f"{r.value / tcp.value:6.2f}" if tcp and tcp.value else "     -"
        ratio_ssl = f"{r.value / stdlib.value:6.2f}" if stdlib and stdlib.value else "     -"
        cpu = f"{r.cpu_per_gib:9.2f}" if r.cpu_per_gib is not None else "        -"
        lines.append(f"{r.workload:<10} {r.variant:<30} {r.value:12.1f} {r.unit:<16} {cpu} {ratio_tcp} {ratio_ssl}")
    return "\n".join(lines)


def main(size_mib: int, seconds: float, connections: int, as_json: bool, out: TextIO) -> int:
    support = probe()
    header = f"ktls bench: kernel {support.kernel_release}, kTLS {'yes' if support.available else 'no'}, {size_mib} MiB"
    print(header, file=sys.stderr)
    results = run(size_mib, seconds, connections, progress=sys.stderr)
    if as_json:
        json.dump(
            {
                "kernel": support.kernel_release,
                "ktls": support.available,
                "results": [dataclasses.asdict(r) for r in results],
            },
            out,
            indent=2,
        )
        out.write("\n")
    else:
        print(format_table(results), file=out)
    return 0

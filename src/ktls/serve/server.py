"""``ktls serve``: an HTTPS static file server whose bytes the kernel encrypts and ``sendfile`` moves.

Shape: ``workers`` processes, each with its own listening socket on the same port (``SO_REUSEPORT``: the
kernel spreads connections across them), each handling connections on a bounded pool of threads with the
blocking :class:`~ktls.Stream`. A file body goes out with ``Stream.sendfile`` — ``os.sendfile`` on a kTLS
socket — so its bytes never enter Python. SIGINT/SIGTERM stop accepting, let the connections in flight
finish their current response (bounded), then exit; the parent forwards the signal to its workers.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import ssl
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TextIO

from ..errors import KTLSError
from ..kernel.probe import probe
from ..stream import Stream, wrap_socket
from .certificate import SessionCertificate, load_default_certificate
from .http import MAX_HEAD, BadRequest, Response, parse_request, respond

__all__ = ["ServeConfig", "serve"]

log = logging.getLogger("ktls.serve")
access_log = logging.getLogger("ktls.serve.access")

#: How long a kept-alive connection may sit idle, and how long a handshake may take.
IDLE_TIMEOUT = 15.0
HANDSHAKE_TIMEOUT = 10.0
#: How long a graceful stop waits for responses in flight.
STOP_GRACE = 5.0


@dataclasses.dataclass
class ServeConfig:
    root: Path
    bind: str = "127.0.0.1"
    port: int = 8443
    cert: Path | None = None
    key: Path | None = None
    workers: int = 1
    threads: int = 64


def _context(config: ServeConfig) -> tuple[ssl.SSLContext, SessionCertificate | None]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    if config.cert is not None:
        context.load_cert_chain(config.cert, config.key)
        return context, None
    certificate = load_default_certificate()
    context.load_cert_chain(certificate.cert_path, certificate.key_path)
    return context, certificate


def _listener(config: ServeConfig) -> socket.socket:
    family = socket.AF_INET6 if ":" in config.bind else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((config.bind, config.port))
    sock.listen(1024)
    return sock


def _read_head(stream: Stream, buffer: bytearray) -> bytes | None:
    """The next request head (pipelined bytes after it stay in ``buffer``); ``None`` at a clean end."""
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buffer[:end])
            del buffer[: end + 4]
            return head
        if len(buffer) > MAX_HEAD:
            raise BadRequest("request head too large", 431)
        data = stream.recv(65536)
        if not data:
            if buffer:
                raise BadRequest("connection closed inside a request head")
            return None
        buffer += data


def _send_response(stream: Stream, response: Response, keep_alive: bool) -> int:
    """Head, then body. The connection has ``TCP_NODELAY``: a head written alone must not wait for a delayed
    ACK (Nagle) before its body may follow."""
    if not response.send_body or response.path is None:
        stream.sendall(response.head(keep_alive) + (response.body if response.send_body else b""))
        return len(response.body) if response.send_body else 0
    stream.sendall(response.head(keep_alive))
    with response.path.open("rb") as file:
        return stream.sendfile(file, response.offset, response.length)


def _handle(stream: Stream, root: Path, peer: str, stopping: threading.Event) -> None:
    buffer = bytearray()
    with stream:
        stream.settimeout(IDLE_TIMEOUT)
        while not stopping.is_set():
            try:
                head = _read_head(stream, buffer)
            except BadRequest as exc:
                response = exc.response()
                _send_response(stream, response, keep_alive=False)
                return
            if head is None:
                return
            try:
                request = parse_request(head)
            except BadRequest as exc:
                _send_response(stream, exc.response(), keep_alive=False)
                return
            response = respond(request, root)
            keep_alive = request.keep_alive and not stopping.is_set()
            sent = _send_response(stream, response, keep_alive)
            request_line = f"{request.method} {request.target} {request.version}"
            access_log.info('%s "%s" %d %d', peer, request_line, response.status, sent)
            if not keep_alive:
                return


class _Connections:
    """The sockets being served, so that a stop can cut the idle ones short."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def discard(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)

    def __len__(self) -> int:
        return len(self._sockets)

    def cut(self) -> None:
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def _connection(
    sock: socket.socket,
    address: tuple[str, int],
    *,
    context: ssl.SSLContext,
    root: Path,
    stopping: threading.Event,
    active: _Connections,
) -> None:
    peer = f"{address[0]}:{address[1]}"
    active.add(sock)
    try:
        sock.settimeout(HANDSHAKE_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream = wrap_socket(sock, context, server_side=True)
        _handle(stream, root, peer, stopping)
    except (OSError, KTLSError, ssl.SSLError) as exc:  # peer went away, timed out, or broke TLS
        log.info("%s: %s", peer, exc)
        sock.close()
    finally:
        active.discard(sock)


def _worker(config: ServeConfig, context: ssl.SSLContext, listener: socket.socket) -> None:
    """Accept until stopped; each connection on a pool thread."""
    stopping = threading.Event()

    def stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes accept()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    root = config.root.resolve()
    listener.settimeout(0.5)
    active = _Connections()
    pool = concurrent.futures.ThreadPoolExecutor(config.threads, thread_name_prefix="ktls-serve")
    while not stopping.is_set():
        try:
            sock, address = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            if stopping.is_set():
                break
            raise
        pool.submit(_connection, sock, address, context=context, root=root, stopping=stopping, active=active)
    listener.close()
    # Graceful stop: responses in flight finish (bounded), idle keep-alive connections are cut.
    deadline = time.monotonic() + STOP_GRACE
    while len(active) and time.monotonic() < deadline:
        time.sleep(0.05)
    active.cut()
    pool.shutdown(wait=True, cancel_futures=True)


def _banner(config: ServeConfig, certificate: SessionCertificate | None, out: TextIO) -> None:
    host = f"[{config.bind}]" if ":" in config.bind else config.bind
    support = probe()
    print(f"ktls serve: {config.root.resolve()} at https://{host}:{config.port}/", file=out)
    if support.available:
        print(f"kernel TLS: yes ({support.kernel_release}); file bodies go out with sendfile", file=out)
    else:
        print(f"kernel TLS: no — serving over userspace TLS ({support.ulp_error})", file=out)
    if certificate is not None:
        print(f"certificate: {certificate.origin}", file=out)
        print(f"  SHA-256 fingerprint {certificate.fingerprint}", file=out)
    print(f"workers: {config.workers}; Ctrl-C to stop", file=out, flush=True)


def serve(config: ServeConfig, out: TextIO = sys.stdout) -> int:
    """Run the server until SIGINT/SIGTERM. Returns the exit status."""
    if not config.root.is_dir():
        print(f"ktls serve: {config.root} is not a directory", file=sys.stderr)
        return 2
    context, certificate = _context(config)
    listener = _listener(config)
    if config.port == 0:
        config.port = listener.getsockname()[1]
    _banner(config, certificate, out)
    if config.workers <= 1:
        _worker(config, context, listener)
        return 0
    children: list[int] = []
    for _ in range(config.workers):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                if children:  # the first worker keeps the parent's socket; the others bind their own
                    listener.close()
                    _worker(config, context, _listener(config))
                else:
                    _worker(config, context, listener)
            finally:
                os._exit(0)
        children.append(pid)
    listener.close()

    def forward(signum: int, frame: FrameType | None) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        while True:
            try:
                os.waitpid(child, 0)
                break
            except ChildProcessError:
                break
            except InterruptedError:
                continue
    return 0

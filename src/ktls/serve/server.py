"""``ktls serve``: an HTTPS static file server whose bytes the kernel encrypts and ``sendfile`` moves.

Shape: ``workers`` processes, each with its own listening socket on the same port (``SO_REUSEPORT``: the
kernel spreads connections across them), each one event loop serving every connection on
:mod:`ktls.asyncio` — the TLS handshake on the loop, then a kernel-TLS transport; a file body goes out with
``ktls.asyncio.sendfile`` (``os.sendfile`` on the kTLS socket), so its bytes never enter Python, and an idle
or slow connection costs a descriptor and a few kilobytes, not a thread.

Bounds, each a :class:`ServeConfig` field (and a ``ktls serve`` option) with its reason:

* ``max_connections`` per worker, handshakes included (``ktls.asyncio`` stops accepting at the limit: new
  clients wait in the listen backlog, never cost a descriptor, and are taken as connections end); capped
  below the worker's descriptor limit, which is raised to its hard maximum at start. ``accept`` failing with
  ``EMFILE``/``ENFILE`` backs off and retries, never stops the worker.
* ``handshake_timeout``: the whole TLS handshake (not per read).
* ``head_timeout``: the whole request head (and a small body to discard) once its first byte has arrived:
  a client trickling a byte at a time (slowloris) is dropped when it runs out, however it paces itself.
* ``idle_timeout``: how long a kept-alive connection may wait for its next request.
* A response must make progress: each step of it (the head, or ``SEND_CHUNK`` of a file) within
  ``send_timeout``; a client that stops reading is cut off after that.
* Buffers: a request head is at most ``MAX_HEAD`` bytes, a discarded body ``MAX_DISCARDED_BODY``; the
  stream reader pauses the socket past ``READ_LIMIT``; bodies go out by ``sendfile``, not buffers.

A file that shrinks while it is sent ends the connection (the client sees a short body, never a next
response parsed out of the wrong bytes). SIGINT/SIGTERM stop accepting, close idle connections, let
responses in flight finish (at most ``STOP_GRACE``), then exit; the parent forwards the signal to its
workers. The access log escapes every control character (:func:`ktls.serve.http.printable`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Awaitable
from typing import TextIO, TypeVar

from .. import asyncio as ktls_asyncio
from ..kernel.probe import probe
from .certificate import SessionCertificate, load_default_certificate
from .config import ServeConfig
from .http import MAX_HEAD, BadRequest, Response, parse_request, printable, respond
from .workers import connection_limit, reuseport_listener, run_workers

__all__ = ["ServeConfig", "serve"]

log = logging.getLogger("ktls.serve")
access_log = logging.getLogger("ktls.serve.access")

#: A file body goes out in steps of this many bytes, each bounded by ``send_timeout``: a client must take
#: at least this much per timeout (1 MiB / 30 s ≈ 35 KB/s) or be cut off.
SEND_CHUNK = 1024 * 1024
#: File bodies up to this size are read and written with their head, in one record (``_Connection._send``).
INLINE_BODY = 16 * 1024
#: How long a graceful stop waits for responses in flight.
STOP_GRACE = 5.0
#: The stream reader pauses the socket once this much is buffered (asyncio's default limit is 64 KiB).
READ_LIMIT = 64 * 1024
#: After our close_notify, how long a connection may wait for the client's (asyncio's default is 30 s): a
#: client that keeps its side open holds a connection slot no longer than this.
CLOSE_TIMEOUT = 5.0


_T = TypeVar("_T")

if sys.version_info >= (3, 11):

    async def _within(awaitable: Awaitable[_T], seconds: float) -> _T:
        """``asyncio.wait_for`` without its extra task per call: ``asyncio.timeout`` cancels this very task at
        the deadline (raising ``TimeoutError``, as ``wait_for`` does)."""
        async with asyncio.timeout(seconds):
            return await awaitable

else:  # pragma: no cover - Python 3.10
    _within = asyncio.wait_for


def _listener(config: ServeConfig) -> socket.socket:
    return reuseport_listener(config.bind, config.port)


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


class _Connection:
    """One client connection: its request loop, and what a graceful stop needs to know (idle or busy)."""

    def __init__(self, worker: _Worker, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.worker = worker
        self.config = worker.config
        self.reader = reader
        self.writer = writer
        self.idle = True
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"
        self._buffer = bytearray()

    async def run(self) -> None:
        try:
            while not self.worker.stopping:
                self.idle = True
                head = await self._read_head()
                if head is None:
                    return
                self.idle = False
                if not await self._serve(head):
                    return
        except (TimeoutError, asyncio.TimeoutError) as exc:  # distinct classes before Python 3.11
            # Cut off at once: a graceful close would keep reading (and dropping) what a slow client trickles.
            log.info("%s: %s", self.peer, exc or "response not sent in time")
            self.writer.transport.abort()
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            log.info("%s: %s", self.peer, printable(str(exc)))
        except Exception:
            # A bug of ours, not the client's: logged once with its traceback, and this connection cut.
            log.exception("%s: internal error; connection closed", self.peer)
            self.writer.transport.abort()
        finally:
            self.writer.close()

    async def _read_head(self) -> bytes | None:
        """The next request head; ``None`` when the client is done (or idled out before a first byte).

        Deadlines: ``idle_timeout`` for the first byte, then ``head_timeout`` for the whole head — total, so
        a client cannot stretch it by sending a byte just before each read would time out."""
        if not self._buffer:
            try:
                first = await _within(self.reader.read(READ_LIMIT), self.config.idle_timeout)
            except asyncio.TimeoutError:
                return None
            if not first:
                return None
            self._buffer += first
        deadline = time.monotonic() + self.config.head_timeout
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            if len(self._buffer) > MAX_HEAD:
                await self._refuse(BadRequest("request head too large", 431), head_only=False)
                raise ConnectionAbortedError("request head too large")
            data = await self._before(deadline, "request head")
            if not data:
                if self._buffer.strip():
                    log.info("%s: closed inside a request head", self.peer)
                return None
            self._buffer += data
        head = bytes(self._buffer[:end])
        del self._buffer[: end + 4]
        return head

    async def _before(self, deadline: float, what: str) -> bytes:
        """The next bytes from the client, or ``TimeoutError`` once ``deadline`` has passed."""
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise asyncio.TimeoutError
            return await _within(self.reader.read(READ_LIMIT), remaining)
        except asyncio.TimeoutError:
            raise TimeoutError(f"{what} not complete within {self.config.head_timeout:g} s") from None

    async def _serve(self, head: bytes) -> bool:
        """Answer one request; whether the connection stays open for the next."""
        try:
            request = parse_request(head)
        except BadRequest as exc:
            await self._refuse(exc, head_only=head.startswith(b"HEAD "))
            return False
        if request.content_length:
            await self._discard_body(request.content_length)
        response = respond(request, self.worker.root, show_hidden=self.config.show_hidden)
        keep_alive = request.keep_alive and not self.worker.stopping
        try:
            complete, sent = await self._send(response, keep_alive)
        finally:
            response.close()
        access_log.info('%s "%s" %d %d', self.peer, printable(request.request_line), response.status, sent)
        if not complete:
            log.info("%s: %s changed size while it was sent: connection closed", self.peer, request.target)
            self.writer.transport.abort()
            return False
        return keep_alive

    async def _discard_body(self, length: int) -> None:
        """Read and drop a small request body (``http.MAX_DISCARDED_BODY``) so it is never taken for a request."""
        deadline = time.monotonic() + self.config.head_timeout
        while length > len(self._buffer):
            data = await self._before(deadline, "request body")
            if not data:
                raise asyncio.IncompleteReadError(bytes(self._buffer), length)
            self._buffer += data
        del self._buffer[:length]

    async def _refuse(self, error: BadRequest, *, head_only: bool) -> None:
        access_log.info('%s "-" %d 0 (%s)', self.peer, error.status, printable(str(error)))
        response = error.response(head_only=head_only)
        self.writer.write(response.head(keep_alive=False) + (response.body if response.has_body else b""))
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await self._drained(self.config.send_timeout)

    async def _send(self, response: Response, keep_alive: bool) -> tuple[bool, int]:
        """Head, then body (a file region by sendfile, ``SEND_CHUNK`` at a time). Returns (whether the whole
        body went out, bytes of body sent). Bounded like nginx's send_timeout: each step — the head with a
        small body, or one chunk of a file — must be done within ``send_timeout``; a client that stops
        reading is cut off then, however large the file.

        A file body of at most ``INLINE_BODY`` bytes is read (one ``pread``) and goes out with its head in one
        write: one record and one ``send`` where ``sendfile`` would cost a second record, a second syscall
        and asyncio's sendfile machinery for a few pages."""
        timeout = self.config.send_timeout
        head = response.head(keep_alive)
        if response.file is None or not response.has_body:
            self.writer.write(head + (response.body if response.has_body else b""))
            await self._drained(timeout)
            return True, response.body_length
        region = response.file
        if region.length <= INLINE_BODY:
            body = os.pread(region.fd, region.length, region.offset)  # short if the file shrank
            self.writer.write(head + body)
            await self._drained(timeout)
            return len(body) == region.length, len(body)
        self.writer.write(head)
        await self._drained(timeout)
        sent = 0
        with open(region.fd, "rb", closefd=False) as file:  # the response owns the descriptor
            while sent < region.length:
                want = min(SEND_CHUNK, region.length - sent)
                step = ktls_asyncio.sendfile(self.writer.transport, file, region.offset + sent, want)
                done = await _within(step, timeout)
                sent += done
                if done < want:
                    break  # the file ended early: it shrank
        return sent == region.length, sent

    async def _drained(self, timeout: float) -> None:
        """``writer.drain()`` within ``timeout`` — skipped when the transport holds nothing unsent (the usual
        case: a write goes straight to the socket), which costs no wait and no timer."""
        if self.writer.transport.get_write_buffer_size():
            await _within(self.writer.drain(), timeout)


class _Worker:
    """One process's event loop: the server, its connections, the graceful stop."""

    def __init__(self, config: ServeConfig, context: ssl.SSLContext, listener: socket.socket) -> None:
        self.config = config
        self.context = context
        self.listener = listener
        self.root = os.fsencode(config.root.resolve())
        self.stopping = False
        self.connections: set[_Connection] = set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        limit = connection_limit(self.config.max_connections)
        server = await ktls_asyncio.start_server(
            self._client,
            sock=self.listener,
            ssl=self.context,
            ssl_handshake_timeout=self.config.handshake_timeout,
            ssl_shutdown_timeout=CLOSE_TIMEOUT,
            backlog=1024,
            limit=READ_LIMIT,
            max_connections=limit,
        )
        await stop.wait()
        self.stopping = True
        server.close()
        for connection in list(self.connections):
            if connection.idle:
                connection.writer.transport.abort()  # waiting for a request: nothing in flight is lost
        deadline = time.monotonic() + STOP_GRACE
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            connection.writer.transport.abort()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = _Connection(self, reader, writer)
        self.connections.add(connection)
        try:
            await connection.run()
        finally:
            self.connections.discard(connection)


def _worker(config: ServeConfig, context: ssl.SSLContext, listener: socket.socket) -> None:
    listener.setblocking(False)
    asyncio.run(_Worker(config, context, listener).run())


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
    run_workers(
        config.workers,
        listener,
        lambda: _listener(config),
        lambda sock: _worker(config, context, sock),
    )
    return 0

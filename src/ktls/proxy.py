"""``ktls proxy``: TLS termination whose payload never enters Python — the kernel decrypts and ``splice`` moves.

Shape: as ``ktls serve`` — ``workers`` processes with one ``SO_REUSEPORT`` listener each, one event loop per
worker on :mod:`ktls.asyncio`, so a connection costs descriptors and a few kilobytes, not a thread. Per
connection, after the TLS handshake the kernel holds the keys and two pumps run (:class:`_Relay`):

* client → backend: ``transport.splice_to(backend)`` — the kernel decrypts into a pipe, the pipe goes into the
  backend socket; control records met on the way (KeyUpdate, alerts, close_notify) go to the connection core
  (:mod:`ktls.splice`);
* backend → client: ``transport.splice_from(backend)`` — the backend's bytes go into a pipe, the pipe into the
  kTLS socket, and the kernel encrypts.

Half-close is carried both ways: the client's close_notify (or FIN) becomes ``shutdown(SHUT_WR)`` on the
backend; the backend's FIN becomes our close_notify and ``SHUT_WR``. The connection ends when both directions
have. With ``backend_tls`` the roles swap: plain TCP in, TLS (kernel) to the backend.

Bounds, each a :class:`ProxyConfig` field with its reason:

* ``max_connections`` per worker, handshakes included; more wait in the listen backlog.
* ``handshake_timeout``: the whole TLS handshake; ``connect_timeout``: reaching the backend.
* ``idle_timeout``: no byte moved either way for that long ends the connection — also what ends a client
  that stops reading, whose memory is bounded meanwhile by the two pipes (the proxy never reads ahead of a
  full pipe, so TCP's windows hold the rest back).
* SIGINT/SIGTERM stop accepting, let connections finish for at most ``stop_grace``, then cut them.

The PROXY protocol header (HAProxy's ``proxy-protocol.txt``, v1 text or v2 binary) goes to the backend before
any byte of the client's, when asked. Each connection ends with an access-log line: client, bytes each way,
duration, whether the kernel did TX/RX, and how it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import signal
import socket
import ssl
import struct
import sys
import time
from typing import Any, TextIO

from . import asyncio as ktls_asyncio
from . import splice
from .errors import StreamClosed
from .kernel.probe import probe
from .serve.certificate import SessionCertificate, load_default_certificate
from .serve.workers import connection_limit, reuseport_listener, run_workers

__all__ = ["ProxyConfig", "proxy_header", "run_proxy"]

log = logging.getLogger("ktls.proxy")
access_log = logging.getLogger("ktls.proxy.access")

#: Bytes per splice call: a pipe's worth, so one call empties what one wait made ready.
_CHUNK = splice.PIPE_SIZE
#: Descriptors per connection: the client, the backend, two pipes of two ends each, a duplicate while waiting.
_FDS_PER_CONNECTION = 8


@dataclasses.dataclass
class ProxyConfig:
    listen: tuple[str, int]
    backend: tuple[str, int]
    cert: str | None = None
    key: str | None = None
    workers: int = 1
    #: Connections per worker, handshakes included (stunnel has no default limit; HAProxy's maxconn is derived
    #: from the descriptor limit — ours is capped below it too).
    max_connections: int = 1024
    #: Seconds for a whole TLS handshake (HAProxy's ``timeout client`` is the usual bound; asyncio's 60 s).
    handshake_timeout: float = 10.0
    #: Seconds to reach the backend (stunnel's TIMEOUTconnect: 10 s).
    connect_timeout: float = 10.0
    #: Seconds with no byte moved either way (stunnel's TIMEOUTidle: 43200 s; HAProxy's examples: 30–60 s).
    idle_timeout: float = 300.0
    #: Seconds a graceful stop lets connections finish.
    stop_grace: float = 10.0
    #: ``None``, ``"v1"`` or ``"v2"``: the PROXY protocol header to the backend.
    proxy_protocol: str | None = None
    #: Plain TCP in, TLS to the backend (the kernel encrypts): ``backend_ca`` to trust (default: the system's).
    backend_tls: bool = False
    backend_ca: str | None = None
    backend_name: str | None = None


def proxy_header(version: str, source: tuple[Any, ...], destination: tuple[Any, ...]) -> bytes:
    """The PROXY protocol header (HAProxy's ``proxy-protocol.txt``) for a TCP connection ``source`` →
    ``destination`` (socket addresses): ``"v1"`` the text line, ``"v2"`` the binary block (command PROXY)."""
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if isinstance(src, ipaddress.IPv6Address) and src.ipv4_mapped and dst.version == 6:
        assert isinstance(dst, ipaddress.IPv6Address)
        if dst.ipv4_mapped:
            src, dst = src.ipv4_mapped, dst.ipv4_mapped
    if version == "v1":
        family = "TCP4" if src.version == 4 else "TCP6"
        return f"PROXY {family} {src} {dst} {source[1]} {destination[1]}\r\n".encode("ascii")
    if version != "v2":
        raise ValueError(f"PROXY protocol version {version!r}: 'v1' or 'v2'")
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    addresses = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    family_and_protocol = 0x11 if src.version == 4 else 0x21  # AF_INET/AF_INET6 over STREAM
    return signature + struct.pack("!BBH", 0x21, family_and_protocol, len(addresses)) + addresses


class _Relay:
    """One proxied connection: a kTLS transport on one side, a plain socket on the other, two splice pumps."""

    def __init__(
        self, worker: _Worker, transport: ktls_asyncio.KTLSTransport, plain: socket.socket, client: Any
    ) -> None:
        self.worker = worker
        self.transport = transport
        self.plain = plain
        self.client = client  # the client's address, for the log
        self.started = time.monotonic()
        self.last_moved = self.started
        self.from_tls = 0
        self.to_tls = 0
        self.ended = "open"

    @property
    def upstream(self) -> int:
        """Bytes client → backend."""
        return self.to_tls if self.worker.config.backend_tls else self.from_tls

    @property
    def downstream(self) -> int:
        return self.from_tls if self.worker.config.backend_tls else self.to_tls

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        pumps = [loop.create_task(self._from_tls()), loop.create_task(self._to_tls())]
        watchdog = loop.create_task(self._watchdog(pumps))
        try:
            await asyncio.gather(*pumps)
            self.ended = "closed"
            self.transport.close()
        except asyncio.CancelledError:
            self.transport.abort()
            if not self.ended.startswith("idle"):  # not our watchdog: the worker is stopping
                self.ended = "cut at stop"
                raise
        except Exception as exc:
            self.ended = f"error: {type(exc).__name__}: {exc}"
            self.transport.abort()
        finally:
            watchdog.cancel()
            for task in pumps:
                task.cancel()
            self.plain.close()
            self._log()

    async def _from_tls(self) -> None:
        """TLS side → plain side; at the TLS side's end, FIN to the plain side."""
        fd = self.plain.fileno()
        while moved := await self.transport.splice_to(fd, _CHUNK):
            self.from_tls += moved
            self.last_moved = time.monotonic()
        with contextlib.suppress(OSError):
            self.plain.shutdown(socket.SHUT_WR)

    async def _to_tls(self) -> None:
        """Plain side → TLS side; at the plain side's end, close_notify and FIN to the TLS side."""
        fd = self.plain.fileno()
        try:
            while moved := await self.transport.splice_from(fd, _CHUNK):
                self.to_tls += moved
                self.last_moved = time.monotonic()
        except StreamClosed:
            # TLS 1.2: the peer's close_notify was answered with ours at once (RFC 5246 §7.2.1), which ends
            # this direction too; what the plain side still sends has nowhere to go.
            return
        self.transport.write_eof()

    async def _watchdog(self, pumps: list[asyncio.Task[None]]) -> None:
        timeout = self.worker.config.idle_timeout
        while True:
            remaining = self.last_moved + timeout - time.monotonic()
            if remaining <= 0:
                self.ended = f"idle for {timeout:g} s"
                for task in pumps:
                    task.cancel()
                return
            await asyncio.sleep(remaining)

    def _log(self) -> None:
        host = self.client[0] if isinstance(self.client, tuple) else str(self.client)
        access_log.info(
            "%s up=%d down=%d %.3fs kernel_tx=%s kernel_rx=%s %s",
            host,
            self.upstream,
            self.downstream,
            time.monotonic() - self.started,
            "yes" if self.transport.kernel_tx else "no",
            "yes" if self.transport.kernel_rx else "no",
            self.ended,
        )


class _Paused(asyncio.Protocol):
    """The transport's protocol during a relay: reading stays paused (the pumps splice instead); the end of
    the TLS side keeps the connection open, so the other direction can finish (half-close)."""

    def __init__(self, on_made: Any = None) -> None:
        self.on_made = on_made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        if self.on_made is not None:
            self.on_made(transport)

    def eof_received(self) -> bool:
        return True


class _Worker:
    """One process's event loop: the listener, its connections, the graceful stop."""

    def __init__(self, config: ProxyConfig, context: ssl.SSLContext, listener: socket.socket) -> None:
        self.config = config
        self.context = context
        self.listener = listener
        self.tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        limit = connection_limit(self.config.max_connections, _FDS_PER_CONNECTION)
        if self.config.backend_tls:
            acceptor = loop.create_task(self._accept_plain(limit))
            await stop.wait()
            acceptor.cancel()
            self.listener.close()
        else:
            server = await ktls_asyncio.create_server(
                lambda: _Paused(self._tls_client),
                sock=self.listener,
                ssl=self.context,
                ssl_handshake_timeout=self.config.handshake_timeout,
                ssl_shutdown_timeout=self.config.stop_grace,
                backlog=1024,
                max_connections=limit,
            )
            await stop.wait()
            server.close()
            loop.call_later(self.config.stop_grace, server.abort_clients)
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=self.config.stop_grace)
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=1.0)

    def _start(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- TLS in, plain to the backend --------------------------------------------------------------------------

    def _tls_client(self, transport: asyncio.Transport) -> None:
        assert isinstance(transport, ktls_asyncio.KTLSTransport)
        self._start(self._serve_tls_client(transport))

    async def _serve_tls_client(self, transport: ktls_asyncio.KTLSTransport) -> None:
        client = transport.get_extra_info("peername")
        try:
            backend = await self._connect_backend()
        except OSError as exc:
            access_log.info("%s backend %s:%d unreachable: %s", client and client[0], *self.config.backend, exc)
            transport.close()  # nothing was relayed: a clean close_notify
            return
        try:
            if self.config.proxy_protocol:
                header = proxy_header(self.config.proxy_protocol, client, transport.get_extra_info("sockname"))
                await asyncio.get_running_loop().sock_sendall(backend, header)
        except OSError:
            backend.close()
            transport.abort()
            return
        await _Relay(self, transport, backend, client).run()
        splice.release(transport)

    async def _connect_backend(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        host, port = self.config.backend
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.wait_for(loop.sock_connect(sock, address), self.config.connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            sock.close()
            if isinstance(exc, OSError):
                raise
            raise TimeoutError(f"no answer within {self.config.connect_timeout:g} s") from None
        return sock

    # -- plain in, TLS to the backend ---------------------------------------------------------------------------

    async def _accept_plain(self, limit: int) -> None:
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(limit)
        while True:
            await slots.acquire()
            try:
                conn, address = await loop.sock_accept(self.listener)
            except OSError as exc:
                slots.release()
                log.warning("accept: %s", exc)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            self._start(self._serve_plain_client(conn, address, slots))

    async def _serve_plain_client(self, conn: socket.socket, client: Any, slots: asyncio.Semaphore) -> None:
        try:
            try:
                tls = await self._connect_tls_backend(conn, client)
            except (OSError, ssl.SSLError, asyncio.TimeoutError) as exc:
                access_log.info("%s TLS backend %s:%d failed: %s", client[0], *self.config.backend, exc)
                conn.close()
                return
            await _Relay(self, tls, conn, client).run()
            splice.release(tls)
        finally:
            slots.release()

    async def _connect_tls_backend(self, conn: socket.socket, client: Any) -> ktls_asyncio.KTLSTransport:
        loop = asyncio.get_running_loop()
        sock = await self._connect_backend()
        try:
            if self.config.proxy_protocol:
                await loop.sock_sendall(sock, proxy_header(self.config.proxy_protocol, client, conn.getsockname()))
            transport, _ = await ktls_asyncio.create_connection(
                _Paused,
                sock=sock,
                ssl=self.context,
                server_hostname=self.config.backend_name or self.config.backend[0],
                ssl_handshake_timeout=self.config.handshake_timeout,
            )
        except BaseException:
            sock.close()
            raise
        assert isinstance(transport, ktls_asyncio.KTLSTransport)
        return transport


def _context(config: ProxyConfig) -> tuple[ssl.SSLContext, SessionCertificate | None]:
    if config.backend_tls:
        context = ssl.create_default_context(cafile=config.backend_ca)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context, None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if config.cert is not None:
        context.load_cert_chain(config.cert, config.key)
        return context, None
    certificate = load_default_certificate()
    context.load_cert_chain(certificate.cert_path, certificate.key_path)
    return context, certificate


def _listener(config: ProxyConfig) -> socket.socket:
    return reuseport_listener(*config.listen)


def _worker(config: ProxyConfig, context: ssl.SSLContext, listener: socket.socket) -> None:
    asyncio.run(_Worker(config, context, listener).run())


def _banner(config: ProxyConfig, certificate: SessionCertificate | None, out: TextIO) -> None:
    host, port = config.listen
    shown = f"[{host}]" if ":" in host else host
    inbound, outbound = ("tcp", "tls") if config.backend_tls else ("tls", "tcp")
    print(f"ktls proxy: {inbound}://{shown}:{port} -> {outbound}://{config.backend[0]}:{config.backend[1]}", file=out)
    support = probe()
    if support.available:
        print(f"kernel TLS: yes ({support.kernel_release}); payload moves by splice", file=out)
    else:
        print(f"kernel TLS: no — relaying over userspace TLS, by copy ({support.ulp_error})", file=out)
    if certificate is not None:
        print(f"certificate: {certificate.origin}", file=out)
        print(f"  SHA-256 fingerprint {certificate.fingerprint}", file=out)
    print(f"workers: {config.workers}; Ctrl-C to stop", file=out, flush=True)


def run_proxy(config: ProxyConfig, out: TextIO = sys.stdout) -> int:
    """Run the proxy until SIGINT/SIGTERM. Returns the exit status."""
    context, certificate = _context(config)
    listener = _listener(config)
    if config.listen[1] == 0:
        config.listen = (config.listen[0], listener.getsockname()[1])
    _banner(config, certificate, out)
    run_workers(
        config.workers,
        listener,
        lambda: _listener(config),
        lambda sock: _worker(config, context, sock),
    )
    return 0

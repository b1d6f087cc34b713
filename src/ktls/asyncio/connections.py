"""``create_connection`` and ``create_server`` for kernel TLS, with asyncio's signatures.

asyncio's own ``loop.create_connection``/``create_server`` cannot be reused underneath: their transports read the
socket with ``recv`` as soon as it connects, past the handshake's last record. So these functions connect,
accept and listen themselves (resolving names and binding the way ``BaseEventLoop`` does), run the handshake
(:mod:`ktls.asyncio._handshake`) and build a :class:`~ktls.asyncio.transport.KTLSTransport`.
"""

from __future__ import annotations

import asyncio
import builtins
import errno
import itertools
import logging
import socket
import ssl as _ssl
from asyncio import trsock
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..core.connection import Connection
from ..core.driver import take_over_with_keys
from ..core.handshake import Handshake
from ..core.keys import ConnectionKeys
from ._handshake import handshake, set_result_once
from .transport import KTLSTransport

__all__ = ["Server", "connect_with_keys", "create_connection", "create_server"]

log = logging.getLogger("ktls")

ProtocolFactory = Callable[[], asyncio.BaseProtocol]

#: asyncio's delay before accepting again after EMFILE/ENFILE/ENOBUFS/ENOMEM (``constants.ACCEPT_RETRY_DELAY``).
_ACCEPT_RETRY_DELAY = 1.0


def _set_nodelay(sock: socket.socket) -> None:
    """asyncio's TCP transports disable Nagle; so do we."""
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.proto in (0, socket.IPPROTO_TCP):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def _client_context(ssl: _ssl.SSLContext | bool | None) -> _ssl.SSLContext:
    if isinstance(ssl, _ssl.SSLContext):
        return ssl
    if ssl is True:
        return _ssl.create_default_context()
    raise ValueError("ktls.asyncio needs ssl= (an ssl.SSLContext, or True for the default context)")


async def _connect(  # noqa: PLR0912 - asyncio's steps, one branch each
    loop: asyncio.AbstractEventLoop,
    host: str | None,
    port: int | str | None,
    *,
    family: int,
    proto: int,
    flags: int,
    local_addr: tuple[str, int] | None,
    interleave: int | None,
    all_errors: bool,
) -> socket.socket:
    """A connected non-blocking TCP socket: each resolved address in turn (families interleaved as asyncio
    does), like ``loop.create_connection`` without happy eyeballs."""
    infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM, proto=proto, flags=flags)
    if not infos:
        raise OSError("getaddrinfo() returned empty list")
    local_infos = None
    if local_addr is not None:
        local_infos = await loop.getaddrinfo(*local_addr, family=family, type=socket.SOCK_STREAM, proto=proto)
        if not local_infos:
            raise OSError("getaddrinfo() returned empty list")
    if interleave:
        infos = _interleave(infos, interleave)
    exceptions: list[OSError] = []
    for fam, type_, proto_, _, address in infos:
        sock = socket.socket(fam, type_, proto_)
        try:
            sock.setblocking(False)
            if local_infos is not None:
                for local_family, *_, local in local_infos:
                    if local_family != fam:
                        continue
                    try:
                        sock.bind(local)
                        break
                    except OSError as exc:
                        exceptions.append(OSError(exc.errno, f"error while attempting to bind on {local!r}: {exc}"))
                else:
                    sock.close()
                    continue
            await loop.sock_connect(sock, address)
            return sock
        except OSError as exc:
            sock.close()
            exceptions.append(exc)
        except BaseException:
            sock.close()
            raise
    if all_errors:
        raise _exception_group("create_connection failed", exceptions)
    if len(exceptions) == 1 or len({str(exc) for exc in exceptions}) == 1:
        raise exceptions[0]
    raise OSError(f"Multiple exceptions: {', '.join(str(exc) for exc in exceptions)}")


def _interleave(infos: list[Any], first_family_count: int) -> list[Any]:
    """asyncio's ``_interleave_addrinfos``: alternate address families (RFC 8305 §4)."""
    by_family: dict[int, list[Any]] = {}
    for info in infos:
        by_family.setdefault(info[0], []).append(info)
    lists = list(by_family.values())
    ordered = list(lists[0][: first_family_count - 1])
    del lists[0][: first_family_count - 1]
    ordered += [info for info in itertools.chain.from_iterable(itertools.zip_longest(*lists)) if info is not None]
    return ordered


def _exception_group(message: str, exceptions: list[OSError]) -> Exception:
    group: Any = getattr(builtins, "ExceptionGroup", None)
    if group is None:  # Python 3.10
        return exceptions[0]
    result: Exception = group(message, exceptions)
    return result


async def create_connection(
    protocol_factory: ProtocolFactory,
    host: str | None = None,
    port: int | str | None = None,
    *,
    ssl: _ssl.SSLContext | bool | None = None,
    family: int = 0,
    proto: int = 0,
    flags: int = 0,
    sock: socket.socket | None = None,
    local_addr: tuple[str, int] | None = None,
    server_hostname: str | None = None,
    ssl_handshake_timeout: float | None = None,
    ssl_shutdown_timeout: float | None = None,
    happy_eyeballs_delay: float | None = None,
    interleave: int | None = None,
    all_errors: bool = False,
    session: _ssl.SSLSession | None = None,
    require_kernel: bool = False,
    rx_expect_no_pad: bool = False,
) -> tuple[KTLSTransport, asyncio.BaseProtocol]:
    """Like ``loop.create_connection`` with ``ssl=``: connect, handshake, hand the keys to the kernel.

    Returns ``(transport, protocol)``; ``transport.get_extra_info("ktls_tx")`` / ``"ktls_rx"`` tell what the
    kernel does, ``"ktls_fallback_reason"`` why not. ``require_kernel=True`` raises
    :class:`~ktls.errors.KernelTLSUnavailable` instead of falling back; ``session`` resumes a TLS session
    (``transport.get_extra_info("ssl_object").session`` of an earlier connection); ``rx_expect_no_pad`` as
    :func:`ktls.wrap_socket`'s (``transport.rx_expect_no_pad`` tells whether the kernel took it).
    ``happy_eyeballs_delay`` is accepted for compatibility; addresses are tried one after another.
    """
    loop = asyncio.get_running_loop()
    context = _client_context(ssl)
    if server_hostname is None:
        if host is None and context.check_hostname:
            raise ValueError("You must set server_hostname when using ssl without a host")
        server_hostname = host
    if sock is not None:
        if host is not None or port is not None:
            raise ValueError("host/port and sock can not be specified at the same time")
        if sock.type != socket.SOCK_STREAM:
            raise ValueError(f"A Stream Socket was expected, got {sock!r}")
        sock.setblocking(False)
    else:
        if host is None and port is None:
            raise ValueError("host and port was not specified and no sock specified")
        if happy_eyeballs_delay is not None and interleave is None:
            interleave = 1
        sock = await _connect(
            loop,
            host,
            port,
            family=family,
            proto=proto,
            flags=flags,
            local_addr=local_addr,
            interleave=interleave,
            all_errors=all_errors,
        )
    _set_nodelay(sock)
    try:
        tls, connection = await handshake(
            loop,
            sock,
            context,
            server_side=False,
            server_hostname=server_hostname,
            session=session,
            timeout=ssl_handshake_timeout,
            require_kernel=require_kernel,
            expect_no_pad=rx_expect_no_pad,
        )
    except BaseException:
        sock.close()
        raise
    return await _start_transport(loop, sock, tls, connection, protocol_factory, ssl_shutdown_timeout)


async def _start_transport(  # noqa: PLR0917 - private: the pieces both ways of starting have
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    tls: Handshake | None,
    connection: Connection,
    protocol_factory: ProtocolFactory,
    shutdown_timeout: float | None,
    early_data: bytes = b"",
) -> tuple[KTLSTransport, asyncio.BaseProtocol]:
    protocol = protocol_factory()
    transport = KTLSTransport(
        loop, sock, tls, connection, protocol, shutdown_timeout=shutdown_timeout, early_data=early_data
    )
    # connection_made runs before we return, as with asyncio (it was scheduled first).
    waiter = loop.create_future()
    loop.call_soon(set_result_once, waiter)
    try:
        await waiter
    except BaseException:
        transport.close()
        raise
    return transport, protocol


async def connect_with_keys(
    protocol_factory: ProtocolFactory,
    sock: socket.socket,
    keys: ConnectionKeys,
    *,
    server_side: bool,
    tx_seq: int,
    rx_seq: int,
    tx_explicit_nonce: int | None = None,
    early_data: bytes = b"",
    ssl_shutdown_timeout: float | None = None,
) -> tuple[KTLSTransport, asyncio.BaseProtocol]:
    """Bring your own keys (:meth:`ktls.Stream.from_keys` on the event loop): a connected ``sock`` whose
    handshake was done elsewhere, ``keys`` with the sequence number of the next record each way, and
    plaintext already decrypted (``early_data``, delivered first). Both directions must go to the kernel:
    raises :class:`~ktls.errors.KernelTLSUnavailable` otherwise (the socket is left to the caller).
    Returns ``(transport, protocol)`` like :func:`create_connection`."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    connection = take_over_with_keys(
        sock, keys, server_side=server_side, tx_seq=tx_seq, rx_seq=rx_seq, tx_explicit_nonce=tx_explicit_nonce
    )
    return await _start_transport(loop, sock, None, connection, protocol_factory, ssl_shutdown_timeout, early_data)


class Server(asyncio.AbstractServer):
    """A listening kernel-TLS server, as ``loop.create_server`` returns (``asyncio.AbstractServer``)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sockets: list[socket.socket],
        protocol_factory: ProtocolFactory,
        context: _ssl.SSLContext,
        *,
        backlog: int,
        ssl_handshake_timeout: float | None,
        ssl_shutdown_timeout: float | None,
        require_kernel: bool,
        rx_expect_no_pad: bool = False,
        max_connections: int | None = None,
    ) -> None:
        self._loop = loop
        self._sockets: list[socket.socket] | None = sockets
        self._protocol_factory = protocol_factory
        self._context = context
        self._backlog = backlog
        self._handshake_timeout = ssl_handshake_timeout
        self._shutdown_timeout = ssl_shutdown_timeout
        self._require_kernel = require_kernel
        self._rx_expect_no_pad = rx_expect_no_pad
        self._serving = False
        self._serving_forever_fut: asyncio.Future[None] | None = None
        self._transports: set[KTLSTransport] = set()
        self._handshakes: set[asyncio.Task[None]] = set()
        self._waiters: list[asyncio.Future[None]] = []
        #: At most this many connections (handshakes in flight + open transports); at the limit the server
        #: stops accepting — new connections wait in the listen backlog — until one ends.
        self._max_connections = max_connections
        self._at_limit = False

    @property
    def connection_count(self) -> int:
        """Connections of this server now: handshakes in flight and open transports."""
        return len(self._handshakes) + len(self._transports)

    def __repr__(self) -> str:
        return f"<ktls.asyncio.Server sockets={self.sockets!r}>"

    # -- bookkeeping (called by the transports) ----------------------------------------------------------------

    def _attach(self, transport: KTLSTransport) -> None:
        self._transports.add(transport)

    def _detach(self, transport: KTLSTransport) -> None:
        self._transports.discard(transport)
        self._below_limit()
        self._wakeup_if_done()

    def _below_limit(self) -> None:
        """A connection ended: accept again if the limit had stopped us."""
        if self._at_limit and self._max_connections is not None and self.connection_count < self._max_connections:
            self._at_limit = False
            for listener in self._sockets or ():
                self._resume_accepting(listener)

    def _wakeup_if_done(self) -> None:
        if self._sockets is None and not self._transports and not self._handshakes:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    # -- accepting ------------------------------------------------------------------------------------------------

    def _start_listening(self) -> None:
        if self._serving or self._sockets is None:
            return
        self._serving = True
        for sock in self._sockets:
            sock.listen(self._backlog)
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(self._backlog):
            if self._max_connections is not None and self.connection_count >= self._max_connections:
                self._at_limit = True
                for each in self._sockets or ():
                    self._loop.remove_reader(each.fileno())
                return
            try:
                conn, _address = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors or memory: stop accepting for a moment, as asyncio does.
                    log.warning("ktls.asyncio: accept() failed: %s; retrying in %.0f s", exc, _ACCEPT_RETRY_DELAY)
                    self._loop.remove_reader(listener.fileno())
                    self._loop.call_later(_ACCEPT_RETRY_DELAY, self._resume_accepting, listener)
                    return
                raise
            conn.setblocking(False)
            _set_nodelay(conn)
            task = self._loop.create_task(self._serve_connection(conn))
            self._handshakes.add(task)
            task.add_done_callback(self._handshake_done)

    def _resume_accepting(self, listener: socket.socket) -> None:
        if self._serving and self._sockets is not None and listener in self._sockets and not self._at_limit:
            self._loop.add_reader(listener.fileno(), self._accept, listener)

    def _handshake_done(self, task: asyncio.Task[None]) -> None:
        self._handshakes.discard(task)
        self._below_limit()
        self._wakeup_if_done()

    async def _serve_connection(self, conn: socket.socket) -> None:
        try:
            tls, connection = await handshake(
                self._loop,
                conn,
                self._context,
                server_side=True,
                server_hostname=None,
                timeout=self._handshake_timeout,
                require_kernel=self._require_kernel,
                expect_no_pad=self._rx_expect_no_pad,
            )
        except asyncio.CancelledError:
            conn.close()
            raise
        except (OSError, _ssl.SSLError, ValueError) as exc:
            # asyncio logs failed server handshakes only in debug mode; the client was told by an alert.
            log.debug("ktls.asyncio: TLS handshake with a client failed: %r", exc)
            conn.close()
            return
        except BaseException:
            conn.close()
            raise
        try:
            protocol = self._protocol_factory()
        except BaseException as exc:
            conn.close()
            self._loop.call_exception_handler(
                {"message": "protocol_factory() failed for a kernel-TLS connection", "exception": exc}
            )
            return
        KTLSTransport(self._loop, conn, tls, connection, protocol, server=self, shutdown_timeout=self._shutdown_timeout)

    # -- asyncio.AbstractServer -------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop listening; connections already accepted stay open (as with asyncio)."""
        sockets, self._sockets = self._sockets, None
        if sockets is None:
            return
        for sock in sockets:
            if self._serving:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._serving = False
        if self._serving_forever_fut is not None and not self._serving_forever_fut.done():
            self._serving_forever_fut.cancel()
            self._serving_forever_fut = None
        self._wakeup_if_done()

    def close_clients(self) -> None:
        """Close every connection (close_notify, then close), as Python 3.13's ``Server.close_clients``."""
        for transport in list(self._transports):
            transport.close()

    def abort_clients(self) -> None:
        """Abort every connection and every handshake in progress."""
        for transport in list(self._transports):
            transport.abort()
        for task in list(self._handshakes):
            task.cancel()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    @property
    def sockets(self) -> tuple[Any, ...]:
        if self._sockets is None:
            return ()
        return tuple(trsock.TransportSocket(s) for s in self._sockets)

    async def start_serving(self) -> None:
        self._start_listening()
        await asyncio.sleep(0)

    async def serve_forever(self) -> None:
        if self._serving_forever_fut is not None:
            raise RuntimeError(f"server {self!r} is already being awaited on serve_forever()")
        if self._sockets is None:
            raise RuntimeError(f"server {self!r} is closed")
        self._start_listening()
        self._serving_forever_fut = self._loop.create_future()
        try:
            await self._serving_forever_fut
        except asyncio.CancelledError:
            try:
                self.close()
                await self.wait_closed()
            finally:
                raise
        finally:
            self._serving_forever_fut = None

    async def wait_closed(self) -> None:
        """Wait until the server is closed and every connection (and handshake) has ended (Python 3.12+)."""
        if self._sockets is None and not self._transports and not self._handshakes:
            return
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append(waiter)
        await waiter


async def _bind(  # noqa: PLR0912 - asyncio's steps, one branch each
    loop: asyncio.AbstractEventLoop,
    host: str | Sequence[str] | None,
    port: int | None,
    *,
    family: int,
    flags: int,
    reuse_address: bool | None,
    reuse_port: bool | None,
    keep_alive: bool | None,
) -> list[socket.socket]:
    """Bound (not yet listening) sockets for every address of ``host``, as ``BaseEventLoop.create_server``."""
    hosts: Iterable[str | None]
    if host == "":
        hosts = [None]
    elif isinstance(host, str) or host is None:
        hosts = [host]
    else:
        hosts = host
    infos: set[Any] = set()
    for one in hosts:
        infos.update(await loop.getaddrinfo(one, port, family=family, type=socket.SOCK_STREAM, flags=flags))
    if reuse_address is None:
        reuse_address = True
    sockets: list[socket.socket] = []
    try:
        for fam, type_, proto, _, address in sorted(infos, key=lambda info: (info[0], str(info[4]))):
            sock = socket.socket(fam, type_, proto)
            sockets.append(sock)
            if reuse_address:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, True)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, True)
            if keep_alive:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, True)
            if fam == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, True)
            try:
                sock.bind(address)
            except OSError as err:
                raise OSError(
                    err.errno, f"error while attempting to bind on address {address!r}: {(err.strerror or '').lower()}"
                ) from None
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    if not sockets:
        raise OSError("getaddrinfo() returned empty list")
    return sockets


async def create_server(
    protocol_factory: ProtocolFactory,
    host: str | Sequence[str] | None = None,
    port: int | None = None,
    *,
    ssl: _ssl.SSLContext | None = None,
    family: int = socket.AF_UNSPEC,
    flags: int = socket.AI_PASSIVE,
    sock: socket.socket | None = None,
    backlog: int = 100,
    reuse_address: bool | None = None,
    reuse_port: bool | None = None,
    keep_alive: bool | None = None,
    ssl_handshake_timeout: float | None = None,
    ssl_shutdown_timeout: float | None = None,
    start_serving: bool = True,
    require_kernel: bool = False,
    max_connections: int | None = None,
    rx_expect_no_pad: bool = False,
) -> Server:
    """Like ``loop.create_server`` with ``ssl=``: each accepted connection does its handshake on the loop, then
    the kernel takes over and ``protocol_factory()`` gets a :class:`~ktls.asyncio.transport.KTLSTransport`.

    A connection whose handshake fails (or, with ``require_kernel=True``, that the kernel cannot take) is closed
    and logged at debug level, as asyncio does. ``max_connections`` (a ktls addition): at most that many
    connections at once, handshakes included; at the limit the server stops accepting until one ends, so
    new clients wait in the listen backlog instead of costing descriptors.
    """
    if not isinstance(ssl, _ssl.SSLContext):
        raise TypeError("ktls.asyncio.create_server needs ssl= an ssl.SSLContext")
    loop = asyncio.get_running_loop()
    if sock is not None:
        if host is not None or port is not None:
            raise ValueError("host/port and sock can not be specified at the same time")
        if sock.type != socket.SOCK_STREAM:
            raise ValueError(f"A Stream Socket was expected, got {sock!r}")
        sock.setblocking(False)
        sockets = [sock]
    else:
        sockets = await _bind(
            loop,
            host,
            port,
            family=family,
            flags=flags,
            reuse_address=reuse_address,
            reuse_port=reuse_port,
            keep_alive=keep_alive,
        )
    server = Server(
        loop,
        sockets,
        protocol_factory,
        ssl,
        backlog=backlog,
        ssl_handshake_timeout=ssl_handshake_timeout,
        ssl_shutdown_timeout=ssl_shutdown_timeout,
        require_kernel=require_kernel,
        max_connections=max_connections,
        rx_expect_no_pad=rx_expect_no_pad,
    )
    if start_serving:
        await server.start_serving()
    return server

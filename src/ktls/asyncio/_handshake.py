"""The TLS handshake on the event loop, then the hand-off to the kernel (:mod:`ktls.handoff`'s steps).

The handshake is :class:`ktls.handshake.Handshake` driven the way the blocking driver drives it — peek at what
has arrived and offer OpenSSL every whole record (``Handshake.offer``/``take_offered``), or finish the current
record exactly (``bytes_needed``) — with ``loop.sock_recv``/``loop.sock_sendall`` on the non-blocking socket,
so the loop never blocks and the kernel starts at a record boundary. ``ssl_handshake_timeout`` bounds it like asyncio's
own (60 s by default, ``ConnectionAbortedError`` when it runs out).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import socket
import ssl

from .. import handoff
from ..errors import KernelTLSFailure, KernelTLSUnavailable
from ..handshake import Handshake, HandshakeResult
from ..kernel import syscalls
from ..keys import ConnectionKeys

__all__ = ["DEFAULT_HANDSHAKE_TIMEOUT", "DEFAULT_SHUTDOWN_TIMEOUT", "Connection", "handshake"]

#: asyncio's defaults (``asyncio.constants.SSL_HANDSHAKE_TIMEOUT``, ``SSL_SHUTDOWN_TIMEOUT``).
DEFAULT_HANDSHAKE_TIMEOUT = 60.0
DEFAULT_SHUTDOWN_TIMEOUT = 30.0


@dataclasses.dataclass
class Connection:
    """A finished handshake and what the kernel took of it."""

    sock: socket.socket
    handshake: Handshake
    keys: ConnectionKeys | None
    result: HandshakeResult | None
    installed: handoff.Installed | None
    fallback_reason: str | None
    deferred: handoff.DeferredReceive | None


async def _drive(loop: asyncio.AbstractEventLoop, sock: socket.socket, hs: Handshake) -> None:
    """The blocking driver's loop (``ktls.stream._drive_handshake``), awaiting instead of blocking."""
    try:
        while True:
            complete = hs.step()
            await _consume(loop, sock, hs.take_offered())
            if out := hs.data_to_send():
                await loop.sock_sendall(sock, out)
            if complete:
                return
            await _receive_records(loop, sock, hs)
    except ssl.SSLError:
        # OpenSSL wrote an alert saying why; the peer deserves to see it (best effort, never blocking).
        if out := hs.data_to_send():
            try:
                sock.send(out)
            except OSError:
                pass
        raise


async def _receive_records(loop: asyncio.AbstractEventLoop, sock: socket.socket, hs: Handshake) -> None:
    """Every whole record that has arrived, peeked at and offered to OpenSSL; else the rest of one record."""
    if hs.can_offer:
        while True:
            try:
                arrived = sock.recv(Handshake.PEEK_SIZE, socket.MSG_PEEK)
                break
            except (BlockingIOError, InterruptedError):
                await _readable(loop, sock)
        if arrived and hs.offer(arrived):
            return
    hs.receive(await loop.sock_recv(sock, hs.bytes_needed()))


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    waiter: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not waiter.done():
            waiter.set_result(None)

    loop.add_reader(sock.fileno(), ready)
    try:
        await waiter
    finally:
        loop.remove_reader(sock.fileno())


async def _consume(loop: asyncio.AbstractEventLoop, sock: socket.socket, count: int) -> None:
    """Read and drop ``count`` bytes already peeked at (they are in the socket)."""
    while count > 0:
        data = await loop.sock_recv(sock, count)
        if not data:
            raise ssl.SSLEOFError(ssl.SSL_ERROR_EOF, "the socket lost bytes it had shown")
        count -= len(data)


def _ulp_attached(sock: socket.socket) -> bool:
    try:
        return bool(syscalls.get_ulp(sock))
    except OSError:
        return True  # cannot tell: assume the worst


async def handshake(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    context: ssl.SSLContext,
    *,
    server_side: bool,
    server_hostname: str | None,
    session: ssl.SSLSession | None = None,
    timeout: float | None = None,
    require_kernel: bool = False,
) -> Connection:
    """Run the handshake on the non-blocking connected ``sock``, then hand the keys to the kernel.

    On failure the socket is left open: the caller closes it.
    """
    timeout = DEFAULT_HANDSHAKE_TIMEOUT if timeout is None else timeout
    capture, reason = handoff.begin(context, require_kernel=require_kernel)
    keys: ConnectionKeys | None = None
    result: HandshakeResult | None = None
    try:
        with capture.handshake() if capture is not None else contextlib.nullcontext() as claim:
            hs = Handshake(
                context,
                server_side=server_side,
                server_hostname=server_hostname,
                session=session,
                on_client_random=claim.bind if claim is not None else None,
            )
            await asyncio.wait_for(_drive(loop, sock, hs), timeout)
            try:
                if claim is not None:
                    keys, result = handoff.derive_keys(hs, claim, server_side=server_side)
            except KernelTLSUnavailable as exc:
                if require_kernel:
                    raise
                reason = str(exc)
    except asyncio.TimeoutError:
        raise ConnectionAbortedError(
            f"SSL handshake is taking longer than {timeout} seconds: aborting the connection"
        ) from None
    installed: handoff.Installed | None = None
    deferred: handoff.DeferredReceive | None = None
    if keys is not None and result is not None:
        try:
            installed = handoff.install(sock, keys, result, server_side=server_side)
        except KernelTLSFailure as exc:
            # ENOTCONN: the peer half-closed (or reset) right after its last handshake record, and the kernel
            # attaches its TLS layer only to an established connection. Nothing was given to the kernel, so
            # user space carries on with what the peer sent. (handoff.install is learning to say this itself.)
            if require_kernel or exc.errno != errno.ENOTCONN or _ulp_attached(sock):
                raise
            reason = f"the kernel could not take over: {exc}"
        else:
            reason = installed.fallback_reason
            if installed.rx_deferred:
                deferred = handoff.DeferredReceive(keys)
    if require_kernel and not (installed and installed.kernel_tx and (installed.kernel_rx or installed.rx_deferred)):
        raise KernelTLSUnavailable(None, reason or "the kernel did not take over")
    return Connection(sock, hs, keys, result, installed, reason, deferred)

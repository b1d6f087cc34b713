"""The handshake on the event loop: :mod:`ktls.core.driver`'s requests carried out with the loop's socket calls.

The driver is the blocking front end's (peek at what has arrived and offer OpenSSL every whole record, or
finish the current record exactly), so the kernel starts at a record boundary; here each request awaits
``loop.sock_recv``/``loop.sock_sendall`` on the non-blocking socket, so the loop never blocks.
``ssl_handshake_timeout`` bounds it like asyncio's own (60 s by default, ``ConnectionAbortedError`` when it
runs out); a handshake cut short releases its key-log claim (the driver's generator is closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import sys
from collections.abc import Awaitable, Generator
from typing import TypeVar

from ..core import driver
from ..core.connection import Connection
from ..core.handshake import Handshake

__all__ = ["DEFAULT_HANDSHAKE_TIMEOUT", "DEFAULT_SHUTDOWN_TIMEOUT", "handshake"]

#: asyncio's defaults (``asyncio.constants.SSL_HANDSHAKE_TIMEOUT``, ``SSL_SHUTDOWN_TIMEOUT``).
DEFAULT_HANDSHAKE_TIMEOUT = 60.0
DEFAULT_SHUTDOWN_TIMEOUT = 30.0

_T = TypeVar("_T")


async def run(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, steps: Generator[driver.IORequest, bytes | None, _T]
) -> _T:
    """Carry out a driver's requests on the non-blocking ``sock`` (:func:`ktls.core.driver.run`, awaiting)."""
    answer: bytes | None = None
    try:
        while True:
            request = steps.send(answer)
            answer = None
            if isinstance(request, driver.Send):
                if request.best_effort:
                    with contextlib.suppress(OSError):
                        sock.send(request.data)
                else:
                    await loop.sock_sendall(sock, request.data)
            elif isinstance(request, driver.Peek):
                answer = await _peek(loop, sock, request.size)
            else:
                answer = await loop.sock_recv(sock, request.size)
    except StopIteration as done:
        result: _T = done.value
        return result
    finally:
        steps.close()


async def _peek(loop: asyncio.AbstractEventLoop, sock: socket.socket, size: int) -> bytes:
    while True:
        try:
            return sock.recv(size, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            waiter: asyncio.Future[None] = loop.create_future()
            loop.add_reader(sock.fileno(), set_result_once, waiter)
            try:
                await waiter
            finally:
                loop.remove_reader(sock.fileno())


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
    expect_no_pad: bool = False,
) -> tuple[Handshake, Connection]:
    """Run the handshake on the non-blocking connected ``sock``, then hand the keys to the kernel.

    On failure the socket is left open: the caller closes it.
    """
    timeout = DEFAULT_HANDSHAKE_TIMEOUT if timeout is None else timeout
    steps = driver.establish(
        context,
        server_side=server_side,
        server_hostname=server_hostname,
        session=session,
        require_kernel=require_kernel,
    )
    try:
        established = await _within(run(loop, sock, steps), timeout)
    except asyncio.TimeoutError:
        raise ConnectionAbortedError(
            f"SSL handshake is taking longer than {timeout} seconds: aborting the connection"
        ) from None
    connection = driver.take_over(sock, established, expect_no_pad=expect_no_pad, require_kernel=require_kernel)
    return established.handshake, connection


if sys.version_info >= (3, 11):

    async def _within(awaitable: Awaitable[_T], seconds: float) -> _T:
        """``asyncio.wait_for`` without a task of its own: ``asyncio.timeout`` cancels the awaiting task."""
        async with asyncio.timeout(seconds):
            return await awaitable

else:  # pragma: no cover - Python 3.10
    _within = asyncio.wait_for


def set_result_once(waiter: asyncio.Future[None]) -> None:
    """Wake ``waiter`` (a reader callback may run again before the awaiting task does)."""
    if not waiter.done():
        waiter.set_result(None)

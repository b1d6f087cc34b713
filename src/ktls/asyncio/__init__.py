"""asyncio on kernel TLS: streams, transports, servers, and zero-copy ``loop.sendfile`` over TLS.

The names and keywords are asyncio's::

    reader, writer = await ktls.asyncio.open_connection(host, port, ssl=context, server_hostname=...)
    server = await ktls.asyncio.start_server(client_connected_cb, host, port, ssl=context)
    server = await ktls.asyncio.create_server(protocol_factory, host, port, ssl=context)
    transport, protocol = await ktls.asyncio.create_connection(protocol_factory, host, port, ssl=context)
    await loop.sendfile(writer.transport, file)       # os.sendfile: zero-copy, encrypted by the kernel

The TLS handshake runs on the loop with Python's ``ssl`` (never blocking it); then the kernel takes the keys
and the transport is a plain socket transport whose every record the kernel protects
(:class:`KTLSTransport`). When the kernel cannot take over, the same transport runs TLS in user space over
the handshake's ``SSLObject`` and ``get_extra_info("ktls_fallback_reason")`` says why; ``require_kernel=True``
raises :class:`~ktls.errors.KernelTLSUnavailable` instead. :class:`EventLoop` routes a framework's own
``loop.create_server(..., ssl=context)`` here (aiohttp, uvicorn).
"""

from __future__ import annotations

import asyncio
from typing import IO, Any

from .connections import Server, connect_with_keys, create_connection, create_server
from .loop import EventLoop, new_event_loop
from .streams import open_connection, start_server
from .transport import KTLSTransport

__all__ = [
    "EventLoop",
    "KTLSTransport",
    "Server",
    "connect_with_keys",
    "create_connection",
    "create_server",
    "new_event_loop",
    "open_connection",
    "sendfile",
    "start_server",
]


async def sendfile(
    transport: asyncio.WriteTransport, file: IO[bytes], offset: int = 0, count: int | None = None
) -> int:
    """``loop.sendfile`` that is zero-copy for a :class:`KTLSTransport` on every loop (uvloop included), and
    asyncio's ``loop.sendfile`` for any other transport."""
    if isinstance(transport, KTLSTransport):
        return await transport.sendfile(file, offset, count)
    loop: Any = asyncio.get_running_loop()
    sent: int = await loop.sendfile(transport, file, offset, count)
    return sent

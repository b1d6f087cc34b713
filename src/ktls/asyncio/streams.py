"""``open_connection`` and ``start_server`` for kernel TLS: asyncio's streams over :class:`KTLSTransport`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from .connections import Server, create_connection, create_server

__all__ = ["open_connection", "start_server"]

ClientConnected = Callable[[asyncio.StreamReader, asyncio.StreamWriter], "Awaitable[None] | None"]

#: asyncio.streams._DEFAULT_LIMIT
_DEFAULT_LIMIT = 2**16


class _StreamProtocol(asyncio.StreamReaderProtocol):
    """``StreamReaderProtocol``, except that a TLS 1.3 close_notify only ends reading.

    asyncio's protocol closes the connection on EOF whenever the transport reports an ``sslcontext``, because
    its own SSL transport cannot half-close. Ours can: in TLS 1.3 the peer's close_notify closes only the
    peer's direction (RFC 8446 §6.1), so the writer stays usable, as on a plain TCP stream. TLS 1.2 closes.
    """

    _ktls_transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._ktls_transport = transport
        super().connection_made(transport)

    def eof_received(self) -> bool:
        super().eof_received()
        transport = self._ktls_transport
        sslobj = transport.get_extra_info("ssl_object") if transport is not None else None
        return sslobj is not None and sslobj.version() == "TLSv1.3"


async def open_connection(
    host: str | None = None, port: int | str | None = None, *, limit: int = _DEFAULT_LIMIT, **kwds: Any
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Like ``asyncio.open_connection(host, port, ssl=ctx, ...)``, over kernel TLS (same keywords as
    :func:`~ktls.asyncio.create_connection`)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = _StreamProtocol(reader, loop=loop)
    transport, _ = await create_connection(lambda: protocol, host, port, **kwds)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer


async def start_server(
    client_connected_cb: ClientConnected,
    host: str | None = None,
    port: int | None = None,
    *,
    limit: int = _DEFAULT_LIMIT,
    **kwds: Any,
) -> Server:
    """Like ``asyncio.start_server(cb, host, port, ssl=ctx, ...)``, over kernel TLS (same keywords as
    :func:`~ktls.asyncio.create_server`)."""
    loop = asyncio.get_running_loop()

    def factory() -> asyncio.StreamReaderProtocol:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        return _StreamProtocol(reader, client_connected_cb, loop=loop)

    return await create_server(factory, host, port, **kwds)

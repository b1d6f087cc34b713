"""An event loop whose TLS servers and connections are kernel TLS: glue for frameworks (aiohttp, uvicorn).

Frameworks call ``loop.create_server(factory, host, port, ssl=context)`` themselves. On :class:`EventLoop`,
a selector loop, those calls with an ``ssl.SSLContext`` go to :func:`ktls.asyncio.create_server` /
:func:`~ktls.asyncio.create_connection`; everything else is asyncio's. So::

    web.run_app(app, ssl_context=context, loop=ktls.asyncio.new_event_loop())     # aiohttp
    uvicorn app:app --loop ktls.asyncio:new_event_loop --ssl-keyfile k --ssl-certfile c   # uvicorn ≥ 0.36

and ``web.FileResponse``/``loop.sendfile`` become zero-copy: the loop's own ``sendfile`` takes its native
path for kernel-TLS transports.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any

from .connections import create_connection, create_server

__all__ = ["EventLoop", "new_event_loop"]


class EventLoop(asyncio.SelectorEventLoop):
    """``asyncio.SelectorEventLoop`` with kernel TLS behind ``create_server``/``create_connection(ssl=...)``."""

    async def create_server(  # type: ignore[override]
        self, protocol_factory: Any, host: Any = None, port: Any = None, *, ssl: Any = None, **kwargs: Any
    ) -> asyncio.AbstractServer:
        if not isinstance(ssl, _ssl.SSLContext) or kwargs.get("family") == socket.AF_UNIX:
            return await super().create_server(protocol_factory, host, port, ssl=ssl, **kwargs)
        return await create_server(protocol_factory, host, port, ssl=ssl, **kwargs)

    async def create_connection(  # type: ignore[override]
        self, protocol_factory: Any, host: Any = None, port: Any = None, *, ssl: Any = None, **kwargs: Any
    ) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
        if ssl is None or ssl is False:
            return await super().create_connection(protocol_factory, host, port, ssl=ssl, **kwargs)
        return await create_connection(protocol_factory, host, port, ssl=ssl, **kwargs)


_ssl = ssl


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new :class:`EventLoop` (a loop factory for ``asyncio.Runner``, ``uvicorn --loop``, ``web.run_app``)."""
    return EventLoop()

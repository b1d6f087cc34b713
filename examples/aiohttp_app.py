"""aiohttp on kernel TLS: ``web.run_app`` with ``ktls.asyncio.EventLoop``, files served with zero-copy sendfile.

``python examples/aiohttp_app.py DIR --port 8443 --cert cert.pem --key key.pem``. Nothing in the app changes:
the event loop routes ``create_server(..., ssl=context)`` to ktls, so aiohttp's ``FileResponse`` gets a
transport on which ``loop.sendfile`` works (asyncio refuses it on its own SSL transports).
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
from pathlib import Path

from aiohttp import web

import ktls.asyncio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--port", type=int, default=8443)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)

    async def file(request: web.Request) -> web.FileResponse:
        name = request.match_info["name"]
        if "/" in name or name.startswith("."):
            raise web.HTTPNotFound()
        return web.FileResponse(args.directory / name)

    app = web.Application()
    app.router.add_get("/{name}", file)
    loop = ktls.asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    web.run_app(app, host="127.0.0.1", port=args.port, ssl_context=context, loop=loop, print=print)


if __name__ == "__main__":
    main()

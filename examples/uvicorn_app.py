"""An ASGI app served by uvicorn over kernel TLS: uvicorn's ``--loop`` takes ktls's event loop.

``python examples/uvicorn_app.py --port 8443 --cert cert.pem --key key.pem``, or from the shell::

    uvicorn uvicorn_app:app --loop ktls.asyncio:new_event_loop --ssl-certfile cert.pem --ssl-keyfile key.pem

(uvicorn ≥ 0.36 accepts a loop factory by name). The app answers every GET with a short text.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn


async def app(
    scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]
) -> None:
    if scope["type"] != "http":
        return
    body = b"hello from uvicorn on kernel TLS\n"
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8443)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        loop="ktls.asyncio:new_event_loop",
        ssl_certfile=args.cert,
        ssl_keyfile=args.key,
        log_level="warning",
    )


if __name__ == "__main__":
    main()

"""An asyncio HTTPS server on kernel TLS that sends one file with zero-copy ``loop.sendfile``.

``python examples/asyncio_sendfile_server.py FILE --port 8443 --cert cert.pem --key key.pem``.
asyncio's own SSL transports refuse ``loop.sendfile`` and copy through Python; a ktls transport is a plain
socket transport whose records the kernel encrypts, so ``os.sendfile`` works.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl

import ktls.asyncio


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file")
    parser.add_argument("--port", type=int, default=8443)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        size = os.path.getsize(args.file)
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n".encode())
        with open(args.file, "rb") as file:
            await ktls.asyncio.sendfile(writer.transport, file)  # loop.sendfile, zero-copy on kernel TLS
        writer.close()
        await writer.wait_closed()

    server = await ktls.asyncio.start_server(respond, "127.0.0.1", args.port, ssl=context)
    print(f"serving {args.file} on https://127.0.0.1:{args.port}/", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())

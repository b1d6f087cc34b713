"""Helpers for the asyncio tests: contexts, running coroutines with a deadline, a hash-checking echo service."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import ssl
from collections.abc import Coroutine
from typing import Any, TypeVar

from certs import CertFiles
from support import contexts

T = TypeVar("T")

MIB = 1024 * 1024


def run(coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
    """Run ``coro`` on a fresh default (selector) loop, failing instead of hanging."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def digest(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


async def hash_service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads ``<upload size>\\n<download size>\\n``, then the upload; answers with the upload's SHA-256 line,
    then ``download size`` random bytes followed by their SHA-256 line; then closes."""
    upload_size = int(await reader.readline())
    download_size = int(await reader.readline())
    hasher = hashlib.sha256()
    remaining = upload_size
    while remaining:
        chunk = await reader.read(min(remaining, 1 << 20))
        if not chunk:
            raise ConnectionError("upload ended early")
        hasher.update(chunk)
        remaining -= len(chunk)
    writer.write(hasher.hexdigest().encode() + b"\n")
    payload = os.urandom(download_size)
    view = memoryview(payload)
    for start in range(0, len(payload), 1 << 20):
        writer.write(view[start : start + (1 << 20)])
        await writer.drain()
    writer.write(digest(payload).encode() + b"\n")
    await writer.drain()
    writer.close()
    await writer.wait_closed()


async def hash_client(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upload: int, download: int
) -> tuple[bool, bool]:
    """The other end of :func:`hash_service`: (upload intact at the server, download intact here)."""
    payload = os.urandom(upload)
    writer.write(f"{upload}\n{download}\n".encode())
    view = memoryview(payload)
    for start in range(0, len(payload), 1 << 20):
        writer.write(view[start : start + (1 << 20)])
        await writer.drain()
    upload_ok = (await reader.readline()).strip().decode() == digest(payload)
    received = await reader.readexactly(download)
    download_ok = (await reader.readline()).strip().decode() == digest(received)
    assert await reader.read() == b""
    writer.close()
    await writer.wait_closed()
    return upload_ok, download_ok


async def exchange(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, upload: int, download: int, *, require_kernel: bool
) -> dict[str, Any]:
    """One asyncio client ↔ asyncio server connection through :func:`hash_service`; what each end saw."""
    import ktls.asyncio

    seen: list[asyncio.BaseTransport] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(writer.transport)
        await hash_service(reader, writer)

    server = await ktls.asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_ctx, require_kernel=require_kernel)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await ktls.asyncio.open_connection(
        "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost", require_kernel=require_kernel
    )
    client = writer.transport
    first = {"tx": client.get_extra_info("ktls_tx"), "rx": client.get_extra_info("ktls_rx")}
    upload_ok, download_ok = await hash_client(reader, writer, upload, download)
    server.close()
    await server.wait_closed()

    def info(transport: asyncio.BaseTransport) -> dict[str, Any]:
        peercert = transport.get_extra_info("peercert")
        return {
            "tx": transport.get_extra_info("ktls_tx"),
            "rx": transport.get_extra_info("ktls_rx"),
            "fallback_reason": transport.get_extra_info("ktls_fallback_reason"),
            "cipher": transport.get_extra_info("cipher"),
            "peer_subject": peercert and peercert["subject"],
            "has_ssl_object": isinstance(transport.get_extra_info("ssl_object"), ssl.SSLObject),
        }

    outcome = {
        "upload_ok": upload_ok,
        "download_ok": download_ok,
        "client_at_start": first,
        "client": info(client),
        "server": info(seen[0]),
        "client_context_reported": client.get_extra_info("sslcontext") is client_ctx,
    }
    result: dict[str, Any] = json.loads(json.dumps(outcome))  # the same shape in and out of a child process
    return result


if __name__ == "__main__":
    # python aio_support.py CERT KEY TLS-VERSION UPLOAD DOWNLOAD: one exchange, its result as JSON (the TLS 1.3
    # suite comes from OPENSSL_CONF: Python's ssl has no setter for TLS 1.3 cipher suites).
    import sys

    cert_file, key_file, version_name, up, down = sys.argv[1:6]
    files = CertFiles(__import__("pathlib").Path(cert_file), __import__("pathlib").Path(key_file))
    server_context, client_context = contexts(files, ssl.TLSVersion[version_name])
    outcome = run(exchange(server_context, client_context, int(up), int(down), require_kernel=True))
    print(json.dumps(outcome))

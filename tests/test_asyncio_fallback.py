"""The ktls.asyncio API wherever it runs: over userspace TLS when the kernel cannot take over (our hosts have no
CONFIG_TLS; a TLS 1.2 CBC suite has no kernel cipher on any kernel), and over the kernel in the guests.

Each test holds in both modes; where a test is about the fallback itself it uses the CBC suite.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest

import ktls.asyncio
from aio_support import MIB, digest, exchange, hash_service, run
from certs import CertFiles
from ktls.errors import KernelTLSUnavailable
from ktls.kernel import probe
from support import contexts

CBC = "ECDHE-RSA-AES128-SHA256"  # TLS 1.2 CBC: no kernel AEAD, so userspace TLS on every kernel
KERNEL = probe().available


def open_sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return count


@pytest.mark.parametrize(
    ("version", "ciphers"),
    [(ssl.TLSVersion.TLSv1_3, None), (ssl.TLSVersion.TLSv1_2, None), (ssl.TLSVersion.TLSv1_2, CBC)],
    ids=["TLSv1.3", "TLSv1.2", "TLSv1.2-CBC"],
)
def test_round_trip_and_extra_info(rsa_cert: CertFiles, version: ssl.TLSVersion, ciphers: str | None) -> None:
    server_ctx, client_ctx = contexts(rsa_cert, version, ciphers)
    before = open_sockets()
    outcome = run(exchange(server_ctx, client_ctx, 2 * MIB + 5, MIB + 7, require_kernel=False))
    assert outcome["upload_ok"]
    assert outcome["download_ok"]
    kernel = KERNEL and ciphers is None
    for end in ("client", "server"):
        info = outcome[end]
        assert info["tx"] is kernel
        assert info["rx"] is kernel
        assert info["has_ssl_object"]
        if not kernel:
            assert info["fallback_reason"]
            assert (
                ("CONFIG_TLS" in info["fallback_reason"])
                if not KERNEL
                else ("does not accept" in info["fallback_reason"])
            )
    assert outcome["client"]["peer_subject"] == [[["commonName", "localhost"]]]
    assert outcome["client_context_reported"]
    assert open_sockets() <= before


class Collector(asyncio.BufferedProtocol):
    """A BufferedProtocol with a small buffer; can pause itself after each delivery."""

    def __init__(self, pause_each: bool = False) -> None:
        self.buf = bytearray(1000)
        self.data = bytearray()
        self.pause_each = pause_each
        self.transport: Any = None
        self.eof = asyncio.get_running_loop().create_future()
        self.lost = asyncio.get_running_loop().create_future()
        self.deliveries_while_paused = 0
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        if self.paused:
            self.deliveries_while_paused += 1
        self.data += self.buf[:nbytes]
        if self.pause_each:
            self.paused = True
            self.transport.pause_reading()
            asyncio.get_running_loop().call_later(0.001, self.resume)

    def resume(self) -> None:
        self.paused = False
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        self.eof.set_result(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


@pytest.mark.parametrize("pause_each", [False, True], ids=["streaming", "pausing"])
def test_buffered_protocol_and_pause_reading(rsa_cert: CertFiles, pause_each: bool) -> None:
    server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3)
    payload = os.urandom(300_000)

    async def main() -> Collector:
        async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(payload)
            writer.close()
            await writer.wait_closed()

        server = await ktls.asyncio.start_server(send, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        transport, protocol = await ktls.asyncio.create_connection(
            lambda: Collector(pause_each), "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost"
        )
        assert isinstance(protocol, Collector)
        await protocol.eof
        assert await protocol.lost is None
        assert transport.is_closing()
        server.close()
        await server.wait_closed()
        return protocol

    protocol = run(main())
    assert digest(protocol.data) == digest(payload)
    assert protocol.deliveries_while_paused == 0


def test_write_eof_is_a_tls13_half_close(rsa_cert: CertFiles) -> None:
    server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3)

    async def main() -> bytes:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            data = await reader.read()
            writer.write(b"got " + str(len(data)).encode())
            writer.close()
            await writer.wait_closed()

        server = await ktls.asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await ktls.asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost"
        )
        writer.write(b"x" * 100_000)
        writer.write_eof()
        answer_bytes = await reader.read()
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return answer_bytes

    assert run(main()) == b"got 100000"


def test_ragged_eof_is_distinguishable(rsa_cert: CertFiles) -> None:
    """A TCP FIN without close_notify ends the stream (like asyncio's SSL transport) and ``ragged_eof`` says so."""
    server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3)

    async def main() -> tuple[bytes, bool]:
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]

        def rude_server() -> None:
            conn, _ = listener.accept()
            with listener, server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"partial")
                tls.shutdown(socket.SHUT_RDWR)  # FIN, no close_notify

        task = asyncio.get_running_loop().run_in_executor(None, rude_server)
        reader, writer = await ktls.asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost"
        )
        data = await reader.read()
        await task
        ragged = writer.transport.ragged_eof  # type: ignore[attr-defined]
        writer.close()
        await writer.wait_closed()
        return data, ragged

    assert run(main()) == (b"partial", True)


def test_require_kernel_raises_a_typed_error(rsa_cert: CertFiles) -> None:
    server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_2, CBC)

    async def main() -> None:
        server = await ktls.asyncio.start_server(hash_service, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(KernelTLSUnavailable):
            await ktls.asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost", require_kernel=True
            )
        server.close()
        await server.wait_closed()

    run(main())


def test_handshake_timeout_and_failures(rsa_cert: CertFiles, ecdsa_cert: CertFiles) -> None:
    """A silent server: ConnectionAbortedError after ``ssl_handshake_timeout``. A certificate the client does
    not trust: ``ssl.SSLCertVerificationError``, and the server drops the connection. No socket leaks."""
    server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3)
    _, other_client = contexts(ecdsa_cert, ssl.TLSVersion.TLSv1_3)
    before = open_sockets()

    async def main() -> None:
        with (
            socket.create_server(("127.0.0.1", 0)) as silent,
            pytest.raises(ConnectionAbortedError, match=r"longer than 0\.3 s"),
        ):
            await ktls.asyncio.open_connection(
                *silent.getsockname(), ssl=client_ctx, server_hostname="localhost", ssl_handshake_timeout=0.3
            )
        server = await ktls.asyncio.start_server(hash_service, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(ssl.SSLCertVerificationError):
            await ktls.asyncio.open_connection("127.0.0.1", port, ssl=other_client, server_hostname="localhost")
        server.close()
        await server.wait_closed()

    run(main())
    assert open_sockets() <= before


def test_loop_sendfile_and_writelines(rsa_cert: CertFiles, tmp_path: Path) -> None:
    """``loop.sendfile`` on our transport: native (``os.sendfile``) with the kernel sending, asyncio's chunked
    fallback otherwise (it needs a ``_FlowControlMixin`` transport, which ours is)."""
    server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_2, CBC)
    path = tmp_path / "file.bin"
    content = os.urandom(700_000)
    path.write_bytes(content)

    async def main() -> bytes:
        async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.writelines([b"a", b"b", b"\n"])
            with path.open("rb") as file:
                assert await asyncio.get_running_loop().sendfile(writer.transport, file, 100, 600_000) == 600_000
                assert file.tell() == 600_100
            writer.write(b"end")
            writer.close()
            await writer.wait_closed()

        server = await ktls.asyncio.start_server(send, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await ktls.asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost"
        )
        data = await reader.read()
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return data

    data = run(main())
    assert data == b"ab\n" + content[100:600_100] + b"end"


def test_max_connections_stops_accepting_at_the_limit(rsa_cert: CertFiles) -> None:
    """``create_server(max_connections=2)``: a third client waits in the backlog (its handshake does not start)
    until one of the two ends; then it is served. ``connection_count`` counts handshakes and transports."""
    server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3)

    async def main() -> None:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(100):
                writer.write(data)
            writer.close()

        server = await ktls.asyncio.start_server(echo, "127.0.0.1", 0, ssl=server_ctx, max_connections=2)
        port = server.sockets[0].getsockname()[1]

        async def client() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await ktls.asyncio.open_connection("127.0.0.1", port, ssl=client_ctx, server_hostname="localhost")

        first, second = await client(), await client()
        assert server.connection_count == 2
        third = asyncio.create_task(client())
        done, _ = await asyncio.wait({third}, timeout=1.0)
        assert not done, "a third connection was accepted past the limit"
        assert server.connection_count == 2
        first[1].close()  # one ends: the third is accepted and served
        reader, writer = await asyncio.wait_for(third, 10)
        writer.write(b"ping")
        assert await reader.read(4) == b"ping"
        for each in (second[1], writer):
            each.close()
        server.close()
        await asyncio.wait_for(server.wait_closed(), 10)

    run(main())


def test_server_api(rsa_cert: CertFiles) -> None:
    """``asyncio.AbstractServer``: sockets, is_serving, close_clients, wait_closed, serve_forever, async with."""
    server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3)

    async def main() -> None:
        connected = asyncio.Event()

        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connected.set()
            await reader.read()
            writer.close()

        server = await ktls.asyncio.start_server(hold, "127.0.0.1", 0, ssl=server_ctx, start_serving=False)
        assert not server.is_serving()
        async with server:
            serving = asyncio.create_task(server.serve_forever())
            await asyncio.sleep(0)
            assert server.is_serving()
            assert server.get_loop() is asyncio.get_running_loop()
            port = server.sockets[0].getsockname()[1]
            reader, writer = await ktls.asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost"
            )
            await connected.wait()
            server.close_clients()
            assert await reader.read() == b""
            writer.close()  # TLS 1.3: the server's close_notify ended only its direction; the server waits for ours
            serving.cancel()
            with pytest.raises(asyncio.CancelledError):
                await serving
            assert not server.is_serving()
            await asyncio.wait_for(server.wait_closed(), 10)

    run(main())


def test_event_loop_routes_ssl_to_kernel_tls(rsa_cert: CertFiles) -> None:
    """``ktls.asyncio.EventLoop``: a framework's own ``loop.create_server(..., ssl=ctx)`` and
    ``create_connection(..., ssl=ctx)`` become kernel TLS; without ``ssl`` they stay asyncio's."""
    server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, ktls.asyncio.EventLoop)
        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0, ssl=server_ctx)
        assert isinstance(server, ktls.asyncio.Server)
        port = server.sockets[0].getsockname()[1]
        transport, _ = await loop.create_connection(
            asyncio.Protocol, "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost"
        )
        assert isinstance(transport, ktls.asyncio.KTLSTransport)
        transport.close()
        plain = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        assert not isinstance(plain, ktls.asyncio.Server)
        plain.close()
        server.close()
        await server.wait_closed()

    loop = ktls.asyncio.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(main(), 60))
    finally:
        loop.close()

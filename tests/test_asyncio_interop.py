"""ktls.asyncio against peers we did not write: ``openssl s_server``/``s_client``; KeyUpdate both ways."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
from pathlib import Path

import pytest

import ktls.asyncio
from aio_support import MIB, digest, run
from certs import CertFiles
from ktls.errors import RekeyUnsupported
from ktls.kernel import KernelSupport, read_tls_stat
from support import free_port, kernel_refusal, wait_for_port

pytestmark = pytest.mark.kernel

#: (id, openssl version flag, openssl suite option, python TLS version, python TLS 1.2 cipher string)
CASES = [
    ("TLS_AES_128_GCM_SHA256", "-tls1_3", ["-ciphersuites", "TLS_AES_128_GCM_SHA256"], ssl.TLSVersion.TLSv1_3, None),
    ("TLS_AES_256_GCM_SHA384", "-tls1_3", ["-ciphersuites", "TLS_AES_256_GCM_SHA384"], ssl.TLSVersion.TLSv1_3, None),
    (
        "TLS_CHACHA20_POLY1305_SHA256",
        "-tls1_3",
        ["-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256"],
        ssl.TLSVersion.TLSv1_3,
        None,
    ),
    ("ECDHE-RSA-AES128-GCM-SHA256", "-tls1_2", ["-cipher", "ECDHE-RSA-AES128-GCM-SHA256"], ssl.TLSVersion.TLSv1_2, ""),
    ("ECDHE-RSA-CHACHA20-POLY1305", "-tls1_2", ["-cipher", "ECDHE-RSA-CHACHA20-POLY1305"], ssl.TLSVersion.TLSv1_2, ""),
]
Case = tuple[str, str, list[str], ssl.TLSVersion, "str | None"]


def context(case: Case, cert: CertFiles, *, server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    if server:
        ctx.load_cert_chain(cert.cert, cert.key)
    else:
        ctx.load_verify_locations(cert.cert)
    ctx.minimum_version = ctx.maximum_version = case[3]
    if case[3] is ssl.TLSVersion.TLSv1_2:
        ctx.set_ciphers(case[0])
    return ctx


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_asyncio_client_downloads_from_openssl_s_server(
    support: KernelSupport, case: Case, rsa_cert: CertFiles, tmp_path: Path
) -> None:
    if refusal := kernel_refusal(support, case[0]):
        pytest.skip(refusal)
    body = os.urandom(3 * MIB + 12345)
    (tmp_path / "big.bin").write_bytes(body)
    port = free_port()
    command = ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(rsa_cert.cert)]
    command += ["-key", str(rsa_cert.key), case[1], *case[2], "-WWW", "-quiet"]
    with subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as server:
        try:
            wait_for_port(port, server)

            async def main() -> tuple[bytes, asyncio.BaseTransport]:
                client_ctx = context(case, rsa_cert, server=False)
                reader, writer = await ktls.asyncio.open_connection(
                    "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost", require_kernel=True
                )
                writer.write(b"GET /big.bin HTTP/1.0\r\n\r\n")
                received = await reader.read()
                writer.close()
                await writer.wait_closed()
                return received, writer.transport

            received, transport = run(main())
        finally:
            server.kill()
    assert transport.get_extra_info("cipher")[0] == case[0]
    assert transport.get_extra_info("ktls_tx")
    assert transport.get_extra_info("ktls_rx")
    assert isinstance(transport, ktls.asyncio.KTLSTransport)
    assert not transport.ragged_eof, "s_server ends -WWW responses with close_notify"
    header, _, got = received.partition(b"\r\n\r\n")
    assert header.startswith(b"HTTP/1.0 200")
    assert digest(got) == digest(body)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_asyncio_server_with_openssl_s_client(
    support: KernelSupport, case: Case, rsa_cert: CertFiles, tmp_path: Path
) -> None:
    if refusal := kernel_refusal(support, case[0]):
        pytest.skip(refusal)
    upload = os.urandom(MIB + 777)
    download = os.urandom(2 * MIB + 4321)
    (tmp_path / "upload").write_bytes(upload)
    before = read_tls_stat() or {}
    received = bytearray()

    async def main() -> subprocess.CompletedProcess[bytes]:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            assert writer.get_extra_info("ktls_tx")
            assert writer.get_extra_info("ktls_rx")
            writer.write(download)
            received.extend(await reader.readexactly(len(upload)))
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        server = await ktls.asyncio.start_server(
            handler, "127.0.0.1", 0, ssl=context(case, rsa_cert, server=True), require_kernel=True
        )
        port = server.sockets[0].getsockname()[1]
        command = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(rsa_cert.cert), case[1]]
        command += [*case[2], "-quiet", "-servername", "localhost"]
        with (tmp_path / "upload").open("rb") as stdin:
            process = await asyncio.create_subprocess_exec(
                *command, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            stdout, stderr = await process.communicate()
        server.close()
        await server.wait_closed()
        return subprocess.CompletedProcess(command, process.returncode or 0, stdout, stderr)

    result = run(main())
    assert digest(received) == digest(upload)
    assert digest(result.stdout) == digest(download), result.stderr.decode(errors="replace")[-2000:]
    after = read_tls_stat() or {}
    assert after.get("TlsTxSw", 0) > before.get("TlsTxSw", 0)


class LineProtocol(asyncio.Protocol):
    """Collects what arrives; answers each complete line ``before``/``after`` with ``ack <line>``."""

    def __init__(self) -> None:
        self.data = b""
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.transport: ktls.asyncio.KTLSTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, ktls.asyncio.KTLSTransport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data
        while b"\n" in self.data:
            line, _, self.data = self.data.partition(b"\n")
            assert self.transport is not None
            self.transport.write(b"ack " + line + b"\n")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


async def s_client_session(port: int, cert: CertFiles, lines: list[bytes], pause: float = 1.0) -> bytes:
    """``openssl s_client`` with interactive commands (no ``-quiet``/``-ign_eof``: they turn ``k``/``K`` off)."""
    command = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(cert.cert)]
    command += ["-tls1_3", "-servername", "localhost"]
    process = await asyncio.create_subprocess_exec(
        *command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        for line in lines:
            process.stdin.write(line)
            await process.stdin.drain()
            await asyncio.sleep(pause)
    except (BrokenPipeError, ConnectionResetError):
        pass  # s_client exited: our side refused and closed
    await asyncio.sleep(pause)
    if process.returncode is None:
        try:
            process.kill()
        except ProcessLookupError:
            pass  # it exited meanwhile
    output = await process.stdout.read()
    await process.wait()
    return output


def test_peer_key_update_with_s_client(support: KernelSupport, rsa_cert: CertFiles) -> None:
    """``K``: s_client sends KeyUpdate(update_requested). ≥ 6.14: we install its new key, answer with ours
    (under the old key, then switch) and the data after it flows both ways; < 6.14: a clear typed error."""
    ctx = context(CASES[0], rsa_cert, server=True)

    async def main() -> tuple[bytes, LineProtocol]:
        protocols: list[LineProtocol] = []

        def factory() -> LineProtocol:
            protocols.append(LineProtocol())
            return protocols[-1]

        server = await ktls.asyncio.create_server(factory, "127.0.0.1", 0, ssl=ctx, require_kernel=True)
        port = server.sockets[0].getsockname()[1]
        output = await s_client_session(port, rsa_cert, [b"before\n", b"K\n", b"after\n"])
        await asyncio.wait_for(protocols[0].lost, 10)
        server.close()
        await server.wait_closed()
        return output, protocols[0]

    for _ in range(3):
        output, protocol = run(main())
        # s_client treats "K" as a command only when it reads that line alone; a loaded guest can make it
        # read two lines at once and send "K" as data. It says "KEYUPDATE" when it took the command.
        if b"KEYUPDATE" in output or not support.rekey:
            break
    assert protocol.transport is not None
    if support.rekey:
        assert b"KEYUPDATE" in output
        assert b"ack before" in output
        assert b"ack after" in output, output.decode(errors="replace")[-2000:]
        assert protocol.transport.key_updates_received == 1
        assert protocol.lost.result() is None or isinstance(protocol.lost.result(), ConnectionError)
    else:
        error = protocol.lost.result()
        assert isinstance(error, RekeyUnsupported), error
        assert "6.14" in str(error)
        assert b"ack after" not in output


def test_our_key_update_requesting_the_peers(support: KernelSupport, rsa_cert: CertFiles) -> None:
    """``transport.key_update(request_peer_update=True)``: s_client answers with its own KeyUpdate, which our
    receive side follows; data flows under both new keys."""
    ctx = context(CASES[0], rsa_cert, server=True)

    async def main() -> tuple[bytes, LineProtocol]:
        protocols: list[LineProtocol] = []

        class Rekeying(LineProtocol):
            def data_received(self, data: bytes) -> None:
                if b"rekey" in data:
                    assert self.transport is not None
                    self.transport.key_update(request_peer_update=True)
                super().data_received(data)

        def factory() -> LineProtocol:
            protocols.append(Rekeying())
            return protocols[-1]

        server = await ktls.asyncio.create_server(factory, "127.0.0.1", 0, ssl=ctx, require_kernel=True)
        port = server.sockets[0].getsockname()[1]
        # s_client answers our KeyUpdate before its next write once it has read it: "two" or, on a slow
        # guest, "three".
        output = await s_client_session(port, rsa_cert, [b"one\n", b"rekey\n", b"two\n", b"three\n"])
        await asyncio.wait_for(protocols[0].lost, 10)
        server.close()
        await server.wait_closed()
        return output, protocols[0]

    output, protocol = run(main())
    assert protocol.transport is not None
    if support.rekey:
        assert b"ack one" in output
        assert b"ack rekey" in output
        assert b"ack three" in output, output.decode(errors="replace")[-2000:]
        assert protocol.transport.key_updates_received == 1  # the peer's answer
    else:
        assert isinstance(protocol.lost.result(), RekeyUnsupported)

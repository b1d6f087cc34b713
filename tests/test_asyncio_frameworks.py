"""Frameworks on kernel TLS: an aiohttp app whose ``web.FileResponse`` goes through ``loop.sendfile`` (zero-copy
in the kernel) fetched by curl over HTTPS; ktls.asyncio on uvloop. Run everywhere: on a host without kTLS the
same code runs over the userspace fallback (and the zero-copy assertions are skipped)."""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import ktls.asyncio
from aio_support import MIB, digest, exchange
from certs import CertFiles
from ktls.kernel import probe
from support import contexts

SIZE = 5 * MIB + 999


@pytest.fixture(scope="module")
def www(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("www")
    (root / "big.bin").write_bytes(os.urandom(SIZE))
    (root / "small.txt").write_bytes(b"small file\n")
    return root


def count_sendfile(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes moved by each ``os.sendfile`` call (the loop's native sendfile path)."""
    moved: list[int] = []
    real = os.sendfile

    def spy(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        sent = real(out_fd, in_fd, offset, count)
        moved.append(sent)
        return sent

    monkeypatch.setattr(os, "sendfile", spy)
    return moved


def run_on(loop_factory: Callable[[], asyncio.AbstractEventLoop], coro: Any, timeout: float = 300) -> Any:
    loop = loop_factory()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, timeout))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def test_aiohttp_file_response_through_sendfile_fetched_by_curl(
    rsa_cert: CertFiles, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    web = pytest.importorskip("aiohttp.web")
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    moved = count_sendfile(monkeypatch)
    server_ctx, _ = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3)
    seen: list[dict[str, Any]] = []

    async def file_handler(request: Any) -> Any:
        transport = request.transport
        seen.append({"tx": transport.get_extra_info("ktls_tx"), "rx": transport.get_extra_info("ktls_rx")})
        return web.FileResponse(www / request.match_info["name"])

    async def main() -> tuple[bytes, bytes, bytes]:
        app = web.Application()
        app.router.add_get("/{name}", file_handler)
        runner = web.AppRunner(app)
        await runner.setup()
        # TCPSite calls loop.create_server(..., ssl=context): on ktls.asyncio's loop that is kernel TLS.
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
        await site.start()
        port = runner.addresses[0][1]
        out = www.parent / "fetched.bin"
        command = [curl, "-sS", "--fail", "--http1.1", "--cacert", str(rsa_cert.cert)]
        command += ["--resolve", f"localhost:{port}:127.0.0.1", f"https://localhost:{port}/big.bin", "-o", str(out)]
        command += [f"https://localhost:{port}/small.txt", "-w", "%{http_version} %{num_connects}\\n"]
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        stdout, stderr = await process.communicate()
        await runner.cleanup()
        assert process.returncode == 0, stderr.decode(errors="replace")
        return out.read_bytes(), stdout, stderr

    body, stdout, _ = run_on(ktls.asyncio.new_event_loop, main())
    assert digest(body) == digest((www / "big.bin").read_bytes())
    # -w per URL: HTTP/1.1, one connect for the first; the second file over the same connection (keep-alive
    # after sendfile), no new connect.
    assert stdout == b"1.1 1\nsmall file\n1.1 0\n"
    assert len(seen) == 2
    if probe().available:
        assert seen[0] == {"tx": True, "rx": True}
        assert sum(moved) >= SIZE, "FileResponse's bytes went through os.sendfile"
    else:
        assert seen[0] == {"tx": False, "rx": False}
        assert not moved, "on fallback the loop reads and writes (TLS is in user space)"


def test_uvloop(rsa_cert: CertFiles, www: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On uvloop: the same transports; ``loop.sendfile`` is not implemented by uvloop (NotImplementedError),
    ``ktls.asyncio.sendfile`` / ``transport.sendfile`` is zero-copy there too."""
    uvloop = pytest.importorskip("uvloop")
    server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3)
    kernel = probe().available
    outcome = run_on(uvloop.new_event_loop, exchange(server_ctx, client_ctx, MIB, 2 * MIB, require_kernel=kernel))
    assert outcome["upload_ok"]
    assert outcome["download_ok"]
    assert outcome["server"]["tx"] is kernel
    moved = count_sendfile(monkeypatch)

    async def main() -> bytes:
        async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with (www / "big.bin").open("rb") as file:
                with pytest.raises(NotImplementedError):
                    await asyncio.get_running_loop().sendfile(writer.transport, file)
                assert await ktls.asyncio.sendfile(writer.transport, file) == SIZE
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

    data = run_on(uvloop.new_event_loop, main())
    assert digest(data) == digest((www / "big.bin").read_bytes())
    assert (sum(moved) >= SIZE) is kernel

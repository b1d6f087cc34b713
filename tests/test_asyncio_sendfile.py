"""``loop.sendfile`` over kernel TLS is zero-copy: the file's bytes never enter the Python process.

Two proofs. In-process: the file object refuses every read (``read``/``readinto``/``readall`` raise), and
``os.sendfile`` — what the loop's native path calls — is counted; the peer still gets every byte, intact.
Out of process: the sending server runs under ``strace``; its system calls show ``sendfile`` from the file's
descriptor and not one read-family call (``read``, ``pread64``, ``readv``, ``preadv``, ``mmap`` …) on it.
(``/proc/self/io`` cannot tell: it counts sendfile's bytes as read too.)
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import shutil
import ssl
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, NoReturn

import pytest

import ktls.asyncio
from aio_support import MIB, digest, run
from certs import CertFiles
from ktls.kernel import KernelSupport, read_tls_stat
from support import contexts

pytestmark = pytest.mark.kernel

SIZE = 8 * MIB + 4321


class UnreadableFile(io.FileIO):
    """A file that may be sent but never read by Python."""

    def read(self, size: int | None = -1) -> NoReturn:
        raise AssertionError("the file was read into the Python process")

    def readinto(self, buffer: Any) -> NoReturn:
        raise AssertionError("the file was read into the Python process")

    def readall(self) -> NoReturn:
        raise AssertionError("the file was read into the Python process")


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sendfile") / "zero-copy.bin"
    path.write_bytes(os.urandom(SIZE))
    return path


@pytest.mark.parametrize("how", ["loop.sendfile", "ktls.asyncio.sendfile"])
def test_loop_sendfile_is_zero_copy(
    support: KernelSupport, rsa_cert: CertFiles, big_file: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3)
    calls: list[tuple[int, int]] = []
    real_sendfile = os.sendfile

    def counting_sendfile(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        sent = real_sendfile(out_fd, in_fd, offset, count)
        calls.append((in_fd, sent))
        return sent

    monkeypatch.setattr(os, "sendfile", counting_sendfile)
    offset, count = 1000, SIZE - 5000
    before = read_tls_stat() or {}

    async def main() -> tuple[bytes, int, int]:
        results: dict[str, int] = {}

        async def send_file(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"header\n")  # queued data goes first: sendfile waits for the queue to drain
            with UnreadableFile(big_file, "rb") as file:
                results["fd"] = file.fileno()
                if how == "loop.sendfile":
                    sent = await asyncio.get_running_loop().sendfile(writer.transport, file, offset, count)
                else:
                    sent = await ktls.asyncio.sendfile(writer.transport, file, offset, count)
                results["sent"] = sent
                results["position"] = file.tell()
            writer.write(b"trailer\n")
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        server = await ktls.asyncio.start_server(send_file, "127.0.0.1", 0, ssl=server_ctx, require_kernel=True)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await ktls.asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost", require_kernel=True
        )
        data = await reader.read()
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        assert results["position"] == offset + count
        return data, results["sent"], results["fd"]

    data, sent, fd = run(main())
    content = big_file.read_bytes()
    assert sent == count
    assert data[:7] == b"header\n"
    assert data[-8:] == b"trailer\n"
    assert digest(data[7:-8]) == digest(content[offset : offset + count])
    assert sum(n for in_fd, n in calls if in_fd == fd) == count, calls[:5]
    after = read_tls_stat() or {}
    assert after.get("TlsTxSw", 0) > before.get("TlsTxSw", 0)


SERVER = textwrap.dedent(
    """
    import asyncio, ssl, sys
    import ktls.asyncio

    async def main():
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(sys.argv[1], sys.argv[2])
        done = asyncio.Event()

        async def send(reader, writer):
            with open(sys.argv[3], "rb") as file:
                await asyncio.get_running_loop().sendfile(writer.transport, file)
            writer.close()
            await writer.wait_closed()
            done.set()

        server = await ktls.asyncio.start_server(send, "127.0.0.1", 0, ssl=context, require_kernel=True)
        print(server.sockets[0].getsockname()[1], flush=True)
        await done.wait()
        server.close()
        await server.wait_closed()

    asyncio.run(main())
    """
)


def test_strace_shows_no_read_of_the_file(
    support: KernelSupport, rsa_cert: CertFiles, big_file: Path, tmp_path: Path
) -> None:
    """The whole sending server under strace: the file is opened, sendfile'd, closed — never read."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (apt-get install strace)")
    trace = tmp_path / "trace.txt"
    command = [strace, "-f", "-qq", "-o", str(trace), "-e", "trace=openat,close,dup,dup2,dup3,fcntl,"
               "read,pread64,readv,preadv,preadv2,mmap,sendfile,splice,copy_file_range,io_uring_enter"]  # fmt: skip
    command += [sys.executable, "-c", SERVER, str(rsa_cert.cert), str(rsa_cert.key), str(big_file)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as server:
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())
            client = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(rsa_cert.cert)]
            client += ["-servername", "localhost", "-quiet"]
            received = subprocess.run(client, stdin=subprocess.DEVNULL, capture_output=True, timeout=300, check=False)
            server.wait(120)
        finally:
            server.kill()
    assert digest(received.stdout) == digest(big_file.read_bytes())
    file_fds: set[int] = set()
    reads: list[str] = []
    sent = 0
    name = re.escape(str(big_file))
    for line in trace.read_text().splitlines():
        call = line.split(None, 1)[1] if line[:1].isdigit() else line
        if opened := re.match(rf'openat\(.*"{name}".* = (\d+)$', call):
            file_fds.add(int(opened.group(1)))
            continue
        if closed := re.match(r"close\((\d+)\)", call):
            file_fds.discard(int(closed.group(1)))
            continue
        if transfer := re.match(r"sendfile\((\d+), (\d+),.* = (\d+)$", call):
            if int(transfer.group(2)) in file_fds:
                sent += int(transfer.group(3))
            continue
        if reader := re.match(r"(read|pread64|readv|preadv2?|splice|copy_file_range)\((\d+),", call):
            if int(reader.group(2)) in file_fds:
                reads.append(call)
            continue
        if (mapped := re.match(r"mmap\([^,]+, \d+, [^,]+, [^,]+, (\d+),", call)) and int(mapped.group(1)) in file_fds:
            reads.append(call)
    assert sent == SIZE, f"sendfile moved {sent} of {SIZE} bytes"
    assert not reads, reads[:5]

"""ktls.asyncio with the kernel doing TLS: asyncio client ↔ asyncio server, every suite, many connections,
flow control. (Guests only; the userspace path of the same API is tested on the host.)"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import ktls.asyncio
from aio_support import MIB, digest, exchange, hash_client, hash_service, run
from certs import CertFiles
from ktls.kernel import KernelSupport, read_tls_stat
from support import contexts, kernel_refusal

pytestmark = pytest.mark.kernel

#: (id, TLS version, TLS 1.2 cipher string, certificate kind)
SUITES = [
    ("TLS_AES_128_GCM_SHA256", ssl.TLSVersion.TLSv1_3, None, "rsa"),
    ("TLS_AES_256_GCM_SHA384", ssl.TLSVersion.TLSv1_3, None, "rsa"),
    ("TLS_CHACHA20_POLY1305_SHA256", ssl.TLSVersion.TLSv1_3, None, "rsa"),
    ("ECDHE-RSA-AES128-GCM-SHA256", ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-AES128-GCM-SHA256", "rsa"),
    ("ECDHE-RSA-AES256-GCM-SHA384", ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-AES256-GCM-SHA384", "rsa"),
    ("ECDHE-RSA-CHACHA20-POLY1305", ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-CHACHA20-POLY1305", "rsa"),
    ("ECDHE-ECDSA-AES128-GCM-SHA256", ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-GCM-SHA256", "ecdsa"),
]
UPLOAD, DOWNLOAD = 2 * MIB + 11, 3 * MIB + 7


def tls13_in_child(suite: str, cert: CertFiles, tmp_path: Path) -> dict[str, Any]:
    """Python's ``ssl`` cannot choose TLS 1.3 suites; OpenSSL's configuration can, for a new process."""
    conf = tmp_path / "openssl.cnf"
    conf.write_text(
        "openssl_conf = openssl_init\n[openssl_init]\nssl_conf = ssl_sect\n[ssl_sect]\n"
        f"system_default = system_default_sect\n[system_default_sect]\nCiphersuites = {suite}\n"
    )
    script = Path(__file__).with_name("aio_support.py")
    command = [sys.executable, str(script), str(cert.cert), str(cert.key), "TLSv1_3", str(UPLOAD), str(DOWNLOAD)]
    env = {**os.environ, "OPENSSL_CONF": str(conf)}
    done = subprocess.run(command, env=env, capture_output=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("suite", SUITES, ids=[s[0] for s in SUITES])
def test_client_and_server_every_suite(
    support: KernelSupport,
    suite: tuple[str, ssl.TLSVersion, str | None, str],
    rsa_cert: CertFiles,
    ecdsa_cert: CertFiles,
    tmp_path: Path,
) -> None:
    """MiBs each way, checked by hash; both ends kernel TLS in both directions; the transports' extra info."""
    name, version, ciphers, kind = suite
    if refusal := kernel_refusal(support, name):
        pytest.skip(refusal)
    cert = rsa_cert if kind == "rsa" else ecdsa_cert
    before = read_tls_stat() or {}
    if version is ssl.TLSVersion.TLSv1_3:
        outcome = tls13_in_child(name, cert, tmp_path)
    else:
        server_ctx, client_ctx = contexts(cert, version, ciphers)
        outcome = run(exchange(server_ctx, client_ctx, UPLOAD, DOWNLOAD, require_kernel=True))
    assert outcome["upload_ok"]
    assert outcome["download_ok"]
    for end in ("client", "server"):
        info = outcome[end]
        assert info["cipher"][0] == name, info
        assert info["tx"], info
        assert info["rx"], info
        assert info["fallback_reason"] is None, info
        assert info["has_ssl_object"]
    assert outcome["client"]["peer_subject"] == [[["commonName", "localhost"]]]
    assert outcome["client_context_reported"]
    if version is ssl.TLSVersion.TLSv1_3:
        # A TLS 1.3 client receives through OpenSSL until the first application record (tickets), then the kernel.
        assert outcome["client_at_start"] == {"tx": True, "rx": False}
    after = read_tls_stat() or {}
    assert after.get("TlsTxSw", 0) >= before.get("TlsTxSw", 0) + 2
    assert after.get("TlsRxSw", 0) >= before.get("TlsRxSw", 0) + 2


def test_many_connections_on_one_loop(support: KernelSupport, rsa_cert: CertFiles) -> None:
    server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3)
    count = 40

    async def main() -> None:
        server = await ktls.asyncio.start_server(hash_service, "127.0.0.1", 0, ssl=server_ctx, require_kernel=True)
        port = server.sockets[0].getsockname()[1]

        async def one(index: int) -> tuple[bool, bool]:
            reader, writer = await ktls.asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost", require_kernel=True
            )
            return await hash_client(reader, writer, 20_000 + index * 1000, 30_000 + index * 777)

        results = await asyncio.gather(*(one(i) for i in range(count)))
        assert results == [(True, True)] * count
        server.close()
        await server.wait_closed()

    fds_before = len(os.listdir("/proc/self/fd"))
    run(main(), timeout=300)
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) <= fds_before + 2, "descriptors leaked"


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["TLSv1.3", "TLSv1.2"])
def test_slow_reader_keeps_memory_bounded(support: KernelSupport, rsa_cert: CertFiles, version: ssl.TLSVersion) -> None:
    """A writer that drains and a reader that is slow: the writer's queue stays at the high-water mark, the
    reader's buffer at the StreamReader's limit (it pauses our transport), the rest waits in the kernel."""
    server_ctx, client_ctx = contexts(rsa_cert, version)
    total, chunk, limit = 6 * MIB, 64 * 1024, 64 * 1024
    largest = {"queued": 0, "buffered": 0}

    async def main() -> None:
        async def writer_side(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            block = os.urandom(chunk)
            for _ in range(total // chunk):
                writer.write(block)
                largest["queued"] = max(largest["queued"], writer.transport.get_write_buffer_size())
                await writer.drain()
            writer.close()
            await writer.wait_closed()

        server = await ktls.asyncio.start_server(writer_side, "127.0.0.1", 0, ssl=server_ctx, require_kernel=True)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await ktls.asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost", limit=limit, require_kernel=True
        )
        received = 0
        while True:
            largest["buffered"] = max(largest["buffered"], len(vars(reader)["_buffer"]))
            data = await reader.read(16 * 1024)
            if not data:
                break
            received += len(data)
            await asyncio.sleep(0.002)
        assert received == total
        assert not writer.transport.ragged_eof  # type: ignore[attr-defined]
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()

    run(main(), timeout=300)
    assert largest["queued"] <= 64 * 1024 + chunk, largest
    # StreamReader pauses at 2 × limit; one read of ours brings at most max_size more.
    assert largest["buffered"] <= 2 * limit + ktls.asyncio.KTLSTransport.max_size, largest


def test_tls13_half_close_both_ways(support: KernelSupport, rsa_cert: CertFiles) -> None:
    """TLS 1.3: the client's write_eof() (close_notify, SHUT_WR) ends only its direction; the server reads to
    the end and still answers; then the server's close_notify ends the other direction."""
    server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3)
    upload = os.urandom(MIB + 3)

    async def main() -> bytes:
        async def answer_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            data = await reader.read()  # until the client's close_notify
            writer.write(digest(data).encode())
            writer.write(os.urandom(MIB))
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        server = await ktls.asyncio.start_server(answer_after_eof, "127.0.0.1", 0, ssl=server_ctx, require_kernel=True)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await ktls.asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost", require_kernel=True
        )
        assert writer.can_write_eof()
        writer.write(upload)
        writer.write_eof()
        with pytest.raises(RuntimeError):
            writer.write(b"after write_eof")
        answer = await reader.read()
        assert not writer.transport.ragged_eof  # type: ignore[attr-defined]
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return answer

    answer = run(main())
    assert answer[:64].decode() == digest(upload)
    assert len(answer) == 64 + MIB


def test_close_notify_queued_behind_a_full_buffer(support: KernelSupport, rsa_cert: CertFiles) -> None:
    """close() while MiBs are still queued (the reader has not started): every byte, then close_notify,
    arrive — a clean end, not a ragged one."""
    server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3)
    payload = os.urandom(8 * MIB)

    async def main() -> tuple[bytes, bool]:
        closed = asyncio.Event()

        async def write_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(payload)  # far more than the socket buffers hold
            assert writer.transport.get_write_buffer_size() > 0
            writer.close()
            closed.set()
            await writer.wait_closed()

        server = await ktls.asyncio.start_server(write_and_close, "127.0.0.1", 0, ssl=server_ctx, require_kernel=True)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await ktls.asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost", require_kernel=True
        )
        await closed.wait()
        await asyncio.sleep(0.2)
        data = await reader.read()
        ragged = writer.transport.ragged_eof  # type: ignore[attr-defined]
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return data, ragged

    data, ragged = run(main())
    assert digest(data) == digest(payload)
    assert not ragged


def test_tls12_close_notify_closes_both_directions(support: KernelSupport, rsa_cert: CertFiles) -> None:
    """TLS 1.2 (RFC 5246 §7.2.1): the peer's close_notify is answered and the connection closes."""
    server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-AES128-GCM-SHA256")

    async def main() -> tuple[bytes, bytes]:
        got: list[bytes] = []

        async def reader_side(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            got.append(await reader.read())
            await writer.wait_closed()

        server = await ktls.asyncio.start_server(reader_side, "127.0.0.1", 0, ssl=server_ctx, require_kernel=True)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await ktls.asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost", require_kernel=True
        )
        writer.write(b"bye")
        writer.write_eof()
        answer = await reader.read()  # the server's close_notify in reply
        assert not writer.transport.ragged_eof  # type: ignore[attr-defined]
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return got[0], answer

    assert run(main()) == (b"bye", b"")


def test_send_key_updated_before_its_usage_limit(support: KernelSupport, rsa_cert: CertFiles) -> None:
    """RFC 8446 §5.5: near the AEAD's record limit the transport sends KeyUpdate and switches keys by itself.
    The limit is lowered to 64 records here; the peer (our client) follows each KeyUpdate."""
    if not support.rekey:
        pytest.skip("needs TLS 1.3 rekey (Linux 6.14): older kernels cannot replace the send key")
    server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3)
    payload = os.urandom(4 * MIB)

    async def main() -> tuple[bytes, int]:
        async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            transport = writer.transport
            assert isinstance(transport, ktls.asyncio.KTLSTransport)
            assert transport.record_limit is not None  # AES-GCM: 2^24 records
            transport.record_limit = 64
            for start in range(0, len(payload), 256 * 1024):
                writer.write(payload[start : start + 256 * 1024])
                await writer.drain()
            writer.close()
            await writer.wait_closed()

        server = await ktls.asyncio.start_server(send, "127.0.0.1", 0, ssl=server_ctx, require_kernel=True)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await ktls.asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost", require_kernel=True
        )
        data = await reader.read()
        transport = writer.transport
        assert isinstance(transport, ktls.asyncio.KTLSTransport)
        updates = transport.key_updates_received
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return data, updates

    data, updates = run(main())
    assert digest(data) == digest(payload)
    assert updates >= 4 * MIB // (64 * 16 * 1024) - 1, updates

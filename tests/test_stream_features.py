"""What a kernel TLS stream does beyond moving bytes, each proved on the wire with a peer we did not write.

* curl downloads from an HTTP/1.1 responder on our server stream (TLS 1.2 and 1.3, SNI, ALPN, makefile).
* Our client ↔ our server, both in the kernel: MiBs both ways, close_notify both ways, then resumption.
* Resumption of our client against ``openssl s_server -www``, whose status page says "Reused".
* KeyUpdate initiated by us against ``openssl s_server -rev`` (which answers every line reversed), and the
  automatic send-key update before the AEAD's record limit, with ``openssl s_client`` receiving.
* ``openssl s_client``'s ``R`` (TLS 1.2 renegotiation) against our server.
* ``sendfile`` of a large file: the bytes never pass through Python, and arrive intact at ``s_client``.
* Fallback for suites the kernel lacks (TLS 1.2 ARIA-GCM: Debian builds no ARIA; a CBC suite).
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ktls
from certs import CertFiles
from ktls.constants import AlertDescription
from ktls.errors import AlertReceived, KernelTLSUnavailable, RekeyUnsupported, StreamClosed
from ktls.kernel import KernelSupport, read_tls_stat
from support import Background, free_port, wait_for_port

pytestmark = pytest.mark.kernel

MIB = 1024 * 1024
TLS13, TLS12 = ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2
VERSIONS = [pytest.param(TLS13, id="1.3"), pytest.param(TLS12, id="1.2")]


def sha256(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def stat(name: str) -> int:
    return (read_tls_stat() or {}).get(name, 0)


def server_context(cert: CertFiles, version: ssl.TLSVersion, ciphers: str | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert.cert, cert.key)
    context.minimum_version = context.maximum_version = version
    if ciphers:
        context.set_ciphers(ciphers)
    return context


def client_context(cert: CertFiles, version: ssl.TLSVersion, ciphers: str | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cert.cert)
    context.minimum_version = context.maximum_version = version
    if ciphers:
        context.set_ciphers(ciphers)
    return context


def recv_exactly(stream: ktls.Stream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = stream.recv(min(65536, size - len(data)))
        assert chunk, f"EOF after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


def recv_all(stream: ktls.Stream) -> bytes:
    data = bytearray()
    while chunk := stream.recv(65536):
        data += chunk
    return bytes(data)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(60)
        yield server


def port_of(listener: socket.socket) -> int:
    port: int = listener.getsockname()[1]
    return port


def accept(listener: socket.socket) -> socket.socket:
    sock, _ = listener.accept()
    sock.settimeout(60)
    return sock


# -- curl ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_curl_downloads_from_our_server(
    support: KernelSupport, version: ssl.TLSVersion, rsa_cert: CertFiles, listener: socket.socket
) -> None:
    """A tiny HTTP/1.1 responder on our kernel stream; curl (OpenSSL inside) fetches a multi-MiB body."""
    body = os.urandom(4 * MIB + 99)
    context = server_context(rsa_cert, version)
    context.set_alpn_protocols(["http/1.1"])
    server_names: list[str | None] = []
    context.sni_callback = lambda _sock, name, _ctx: server_names.append(name)
    seen: dict[str, Any] = {}

    def respond() -> None:
        with ktls.wrap_socket(accept(listener), context, server_side=True, require_kernel=True) as stream:
            seen.update(kernel=(stream.kernel_tx, stream.kernel_rx), alpn=stream.selected_alpn_protocol())
            with stream.makefile("rb") as reader:
                seen["request"] = reader.readline()
                while reader.readline() not in (b"\r\n", b""):
                    pass
            head = f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n"
            stream.sendall(head.encode() + b"Connection: close\r\n\r\n")
            stream.sendall(body)
            recv_all(stream)  # until curl closes

    server = Background()
    server.start(respond)
    port = port_of(listener)
    flag = "--tlsv1.3" if version is TLS13 else "--tlsv1.2"
    command = ["curl", "--silent", "--show-error", "--http1.1", flag, "--tls-max", flag.removeprefix("--tlsv")]
    command += ["--cacert", str(rsa_cert.cert), "--resolve", f"localhost:{port}:127.0.0.1"]
    command += [f"https://localhost:{port}/big.bin"]
    result = subprocess.run(command, capture_output=True, timeout=120, check=False)
    server.join()
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert sha256(result.stdout) == sha256(body)
    assert seen["kernel"] == (True, True)
    assert seen["request"] == b"GET /big.bin HTTP/1.1\r\n"
    assert seen["alpn"] == "http/1.1"
    assert server_names == ["localhost"]


# -- our client ↔ our server ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_our_client_with_our_server(
    support: KernelSupport, version: ssl.TLSVersion, rsa_cert: CertFiles, listener: socket.socket
) -> None:
    """Both ends in the kernel: 2 MiB each way, close_notify each way (TLS 1.3: each side closes its own
    write side; TLS 1.2: the server answers the client's), then a second connection resuming the session."""
    server_ctx, client_ctx = server_context(rsa_cert, version), client_context(rsa_cert, version)
    upload, download = os.urandom(2 * MIB + 1), os.urandom(2 * MIB + 2)
    seen: list[dict[str, Any]] = []

    def serve() -> None:
        for _ in range(2):
            with ktls.wrap_socket(accept(listener), server_ctx, server_side=True, require_kernel=True) as stream:
                sender = Background()
                sender.start(stream.sendall, download)
                received = recv_all(stream)  # until the client's close_notify
                sender.join()
                if version is TLS13:
                    stream.shutdown(socket.SHUT_WR)  # our own close_notify
                with pytest.raises(StreamClosed):  # TLS 1.2: answered automatically, writes are over
                    stream.send(b"too late")
                seen.append(
                    {
                        "upload": sha256(received),
                        "ragged": stream.ragged_eof,
                        "reused": stream.session_reused,
                        "kernel": (stream.kernel_tx, stream.kernel_rx),
                    }
                )

    server = Background()
    server.start(serve)
    session = None
    for attempt in range(2):
        sock = socket.create_connection(listener.getsockname(), timeout=60)
        with ktls.wrap_socket(
            sock, client_ctx, server_hostname="localhost", session=session, require_kernel=True
        ) as stream:
            sender = Background()
            sender.start(stream.sendall, upload)
            assert sha256(recv_exactly(stream, len(download))) == sha256(download)
            sender.join()
            stream.shutdown(socket.SHUT_WR)  # close_notify
            assert stream.recv(100) == b""  # the server's close_notify
            assert not stream.ragged_eof
            assert (stream.kernel_tx, stream.kernel_rx) == (True, True)
            assert stream.session_reused == (attempt == 1)
            session = stream.session
            assert session is not None
    server.join()
    for attempt, record in enumerate(seen):
        assert record == {"upload": sha256(upload), "ragged": False, "reused": attempt == 1, "kernel": (True, True)}


# -- TLS_RX_EXPECT_NO_PAD -------------------------------------------------------------------------------------


def test_rx_expect_no_pad_with_a_stock_peer(
    support: KernelSupport, rsa_cert: CertFiles, listener: socket.socket
) -> None:
    """``rx_expect_no_pad=True``: the kernel takes the option (Linux ≥ 6.0), a stock ``ssl`` client's MiBs
    arrive intact, and its close_notify — a control record, which the zero-copy bet gets wrong and the kernel
    decrypts again — still ends the stream cleanly. A kernel without the option (5.10) receives as usual and
    the stream says it does not have it."""
    payload = os.urandom(2 * MIB + 5)
    background = Background()

    def peer() -> None:
        context = client_context(rsa_cert, TLS13)
        with socket.create_connection(("127.0.0.1", port_of(listener)), timeout=60) as raw:
            tls = context.wrap_socket(raw, server_hostname="localhost")
            tls.sendall(payload)
            tls.unwrap()

    background.start(peer)
    retries_before = stat("TlsDecryptRetry") + stat("TlsRxNoPadViolation")
    stream = ktls.wrap_socket(
        accept(listener), server_context(rsa_cert, TLS13), server_side=True, require_kernel=True, rx_expect_no_pad=True
    )
    with stream:
        assert stream.kernel_rx
        assert stream.rx_expect_no_pad == support.rx_expect_no_pad
        if support.rx_expect_no_pad:
            assert ktls.kernel.get_rx_expect_no_pad(stream.socket)
        assert sha256(recv_all(stream)) == sha256(payload)
        assert not stream.ragged_eof
    background.join()
    if support.rx_expect_no_pad:
        assert stat("TlsDecryptRetry") + stat("TlsRxNoPadViolation") > retries_before


# -- resumption against openssl s_server ------------------------------------------------------------------


@pytest.fixture
def s_server(request: pytest.FixtureRequest, rsa_cert: CertFiles, tmp_path: Path) -> Iterator[int]:
    """``openssl s_server`` with the extra arguments the test's parameter names, on a free port."""
    extra: list[str] = request.param
    port = free_port()
    command = ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(rsa_cert.cert)]
    command += ["-key", str(rsa_cert.key), *extra]
    with (
        (tmp_path / "s_server.log").open("wb") as log,
        subprocess.Popen(command, stdin=subprocess.PIPE, stdout=log, stderr=log) as server,
    ):
        try:
            wait_for_port(port, server)
            yield port
        finally:
            server.kill()


def fetch_status_page(port: int, context: ssl.SSLContext, session: ssl.SSLSession | None) -> tuple[str, ktls.Stream]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    with ktls.wrap_socket(sock, context, server_hostname="localhost", session=session, require_kernel=True) as stream:
        stream.sendall(b"GET / HTTP/1.0\r\n\r\n")
        page = recv_all(stream).decode(errors="replace")
    return page, stream


@pytest.mark.parametrize(
    ("s_server", "version"), [(["-www", "-tls1_3"], TLS13), (["-www", "-tls1_2"], TLS12)], indirect=["s_server"]
)
def test_resumption_with_openssl_s_server(
    support: KernelSupport, s_server: int, version: ssl.TLSVersion, rsa_cert: CertFiles
) -> None:
    """TLS 1.3: the tickets arrive after the handshake, so the client lets OpenSSL read up to the first
    application record before the kernel takes over; ``session`` must then hold a ticket."""
    context = client_context(rsa_cert, version)
    page, first = fetch_status_page(s_server, context, None)
    assert f"New, {first.version()}, Cipher is" in page
    assert first.kernel_rx
    assert not first.session_reused
    assert first.session is not None
    page, second = fetch_status_page(s_server, context, first.session)
    assert f"Reused, {second.version()}, Cipher is" in page, page[-2000:]
    assert second.session_reused
    assert (second.kernel_tx, second.kernel_rx) == (True, True)


# -- key updates ------------------------------------------------------------------------------------------


def reversed_lines(stream: ktls.Stream, lines: list[bytes]) -> None:
    """Send lines to ``s_server -rev`` and check each answer: the line reversed."""
    sender = Background()
    sender.start(stream.sendall, b"".join(lines))
    expected = b"".join(line[:-1][::-1] + b"\n" for line in lines)
    assert recv_exactly(stream, len(expected)) == expected
    sender.join()


@pytest.mark.parametrize("s_server", [["-rev", "-tls1_3"]], indirect=True)
def test_key_update_initiated_by_us(support: KernelSupport, s_server: int, rsa_cert: CertFiles) -> None:
    """``key_update(request_peer_update=True)`` mid-stream: on ≥ 6.14 the kernel switches our send key, the
    peer follows and answers with its own KeyUpdate, which we follow too; before, a typed refusal and the
    connection goes on under the old keys."""
    sock = socket.create_connection(("127.0.0.1", s_server), timeout=60)
    with ktls.wrap_socket(sock, client_context(rsa_cert, TLS13), server_hostname="localhost") as stream:
        reversed_lines(stream, [b"before the update\n"])
        assert (stream.kernel_tx, stream.kernel_rx) == (True, True)
        before = {name: stat(name) for name in ("TlsTxRekeyOk", "TlsRxRekeyOk", "TlsRxRekeyReceived")}
        lines = [os.urandom(500).hex().encode() + b"\n" for _ in range(200)]  # 200 KB each way
        if not support.rekey:
            with pytest.raises(RekeyUnsupported, match=r"6\.14"):
                stream.key_update(request_peer_update=True)
            reversed_lines(stream, lines)
            return
        stream.key_update(request_peer_update=True)
        reversed_lines(stream, lines)
        after = {name: stat(name) for name in before}
        assert after["TlsTxRekeyOk"] == before["TlsTxRekeyOk"] + 1  # ours
        assert after["TlsRxRekeyReceived"] == before["TlsRxRekeyReceived"] + 1  # s_server's answer...
        assert after["TlsRxRekeyOk"] == before["TlsRxRekeyOk"] + 1  # ...followed
        stream.key_update()  # once more, without asking: the peer just follows
        reversed_lines(stream, [b"after two updates\n"])
        assert stat("TlsTxRekeyOk") == before["TlsTxRekeyOk"] + 2


def run_s_client(
    port: int, cert: CertFiles, extra: list[str], *, merge_stderr: bool = False
) -> subprocess.Popen[bytes]:
    """``openssl s_client`` to our server; its stdout is what it received (with ``-quiet``), its stderr
    the verification messages it prints even then."""
    command = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(cert.cert)]
    command += ["-servername", "localhost", *extra]
    stderr = subprocess.STDOUT if merge_stderr else subprocess.PIPE
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)


def s_client_output(client: subprocess.Popen[bytes], stdin: bytes = b"") -> bytes:
    """Feed ``stdin`` (``-quiet`` ignores its end), return stdout once s_client exits (our close_notify)."""
    stdout, stderr = client.communicate(stdin, timeout=120)
    assert client.returncode == 0, (stderr or b"")[-2000:]
    return stdout


def test_automatic_key_update(support: KernelSupport, rsa_cert: CertFiles, listener: socket.socket) -> None:
    """With a small ``record_limit`` the stream updates its send key by itself every 50 records; the data
    after each update reaches ``openssl s_client`` intact, and the kernel counts the rekeys."""
    chunks = [os.urandom(1000) for _ in range(400)]  # one record each
    bulk = os.urandom(MIB)
    upload = os.urandom(256 * 1024)
    received = bytearray()
    limits: list[int | None] = []

    def serve() -> None:
        with ktls.wrap_socket(accept(listener), server_context(rsa_cert, TLS13), server_side=True) as stream:
            limits.append(stream.record_limit)
            if support.rekey:
                stream.record_limit = 50
            reader = Background()
            reader.start(lambda: received.extend(recv_exactly(stream, len(upload))))
            for chunk in chunks:
                stream.sendall(chunk)
            stream.sendall(bulk)
            reader.join()

    before = stat("TlsTxRekeyOk")
    server = Background()
    server.start(serve)
    client = run_s_client(port_of(listener), rsa_cert, ["-tls1_3", "-quiet"])
    stdout = s_client_output(client, upload)
    server.join()
    assert sha256(stdout) == sha256(b"".join(chunks) + bulk), stdout[-2000:]
    assert sha256(received) == sha256(upload)
    assert limits == [2**24]  # AES-GCM's RFC 8446 §5.5 limit, with margin (counted with or without rekey)
    if not support.rekey:
        return  # the limit was left alone: the without-rekey case is test_key_limit_without_rekey_closes
    # 400 small records and 64 full ones: an update every 50 (the count is an upper bound per send).
    assert stat("TlsTxRekeyOk") - before >= 8


@pytest.mark.parametrize("version", [TLS12, TLS13], ids=["tls1.2", "tls1.3"])
def test_key_limit_without_rekey_closes(
    support: KernelSupport, rsa_cert: CertFiles, tcp_pair: tuple[socket.socket, socket.socket], version: ssl.TLSVersion
) -> None:
    """Where the send key cannot be replaced (TLS 1.2; TLS 1.3 before Linux 6.14), reaching its usage limit
    closes the write side cleanly: a stock ``ssl`` peer gets every byte sent before, then close_notify; the
    next send raises ``StreamClosed`` saying why (RFC 8446 §5.5). Before, such a stream sent on unbounded."""
    if version is TLS13 and support.rekey:
        pytest.skip("this kernel replaces a TLS 1.3 send key at its limit (test_automatic_key_update)")
    ours, theirs = tcp_pair
    server_ctx = server_context(rsa_cert, version, "ECDHE-RSA-AES128-GCM-SHA256" if version is TLS12 else None)
    client_ctx = ssl.create_default_context(cafile=str(rsa_cert.cert))
    received = bytearray()
    peer_end: list[str] = []

    def peer() -> None:
        with client_ctx.wrap_socket(theirs, server_hostname="localhost") as tls:
            try:
                while data := tls.recv(65536):
                    received.extend(data)
                peer_end.append("close_notify")
            except ssl.SSLError as exc:
                peer_end.append(f"error: {exc}")

    background = Background()
    background.start(peer)
    stream = ktls.wrap_socket(ours, server_ctx, server_side=True)
    assert stream.kernel_tx
    assert stream.record_limit == 2**24
    stream.record_limit = 50
    sent = bytearray()
    refusal: StreamClosed | None = None
    for _ in range(200):
        chunk = os.urandom(1000)  # one record each
        try:
            stream.sendall(chunk)
        except StreamClosed as exc:
            refusal = exc
            break
        sent += chunk
    assert refusal is not None
    assert "usage limit" in str(refusal)
    assert 40 * 1000 <= len(sent) <= 50 * 1000
    stream.close()
    background.join()
    assert peer_end == ["close_notify"]
    assert received == sent


# -- renegotiation ----------------------------------------------------------------------------------------


def test_s_client_renegotiation_is_refused(
    support: KernelSupport, rsa_cert: CertFiles, listener: socket.socket
) -> None:
    """``R`` in ``openssl s_client -tls1_2`` sends a ClientHello under the current keys. We answer with a
    ``no_renegotiation`` warning (RFC 5746 §4.4) and would go on; OpenSSL 3 as a client then gives up with
    a fatal ``handshake_failure`` (its ssl3_read_bytes treats a refused renegotiation as fatal), which we
    report as :class:`AlertReceived`. Data flowed both ways before."""
    got_hello = threading.Event()
    outcome: dict[str, Any] = {}

    def serve() -> None:
        with ktls.wrap_socket(accept(listener), server_context(rsa_cert, TLS12), server_side=True) as stream:
            outcome["kernel"] = (stream.kernel_tx, stream.kernel_rx)
            assert recv_exactly(stream, 6) == b"hello\n"
            stream.sendall(b"welcome\n")
            got_hello.set()
            try:
                outcome["after"] = stream.recv(100)
            except AlertReceived as exc:
                outcome["error"] = exc

    server = Background()
    server.start(serve)
    # No -quiet (nor -ign_eof): they turn the R command off.
    client = run_s_client(port_of(listener), rsa_cert, ["-tls1_2", "-msg"], merge_stderr=True)
    assert client.stdin is not None
    client.stdin.write(b"hello\n")
    client.stdin.flush()
    assert got_hello.wait(60)
    client.stdin.write(b"R\n")
    client.stdin.flush()
    server.join()
    output = client.communicate(timeout=120)[0].decode(errors="replace")
    assert outcome["kernel"] == (True, True)
    assert "welcome" in output
    assert "RENEGOTIATING" in output
    assert "<<< TLS 1.2, Alert [length 0002], warning no_renegotiation" in output, output[-3000:]
    assert ">>> TLS 1.2, Alert [length 0002], fatal handshake_failure" in output, output[-3000:]
    error = outcome.get("error")
    assert isinstance(error, AlertReceived), outcome
    assert error.alert is AlertDescription.handshake_failure


# -- sendfile ---------------------------------------------------------------------------------------------


class UnreadableFile(io.FileIO):
    """A file whose bytes cannot be read through Python: only its descriptor can be used (sendfile)."""

    def read(self, size: int | None = -1) -> bytes:
        raise AssertionError("the file was read in Python")

    def readinto(self, buffer: Any) -> int:
        raise AssertionError("the file was read in Python")

    def readall(self) -> bytes:
        raise AssertionError("the file was read in Python")


def test_sendfile_goes_through_the_kernel(
    support: KernelSupport,
    rsa_cert: CertFiles,
    listener: socket.socket,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """8 MiB with ``Stream.sendfile`` (an offset and a count, like ``socket.sendfile``): ``os.sendfile`` moves
    them from the page cache into the kernel's TLS, no Python read sees them, s_client gets them intact."""
    content = os.urandom(8 * MIB)
    path = tmp_path / "big.bin"
    path.write_bytes(content)
    offset, count = 4096 + 7, 8 * MIB - 10000
    calls: list[int] = []
    real_sendfile = os.sendfile

    def spy_sendfile(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        sent = real_sendfile(out_fd, in_fd, offset, count)
        calls.append(sent)
        return sent

    monkeypatch.setattr(os, "sendfile", spy_sendfile)
    results: dict[str, Any] = {}

    def serve() -> None:
        with (
            ktls.wrap_socket(accept(listener), server_context(rsa_cert, TLS13), server_side=True) as stream,
            UnreadableFile(path, "rb") as file,
        ):
            assert stream.kernel_tx
            results["sent"] = stream.sendfile(file, offset, count)
            results["position"] = file.tell()

    before = stat("TlsTxSw")
    server = Background()
    server.start(serve)
    stdout = s_client_output(run_s_client(port_of(listener), rsa_cert, ["-tls1_3", "-quiet"]))
    server.join()
    assert results == {"sent": count, "position": offset + count}
    assert sha256(stdout) == sha256(content[offset : offset + count])
    assert sum(calls) == count  # every byte went through os.sendfile
    assert stat("TlsTxSw") == before + 1  # and the socket it went into had kernel TLS


# -- fallback -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("s_server", "cipher"),
    [
        (["-www", "-tls1_2", "-cipher", "ECDHE-ARIA128-GCM-SHA256"], "ECDHE-ARIA128-GCM-SHA256"),
        (["-www", "-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA256"], "ECDHE-RSA-AES128-SHA256"),
    ],
    ids=["ARIA-GCM", "CBC"],
    indirect=["s_server"],
)
def test_fallback_for_a_cipher_the_kernel_lacks(
    support: KernelSupport, s_server: int, cipher: str, rsa_cert: CertFiles
) -> None:
    """ARIA-GCM has a kernel cipher number but Debian's kernels do not build ARIA; CBC has none at all.
    The same stream API then runs over OpenSSL, ``fallback_reason`` names the suite, and
    ``require_kernel=True`` refuses with a typed error."""
    context = client_context(rsa_cert, TLS12, cipher)
    sock = socket.create_connection(("127.0.0.1", s_server), timeout=60)
    with ktls.wrap_socket(sock, context, server_hostname="localhost") as stream:
        assert (stream.kernel_tx, stream.kernel_rx) == (False, False)
        assert stream.fallback_reason is not None
        assert cipher in stream.fallback_reason
        stream.sendall(b"GET / HTTP/1.0\r\n\r\n")
        page = recv_all(stream).decode(errors="replace")
    assert f"Cipher is {cipher}" in page
    time.sleep(0.2)  # s_server -www serves one connection at a time
    sock = socket.create_connection(("127.0.0.1", s_server), timeout=60)
    with pytest.raises(KernelTLSUnavailable, match=cipher):
        ktls.wrap_socket(sock, context, server_hostname="localhost", require_kernel=True)
    assert sock.fileno() == -1  # wrap_socket closed it

"""ktls streams against GnuTLS's command-line peers: ``gnutls-serv`` and ``gnutls-cli`` (Debian's ``gnutls-bin``).

A second TLS implementation besides OpenSSL: it shares no code with the ``ssl`` module that ran our
handshake, so the record layer the kernel speaks is checked against GnuTLS's own, in both directions, for
every suite the two can agree on with a kernel AEAD. The suite is pinned with a GnuTLS priority string;
on our side ``set_ciphers`` pins TLS 1.2 suites and ``offer_tls13_suites`` the TLS 1.3 ones (Python cannot,
and TLS_AES_128_CCM_SHA256 is only negotiated when our side offers it).

* Our client ↔ ``gnutls-serv --echo``: the echo server is line-oriented and string-based (a NUL ends its
  buffer), so the data is random bytes written in hex, in lines; what comes back is compared by hash.
* ``gnutls-cli`` ↔ our server: random binary data both ways at once; ``gnutls-cli`` sends its stdin and
  writes what it receives to stdout — one byte per ``write(2)``, which is why its download is kept small.
  Its stdin is closed only after everything arrived, so its close_notify comes last (a TLS 1.2
  close_notify makes us answer and stop sending, RFC 5246 §7.2.1).
* Resumption: ``gnutls-cli --resume`` connects twice, the second time with the first session.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

import ktls
from certs import CertFiles
from ktls.kernel import KernelSupport
from support import Background, free_port, kernel_refusal, wait_for_port
from test_stream_interop import offer_tls13_suites

pytestmark = pytest.mark.kernel

MIB = 1024 * 1024
PEER_TIMEOUT = 120.0


@dataclasses.dataclass(frozen=True)
class Suite:
    openssl_name: str  # what Stream.cipher()[0] says
    version: ssl.TLSVersion
    gnutls_cipher: str  # GnuTLS's name in priority strings
    cert: str  # "rsa" or "ecdsa"

    @property
    def priority(self) -> str:
        if self.version is ssl.TLSVersion.TLSv1_3:
            return f"NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+{self.gnutls_cipher}"
        kx = "ECDHE-RSA" if self.cert == "rsa" else "ECDHE-ECDSA"
        return f"NORMAL:-VERS-ALL:+VERS-TLS1.2:-CIPHER-ALL:+{self.gnutls_cipher}:-KX-ALL:+{kx}"


TLS13, TLS12 = ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2
SUITES = [
    Suite("TLS_AES_128_GCM_SHA256", TLS13, "AES-128-GCM", "rsa"),
    Suite("TLS_AES_256_GCM_SHA384", TLS13, "AES-256-GCM", "rsa"),
    Suite("TLS_CHACHA20_POLY1305_SHA256", TLS13, "CHACHA20-POLY1305", "ecdsa"),
    Suite("TLS_AES_128_CCM_SHA256", TLS13, "AES-128-CCM", "ecdsa"),
    Suite("ECDHE-RSA-AES128-GCM-SHA256", TLS12, "AES-128-GCM", "rsa"),
    Suite("ECDHE-RSA-AES256-GCM-SHA384", TLS12, "AES-256-GCM", "rsa"),
    Suite("ECDHE-RSA-CHACHA20-POLY1305", TLS12, "CHACHA20-POLY1305", "rsa"),
    Suite("ECDHE-ECDSA-AES128-GCM-SHA256", TLS12, "AES-128-GCM", "ecdsa"),
    Suite("ECDHE-ECDSA-CHACHA20-POLY1305", TLS12, "CHACHA20-POLY1305", "ecdsa"),
    Suite("ECDHE-ECDSA-AES128-CCM", TLS12, "AES-128-CCM", "ecdsa"),
]
IDS = [f"{'1.3' if s.version is TLS13 else '1.2'}-{s.openssl_name}" for s in SUITES]


@pytest.fixture
def certs(rsa_cert: CertFiles, ecdsa_cert: CertFiles) -> dict[str, CertFiles]:
    return {"rsa": rsa_cert, "ecdsa": ecdsa_cert}


def context_for(suite: Suite, cert: CertFiles, *, server_side: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    if server_side:
        context.load_cert_chain(cert.cert, cert.key)
    else:
        context.load_verify_locations(cert.cert)
    context.minimum_version = context.maximum_version = suite.version
    if suite.version is TLS13:
        offer_tls13_suites(context, suite.openssl_name)
    else:
        context.set_ciphers(suite.openssl_name)
    return context


def sha256(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def hex_lines(size: int) -> bytes:
    """``size`` bytes of random hex text in lines of 1 KiB (what a line-oriented echo server can carry)."""
    text = os.urandom(size // 2).hex()
    return b"".join(text[i : i + 1023].encode() + b"\n" for i in range(0, len(text), 1023))


def log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else "(no log)"


@pytest.fixture
def gnutls_serv(
    request: pytest.FixtureRequest, certs: dict[str, CertFiles], tmp_path: Path
) -> Iterator[tuple[int, Suite]]:
    suite: Suite = request.param
    cert = certs[suite.cert]
    port = free_port()
    command = ["gnutls-serv", "--echo", "--crlf", "--disable-client-cert", "--port", str(port)]
    command += ["--priority", suite.priority, "--x509certfile", str(cert.cert), "--x509keyfile", str(cert.key)]
    with (tmp_path / "gnutls-serv.log").open("wb") as log, subprocess.Popen(command, stdout=log, stderr=log) as server:
        try:
            wait_for_port(port, server)
            yield port, suite
        finally:
            server.kill()


@pytest.mark.parametrize("gnutls_serv", SUITES, ids=IDS, indirect=True)
def test_our_client_with_gnutls_serv(
    support: KernelSupport, gnutls_serv: tuple[int, Suite], certs: dict[str, CertFiles], tmp_path: Path
) -> None:
    port, suite = gnutls_serv
    if refusal := kernel_refusal(support, suite.openssl_name):
        pytest.skip(refusal)
    context = context_for(suite, certs[suite.cert], server_side=False)
    lines = hex_lines(MIB)
    received = bytearray()
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    with ktls.wrap_socket(sock, context, server_hostname="localhost", require_kernel=True) as stream:
        assert stream.cipher() is not None
        assert (stream.cipher() or ("",))[0] == suite.openssl_name
        assert stream.kernel_tx
        threads = Background()
        threads.start(stream.sendall, lines)
        while len(received) < len(lines):
            chunk = stream.recv(65536)
            assert chunk, f"gnutls-serv closed early:\n{log_tail(tmp_path / 'gnutls-serv.log')}"
            received += chunk
        threads.join(PEER_TIMEOUT)
        assert stream.kernel_rx
    assert sha256(received) == sha256(lines)


def feed(stdin: IO[bytes], data: bytes) -> None:
    stdin.write(data)
    stdin.flush()


def run_gnutls_cli(command: list[str], upload: bytes, expect: int) -> tuple[bytes, int]:
    """Run ``gnutls-cli``: feed ``upload`` to its stdin, read its stdout; once ``expect`` bytes arrived, close
    its stdin (it then sends close_notify) and read the rest until it exits. Killed if it takes too long."""
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as cli:
        watchdog = threading.Timer(PEER_TIMEOUT, cli.kill)
        watchdog.start()
        try:
            assert cli.stdin is not None
            assert cli.stdout is not None
            stdin: IO[bytes] = cli.stdin
            writer = Background()
            writer.start(feed, stdin, upload)
            received = bytearray()
            stdout = cli.stdout
            assert isinstance(stdout, io.BufferedReader)
            while len(received) < expect and (chunk := stdout.read1(65536)):
                received += chunk
            writer.join(PEER_TIMEOUT)
            stdin.close()
            received += stdout.read()
            return bytes(received), cli.wait()
        finally:
            watchdog.cancel()


@pytest.mark.parametrize("suite", SUITES, ids=IDS)
def test_gnutls_cli_with_our_server(
    support: KernelSupport, suite: Suite, certs: dict[str, CertFiles], tmp_path: Path
) -> None:
    if refusal := kernel_refusal(support, suite.openssl_name):
        pytest.skip(refusal)
    cert = certs[suite.cert]
    context = context_for(suite, cert, server_side=True)
    # gnutls-cli writes what it receives to stdout one byte per write(2) (fputc on an unbuffered stdout):
    # ~64 KiB/s under emulation, so the download here is a few records; gnutls-serv checks MiBs of our
    # kernel's sending. It reads its stdin 4 KiB at a time: the upload can be large.
    upload, download = os.urandom(MIB + 333), os.urandom(48 * 1024 + 4321)
    received = bytearray()
    streams: list[ktls.Stream] = []

    def serve(listener: socket.socket) -> None:
        sock, _ = listener.accept()
        sock.settimeout(60)
        with ktls.wrap_socket(sock, context, server_side=True, require_kernel=True) as stream:
            streams.append(stream)
            sender = Background()
            sender.start(stream.sendall, download)
            while chunk := stream.recv(65536):
                received.extend(chunk)
            sender.join(PEER_TIMEOUT)
        # Leaving the block sent our close_notify (TLS 1.3); in TLS 1.2 it answered the client's already.

    log = tmp_path / "gnutls-cli.log"
    with socket.create_server(("127.0.0.1", 0)) as listener:
        server = Background()
        server.start(serve, listener)
        command = ["gnutls-cli", "--logfile", str(log), "--x509cafile", str(cert.cert), "--priority", suite.priority]
        command += ["-p", str(listener.getsockname()[1]), "127.0.0.1"]
        try:
            stdout, returncode = run_gnutls_cli(command, upload, len(download))
            server.join(PEER_TIMEOUT)
        except AssertionError as failure:  # gnutls-cli or our server ended early: its log and our side say why
            ours = f"our server read {len(received)} of {len(upload)} bytes"
            if streams:
                ours += f", ragged_eof={streams[0].ragged_eof}, receiving={streams[0].receiving}"
            raise AssertionError(f"{failure}\n{ours}\ngnutls-cli.log:\n{log_tail(log)}") from failure
    (stream,) = streams
    assert (stream.cipher() or ("",))[0] == suite.openssl_name
    assert (stream.kernel_tx, stream.kernel_rx) == (True, True)
    assert sha256(stdout) == sha256(download), log_tail(log)
    assert sha256(received) == sha256(upload)
    assert not stream.ragged_eof, "gnutls-cli's close_notify should have arrived"
    assert returncode == 0, log_tail(log)
    assert "Peer has closed the GnuTLS connection" in log.read_text(), log_tail(log)  # our close_notify


@pytest.mark.parametrize("version", [TLS13, TLS12], ids=["1.3", "1.2"])
def test_gnutls_cli_resumes_with_our_server(
    support: KernelSupport, version: ssl.TLSVersion, rsa_cert: CertFiles, tmp_path: Path
) -> None:
    """``gnutls-cli --resume``: a first connection, then a second one resuming its session (TLS 1.3: with
    a ticket our server sent through the hand-off). Our server hands both to the kernel and echoes."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(rsa_cert.cert, rsa_cert.key)
    context.minimum_version = context.maximum_version = version
    streams: list[ktls.Stream] = []

    def serve(listener: socket.socket) -> None:
        for _ in range(2):
            sock, _ = listener.accept()
            sock.settimeout(60)
            with ktls.wrap_socket(sock, context, server_side=True) as stream:
                streams.append(stream)
                while chunk := stream.recv(65536):
                    stream.sendall(chunk)

    log = tmp_path / "gnutls-cli.log"
    with socket.create_server(("127.0.0.1", 0)) as listener:
        server = Background()
        server.start(serve, listener)
        command = ["gnutls-cli", "--resume", "--waitresumption", "--logfile", str(log)]
        command += ["--x509cafile", str(rsa_cert.cert), "-p", str(listener.getsockname()[1]), "127.0.0.1"]
        try:
            stdout, returncode = run_gnutls_cli(command, b"ping after resumption\n", 22)
            server.join(PEER_TIMEOUT)
        finally:
            print(log_tail(log))
    first, second = streams
    assert (first.session_reused, second.session_reused) == (False, True)
    assert (second.kernel_tx, second.kernel_rx) == (True, True)
    # gnutls-cli closes its first connection as soon as it has the session: often before our server
    # attached the kernel's TLS, which the kernel allows only on an established connection.
    assert first.kernel_tx or "closed the connection before the hand-off" in str(first.fallback_reason)
    assert stdout == b"ping after resumption\n"
    assert returncode == 0, log_tail(log)
    assert "This is a resumed session" in log.read_text(), log_tail(log)

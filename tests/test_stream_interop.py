"""ktls streams against peers we did not write: ``openssl s_server`` and ``openssl s_client``.

Every byte our side sends is encrypted by the kernel and every byte it receives is decrypted by the kernel;
the peer is OpenSSL's own command-line tool, so a wrong key, sequence number or nonce cannot cancel out.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import ktls
from certs import CertFiles
from ktls.errors import RekeyUnsupported
from ktls.kernel import KernelSupport, read_tls_stat
from support import free_port, kernel_refusal, wait_for_port

pytestmark = pytest.mark.kernel

MIB = 1024 * 1024
TLS13_SUITES = [
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
    "TLS_AES_128_CCM_SHA256",  # not offered by OpenSSL by default: see offer_tls13_suites
]
TLS12_SUITES = [
    ("ECDHE-RSA-AES128-GCM-SHA256", "rsa"),
    ("ECDHE-RSA-AES256-GCM-SHA384", "rsa"),
    ("ECDHE-RSA-CHACHA20-POLY1305", "rsa"),
    ("ECDHE-ECDSA-AES128-GCM-SHA256", "ecdsa"),
    ("ECDHE-ECDSA-AES128-CCM", "ecdsa"),
    # ARIA-GCM (RFC 6209; the kernel: TLS 1.2 only, where built with CONFIG_CRYPTO_ARIA — the 7.2-all guest).
    ("ECDHE-ARIA128-GCM-SHA256", "rsa"),
    ("ECDHE-ECDSA-ARIA256-GCM-SHA384", "ecdsa"),
]
#: (id, openssl version flag, openssl suite option, python TLS version, python cipher string, cert kind)
CASES = [(s, "-tls1_3", ["-ciphersuites", s], ssl.TLSVersion.TLSv1_3, None, "rsa") for s in TLS13_SUITES] + [
    (s, "-tls1_2", ["-cipher", s], ssl.TLSVersion.TLSv1_2, s, kind) for s, kind in TLS12_SUITES
]
Case = tuple[str, str, list[str], ssl.TLSVersion, "str | None", str]


def offer_tls13_suites(context: ssl.SSLContext, suites: str) -> None:
    """Choose the TLS 1.3 suites ``context`` offers (OpenSSL's ``SSL_CTX_set_ciphersuites``).

    Python's ``ssl`` has no API for it (``set_ciphers`` is TLS 1.2 only) and OpenSSL leaves
    TLS_AES_128_CCM_SHA256 out by default, so a Python peer can only negotiate TLS 1.3 CCM when told so.
    The test reaches the context's ``SSL_CTX`` through ctypes: CPython keeps the pointer right after the
    object header. (An application would use OpenSSL's configuration instead: ``Ciphersuites = ...`` in the
    ``system_default`` section of the file named by ``OPENSSL_CONF``, which Python's contexts pick up.)
    """
    libssl = ctypes.CDLL(f"libssl.so.{ssl.OPENSSL_VERSION_INFO[0]}")
    set_ciphersuites = libssl.SSL_CTX_set_ciphersuites
    set_ciphersuites.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    set_ciphersuites.restype = ctypes.c_int
    ssl_ctx = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    assert set_ciphersuites(ssl_ctx, suites.encode()) == 1
    offered = [c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.3"]
    assert offered == suites.split(":"), f"the context offers {offered}"


def cert_for(kind: str, rsa_cert: CertFiles, ecdsa_cert: CertFiles) -> CertFiles:
    return rsa_cert if kind == "rsa" else ecdsa_cert


def client_context(case: Case, cert: CertFiles) -> ssl.SSLContext:
    _, _, _, version, ciphers, _ = case
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cert.cert)
    context.minimum_version = context.maximum_version = version
    if ciphers:
        context.set_ciphers(ciphers)
    if version is ssl.TLSVersion.TLSv1_3:
        offer_tls13_suites(context, case[0])
    return context


def server_context(case: Case, cert: CertFiles) -> ssl.SSLContext:
    _, _, _, version, ciphers, _ = case
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert.cert, cert.key)
    context.minimum_version = context.maximum_version = version
    if ciphers:
        context.set_ciphers(ciphers)
    if version is ssl.TLSVersion.TLSv1_3:
        offer_tls13_suites(context, case[0])
    return context


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("www") / "big.bin"
    path.write_bytes(os.urandom(3 * MIB + 12345))
    return path


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def s_server_www(
    request: pytest.FixtureRequest, big_file: Path, rsa_cert: CertFiles, ecdsa_cert: CertFiles
) -> Iterator[tuple[int, Case]]:
    case: Case = request.param
    cert = cert_for(case[5], rsa_cert, ecdsa_cert)
    port = free_port()
    command = ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(cert.cert), "-key", str(cert.key)]
    command += [case[1], *case[2], "-WWW", "-quiet"]
    with subprocess.Popen(command, cwd=big_file.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as server:
        try:
            wait_for_port(port, server)
            yield port, case
        finally:
            server.kill()


@pytest.mark.parametrize("s_server_www", CASES, ids=[c[0] for c in CASES], indirect=True)
def test_our_client_downloads_from_openssl_s_server(
    support: KernelSupport,
    s_server_www: tuple[int, Case],
    big_file: Path,
    rsa_cert: CertFiles,
    ecdsa_cert: CertFiles,
) -> None:
    port, case = s_server_www
    if refusal := kernel_refusal(support, case[0]):
        pytest.skip(refusal)
    context = client_context(case, cert_for(case[5], rsa_cert, ecdsa_cert))
    # The wait_for_port probe was one connection; this is the real one.
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    with ktls.wrap_socket(sock, context, server_hostname="localhost", require_kernel=True) as stream:
        assert stream.kernel_tx
        assert stream.fallback_reason is None
        assert stream.cipher() is not None
        assert (stream.cipher() or ("",))[0] == case[0]
        stream.sendall(b"GET /big.bin HTTP/1.0\r\n\r\n")
        received = bytearray()
        while chunk := stream.recv(65536):
            received += chunk
        assert stream.kernel_rx, "the kernel should have taken over receiving"
        assert not stream.ragged_eof, "s_server ends -WWW responses with close_notify"
    header, _, body = bytes(received).partition(b"\r\n\r\n")
    assert header.startswith(b"HTTP/1.0 200")
    assert sha256(body) == sha256(big_file.read_bytes())


@pytest.mark.parametrize("s_server_www", CASES, ids=[c[0] for c in CASES], indirect=True)
def test_suite_the_kernel_refuses_falls_back(
    support: KernelSupport,
    s_server_www: tuple[int, Case],
    big_file: Path,
    rsa_cert: CertFiles,
    ecdsa_cert: CertFiles,
) -> None:
    """Where this kernel refuses the suite (5.10: ChaCha20-Poly1305; all but 7.2-all: ARIA), the connection
    stays in userspace TLS, says why, and works; with require_kernel it is refused with the same reason."""
    port, case = s_server_www
    refusal = kernel_refusal(support, case[0])
    if refusal is None:
        pytest.skip(f"{support.kernel_release} takes {case[0]}: the tests above run it in the kernel")
    context = client_context(case, cert_for(case[5], rsa_cert, ecdsa_cert))
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    with ktls.wrap_socket(sock, context, server_hostname="localhost") as stream:
        assert not stream.kernel_tx
        assert not stream.kernel_rx
        label = "TLSv1.3" if case[3] is ssl.TLSVersion.TLSv1_3 else "TLSv1.2"
        assert stream.fallback_reason == f"this kernel does not accept {case[0]} ({label})"
        stream.sendall(b"GET /big.bin HTTP/1.0\r\n\r\n")
        received = bytearray()
        while chunk := stream.recv(65536):
            received += chunk
    _, _, body = bytes(received).partition(b"\r\n\r\n")
    assert sha256(body) == sha256(big_file.read_bytes())
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    with pytest.raises(ktls.KernelTLSUnavailable, match=f"does not accept {case[0]}"):
        ktls.wrap_socket(sock, context, server_hostname="localhost", require_kernel=True)
    sock.close()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_our_server_with_openssl_s_client(
    support: KernelSupport, case: Case, rsa_cert: CertFiles, ecdsa_cert: CertFiles, tmp_path: Path
) -> None:
    if refusal := kernel_refusal(support, case[0]):
        pytest.skip(refusal)
    cert = cert_for(case[5], rsa_cert, ecdsa_cert)
    context = server_context(case, cert)
    upload = os.urandom(MIB + 777)
    download = os.urandom(2 * MIB + 4321)
    (tmp_path / "upload").write_bytes(upload)
    received = bytearray()
    errors: list[BaseException] = []
    before = read_tls_stat() or {}

    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            try:
                sock, _ = listener.accept()
                sock.settimeout(60)
                with ktls.wrap_socket(sock, context, server_side=True, require_kernel=True) as stream:
                    assert stream.kernel_tx
                    assert stream.kernel_rx
                    stream.sendall(download)
                    while len(received) < len(upload):
                        chunk = stream.recv(65536)
                        if not chunk:
                            break
                        received.extend(chunk)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        command = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(cert.cert), case[1]]
        command += [*case[2], "-quiet", "-servername", "localhost"]
        with (tmp_path / "upload").open("rb") as stdin:
            result = subprocess.run(command, stdin=stdin, capture_output=True, timeout=120, check=False)
        thread.join(60)
    assert not errors, errors
    assert sha256(bytes(received)) == sha256(upload)
    assert sha256(result.stdout) == sha256(download), result.stderr.decode(errors="replace")[-2000:]
    after = read_tls_stat() or {}
    assert after.get("TlsTxSw", 0) > before.get("TlsTxSw", 0)


def test_peer_key_update_with_s_client(support: KernelSupport, rsa_cert: CertFiles, tmp_path: Path) -> None:
    """``openssl s_client``'s ``K`` command: a KeyUpdate asking for ours. On ≥ 6.14 both directions rekey and
    the data after it flows; before, the stream fails with a clear error instead of an opaque EBADMSG."""
    case: Case = ("TLS_AES_128_GCM_SHA256", "-tls1_3", [], ssl.TLSVersion.TLSv1_3, None, "rsa")
    context = server_context(case, rsa_cert)
    outcome: dict[str, object] = {}
    got_before = threading.Event()

    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            try:
                sock, _ = listener.accept()
                sock.settimeout(60)
                with ktls.wrap_socket(sock, context, server_side=True, require_kernel=True) as stream:
                    data = b""
                    while b"after" not in data:
                        chunk = stream.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                        if data == b"before\n":
                            got_before.set()
                    outcome["data"] = data
                    stream.sendall(b"reply under the new key\n")
            except BaseException as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        command = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(rsa_cert.cert)]
        command += ["-tls1_3", "-servername", "localhost"]  # no -ign_eof/-quiet: they turn off the K command
        with subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0
        ) as client:
            assert client.stdin is not None
            # s_client sees a command only in a line read alone from stdin: each line waits for the one
            # before it to have arrived (at the server, or as a KeyUpdate the kernel counted).
            received_updates = (read_tls_stat() or {}).get("TlsRxRekeyReceived", 0)
            try:
                client.stdin.write(b"before\n")
                assert got_before.wait(60), outcome
                client.stdin.write(b"K\n")  # K: s_client sends KeyUpdate(update_requested)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and thread.is_alive():
                    if (read_tls_stat() or {}).get("TlsRxRekeyReceived", 0) > received_updates:
                        break
                    time.sleep(0.05)
                client.stdin.write(b"after\n")
            except BrokenPipeError:
                pass  # s_client exited: our server refused the KeyUpdate and closed (kernels < 6.14)
            thread.join(60)
            time.sleep(1)
            client.kill()
            output = client.stdout.read() if client.stdout else b""
    if support.rekey:
        assert "error" not in outcome, outcome
        assert outcome["data"] == b"before\nafter\n"
        assert b"reply under the new key" in output
    else:
        assert isinstance(outcome.get("error"), RekeyUnsupported), outcome
        assert "6.14" in str(outcome["error"])

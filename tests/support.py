"""Helpers shared by the test modules: TLS contexts, free ports, waiting for a server, background threads."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable

from certs import CertFiles
from ktls.core.driver import run_handshake as _drive_handshake
from ktls.core.handoff import proven_secrets
from ktls.core.handshake import Handshake, HandshakeResult
from ktls.core.keylog_capture import KeylogCapture
from ktls.core.keys import ConnectionKeys
from ktls.kernel import KernelSupport
from ktls.tls.suites import suite_by_name, suite_by_openssl_name

__all__ = ["Background", "contexts", "free_port", "handshake_keys", "kernel_refusal", "wait_for_port"]


def contexts(
    cert: CertFiles, version: ssl.TLSVersion, ciphers: str | None = None
) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts pinned to one TLS version (and cipher, for TLS 1.2); the client trusts ``cert``."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert.cert, cert.key)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cert.cert)
    for ctx in (server, client):
        ctx.minimum_version = ctx.maximum_version = version
        if ciphers:
            ctx.set_ciphers(ciphers)
    return server, client


def handshake_keys(
    sock: socket.socket, context: ssl.SSLContext, *, server_side: bool
) -> tuple[HandshakeResult, ConnectionKeys]:
    """Our handshake driver on ``sock``, then the connection's keys from the in-memory key log — no kernel."""
    capture = KeylogCapture.for_context(context)
    with capture.handshake() as claim:
        handshake = Handshake(
            context,
            server_side=server_side,
            server_hostname=None if server_side else "localhost",
            on_client_random=claim.bind,
        )
        _drive_handshake(sock, handshake)
        result = handshake.result()
        secrets = proven_secrets(handshake, claim, server_side=server_side)  # the proof runs on the host too
    return result, ConnectionKeys.from_handshake(result, secrets, server_side=server_side)


def kernel_refusal(support: KernelSupport, suite_name: str) -> str | None:
    """Why this kernel cannot take ``suite_name`` (IANA or OpenSSL name), or ``None`` when it can: the probe's
    own error, e.g. 5.10's EINVAL for ChaCha20-Poly1305 (kTLS ChaCha20 is Linux 5.11) or ENOENT for ARIA in a
    kernel built without it. Tests that need the kernel for a suite skip with this reason; the fallback itself
    is checked where such a kernel runs (test_stream_interop.test_suite_the_kernel_refuses_falls_back)."""
    suite = suite_by_name(suite_name) or suite_by_openssl_name(suite_name)
    if suite is None or suite.cipher_type is None:
        return f"{suite_name} has no kernel cipher"
    for entry in support.ciphers:
        if entry.cipher is suite.cipher_type and entry.version is suite.version:
            if entry.tx and entry.rx:
                return None
            return f"{support.kernel_release} refuses {suite_name}: {entry.error}"
    return f"{support.kernel_release} does not offer {suite.cipher_type.name} with {suite.version.label}"


def free_port() -> int:
    with socket.socket() as probe_sock:
        probe_sock.bind(("127.0.0.1", 0))
        port: int = probe_sock.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[bytes], host: str = "127.0.0.1") -> None:
    """Until ``process`` accepts connections on ``host``'s ``port`` (at most 30 s); fails if it exits first."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited early with {process.returncode}")
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{process.args!r} did not start listening")


class Background:
    """Threads whose exceptions reach the test, and which must finish in time."""

    def __init__(self) -> None:
        self.errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []

    def start(self, target: Callable[..., object], *args: object) -> None:
        def run() -> None:
            try:
                target(*args)
            except BaseException as exc:
                self.errors.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self._threads.append(thread)

    def join(self, timeout: float = 120) -> None:
        for thread in self._threads:
            thread.join(timeout)
            assert not thread.is_alive(), "a background thread hung"
        assert not self.errors, self.errors

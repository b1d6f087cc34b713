"""The proven hand-off on the paths around a plain handshake: resumption, and contexts sharing a user key log.

Each connection's secrets must be claimed and proven (``handoff.proven_secrets``: the claim on the client
random, then its own records opened with them) whether the handshake was a full one or resumed a session —
TLS 1.3 resumption (PSK), TLS 1.2 abbreviated handshakes, where the server's Finished comes first — and
when several contexts forward their lines to the same key-log file of the user's (``SSLKEYLOGFILE``).
Host tests: our server-side driver against a stock ``ssl`` client; no kernel needed.
"""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest

from certs import CertFiles
from ktls.core.driver import run_handshake as _drive_handshake
from ktls.core.handoff import proven_secrets
from ktls.core.handshake import Handshake
from ktls.core.keylog_capture import KeylogCapture
from support import Background, contexts


def serve_once(sock: socket.socket, context: ssl.SSLContext, answer: bytes) -> tuple[bool, bytes]:
    """Our handshake + proof on ``sock``; then ``answer`` through OpenSSL (so a TLS 1.3 client reads its
    tickets). Returns (whether OpenSSL resumed a session, the client random)."""
    capture = KeylogCapture.for_context(context)
    with capture.handshake() as claim:
        handshake = Handshake(context, server_side=True, on_client_random=claim.bind)
        _drive_handshake(sock, handshake)
        secrets = proven_secrets(handshake, claim, server_side=True)  # raises unless proven
        assert secrets
    handshake.ssl_object.write(answer)
    sock.sendall(handshake.outgoing.read())
    return handshake.ssl_object.session_reused, handshake.result().client_random


@pytest.mark.parametrize(
    ("version", "ciphers"),
    [(ssl.TLSVersion.TLSv1_3, None), (ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-AES128-GCM-SHA256")],
    ids=["tls1.3", "tls1.2"],
)
def test_resumed_handshakes_are_proven(
    listener: socket.socket, rsa_cert: CertFiles, version: ssl.TLSVersion, ciphers: str | None
) -> None:
    server_ctx, client_ctx = contexts(rsa_cert, version, ciphers)
    session: ssl.SSLSession | None = None
    resumed: list[bool] = []
    for _ in range(2):
        client_sock = socket.create_connection(listener.getsockname(), timeout=20)
        server_sock, _ = listener.accept()
        server_sock.settimeout(20)
        outcome: dict[str, bool] = {}
        background = Background()
        background.start(lambda s=server_sock, o=outcome: o.update(resumed=serve_once(s, server_ctx, b"hi")[0]))
        with client_ctx.wrap_socket(client_sock, server_hostname="localhost", session=session) as client:
            assert client.recv(2) == b"hi"  # and, in TLS 1.3, the tickets before it
            session = client.session
        background.join()
        server_sock.close()
        resumed.append(outcome["resumed"])
    assert resumed == [False, True]


def test_contexts_sharing_a_user_key_log_each_prove_their_own(
    listener: socket.socket, rsa_cert: CertFiles, tmp_path: Path
) -> None:
    """Two server contexts whose user key log is one file: each capture reads only its own context's lines
    (its own memory file), every handshake is proven, and the user's file still gets every line."""
    user_log = tmp_path / "sslkeylog.txt"
    servers = []
    for _ in range(2):
        server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3)
        server_ctx.keylog_filename = str(user_log)
        servers.append((server_ctx, client_ctx))
    randoms: list[bytes] = []
    lock = threading.Lock()
    background = Background()
    clients = []
    for server_ctx, client_ctx in servers * 3:
        client_sock = socket.create_connection(listener.getsockname(), timeout=20)
        server_sock, _ = listener.accept()
        server_sock.settimeout(20)

        def serve(s: socket.socket = server_sock, ctx: ssl.SSLContext = server_ctx) -> None:
            _, random = serve_once(s, ctx, b"hi")
            with lock:
                randoms.append(random)

        background.start(serve)
        clients.append((client_ctx, client_sock, server_sock))
    for client_ctx, client_sock, _ in clients:
        with client_ctx.wrap_socket(client_sock, server_hostname="localhost") as client:
            assert client.recv(2) == b"hi"
    background.join()
    for _, _, server_sock in clients:
        server_sock.close()
    text = user_log.read_text()
    assert len(randoms) == 6
    for random in randoms:
        assert f"SERVER_TRAFFIC_SECRET_0 {random.hex()}" in text

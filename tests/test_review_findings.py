"""Regression tests for what an adversarial review of the hand-off and ``ktls serve`` found (each failed before
its fix): a pipelined HelloRetryRequest flight, a ClientHello with an odd legacy_version, an unbounded
``user_canceled`` flood, a Range with a non-ASCII digit, and a client that pipelines requests for an empty
file and never reads."""

from __future__ import annotations

import os
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from certs import CertFiles
from ktls.constants import AlertDescription, ContentType, TLSVersion
from ktls.core.control import MAX_WARNING_ALERTS_WITHOUT_DATA, ControlRecords, Fail, Role, SendAlert
from ktls.core.driver import run_handshake as _drive_handshake
from ktls.core.handoff import proven_secrets
from ktls.core.handshake import Handshake
from ktls.core.keylog_capture import KeylogCapture
from ktls.serve.http import parse_request, respond
from raw_framing import extension, handshake_message, record, vector
from raw_tls13 import RawTLS13Client
from support import free_port, wait_for_port


def client_hello(random: bytes, session_id: bytes, key_share: bytes | None) -> bytes:
    """A TLS 1.3 ClientHello record offering X25519 (an empty key_share asks for a HelloRetryRequest)."""
    shares = b"" if key_share is None else struct.pack("!H", 0x1D) + vector(2, key_share)
    extensions = b"".join(
        (
            extension(10, vector(2, struct.pack("!H", 0x1D))),
            extension(13, vector(2, struct.pack("!3H", 0x0804, 0x0403, 0x0401))),
            extension(43, vector(1, struct.pack("!H", 0x0304))),
            extension(51, vector(2, shares)),
        )
    )
    body = (
        struct.pack("!H", 0x0303)
        + random
        + vector(1, session_id)
        + vector(2, struct.pack("!H", 0x1301))
        + vector(1, b"\0")
        + vector(2, extensions)
    )
    return record(22, handshake_message(1, body), 0x0301)


def test_a_pipelined_hello_retry_flight_binds_every_random(rsa_cert: CertFiles) -> None:
    """ClientHello(R1, no key share), ChangeCipherSpec, ClientHello(R2) in one flight, before our
    HelloRetryRequest: OpenSSL used to read the second hello in the same step and log secrets under R2, a
    random never bound. Now hellos are offered one record at a time until we have answered the first."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(rsa_cert.cert, rsa_cert.key)
    capture = KeylogCapture.for_context(context)
    r1, r2 = b"\x11" * 32, b"\x22" * 32
    share = X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    session_id = os.urandom(32)
    flight = client_hello(r1, session_id, None) + record(20, b"\x01") + client_hello(r2, session_id, share)
    with capture.handshake() as claim:
        handshake = Handshake(context, server_side=True, on_client_random=claim.bind)
        handshake.step()
        while flight:
            assert handshake.offer(flight)
            try:
                handshake.step()
            except ssl.SSLError:
                break
            flight = flight[handshake.take_offered() :]
            handshake.data_to_send()
        assert claim.randoms == [r1, r2]  # both bound, before OpenSSL could log under either
        assert claim.refusal is not None
        assert "changed its random" in claim.refusal
    assert len(capture) == 0  # whatever was logged under either random is gone with the claim
    assert r2.hex().encode() not in capture.contents()


def test_a_hello_with_an_odd_legacy_version_is_bound_and_proven(rsa_cert: CertFiles) -> None:
    """legacy_version 0x0a0a: OpenSSL ignores it (supported_versions decides), so its random must still be bound
    — it used to be skipped, leaving its lines unclaimed, and the connection dropped instead of handed off."""

    class OddClient(RawTLS13Client):
        def client_hello(self) -> bytes:
            patched = bytearray(super().client_hello())
            patched[9:11] = b"\x0a\x0a"  # record header 5 + handshake header 4
            self._transcript = self._transcript[:4] + bytes(patched[9:11]) + self._transcript[6:]
            return bytes(patched)

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(rsa_cert.cert, rsa_cert.key)
    capture = KeylogCapture.for_context(context)
    ours, theirs = socket.socketpair()
    ours.settimeout(10)
    theirs.settimeout(10)
    client = OddClient(os.urandom(32))

    def run_client() -> None:
        theirs.sendall(client.client_hello())
        while not client.server_finished:
            client.receive(theirs.recv(65536))
        theirs.sendall(client.client_finished())

    thread = threading.Thread(target=run_client, daemon=True)
    thread.start()
    with ours, theirs, capture.handshake() as claim:
        handshake = Handshake(context, server_side=True, on_client_random=claim.bind)
        _drive_handshake(ours, handshake)
        assert claim.randoms == [client.client_random]
        proven_secrets(handshake, claim, server_side=True)
    thread.join(10)


def test_tls13_user_canceled_alerts_are_bounded() -> None:
    state = ControlRecords(TLSVersion.TLS1_3, Role.CLIENT, None)
    canceled = bytes([1, AlertDescription.user_canceled])
    for _ in range(MAX_WARNING_ALERTS_WITHOUT_DATA):
        assert state.receive_record(ContentType.ALERT, canceled) == []
    actions = state.receive_record(ContentType.ALERT, canceled)
    assert actions[0] == SendAlert(2, AlertDescription.unexpected_message)  # type: ignore[arg-type]
    assert isinstance(actions[1], Fail)


def test_a_range_with_a_non_ascii_digit_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("0123456789")
    for spec in ("bytes=\xb2-", "bytes=0-\xb9", "bytes=-\xb3"):
        head = f"GET /a.txt HTTP/1.1\r\nHost: x\r\nRange: {spec}".encode("latin-1")
        response = respond(parse_request(head), tmp_path)  # used to raise ValueError from int("²")
        response.close()
        assert response.status == 200


def test_pipelined_requests_for_an_empty_file_cannot_grow_the_server(tmp_path: Path) -> None:
    """A client pipelining GET /empty and never reading: each response is a head only, which used to be
    written without ever waiting for the client, so the server's memory grew without bound. Now every head
    waits (bounded by --send-timeout) and the client is cut off."""
    (tmp_path / "empty").write_bytes(b"")
    port = free_port()
    command = [sys.executable, "-m", "ktls", "serve", str(tmp_path), "--port", str(port), "--send-timeout", "2"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, server)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with context.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="x") as tls:
            tls.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            tls.settimeout(1)
            request = b"GET /empty HTTP/1.1\r\nHost: x\r\n\r\n" * 64
            # Generous: the server stops reading only once its socket buffers (autotuned to megabytes) are full
            # of heads, seconds of work on a loaded machine (it ran out once at 30 s while a venv was built).
            deadline = time.monotonic() + 90
            cut_off = False
            while time.monotonic() < deadline and not cut_off:
                try:
                    tls.sendall(request)
                except TimeoutError:
                    continue  # the server is not reading right now: keep pushing
                except (ConnectionError, ssl.SSLError):
                    cut_off = True
            assert cut_off, "the server kept a client that never reads"
    finally:
        server.terminate()
        assert server.wait(30) == 0

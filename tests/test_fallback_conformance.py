"""The userspace fallback (OpenSSL's record layer) against the same odd records as the kernel path, on the host.

The README's *Conformance* section says what ktls answers when the kernel receives; on fallback OpenSSL reads,
and this file records what it answers to the same records, so the README can say where the two paths agree
and where they do not. Our side is a ``ktls.wrap_socket`` server on this host (no kTLS here: userspace TLS),
the peer the independent TLS 1.3 client (``raw_tls13``), which seals the odd record under its application key
and decrypts what our server sends back.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable

import pytest

import ktls
from certs import CertFiles
from ktls.constants import AlertDescription, AlertLevel, ContentType
from ktls.errors import KTLSError
from raw_tls13 import RawTLS13Client
from reference_tls import split_records

TIMEOUT = 10.0
Wire = Callable[[RawTLS13Client], bytes]


def served(cert: CertFiles, wire: Wire) -> tuple[bytes, BaseException | None, list[tuple[int, bytes]]]:
    """Our fallback server reads until the end after the peer's handshake and ``wire``: what it delivered,
    how its reads ended, and the records it sent (decrypted by the peer; the server's tickets left out)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert.cert, cert.key)
    context.num_tickets = 0
    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        ours, _ = listener.accept()
    ours.settimeout(TIMEOUT)
    client = RawTLS13Client(bytes(32))
    outcome: dict[str, object] = {}

    def serve() -> None:
        stream = ktls.wrap_socket(ours, context, server_side=True)
        assert not stream.kernel_rx  # the fallback: this host has no kTLS
        data = bytearray()
        try:
            while chunk := stream.recv(65536):
                data += chunk
        except (KTLSError, ssl.SSLError, OSError) as exc:
            outcome["error"] = exc
        outcome["data"] = bytes(data)
        stream.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with peer:
        peer.sendall(client.client_hello())
        while not client.server_finished:
            client.receive(peer.recv(65536))
        peer.sendall(client.client_finished() + wire(client))
        peer.shutdown(socket.SHUT_WR)
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "our side did not end"
        received = bytearray()
        while chunk := peer.recv(65536):
            received += chunk
    assert client.server_app is not None
    records = [client.server_app.open(r) for r in split_records(bytes(received))]
    sent = [(r.content_type, r.plaintext) for r in records]
    error = outcome.get("error")
    assert error is None or isinstance(error, BaseException)
    data = outcome["data"]
    assert isinstance(data, bytes)
    return data, error, sent


def fatal(description: AlertDescription) -> tuple[int, bytes]:
    return (ContentType.ALERT, bytes([AlertLevel.FATAL, description]))


def hello_then(content_type: int, payload: bytes, padding: int = 0) -> Wire:
    def wire(client: RawTLS13Client) -> bytes:
        assert client.client_app is not None
        return client.seal(b"hello") + client.client_app.seal(content_type, payload, padding=padding)

    return wire


def fragment_then_data() -> Wire:
    """The first two bytes of a KeyUpdate, then application data (RFC 8446 §5.1: no interleaving)."""

    def wire(client: RawTLS13Client) -> bytes:
        assert client.client_app is not None
        fragment = client.client_app.seal(ContentType.HANDSHAKE, b"\x18\x00")
        return client.seal(b"hello") + fragment + client.seal(b"interleaved")

    return wire


# (case, the peer's records after "hello", the alert OpenSSL sends; None: the stream goes on)
CASES = [
    ("empty-alert-record", hello_then(ContentType.ALERT, b""), AlertDescription.unexpected_message),
    # Here OpenSSL (3.0) and the RFC part: an alert that cannot be parsed is a decode_error (RFC 8446 §6), which
    # the kernel path sends; OpenSSL says unexpected_message.
    ("alert-of-3-bytes", hello_then(ContentType.ALERT, b"\x01\x00\x00"), AlertDescription.unexpected_message),
    (
        "two-alerts-in-one-record",
        hello_then(ContentType.ALERT, b"\x01\x00\x01\x00"),
        AlertDescription.unexpected_message,
    ),
    ("empty-handshake-record", hello_then(ContentType.HANDSHAKE, b""), AlertDescription.unexpected_message),
    # OpenSSL does what RFC 8446 §5.4 asks; the kernel path cannot (README: bad_record_mac there).
    ("inner-plaintext-of-zeros", hello_then(0, b"", padding=32), AlertDescription.unexpected_message),
    ("unknown-content-type", hello_then(99, b"what"), AlertDescription.unexpected_message),
    # RFC 8446 §5.1 wants unexpected_message (the kernel path sends it); OpenSSL 3.0 answers bad_record_mac.
    ("data-between-handshake-fragments", fragment_then_data(), AlertDescription.bad_record_mac),
    ("zero-length-application-data", hello_then(ContentType.APPLICATION_DATA, b""), None),
]


@pytest.mark.parametrize(("wire", "alert"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_openssl_answers_on_fallback(rsa_cert: CertFiles, wire: Wire, alert: AlertDescription | None) -> None:
    data, error, sent = served(rsa_cert, wire)
    if alert is None:
        assert data == b"hello"
        assert error is None
        return
    assert b"hello".startswith(data)  # OpenSSL may fail inside the read that decrypted it
    assert error is not None
    assert fatal(alert) in sent, sent

"""A TLS 1.3 client's deferred receive window: a KeyUpdate is told by what the record says, not by its size.

Our client keeps receiving in OpenSSL until the first application record (the server's tickets must reach
``session``); a KeyUpdate in that window moves the receive key before the kernel gets it. It used to be
recognised by ciphertext length, so a *padded* KeyUpdate or one sharing a record with a ticket was missed
(the kernel then got a key one generation behind), and a ``user_canceled`` alert of KeyUpdate size was taken
for one. Here the server is stock OpenSSL for the handshake; then the test writes the server's records itself
with the independent record layer (``reference_tls``) under the server's secret from its own key log, and
our client must read the application data that follows — the first record through OpenSSL, the next one
through the kernel, with the receive key the window left it — on every kernel and both front ends.
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

import ktls
import ktls.asyncio
from aio_support import run
from certs import CertFiles
from ktls.core.handoff import DeferredReceive
from ktls.core.keys import ConnectionKeys
from ktls.tls.suites import suite_by_openssl_name
from reference_tls import TLS13, RecordProtection
from support import Background, contexts

HANDSHAKE, APPLICATION_DATA, ALERT = 22, 23, 21
KEY_UPDATE = b"\x18\x00\x00\x01\x00"  # KeyUpdate(update_not_requested), RFC 8446 §4.6.3
TICKET = b"\x04\x00\x00\x10" + struct.pack("!II", 300, 7) + b"\x01\x00" + b"\x00\x02ab" + b"\x00\x00"
USER_CANCELED = b"\x01\x5a"  # warning, user_canceled (RFC 8446 §6.1)
EXPECTED = b"afterkernel"
HASHES = {"sha256": hashes.SHA256, "sha384": hashes.SHA384}


def expand_label(secret: bytes, label: bytes, length: int, hash_name: str) -> bytes:
    """RFC 8446 §7.1, written here independently of ``ktls.tls.keyschedule``."""
    full = b"tls13 " + label
    info = struct.pack("!HB", length, len(full)) + full + b"\x00"
    return HKDFExpand(HASHES[hash_name](), length, info).derive(secret)


def protection(secret: bytes, openssl_cipher: str, seq: int) -> RecordProtection:
    suite = suite_by_openssl_name(openssl_cipher)
    assert suite is not None
    cipher = suite.cipher_type
    assert cipher is not None
    key = expand_label(secret, b"key", suite.key_size, suite.hash_name)
    iv = expand_label(secret, b"iv", 12, suite.hash_name)
    return RecordProtection(int(cipher), TLS13, key, iv, seq)


#: What the server sends in the window, then "after" as application data. Each makes the old size rule fail.
SCRIPTS: dict[str, list[tuple[int, bytes, int, bool]]] = {
    # (content type, plaintext, padding, next secret after this record)
    "padded KeyUpdate": [(HANDSHAKE, KEY_UPDATE, 200, True)],
    "ticket and KeyUpdate in one record": [(HANDSHAKE, TICKET + KEY_UPDATE, 0, True)],
    "user_canceled of KeyUpdate size": [(ALERT, USER_CANCELED, 3, False)],
    "two KeyUpdates, then a ticket": [(HANDSHAKE, KEY_UPDATE, 0, True), (HANDSHAKE, KEY_UPDATE, 7, True)],
}


def server_records(
    keylog: Path, openssl_cipher: str, tickets: int, script: list[tuple[int, bytes, int, bool]]
) -> bytes:
    """The script's records and then ``after`` under the right keys and sequence numbers."""
    line = next(line for line in keylog.read_text().splitlines() if line.startswith("SERVER_TRAFFIC_SECRET_0 "))
    secret = bytes.fromhex(line.split()[2])
    suite = suite_by_openssl_name(openssl_cipher)
    assert suite is not None
    current = protection(secret, openssl_cipher, tickets)  # OpenSSL's tickets were records 0 … tickets-1
    out = b""
    for content_type, plaintext, padding, rekey in script:
        out += current.seal(content_type, plaintext, padding)
        if rekey:
            secret = expand_label(secret, b"traffic upd", suite.hash_size, suite.hash_name)
            current = protection(secret, openssl_cipher, 0)
    # "after" is the first application record: OpenSSL reads it and the kernel takes over behind it, so
    # "kernel" is decrypted by the kernel, with the receive key the window left it.
    return out + current.seal(APPLICATION_DATA, b"after") + current.seal(APPLICATION_DATA, b"kernel")


def stock_server_handshake(sock: socket.socket, context: ssl.SSLContext) -> str:
    """OpenSSL's server side over memory BIOs on ``sock``, up to and including its tickets; returns the suite."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = context.wrap_bio(incoming, outgoing, server_side=True)
    while True:
        try:
            server.do_handshake()
            break
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            data = sock.recv(65536)
            assert data, "our client closed during the handshake"
            incoming.write(data)
    sock.sendall(outgoing.read())  # its Finished-time tickets
    cipher = server.cipher()
    assert cipher is not None
    return cipher[0]


def blocking_client(sock: socket.socket, context: ssl.SSLContext, result: dict[str, object]) -> None:
    with ktls.wrap_socket(sock, context, server_hostname="localhost") as stream:
        data = b""
        while len(data) < len(EXPECTED) and (chunk := stream.recv(100)):
            data += chunk
        result["data"] = data
        result["kernel_rx"] = stream.kernel_rx
        result["reason"] = stream.fallback_reason


def asyncio_client(sock: socket.socket, context: ssl.SSLContext, result: dict[str, object]) -> None:
    async def main() -> None:
        reader, writer = await ktls.asyncio.open_connection(sock=sock, ssl=context, server_hostname="localhost")
        result["data"] = await reader.readexactly(len(EXPECTED))
        result["kernel_rx"] = writer.transport.get_extra_info("ktls_rx")
        result["reason"] = writer.transport.get_extra_info("ktls_fallback_reason")
        writer.close()

    run(main())


CLIENTS: dict[str, Callable[[socket.socket, ssl.SSLContext, dict[str, object]], None]] = {
    "stream": blocking_client,
    "asyncio": asyncio_client,
}


@pytest.mark.kernel
@pytest.mark.parametrize("front_end", list(CLIENTS))
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_deferred_window_reads_what_the_record_says(
    tcp_pair: tuple[socket.socket, socket.socket], rsa_cert: CertFiles, tmp_path: Path, script: str, front_end: str
) -> None:
    server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3)
    server_ctx.keylog_filename = str(tmp_path / "server-keylog")
    server_ctx.num_tickets = 1
    ours, theirs = tcp_pair
    result: dict[str, object] = {}
    background = Background()
    background.start(CLIENTS[front_end], ours, client_ctx, result)
    suite = stock_server_handshake(theirs, server_ctx)
    theirs.sendall(server_records(tmp_path / "server-keylog", suite, 1, SCRIPTS[script]))
    background.join(60)
    assert result["data"] == EXPECTED
    assert result["kernel_rx"], result["reason"]  # the kernel got the receive key of the right generation


# -- the same decisions on the host, sans I/O ---------------------------------------------------------------


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_deferred_receive_opens_each_record(script: str) -> None:
    secret = bytes(range(32))
    suite = suite_by_openssl_name("TLS_AES_128_GCM_SHA256")
    assert suite is not None
    deferred = DeferredReceive(ConnectionKeys(suite, tx=bytes(32), rx=secret))
    records = server_records_from_secret(secret, SCRIPTS[script])
    for record, (_, _, _, rekey) in zip(records, SCRIPTS[script], strict=False):
        opened = deferred.open(record)
        assert opened.key_update is rekey
        assert opened.content_type is not None
    assert deferred.unproven is None
    assert deferred.open(records[-1]).content_type == APPLICATION_DATA  # under the generation it followed to


def test_deferred_receive_refuses_a_key_that_does_not_open() -> None:
    suite = suite_by_openssl_name("TLS_AES_128_GCM_SHA256")
    assert suite is not None
    deferred = DeferredReceive(ConnectionKeys(suite, tx=bytes(32), rx=bytes(32)))
    record = protection(bytes(range(32)), "TLS_AES_128_GCM_SHA256", 0).seal(HANDSHAKE, TICKET)
    assert deferred.open(record).content_type is None
    assert deferred.unproven is not None
    assert "does not open" in deferred.unproven


def server_records_from_secret(secret: bytes, script: list[tuple[int, bytes, int, bool]]) -> list[bytes]:
    current = protection(secret, "TLS_AES_128_GCM_SHA256", 0)
    out = []
    for content_type, plaintext, padding, rekey in script:
        out.append(current.seal(content_type, plaintext, padding))
        if rekey:
            secret = expand_label(secret, b"traffic upd", 32, "sha256")
            current = protection(secret, "TLS_AES_128_GCM_SHA256", 0)
    out.append(current.seal(APPLICATION_DATA, b"after"))
    return out

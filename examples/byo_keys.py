"""Bring your own keys: a TLS 1.3 handshake done elsewhere, its secrets handed to the kernel with
``Stream.from_keys``. Here "elsewhere" is a second ``ssl`` context that writes an ordinary key log file —
any TLS library that can export its traffic secrets works the same way.

``python examples/byo_keys.py`` (needs a kTLS kernel; prints what went through the kernel).
"""

from __future__ import annotations

import socket
import ssl
import sys
import tempfile
import threading
from pathlib import Path

from ktls import Stream
from ktls.core.keys import ConnectionKeys
from ktls.serve.certificate import load_default_certificate
from ktls.tls.keylog import KeylogLabel, iter_keylog
from ktls.tls.suites import suite_by_openssl_name


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of one TCP connection over the loopback interface."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


def main() -> int:
    certificate = load_default_certificate()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certificate.cert_path, certificate.key_path)
    server_ctx.num_tickets = 0  # nothing arrives between the handshake and our hand-off
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    client_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    with tempfile.TemporaryDirectory() as scratch:
        keylog = Path(scratch) / "keylog"
        client_ctx.keylog_filename = str(keylog)  # the "other library" exports its secrets
        ours, theirs = tcp_pair()  # kernel TLS is a TCP upper layer: a socketpair() (AF_UNIX) cannot take it
        ours.settimeout(30)
        theirs.settimeout(30)
        answers: list[bytes] = []

        def peer() -> None:  # a stock TLS server
            with server_ctx.wrap_socket(theirs, server_side=True) as tls:
                answers.append(tls.recv(100))
                tls.sendall(b"hello from the peer")

        thread = threading.Thread(target=peer, daemon=True)  # never keeps the program alive after an error
        thread.start()
        # The handshake with a plain memory-BIO SSLObject, which never reads past the handshake's last record.
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = client_ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                ours.sendall(outgoing.read())
                incoming.write(ours.recv(65536))
        ours.sendall(outgoing.read())
        cipher = tls.cipher()
        assert cipher is not None
        secrets = {entry.label: bytes(entry.secret) for entry in iter_keylog(keylog.read_bytes())}
    suite = suite_by_openssl_name(cipher[0])
    assert suite is not None
    keys = ConnectionKeys(
        suite, tx=secrets[KeylogLabel.CLIENT_TRAFFIC_SECRET_0], rx=secrets[KeylogLabel.SERVER_TRAFFIC_SECRET_0]
    )
    with Stream.from_keys(ours, keys, server_side=False, tx_seq=0, rx_seq=0) as stream:
        stream.sendall(b"hello from the kernel")
        reply = stream.recv(100)
    thread.join(30)
    print(f"sent {answers[0]!r}, received {reply!r}, both through the kernel ({cipher[0]})")
    return 0 if reply == b"hello from the peer" else 1


if __name__ == "__main__":
    sys.exit(main())

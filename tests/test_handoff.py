"""The hand-off parameters, proven on the host against a stock ``ssl.SSLSocket`` peer — no kernel needed.

Our side runs the record-exact handshake driver with the in-memory key log; the peer is CPython's own
``SSLSocket``. Then, instead of giving the keys to a kernel, we give them to the independent record layer
(``reference_tls``): records it seals with our TX key, sequence number and explicit nonce must be accepted
by the peer, and the peer's records must open with our RX key at our RX sequence number. A wrong secret,
key schedule, sequence number or nonce fails here exactly as it would fail in the kernel.
"""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest

from certs import CertFiles
from ktls.constants import ContentType, TLSVersion
from ktls.core.driver import run_handshake as _drive_handshake
from ktls.core.handshake import Handshake
from ktls.core.keylog_capture import KeylogCapture
from ktls.errors import KernelTLSUnavailable
from ktls.kernel import CryptoInfo, Direction
from reference_tls import TLS13, RecordProtection
from support import contexts, handshake_keys

#: (TLS version, OpenSSL cipher string for TLS 1.2, certificate kind)
CASES = [
    (ssl.TLSVersion.TLSv1_3, None, "rsa"),
    (ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-AES128-GCM-SHA256", "rsa"),
    (ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-AES256-GCM-SHA384", "rsa"),
    (ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-CHACHA20-POLY1305", "rsa"),
    (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-GCM-SHA256", "ecdsa"),
    (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-CCM", "ecdsa"),
]


def case_id(case: tuple[ssl.TLSVersion, str | None, str]) -> str:
    return case[1] or case[0].name


def reference_for(info: CryptoInfo) -> RecordProtection:
    """The independent record layer's state for a direction, from the kernel's crypto info fields."""
    if info.version is TLSVersion.TLS1_3 or not info.salt:
        version = TLS13 if info.version is TLSVersion.TLS1_3 else 0x0303
        return RecordProtection(info.cipher_type, version, info.key, info.salt + info.iv, info.rec_seq)
    return RecordProtection(info.cipher_type, 0x0303, info.key, info.salt, info.rec_seq, int.from_bytes(info.iv, "big"))


def recv_records(sock: socket.socket, count: int) -> list[bytes]:
    records = []
    for _ in range(count):
        header = recv_exactly(sock, 5)
        records.append(header + recv_exactly(sock, int.from_bytes(header[3:5], "big")))
    return records


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "peer closed early"
        data += chunk
    return data


@pytest.mark.parametrize("ours_is_server", [True, False], ids=["ours-server", "ours-client"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_handoff_keys_and_sequence_numbers(
    tcp_pair: tuple[socket.socket, socket.socket],
    rsa_cert: CertFiles,
    ecdsa_cert: CertFiles,
    case: tuple[ssl.TLSVersion, str | None, str],
    ours_is_server: bool,
) -> None:
    version, ciphers, kind = case
    server_ctx, client_ctx = contexts(rsa_cert if kind == "rsa" else ecdsa_cert, version, ciphers)
    ours_ctx, peer_ctx = (server_ctx, client_ctx) if ours_is_server else (client_ctx, server_ctx)
    ours, theirs = tcp_pair
    peer_result: dict[str, object] = {}

    def peer() -> None:
        try:
            tls = peer_ctx.wrap_socket(
                theirs, server_side=not ours_is_server, server_hostname=None if not ours_is_server else "localhost"
            )
            tls.sendall(b"peer says hello")
            peer_result["received"] = recv_exactly(tls, 17)
            tls.sendall(b"peer says goodbye")
            peer_result["ok"] = True
        except Exception as exc:
            peer_result["error"] = exc

    thread = threading.Thread(target=peer, daemon=True)
    thread.start()
    result, keys = handshake_keys(ours, ours_ctx, server_side=ours_is_server)
    tx = reference_for(keys.crypto_info(Direction.TX, result.tx_seq, result.tx_explicit_nonce))
    rx = reference_for(keys.crypto_info(Direction.RX, result.rx_seq))

    if version is ssl.TLSVersion.TLSv1_3:
        # OpenSSL servers send 2 tickets in the step that completes the handshake: our TX starts after them.
        assert result.tx_seq == (2 if ours_is_server else 0)
        assert result.rx_seq == 0
    else:
        assert (result.tx_seq, result.rx_seq) == (1, 1)
        assert (result.tx_explicit_nonce is not None) == ("CHACHA" not in (ciphers or ""))

    # The peer's first records: tickets (TLS 1.3, to our client), then its data — opened with our RX.
    tickets = 2 if version is ssl.TLSVersion.TLSv1_3 and not ours_is_server else 0
    opened = [rx.open(r) for r in recv_records(ours, tickets + 1)]
    assert [r.content_type for r in opened] == [ContentType.HANDSHAKE] * tickets + [ContentType.APPLICATION_DATA]
    assert opened[-1].plaintext == b"peer says hello"
    # Our record, sealed with our TX: the stock ssl peer must accept it.
    ours.sendall(tx.seal(ContentType.APPLICATION_DATA, b"ours says hello!!"))
    opened = [rx.open(r) for r in recv_records(ours, 1)]
    assert opened[0].plaintext == b"peer says goodbye"
    thread.join(10)
    assert peer_result.get("ok"), peer_result.get("error")
    assert peer_result["received"] == b"ours says hello!!"


def test_secrets_are_consumed_and_memory_is_bounded(
    tcp_pair: tuple[socket.socket, socket.socket], rsa_cert: CertFiles
) -> None:
    server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3, None)
    capture = KeylogCapture.for_context(client_ctx)
    assert KeylogCapture.for_context(client_ctx) is capture
    ours, theirs = tcp_pair
    thread = threading.Thread(target=lambda: server_ctx.wrap_socket(theirs, server_side=True), daemon=True)
    thread.start()
    with capture.handshake() as claim:
        handshake = Handshake(client_ctx, server_side=False, server_hostname="localhost", on_client_random=claim.bind)
        _drive_handshake(ours, handshake)
        secrets = claim.take()
        with pytest.raises(KernelTLSUnavailable, match="no secrets"):
            claim.take()  # taken once
    thread.join(10)
    assert len(capture) == 0
    assert capture.size == 0  # truncated once no handshake is in flight
    for secret in secrets.secrets.values():
        assert bytes(secret).hex() not in repr(secrets)


def test_user_keylog_file_keeps_working(
    tmp_path: Path, tcp_pair: tuple[socket.socket, socket.socket], rsa_cert: CertFiles
) -> None:
    user_log = tmp_path / "sslkeylog.txt"
    server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3, None)
    client_ctx.keylog_filename = str(user_log)
    capture = KeylogCapture.for_context(client_ctx)
    ours, theirs = tcp_pair
    thread = threading.Thread(target=lambda: server_ctx.wrap_socket(theirs, server_side=True), daemon=True)
    thread.start()
    with capture.handshake() as claim:
        handshake = Handshake(client_ctx, server_side=False, server_hostname="localhost", on_client_random=claim.bind)
        _drive_handshake(ours, handshake)
        claim.take()
    thread.join(10)
    text = user_log.read_text()
    assert f"CLIENT_TRAFFIC_SECRET_0 {handshake.result().client_random.hex()}" in text


# -- HelloRetryRequest and client certificates -------------------------------------------------------------


def _ours_as_client(
    tcp_pair: tuple[socket.socket, socket.socket], client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext
) -> dict[str, object]:
    """Our client's handshake against a stock server; the peer's records open with our RX keys. Returns what
    the server saw."""
    ours, theirs = tcp_pair
    peer: dict[str, object] = {}

    def serve() -> None:
        try:
            tls = server_ctx.wrap_socket(theirs, server_side=True)
            peer["client_cert"] = tls.getpeercert()
            tls.sendall(b"hello after the handshake")
            peer["ok"] = True
        except Exception as exc:
            peer["error"] = exc

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    result, keys = handshake_keys(ours, client_ctx, server_side=False)
    rx = reference_for(keys.crypto_info(Direction.RX, result.rx_seq))
    opened = [rx.open(r) for r in recv_records(ours, 3)]  # two tickets, then the data
    assert [r.content_type for r in opened] == [
        ContentType.HANDSHAKE,
        ContentType.HANDSHAKE,
        ContentType.APPLICATION_DATA,
    ]
    assert opened[-1].plaintext == b"hello after the handshake"
    thread.join(10)
    assert peer.get("ok"), peer.get("error")
    return peer


def test_hello_retry_request(tcp_pair: tuple[socket.socket, socket.socket], rsa_cert: CertFiles) -> None:
    """The server accepts only P-384, the client's first key share is X25519: a HelloRetryRequest, a second
    ClientHello with the same random (RFC 8446 §4.1.2), and the keys still match."""
    server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3, None)
    server_ctx.set_ecdh_curve("secp384r1")
    hellos: list[object] = []

    def count_client_hellos(*args: object) -> None:  # (conn, direction, version, content_type, msg_type, data)
        if args[1] == "write" and getattr(args[4], "name", "") == "CLIENT_HELLO":
            hellos.append(args[4])

    client_ctx._msg_callback = count_client_hellos  # type: ignore[attr-defined]  # CPython's debug hook
    _ours_as_client(tcp_pair, client_ctx, server_ctx)
    assert len(hellos) == 2, "the server should have asked for a second ClientHello"


def test_client_certificate(
    tcp_pair: tuple[socket.socket, socket.socket], rsa_cert: CertFiles, ecdsa_cert: CertFiles
) -> None:
    server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3, None)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_verify_locations(ecdsa_cert.cert)
    client_ctx.load_cert_chain(ecdsa_cert.cert, ecdsa_cert.key)
    peer = _ours_as_client(tcp_pair, client_ctx, server_ctx)
    assert peer["client_cert"]


@pytest.mark.parametrize(
    ("version", "ours_is_server"),
    [(ssl.TLSVersion.TLSv1_3, True), (ssl.TLSVersion.TLSv1_2, False)],
    ids=["tls13-ours-server", "tls12-ours-client"],
)
def test_data_right_behind_the_last_handshake_record_stays_in_the_socket(
    tcp_pair: tuple[socket.socket, socket.socket], rsa_cert: CertFiles, version: ssl.TLSVersion, ours_is_server: bool
) -> None:
    """The peer's last flight and its first application record leave in one write, so they arrive together
    and the handshake's peek sees both: OpenSSL may have only the flight, and the data record must still be
    in the socket, first in line for the kernel's receive key."""
    server_ctx, client_ctx = contexts(rsa_cert, version, None)
    ours_ctx, peer_ctx = (server_ctx, client_ctx) if ours_is_server else (client_ctx, server_ctx)
    ours, theirs = tcp_pair
    failure: list[BaseException] = []

    def peer() -> None:
        try:
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = peer_ctx.wrap_bio(incoming, outgoing, server_side=not ours_is_server, server_hostname="localhost")
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    theirs.sendall(outgoing.read())
                    incoming.write(theirs.recv(65536))
            tls.write(b"right behind the handshake")
            theirs.sendall(outgoing.read())  # last flight + data record: one write
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=peer, daemon=True)
    thread.start()
    result, keys = handshake_keys(ours, ours_ctx, server_side=ours_is_server)
    thread.join(10)
    assert not failure, failure
    rx = reference_for(keys.crypto_info(Direction.RX, result.rx_seq))
    opened = rx.open(recv_records(ours, 1)[0])
    assert (opened.content_type, opened.plaintext) == (ContentType.APPLICATION_DATA, b"right behind the handshake")

"""Timeouts and non-blocking mode of a Stream, against a stock ``ssl`` peer, with the kernel doing TLS and
with userspace TLS (a TLS 1.2 CBC suite: no kernel cipher).

The stream gives the kernel its timeout (``SO_RCVTIMEO``/``SO_SNDTIMEO``) instead of polling before each
call: a read that waits too long raises ``TimeoutError``, a non-blocking stream raises ``BlockingIOError``,
a send into a peer that stopped reading times out, and after each the stream goes on working.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time

import pytest

import ktls
from certs import CertFiles
from hostile_peer import tls13_protection
from ktls.core.keys import ConnectionKeys
from ktls.kernel import KernelSupport
from ktls.tls.suites import suite_by_openssl_name
from support import contexts

TLS13, TLS12 = ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2
MODES = [
    pytest.param((TLS13, None, True), id="kernel-1.3", marks=pytest.mark.kernel),
    pytest.param((TLS12, "ECDHE-RSA-AES128-GCM-SHA256", True), id="kernel-1.2", marks=pytest.mark.kernel),
    pytest.param((TLS12, "ECDHE-RSA-AES128-SHA256", False), id="userspace-1.2-cbc"),
]


def send_until_timeout(stream: ktls.Stream, block: bytes, limit: int) -> int:
    """Blocks sent before ``sendall`` timed out (``limit`` if it never did)."""
    for sent in range(limit):
        try:
            stream.sendall(block)
        except TimeoutError:
            return sent
    return limit


@pytest.mark.parametrize("mode", MODES)
def test_timeouts_nonblocking_and_recovery(
    tcp_pair: tuple[socket.socket, socket.socket], rsa_cert: CertFiles, mode: tuple[ssl.TLSVersion, str | None, bool]
) -> None:
    version, ciphers, kernel = mode
    server, client = contexts(rsa_cert, version, ciphers)
    ours, theirs = tcp_pair
    speak, drain = threading.Event(), threading.Event()
    received: list[int] = []
    errors: list[BaseException] = []

    def peer() -> None:
        try:
            tls = server.wrap_socket(theirs, server_side=True)
            speak.wait(60)
            tls.sendall(b"late")
            drain.wait(60)
            total = 0
            while chunk := tls.recv(65536):
                total += len(chunk)
            received.append(total)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=peer, daemon=True)
    thread.start()
    stream = ktls.wrap_socket(ours, client, server_hostname="localhost", require_kernel=kernel)
    assert stream.kernel_tx is kernel
    assert stream.gettimeout() == 20  # tcp_pair's timeout, kept through the hand-off

    stream.settimeout(0.3)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        stream.recv(16)
    assert 0.25 <= time.monotonic() - started < 10
    assert (stream.gettimeout(), stream.getblocking()) == (0.3, True)

    stream.setblocking(False)
    assert (stream.gettimeout(), stream.getblocking()) == (0.0, False)
    with pytest.raises(BlockingIOError):
        stream.recv(16)

    speak.set()
    stream.settimeout(20)
    data = b""
    while len(data) < 4:
        data += stream.recv(16)
    assert data == b"late"

    # The peer reads nothing now: sending fills both socket buffers, then times out — not hang, not spin.
    stream.settimeout(0.5)
    block = os.urandom(256 * 1024)
    sent_blocks = send_until_timeout(stream, block, 4096)  # 1 GiB: far beyond any socket buffer
    assert sent_blocks < 4096

    # ... and the stream is intact: once the peer reads again, more data and close_notify get through.
    drain.set()
    stream.settimeout(None)
    stream.sendall(b"after the timeout")
    stream.close()
    thread.join(60)
    assert not thread.is_alive()
    assert not errors, errors
    assert received
    assert received[0] >= sent_blocks * len(block) + len(b"after the timeout")


@pytest.mark.kernel
def test_a_stalled_partial_record_ends_at_the_timeout(support: KernelSupport) -> None:
    """Half a record, then nothing (no FIN): the read ends at the stream's timeout with ``TimeoutError``, never
    waits beyond it, and once the rest arrives the record is read (RFC conformance: nothing waits unbounded)."""
    suite = suite_by_openssl_name("TLS_AES_128_GCM_SHA256")
    assert suite is not None
    with socket.create_server(("127.0.0.1", 0)) as listener:
        theirs = socket.create_connection(listener.getsockname(), timeout=10)
        ours, _ = listener.accept()
    ours_secret, theirs_secret = os.urandom(32), os.urandom(32)
    keys = ConnectionKeys(suite, tx=ours_secret, rx=theirs_secret)
    with theirs, ktls.Stream.from_keys(ours, keys, server_side=True, tx_seq=0, rx_seq=0) as stream:
        record = tls13_protection(theirs_secret).seal(23, b"stalled, then whole")
        theirs.sendall(record[: len(record) // 2])
        stream.settimeout(0.3)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            stream.recv(100)
        assert time.monotonic() - started < 10
        theirs.sendall(record[len(record) // 2 :])
        stream.settimeout(10)
        assert stream.recv(100) == b"stalled, then whole"

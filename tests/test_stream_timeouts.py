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

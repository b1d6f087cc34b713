"""No byte accepted is lost on close: a slow peer still receives everything we sent, then our close_notify.

The application writes as fast as the stream accepts (non-blocking, so ``send`` returns what it took),
against a peer that reads slowly, then closes at once. Userspace TLS (fallback) used to report records as
sent that were still in ktls's own buffer, and ``close()`` dropped them (the peer saw 16 KiB of 3.9 MB
missing, and a clean EOF); ``close()``'s linger waited only for *unsent* bytes and was skipped when the
close_notify could not be sent. Each front end (the blocking ``Stream``, the asyncio transport) in each mode
(kernel TLS in the guests; userspace TLS on the host, and forced in the guests with a CBC suite the kernel
lacks) must deliver every byte, in order, and end with close_notify.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import time

import pytest

import ktls
import ktls.asyncio
from aio_support import run
from certs import CertFiles
from ktls.kernel import probe
from support import Background, contexts

CHUNK = 64 * 1024
TOTAL = 512 * 1024
SOCKET_BUFFER = 16 * 1024
SLOW_READ = 16 * 1024  # the peer reads this much ...
SLOW_PAUSE = 0.002  # ... then pauses: ~8 MiB/s at most, well below what loopback takes


def slow_peer(sock: socket.socket, context: ssl.SSLContext, result: dict[str, object]) -> None:
    """Stock ``ssl`` server: reads slowly until our close_notify, hashing what arrived."""
    tls = context.wrap_socket(sock, server_side=True)
    digest = hashlib.sha256()
    received = 0
    while True:
        time.sleep(SLOW_PAUSE)
        try:
            data = tls.recv(SLOW_READ)
        except ssl.SSLZeroReturnError:
            data = b""
        if not data:
            break
        digest.update(data)
        received += len(data)
    result["received"] = received
    result["sha256"] = digest.hexdigest()
    result["close_notify"] = tls.pending() == 0  # recv returned b"": OpenSSL saw close_notify (else it raises)
    tls.close()


def payload() -> bytes:
    return bytes(range(256)) * (TOTAL // 256)


def stream_sender(sock: socket.socket, context: ssl.SSLContext, sent: dict[str, object]) -> None:
    stream = ktls.wrap_socket(sock, context, server_hostname="localhost")
    sent["kernel"] = stream.kernel_tx
    stream.setblocking(False)
    data = memoryview(payload())
    accepted = 0
    while accepted < len(data):
        try:
            accepted += stream.send(data[accepted : accepted + CHUNK])
        except BlockingIOError:
            time.sleep(0.001)
    sent["accepted"] = accepted
    stream.close()  # at once: the peer is far behind


def asyncio_sender(sock: socket.socket, context: ssl.SSLContext, sent: dict[str, object]) -> None:
    async def main() -> None:
        _, writer = await ktls.asyncio.open_connection(sock=sock, ssl=context, server_hostname="localhost")
        sent["kernel"] = writer.transport.get_extra_info("ktls_tx")
        writer.write(payload())  # all of it, into the transport's buffer
        sent["accepted"] = TOTAL
        writer.close()
        await writer.wait_closed()

    run(main())


SENDERS = {"stream": stream_sender, "asyncio": asyncio_sender}
MODES = [
    pytest.param("kernel", marks=pytest.mark.kernel),
    "userspace",
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("front_end", list(SENDERS))
def test_close_delivers_everything_to_a_slow_peer(
    tcp_pair: tuple[socket.socket, socket.socket], rsa_cert: CertFiles, front_end: str, mode: str
) -> None:
    if mode == "kernel":
        server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3)
    else:  # a CBC suite: no kernel cipher, so userspace TLS even on a kTLS kernel
        server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-AES128-SHA256")
    ours, theirs = tcp_pair
    # Small socket buffers: our sends stop short often, so records wait in ktls's buffer (userspace TLS) or
    # in the socket (kernel TLS) when close() comes.
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    ours.settimeout(None)
    theirs.settimeout(60)
    received: dict[str, object] = {}
    sent: dict[str, object] = {}
    background = Background()
    background.start(slow_peer, theirs, server_ctx, received)
    SENDERS[front_end](ours, client_ctx, sent)
    background.join(120)
    assert sent["kernel"] is (mode == "kernel" and probe().available)
    assert sent["accepted"] == TOTAL
    assert received["received"] == TOTAL
    assert received["sha256"] == hashlib.sha256(payload()).hexdigest()
    assert received["close_notify"]


def trickling_peer(sock: socket.socket, context: ssl.SSLContext, received: list[int]) -> None:
    """Stock ``ssl`` server: takes a little, often (so that our socket keeps getting room), until the end."""
    with context.wrap_socket(sock, server_side=True) as tls:
        while True:
            time.sleep(0.02)
            try:
                if not (data := tls.recv(4096)):
                    return
            except (ssl.SSLError, OSError):
                return  # our close() gave up: a reset, or a TLS stream cut short
            received.append(len(data))


def test_close_gives_up_within_its_bound_on_a_peer_that_trickles(
    tcp_pair: tuple[socket.socket, socket.socket], rsa_cert: CertFiles
) -> None:
    """``close()`` delivers what ``send`` accepted within the stream's timeout *in all*, not per wait: a peer that
    reads a little every 20 ms makes room often enough that no single wait times out, yet would need minutes for
    all of it. Past the bound, close() raises and says how much was not delivered (userspace TLS, where the
    records wait in our queue: a CBC suite, so also on a kTLS kernel). Catches a bound applied to each wait."""
    server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-AES128-SHA256")
    ours, theirs = tcp_pair
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    theirs.settimeout(60)
    received: list[int] = []
    background = Background()
    background.start(trickling_peer, theirs, server_ctx, received)
    stream = ktls.wrap_socket(ours, client_ctx, server_hostname="localhost")
    assert not stream.kernel_tx
    stream.settimeout(0.5)
    data = bytes(8 << 20)
    assert stream.send(data) == len(data)  # all accepted: OpenSSL's records wait in the queue
    with pytest.raises(TimeoutError, match="bytes of records already accepted by send"):
        stream.close()
    background.join(60)
    assert 0 < sum(received) < len(data)  # it was taking some, not nothing

"""A key log that forgets: what ktls has read of a context's key log does not stay in memory.

The capture's memory file is truncated only when no handshake is in flight; a server always has one in
flight (here: a stalled handshake holds its claim for the whole test). Without hole punching the file would
then keep every line of every connection — all their secrets, resident, for the life of the process. With
it, what has been read is released at once: the file reads as zeros where the lines were, and its resident
size stays at about one page whatever the number of connections.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading

import pytest

from certs import CertFiles
from ktls.core.handshake import Handshake
from ktls.core.keylog_capture import KeylogCapture
from support import contexts, handshake_keys

CONNECTIONS = 200
#: Holes are punched in whole pages: the page holding the end of what was read stays, so about one page is
#: resident; 16 KiB leaves room. 200 connections write ~35 KB (TLS 1.2) to ~190 KB (TLS 1.3) of lines.
RESIDENT_LIMIT = 16 * 1024


def connect(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> bytes:
    """One real TLS handshake, ours the client (``support.handshake_keys``: secrets taken and proven) against a
    stock ``ssl`` server; returns the client random."""
    ours, theirs = socket.socketpair()
    theirs.settimeout(20)
    peers: list[ssl.SSLSocket] = []
    thread = threading.Thread(target=lambda: peers.append(server_ctx.wrap_socket(theirs, server_side=True)))
    thread.start()
    with ours:
        ours.settimeout(20)
        result, _ = handshake_keys(ours, client_ctx, server_side=False)
    thread.join(20)
    assert len(peers) == 1
    peers[0].close()
    return result.client_random


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["TLS1.3", "TLS1.2"])
def test_a_stalled_handshake_does_not_make_the_key_log_remember(
    rsa_cert: CertFiles, version: ssl.TLSVersion, capsys: pytest.CaptureFixture[str]
) -> None:
    # Catches: (1) read lines left in the memory file while a handshake is in flight (no hole punched, or a
    # hole over the wrong range: resident grows with every connection, ~1 KiB each); (2) the lines of
    # finished connections readable in the file afterwards; (3) taken or discarded secrets kept by the parser.
    server_ctx, client_ctx = contexts(rsa_cert, version)
    capture = KeylogCapture.for_context(client_ctx)
    randoms: list[bytes] = []
    peak = 0
    with capture.handshake() as stalled:
        # A real handshake that never finishes: its ClientHello is written (the random is bound) and the
        # server never answers. While its claim lives, the file cannot be truncated.
        stalled_handshake = Handshake(
            client_ctx, server_side=False, server_hostname="localhost", on_client_random=stalled.bind
        )
        assert stalled_handshake.step() is False
        assert stalled.client_random is not None

        for _ in range(CONNECTIONS):
            randoms.append(connect(server_ctx, client_ctx))
            peak = max(peak, capture.resident)
        written, resident, contents = capture.size, capture.resident, capture.contents()

        assert len(set(randoms)) == CONNECTIONS
        # Every line was written to the file and read from it: the file was never truncated ...
        assert written > CONNECTIONS * 100
        assert written > 2 * RESIDENT_LIMIT  # so keeping the lines would fail the limit below
        # ... yet what was read is no longer in memory, nor in the file.
        assert peak < RESIDENT_LIMIT
        assert resident < RESIDENT_LIMIT
        for client_random in randoms:
            assert client_random.hex().encode() not in contents
            assert client_random.hex().upper().encode() not in contents
        assert contents.strip(b"\0") == b"", "only zeros (holes) where the lines were"
        assert len(capture) == 0  # nothing held by the parser either
    assert capture.size == 0  # the last claim ended: truncated

    with capsys.disabled():
        print(
            f"\n[{version.name}] {CONNECTIONS} handshakes with a stalled one in flight: key log written "
            f"{written} bytes ({written / CONNECTIONS:.0f} per connection); resident {resident} bytes now, "
            f"{peak} at most (without hole punching: ~{written} resident)"
        )


def test_lines_not_read_yet_are_kept(rsa_cert: CertFiles) -> None:
    # Catches: a hole punched past what was read (over lines still being written or not yet parsed): the next
    # handshake's secrets would read as zeros and it would fall back.
    server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3)
    capture = KeylogCapture.for_context(client_ctx)
    with capture.handshake() as stalled:
        stalled.bind(os.urandom(32))
        for _ in range(20):
            connect(server_ctx, client_ctx)  # each one's take reads everything, punches, and finds its lines
        assert len(capture) == 0
        assert capture.resident < RESIDENT_LIMIT

"""The same Stream API over userspace TLS, where the kernel cannot take over (our hosts: no CONFIG_TLS).

Runs wherever kTLS is missing; in the kernel guests the userspace path is forced by refusing the kernel
for one test (a TLS 1.2 CBC suite, which has no kernel cipher).
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import threading
from collections.abc import Callable

import pytest

import ktls
from certs import CertFiles
from ktls.errors import KernelTLSUnavailable, StreamClosed
from ktls.kernel import probe
from support import contexts

MIB = 1024 * 1024


def run_peer(target: Callable[[], None]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def wrapper() -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=wrapper, daemon=True)
    thread.start()
    return thread, errors


def echo_peer(sock: socket.socket, context: ssl.SSLContext, server_side: bool) -> Callable[[], None]:
    def serve() -> None:
        tls = context.wrap_socket(sock, server_side=server_side, server_hostname=None if server_side else "localhost")
        while data := tls.recv(65536):
            tls.sendall(data)
        tls.unwrap()

    return serve


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_client_stream_round_trip_with_clean_close(
    tcp_pair: tuple[socket.socket, socket.socket], rsa_cert: CertFiles, version: ssl.TLSVersion
) -> None:
    server_ctx, client_ctx = contexts(rsa_cert, version)
    ours, theirs = tcp_pair
    thread, errors = run_peer(echo_peer(theirs, server_ctx, server_side=True))
    stream = ktls.wrap_socket(ours, client_ctx, server_hostname="localhost")
    if not probe().available:
        assert not stream.kernel_tx
        assert not stream.kernel_rx
        assert stream.fallback_reason is not None
        assert "CONFIG_TLS" in stream.fallback_reason
    assert stream.version() == ("TLSv1.3" if version is ssl.TLSVersion.TLSv1_3 else "TLSv1.2")
    assert stream.server_hostname == "localhost"
    assert stream.getpeercert()["subject"] == ((("commonName", "localhost"),),)
    payload = os.urandom(MIB)
    received = bytearray()
    view = memoryview(payload)
    while view or len(received) < len(payload):
        if view:
            sent = stream.send(view[:65536])
            assert sent > 0
            view = view[sent:]
        received += stream.recv(65536)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    stream.shutdown(socket.SHUT_WR)
    with pytest.raises(StreamClosed):
        stream.send(b"after close_notify")
    assert stream.recv(100) == b""
    assert not stream.ragged_eof
    stream.close()
    stream.close()  # idempotent
    thread.join(10)
    assert not errors, errors
    with pytest.raises(OSError, match="closed"):
        stream.recv(1)


def test_server_stream_and_makefile(tcp_pair: tuple[socket.socket, socket.socket], rsa_cert: CertFiles) -> None:
    server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3)
    ours, theirs = tcp_pair

    def client() -> None:
        tls = client_ctx.wrap_socket(theirs, server_hostname="localhost")
        tls.sendall(b"line one\nline two\n")
        assert tls.recv(100) == b"ok\n"
        tls.close()

    thread, errors = run_peer(client)
    with ktls.wrap_socket(ours, server_ctx, server_side=True) as stream:
        reader = stream.makefile("rb")
        assert reader.readline() == b"line one\n"
        assert reader.readline() == b"line two\n"
        stream.sendall(b"ok\n")
        reader.close()
    thread.join(10)
    assert not errors, errors


def test_ragged_eof_is_distinguishable(tcp_pair: tuple[socket.socket, socket.socket], rsa_cert: CertFiles) -> None:
    server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3)
    ours, theirs = tcp_pair

    def rude_server() -> None:
        tls = server_ctx.wrap_socket(theirs, server_side=True)
        tls.sendall(b"partial")
        tls.shutdown(socket.SHUT_RDWR)  # TCP FIN without close_notify (SSLSocket.shutdown sends none)

    thread, errors = run_peer(rude_server)
    stream = ktls.wrap_socket(ours, client_ctx, server_hostname="localhost", suppress_ragged_eofs=False)
    assert stream.recv(100) == b"partial"
    with pytest.raises(ktls.errors.RaggedEOF):
        stream.recv(100)
    assert stream.ragged_eof
    stream.close()
    thread.join(10)
    assert not errors, errors


def test_require_kernel_raises_a_typed_error(
    tcp_pair: tuple[socket.socket, socket.socket], rsa_cert: CertFiles
) -> None:
    if probe().available:
        pytest.skip("this kernel has kTLS: the refusal path is tested with a CBC suite in the guests")
    _, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3)
    ours, _ = tcp_pair
    with pytest.raises(KernelTLSUnavailable, match="CONFIG_TLS"):
        ktls.wrap_socket(ours, client_ctx, server_hostname="localhost", require_kernel=True)


def test_sendfile_on_fallback_reads_and_sends(
    tcp_pair: tuple[socket.socket, socket.socket], rsa_cert: CertFiles, tmp_path: os.PathLike[str]
) -> None:
    server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3)
    ours, theirs = tcp_pair
    content = os.urandom(300_000)
    path = os.path.join(tmp_path, "file.bin")
    with open(path, "wb") as out:
        out.write(content)
    got = bytearray()

    def receiver() -> None:
        tls = server_ctx.wrap_socket(theirs, server_side=True)
        while data := tls.recv(65536):
            got.extend(data)

    thread, errors = run_peer(receiver)
    with ktls.wrap_socket(ours, client_ctx, server_hostname="localhost") as stream, open(path, "rb") as f:
        assert stream.sendfile(f, offset=1000, count=200_000) == 200_000
        assert f.tell() == 201_000
    thread.join(10)
    assert not errors, errors
    assert len(got) == 200_000
    assert bytes(got) == content[1000:201_000]

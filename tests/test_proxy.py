"""``ktls proxy``: TLS termination by splice, driven by clients we did not write.

The proxy runs as its own process (``python -m ktls proxy``) in front of backends run here (an echo server,
an HTTP server answering a blob or the SHA-256 of what it was sent, a TLS echo server, one that resets).
Clients: ``openssl s_client``, ``curl``, Python's ``ssl`` and the raw TLS 1.3 client of ``raw_tls13``
(independent of ktls: it can send a KeyUpdate and a close_notify exactly where the test wants). In the
guests, the access log must say the kernel did both directions, and ``strace`` on the proxy shows that only
``splice`` moved payload. On the host (no kTLS) the same proxy relays by copy (the fallback).

Sizes: ``KTLS_PROXY_MIB`` (default 32) MiB each way for the s_client and curl transfers; under QEMU TCG the
kernel's AES-GCM runs at about 10 MiB/s, so those take a few seconds each. The rest use a few MiB at most.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.server
import ipaddress
import os
import re
import resource
import select
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from certs import CertFiles
from ktls.kernel import probe
from ktls.proxy import proxy_header
from raw_tls13 import ALERT, HANDSHAKE, RawTLS13Client, hkdf_expand_label, protection
from support import free_port, wait_for_port

TIMEOUT = 60.0
MIB = int(os.environ.get("KTLS_PROXY_MIB", "32"))
KERNEL = probe().available


# -- backends ------------------------------------------------------------------------------------------------


class Backend:
    """A TCP server on a thread: ``handle(conn)`` per connection; records what each connection sent first."""

    def __init__(self, handle: object) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.port = self.listener.getsockname()[1]
        self.handle = handle
        self.first_bytes: list[bytes] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(TIMEOUT)
            self.handle(self, conn)  # type: ignore[operator]

    def close(self) -> None:
        self.listener.close()


def echo(backend: Backend, conn: socket.socket) -> None:
    while data := conn.recv(262144):
        conn.sendall(data)


def reset_after_first_bytes(backend: Backend, conn: socket.socket) -> None:
    backend.first_bytes.append(conn.recv(65536))
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close() sends a reset


def record_proxy_header(backend: Backend, conn: socket.socket) -> None:
    data = b""
    while b"hello" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    backend.first_bytes.append(data)
    conn.sendall(b"ok")


def blob(size: int) -> bytes:
    """Deterministic bytes (so that tools can be checked by hash without holding two copies)."""
    seed = hashlib.sha256(b"ktls proxy").digest() * 2048  # 64 KiB
    return (seed * (size // len(seed) + 1))[:size]


class _Http(http.server.BaseHTTPRequestHandler):
    """GET /blob: ``MIB`` MiB (``/blob/N``: its first N bytes); POST /sha256: the SHA-256 of the body.
    HTTP/1.0: the server closes after each response."""

    body = b""

    def do_GET(self) -> None:
        _, _, size = self.path.partition("/blob/")
        body = self.body[: int(size)] if size else self.body
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        remaining = int(self.headers["Content-Length"])
        digest = hashlib.sha256()
        while remaining:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            remaining -= len(chunk)
        answer = digest.hexdigest().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def http_backend() -> Iterator[tuple[int, bytes]]:
    body = blob(MIB << 20)
    handler = type("Handler", (_Http,), {"body": body})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], body
    server.shutdown()
    server.server_close()


@pytest.fixture
def echo_backend() -> Iterator[Backend]:
    backend = Backend(echo)
    yield backend
    backend.close()


# -- the proxy process ---------------------------------------------------------------------------------------


class Proxy:
    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process = process
        self.port = port
        self.log = log

    def access_lines(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if " up=" in line or "unreachable" in line]

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        assert match
        return int(match.group(1))


@contextlib.contextmanager
def run_proxy(
    tmp_path: Path, backend_port: int, *extra: str, prefix: tuple[str, ...] = (), host: str = "127.0.0.1"
) -> Iterator[Proxy]:
    port = free_port()
    log = tmp_path / f"proxy-{port}.log"
    command = [
        *prefix,
        sys.executable,
        "-m",
        "ktls",
        "proxy",
        "--listen",
        f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "--backend",
        f"127.0.0.1:{backend_port}",
        *extra,
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, process, host)
        yield Proxy(process, port, log)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for_log(proxy: Proxy, count: int) -> list[str]:
    """The access log once it has ``count`` lines (each connection writes one when it has ended)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        lines = proxy.access_lines()
        if len(lines) >= count:
            return lines
        time.sleep(0.1)
    raise AssertionError(f"access log: {proxy.access_lines()!r}, wanted {count} lines")


def assert_kernel_did_it(line: str) -> None:
    if KERNEL:
        assert "kernel_tx=yes kernel_rx=yes" in line, line


def tls_client(port: int, version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3) -> ssl.SSLSocket:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = context.maximum_version = version
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    return context.wrap_socket(sock)


def echo_in_turn(sock: ssl.SSLSocket | socket.socket, payload: bytes) -> bytes:
    """Send ``payload``, then read as many bytes back, on this thread: an ``ssl.SSLSocket`` must not be read and
    written from two threads at once (OpenSSL's ``SSL`` object is not thread-safe: under TLS 1.3 a read that
    takes a NewSessionTicket while another thread writes was seen to end the connection with internal_error).
    For payloads the relay's buffers hold (a few hundred KiB at most)."""
    sock.sendall(payload)
    received = bytearray()
    while len(received) < len(payload):
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        received += chunk
    return bytes(received)


def echo_exchange(sock: ssl.SSLSocket | socket.socket, payload: bytes) -> bytes:
    """Send ``payload`` while reading as many bytes back, in one thread: an ``ssl.SSLSocket`` must not be
    written by one thread while another reads it (OpenSSL's ``SSL`` objects are not thread-safe; two threads
    corrupted the client's stream about one run in six here)."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    view, received = memoryview(payload), bytearray()
    deadline = time.monotonic() + TIMEOUT
    try:
        while len(received) < len(payload) and time.monotonic() < deadline:
            progressed = False
            if view:
                with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                    view = view[sock.send(view[:65536]) :]
                    progressed = True
            with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                if not (chunk := sock.recv(1 << 20)):
                    break
                received += chunk
                progressed = True
            if not progressed:
                select.select([sock], [sock] if view else [], [], 1.0)
    finally:
        sock.settimeout(timeout)
    return bytes(received)


VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


# -- the PROXY protocol, read by a strict parser of its own ---------------------------------------------------

PP2_SIGNATURE = bytes.fromhex("0d0a0d0a000d0a515549540a")  # proxy-protocol.txt §2.2
PP1_MAX = 107  # §2.1: the longest v1 line, "PROXY UNKNOWN" with two IPv6 addresses, CRLF included
_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")


class ProxyHeaderError(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class ParsedProxyHeader:
    version: int
    family: str  # "TCP4" or "TCP6" (v2: AF_INET/AF_INET6 over STREAM)
    source: tuple[str, int]
    destination: tuple[str, int]
    size: int  # bytes the header took on the wire


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ProxyHeaderError(f"the connection ended inside the header, after {data!r}")
        data += chunk
    return data


def _v1_address(text: bytes, family: bytes) -> str:
    """§2.1: an address in its canonical form for the family (dotted quad; RFC 5952-style IPv6)."""
    try:
        address = ipaddress.ip_address(text.decode("ascii"))
    except ValueError as exc:
        raise ProxyHeaderError(f"address {text!r}: {exc}") from None
    if address.version != (4 if family == b"TCP4" else 6) or str(address).encode() != text:
        raise ProxyHeaderError(f"address {text!r} is not a canonical {family.decode()} address")
    return str(address)


def _v1_port(text: bytes) -> int:
    if not _PORT.fullmatch(text) or int(text) > 65535:
        raise ProxyHeaderError(f"port {text!r} is not a decimal in 0..65535 without leading zeros")
    return int(text)


def read_proxy_header(conn: socket.socket) -> ParsedProxyHeader:
    """Read exactly one PROXY protocol header off ``conn``, nothing past it, and check every rule of HAProxy's
    ``proxy-protocol.txt`` that a TCP header must follow; written from that text, independently of ktls."""
    start = _recv_exactly(conn, 12)  # a v1 header is longer than the v2 signature
    if start == PP2_SIGNATURE:
        head = _recv_exactly(conn, 4)
        version_command, family_protocol, length = struct.unpack("!BBH", head)
        if version_command >> 4 != 2:
            raise ProxyHeaderError(f"version {version_command >> 4}: v2 wants 2 in the high nibble")
        if version_command & 0x0F != 1:
            raise ProxyHeaderError(f"command {version_command & 0x0F}: a relayed connection is PROXY (1)")
        if family_protocol not in (0x11, 0x21):
            raise ProxyHeaderError(f"family/protocol {family_protocol:#04x}: TCP over IPv4 (0x11) or IPv6 (0x21)")
        width = 4 if family_protocol == 0x11 else 16
        block = _recv_exactly(conn, length)
        if length < 2 * width + 4:
            raise ProxyHeaderError(f"length {length} is shorter than the address block")
        tlvs = block[2 * width + 4 :]
        while tlvs:  # §2.2.7: type, 16-bit length, value; they must fill the rest exactly
            if len(tlvs) < 3 or len(tlvs) < 3 + int.from_bytes(tlvs[1:3], "big"):
                raise ProxyHeaderError(f"a TLV runs past the header: {tlvs!r}")
            tlvs = tlvs[3 + int.from_bytes(tlvs[1:3], "big") :]
        source = ipaddress.ip_address(block[:width])
        destination = ipaddress.ip_address(block[width : 2 * width])
        source_port, destination_port = struct.unpack("!HH", block[2 * width : 2 * width + 4])
        family = "TCP4" if width == 4 else "TCP6"
        return ParsedProxyHeader(
            2, family, (str(source), source_port), (str(destination), destination_port), 16 + length
        )
    if not start.startswith(b"PROXY "):
        raise ProxyHeaderError(f"neither a v1 line nor the v2 signature: {start!r}")
    line = start
    while not line.endswith(b"\r\n"):
        if len(line) >= PP1_MAX:
            raise ProxyHeaderError(f"no CRLF within {PP1_MAX} bytes: {line!r}")
        line += _recv_exactly(conn, 1)
    fields = line[:-2].split(b" ")
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):  # single spaces: split gives empty fields
        raise ProxyHeaderError(f"not 'PROXY TCP4|TCP6 src dst sport dport': {line!r}")
    _, family_field, src, dst, sport, dport = fields
    return ParsedProxyHeader(
        1,
        family_field.decode(),
        (_v1_address(src, family_field), _v1_port(sport)),
        (_v1_address(dst, family_field), _v1_port(dport)),
        len(line),
    )


def test_the_strict_parser_refuses_what_the_spec_forbids() -> None:
    """The test's own parser, against headers written by hand from the spec (and bent)."""

    def parse(wire: bytes) -> ParsedProxyHeader:
        near, far = socket.socketpair()
        with near, far:
            near.sendall(wire)
            near.shutdown(socket.SHUT_WR)
            far.settimeout(TIMEOUT)
            return read_proxy_header(far)

    line = b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n"
    assert parse(line + b"GET") == ParsedProxyHeader(1, "TCP4", ("192.0.2.1", 56324), ("198.51.100.7", 443), 45)
    six = b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n"
    assert parse(six).source == ("2001:db8::1", 1)
    v2 = PP2_SIGNATURE + bytes([0x21, 0x11, 0, 12, 192, 0, 2, 1, 198, 51, 100, 7, 0xDC, 0x04, 1, 0xBB])
    assert parse(v2) == ParsedProxyHeader(2, "TCP4", ("192.0.2.1", 56324), ("198.51.100.7", 443), 28)
    with_tlv = PP2_SIGNATURE + bytes([0x21, 0x11, 0, 17]) + v2[16:] + bytes([0x04, 0, 2, 0xAB, 0xCD])
    assert parse(with_tlv).size == 33
    for bad in (
        line.replace(b"56324", b"056324"),  # a leading zero
        line.replace(b"443", b"65536"),
        line.replace(b" 198", b"  198"),  # two spaces
        line.replace(b"TCP4", b"TCP6"),  # IPv4 addresses under TCP6
        line.replace(b"192.0.2.1", b"192.000.2.1"),
        line[:-2] + b"\n",  # LF alone
        b"PROXY TCP4 " + b"1" * 120,
        v2[:12] + bytes([0x11]) + v2[13:],  # version 1 in the v2 block
        v2[:12] + bytes([0x20]) + v2[13:],  # LOCAL: not a relayed connection
        v2[:13] + bytes([0x12]) + v2[14:],  # DGRAM
        v2[:14] + bytes([0, 8]) + v2[16:24],  # shorter than the addresses
        with_tlv[:-1],  # a TLV cut short
    ):
        with pytest.raises(ProxyHeaderError):
            parse(bad)


# -- pure ----------------------------------------------------------------------------------------------------


def test_proxy_header_v1_and_v2_as_the_spec_writes_them() -> None:
    """HAProxy's proxy-protocol.txt: the v1 line, and the v2 block (signature, 0x21, family, length, addresses)."""
    source, destination = ("192.0.2.1", 56324), ("198.51.100.7", 443)
    assert proxy_header("v1", source, destination) == b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n"
    v2 = proxy_header("v2", source, destination)
    assert v2[:12] == bytes.fromhex("0d0a0d0a000d0a515549540a")
    assert v2[12:16] == bytes([0x21, 0x11, 0x00, 12])
    assert v2[16:] == bytes([192, 0, 2, 1, 198, 51, 100, 7]) + (56324).to_bytes(2, "big") + (443).to_bytes(2, "big")
    six = proxy_header("v2", ("2001:db8::1", 1, 0, 0), ("2001:db8::2", 2, 0, 0))
    assert six[13] == 0x21
    assert len(six) == 16 + 36
    assert (
        proxy_header("v1", ("::ffff:192.0.2.1", 5), ("::ffff:192.0.2.2", 6))
        == b"PROXY TCP4 192.0.2.1 192.0.2.2 5 6\r\n"
    )


# -- both: the kernel in the guests, the fallback on the host -------------------------------------------------


@pytest.mark.kernel
@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_s_client_both_ways_through_the_proxy(
    tmp_path: Path, http_backend: tuple[int, bytes], version: str, rsa_cert: CertFiles
) -> None:
    """``openssl s_client``: a GET of ``MIB`` MiB and a POST of as many, byte-exact (by SHA-256)."""
    port, body = http_backend
    with run_proxy(tmp_path, port, "--cert", str(rsa_cert.cert), "--key", str(rsa_cert.key)) as proxy:
        command = [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{proxy.port}",
            "-quiet",
            f"-tls{version.replace('.', '_')}",
        ]
        got = subprocess.run(
            command, input=b"GET /blob HTTP/1.0\r\n\r\n", capture_output=True, timeout=TIMEOUT * 3, check=True
        )
        head, _, downloaded = got.stdout.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200")
        assert hashlib.sha256(downloaded).digest() == hashlib.sha256(body).digest()
        request = f"POST /sha256 HTTP/1.0\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        posted = subprocess.run(command, input=request, capture_output=True, timeout=TIMEOUT * 3, check=True)
        assert posted.stdout.endswith(hashlib.sha256(body).hexdigest().encode())
        lines = wait_for_log(proxy, 2)
    assert_kernel_did_it(lines[0])
    assert f"down={len(body) + len(head) + 4} " in lines[0]
    assert f"up={len(request)} " in lines[1]


@pytest.mark.kernel
@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_curl_both_ways_through_the_proxy(
    tmp_path: Path, http_backend: tuple[int, bytes], version: str, rsa_cert: CertFiles
) -> None:
    """curl: download and upload ``MIB`` MiB each, byte-exact (by SHA-256)."""
    port, body = http_backend
    upload = tmp_path / "upload.bin"
    upload.write_bytes(body)
    pin = ["--tlsv1.2", "--tls-max", "1.2"] if version == "1.2" else ["--tlsv1.3"]
    with run_proxy(tmp_path, port, "--cert", str(rsa_cert.cert), "--key", str(rsa_cert.key)) as proxy:
        url = f"https://127.0.0.1:{proxy.port}"
        curl = ["curl", "-sS", "--fail", "--http1.1", "--cacert", str(rsa_cert.cert), *pin]
        got = subprocess.run([*curl, f"{url}/blob"], capture_output=True, timeout=TIMEOUT * 3, check=True)
        assert hashlib.sha256(got.stdout).digest() == hashlib.sha256(body).digest()
        posted = subprocess.run(
            [*curl, "--data-binary", f"@{upload}", f"{url}/sha256"],
            capture_output=True,
            timeout=TIMEOUT * 3,
            check=True,
        )
        assert posted.stdout == hashlib.sha256(body).hexdigest().encode()
        lines = wait_for_log(proxy, 2)
    for line in lines:
        assert_kernel_did_it(line)


_SYSCALL = re.compile(r"^(?:\d+ +)?(\w+)\((\d+)<(?:TCP|TCPv6):.*\) += (\d+)$")
_PAYLOAD_CALLS = {"read", "readv", "recvfrom", "recvmsg", "write", "writev", "sendto", "sendmsg"}


@pytest.mark.kernel
def test_strace_shows_only_splice_moves_payload(
    tmp_path: Path, http_backend: tuple[int, bytes], rsa_cert: CertFiles
) -> None:
    """The proxy under ``strace -f -yy``: every read/write-family call on a TCP socket, summed, is the
    handshakes and control records (a few KiB), while ``splice`` on TCP sockets moved the payload both ways.
    (The handshake's ``MSG_PEEK`` reads consume nothing: what follows the handshake stays for the kernel.)"""
    port, body = http_backend
    size = min(len(body), 2 << 20)  # strace stops the proxy at every syscall: keep it small under TCG
    upload = tmp_path / "upload.bin"
    upload.write_bytes(body[:size])
    trace = tmp_path / "trace"
    calls = ",".join(sorted(_PAYLOAD_CALLS | {"splice"}))
    prefix = ("strace", "-f", "-qq", "-yy", "--seccomp-bpf", "-e", f"trace={calls}", "-o", str(trace))
    args = ("--cert", str(rsa_cert.cert), "--key", str(rsa_cert.key))
    with run_proxy(tmp_path, port, *args, prefix=prefix) as proxy:
        url = f"https://127.0.0.1:{proxy.port}"
        curl = ["curl", "-sS", "--fail", "--http1.1", "--cacert", str(rsa_cert.cert)]
        got = subprocess.run([*curl, f"{url}/blob/{size}"], capture_output=True, timeout=TIMEOUT * 5, check=True)
        posted = subprocess.run(
            [*curl, "--data-binary", f"@{upload}", f"{url}/sha256"],
            capture_output=True,
            timeout=TIMEOUT * 5,
            check=True,
        )
        assert posted.stdout == hashlib.sha256(body[:size]).hexdigest().encode()
        wait_for_log(proxy, 2)
    assert got.stdout == body[:size]
    copied = spliced = 0
    for line in trace.read_text().splitlines():
        match = _SYSCALL.match(line)
        if match is None:
            continue
        name, _, result = match.groups()
        if "MSG_PEEK" in line:
            continue  # the handshake's look at what arrived: consumes nothing, the records stay for the kernel
        if name == "splice":
            spliced += int(result)
        elif name in _PAYLOAD_CALLS:
            copied += int(result)
    # Counted where a TCP socket is the source: each byte once per direction (it then leaves the pipe).
    assert spliced >= 2 * size, f"splice moved {spliced} bytes out of TCP sockets"
    assert copied < 64 * 1024, f"{copied} bytes went through read/write-family calls"


@pytest.mark.kernel
@pytest.mark.parametrize("key_update", [False, True])
def test_key_update_and_close_notify_mid_transfer(tmp_path: Path, echo_backend: Backend, key_update: bool) -> None:
    """An independent TLS 1.3 client sends data, a KeyUpdate (on kernels that follow one), more data, then
    close_notify while the echo is still coming back: the backend gets FIN after exactly those bytes, its
    answer arrives whole, then the proxy's close_notify — half-close carried both ways."""
    if key_update and not probe().rekey:
        pytest.skip("the kernel cannot take a new receive key (Linux < 6.14)")
    with run_proxy(tmp_path, echo_backend.port) as proxy:
        client = RawTLS13Client(os.urandom(32))
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT)
        with sock:
            sock.sendall(client.client_hello())
            while not client.server_finished:
                client.receive(sock.recv(65536))
            sock.sendall(client.client_finished())
            arrived = bytearray()

            def read() -> None:
                while chunk := sock.recv(1 << 20):
                    arrived.extend(chunk)

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            first, second = os.urandom(700_000), os.urandom(500_000)
            wire = b"".join(client.seal(first[i : i + 16384]) for i in range(0, len(first), 16384))
            if key_update:
                assert client.client_app is not None
                wire += client.client_app.seal(HANDSHAKE, bytes([24, 0, 0, 1, 0]))  # update_not_requested
                client.client_app_secret = hkdf_expand_label(client.client_app_secret, b"traffic upd", b"", 32)
                client.client_app = protection(client.client_app_secret)
            wire += b"".join(client.seal(second[i : i + 9000]) for i in range(0, len(second), 9000))
            assert client.client_app is not None
            wire += client.client_app.seal(ALERT, b"\x01\x00")
            sock.sendall(wire)
            reader.join(TIMEOUT)
            assert not reader.is_alive()
        client.receive(bytes(arrived))
        assert bytes(client.application_data) == first + second
        assert client.alerts == [b"\x01\x00"]  # the proxy's close_notify, after all of it
        (line,) = wait_for_log(proxy, 1)
    assert_kernel_did_it(line)
    assert "closed" in line


@pytest.mark.kernel
def test_backend_refusing_and_resetting(tmp_path: Path, rsa_cert: CertFiles) -> None:
    """A backend that refuses: the client gets a clean close at once. One that resets mid-connection: the
    client's connection ends (no hang), and the proxy goes on serving."""
    closed_port = free_port()
    with run_proxy(tmp_path, closed_port, "--connect-timeout", "5") as proxy:
        with tls_client(proxy.port) as client:
            assert client.recv(100) == b""
        assert "unreachable" in wait_for_log(proxy, 1)[0]
    backend = Backend(reset_after_first_bytes)
    try:
        with run_proxy(tmp_path, backend.port) as proxy:
            for _ in range(2):
                with tls_client(proxy.port) as client:
                    client.sendall(b"hello")
                    with contextlib.suppress(ConnectionResetError, ssl.SSLError):
                        assert client.recv(100) == b""
            lines = wait_for_log(proxy, 2)
    finally:
        backend.close()
    assert backend.first_bytes == [b"hello", b"hello"]
    assert all("error" in line or "closed" in line for line in lines), lines


@pytest.mark.kernel
def test_a_client_that_stops_reading_costs_bounded_memory(tmp_path: Path) -> None:
    """The backend writes as fast as it can to a client that reads nothing: the proxy stops reading the
    backend once its pipe and the client's socket are full, so the backend is held back by TCP and the
    proxy's memory does not grow with what the backend would send; the idle timeout then ends it."""
    pushed: list[int] = []

    def flood(backend: Backend, conn: socket.socket) -> None:
        conn.settimeout(3)
        chunk = bytes(1 << 20)
        total = 0
        with contextlib.suppress(OSError):
            while total < 256 << 20:
                conn.sendall(chunk)
                total += len(chunk)
        pushed.append(total)

    backend = Backend(flood)
    try:
        with run_proxy(tmp_path, backend.port, "--idle-timeout", "8") as proxy:
            before = proxy.rss_kib()
            client = tls_client(proxy.port)
            with client:
                deadline = time.monotonic() + TIMEOUT
                while not pushed and time.monotonic() < deadline:
                    time.sleep(0.2)
                during = proxy.rss_kib()
                line = wait_for_log(proxy, 1)[0]
    finally:
        backend.close()
    assert pushed, "the backend never blocked"
    assert pushed[0] < 64 << 20, f"the backend pushed {pushed[0]} bytes into a client that reads nothing"
    assert during - before < 16 * 1024, f"the proxy grew from {before} to {during} KiB"
    assert "idle for 8 s" in line


@pytest.mark.kernel
def test_500_concurrent_connections(tmp_path: Path, echo_backend: Backend) -> None:
    """500 TLS connections open at once through one worker, each echoing its own bytes."""
    count = 500
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # our clients and the backend's ends: ~1000
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    with run_proxy(tmp_path, echo_backend.port, "--handshake-timeout", "120") as proxy:
        clients: list[ssl.SSLSocket] = []
        try:
            for _ in range(count):
                clients.append(tls_client(proxy.port))
            for index, client in enumerate(clients):
                client.sendall(index.to_bytes(4, "big") * 64)
            for index, client in enumerate(clients):
                received = b""
                while len(received) < 256:
                    received += client.recv(256 - len(received))
                assert received == index.to_bytes(4, "big") * 64
        finally:
            for client in clients:
                client.close()
        lines = wait_for_log(proxy, count)
    assert len(lines) == count
    for line in lines:
        assert_kernel_did_it(line)


@pytest.mark.kernel
def test_backend_tls_plain_in_kernel_tls_out(tmp_path: Path, rsa_cert: CertFiles) -> None:
    """``--backend-tls``: a plain client, the proxy's TLS (kernel) to a backend speaking Python's ``ssl``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(rsa_cert.cert, rsa_cert.key)

    def tls_echo(backend: Backend, conn: socket.socket) -> None:
        with context.wrap_socket(conn, server_side=True) as tls:
            while data := tls.recv(262144):
                tls.sendall(data)

    backend = Backend(tls_echo)
    try:
        args = ("--backend-tls", "--backend-ca", str(rsa_cert.cert), "--backend-name", "localhost")
        with run_proxy(tmp_path, backend.port, *args) as proxy:
            payload = os.urandom(3 << 20)
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as plain:
                assert echo_exchange(plain, payload) == payload
            line = wait_for_log(proxy, 2)[-1]  # the first: wait_for_port's connection, which sent nothing
    finally:
        backend.close()
    assert_kernel_did_it(line)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe_sock:
            probe_sock.bind(("::1", 0))
    except OSError:
        return False
    return True


class HeaderBackend(Backend):
    """Reads each connection's PROXY header with the strict parser, then echoes (over TLS with ``context``)."""

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        self.headers: list[ParsedProxyHeader] = []
        self.errors: list[Exception] = []
        self.context = context
        super().__init__(HeaderBackend._serve)

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.headers.append(read_proxy_header(conn))
        except (ProxyHeaderError, OSError) as exc:
            self.errors.append(exc)
            return
        if self.context is None:
            echo(self, conn)
            return
        with self.context.wrap_socket(conn, server_side=True) as tls:
            while data := tls.recv(262144):
                tls.sendall(data)


@pytest.mark.kernel
@pytest.mark.parametrize(("version", "family"), [("v1", "TCP4"), ("v2", "TCP6")])
def test_proxy_protocol_on_the_wire(tmp_path: Path, rsa_cert: CertFiles, version: str, family: str) -> None:
    """``--proxy-protocol v1|v2`` in front of a backend that reads the header with the strict parser above: the
    client's own address and port arrive (and the proxy's, as destination), then the client's bytes, spliced by
    the kernel, byte-exact both ways. Each version and each family once: how every version encodes every family
    is the header's own test (``test_proxy_header_v1_and_v2_as_the_spec_writes_them``, the strict parser's)."""
    host = "127.0.0.1" if family == "TCP4" else "::1"
    if family == "TCP6" and not _ipv6_loopback():
        pytest.skip("no IPv6 loopback address in this guest")
    backend = HeaderBackend()
    args = ("--proxy-protocol", version, "--cert", str(rsa_cert.cert), "--key", str(rsa_cert.key))
    try:
        with run_proxy(tmp_path, backend.port, *args, host=host) as proxy:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.load_verify_locations(rsa_cert.cert)
            context.check_hostname = False
            raw = socket.create_connection((host, proxy.port), timeout=TIMEOUT)
            payload = os.urandom(64 << 10)
            with context.wrap_socket(raw) as client:
                source = client.getsockname()[:2]
                assert echo_in_turn(client, payload) == payload
            lines = wait_for_log(proxy, 1)  # (wait_for_port's connection never started TLS: no line)
    finally:
        backend.close()
    assert not backend.errors, backend.errors
    ours = [header for header in backend.headers if header.source == source]
    assert ours == [ParsedProxyHeader(int(version[1]), family, source, (host, proxy.port), ours[0].size)]
    assert_kernel_did_it(lines[-1])
    assert f"up={len(payload)} down={len(payload)}" in lines[-1]


@pytest.mark.kernel
@pytest.mark.parametrize("version", ["v2"])
def test_proxy_protocol_before_the_backend_tls_handshake(tmp_path: Path, rsa_cert: CertFiles, version: str) -> None:
    """``--backend-tls --proxy-protocol``: the header goes in the clear before the ClientHello; the backend reads
    it (strict parser), then Python's ``ssl`` takes the rest of the stream, and the kernel encrypts the relay.
    One version: where the header goes does not depend on how it is encoded."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(rsa_cert.cert, rsa_cert.key)
    backend = HeaderBackend(context)
    args = ("--backend-tls", "--backend-ca", str(rsa_cert.cert), "--backend-name", "localhost")
    try:
        with run_proxy(tmp_path, backend.port, *args, "--proxy-protocol", version) as proxy:
            payload = os.urandom(1 << 20)
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as plain:
                source = plain.getsockname()
                assert echo_exchange(plain, payload) == payload
            line = wait_for_log(proxy, 2)[-1]
    finally:
        backend.close()
    assert not backend.errors, backend.errors
    ours = [header for header in backend.headers if header.source == source]
    assert ours == [ParsedProxyHeader(int(version[1]), "TCP4", source, ("127.0.0.1", proxy.port), ours[0].size)]
    assert_kernel_did_it(line)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
                if int(fields[1]) == pid:
                    found.append(int(entry.name))
    return found


def _tcp_sockets(port: int, state: str) -> set[int]:
    """Inodes of the IPv4 TCP sockets on local ``port`` in ``state`` (``/proc/net/tcp``: 01 established,
    0A listening)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rpartition(":")[2], 16) == port and fields[3] == state:
            inodes.add(int(fields[9]))
    return inodes


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


@pytest.mark.kernel
def test_two_workers_both_serve(tmp_path: Path, echo_backend: Backend, rsa_cert: CertFiles) -> None:
    """``--workers 2``: two processes each listen on the port (``SO_REUSEPORT``: two listening sockets in
    ``/proc/net/tcp``), the kernel spreads connections over them, and each worker holds and relays some of
    32 concurrent connections (seen from ``/proc``: whose descriptors the accepted sockets are), byte-exact."""
    count = 32  # the kernel picks a listener by a hash of the 4-tuple: all on one has odds 2**-31
    args = ("--workers", "2", "--cert", str(rsa_cert.cert), "--key", str(rsa_cert.key))
    with run_proxy(tmp_path, echo_backend.port, *args) as proxy:
        deadline = time.monotonic() + TIMEOUT
        while len(_tcp_sockets(proxy.port, "0A")) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(_tcp_sockets(proxy.port, "0A")) == 2, "two listeners"
        workers = _children(proxy.process.pid)
        assert len(workers) == 2
        clients = [tls_client(proxy.port) for _ in range(count)]
        try:
            for index, client in enumerate(clients):
                payload = index.to_bytes(4, "big") * 4096
                assert echo_in_turn(client, payload) == payload, f"client {index}: {proxy.log.read_text()}"
            accepted = _tcp_sockets(proxy.port, "01")
            held = {pid: len(_socket_inodes(pid) & accepted) for pid in workers}
        finally:
            for client in clients:
                client.close()
        lines = wait_for_log(proxy, count)
    assert sum(held.values()) == count, held
    assert all(held.values()), f"connections per worker: {held}"
    assert len(lines) == count
    for line in lines:
        assert_kernel_did_it(line)
        assert f"up={4 * 4096} down={4 * 4096} " in line


# -- the host: the fallback relays by copy ---------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_fallback_relays_by_copy(tmp_path: Path, echo_backend: Backend, version: str) -> None:
    """Without kTLS (the host) the proxy still relays, byte-exact, over userspace TLS, and says so."""
    if KERNEL:
        pytest.skip("this machine has kTLS: the fallback is not taken")
    with run_proxy(tmp_path, echo_backend.port) as proxy:
        payload = os.urandom(256 << 10)
        with tls_client(proxy.port, VERSIONS[version]) as client:
            assert echo_in_turn(client, payload) == payload
        (line,) = wait_for_log(proxy, 1)
        assert "kernel TLS: no" in proxy.log.read_text()
    assert "kernel_tx=no kernel_rx=no" in line
    assert f"up={len(payload)} down={len(payload)}" in line


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxy_protocol_header_reaches_the_backend_first(tmp_path: Path, version: str) -> None:
    """``--proxy-protocol``: the header, then the client's bytes (both TLS directions: in, and --backend-tls)."""
    backend = Backend(record_proxy_header)
    try:
        with run_proxy(tmp_path, backend.port, "--proxy-protocol", version) as proxy, tls_client(proxy.port) as client:
            source = client.getsockname()
            client.sendall(b"hello")
            assert client.recv(2) == b"ok"
    finally:
        backend.close()
    expected = proxy_header(version, source, ("127.0.0.1", proxy.port))
    assert backend.first_bytes == [expected + b"hello"]


def test_backend_tls_fallback_on_the_host(tmp_path: Path, rsa_cert: CertFiles) -> None:
    """``--backend-tls`` where the kernel has no TLS: relayed by copy, byte-exact."""
    if KERNEL:
        pytest.skip("this machine has kTLS: the fallback is not taken")
    test_backend_tls_plain_in_kernel_tls_out(tmp_path, rsa_cert)


def test_graceful_stop_lets_a_connection_finish(tmp_path: Path, echo_backend: Backend) -> None:
    """SIGTERM stops accepting; an open connection still relays until it ends; then the proxy exits."""
    with run_proxy(tmp_path, echo_backend.port, "--stop-grace", "20") as proxy:
        client = tls_client(proxy.port)
        with client:
            assert echo_in_turn(client, b"before") == b"before"
            proxy.process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(ConnectionRefusedError):  # no longer accepting
                socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
            assert echo_in_turn(client, b"after the stop") == b"after the stop"
        assert proxy.process.wait(TIMEOUT) == 0

"""``ktls serve`` facing the internet: every defect of the review, by a test that failed before the fix.

Sans-IO first (the HTTP decisions on plain values, and a hypothesis fuzz of the request-head parser: it
yields a request or a ``BadRequest``, nothing else), then the real server — ``python -m ktls serve`` with
short timeouts — over the wire with stdlib ``ssl`` clients sending exactly the bytes a test wants: over
userspace TLS on the host, over kernel TLS in the guests (the ``kernel`` variants).
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ktls.serve.http import MAX_DISCARDED_BODY, BadRequest, Request, parse_request, printable, respond
from support import free_port, wait_for_port

# -- the files ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("site")
    www = base / "www"
    www.mkdir()
    (www / "hello.txt").write_text("hello\n")
    (www / "big.bin").write_bytes(os.urandom(4 * 1024 * 1024))
    (www / ".env").write_text("SECRET=1\n")
    (www / ".git").mkdir()
    (www / ".git" / "config").write_text("[core]\n")
    os.symlink(www / ".env", www / "innocent.txt")  # a visible name for a hidden file
    (www / "sub").mkdir()
    (base / "outside.html").write_text("<p>outside the root</p>\n")
    os.symlink(base / "outside.html", www / "sub" / "index.html")  # the index-file escape
    (www / "names").mkdir()
    (www / "names" / os.fsdecode(b"caf\xe9.txt")).write_text("latin-1 name\n")  # not UTF-8
    (www / "names" / "ok.txt").write_text("ok\n")
    return www


def request(target: str, method: str = "GET", **fields: str) -> Request:
    head = f"{method} {target} HTTP/1.1\r\nHost: x" + "".join(f"\r\n{k}: {v}" for k, v in fields.items())
    return parse_request(head.encode("latin-1"))


def answer(root: Path, target: str, method: str = "GET", *, show_hidden: bool = False, **fields: str) -> int:
    response = respond(request(target, method, **fields), root, show_hidden=show_hidden)
    response.close()
    return response.status


# -- sans-IO -----------------------------------------------------------------------------------------------------


def test_an_index_file_symlink_cannot_escape_the_root(root: Path) -> None:
    # Before: GET /sub/ served sub/index.html's target outside the root (only the directory was checked).
    response = respond(request("/sub/"), root)
    response.close()
    assert response.status == 200
    assert response.file is None  # a listing, not the file behind the symlink
    assert b"outside the root" not in response.body


@pytest.mark.parametrize(
    ("target", "fields", "status"),
    [
        ("/sub", {}, 301),
        ("/missing", {}, 404),
        ("/hello.txt", {"Range": "bytes=999-"}, 416),
    ],
)
def test_head_answers_never_carry_a_body(root: Path, target: str, fields: dict[str, str], status: int) -> None:
    # Before: HEAD answers for 301/404/405/416 carried the error page: a kept-alive client desynchronised.
    response = respond(request(target, "HEAD", **fields), root)
    response.close()
    assert response.status == status
    assert not response.has_body
    assert response.body_length == 0
    assert any(name == "Content-Length" for name, _ in response.headers)
    bad_method = respond(parse_request(b"HEAD / HTTP/1.1\r\nHost: x"), root)
    bad_method.close()
    assert not bad_method.has_body
    assert not BadRequest("x").response(head_only=True).has_body


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        ({"Transfer-Encoding": "chunked"}, 501),
        ({"Transfer-Encoding": "chunked", "Content-Length": "5"}, 400),
        ({"Content-Length": str(MAX_DISCARDED_BODY + 1)}, 413),
        ({"Content-Length": "5, 6"}, 400),
        ({"Content-Length": "-1"}, 400),
        ({"Content-Length": "0x10"}, 400),
    ],
)
def test_request_bodies_are_refused_or_bounded(fields: dict[str, str], status: int) -> None:
    # Before: bodies were neither read nor refused — parsed as the next request (smuggling behind a proxy).
    with pytest.raises(BadRequest) as raised:
        request("/", **fields)
    assert raised.value.status == status
    assert request("/", **{"Content-Length": "5"}).content_length == 5  # read and dropped by the server
    assert request("/", **{"Content-Length": "5, 5"}).content_length == 5


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b",  # two Host fields (RFC 9112 §3.2)
        b"GET / HTTP/1.1\nHost: x",  # a bare LF
        b"GET /\x1b[31m HTTP/1.1\r\nHost: x",  # a control character in the target
        b"GET / HTTP/1.1\r\nHost: x\r\n folded",  # obsolete line folding
        b"GET http://evil/ HTTP/1.1\r\nHost: x",  # not origin-form
        b"GET / HTTP/1.1\r\nHost: x\x07",  # a control character in a field value
        b"GET / HTTP/1.1\r\nHost : x",  # a space before the colon
        b"GET  / HTTP/1.1\r\nHost: x",  # two spaces
    ],
)
def test_malformed_heads_are_400(head: bytes) -> None:
    with pytest.raises(BadRequest) as raised:
        parse_request(head)
    assert raised.value.status == 400


def test_non_utf8_names_are_listed_and_served(root: Path) -> None:
    # Before: a non-UTF-8 file name made the listing raise; the connection died without a log line.
    listing = respond(request("/names/"), root)
    assert listing.status == 200
    assert b'href="caf%E9.txt"' in listing.body
    assert b"caf\\xe9.txt" in listing.body  # shown escaped, never as broken text
    assert answer(root, "/names/caf%E9.txt") == 200


def test_dot_files_are_hidden_unless_asked(root: Path) -> None:
    # Before: dot-files were listed and served (.env, .git/config).
    for target in ("/.env", "/.git/config", "/.git/", "/innocent.txt", "/%2eenv"):
        assert answer(root, target) == 404, target
    listing = respond(request("/"), root)
    assert b".env" not in listing.body
    assert b".git" not in listing.body
    assert answer(root, "/.env", show_hidden=True) == 200
    assert b".env" in respond(request("/"), root, show_hidden=True).body


def test_log_text_has_no_control_characters() -> None:
    # Before: a bare LF (or an escape sequence) in the request line was written into the access log.
    text = printable(b'GET /\x1b[2J\nforged "line" HTTP/1.1\x7f\xff')
    assert all(0x20 <= ord(c) < 0x7F for c in text)
    assert "\\x1b" in text
    assert "\\x0a" in text


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_give_a_request_or_a_bad_request(head: bytes) -> None:
    try:
        parsed = parse_request(head)
    except BadRequest as exc:
        status = exc.status
    else:
        status = 200
        assert parsed.method
        assert parsed.target.startswith("/")
    assert status == 200 or status in BadRequest.REASONS


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_valid_heads_give_a_request_or_a_bad_request(data: st.DataObject) -> None:
    head = bytearray(b"GET /a/b?c=d HTTP/1.1\r\nHost: example\r\nRange: bytes=0-9\r\nContent-Length: 3")
    for _ in range(data.draw(st.integers(1, 5))):
        position = data.draw(st.integers(0, len(head) - 1))
        head[position] = data.draw(st.integers(0, 255))
    try:
        parse_request(bytes(head))
    except BadRequest:
        pass


# -- the real server ---------------------------------------------------------------------------------------------

TIMEOUTS = ["--handshake-timeout", "2", "--head-timeout", "2", "--idle-timeout", "3", "--send-timeout", "3"]
MODES = [pytest.param("kernel", marks=pytest.mark.kernel), "userspace"]


class Served:
    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process = process
        self.port = port
        self.log = log

    def descriptors(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def open_files(self) -> list[str]:
        """What the server's descriptors point at (for a failure message)."""
        names = []
        for fd in os.listdir(f"/proc/{self.process.pid}/fd"):
            with contextlib.suppress(OSError):
                names.append(f"{fd} -> {os.readlink(f'/proc/{self.process.pid}/fd/{fd}')}")
        return names

    def connect(self, timeout: float = 20) -> ssl.SSLSocket:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        return context.wrap_socket(sock, server_hostname="localhost")


def start(root: Path, tmp_path: Path, *extra: str, limit_descriptors: int | None = None) -> Served:
    port = free_port()
    log = tmp_path / f"serve-{port}.log"

    def limit() -> None:
        if limit_descriptors is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit_descriptors, limit_descriptors))

    command = [sys.executable, "-m", "ktls", "serve", str(root), "--port", str(port), *TIMEOUTS, *extra]
    with log.open("wb") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, preexec_fn=limit)  # noqa: PLW1509
    wait_for_port(port, process)
    return Served(process, port, log)


@pytest.fixture(params=MODES)
def served(request: pytest.FixtureRequest, root: Path, tmp_path: Path) -> Iterator[Served]:
    server = start(root, tmp_path)
    try:
        yield server
    finally:
        server.process.terminate()
        assert server.process.wait(30) == 0


def read_response(tls: ssl.SSLSocket, buffer: bytearray, *, head_only: bool = False) -> tuple[bytes, bytes]:
    """One response (head, body) from ``buffer`` + the connection, framed by Content-Length."""
    while b"\r\n\r\n" not in buffer:
        data = tls.recv(65536)
        assert data, "closed before a response head"
        buffer += data
    end = buffer.index(b"\r\n\r\n")
    head = bytes(buffer[:end])
    del buffer[: end + 4]
    match = re.search(rb"Content-Length: (\d+)", head)
    length = 0 if head_only or match is None or head.startswith(b"HTTP/1.1 304") else int(match[1])
    while len(buffer) < length:
        data = tls.recv(65536)
        assert data, "closed inside a response body"
        buffer += data
    body = bytes(buffer[:length])
    del buffer[:length]
    return head, body


def test_head_then_get_on_one_connection_stays_in_step(served: Served) -> None:
    with served.connect() as tls:
        tls.sendall(b"HEAD /missing HTTP/1.1\r\nHost: x\r\n\r\nGET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        buffer = bytearray()
        head, _ = read_response(tls, buffer, head_only=True)
        assert head.startswith(b"HTTP/1.1 404")
        head, body = read_response(tls, buffer)
        assert head.startswith(b"HTTP/1.1 200")
        assert body == b"hello\n"


def test_a_request_body_is_never_parsed_as_a_request(served: Served) -> None:
    smuggled = b"GET /.env HTTP/1.1\r\nHost: x\r\n\r\n"
    with served.connect() as tls:
        tls.sendall(
            b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(smuggled)
            + smuggled
            + b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        buffer = bytearray()
        for _ in range(2):  # two answers, both for hello.txt: the body was read and dropped
            head, body = read_response(tls, buffer)
            assert head.startswith(b"HTTP/1.1 200"), head
            assert body == b"hello\n"
    with served.connect() as tls:
        tls.sendall(b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        head, _ = read_response(tls, bytearray())
        assert head.startswith(b"HTTP/1.1 501")
        assert b"Connection: close" in head
        assert tls.recv(100) == b""  # closed: the chunked body is never read as a request


def test_a_file_that_shrinks_mid_response_closes_the_connection(served: Served, root: Path, tmp_path: Path) -> None:
    # Before: a short body on a kept-alive connection — the client took the next bytes for the body.
    victim = root / "shrinking.bin"
    victim.write_bytes(os.urandom(4 * 1024 * 1024))
    try:
        with served.connect() as tls:
            tls.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
            tls.sendall(b"GET /shrinking.bin HTTP/1.1\r\nHost: x\r\n\r\n")
            first = tls.recv(4096)
            assert first.startswith(b"HTTP/1.1 200")
            os.truncate(victim, 512 * 1024)
            received = len(first)
            while data := tls.recv(65536):
                received += len(data)
            assert received < 4 * 1024 * 1024  # the connection ended short, not kept alive
    finally:
        victim.unlink()


def test_slow_clients_cannot_hold_the_server(served: Served) -> None:
    """Slowloris: trickling clients are dropped when their head's deadline passes, and a fresh client is
    answered meanwhile."""
    trickling = []
    for _ in range(20):  # bench/serve_attacks.py measures a few hundred
        tls = served.connect()
        tls.sendall(b"GET / HTTP/1.1\r\n")
        trickling.append(tls)
    started = time.monotonic()
    with served.connect() as fresh:
        fresh.sendall(b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        _, body = read_response(fresh, bytearray())
    assert body == b"hello\n"
    assert time.monotonic() - started < 5
    live = list(trickling)
    deadline = time.monotonic() + 10  # the head deadline is 2 s
    while live and time.monotonic() < deadline:
        for tls in list(live):
            try:
                tls.sendall(b"X")  # a byte at a time, forever
            except OSError:
                live.remove(tls)
        time.sleep(0.2)
    for tls in trickling:
        tls.close()
    assert not live, f"{len(live)} trickling clients were kept past the head deadline"


def test_descriptor_exhaustion_does_not_stop_the_server(root: Path, tmp_path: Path) -> None:
    """Before: accept() re-raised EMFILE and the worker's accept loop died. Now the connection limit is kept
    below the descriptor limit: the surplus waits in the backlog, and the server answers once they go."""
    server = start(root, tmp_path, limit_descriptors=160)
    try:
        baseline = server.descriptors()
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(300)]  # no handshake
        time.sleep(1)
        assert server.process.poll() is None
        assert server.descriptors() < 160
        with server.connect(timeout=30) as fresh:  # answered once the idle ones' handshakes time out
            fresh.sendall(b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert read_response(fresh, bytearray())[1] == b"hello\n"
        for sock in idle:
            sock.close()
        deadline = time.monotonic() + 45  # the backlog drains through handshakes that fail at once; slow hosts
        while server.descriptors() > baseline + 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert server.descriptors() <= baseline + 2, server.open_files()
    finally:
        server.process.terminate()
        assert server.process.wait(30) == 0


def test_control_characters_never_reach_the_log(served: Served) -> None:
    with served.connect() as tls:
        tls.sendall(b"GET /\x1b[2J HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _ = read_response(tls, bytearray())
        assert head.startswith(b"HTTP/1.1 400")
    with served.connect() as tls:
        tls.sendall(b"GET /hello.txt?\x1b HTTP/1.1\r\nHost: x\r\n\r\n")
        read_response(tls, bytearray())
    served.process.terminate()
    served.process.wait(30)
    log = served.log.read_bytes()
    assert b"\x1b" not in log
    assert b"\\x1b" in log


def test_openssl_s_client_gets_its_answer(served: Served) -> None:
    """A client we did not write: ``openssl s_client`` (TLS 1.3 and 1.2), a request with a small body that the
    server must read and drop, then a second request on the same connection."""
    requests = (
        b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody"
        b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    for version in ("-tls1_3", "-tls1_2"):
        command = ["openssl", "s_client", "-quiet", "-ign_eof", version, "-connect", f"127.0.0.1:{served.port}"]
        result = subprocess.run(command, input=requests, capture_output=True, timeout=60, check=False)
        assert result.stdout.count(b"HTTP/1.1 200 OK") == 2, result.stdout[-500:]
        assert result.stdout.endswith(b"hello\n")

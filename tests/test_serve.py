"""``ktls serve``: the HTTP decisions on plain values, then the real server fetched by curl.

The host has no kTLS, so there the server runs over userspace TLS and says so in its banner; the tests
marked ``kernel`` run the same downloads in the guests and check that the kernel did the encryption.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ktls.kernel import read_tls_stat
from ktls.serve.http import BadRequest, Request, Response, parse_request, respond

BIG = 3 * 1024 * 1024 + 17


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    www = tmp_path_factory.mktemp("www")
    (www / "big.bin").write_bytes(os.urandom(BIG))
    (www / "hello.txt").write_text("hello\n")
    (www / "sub").mkdir()
    (www / "sub" / "index.html").write_text("<p>index</p>\n")
    (www / "list").mkdir()
    (www / "list" / "a b&c.txt").write_text("x")
    (www.parent / "secret.txt").write_text("outside the root\n")
    os.symlink(www.parent / "secret.txt", www / "escape.txt")
    return www


def request(target: str, **headers: str) -> Request:
    head = f"GET {target} HTTP/1.1\r\nHost: x\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return parse_request(head.encode())


# -- sans-IO decisions -----------------------------------------------------------------------------------------


def region(response: Response) -> tuple[int, int]:
    assert response.file is not None
    response.close()
    return response.file.offset, response.file.length


def test_whole_file_and_head(root: Path) -> None:
    response = respond(request("/big.bin"), root)
    assert response.status == 200
    assert region(response) == (0, BIG)
    assert ("Content-Length", str(BIG)) in response.headers
    head = respond(parse_request(b"HEAD /big.bin HTTP/1.1\r\nHost: x"), root)
    head.close()
    assert head.status == 200
    assert not head.has_body
    assert ("Content-Length", str(BIG)) in head.headers


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("bytes=10-19", (10, 10)),
        ("bytes=100-", (100, BIG - 100)),
        ("bytes=-50", (BIG - 50, 50)),
        ("bytes=5-99999999", (5, BIG - 5)),
    ],
)
def test_single_ranges(root: Path, spec: str, expected: tuple[int, int]) -> None:
    response = respond(request("/big.bin", Range=spec), root)
    assert response.status == 206
    assert region(response) == expected
    assert ("Content-Range", f"bytes {expected[0]}-{expected[0] + expected[1] - 1}/{BIG}") in response.headers


def test_unsatisfiable_and_multi_ranges(root: Path) -> None:
    response = respond(request("/big.bin", Range=f"bytes={BIG}-"), root)
    assert response.status == 416
    assert ("Content-Range", f"bytes */{BIG}") in response.headers
    assert respond(request("/big.bin", Range="bytes=0-1,5-6"), root).status == 200


def test_conditional_requests(root: Path) -> None:
    first = respond(request("/hello.txt"), root)
    etag = dict(first.headers)["ETag"]
    modified = dict(first.headers)["Last-Modified"]
    assert respond(request("/hello.txt", **{"If-None-Match": etag}), root).status == 304
    assert respond(request("/hello.txt", **{"If-Modified-Since": modified}), root).status == 304
    assert respond(request("/hello.txt", **{"If-None-Match": '"other"'}), root).status == 200
    assert respond(request("/big.bin", Range="bytes=0-9", **{"If-Range": '"stale"'}), root).status == 200


@pytest.mark.parametrize(
    "target", ["/../secret.txt", "/%2e%2e/secret.txt", "/sub/../../secret.txt", "/escape.txt", "/nul%00.txt", "/%ff"]
)
def test_traversal_is_impossible(root: Path, target: str) -> None:
    assert respond(request(target), root).status == 404


def test_directories(root: Path) -> None:
    redirect = respond(request("/sub"), root)
    assert redirect.status == 301
    assert ("Location", "/sub/") in redirect.headers
    index = respond(request("/sub/"), root)
    index.close()
    assert index.file is not None
    assert index.file.path == os.fsencode(root / "sub" / "index.html")
    listing = respond(request("/list/"), root)
    assert b"a b&amp;c.txt" in listing.body
    assert b'href="a%20b%26c.txt"' in listing.body


def test_methods_and_bad_heads(root: Path) -> None:
    post = respond(parse_request(b"POST / HTTP/1.1\r\nHost: x"), root)
    assert post.status == 405
    assert ("Allow", "GET, HEAD") in post.headers
    for bad in (
        b"GET /\r\nHost: x",
        b"GET / HTTP/1.1",
        b"GET / HTTP/1.1\r\nBad Header : x\r\nHost: x",
        b"GET / HTTP/2.0",
    ):
        with pytest.raises(BadRequest):
            parse_request(bad)
    assert not parse_request(b"GET / HTTP/1.0").keep_alive
    assert parse_request(b"GET / HTTP/1.1\r\nHost: x").keep_alive


# -- the real server --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(root: Path) -> Iterator[tuple[int, str]]:
    """``python -m ktls serve`` with two workers; yields (port, banner)."""
    port = _free_port()
    command = [sys.executable, "-m", "ktls", "serve", str(root), "--port", str(port), "--workers", "2"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        banner = "".join(process.stdout.readline() for _ in range(5))
        _wait_for(port)
        try:
            yield port, banner
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0, "graceful stop"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for(port: int) -> None:
    import socket

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(port)


def curl(port: int, *args: str) -> subprocess.CompletedProcess[bytes]:
    command = ["curl", "-sS", "--insecure", "--max-time", "120", *args]
    return subprocess.run(command, capture_output=True, check=True, cwd="/")


def url(port: int, path: str) -> str:
    return f"https://127.0.0.1:{port}{path}"


def check_downloads(port: int, root: Path) -> None:
    body = curl(port, url(port, "/big.bin")).stdout
    assert hashlib.sha256(body).digest() == hashlib.sha256((root / "big.bin").read_bytes()).digest()
    part = curl(port, "-r", "1000-1999", url(port, "/big.bin")).stdout
    assert part == (root / "big.bin").read_bytes()[1000:2000]
    head = curl(port, "-I", url(port, "/hello.txt")).stdout.decode()
    assert "200 OK" in head
    assert "Content-Length: 6" in head
    etag = next(line.split(": ", 1)[1].strip() for line in head.splitlines() if line.startswith("ETag"))
    status = curl(
        port, "-o", "/dev/null", "-w", "%{http_code}", "-H", f"If-None-Match: {etag}", url(port, "/hello.txt")
    )
    assert status.stdout == b"304"
    # keep-alive: several requests on one connection (curl reuses it: "Re-using existing connection")
    many = curl(port, "-v", *[url(port, "/hello.txt")] * 5)
    assert many.stdout == b"hello\n" * 5
    assert many.stderr.count(b"Re-using existing connection") + many.stderr.count(b"Reusing existing") >= 4
    traversal = curl(port, "--path-as-is", "-o", "/dev/null", "-w", "%{http_code}", url(port, "/../../etc/passwd"))
    assert traversal.stdout == b"404"
    for version in ("--tlsv1.2", "--tlsv1.3"):
        capped = ["--tls-max", "1.2"] if version == "--tlsv1.2" else []
        assert curl(port, version, *capped, url(port, "/hello.txt")).stdout == b"hello\n"


def test_serve_over_https(server: tuple[int, str], root: Path) -> None:
    port, banner = server
    assert f"https://127.0.0.1:{port}/" in banner
    assert "SHA-256 fingerprint" in banner
    check_downloads(port, root)


@pytest.mark.kernel
def test_serve_with_kernel_tls(server: tuple[int, str], root: Path) -> None:
    port, banner = server
    assert "kernel TLS: yes" in banner
    before = read_tls_stat() or {}
    check_downloads(port, root)
    after = read_tls_stat() or {}
    assert after["TlsTxSw"] > before.get("TlsTxSw", 0), "the kernel encrypted the responses"
    assert after["TlsRxSw"] > before.get("TlsRxSw", 0)

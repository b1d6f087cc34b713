"""Every program in ``examples/`` runs, and does what its docstring says — so they never rot.

Each runs as a subprocess, as a user would run it, against curl or ``ktls serve``; in the guests the kernel
must have done the encryption (``/proc/net/tls_stat`` counters rise); on the host they run over userspace TLS
(except ``byo_keys.py``, which needs the kernel by design).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from certs import CertFiles
from ktls.kernel import probe, read_tls_stat
from support import free_port, wait_for_port

EXAMPLES = Path(__file__).parent.parent / "examples"
MODES = [pytest.param("kernel", marks=pytest.mark.kernel), "userspace"]


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if name == "userspace" and probe().available:
        pytest.skip("kernel TLS is here: the kernel variant runs")
    return name


@pytest.fixture(scope="module")
def payload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("payload")
    (directory / "data.bin").write_bytes(os.urandom(2 * 1024 * 1024 + 11))
    return directory / "data.bin"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def kernel_sent() -> int:
    stat = read_tls_stat() or {}
    return stat.get("TlsTxSw", 0)


def curl(url: str) -> bytes:
    result = subprocess.run(
        ["curl", "-sS", "--insecure", "--max-time", "120", url], capture_output=True, check=True, timeout=180
    )
    return result.stdout


def start(*command: str, port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen([sys.executable, *command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_port(port, process)
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(30)


@pytest.fixture
def counted(mode: str) -> Iterator[None]:
    """In the kernel variant, the kernel must have encrypted something while the example ran."""
    before = kernel_sent()
    yield
    if mode == "kernel":
        assert kernel_sent() > before, "the kernel encrypted nothing"


@pytest.mark.parametrize(
    "example", ["blocking_server.py", "asyncio_sendfile_server.py"], ids=["blocking", "asyncio-sendfile"]
)
def test_file_servers(example: str, rsa_cert: CertFiles, payload: Path, counted: None) -> None:
    port = free_port()
    server = start(
        str(EXAMPLES / example),
        str(payload),
        "--port",
        str(port),
        "--cert",
        str(rsa_cert.cert),
        "--key",
        str(rsa_cert.key),
        port=port,
    )
    try:
        assert sha256(curl(f"https://127.0.0.1:{port}/")) == sha256(payload.read_bytes())
    finally:
        stop(server)


def test_aiohttp_app(rsa_cert: CertFiles, payload: Path, counted: None) -> None:
    pytest.importorskip("aiohttp")
    port = free_port()
    command = [str(EXAMPLES / "aiohttp_app.py"), str(payload.parent), "--port", str(port)]
    server = start(*command, "--cert", str(rsa_cert.cert), "--key", str(rsa_cert.key), port=port)
    try:
        assert sha256(curl(f"https://127.0.0.1:{port}/{payload.name}")) == sha256(payload.read_bytes())
    finally:
        stop(server)


def test_uvicorn_app(rsa_cert: CertFiles, counted: None) -> None:
    pytest.importorskip("uvicorn")
    port = free_port()
    command = [str(EXAMPLES / "uvicorn_app.py"), "--port", str(port)]
    server = start(*command, "--cert", str(rsa_cert.cert), "--key", str(rsa_cert.key), port=port)
    try:
        assert curl(f"https://127.0.0.1:{port}/") == b"hello from uvicorn on kernel TLS\n"
    finally:
        stop(server)


def test_https_get(payload: Path, counted: None) -> None:
    port = free_port()
    serve = [sys.executable, "-m", "ktls", "serve", str(payload.parent), "--port", str(port)]
    server = subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, server)
    try:
        url = f"https://127.0.0.1:{port}/{payload.name}"
        result = subprocess.run(
            [sys.executable, str(EXAMPLES / "https_get.py"), url, "--insecure"],
            capture_output=True,
            check=True,
            timeout=180,
        )
        assert sha256(result.stdout) == sha256(payload.read_bytes())
        assert b"200 OK" in result.stderr
    finally:
        stop(server)


@pytest.mark.kernel
def test_byo_keys() -> None:
    command = [sys.executable, str(EXAMPLES / "byo_keys.py")]
    result = subprocess.run(command, capture_output=True, check=False, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert b"both through the kernel" in result.stdout

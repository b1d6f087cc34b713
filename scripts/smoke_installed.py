"""Smoke test of an installed ktls (run by ``scripts/test`` with the fresh venv's Python, ``-I``, from ``/``):
the package imported is the installed one, not the checkout; ``ktls --version`` and ``ktls check`` run;
``ktls serve`` starts, answers a real HTTPS request and stops cleanly on SIGTERM."""

from __future__ import annotations

import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ktls


def main() -> int:
    venv = Path(sys.executable).parent
    installed = Path(ktls.__file__).resolve()
    assert str(installed).startswith(str(venv.parent.resolve())), f"ktls imported from {installed}, not the venv"
    command = str(venv / "ktls")
    version = subprocess.run([command, "--version"], capture_output=True, text=True, check=True).stdout
    assert version.strip() == f"ktls {ktls.__version__}", version
    check = subprocess.run([command, "check"], capture_output=True, text=True, check=False)
    assert check.returncode in (0, 1), check.stderr  # 1: this kernel has no kTLS, and it said so
    assert "kernel:" in check.stdout
    with tempfile.TemporaryDirectory() as root:
        (Path(root) / "hello.txt").write_text("hello from the installed wheel\n")
        with subprocess.Popen(
            [command, "serve", root, "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        ) as server:
            assert server.stdout is not None
            match = re.search(r"https://127\.0\.0\.1:(\d+)/", server.stdout.readline())
            assert match, "no address in the banner"
            body = fetch(int(match[1]), "/hello.txt")
            server.send_signal(signal.SIGTERM)
            assert server.wait(30) == 0
    assert body.endswith(b"hello from the installed wheel\n"), body
    print(f"smoke: {installed.parent} {ktls.__version__}: --version, check, serve ok")
    return 0


def fetch(port: int, path: str) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + 30
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    with context.wrap_socket(sock, server_hostname="localhost") as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    return data


if __name__ == "__main__":
    sys.exit(main())

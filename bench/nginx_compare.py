#!/usr/bin/env python3
"""`ktls serve` against nginx (Debian's, OpenSSL in user space), same files, same client, one run.

Serves one large file and many small files from both servers over HTTPS (same self-signed certificate,
TLS 1.3, AES-256-GCM as both negotiate by default) and fetches them with the same curl commands:

* large: the large file downloaded ``--repeat`` times (one connection each);
* small: every small file on one keep-alive connection (``curl`` given all URLs at once).

Reports wall-clock throughput and the server's CPU time (user + system of its process tree, from
/proc/<pid>/stat), and the ratio ktls/nginx. Run it where kTLS exists, e.g. in a guest:

    scripts/kernel_matrix.py --kernels 7.2 --run ".venv/bin/python bench/nginx_compare.py"

Needs nginx and curl (`apt-get install nginx-light curl`); one nginx worker and one ktls worker, so both
get the same share of the machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    keepalive_requests 100000;
    types {{ application/octet-stream bin; text/plain txt; }}
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        root {root};
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(port: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def tree_cpu(pid: int) -> float:
    """User + system seconds of ``pid`` and its children (nginx master + worker, ktls parent + workers)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None and (int(entry.name) == pid or int(fields[1]) == pid):  # fields[1]: ppid
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def curl(*args: str) -> None:
    subprocess.run(["curl", "-sS", "--insecure", "-o", "/dev/null", *args], check=True, cwd="/")


def measure(pid: int, port: int, root: Path, *, repeat: int, small: list[str]) -> dict[str, float]:
    base = f"https://127.0.0.1:{port}"
    curl(f"{base}/large.bin")  # warm the page cache and the server
    size = (root / "large.bin").stat().st_size
    cpu, start = tree_cpu(pid), time.perf_counter()
    for _ in range(repeat):
        curl(f"{base}/large.bin")
    large_seconds, large_cpu = time.perf_counter() - start, tree_cpu(pid) - cpu
    urls = [f"{base}/small/{name}" for name in small]
    args = [arg for url in urls for arg in ("-o", "/dev/null", url)]
    cpu, start = tree_cpu(pid), time.perf_counter()
    subprocess.run(["curl", "-sS", "--insecure", *args], check=True, cwd="/")
    small_seconds, small_cpu = time.perf_counter() - start, tree_cpu(pid) - cpu
    gib = repeat * size / 2**30
    return {
        "large MiB/s": repeat * size / 2**20 / large_seconds,
        "large server CPU s/GiB": large_cpu / gib,
        "small files/s": len(small) / small_seconds,
        "small server CPU ms/file": 1000 * small_cpu / len(small),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large-mib", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--small", type=int, default=200, help="number of 4 KiB files")
    args = parser.parse_args()
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists() or not shutil.which("curl"):
        print("needs nginx and curl: apt-get install nginx-light curl", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(dir="/tmp") as scratch:
        work = Path(scratch)
        root = work / "www"
        (root / "small").mkdir(parents=True)
        with (root / "large.bin").open("wb") as out:
            block = os.urandom(2**20)
            for _ in range(args.large_mib):
                out.write(block)
        small = [f"f{i}.txt" for i in range(args.small)]
        for name in small:
            (root / "small" / name).write_bytes(os.urandom(4096))
        cert, key = work / "cert.pem", work / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
             "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        results: dict[str, dict[str, float]] = {}
        nginx_port, ktls_port = free_port(), free_port()
        (work / "nginx.conf").write_text(NGINX_CONF.format(prefix=work, port=nginx_port, cert=cert, key=key, root=root))
        servers = {
            "nginx": [nginx, "-p", str(work), "-c", str(work / "nginx.conf")],
            "ktls serve": [sys.executable, "-m", "ktls", "serve", str(root), "--port", str(ktls_port),
                           "--cert", str(cert), "--key", str(key)],
        }  # fmt: skip
        ports = {"nginx": nginx_port, "ktls serve": ktls_port}
        for name, command in servers.items():
            with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as process:
                try:
                    wait_for(ports[name])
                    results[name] = measure(process.pid, ports[name], root, repeat=args.repeat, small=small)
                finally:
                    process.send_signal(signal.SIGTERM if name != "nginx" else signal.SIGQUIT)
                    process.wait(30)
    print(f"{'metric':<26} {'nginx':>12} {'ktls serve':>12} {'ktls/nginx':>11}")
    for metric in results["nginx"]:
        a, b = results["nginx"][metric], results["ktls serve"][metric]
        print(f"{metric:<26} {a:12.2f} {b:12.2f} {b / a if a else float('nan'):11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""`ktls proxy` against stunnel4 and haproxy (Debian's, OpenSSL in user space): same backend, same client.

Each proxy terminates TLS (same self-signed P-256 certificate, TLS 1.3, AES-256-GCM as all negotiate by
default) in front of the same plain backend (a small server in its own process), and the same client
(Python's ``ssl``) measures, one proxy at a time:

* download and upload, MiB/s: ``--mib`` MiB through one connection each way;
* proxy CPU seconds per GiB moved (user + system of the proxy's process tree, from /proc/<pid>/stat);
* short connections per second: handshake, one byte each way, close — for ``--seconds``;
* memory per idle connection, KiB: the proxy tree's RSS with ``--idle`` connections open, minus before.

Prints a table and the ratios ktls/stunnel and ktls/haproxy. Run it where kTLS exists, e.g. in a guest:

    scripts/kernel_matrix.py --kernels 7.2 --run ".venv/bin/python bench/proxy_compare.py"

Needs ``stunnel4`` and ``haproxy`` (``apt-get install stunnel4 haproxy``); every proxy gets one process and
one thread (``--workers 1``, haproxy ``nbthread 1``) so that they share the machine alike.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

STUNNEL_CONF = """
foreground = yes
pid =
output = {prefix}/stunnel.log
[proxy]
accept = 127.0.0.1:{port}
connect = 127.0.0.1:{backend}
cert = {cert}
key = {key}
"""

HAPROXY_CONF = """
global
    nbthread 1
    maxconn 8192
defaults
    mode tcp
    timeout connect 10s
    timeout client 300s
    timeout server 300s
frontend tls_in
    bind 127.0.0.1:{port} ssl crt {bundle}
    default_backend plain
backend plain
    server backend 127.0.0.1:{backend}
"""

#: The backend's commands (first byte): D + 8-byte size (send that many bytes), U + size (read that many,
#: answer b"k"), E (answer one byte).
BACKEND = r"""
import socket, sys, threading
block = memoryview(bytes(1 << 20))
def handle(conn):
    try:
        serve(conn)
    except OSError:
        pass
def serve(conn):
    with conn:
        command = conn.recv(1)
        if command == b"E":
            conn.sendall(b"e"); return
        size = int.from_bytes(conn.recv(8, socket.MSG_WAITALL), "big")
        if command == b"D":
            while size > 0:
                size -= conn.send(block[: min(size, len(block))])
        else:
            buf = bytearray(1 << 20)
            while size > 0:
                n = conn.recv_into(buf)
                if not n: return
                size -= n
            conn.sendall(b"k")
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536): pass
server = socket.create_server(("127.0.0.1", int(sys.argv[1])), backlog=4096)
while True:
    c, _ = server.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
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


def _tree(pid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry.name) == pid or int(fields[1]) == pid:
            pids.append(int(entry.name))
    return pids


def tree_cpu(pid: int) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for each in _tree(pid):
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def tree_rss_kib(pid: int) -> int:
    total = 0
    for each in _tree(pid):
        try:
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


def connect(context: ssl.SSLContext, port: int) -> ssl.SSLSocket:
    return context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=120))


def download(context: ssl.SSLContext, port: int, size: int) -> None:
    with connect(context, port) as tls:
        tls.sendall(b"D" + size.to_bytes(8, "big"))
        buf = bytearray(1 << 20)
        got = 0
        while got < size:
            n = tls.recv_into(buf)
            if not n:
                raise ConnectionError(f"download ended after {got} of {size} bytes")
            got += n


def upload(context: ssl.SSLContext, port: int, size: int) -> None:
    with connect(context, port) as tls:
        tls.sendall(b"U" + size.to_bytes(8, "big"))
        block = bytes(1 << 20)
        sent = 0
        while sent < size:
            tls.sendall(block[: min(len(block), size - sent)])
            sent += min(len(block), size - sent)
        if tls.recv(1) != b"k":
            raise ConnectionError("upload not acknowledged")


def measure(pid: int, port: int, args: argparse.Namespace) -> dict[str, float]:
    context = client_context()
    size = args.mib << 20
    download(context, port, 1 << 20)  # warm up
    results: dict[str, float] = {}
    for name, move in (("download", download), ("upload", upload)):
        cpu, start = tree_cpu(pid), time.perf_counter()
        move(context, port, size)
        seconds, used = time.perf_counter() - start, tree_cpu(pid) - cpu
        results[f"{name} MiB/s"] = args.mib / seconds
        results[f"{name} proxy CPU s/GiB"] = used / (size / 2**30)
    count, deadline = 0, time.monotonic() + args.seconds
    start = time.perf_counter()
    while time.monotonic() < deadline:
        with connect(context, port) as tls:
            tls.sendall(b"E")
            tls.recv(1)
        count += 1
    results["short connections/s"] = count / (time.perf_counter() - start)
    time.sleep(0.5)
    before = tree_rss_kib(pid)
    idle: list[ssl.SSLSocket] = []
    try:
        for _ in range(args.idle):
            idle.append(connect(context, port))
        idle[-1].sendall(b"E")  # the last one is relayed end to end: all before it are too
        idle[-1].recv(1)
        time.sleep(1.0)
        results["idle KiB/connection"] = (tree_rss_kib(pid) - before) / args.idle
    finally:
        for tls in idle:
            tls.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=32, help="MiB per transfer (default 32)")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of the short-connection loop")
    parser.add_argument("--idle", type=int, default=200, help="idle connections for the memory row")
    args = parser.parse_args()
    stunnel = shutil.which("stunnel4") or shutil.which("stunnel")
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if stunnel is None or not Path(haproxy).exists():
        print("needs stunnel4 and haproxy: apt-get install stunnel4 haproxy", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(dir="/tmp") as scratch:
        work = Path(scratch)
        cert, key, bundle = work / "cert.pem", work / "key.pem", work / "bundle.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
             "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        bundle.write_bytes(cert.read_bytes() + key.read_bytes())
        backend_port = free_port()
        backend = subprocess.Popen([sys.executable, "-c", BACKEND, str(backend_port)])
        try:
            wait_for(backend_port)
            ports = {name: free_port() for name in ("ktls proxy", "stunnel4", "haproxy")}
            (work / "stunnel.conf").write_text(
                STUNNEL_CONF.format(prefix=work, port=ports["stunnel4"], backend=backend_port, cert=cert, key=key)
            )
            (work / "haproxy.cfg").write_text(
                HAPROXY_CONF.format(port=ports["haproxy"], backend=backend_port, bundle=bundle)
            )
            commands = {
                "ktls proxy": [sys.executable, "-m", "ktls", "proxy", "--listen", f"127.0.0.1:{ports['ktls proxy']}",
                               "--backend", f"127.0.0.1:{backend_port}", "--cert", str(cert), "--key", str(key)],
                "stunnel4": [stunnel, str(work / "stunnel.conf")],
                "haproxy": [haproxy, "-db", "-f", str(work / "haproxy.cfg")],
            }  # fmt: skip
            results: dict[str, dict[str, float]] = {}
            for name, command in commands.items():
                print(f"measuring {name}", file=sys.stderr, flush=True)
                with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as process:
                    try:
                        wait_for(ports[name])
                        results[name] = measure(process.pid, ports[name], args)
                    finally:
                        process.send_signal(signal.SIGTERM)
                        try:
                            process.wait(30)
                        except subprocess.TimeoutExpired:
                            process.kill()
        finally:
            backend.kill()
            backend.wait()
    names = list(results)
    print(f"{'metric':<30}" + "".join(f"{name:>12}" for name in names) + f"{'ktls/stunnel':>14}{'ktls/haproxy':>14}")
    for metric in results["ktls proxy"]:
        values = [results[name][metric] for name in names]
        ktls, stun, hap = values
        row = "".join(f"{value:12.2f}" for value in values)
        print(
            f"{metric:<30}{row}{ktls / stun if stun else float('nan'):14.2f}{ktls / hap if hap else float('nan'):14.2f}"
        )
    return 0


if __name__ == "__main__":
    threading.stack_size(256 * 1024)
    sys.exit(main())

"""``ktls serve`` under attack: does a fresh client still get its answer, and do memory and descriptors stay
bounded and come back?

Scenarios (each against a fresh ``python -m ktls serve`` with one worker, on loopback only):

* ``slowloris``: clients that finish the TLS handshake, then send a request head a byte at a time;
* ``descriptors``: plain TCP connects that never start TLS, more than the worker may hold (its descriptor
  limit is lowered to 1024 for the run, as on a default system);
* ``handshake flood``: TLS handshakes opened as fast as one client can, each dropped right after;
* ``never read``: clients that ask for a large file and never read a byte.

For each: the latency of a fresh client's request (handshake + ``GET /hello.txt``) measured while the attack
runs (median and worst of several), the server's resident memory and descriptors at baseline, during and
after. Run it where kTLS exists, e.g. in a guest::

    scripts/kernel_matrix.py --kernels 7.2 --jobs 1 --run ".venv/bin/python bench/serve_attacks.py"
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

CLIENT = ssl.create_default_context()
CLIENT.check_hostname = False
CLIENT.verify_mode = ssl.CERT_NONE


class Server:
    def __init__(self, root: Path, *options: str, descriptors: int | None = None, log: Path | None = None) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]

        def limit() -> None:
            if descriptors is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (descriptors, descriptors))

        self.log = log
        command = [sys.executable, "-m", "ktls", "serve", str(root), "--port", str(self.port), *options]
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=log.open("wb") if log is not None else subprocess.DEVNULL,
            preexec_fn=limit,  # noqa: PLW1509 - the limit must apply before exec; no thread runs yet
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError("ktls serve did not start")

    def resources(self) -> tuple[float, int]:
        """(resident MiB, open descriptors)."""
        with open(f"/proc/{self.process.pid}/status") as status:
            rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        return rss / 1024, len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def connect(self, timeout: float = 60) -> ssl.SSLSocket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        return CLIENT.wrap_socket(sock, server_hostname="localhost")

    def fresh_request(self) -> float:
        """Seconds for a new client's handshake and GET /hello.txt, answered in full."""
        started = time.monotonic()
        with self.connect() as tls:
            tls.sendall(b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
        if not data.endswith(b"hello\n"):
            raise RuntimeError(f"bad answer: {data[:200]!r}")
        return time.monotonic() - started

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def slowloris(server: Server, clients: int, stop: threading.Event, ready: threading.Event) -> None:
    held = []
    for _ in range(clients):
        try:
            tls = server.connect()
            tls.sendall(b"GET / HTTP/1.1\r\n")
            held.append(tls)
        except OSError:
            break
    ready.set()
    while held and not stop.is_set():
        for tls in list(held):
            try:
                tls.sendall(b"X")
            except OSError:
                held.remove(tls)
                tls.close()
                try:  # a new trickler for each one dropped: the attack keeps its strength
                    fresh = server.connect()
                    fresh.sendall(b"GET / HTTP/1.1\r\n")
                    held.append(fresh)
                except OSError:
                    pass
        stop.wait(1.0)
    for tls in held:
        tls.close()


def descriptors(server: Server, clients: int, stop: threading.Event, ready: threading.Event) -> None:
    held = []
    for _ in range(clients):
        try:
            held.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        except OSError:
            break
    ready.set()
    stop.wait()
    for sock in held:
        sock.close()


def handshake_flood(server: Server, clients: int, stop: threading.Event, ready: threading.Event) -> None:
    ready.set()
    while not stop.is_set():
        try:
            server.connect(timeout=10).close()
        except OSError:
            pass


def never_read(server: Server, clients: int, stop: threading.Event, ready: threading.Event) -> None:
    held = []
    for _ in range(clients):
        try:
            tls = server.connect()
            tls.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            tls.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
            held.append(tls)
        except OSError:
            break
    ready.set()
    stop.wait()
    for tls in held:
        tls.close()


Attack = Callable[[Server, int, threading.Event, threading.Event], None]
SCENARIOS: dict[str, tuple[Attack, int, int | None]] = {
    "slowloris": (slowloris, 300, None),
    "descriptors": (descriptors, 2000, 1024),
    "handshake flood": (handshake_flood, 1, None),
    "never read": (never_read, 50, None),
}


def run(root: Path, seconds: float, samples: int, names: list[str]) -> list[dict[str, object]]:
    rows = []
    # Long enough that the attack's connections pile up (a few hundred at once) under emulation too.
    options = ["--head-timeout", "60", "--handshake-timeout", "10", "--send-timeout", "10"]
    for name in names:
        attack, clients, limit = SCENARIOS[name]
        server = Server(root, *options, descriptors=limit, log=root.parent / f"serve-{name.replace(' ', '-')}.log")
        try:
            baseline_latency = statistics.median(server.fresh_request() for _ in range(3))
            baseline = server.resources()
            stop, ready = threading.Event(), threading.Event()
            attacker = threading.Thread(target=attack, args=(server, clients, stop, ready), daemon=True)
            attacker.start()
            ready.wait(600)  # the attack's connections are all open
            time.sleep(seconds)
            latencies, failures = [], 0
            for _ in range(samples):
                try:
                    latencies.append(server.fresh_request())
                except (OSError, RuntimeError) as exc:
                    failures += 1
                    print(f"{name}: a fresh request failed: {exc}", flush=True)
                    if server.log is not None:
                        print(*server.log.read_text(errors="replace").splitlines()[-5:], sep="\n", flush=True)
            during = server.resources()
            stop.set()
            attacker.join(120)
            time.sleep(12)  # the server's own timeouts clear what the attack left
            after = server.resources()
            alive = server.process.poll() is None
        finally:
            server.stop()
        rows.append(
            {
                "scenario": name,
                "clients": clients,
                "fresh ms (baseline)": round(baseline_latency * 1000),
                "fresh ms median": round(statistics.median(latencies) * 1000) if latencies else "-",
                "fresh ms worst": round(max(latencies) * 1000) if latencies else "-",
                "fresh failed": failures,
                "RSS MiB base/during/after": f"{baseline[0]:.0f}/{during[0]:.0f}/{after[0]:.0f}",
                "fds base/during/after": f"{baseline[1]}/{during[1]}/{after[1]}",
                "server alive": alive,
            }
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10, help="attack time before measuring (default 10)")
    parser.add_argument("--samples", type=int, default=5, help="fresh requests measured per scenario")
    parser.add_argument("--only", choices=list(SCENARIOS), action="append", help="run only these scenarios")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # this process opens the attack's 2000 sockets
    for limit in (65536, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, max(limit, hard)))
            break
        except (ValueError, OSError):
            continue
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "hello.txt").write_text("hello\n")
        (root / "big.bin").write_bytes(os.urandom(32 * 1024 * 1024))
        rows = run(root, args.seconds, args.samples, args.only or list(SCENARIOS))
    columns = list(rows[0])
    print("\n| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")


if __name__ == "__main__":
    main()

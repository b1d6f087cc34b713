#!/usr/bin/env python3
"""`ktls serve` against nginx (Debian's, OpenSSL in user space), same files, same client, one run.

Serves one large file and many small files from both servers over HTTPS (same self-signed certificate,
TLS 1.3, AES-256-GCM as both negotiate by default) and fetches them with the same curl commands:

* large: the large file downloaded ``--repeat`` times (one connection each);
* small, keep-alive: every small file (``--small`` files of ``--small-size`` bytes, 1 KiB by default) on one
  keep-alive connection (``curl`` given all URLs at once);
* small, new connection: the same requests, each on a connection of its own with a full handshake (curl sends
  ``Connection: close`` and keeps no TLS session, ``--no-sessionid``).

Reports wall-clock throughput and the server's CPU time (user + system of its process tree, from
/proc/<pid>/stat): CPU seconds per GiB for the large file, **CPU milliseconds per request** for the small
ones, and the ratio ktls/nginx. ``--rounds N`` measures every server N times, alternating, and reports the
median. ``--ktls LABEL=SRC`` adds a ``ktls serve`` run from another source tree (``SRC`` put first on its
``PYTHONPATH``) — e.g. the code before a change, measured in the same boot. ``--profile DIR`` runs each
ktls serve under cProfile and prints where its CPU went. Run it where kTLS exists, e.g. in a guest:

    scripts/kernel_matrix.py --kernels 7.2 --run ".venv/bin/python bench/nginx_compare.py"

Needs nginx and curl (`apt-get install nginx-light curl`); one nginx worker and one ktls worker, so both
get the same share of the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import shutil
import signal
import socket
import statistics
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

#: ``python -m ktls ARGS`` under cProfile timed by the process's CPU clock (user + system: a syscall's kernel
#: work is charged to it, time spent waiting is not), the statistics written when the server exits.
_PROFILED = """
import cProfile, runpy, sys, time
profile = cProfile.Profile(time.process_time)
sys.argv[0] = "ktls"
profile.enable()
try:
    runpy.run_module("ktls", run_name="__main__", alter_sys=True)
finally:
    profile.disable()
    profile.dump_stats({stats!r})
"""

NGINX = "nginx"
KTLS = "ktls serve"


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
    subprocess.run(["curl", "-sS", "--insecure", *args], check=True, cwd="/")


CASES = ("large", "keep-alive", "new connection")


def measure(pid: int, port: int, root: Path, *, repeat: int, small: list[str], cases: list[str]) -> dict[str, float]:
    base = f"https://127.0.0.1:{port}"
    curl("-o", "/dev/null", f"{base}/large.bin")  # warm the page cache and the server
    results: dict[str, float] = {}
    if "large" in cases:
        size = (root / "large.bin").stat().st_size
        cpu, start = tree_cpu(pid), time.perf_counter()
        for _ in range(repeat):
            curl("-o", "/dev/null", f"{base}/large.bin")
        large_seconds, large_cpu = time.perf_counter() - start, tree_cpu(pid) - cpu
        results["large MiB/s"] = repeat * size / 2**20 / large_seconds
        results["large server CPU s/GiB"] = large_cpu / (repeat * size / 2**30)
    urls = [arg for name in small for arg in ("-o", "/dev/null", f"{base}/small/{name}")]
    options = {"keep-alive": [], "new connection": ["--no-sessionid", "-H", "Connection: close"]}
    for case in (case for case in CASES[1:] if case in cases):
        cpu, start = tree_cpu(pid), time.perf_counter()
        curl(*options[case], *urls)
        seconds, used = time.perf_counter() - start, tree_cpu(pid) - cpu
        results[f"small {case} req/s"] = len(small) / seconds
        results[f"small {case} CPU ms/req"] = 1000 * used / len(small)
    return results


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large-mib", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--small", type=int, default=200, help="number of small files (default 200)")
    parser.add_argument("--small-size", type=int, default=1024, help="bytes per small file (default 1024)")
    parser.add_argument("--rounds", type=int, default=1, help="measure each server this many times, alternating")
    parser.add_argument(
        "--ktls", action="append", default=[], metavar="LABEL=SRC", help="also ktls serve from source tree SRC"
    )
    parser.add_argument("--no-nginx", action="store_true", help="ktls serve only")
    parser.add_argument(
        "--cases", type=lambda text: text.split(","), default=list(CASES), help=f"among {','.join(CASES)} (default all)"
    )
    parser.add_argument("--profile", type=Path, metavar="DIR", help="run ktls serve under cProfile, stats in DIR")
    parser.add_argument("--top", type=int, default=40, help="rows of each profile (default 40)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every round's figures to FILE")
    return parser.parse_args()


def _files(root: Path, args: argparse.Namespace) -> list[str]:
    """The large file and the small ones under ``root``; returns the small files' names."""
    (root / "small").mkdir(parents=True)
    with (root / "large.bin").open("wb") as out:
        block = os.urandom(2**20)
        for _ in range(args.large_mib):
            out.write(block)
    small = [f"f{i}.txt" for i in range(args.small)]
    for name in small:
        (root / "small" / name).write_bytes(os.urandom(args.small_size))
    return small


Server = tuple[list[str], dict[str, str], int]  # command, environment, port


def _servers(work: Path, root: Path, args: argparse.Namespace, nginx: str) -> dict[str, Server]:
    cert, key = work / "cert.pem", work / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    servers: dict[str, Server] = {}
    if not args.no_nginx:
        port = free_port()
        (work / "nginx.conf").write_text(NGINX_CONF.format(prefix=work, port=port, cert=cert, key=key, root=root))
        servers[NGINX] = ([nginx, "-p", str(work), "-c", str(work / "nginx.conf")], dict(os.environ), port)
    sources: dict[str, str | None] = {KTLS: None}
    for spec in args.ktls:
        label, _, src = spec.partition("=")
        sources[f"{KTLS} ({label})"] = str(Path(src).resolve())
    for label, src in sources.items():
        port = free_port()
        env = dict(os.environ)
        if src is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
        command = [sys.executable, "-m", "ktls", "serve", str(root), "--port", str(port),
                   "--cert", str(cert), "--key", str(key)]  # fmt: skip
        servers[label] = (command, env, port)
    return servers


def _run(
    name: str, server: Server, root: Path, small: list[str], args: argparse.Namespace, *, round_: int
) -> dict[str, float]:
    command, env, port = server
    if args.profile is not None and name != NGINX:
        args.profile.mkdir(parents=True, exist_ok=True)
        stats = args.profile / f"{name.replace(' ', '_').replace('(', '').replace(')', '')}-{round_}.prof"
        command = [command[0], "-c", _PROFILED.format(stats=str(stats)), *command[3:]]
    with subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as process:
        try:
            wait_for(port)
            return measure(process.pid, port, root, repeat=args.repeat, small=small, cases=args.cases)
        finally:
            process.send_signal(signal.SIGTERM if name != NGINX else signal.SIGQUIT)
            process.wait(60)


def _report(rounds: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    reference = NGINX if NGINX in rounds else KTLS
    medians = {name: {m: statistics.median(r[m] for r in runs) for m in runs[0]} for name, runs in rounds.items()}
    names = list(medians)
    print(f"median of {args.rounds} round(s); {args.small} files of {args.small_size} bytes; ratios ÷ {reference}")
    print(f"{'metric':<30}" + "".join(f" {name:>22}" for name in names))
    for metric in medians[names[0]]:
        cells = []
        for name in names:
            value, ref = medians[name][metric], medians[reference][metric]
            ratio = f" ({value / ref:.2f}×)" if name != reference and ref else ""
            cells.append(f" {f'{value:.2f}{ratio}':>22}")
        print(f"{metric:<30}" + "".join(cells))
    if args.rounds > 1:
        for name, runs in rounds.items():
            for metric in runs[0]:
                print(f"  {name}, {metric}, by round: {', '.join(f'{r[metric]:.2f}' for r in runs)}")


def main() -> int:
    args = _arguments()
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not shutil.which("curl") or (not args.no_nginx and not Path(nginx).exists()):
        print("needs nginx and curl: apt-get install nginx-light curl", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(dir="/tmp") as scratch:
        work = Path(scratch)
        root = work / "www"
        small = _files(root, args)
        servers = _servers(work, root, args, nginx)
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
        for round_ in range(args.rounds):
            # nginx first, then the ktls variants in turn, their order reversed every other round: under
            # emulation the first run of a code path pays for its translation, so no variant is always first.
            order = [name for name in servers if name != NGINX]
            order = ([NGINX] if NGINX in servers else []) + (order[::-1] if round_ % 2 else order)
            for name in order:
                rounds[name].append(_run(name, servers[name], root, small, args, round_=round_))
    _report(rounds, args)
    if args.json is not None:
        args.json.write_text(json.dumps({"small_size": args.small_size, "rounds": rounds}, indent=2))
    if args.profile is not None:
        for path in sorted(args.profile.glob("*.prof")):
            print(f"==== {path.name}: by own time")
            pstats.Stats(str(path)).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``ktls`` command line: ``check`` (what this kernel's TLS supports), ``serve`` (HTTPS files), ``proxy``
(TLS termination by splice), ``stat``."""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from . import __version__
from .constants import TLSVersion
from .kernel import CIPHERS, KernelSupport, probe, read_tls_stat
from .serve.config import ServeConfig

if TYPE_CHECKING:
    from .proxy import ProxyConfig

__all__ = ["main"]

_NO_KTLS_HELP = (
    "Kernel TLS is not available: {reason}.\n"
    "kTLS needs a Linux kernel built with CONFIG_TLS (=y or =m) and, when it is a module, the 'tls' module\n"
    "loadable ('modprobe tls'). Until then ktls works over userspace TLS (Python's ssl module)."
)


def _kernel_fix(release: str, root: Path = Path("/")) -> str:
    """The one thing that would give this kernel kTLS, from what the system (under ``root``) shows: the
    ``tls`` module on disk (load it), or a kernel configuration without ``CONFIG_TLS`` (no command helps)."""
    if any((root / "lib" / "modules" / release / "kernel" / "net" / "tls").glob("tls.ko*")):
        return "fix: sudo modprobe tls   (the module is installed but not loaded)"
    config = _kernel_config(release, root)
    if config is not None and "# CONFIG_TLS is not set" in config:
        return (
            "fix: none for this kernel — it is built without CONFIG_TLS; boot a kernel built with it\n"
            "     (Debian's and Ubuntu's generic kernels are; kTLS needs Linux ≥ 4.13, TLS 1.3 ≥ 5.1)"
        )
    return "fix: sudo modprobe tls   (if this kernel ships the module; else a kernel with CONFIG_TLS)"


def _kernel_config(release: str, root: Path) -> str | None:
    """The running kernel's build configuration (``/boot/config-<release>`` or ``/proc/config.gz``), if shown."""
    try:
        return (root / "boot" / f"config-{release}").read_text(errors="replace")
    except OSError:
        pass
    try:
        with gzip.open(root / "proc" / "config.gz", "rt", errors="replace") as config:
            return config.read()
    except OSError:
        return None


def _mark(ok: bool) -> str:
    return "yes" if ok else "no"


def _print_check(support: KernelSupport, stat: dict[str, int] | None, out: TextIO) -> None:
    print(f"kernel: {support.kernel_release}", file=out)
    if not support.ulp:
        print(_NO_KTLS_HELP.format(reason=support.ulp_error), file=out)
        print(_kernel_fix(support.kernel_release), file=out)
        return
    print("TLS upper-layer protocol: yes", file=out)
    print("", file=out)
    header = f"{'cipher':<20} {'TLS 1.2 tx/rx':<15} {'TLS 1.3 tx/rx':<15}"
    print(header, file=out)
    print("-" * len(header), file=out)
    for cipher in CIPHERS.values():
        cells = []
        for version in TLSVersion:
            if version not in cipher.versions:
                cells.append("n/a")
                continue
            entry = next(c for c in support.ciphers if c.cipher is cipher.cipher_type and c.version is version)
            cells.append(f"{_mark(entry.tx)}/{_mark(entry.rx)}")
        print(f"{cipher.name:<20} {cells[0]:<15} {cells[1]:<15}", file=out)
    refused = [entry for entry in support.ciphers if entry.error]
    if refused:  # why each "no": EINVAL (a kernel too old for the cipher) and ENOENT (not built) read alike
        print("", file=out)
        print("refused:", file=out)
        for entry in refused:
            print(f"  {entry.cipher.name} {entry.version.label}: {entry.error}", file=out)
    print("", file=out)
    rekey = f"tx {_mark(support.rekey_tx)}, rx {_mark(support.rekey_rx)}"
    if not support.rekey and support.rekey_error:
        rekey += f" ({support.rekey_error})"
    print(f"TLS 1.3 rekey (KeyUpdate): {rekey}", file=out)
    print(f"TLS_RX_EXPECT_NO_PAD: {_mark(support.rx_expect_no_pad)}", file=out)
    print(f"TLS_TX_MAX_PAYLOAD_LEN: {_mark(support.tx_max_payload_len)}", file=out)
    if stat is not None:
        print("", file=out)
        print("/proc/net/tls_stat:", file=out)
        for name, value in stat.items():
            print(f"  {name:<28} {value}", file=out)


def _check(args: argparse.Namespace, out: TextIO) -> int:
    support = probe()
    stat = read_tls_stat()
    if args.json:
        json.dump({**support.to_json(), "tls_stat": stat}, out, indent=2)
        out.write("\n")
    else:
        _print_check(support, stat, out)
    return 0 if support.available else 1


def _stat(args: argparse.Namespace, out: TextIO) -> int:
    from .kernel.sockets import list_ktls_sockets  # noqa: PLC0415 - only this command runs ss

    previous: dict[str, int] | None = None
    while True:
        stat = read_tls_stat()
        if stat is None:
            print("/proc/net/tls_stat does not exist: no kernel TLS here (CONFIG_TLS, 'tls' module).", file=out)
            return 1
        sockets = list_ktls_sockets()
        if args.json:
            listed = None if sockets is None else [dataclasses.asdict(s) for s in sockets]
            json.dump({"tls_stat": stat, "sockets": listed}, out, indent=2)
            out.write("\n")
        else:
            for name, value in stat.items():
                change = f"  (+{value - previous.get(name, 0)})" if previous and value != previous.get(name, 0) else ""
                print(f"{name:<28} {value}{change}", file=out)
            if sockets is None:
                print("kernel TLS sockets: unknown (needs `ss` from iproute2)", file=out)
            else:
                print(f"kernel TLS sockets: {len(sockets)}", file=out)
                for sock in sockets:
                    print(f"  {sock.local:<24} {sock.peer:<24} {sock.tls}", file=out)
        out.flush()
        if not args.watch:
            return 0
        previous = stat
        time.sleep(args.watch)
        print("", file=out)


def _serve(args: argparse.Namespace, out: TextIO) -> int:
    from .serve import serve  # noqa: PLC0415 - only this command needs the server

    if (args.cert is None) != (args.key is None):
        print("ktls serve: --cert and --key go together", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    _lean_log_records()
    config = ServeConfig(
        root=Path(args.directory),
        bind=args.bind,
        port=args.port,
        cert=args.cert,
        key=args.key,
        workers=args.workers,
        max_connections=args.max_connections,
        handshake_timeout=args.handshake_timeout,
        head_timeout=args.head_timeout,
        idle_timeout=args.idle_timeout,
        send_timeout=args.send_timeout,
        show_hidden=args.show_hidden,
    )
    return serve(config, out)


def _lean_log_records() -> None:
    """The log lines are ``%(message)s`` alone: a record need not look up its caller's frame, thread, process or
    asyncio task (the switches the logging HOWTO's "Optimization" section names; an access-log line per
    request pays for each otherwise — 1.3 ms a line, profiled, in an emulated guest)."""
    logging._srcfile = None  # findCaller() walks the stack for every record
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    setattr(logging, "logAsyncioTasks", False)  # noqa: B010 - Python 3.12+ (unused before; typeshed: 3.12+)


def _address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) for argparse."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (0.0.0.0:PORT for every address)")
    return host.strip("[]"), int(port)


def _proxy(args: argparse.Namespace, out: TextIO) -> int:
    from .proxy import ProxyConfig, run_proxy  # noqa: PLC0415 - only this command needs the proxy

    if (args.cert is None) != (args.key is None):
        print("ktls proxy: --cert and --key go together", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    config = ProxyConfig(
        listen=args.listen,
        backend=args.backend,
        cert=args.cert,
        key=args.key,
        workers=args.workers,
        max_connections=args.max_connections,
        handshake_timeout=args.handshake_timeout,
        connect_timeout=args.connect_timeout,
        idle_timeout=args.idle_timeout,
        stop_grace=args.stop_grace,
        proxy_protocol=args.proxy_protocol,
        backend_tls=args.backend_tls,
        backend_ca=args.backend_ca,
        backend_name=args.backend_name,
    )
    return run_proxy(config, out)


def _add_proxy(commands: Any) -> None:
    from .proxy import ProxyConfig  # noqa: PLC0415 - a dataclass: its defaults are the help's

    defaults = ProxyConfig(("", 0), ("", 0))
    proxy = commands.add_parser("proxy", help="TLS termination: kernel TLS in, plain TCP out, payload by splice")
    proxy.add_argument("--listen", type=_address, required=True, metavar="ADDR:PORT", help="where clients connect")
    proxy.add_argument("--backend", type=_address, required=True, metavar="HOST:PORT", help="where to relay to")
    _add_server_options(
        proxy,
        defaults,
        str,
        (
            ("--handshake-timeout", "handshake_timeout", "for a whole TLS handshake"),
            ("--connect-timeout", "connect_timeout", "to reach the backend"),
            ("--idle-timeout", "idle_timeout", "with no byte moved either way before a connection is cut"),
            ("--stop-grace", "stop_grace", "a graceful stop lets connections finish"),
        ),
    )
    proxy.add_argument(
        "--proxy-protocol", choices=["v1", "v2"], help="send HAProxy's PROXY protocol header to the backend first"
    )
    proxy.add_argument(
        "--backend-tls", action="store_true", help="the reverse: plain TCP in, kernel TLS to the backend"
    )
    proxy.add_argument("--backend-ca", metavar="FILE", help="with --backend-tls: CA file to trust (default: system)")
    proxy.add_argument("--backend-name", metavar="NAME", help="with --backend-tls: name to verify (default: HOST)")
    proxy.set_defaults(run=_proxy)


def _add_server_options(
    parser: argparse.ArgumentParser,
    defaults: ServeConfig | ProxyConfig,
    path: Callable[[str], object],
    timeouts: tuple[tuple[str, str, str], ...],
) -> None:
    """What ``serve`` and ``proxy`` both take: certificate, workers, connection limit, and their timeouts
    (``(option, config field, what it bounds)``, defaults read from ``defaults``)."""
    parser.add_argument("--cert", type=path, metavar="FILE", help="PEM certificate chain (default: self-signed)")
    parser.add_argument("--key", type=path, metavar="FILE", help="PEM private key for --cert")
    parser.add_argument("--workers", type=int, default=1, metavar="N", help="processes sharing the port (SO_REUSEPORT)")
    limit = defaults.max_connections
    parser.add_argument(
        "--max-connections",
        type=int,
        default=limit,
        metavar="N",
        help=f"connections per worker, handshakes included; more wait (default {limit})",
    )
    for option, field, what in timeouts:
        default = getattr(defaults, field)
        parser.add_argument(
            option, type=float, default=default, metavar="S", help=f"seconds {what} (default {default:g})"
        )


def _bench(args: argparse.Namespace, out: TextIO) -> int:
    from . import bench  # noqa: PLC0415 - only this command needs the workloads

    return bench.main(args.size, args.seconds, args.connections, args.json, out, scale=args.scale, rate=args.rate)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ktls", description="Linux kernel TLS offload for Python.")
    parser.add_argument("--version", action="version", version=f"ktls {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser("check", help="what this machine's kernel TLS supports (exit 1 if none)")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(run=_check)
    serve = commands.add_parser("serve", help="serve a directory over HTTPS, kernel-encrypted, with sendfile")
    serve.add_argument("directory", nargs="?", default=".", help="what to serve (default: the current directory)")
    serve.add_argument("--bind", default="127.0.0.1", metavar="ADDR", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8443, metavar="N", help="port (default 8443; 0 picks one)")
    _add_server_options(
        serve,
        ServeConfig(Path(".")),
        Path,
        (
            ("--handshake-timeout", "handshake_timeout", "for a whole TLS handshake"),
            ("--head-timeout", "head_timeout", "for a whole request head once it has started"),
            ("--idle-timeout", "idle_timeout", "a kept-alive connection may wait for its next request"),
            ("--send-timeout", "send_timeout", "for each step of a response (its head, each 1 MiB of a file)"),
        ),
    )
    serve.add_argument("--show-hidden", action="store_true", help="serve and list names starting with a dot")
    serve.set_defaults(run=_serve)
    _add_proxy(commands)
    bench = commands.add_parser("bench", help="plain TCP vs ssl vs ktls, side by side, as ratios")
    bench.add_argument("--size", type=int, default=64, metavar="MIB", help="MiB per transfer (default 64)")
    bench.add_argument("--seconds", type=float, default=3.0, help="duration of timed loops (default 3)")
    bench.add_argument("--connections", type=int, default=100, help="idle connections for the memory row")
    bench.add_argument("--json", action="store_true", help="machine-readable output")
    bench.add_argument(
        "--scale", action="store_true", help="also 1/10/100 concurrent bulk connections and latency at --rate"
    )
    bench.add_argument("--rate", type=float, default=100.0, help="round trips/s of the latency rows (default 100)")
    bench.set_defaults(run=_bench)
    stat = commands.add_parser("stat", help="the kernel's kTLS counters (/proc/net/tls_stat)")
    stat.add_argument("--json", action="store_true", help="machine-readable output")
    stat.add_argument("--watch", type=float, nargs="?", const=2.0, metavar="SECONDS", help="repeat, showing changes")
    stat.set_defaults(run=_stat)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = _parser().parse_args(argv)
    code: int = args.run(args, out or sys.stdout)
    return code

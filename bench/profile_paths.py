"""Where the time goes: ktls's paths profiled, next to the raw kTLS floor of the same workload.

Each job is one of ``ktls bench``'s own loops. First both variants run unprofiled (ktls and raw kTLS, the
sockets keyed with ``ktls.kernel`` alone and driven by bare syscalls) and the ratio is printed; then the ktls
variant runs under cProfile **in every thread it starts** (``threading.Thread.run`` is wrapped while
profiling, so a receiver thread or the asyncio receiving loop counts too), timed by each thread's CPU clock
(``time.thread_time``: user + system, so the kernel's crypto inside a syscall is charged to that syscall, and
time spent blocked is not charged at all). It prints the top functions by own CPU time with their share of the
job's profiled CPU, then the same summed per file. cProfile's own overhead inflates Python-heavy code: read
the shares, not the absolute times.

Jobs: ``handshake``, ``rr``, ``bulk``, ``file``, ``asyncio-bulk``, ``loop-sendfile`` (default: all). Run in
a kTLS guest, e.g.::

    scripts/kernel_matrix.py --kernels 7.2 --jobs 1 --run ".venv/bin/python bench/profile_paths.py rr bulk"
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import io
import pstats
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ktls import bench
from ktls.bench_raw import RawKeying

JOBS = ("handshake", "rr", "bulk", "file", "asyncio-bulk", "loop-sendfile")


@contextlib.contextmanager
def profile_all_threads(profiles: list[cProfile.Profile]) -> Iterator[None]:
    """Profile this thread and every thread started inside the block, each with its own CPU clock."""
    original = threading.Thread.run

    def run(self: threading.Thread) -> None:
        profiler = cProfile.Profile(time.thread_time)
        profiles.append(profiler)
        profiler.enable()
        try:
            original(self)
        finally:
            profiler.disable()

    main = cProfile.Profile(time.thread_time)
    profiles.append(main)
    threading.Thread.run = run  # type: ignore[method-assign]
    main.enable()
    try:
        yield
    finally:
        main.disable()
        threading.Thread.run = original  # type: ignore[method-assign]


def _where(filename: str, name: str) -> str:
    """A function's file, shortened: ``ktls/stream.py``, ``asyncio/selector_events.py``, or ``(C) <name>``."""
    if filename == "~":
        return f"(C) {name}"
    parts = Path(filename).parts
    for anchor in ("ktls", "asyncio"):
        if anchor in parts:
            index = len(parts) - 1 - parts[::-1].index(anchor)
            return "/".join(parts[index:])
    return Path(filename).name


def report(label: str, profiles: list[cProfile.Profile], top: int) -> str:
    stats = pstats.Stats(profiles[0])
    for profile in profiles[1:]:
        stats.add(profile)
    entries: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]  # (file, line, name) -> (cc, nc, tt, ct, callers)
    total = sum(value[2] for value in entries.values()) or 1.0
    by_function = sorted(entries.items(), key=lambda item: item[1][2], reverse=True)
    out = io.StringIO()
    print(f"==== {label}: {total:.2f} CPU s profiled in {len(profiles)} threads; by own CPU time", file=out)
    print(f"{'share':>6} {'own s':>8} {'calls':>9}  function", file=out)
    for (filename, line, name), (_, calls, own, _, _) in by_function[:top]:
        where = _where(filename, name)
        function = where if where.startswith("(C)") else f"{where}:{line} {name}"
        print(f"{own / total:6.1%} {own:8.3f} {calls:9d}  {function}", file=out)
    by_file: collections.Counter[str] = collections.Counter()
    for (filename, _, name), value in entries.items():
        by_file[_where(filename, name)] += value[2]
    print(f"---- {label}: by file (C functions by name)", file=out)
    for where, own in by_file.most_common(top):
        print(f"{own / total:6.1%} {own:8.3f}  {where}", file=out)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("jobs", nargs="*", metavar="JOB", help=f"among {', '.join(JOBS)} (default: all)")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of the rr and handshake loops")
    parser.add_argument("--size", type=int, default=8, metavar="MIB", help="MiB per transfer (default 8)")
    parser.add_argument("--top", type=int, default=25, help="rows per table (default 25)")
    args = parser.parse_args()
    unknown = set(args.jobs) - set(JOBS)
    if unknown:
        parser.error(f"unknown jobs: {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory() as scratch:
        # The first probe loads kernel modules (seconds in a guest): done here, outside every figure.
        run = bench._Run(args.size, args.seconds, Path(scratch), None)
        if run.raw is None:
            raise SystemExit("no kTLS here: run this in a kTLS guest")
        raw, size = run.raw, run.size
        ktls = bench._wrapped(run.variants[2][1])
        contexts = (run.server_ctx, run.client_ctx)
        file = Path(scratch) / "payload.bin"
        file.write_bytes(bytes(size))
        floor = RawKeying(*bench._contexts(), Path(scratch) / "floor.keylog")

        def mib_s(timing: tuple[float, float]) -> float:
            return size / bench.MIB / timing[0]

        # job -> (unit, ktls, raw): each call returns the figure (higher is better).
        jobs: dict[str, tuple[str, Callable[[], float], Callable[[], float]]] = {
            "handshake": (
                "connections/s",
                lambda: bench._handshakes(run.variants[2][1], args.seconds),
                lambda: bench._handshake_floor(floor, args.seconds),
            ),
            "rr": (
                "round trips/s",
                lambda: bench._round_trips(ktls, args.seconds),
                lambda: bench._round_trips(raw, args.seconds),
            ),
            "bulk": ("MiB/s", lambda: mib_s(bench._transfer(ktls, size)), lambda: mib_s(bench._transfer(raw, size))),
            "file": (
                "MiB/s",
                lambda: mib_s(bench._transfer(ktls, size, file=file)),
                lambda: mib_s(bench._transfer(raw, size, file=file)),
            ),
            "asyncio-bulk": (
                "MiB/s",
                lambda: mib_s(bench._async_transfer(run.ktls_asyncio, *contexts, size)),
                lambda: mib_s(bench._raw_async_transfer(raw, size)),
            ),
            "loop-sendfile": (
                "MiB/s",
                lambda: mib_s(bench._async_transfer(run.ktls_asyncio, *contexts, size, file=file)),
                lambda: mib_s(bench._raw_async_transfer(raw, size, file)),
            ),
        }
        for name in args.jobs or JOBS:
            unit, ktls_job, raw_job = jobs[name]
            ktls_value, raw_value = ktls_job(), raw_job()
            print(f"{name:14} ktls {ktls_value:9.1f}  raw {raw_value:9.1f} {unit}  ×raw {ktls_value / raw_value:.3f}")
            profiles: list[cProfile.Profile] = []
            with profile_all_threads(profiles):
                ktls_job()
            print(report(f"{name} ktls", profiles, args.top), flush=True)


if __name__ == "__main__":
    main()

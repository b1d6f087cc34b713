"""Where the time goes: cProfile of ktls's handshake + hand-off and 1 KiB round trips, next to stdlib ssl.

The loops are ``ktls bench``'s own (``handshake`` and ``rr`` rows). Run in a kTLS guest:
``scripts/kernel_matrix.py --kernels 7.2 --jobs 1 --run ".venv/bin/python bench/profile_paths.py"``.
Prints the rate of each loop, then the top functions by own time (main thread only).
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
from collections.abc import Callable

from ktls import bench
from ktls.kernel.probe import probe


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    kernel = probe().available  # the first probe loads kernel modules (seconds in a guest): not part of any figure
    server_ctx, client_ctx = bench._contexts()
    stdlib, ktls = bench._stdlib(server_ctx, client_ctx), bench._ktls(server_ctx, client_ctx, kernel)
    for name, wrap in (("ssl", stdlib), ("ktls", ktls)):
        print(f"handshake {name:5}: {bench._handshakes(wrap, seconds):8.1f}/s", flush=True)
        print(f"rr        {name:5}: {bench._round_trips(bench._wrapped(wrap), seconds):8.1f}/s", flush=True)
    jobs: list[tuple[str, Callable[[], float]]] = [
        ("handshake ktls", lambda: bench._handshakes(ktls, seconds)),
        ("rr ktls", lambda: bench._round_trips(bench._wrapped(ktls), seconds)),
    ]
    for label, job in jobs:
        profiler = cProfile.Profile()
        profiler.enable()
        job()
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
        print(f"==== {label}: by own time (main thread only)\n{out.getvalue()}", flush=True)


if __name__ == "__main__":
    main()

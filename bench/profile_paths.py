"""Where the time goes: cProfile of ktls's handshake + hand-off and 1 KiB round trips, next to stdlib ssl.

Run in a kTLS guest: ``scripts/kernel_matrix.py --kernels 7.2 --jobs 1 --run "python bench/profile_paths.py"``.
Prints the rate of each loop and the top functions by cumulative and by own time.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ktls import wrap_socket
from ktls.bench import _contexts as contexts  # the bench's own certificate and contexts
from ktls.kernel.probe import probe


def pair(wrap: Callable[[socket.socket, bool], Any], timeout: float | None) -> tuple[Any, Any]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    for sock in (client, server):
        sock.settimeout(timeout)
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.setdefault("server", wrap(server, True)))
    thread.start()
    wrapped = wrap(client, False)
    thread.join()
    return wrapped, result["server"]


def handshakes(wrap: Callable[[socket.socket, bool], Any], timeout: float | None, seconds: float) -> float:
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        client, server = pair(wrap, timeout)
        client.close()
        server.close()
        count += 1
    return count / (time.perf_counter() - start)


def round_trips(wrap: Callable[[socket.socket, bool], Any], timeout: float | None, seconds: float) -> float:
    client, server = pair(wrap, timeout)
    message = os.urandom(1024)

    def echo() -> None:
        buffer = bytearray(1024)
        while True:
            got = 0
            while got < 1024:
                n = server.recv_into(memoryview(buffer)[got:])
                if not n:
                    return
                got += n
            server.sendall(buffer)

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    buffer = bytearray(1024)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        client.sendall(message)
        got = 0
        while got < 1024:
            got += client.recv_into(memoryview(buffer)[got:])
        count += 1
    rate = count / (time.perf_counter() - start)
    client.close()
    thread.join(5)
    server.close()
    return rate


def main() -> None:
    server_ctx, client_ctx = contexts()
    probe()  # the first probe loads kernel modules (seconds in a guest): not part of any figure
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0

    def stdlib(sock: socket.socket, server_side: bool) -> Any:
        return (server_ctx if server_side else client_ctx).wrap_socket(sock, server_side=server_side)

    def ktls(sock: socket.socket, server_side: bool) -> Any:
        return wrap_socket(sock, server_ctx if server_side else client_ctx, server_side=server_side)

    for timeout in (None, 30.0):
        for name, wrap in (("ssl", stdlib), ("ktls", ktls)):
            print(f"handshake {name:5} timeout={timeout}: {handshakes(wrap, timeout, seconds):8.1f}/s", flush=True)
            print(f"rr        {name:5} timeout={timeout}: {round_trips(wrap, timeout, seconds):8.1f}/s", flush=True)
    jobs: list[tuple[str, Callable[[], float]]] = [
        ("handshake ktls", lambda: handshakes(ktls, 30.0, seconds)),
        ("rr ktls", lambda: round_trips(ktls, 30.0, seconds)),
    ]
    for label, job in jobs:
        profiler = cProfile.Profile()
        profiler.enable()
        job()
        profiler.disable()
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("tottime").print_stats(25)
        print(f"==== {label}: by own time (main thread only)\n{out.getvalue()}", flush=True)


if __name__ == "__main__":
    main()

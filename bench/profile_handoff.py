"""The hand-off's Python, on any machine: handshake pairs with and without ktls's hand-off, no kernel needed.

``ktls bench``'s handshake row needs a kTLS kernel (a guest); everything ktls adds to a handshake up to the
three ``setsockopt`` calls is pure Python — the framing of the handshake records, the key-log capture and its
parse, the claim, the proof (:mod:`ktls.tls.proof`), the key derivation — and runs the same on the host.
This script times pairs of loopback handshakes (client here, server in a thread, as in the bench):

* ``floor``: ``ssl`` over memory BIOs, one whole record at a time (``ktls.bench_raw``'s handshake), no keys;
* ``ktls``: :func:`ktls.core.driver.establish` on both ends — the handshake as ktls drives it, the secrets
  claimed, proven and turned into keys (``handoff.derive_keys``) — but nothing given to a kernel.

It prints the wall time and the process CPU per pair for each, alternating the two in rounds, then (with
``--profile``) cProfile of the ktls pairs in every thread, by own CPU time and by file.
"""

from __future__ import annotations

import argparse
import cProfile
import resource
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ktls.bench import _contexts
from ktls.bench_raw import _handshake
from ktls.core import driver, handoff

sys.path.insert(0, str(Path(__file__).parent))
from profile_paths import profile_all_threads, report


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


def _floor_end(sock: socket.socket, context: ssl.SSLContext, server_side: bool) -> None:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    sslobj = context.wrap_bio(incoming, outgoing, server_side=server_side)
    _handshake(sock, sslobj, incoming, outgoing)
    if outgoing.pending:
        sock.sendall(outgoing.read())


def _ktls_end(sock: socket.socket, context: ssl.SSLContext, server_side: bool) -> None:
    established = driver.run(sock, driver.establish(context, server_side=server_side, require_kernel=True))
    if established.keys is None:
        raise RuntimeError(f"no keys: {established.fallback_reason}")


def _pairs(end: Callable[[socket.socket, ssl.SSLContext, bool], None], count: int) -> tuple[float, float]:
    server_ctx, client_ctx = _CONTEXTS
    wall = cpu = 0.0
    for _ in range(count):
        client, server = _pair()
        errors: list[BaseException] = []

        def serve(server: socket.socket = server, errors: list[BaseException] = errors) -> None:
            try:
                end(server, server_ctx, True)
            except BaseException as exc:
                errors.append(exc)

        start_wall, start_cpu = time.perf_counter(), _cpu()
        thread = threading.Thread(target=serve)
        thread.start()
        end(client, client_ctx, False)
        thread.join()
        wall += time.perf_counter() - start_wall
        cpu += _cpu() - start_cpu
        if errors:
            raise errors[0]
        client.close()
        server.close()
    return wall / count, cpu / count


class _Available:
    """A kernel that takes everything: the hand-off runs to its keys on a host without kTLS."""

    available = True
    rekey = True

    def supports(self, *args: object) -> bool:
        return True


_CONTEXTS = _contexts()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--pairs", type=int, default=200, help="pairs per round (default 200)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="then profile the ktls pairs")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    fake = _Available()
    setattr(handoff, "probe", lambda: fake)  # noqa: B010 - the hand-off's own name for the kernel's support
    _pairs(_floor_end, 20)
    _pairs(_ktls_end, 20)
    floors: list[tuple[float, float]] = []
    ktls: list[tuple[float, float]] = []
    for round_ in range(args.rounds):
        floors.append(_pairs(_floor_end, args.pairs))
        ktls.append(_pairs(_ktls_end, args.pairs))
        (floor_wall, floor_cpu), (ktls_wall, ktls_cpu) = floors[-1], ktls[-1]
        print(
            f"round {round_ + 1}: per pair, floor {1e3 * floor_wall:.3f} ms wall {1e3 * floor_cpu:.3f} ms CPU; "
            f"ktls {1e3 * ktls_wall:.3f} ms wall {1e3 * ktls_cpu:.3f} ms CPU"
        )
    (floor_wall, floor_cpu), (ktls_wall, ktls_cpu) = min(floors), min(ktls)
    print(
        f"best of {args.rounds}: floor {1e3 * floor_wall:.3f} ms, ktls {1e3 * ktls_wall:.3f} ms wall per pair; "
        "ktls adds "
        f"{1e3 * (ktls_wall - floor_wall):.3f} ms wall, {1e3 * (ktls_cpu - floor_cpu):.3f} ms CPU; "
        f"floor ÷ ktls {floor_wall / ktls_wall:.3f}"
    )
    if args.profile:
        profiles: list[cProfile.Profile] = []
        with profile_all_threads(profiles):
            _pairs(_ktls_end, args.pairs)
        print(report("ktls handshake pairs (host, no kernel)", profiles, args.top))


if __name__ == "__main__":
    main()

"""What ``ktls serve`` and ``ktls proxy`` share around their event loops: the ``SO_REUSEPORT`` listener, the
connection limit the descriptor limit allows, and pre-forked worker processes on one port."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
from collections.abc import Callable
from types import FrameType

__all__ = ["connection_limit", "reuseport_listener", "run_workers"]

#: Descriptors kept free of connections for files being sent, the listener and the loop.
SPARE_DESCRIPTORS = 64


def reuseport_listener(host: str, port: int) -> socket.socket:
    """A non-blocking listening socket on ``(host, port)`` that other workers may bind too (``SO_REUSEPORT``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def connection_limit(wanted: int, descriptors_per_connection: int = 1) -> int:
    """``wanted``, or fewer if this process cannot have the descriptors for that many even at its hard limit
    (the soft limit is raised as far as it may go first)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = wanted * descriptors_per_connection + SPARE_DESCRIPTORS
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return max(1, min(wanted, (soft - SPARE_DESCRIPTORS) // descriptors_per_connection))


def run_workers(
    workers: int,
    listener: socket.socket,
    new_listener: Callable[[], socket.socket],
    work: Callable[[socket.socket], None],
) -> None:
    """``work(listener)`` here when ``workers`` ≤ 1; else in ``workers`` forked processes — the first keeps
    ``listener``, the others bind their own (``new_listener``) — with SIGINT/SIGTERM forwarded to them, until
    all have exited."""
    if workers <= 1:
        work(listener)
        return
    children: list[int] = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                if children:  # the first worker keeps the parent's socket; the others bind their own
                    listener.close()
                    work(new_listener())
                else:
                    work(listener)
            finally:
                os._exit(0)
        children.append(pid)
    listener.close()

    def forward(signum: int, frame: FrameType | None) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        while True:
            try:
                os.waitpid(child, 0)
                break
            except ChildProcessError:
                break
            except InterruptedError:
                continue

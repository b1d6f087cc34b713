"""Fork safety of the in-memory key log (:mod:`ktls.core.keylog_capture`, "fork").

A forked child inherits the parent's memory file descriptor — the very same open file. If both kept using it,
one side's reads would punch holes over lines the other has not read yet, and one side's truncation would
erase them: a handshake in flight on the other side would lose its secrets. ``os.register_at_fork`` gives the
child its own memory file for every capture. Here a parent and a forked child each run real handshakes on
one context, with handshakes in flight across the fork in both directions, and each must get — and prove —
its own secrets.

The child always ends with ``os._exit`` (never returning into pytest) and reports through a pipe; the parent
waits for it with a deadline and kills it if it hangs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import signal
import socket
import ssl
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from certs import CertFiles
from ktls.core.handoff import proven_secrets
from ktls.core.handshake import Handshake
from ktls.core.keylog_capture import KeylogCapture, SecretClaim
from ktls.tls.records import RecordReader
from support import contexts, handshake_keys

TIMEOUT = 60


def connect(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> bytes:
    """A real handshake, ours the client (``support.handshake_keys``: secrets taken from the key log and proven)
    against a stock ``ssl`` server in a thread; returns the client random."""
    ours, theirs = socket.socketpair()
    theirs.settimeout(20)
    peers: list[ssl.SSLSocket] = []
    thread = threading.Thread(target=lambda: peers.append(server_ctx.wrap_socket(theirs, server_side=True)))
    thread.start()
    with ours:
        ours.settimeout(20)
        result, _ = handshake_keys(ours, client_ctx, server_side=False)
    thread.join(20)
    assert len(peers) == 1
    peers[0].close()
    return result.client_random


# --- A child process, with a deadline -------------------------------------------------------------------------


@dataclasses.dataclass
class Child:
    pid: int
    report_fd: int  # the child writes one JSON report here, then exits

    def wait(self) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT
        while True:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                os.close(self.report_fd)
                pytest.fail("the forked child hung")
            time.sleep(0.01)
        data = b""
        while chunk := os.read(self.report_fd, 65536):
            data += chunk
        os.close(self.report_fd)
        report: dict[str, Any] = json.loads(data) if data else {"ok": False, "error": "no report"}
        assert os.waitstatus_to_exitcode(status) == (0 if report.get("ok") else 1), report
        assert report["ok"], report.get("error")
        return report


def fork(work: Callable[[], dict[str, Any]]) -> Child:
    """Run ``work`` in a forked child; its result (or its traceback) comes back through :meth:`Child.wait`."""
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python ≥ 3.12: "multi-threaded process" (ours are not)
        pid = os.fork()
    if pid == 0:  # the child: whatever happens, it ends here with os._exit
        status = 1
        try:
            os.close(read_end)
            report: dict[str, Any] = {"ok": True, **work()}
            status = 0
        except BaseException:
            report = {"ok": False, "error": traceback.format_exc()[-4000:]}
        try:
            os.write(write_end, json.dumps(report).encode())
        finally:
            os._exit(status)
    os.close(write_end)
    return Child(pid, read_end)


class Signal:
    """A one-byte message between the two processes (a pipe), awaited with a deadline."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()

    def send(self) -> None:
        os.write(self._write, b"!")

    def wait(self, child: Child | None = None) -> None:
        """Until the signal comes; in the parent, pass the ``child``: if it ends first, its report is the error."""
        watched = [self._read] if child is None else [self._read, child.report_fd]
        ready, _, _ = select.select(watched, [], [], TIMEOUT)
        if child is not None and self._read not in ready and child.report_fd in ready:
            child.wait()  # raises with the child's traceback
        assert self._read in ready, "the other process never signalled"
        assert os.read(self._read, 1) == b"!"

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)


# --- A handshake in flight across the fork (sans-IO, no thread) ---------------------------------------------


class InFlight:
    """Our client's TLS 1.3 handshake against a stock server over memory, stopped after the ServerHello:
    OpenSSL has logged the handshake traffic secrets, and the claim is live."""

    def __init__(self, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, claim: SecretClaim) -> None:
        self.claim = claim
        self.handshake = Handshake(
            client_ctx, server_side=False, server_hostname="localhost", on_client_random=claim.bind
        )
        self._peer_in, self._peer_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._peer = server_ctx.wrap_bio(self._peer_in, self._peer_out, server_side=True)
        assert self.handshake.step() is False
        reader = RecordReader()
        reader.feed(self._peer_exchange(self.handshake.data_to_send()))
        server_hello, *self._rest = [bytes(record) for record in reader]
        self._feed(server_hello)
        assert self.handshake.step() is False  # the client read the ServerHello and logged its secrets
        assert claim.client_random is not None
        self.client_random = claim.client_random

    def _peer_exchange(self, data: bytes) -> bytes:
        self._peer_in.write(data)
        with contextlib.suppress(ssl.SSLWantReadError):
            self._peer.do_handshake()
        return self._peer_out.read()

    def _feed(self, data: bytes) -> None:
        while data:
            needed = self.handshake.bytes_needed()
            self.handshake.receive(data[:needed])
            data = data[needed:]

    def finish(self) -> None:
        """Complete the handshake and prove its secrets (raises if the key log lost them)."""
        for record in self._rest:
            self._feed(record)
        assert self.handshake.step() is True
        self._peer_exchange(self.handshake.data_to_send())
        proven_secrets(self.handshake, self.claim, server_side=False)


@contextlib.contextmanager
def in_flight(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> Iterator[InFlight]:
    with KeylogCapture.for_context(client_ctx).handshake() as claim:
        yield InFlight(server_ctx, client_ctx, claim)


@pytest.fixture
def tls13(rsa_cert: CertFiles) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts; the client's key log is captured (one handshake installed it)."""
    server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3)
    connect(server_ctx, client_ctx)
    return server_ctx, client_ctx


# --- Tests ---------------------------------------------------------------------------------------------------


def test_child_gets_its_own_key_log_and_both_get_their_secrets(tls13: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    # Catches: a child that keeps writing to and reading from the parent's memory file (same name, same
    # inode), and handshakes in either process that fail to find their secrets while the other runs.
    server_ctx, client_ctx = tls13
    parent_name = str(client_ctx.keylog_filename)
    parent_inode = os.stat(parent_name).st_ino

    def child() -> dict[str, Any]:
        name = str(client_ctx.keylog_filename)
        randoms = [connect(server_ctx, client_ctx).hex() for _ in range(3)]
        return {"name": name, "inode": os.stat(name).st_ino, "randoms": randoms}

    forked = fork(child)
    parent_randoms = [connect(server_ctx, client_ctx).hex() for _ in range(3)]  # meanwhile, in the parent
    report = forked.wait()
    assert report["name"] != parent_name
    assert report["inode"] != parent_inode
    assert str(client_ctx.keylog_filename) == parent_name  # the parent's own file is untouched
    assert os.stat(parent_name).st_ino == parent_inode
    assert set(report["randoms"]).isdisjoint(parent_randoms)
    connect(server_ctx, client_ctx)  # and the parent goes on


def test_parent_keeps_its_lines_while_a_child_handshakes(tls13: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    # Catches: a child that reads the inherited file — its reads punch holes over the parent's unread lines —
    # or truncates it when its own handshakes end: the parent's handshake in flight would lose its secrets.
    server_ctx, client_ctx = tls13
    capture = KeylogCapture.for_context(client_ctx)
    with in_flight(server_ctx, client_ctx) as parent:
        assert parent.client_random.hex().encode() in capture.contents()  # logged, not read yet

        def child() -> dict[str, Any]:
            child_capture = KeylogCapture.for_context(client_ctx)
            for _ in range(3):
                connect(server_ctx, client_ctx)  # each one reads, punches holes, and (no claim live) truncates
            return {"size": child_capture.size}

        report = fork(child).wait()
        assert parent.client_random.hex().encode() in capture.contents()  # the parent's lines are still there
        parent.finish()
        assert report["size"] == 0  # the child did truncate — its own file


def test_child_keeps_its_lines_while_the_parent_handshakes(tls13: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    # Catches the other direction: the parent's reads, holes and truncation (no claim is live in the parent)
    # erasing the lines of a handshake in flight in the child.
    server_ctx, client_ctx = tls13
    logged, parent_done = Signal(), Signal()

    def child() -> dict[str, Any]:
        with in_flight(server_ctx, client_ctx) as handshake:
            logged.send()
            parent_done.wait()
            handshake.finish()
        return {"random": handshake.client_random.hex()}

    forked = fork(child)
    try:
        logged.wait(forked)
        capture = KeylogCapture.for_context(client_ctx)
        for _ in range(3):
            connect(server_ctx, client_ctx)
        assert capture.size == 0  # the parent truncated its file
    finally:
        parent_done.send()  # never leave the child waiting
    forked.wait()
    logged.close()
    parent_done.close()

"""A connection only ever gets its own secrets, even when clients share a client random (security issue 15).

The key log names a connection's secrets by its client random, which the client chooses and sends in clear.
Here raw TLS 1.3 and TLS 1.2 clients (``raw_tls13``, ``raw_tls12``: independent implementations on
``cryptography``) send a random
of the test's choosing to a ktls server, and the test drives them step by step, so the order in which the
servers log their secrets is forced, not left to chance:

* two handshakes in flight with one random, their key-log lines interleaved;
* the second hello arriving before the first server has logged anything;
* a random reused after the first connection was handed to the kernel (and is still open);
* a random reused after the first handshake was abandoned;
* a flood of concurrent handshakes with distinct randoms, none of which may fall back.

Each connection must be either keyed with *its own* secrets or in userspace TLS with the reason — never keyed
with another's. On the wire: the server answers each request (``answer:<name>``) and the raw client opens it
with the keys it derived itself (``InvalidTag`` otherwise); the server decrypts the request with its receive
key (the kernel fails the read otherwise). Front ends: the blocking :func:`ktls.wrap_socket` and
:mod:`ktls.asyncio` in the guests (kernel TLS); on the host, the same hand-off without a kernel
(``handoff.proven_secrets``), where the server's secrets are compared byte for byte with the client's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol

import pytest

import ktls
import ktls.asyncio
from certs import CertFiles
from ktls.core.driver import run_handshake as _drive_handshake
from ktls.core.handoff import proven_secrets
from ktls.core.handshake import Handshake
from ktls.core.keylog_capture import KeylogCapture
from ktls.errors import KernelTLSUnavailable
from ktls.tls.keylog import KeylogLabel
from raw_tls12 import RawTLS12Client
from raw_tls13 import RawTLS13Client
from support import contexts

TIMEOUT = 30.0
SHARED = "same client random"  # in the fallback reason of a random two handshakes claimed
#: The key-log lines whose secrets reach the kernel (TLS 1.3 application traffic secrets; TLS 1.2 master secret).
KERNEL_LABELS = (KeylogLabel.CLIENT_TRAFFIC_SECRET_0, KeylogLabel.SERVER_TRAFFIC_SECRET_0, KeylogLabel.CLIENT_RANDOM)
RawClient = RawTLS13Client | RawTLS12Client
VERSIONS = {
    "tls1.3": (ssl.TLSVersion.TLSv1_3, None, RawTLS13Client),
    "tls1.2": (ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-AES128-GCM-SHA256", RawTLS12Client),
}


@dataclasses.dataclass
class Outcome:
    """What the server made of one connection, keyed by the request the client sent."""

    kernel: bool
    reason: str | None
    #: Host front end: the secrets the server would have given its kernel, by key-log label.
    secrets: dict[str, bytes] | None = None


class Server(Protocol):
    context: ssl.SSLContext
    port: int
    outcomes: dict[bytes, Outcome]
    errors: list[BaseException]

    def close(self) -> None: ...


class _Recorder:
    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.outcomes: dict[bytes, Outcome] = {}
        self.errors: list[BaseException] = []


class _ThreadedServer(_Recorder):
    """A listening socket, and a thread per accepted connection running :meth:`_handle`."""

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(context)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self._listener.accept()
                conn.settimeout(TIMEOUT)
                threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._listener.close()


class BlockingServer(_ThreadedServer):
    """``ktls.wrap_socket`` in a thread per connection."""

    def _handle(self, conn: socket.socket) -> None:
        try:
            with ktls.wrap_socket(conn, self.context, server_side=True) as stream:
                request = stream.recv(100)
                self.outcomes[request] = Outcome(stream.kernel_tx and stream.kernel_rx, stream.fallback_reason)
                stream.sendall(b"answer:" + request)
        except (OSError, ssl.SSLError) as exc:
            self.errors.append(exc)


class AsyncioServer(_Recorder):
    """``ktls.asyncio.start_server`` on a loop in its own thread."""

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(context)
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.port = 0

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                request = await reader.read(100)
                transport = writer.transport
                kernel = bool(transport.get_extra_info("ktls_tx") and transport.get_extra_info("ktls_rx"))
                self.outcomes[request] = Outcome(kernel, transport.get_extra_info("ktls_fallback_reason"))
                writer.write(b"answer:" + request)
                await writer.drain()
                writer.close()
            except (OSError, ssl.SSLError) as exc:
                self.errors.append(exc)

        async def main() -> None:
            self._server = await ktls.asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            await self._server.serve_forever()

        def run() -> None:
            with contextlib.suppress(asyncio.CancelledError):
                self._loop.run_until_complete(main())

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(TIMEOUT)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._thread.join(TIMEOUT)


class HostServer(_ThreadedServer):
    """The hand-off without a kernel: our handshake driver, the claim and the proof (``proven_secrets``);
    userspace TLS (OpenSSL) carries the data. Records which secrets the server would have given the kernel."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._capture = KeylogCapture.for_context(context)
        super().__init__(context)

    def _handle(self, conn: socket.socket) -> None:
        try:
            with conn:
                secrets: dict[str, bytes] | None = None
                reason = None
                with self._capture.handshake() as claim:  # the claim ends with the hand-off, as in wrap_socket
                    handshake = Handshake(self.context, server_side=True, on_client_random=claim.bind)
                    _drive_handshake(conn, handshake)
                    try:
                        proven = proven_secrets(handshake, claim, server_side=True)
                    except KernelTLSUnavailable as exc:
                        reason = str(exc)
                    else:
                        secrets = {
                            label.value: bytes(proven.secrets[label]) for label in KERNEL_LABELS if label in proven
                        }
                request = _userspace_read(conn, handshake)
                self.outcomes[request] = Outcome(secrets is not None, reason, secrets)
                handshake.ssl_object.write(b"answer:" + request)
                conn.sendall(handshake.outgoing.read())
        except (OSError, ssl.SSLError) as exc:
            self.errors.append(exc)


def _userspace_read(conn: socket.socket, handshake: Handshake) -> bytes:
    while True:
        try:
            return handshake.ssl_object.read(100)
        except ssl.SSLWantReadError:
            data = conn.recv(65536)
            if not data:
                raise ConnectionError("closed before the request") from None
            handshake.incoming.write(data)
            if handshake.outgoing.pending:
                conn.sendall(handshake.outgoing.read())


FRONT_ENDS: dict[str, Callable[[ssl.SSLContext], Server]] = {
    "host": HostServer,
    "stream": BlockingServer,
    "asyncio": AsyncioServer,
}


@pytest.fixture(params=list(VERSIONS))
def version(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture(
    params=[pytest.param(name, marks=[] if name == "host" else [pytest.mark.kernel]) for name in FRONT_ENDS]
)
def server(request: pytest.FixtureRequest, rsa_cert: CertFiles, version: str) -> Iterator[Server]:
    front_end = request.param
    tls_version, ciphers, _ = VERSIONS[version]
    context, _ = contexts(rsa_cert, tls_version, ciphers)
    running = FRONT_ENDS[front_end](context)
    try:
        yield running
    finally:
        running.close()


class Client:
    """One raw client connection, driven step by step."""

    def __init__(self, server: Server, client_random: bytes, name: bytes, version: str) -> None:
        self.tls: RawClient = VERSIONS[version][2](client_random)
        self.name = name
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)

    def hello(self) -> Client:
        self.sock.sendall(self.tls.client_hello())
        return self

    def flight(self) -> Client:
        """The server's flight. TLS 1.3: up to its Finished — the server has logged every secret of this
        connection by now. TLS 1.2: up to its ServerHelloDone; it logs the master secret on our next flight."""
        while not self.tls.flight_done:
            self.tls.receive(self.sock.recv(65536))
        return self

    def finish(self) -> Client:
        self.sock.sendall(self.tls.client_finished())
        return self

    def exchange(self) -> bytes:
        """Send our name, read the answer: opened with the keys this client derived itself."""
        while not self.tls.server_finished:
            self.tls.receive(self.sock.recv(65536))
        self.sock.sendall(self.tls.seal(self.name))
        expected = b"answer:" + self.name
        while len(self.tls.application_data) < len(expected):
            self.tls.receive(self.sock.recv(65536))
        return bytes(self.tls.application_data)

    def run(self) -> bytes:
        return self.hello().flight().finish().exchange()

    def close(self) -> None:
        self.sock.close()


def check_own_secrets(server: Server, client: Client) -> Outcome:
    """The server's outcome for ``client``: own keys (the answer opened, and on the host the very secrets
    compared), or userspace with a reason."""
    outcome = server.outcomes[client.name]
    if outcome.kernel:
        assert outcome.reason is None
        if outcome.secrets is not None:
            assert outcome.secrets == client.tls.secrets
    else:
        assert outcome.reason, "userspace without a reason"
    return outcome


def wait_no_handshake_in_flight(server: Server) -> None:
    capture = KeylogCapture.for_context(server.context)
    deadline = time.monotonic() + TIMEOUT
    while capture.in_flight:
        assert time.monotonic() < deadline, "the server's handshakes never ended"
        time.sleep(0.01)


def test_two_handshakes_in_flight_with_interleaved_key_log_lines(server: Server, version: str) -> None:
    """A logs all its lines, then B logs all of its under the same random, then both finish: the key log holds
    two values per label under one random. Before the fix A could be keyed with B's server secret."""
    random = os.urandom(32)
    a = Client(server, random, b"A", version).hello().flight()
    b = Client(server, random, b"B", version).hello().flight()
    for client in (a, b):
        assert client.finish().exchange() == b"answer:" + client.name
    for client in (a, b):
        outcome = check_own_secrets(server, client)
        assert not outcome.kernel
        assert SHARED in (outcome.reason or "")
        client.close()
    assert not server.errors


def test_second_hello_before_the_first_server_logs_anything(server: Server, version: str) -> None:
    random = os.urandom(32)
    a = Client(server, random, b"A", version).hello()
    b = Client(server, random, b"B", version).hello()
    for client in (a, b):
        client.flight()
    for client in (b, a):  # B finishes first this time
        assert client.finish().exchange() == b"answer:" + client.name
    for client in (a, b):
        outcome = check_own_secrets(server, client)
        assert not outcome.kernel
        assert SHARED in (outcome.reason or "")
        client.close()
    assert not server.errors


def test_random_of_a_connection_already_handed_off(server: Server, version: str) -> None:
    """The first connection's secrets were taken and proven; it stays open. A second handshake with its random
    gets its own secrets, not the first one's leftovers."""
    random = os.urandom(32)
    a = Client(server, random, b"A", version)
    assert a.run() == b"answer:A"
    b = Client(server, random, b"B", version)
    assert b.run() == b"answer:B"
    for client in (a, b):
        assert check_own_secrets(server, client).kernel
        client.close()
    assert not server.errors


def test_random_of_an_abandoned_handshake(server: Server, version: str) -> None:
    """A logs its lines and vanishes before its Finished; its claim ends and its lines are discarded, so B
    with the same random is handed off with its own secrets."""
    random = os.urandom(32)
    a = Client(server, random, b"A", version).hello().flight()
    a.close()
    wait_no_handshake_in_flight(server)
    b = Client(server, random, b"B", version)
    assert b.run() == b"answer:B"
    assert check_own_secrets(server, b).kernel
    b.close()
    assert len(server.errors) <= 1  # A's handshake, which the client abandoned (asyncio does not call back)


def test_flood_of_distinct_randoms_never_falls_back(server: Server, version: str) -> None:
    clients = [Client(server, os.urandom(32), f"C{i}".encode(), version) for i in range(16)]
    for client in clients:
        client.hello()
    for client in clients:
        client.flight()
    for client in clients:
        client.finish()
    for client in clients:
        assert client.exchange() == b"answer:" + client.name
        assert check_own_secrets(server, client).kernel
        client.close()
    assert not server.errors

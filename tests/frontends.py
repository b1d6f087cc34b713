"""The two front ends (blocking :class:`ktls.Stream`, asyncio :class:`ktls.asyncio.KTLSTransport`) behind one
blocking interface, so that one test drives either the same way and asserts the same things.

Where the two differ only in how a result surfaces, the adapter normalises it — and asserts the front end's
own side of it, so nothing is lost:

* the end of the receive side: ``recv`` raising (Stream) / ``connection_lost(exc)`` (asyncio) → ``End.error``;
  a ragged EOF: ``RaggedEOF`` once, then ``b""`` (Stream, built with ``suppress_ragged_eofs=False``) /
  ``connection_lost(None)`` with ``ragged_eof`` (asyncio) → ``End.ragged``;
* no more writes after a failure: ``sendall`` raises ``StreamClosed`` (Stream) / ``is_closing()`` (asyncio);
* the descriptor released: ``fileno() == -1`` (Stream) / ``connection_lost`` ran and the transport's socket
  says ``fileno() == -1`` (asyncio); the descriptor is gone from ``/proc/self/fd`` either way.

The asyncio transport runs on its own event loop in a thread; every wait is bounded by ``TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import ssl
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

import pytest

import ktls
import ktls.asyncio
from hostile_peer import TIMEOUT
from ktls.core.keys import ConnectionKeys
from ktls.errors import RaggedEOF, StreamClosed

__all__ = ["FRONT_ENDS", "AsyncioFrontEnd", "End", "FrontEnd", "Ours", "StreamFrontEnd"]

T = TypeVar("T")
#: The public state both front ends share (``kernel_tx``, ``kernel_rx``, ``ragged_eof``, ``key_updates_received``…).
Public = ktls.Stream | ktls.asyncio.KTLSTransport
#: Reads smaller than this go through a ``BufferedProtocol`` of that size; larger ones through ``data_received``.
SMALL_READS = 1024


@dataclasses.dataclass
class End:
    """How our receive side ended: an exception (``error``), a ragged EOF, or the peer's close_notify."""

    error: BaseException | None = None
    ragged: bool = False


class Ours(Protocol):
    """One connection of ours, whichever front end: blocking calls, each bounded by ``TIMEOUT``."""

    public: Public

    def read_until(self, size: int) -> bytes:
        """Application data until ``size`` bytes arrived or the receive side ended."""

    def send(self, data: bytes) -> None: ...

    def finish(self) -> tuple[bytes, End]:
        """Application data until the receive side ends, and how it ended."""

    def assert_refuses_writes(self) -> None: ...

    def close(self) -> None: ...

    def assert_released(self) -> None:
        """The connection is over and its descriptor closed (call after the peer has ended its side)."""


class Listening(Protocol):
    port: int

    def accept(self) -> Ours: ...

    def close(self) -> None: ...


class FrontEnd(Protocol):
    name: str

    def with_keys(
        self,
        sock: socket.socket,
        keys: ConnectionKeys,
        *,
        server_side: bool,
        tx_seq: int,
        rx_seq: int,
        tx_explicit_nonce: int | None,
        read_size: int,
    ) -> Ours: ...

    def connect(self, sock: socket.socket, context: ssl.SSLContext, *, read_size: int) -> Ours:
        """A client doing its real handshake on the connected ``sock``."""

    def listen(self, context: ssl.SSLContext, *, read_size: int) -> Listening:
        """A server on a loopback port; ``accept()`` returns the connection once its handshake is done."""

    def shut_down(self) -> None: ...


def _fd_gone(fd: int) -> bool:
    return not os.path.exists(f"/proc/self/fd/{fd}")


# -- the blocking Stream ------------------------------------------------------------------------------------


class StreamOurs:
    def __init__(self, stream: ktls.Stream, read_size: int) -> None:
        stream.settimeout(TIMEOUT)
        self.public: Public = stream
        self._stream = stream
        self._read_size = read_size
        self._buffer = bytearray(read_size)
        self._fd = stream.fileno()
        self._end: End | None = None

    def _recv(self) -> bytes:
        """One ``recv`` (``recv_into`` a buffer of ``read_size``); records the end instead of raising."""
        if self._end is not None:
            return b""
        try:
            count = self._stream.recv_into(self._buffer, self._read_size)
        except TimeoutError:
            pytest.fail(f"the stream waited {TIMEOUT} s instead of ending")
        except RaggedEOF:
            assert self._stream.ragged_eof
            assert self._stream.recv(100) == b"", "the end stays the end"
            self._end = End(ragged=True)
            return b""
        except OSError as exc:
            self._end = End(error=exc)
            return b""
        if not count:
            assert not self._stream.ragged_eof
            self._end = End()
        return bytes(self._buffer[:count])

    def read_until(self, size: int) -> bytes:
        data = b""
        while len(data) < size and self._end is None:
            data += self._recv()
        return data

    def send(self, data: bytes) -> None:
        self._stream.sendall(data)

    def finish(self) -> tuple[bytes, End]:
        data = b""
        while self._end is None:
            data += self._recv()
        return data, self._end

    def assert_refuses_writes(self) -> None:
        with pytest.raises(StreamClosed):  # the failure is sticky
            self._stream.sendall(b"after the failure")

    def close(self) -> None:
        self._stream.close()
        assert self._stream.fileno() == -1

    def assert_released(self) -> None:
        assert self._stream.fileno() == -1
        assert _fd_gone(self._fd), "the descriptor must be closed"


class StreamListening:
    def __init__(self, context: ssl.SSLContext, read_size: int) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(TIMEOUT)
        self._context = context
        self._read_size = read_size
        self.port: int = self._listener.getsockname()[1]

    def accept(self) -> Ours:
        sock, _ = self._listener.accept()
        sock.settimeout(TIMEOUT)
        stream = ktls.wrap_socket(
            sock, self._context, server_side=True, require_kernel=True, suppress_ragged_eofs=False
        )
        return StreamOurs(stream, self._read_size)

    def close(self) -> None:
        self._listener.close()


class StreamFrontEnd:
    name = "stream"

    def with_keys(
        self,
        sock: socket.socket,
        keys: ConnectionKeys,
        *,
        server_side: bool,
        tx_seq: int,
        rx_seq: int,
        tx_explicit_nonce: int | None,
        read_size: int,
    ) -> Ours:
        stream = ktls.Stream.from_keys(
            sock,
            keys,
            server_side=server_side,
            tx_seq=tx_seq,
            rx_seq=rx_seq,
            tx_explicit_nonce=tx_explicit_nonce,
            suppress_ragged_eofs=False,
        )
        return StreamOurs(stream, read_size)

    def connect(self, sock: socket.socket, context: ssl.SSLContext, *, read_size: int) -> Ours:
        stream = ktls.wrap_socket(
            sock, context, server_hostname="localhost", require_kernel=True, suppress_ragged_eofs=False
        )
        return StreamOurs(stream, read_size)

    def listen(self, context: ssl.SSLContext, *, read_size: int) -> Listening:
        return StreamListening(context, read_size)

    def shut_down(self) -> None:
        pass


# -- the asyncio transport ----------------------------------------------------------------------------------


class Recorder(asyncio.BaseProtocol):
    """Records what the transport reports, whichever protocol kind (the two classes below)."""

    def __init__(self, read_size: int) -> None:
        self.buffer = bytearray(read_size)
        self.data = bytearray()
        self.transport: ktls.asyncio.KTLSTransport | None = None
        self.eof = False
        loop = asyncio.get_running_loop()
        self.made: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[Exception | None] = loop.create_future()
        self.changed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, ktls.asyncio.KTLSTransport)
        self.transport = transport
        self.made.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.changed.set()

    def eof_received(self) -> bool:
        self.eof = True
        self.changed.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        assert not self.lost.done(), "connection_lost twice"
        self.lost.set_result(exc)
        self.changed.set()


class PlainRecorder(Recorder, asyncio.Protocol):
    """An ``asyncio.Protocol``: the transport calls ``data_received``."""


class BufferRecorder(Recorder, asyncio.BufferedProtocol):
    """A ``BufferedProtocol`` reading through a buffer of ``read_size`` (control records come in pieces)."""

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(self.buffer[:nbytes]))


def _recorder(read_size: int) -> Callable[[], Recorder]:
    """The protocol factory: small reads through a BufferedProtocol, otherwise a plain Protocol."""
    kind = BufferRecorder if read_size < SMALL_READS else PlainRecorder
    return lambda: kind(read_size)


class AsyncioOurs:
    def __init__(self, front_end: AsyncioFrontEnd, protocol: Recorder) -> None:
        assert protocol.transport is not None
        self.public: Public = protocol.transport
        self._front_end = front_end
        self._protocol = protocol
        self._transport = protocol.transport
        self._fd = self._transport.get_extra_info("socket").fileno()
        self._taken = 0

    def _ended(self) -> bool:
        return self._protocol.eof or self._protocol.lost.done()

    async def _wait(self, done: Callable[[], bool]) -> None:
        while not done():
            self._protocol.changed.clear()
            await self._protocol.changed.wait()

    def _take(self) -> bytes:
        data = bytes(self._protocol.data[self._taken :])
        self._taken = len(self._protocol.data)
        return data

    def read_until(self, size: int) -> bytes:
        start = self._taken
        self._front_end.run(self._wait(lambda: len(self._protocol.data) - start >= size or self._ended()))
        return self._take()

    def send(self, data: bytes) -> None:
        self._front_end.call(self._transport.write, data)

    def finish(self) -> tuple[bytes, End]:
        self._front_end.run(self._wait(self._ended))
        if self._protocol.lost.done() and (error := self._protocol.lost.result()) is not None:
            return self._take(), End(error=error)
        return self._take(), End(ragged=self._transport.ragged_eof)

    def assert_refuses_writes(self) -> None:
        assert self._transport.is_closing()

    def close(self) -> None:
        self._front_end.call(self._transport.close)

    def assert_released(self) -> None:
        async def lost() -> Exception | None:
            error = await self._protocol.lost
            await asyncio.sleep(0)  # the transport closes its socket right after connection_lost
            return error

        error = self._front_end.run(lost())
        end = self.finish()[1]
        assert error is end.error, f"connection_lost({error!r}) after the end {end!r}"
        assert self._transport.is_closing()
        assert self._transport.get_extra_info("socket").fileno() == -1
        assert _fd_gone(self._fd), "the descriptor must be closed"


class AsyncioListening:
    def __init__(self, front_end: AsyncioFrontEnd, context: ssl.SSLContext, read_size: int) -> None:
        self._front_end = front_end
        self._protocols: asyncio.Queue[Recorder] | None = None

        async def serve() -> ktls.asyncio.Server:
            self._protocols = asyncio.Queue()
            make = _recorder(read_size)

            def factory() -> Recorder:
                protocol = make()
                assert self._protocols is not None
                self._protocols.put_nowait(protocol)
                return protocol

            return await ktls.asyncio.create_server(
                factory, "127.0.0.1", 0, ssl=context, require_kernel=True, ssl_shutdown_timeout=TIMEOUT
            )

        self._server = front_end.run(serve())
        self.port: int = self._server.sockets[0].getsockname()[1]

    def accept(self) -> Ours:
        async def accepted() -> Recorder:
            assert self._protocols is not None
            protocol = await self._protocols.get()
            await protocol.made
            return protocol

        return AsyncioOurs(self._front_end, self._front_end.run(accepted()))

    def close(self) -> None:
        self._front_end.call(self._server.close)


class AsyncioFrontEnd:
    name = "asyncio"

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="asyncio front end", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for it, at most ``TIMEOUT``."""
        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, TIMEOUT), self.loop)
        try:
            return future.result(TIMEOUT + 5)
        except TimeoutError:
            pytest.fail(f"the transport did not get there in {TIMEOUT} s")

    def call(self, function: Callable[..., object], *args: object) -> None:
        async def call() -> None:
            function(*args)

        self.run(call())

    def with_keys(
        self,
        sock: socket.socket,
        keys: ConnectionKeys,
        *,
        server_side: bool,
        tx_seq: int,
        rx_seq: int,
        tx_explicit_nonce: int | None,
        read_size: int,
    ) -> Ours:
        async def connect() -> Recorder:
            _, protocol = await ktls.asyncio.connect_with_keys(
                _recorder(read_size),
                sock,
                keys,
                server_side=server_side,
                tx_seq=tx_seq,
                rx_seq=rx_seq,
                tx_explicit_nonce=tx_explicit_nonce,
                ssl_shutdown_timeout=TIMEOUT,
            )
            assert isinstance(protocol, Recorder)
            return protocol

        return AsyncioOurs(self, self.run(connect()))

    def connect(self, sock: socket.socket, context: ssl.SSLContext, *, read_size: int) -> Ours:
        async def connect() -> Recorder:
            _, protocol = await ktls.asyncio.create_connection(
                _recorder(read_size),
                sock=sock,
                ssl=context,
                server_hostname="localhost",
                require_kernel=True,
                ssl_shutdown_timeout=TIMEOUT,
            )
            assert isinstance(protocol, Recorder)
            return protocol

        return AsyncioOurs(self, self.run(connect()))

    def listen(self, context: ssl.SSLContext, *, read_size: int) -> Listening:
        return AsyncioListening(self, context, read_size)

    def shut_down(self) -> None:
        """Stop the loop and close it (its selector and self-pipe are descriptors too)."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), "the event loop hung"
        self.loop.close()


FRONT_ENDS: dict[str, Callable[[], FrontEnd]] = {"stream": StreamFrontEnd, "asyncio": AsyncioFrontEnd}

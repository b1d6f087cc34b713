"""An asyncio transport on a kernel TLS socket: :class:`KTLSTransport`.

The socket I/O is :class:`ktls.engine.Engine`'s (shared with the blocking Stream) and every decision the
connection core's; the transport waits with the event loop and talks to the protocol.

* **Reading: until EAGAIN, never trusting poll after a read.** In TLS 1.3 the kernel must decrypt a record to
  learn its type, so a read of application data can pull the KeyUpdate behind it into the kernel's queue; from
  then on (Linux ≥ 6.14) ``poll`` hides readability until the new key is set. Each readiness callback therefore
  reads until ``EAGAIN`` (a few reads, then again via ``call_soon``), and turning reading back on reads once at
  once. Application data goes to ``data_received``, or straight into a ``BufferedProtocol``'s buffer.
* **Writing.** ``write`` sends what the socket takes and queues the rest in the engine's ordered queue (our
  KeyUpdate at its front, close_notify at its back); the loop's writer callback flushes it.
* **Closing.** ``write_eof`` queues close_notify and ``SHUT_WR``; TLS 1.3 lets the peer keep sending and we keep
  reading. ``close`` does the same, stops delivering data, and waits — at most ``ssl_shutdown_timeout``, as
  asyncio's SSL transport does — for the queue to drain and the peer to end its side (close_notify or EOF),
  reading and discarding meanwhile: closing a socket with unread data makes the kernel send a reset, which can
  destroy our last records at the peer. A fatal alert we send is followed by the same half-close and a short
  wait. ``connection_lost`` gets ``None`` on a clean end, otherwise the typed exception
  (:class:`~ktls.errors.AlertReceived`, :class:`~ktls.errors.PeerMisbehaved`,
  :class:`~ktls.errors.RecordAuthenticationError`, :class:`~ktls.errors.RekeyUnsupported`, …).
* **Zero-copy sendfile.** On the default (selector) loop, ``loop.sendfile(transport, file)`` takes its native
  path for this transport: ``_sendfile_compatible`` is ``TRY_NATIVE`` while the kernel sends, and the loop's
  ``_sendfile_native`` finds what it uses of a ``_SelectorSocketTransport``: ``_sock``, ``_sock_fd``, an entry in
  ``loop._transports``, ``is_reading``/``pause_reading``/``resume_reading``, ``_make_empty_waiter`` and
  ``_reset_empty_waiter`` (identical in CPython 3.10–3.13). It then runs ``os.sendfile`` on the socket, and the
  kernel encrypts the page-cache pages. :meth:`KTLSTransport.sendfile` does the same on any loop (uvloop).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import ssl
import warnings
from asyncio import constants as asyncio_constants
from asyncio import selector_events, transports, trsock
from collections.abc import Generator, Iterable
from typing import IO, TYPE_CHECKING, Any

from .. import splice
from ..core.connection import Connection, Receiving, Sending
from ..core.handshake import Handshake
from ..engine import Engine, Wait, wait_async
from ..errors import StreamClosed
from ..tlsinfo import TLSInformation
from ._handshake import DEFAULT_SHUTDOWN_TIMEOUT

__all__ = ["KTLSTransport"]

log = logging.getLogger("ktls")

#: How long a fatal alert we sent gets to reach the peer before the descriptor is closed.
_FATAL_DRAIN_TIMEOUT = 0.5
#: Reads per readiness callback before yielding to other callbacks (and reading again right after).
_READS_PER_CALL = 8
#: Writes after the connection was lost that are ignored before a warning, like asyncio's transports.
_LOG_THRESHOLD_FOR_CONNLOST_WRITES = 5


class _Lifecycle(enum.Enum):
    """Where a transport is in its life (the directions' own states are the connection's)."""

    OPEN = enum.auto()  #: data flows both ways as the protocol asks
    CLOSING = enum.auto()  #: close() or a failure: no more data for the protocol, no more writes; the end is awaited
    LOST = enum.auto()  #: connection_lost is scheduled and the descriptor is going: nothing more happens


class KTLSTransport(TLSInformation, transports._FlowControlMixin):  # the base asyncio's sendfile fallback insists on
    """A TLS transport whose records the kernel encrypts and decrypts (or, on fallback, OpenSSL).

    Built by :func:`ktls.asyncio.create_connection` / :func:`~ktls.asyncio.create_server`; supports
    ``asyncio.Protocol`` and ``asyncio.BufferedProtocol``. ``get_extra_info`` answers what asyncio's SSL
    transports answer (``ssl_object``, ``peercert``, ``cipher``, ``compression``, ``sslcontext``, ``socket``,
    ``sockname``, ``peername``) plus ``ktls_tx``/``ktls_rx`` (which directions the kernel does) and
    ``ktls_fallback_reason``.
    """

    #: Largest read handed to ``data_received`` (asyncio's ``_SelectorTransport.max_size``).
    max_size = 256 * 1024

    _protocol_paused: bool
    _high_water: int
    _low_water: int

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        handshake: Handshake | None,
        connection: Connection,
        protocol: asyncio.BaseProtocol,
        *,
        server: Any = None,
        shutdown_timeout: float | None = None,
        early_data: bytes = b"",
    ) -> None:
        super().__init__(None, loop)
        self._loop: asyncio.AbstractEventLoop = loop
        self._sock = sock
        self._sock_fd = sock.fileno()
        self._engine = Engine(sock, handshake, connection, early_data)
        self._engine.on_flushed = self._flushed
        self._connection = connection  # every protocol decision (ktls.core.connection)
        self._shutdown_timeout = DEFAULT_SHUTDOWN_TIMEOUT if shutdown_timeout is None else shutdown_timeout
        self._server = server
        self._protocol: asyncio.BaseProtocol = protocol
        self._buffered = isinstance(protocol, asyncio.BufferedProtocol)
        self._paused = False  # pause_reading()
        self._life = _Lifecycle.OPEN
        self._eof_written = False  # write_eof() was called
        self._read_done = False  # the peer's side ended: close_notify, EOF, or a failure
        self._error: Exception | None = None  # what connection_lost will be given
        self._empty_waiter: asyncio.Future[None] | None = None
        self._waiters: set[asyncio.Future[None]] = set()  # what sendfiles and splices await: woken when lost
        self._reader_on = False
        self._writer_on = False
        self._deadline: asyncio.TimerHandle | None = None
        self._lost_writes = 0
        self._selector = isinstance(loop, selector_events.BaseSelectorEventLoop)
        # A selector loop's private calls, as its own socket transports use them (no handle per call); and the
        # registry its _sendfile_native expects to undo. Other loops (uvloop): the public ones.
        anyloop: Any = loop
        self._add_reader = anyloop._add_reader if self._selector else loop.add_reader
        self._remove_reader = anyloop._remove_reader if self._selector else loop.remove_reader
        self._add_writer = anyloop._add_writer if self._selector else loop.add_writer
        self._remove_writer = anyloop._remove_writer if self._selector else loop.remove_writer
        self._extra_info = self._static_extra()
        if self._selector:
            anyloop._transports[self._sock_fd] = self
        if server is not None:
            server._attach(self)
        loop.call_soon(self._connection_made)

    # -- the loop's plumbing --------------------------------------------------------------------------------------

    def _connection_made(self) -> None:
        if self._life is not _Lifecycle.LOST:
            self._protocol.connection_made(self)
            self._update_reader()

    def _want_reader(self) -> bool:
        if self._life is _Lifecycle.LOST or self._read_done:
            return False
        return self._life is _Lifecycle.CLOSING or not self._paused

    def _update_reader(self) -> None:
        want = self._want_reader()
        if want == self._reader_on:
            return
        self._reader_on = want
        if want:
            self._add_reader(self._sock_fd, self._read_ready)
            # Read once right away: plaintext decrypted earlier (early data, the deferred window, OpenSSL's
            # buffer) waits for no readiness event, nor does a KeyUpdate the kernel decrypted during our last
            # read (module docstring).
            self._loop.call_soon(self._read_ready)
        else:
            self._remove_reader(self._sock_fd)

    def _set_writer(self, want: bool) -> None:
        if want == self._writer_on or (want and self._life is _Lifecycle.LOST):
            return
        self._writer_on = want
        if want:
            self._add_writer(self._sock_fd, self._write_ready)
        else:
            self._remove_writer(self._sock_fd)

    # -- extra info -----------------------------------------------------------------------------------------------

    def _static_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {
            "ssl_object": self._engine.ssl_object,
            "sslcontext": self.context,
            "peercert": self.getpeercert(),
            "cipher": self.cipher(),
            "compression": self.compression(),
            "socket": trsock.TransportSocket(self._sock),
        }
        for name, get in (("sockname", self._sock.getsockname), ("peername", self._sock.getpeername)):
            try:
                extra[name] = get()
            except OSError:
                extra[name] = None
        return extra

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ktls_tx":
            return self.kernel_tx
        if name == "ktls_rx":
            return self.kernel_rx
        if name == "ktls_fallback_reason":
            return self.fallback_reason
        return self._extra_info.get(name, default)

    # -- protocol and state ---------------------------------------------------------------------------------------

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        self._buffered = isinstance(protocol, asyncio.BufferedProtocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def is_closing(self) -> bool:
        return self._life is not _Lifecycle.OPEN

    def is_reading(self) -> bool:
        return not self._paused and self._life is _Lifecycle.OPEN

    def pause_reading(self) -> None:
        if self._life is not _Lifecycle.OPEN or self._paused:
            return
        self._paused = True
        self._update_reader()

    def resume_reading(self) -> None:
        if self._life is not _Lifecycle.OPEN or not self._paused:
            return
        self._paused = False
        self._update_reader()

    @property
    def _sendfile_compatible(self) -> asyncio_constants._SendfileMode:
        """``loop.sendfile`` takes its native path (``os.sendfile``) when the kernel sends on a selector loop."""
        if self.kernel_tx and self._selector:
            return asyncio_constants._SendfileMode.TRY_NATIVE
        return asyncio_constants._SendfileMode.FALLBACK

    # -- reading --------------------------------------------------------------------------------------------------

    def _read_ready(self) -> None:
        """Read until ``EAGAIN`` (at most ``_READS_PER_CALL`` reads, then again soon: module docstring)."""
        for _ in range(_READS_PER_CALL):
            if not self._want_reader():
                return
            try:
                self._read_once()
            except (BlockingIOError, InterruptedError):
                return
            except Exception as exc:
                self._fatal_error(exc)
                return
        if self._want_reader():
            self._loop.call_soon(self._read_ready)

    def _read_once(self) -> None:
        """One read: data to the protocol, the end of the stream to :meth:`_on_eof`; after close() or a failure,
        read and drop until the peer's side ends."""
        engine = self._engine
        protocol = self._protocol
        if self._life is _Lifecycle.CLOSING:
            if not engine.discard():
                self._on_eof()
        elif self._buffered:
            assert isinstance(protocol, asyncio.BufferedProtocol)
            buffer = memoryview(protocol.get_buffer(-1)).cast("B")
            if not len(buffer):
                raise RuntimeError("get_buffer() returned an empty buffer")
            if nbytes := engine.read_into(buffer):
                protocol.buffer_updated(nbytes)
            elif nbytes == 0:
                self._on_eof()
        else:
            assert isinstance(protocol, asyncio.Protocol)
            if data := engine.read(self.max_size):
                protocol.data_received(data)
            elif data is not None:
                self._on_eof()

    def _on_eof(self) -> None:
        """The peer's side ended (close_notify or a bare TCP EOF: ``ragged_eof`` tells)."""
        if self._read_done:
            return
        self._read_done = True
        self._update_reader()
        if self._life is _Lifecycle.CLOSING:
            self._maybe_finish()
            return
        protocol = self._protocol
        keep_open = isinstance(protocol, (asyncio.Protocol, asyncio.BufferedProtocol)) and protocol.eof_received()
        connection = self._connection
        # TLS 1.2: our write side closed answering the peer's close_notify; nothing more can go either way.
        answered = connection.sending is Sending.CLOSED and not self._eof_written and not connection.write_closed_reason
        if not keep_open or answered:
            self.close()

    def key_update(self, request_peer_update: bool = False) -> None:
        """Send a TLS 1.3 KeyUpdate and switch to the next send key (kernel ≥ 6.14), before any data still
        queued. Raises :class:`~ktls.errors.RekeyUnsupported` where the kernel cannot."""
        self._engine.key_update(request_peer_update)

    # -- writing --------------------------------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data argument must be a bytes-like object, not {type(data).__name__!r}")
        if self._eof_written:
            raise RuntimeError("Cannot call write() after write_eof()")
        if self._empty_waiter is not None:
            raise RuntimeError("unable to write; sendfile is in progress")
        if not data:
            return
        connection = self._connection
        if connection.write_closed_reason is not None and self._life is not _Lifecycle.LOST:
            # Not the application's close: the send key is spent and cannot be replaced. Say so, loudly.
            raise StreamClosed(connection.write_closed_reason)
        if self._life is not _Lifecycle.OPEN or connection.sending is Sending.CLOSED:
            if self._lost_writes >= _LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                log.warning("ktls transport: write() after the connection was closed")
            self._lost_writes += 1
            return
        try:
            self._engine.write(data)
        except Exception as exc:
            self._fatal_error(exc)
            return
        if self._engine.queue:
            self._maybe_pause_protocol()

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.write(b"".join(list_of_data))

    def _write_ready(self) -> None:
        """The loop's writer callback: flush the engine's queue."""
        try:
            self._engine.flush()
        except Exception as exc:
            if self._life is _Lifecycle.CLOSING and isinstance(exc, OSError):
                self._close_now()  # the peer is gone; nothing more can reach it
            else:
                self._fatal_error(exc)

    def _flushed(self) -> None:
        """After every flush of the engine's queue: the writer callback while anything waits, flow control,
        sendfile's empty waiter, the end of a close."""
        if self._life is _Lifecycle.LOST:
            return
        engine = self._engine
        self._set_writer(bool(engine.queue))
        self._maybe_resume_protocol()
        if not engine.queue:
            if self._empty_waiter is not None and not self._empty_waiter.done():
                self._empty_waiter.set_result(None)
                engine.hold = True
            self._maybe_finish()

    # -- write flow control: asyncio's _FlowControlMixin, over the engine's queue ---------------------------------

    def get_write_buffer_size(self) -> int:
        return self._engine.queued

    if TYPE_CHECKING:  # what the mixin does, which typeshed does not describe

        def _set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...
        def _maybe_pause_protocol(self) -> None: ...
        def _maybe_resume_protocol(self) -> None: ...

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """Send close_notify (after everything written), then ``shutdown(SHUT_WR)``. In TLS 1.3 the peer may go on
        sending and we go on reading (RFC 8446 §6.1)."""
        if self._life is not _Lifecycle.OPEN or self._eof_written:
            return
        self._eof_written = True
        try:
            self._engine.close_write()
        except Exception as exc:
            self._fatal_error(exc)

    # -- sendfile ---------------------------------------------------------------------------------------------------

    def _make_empty_waiter(self) -> asyncio.Future[None]:
        """For the loop's ``_sendfile_native``: done once everything queued is sent; the queue then waits."""
        if self._empty_waiter is not None:
            raise RuntimeError("Empty waiter is already set")
        self._empty_waiter = self._loop.create_future()
        if not self._engine.queue:
            self._empty_waiter.set_result(None)
            self._engine.hold = True
        return self._empty_waiter

    def _reset_empty_waiter(self) -> None:
        self._empty_waiter = None
        self._engine.hold = False
        if self._life is _Lifecycle.LOST:
            return
        try:
            if self._connection.record_limit is not None:
                self._engine.count_records()  # sendfile's records were not counted: ask the kernel
            self._engine.flush()
        except Exception as exc:
            self._fatal_error(exc)
        self._maybe_finish()

    async def sendfile(self, file: IO[bytes], offset: int = 0, count: int | None = None) -> int:
        """Send ``count`` bytes of ``file`` from ``offset`` (to its end when ``None``) with ``os.sendfile``: the
        kernel encrypts page-cache pages, no byte of the file enters this process. On a selector loop this is
        ``loop.sendfile(self, ...)``; on other loops (uvloop, whose ``loop.sendfile`` is not implemented) the
        engine's sendfile loop runs here (:meth:`ktls.engine.Engine.sendfile`; on fallback it reads the file and
        writes). The file position is left after the last byte sent, like ``loop.sendfile``."""
        if self.is_closing():
            raise RuntimeError("Transport is closing")
        if self._selector:
            return await self._loop.sendfile(self, file, offset, count)
        resume = self.is_reading()
        self.pause_reading()
        kernel = self.kernel_tx
        try:
            if kernel:
                await self._make_empty_waiter()  # the queue is empty and held: the file goes next
            return await self._wait_for(self._engine.sendfile(file, offset, count))
        finally:
            if kernel:
                self._reset_empty_waiter()
            if resume:
                self.resume_reading()

    # -- closing ----------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """close_notify after everything written, ``SHUT_WR``, then wait (≤ ``ssl_shutdown_timeout``) for the peer
        to end its side; no more data reaches the protocol. ``connection_lost(None)`` follows."""
        if self._life is not _Lifecycle.OPEN:
            return
        self._life = _Lifecycle.CLOSING
        self._update_reader()  # read (and drop) until the peer's side ends
        self._deadline = self._loop.call_later(self._shutdown_timeout, self._shutdown_timed_out)
        if self._connection.error is None:
            try:
                self._engine.close_write()
            except Exception as exc:
                self._fatal_error(exc)
                return
        self._maybe_finish()

    def _shutdown_timed_out(self) -> None:
        self._deadline = None
        if self._life is not _Lifecycle.LOST:
            if self._error is None and (self._engine.queue or not self._read_done):
                self._error = TimeoutError("SSL shutdown timed out")
            self._close_now()

    def abort(self) -> None:
        """Close at once: queued data is dropped and no close_notify is sent."""
        self._close_now()

    def _maybe_finish(self) -> None:
        if self._life is not _Lifecycle.CLOSING or self._engine.queue or self._empty_waiter is not None:
            return
        if self._read_done:
            self._close_now()

    def _fatal_error(self, exc: Exception) -> None:
        """The connection failed: tell the peer if there is an alert to send (half-close after it and wait
        briefly for the peer's FIN: a reset must not overtake it), then close."""
        if self._life is _Lifecycle.LOST:
            return
        if isinstance(exc, (OSError, ssl.SSLError)):
            log.debug("ktls transport %r: %s", self, exc)
        else:
            self._loop.call_exception_handler(
                {
                    "message": "Fatal error on ktls transport",
                    "exception": exc,
                    "transport": self,
                    "protocol": self._protocol,
                }
            )
        self._error = exc
        self._life = _Lifecycle.CLOSING
        try:
            alerting = self._engine.fail()
        except Exception:
            alerting = False
        if not alerting or isinstance(exc, (ConnectionError, TimeoutError)):
            self._close_now()
            return
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self._loop.call_later(_FATAL_DRAIN_TIMEOUT, self._close_now)
        self._update_reader()
        self._maybe_finish()

    def _close_now(self) -> None:
        """Release everything; ``connection_lost`` runs soon, then the descriptor is closed."""
        if self._life is _Lifecycle.LOST:
            return
        self._life = _Lifecycle.LOST
        self._update_reader()
        self._set_writer(False)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._engine.clear()
        if self._empty_waiter is not None and not self._empty_waiter.done():
            self._empty_waiter.set_exception(ConnectionError("Connection is closed by peer"))
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)  # a sendfile or splice waiting: it stops
        self._loop.call_soon(self._call_connection_lost, self._error)

    def _call_connection_lost(self, exc: Exception | None) -> None:
        try:
            self._protocol.connection_lost(exc)
        finally:
            self._sock.close()
            splice.release(self)  # the pipes of splice_to/splice_from, if any
            server, self._server = self._server, None
            if server is not None:
                server._detach(self)

    def __del__(self) -> None:
        sock = getattr(self, "_sock", None)
        if sock is not None and sock.fileno() != -1 and getattr(self, "_life", _Lifecycle.LOST) is not _Lifecycle.LOST:
            warnings.warn(f"unclosed transport {self!r}", ResourceWarning, source=self, stacklevel=1)
            sock.close()

    def __repr__(self) -> str:
        state = {_Lifecycle.CLOSING: "closing", _Lifecycle.LOST: "closed"}.get(self._life, f"fd={self._sock_fd}")
        return f"<ktls.asyncio.KTLSTransport {state} {self._connection.describe()}>"

    # -- splice (ktls.splice; kept last in the class so that it merges apart from the rest) ---------------------

    async def splice_to(self, fd: int, count: int) -> int:
        """Move up to ``count`` bytes of received application data into the non-blocking descriptor ``fd`` with
        ``splice`` (the kernel decrypts into a pipe; no byte enters Python); 0 at the end of the stream, when the
        protocol's ``eof_received`` has also been called, and 0 once the transport closes (also while the call
        waits). Pauses reading: while splicing, the protocol gets no ``data_received``. On fallback the same, by
        a copy (:mod:`ktls.splice`)."""
        self.pause_reading()
        if self.is_closing() or count <= 0:
            return 0
        steps = splice.splice_to(self._engine, splice.pipes_of(self)[0], fd, count)
        moved = await self._wait_for(steps, stop_at_close=True)
        if not moved and self.receiving is Receiving.CLOSED:
            self._on_eof()  # the splice met the end of the stream (not the transport's close)
        return moved

    async def splice_from(self, fd: int, count: int) -> int:
        """Move up to ``count`` bytes from the non-blocking descriptor ``fd`` into the connection with
        ``splice``, for the kernel to encrypt, in order with what was written before; 0 at ``fd``'s end;
        ``ConnectionError`` when the transport is lost (also while the call waits). On fallback the same, by a
        copy (:mod:`ktls.splice`)."""
        return await self._wait_for(splice.splice_from(self._engine, splice.pipes_of(self)[1], fd, count))

    async def _wait_for(self, steps: Generator[Wait, None, int], *, stop_at_close: bool = False) -> int:
        """Run one of the engine's loops (sendfile, splice), waiting with the event loop: a failure of the
        connection fails the transport, one of the other descriptor is raised as it is
        (:func:`ktls.splice.failures`); with ``stop_at_close``, 0 once the transport closes."""
        with splice.failures(self._fatal_error), contextlib.closing(steps):
            while True:
                try:
                    wait = next(steps)
                except StopIteration as done:
                    moved: int = done.value
                    return moved
                if self._life is not _Lifecycle.LOST:
                    waiter = self._loop.create_future()
                    self._waiters.add(waiter)
                    try:
                        await wait_async(self._loop, wait, waiter)
                    except OSError as exc:
                        if wait.fd != self._sock_fd:
                            raise splice.DescriptorFailed(exc) from exc
                        raise
                    finally:
                        self._waiters.discard(waiter)
                if stop_at_close and self.is_closing():
                    return 0
                if self._life is _Lifecycle.LOST:  # also during the wait: the descriptor is going
                    raise ConnectionError("the connection was lost")

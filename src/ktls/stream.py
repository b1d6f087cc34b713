"""A socket-like TLS stream whose records the kernel encrypts and decrypts: :func:`wrap_socket` and :class:`Stream`.

:func:`wrap_socket` runs the handshake with Python's ``ssl`` (:mod:`ktls.core.driver`), hands the keys to the
kernel, and returns a :class:`Stream`: ``send``/``sendfile`` are socket calls the kernel encrypts, ``recv`` one
``recvmsg`` it decrypts. The socket I/O is :class:`ktls.engine.Engine`'s (shared with the asyncio transport)
and every decision the connection core's; what is the Stream's own is how it waits.

* **Timeouts are the kernel's.** A socket with a timeout stays blocking for the kernel and gets the timeout
  as ``SO_RCVTIMEO``/``SO_SNDTIMEO``: one syscall per call, waiting inside it. CPython would instead poll
  *before* every call, and Linux ≥ 6.14 reports a kTLS socket unreadable while it holds a KeyUpdate it has
  already decrypted ahead (a rekey is pending), so a poll-first read would sit out its timeout with the record
  waiting; ``recvmsg`` itself sees the record. Trying first and polling after ``EAGAIN`` would cost a third
  syscall on every read that has to wait (request/response traffic, measured: half the round trips).
  Non-blocking streams are plain ``O_NONBLOCK``. Only what the engine queued (control records, OpenSSL's
  records on fallback) is waited for with ``poll`` (:meth:`Stream._wait_for`).
* **Fallback.** When the kernel cannot take over (no ``tls`` ULP, a cipher or version it lacks), the stream
  keeps working in user space over the same ``SSLObject`` and ``fallback_reason`` says why;
  ``require_kernel=True`` raises instead. A TLS 1.3 client reads its first records through OpenSSL so that
  the server's tickets reach ``stream.session`` (the deferred window, :mod:`ktls.core.connection`).
* **close_notify** is sent by ``shutdown(SHUT_WR)`` and ``close()`` behind everything ``send`` accepted; when
  the send buffer is full it waits for room (bounded) rather than dropping it (rustls/ktls#78). Writes after it
  raise :class:`~ktls.errors.StreamClosed`, never return 0 (rustls/ktls#72). ``close()`` then lingers
  (:meth:`ktls.engine.Engine.linger`) so that a reset cannot destroy our last records.
* **Fatal alerts we send** are followed by a half-close and a short wait for the peer's FIN before the error
  is raised (:meth:`Stream._failed`): closing with unread data makes the kernel send a reset that can destroy
  the alert.
* **Ragged EOF.** A TCP EOF without close_notify reads as ``b""`` when ``suppress_ragged_eofs`` (the
  ``ssl`` default) and raises :class:`~ktls.errors.RaggedEOF` otherwise; ``stream.ragged_eof`` tells.
* **Key-usage limits** (RFC 8446 §5.5): a TLS 1.3 stream updates its send key before the AEAD's limit on
  kernels that can rekey; elsewhere (TLS 1.2, Linux < 6.14) it closes its write side cleanly at the limit
  (close_notify; later writes raise ``StreamClosed`` with the reason) (:attr:`Stream.record_limit`).
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import ssl
import time
from collections.abc import Callable, Generator
from typing import Any, BinaryIO, Literal, TypeVar

from . import splice
from .core import driver
from .core.connection import Connection
from .core.handshake import Handshake
from .core.keys import ConnectionKeys
from .engine import Engine, Wait, wait_blocking
from .errors import KernelTLSUnavailable
from .kernel import tcp
from .tlsinfo import TLSInformation

__all__ = ["Stream", "wrap_socket"]

_Into = TypeVar("_Into", int, memoryview)  # what a read is given: a size, or a buffer
_Read = TypeVar("_Read", bytes, int)  # what it returns: the bytes, or how many
_T = TypeVar("_T")

#: How long close() waits to send its close_notify into a full send buffer, and an alert's wait for the peer's
#: FIN.
_CLOSE_TIMEOUT = 2.0
_DRAIN_TIMEOUT = 0.5
#: How long close() waits for the peer to acknowledge our last bytes while discarding what it sends.
_LINGER = 1.0
#: Fallback (userspace TLS): how long close() keeps sending records ``send`` already accepted, when the
#: stream has no timeout of its own (asyncio's ``ssl_shutdown_timeout`` default). Past it, close() raises.
_CLOSE_FLUSH_TIMEOUT = 30.0


def wrap_socket(
    sock: socket.socket,
    context: ssl.SSLContext,
    *,
    server_side: bool = False,
    server_hostname: str | None = None,
    session: ssl.SSLSession | None = None,
    require_kernel: bool = False,
    suppress_ragged_eofs: bool = True,
    rx_expect_no_pad: bool = False,
) -> Stream:
    """Run a TLS handshake on the connected ``sock`` with ``context``, then hand the keys to the kernel.

    The socket's timeout applies to the handshake. Returns a :class:`Stream` that owns ``sock``. When the
    kernel cannot take over, the stream works in user space and ``fallback_reason`` says why — unless
    ``require_kernel`` is true, which raises :class:`~ktls.errors.KernelTLSUnavailable` instead (the
    handshake will have happened; the socket is closed). ``rx_expect_no_pad``: TLS 1.3, a peer known not to
    pad its records (most do not): the kernel decrypts straight into the reader's buffer
    (:func:`ktls.core.handoff.install_rx` says what it costs when the bet is wrong); ``stream.rx_expect_no_pad``
    tells whether the kernel took it.
    """
    steps = driver.establish(
        context,
        server_side=server_side,
        server_hostname=server_hostname,
        session=session,
        require_kernel=require_kernel,
    )
    try:
        established = driver.run(sock, steps)
        connection = driver.take_over(
            sock,
            established,
            expect_no_pad=rx_expect_no_pad,
            suppress_ragged_eofs=suppress_ragged_eofs,
            require_kernel=require_kernel,
        )
    except KernelTLSUnavailable:
        sock.close()
        raise
    return Stream(sock, established.handshake, connection)


class Stream(TLSInformation):
    """A connected TLS stream: a socket whose records the kernel protects (or, on fallback, OpenSSL).

    Behaves like ``ssl.SSLSocket``: ``recv``/``recv_into``/``send``/``sendall``/``sendfile``/``makefile``,
    ``shutdown``/``close``, timeouts and non-blocking mode of the underlying socket, and the TLS information
    (``version()``, ``cipher()``, ``getpeercert()``, ``session``…).
    """

    def __init__(
        self, sock: socket.socket, handshake: Handshake | None, connection: Connection, early_data: bytes = b""
    ) -> None:
        """Use :func:`wrap_socket` or :meth:`from_keys`; this constructor is theirs."""
        self._sock = sock
        self._engine = Engine(sock, handshake, connection, early_data)
        self._connection = connection
        self._timeout: float | None = None
        self.settimeout(sock.gettimeout())  # module docstring, "Timeouts are the kernel's"
        self._closed = False
        self._io_refs = 0

    @classmethod
    def from_keys(
        cls,
        sock: socket.socket,
        keys: ConnectionKeys,
        *,
        server_side: bool,
        tx_seq: int,
        rx_seq: int,
        tx_explicit_nonce: int | None = None,
        early_data: bytes = b"",
        suppress_ragged_eofs: bool = True,
    ) -> Stream:
        """A kernel TLS stream for a handshake done elsewhere (another TLS library): ``keys`` with the
        sequence numbers of the next record each way, and plaintext already decrypted to deliver first.

        Both directions must go to the kernel (there is no userspace TLS to fall back to): raises
        :class:`~ktls.errors.KernelTLSUnavailable` otherwise.
        """
        connection = driver.take_over_with_keys(
            sock,
            keys,
            server_side=server_side,
            tx_seq=tx_seq,
            rx_seq=rx_seq,
            tx_explicit_nonce=tx_explicit_nonce,
            suppress_ragged_eofs=suppress_ragged_eofs,
        )
        return cls(sock, None, connection, early_data)

    @property
    def suppress_ragged_eofs(self) -> bool:
        """A ragged EOF reads as ``b""`` (the ``ssl`` default) rather than raising :class:`~ktls.errors.RaggedEOF`."""
        return self._connection.suppress_ragged_eofs

    @suppress_ragged_eofs.setter
    def suppress_ragged_eofs(self, value: bool) -> None:
        self._connection.suppress_ragged_eofs = value

    # -- receiving --------------------------------------------------------------------------------------------------

    def recv(self, bufsize: int = 65536, flags: int = 0) -> bytes:
        """Up to ``bufsize`` bytes of application data; ``b""`` at the end of the stream."""
        return self._receive(self._engine.read, bufsize, flags)

    def recv_into(self, buffer: memoryview | bytearray, nbytes: int = 0, flags: int = 0) -> int:
        """Read up to ``nbytes`` (default: ``len(buffer)``) bytes of application data into ``buffer``."""
        view = memoryview(buffer).cast("B")
        return self._receive(self._engine.read_into, view[:nbytes] if nbytes else view, flags)

    def _receive(self, read: Callable[[_Into], _Read | None], into: _Into, flags: int) -> _Read:
        """``read(into)`` until it returns data or the end (it returns ``None`` after a control record)."""
        if flags:
            raise ValueError("flags are not supported on a TLS stream")
        self._check_open()
        try:
            while (data := read(into)) is None:
                pass
        except BlockingIOError:
            raise self._would_block("receiving") from None
        except Exception:
            self._failed()
            raise
        return data

    def read(self, len: int = 1024, buffer: bytearray | None = None) -> bytes | int:
        """``ssl.SSLSocket.read`` compatibility."""
        if buffer is not None:
            return self.recv_into(buffer, len)
        return self.recv(len)

    # -- sending -----------------------------------------------------------------------------------------------------

    def send(self, data: bytes | bytearray | memoryview, flags: int = 0) -> int:
        """Send some of ``data``; returns how many bytes were accepted (never 0 for non-empty data)."""
        if flags:
            raise ValueError("flags are not supported on a TLS stream")
        self._check_open()
        self._connection.check_writable()
        engine = self._engine
        try:
            if engine.queue:
                self._wait_for(engine.drain(), self._timeout, "sending")  # what is queued goes first
            sent = engine.send(data)
        except BlockingIOError:
            raise self._would_block("sending") from None
        except Exception:
            self._failed()
            raise
        if engine.queue and self._timeout != 0.0:
            # OpenSSL's records wait for room, as on a blocking socket; past the timeout they stay accepted.
            with contextlib.suppress(TimeoutError):
                self._wait_for(engine.drain(), self._timeout, "sending")
        return sent

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """``ssl.SSLSocket.write`` compatibility."""
        return self.send(data)

    def sendall(self, data: bytes | bytearray | memoryview, flags: int = 0) -> None:
        view = memoryview(data).cast("B")
        while view:
            sent = self.send(view, flags)
            view = view[sent:]

    def sendfile(self, file: BinaryIO, offset: int = 0, count: int | None = None) -> int:
        """Send a file. With the kernel sending, this is ``os.sendfile``: the bytes go from the page cache
        through the kernel's TLS without a copy into Python. On fallback (or for a file object without a
        descriptor), a read + send loop (:meth:`ktls.engine.Engine.sendfile`). Like ``socket.sendfile``, the
        file's position ends after the last byte sent; on a non-blocking stream it returns what the socket took
        (``BlockingIOError`` if nothing)."""
        self._check_open()
        self._connection.check_writable()
        try:
            total = self._wait_for(self._engine.sendfile(file, offset, count), self._timeout, "sending", per_wait=True)
        except BlockingIOError:
            raise self._would_block("sending") from None
        except Exception:
            self._failed()
            raise
        if self._engine.queue and self._timeout != 0.0:
            with contextlib.suppress(TimeoutError):
                self._wait_for(self._engine.drain(), self._timeout, "sending")
        return total

    def key_update(self, request_peer_update: bool = False) -> None:
        """Send a TLS 1.3 KeyUpdate and switch to the next send key (kernel ≥ 6.14)."""
        self._check_open()
        self._engine.key_update(request_peer_update)
        with contextlib.suppress(TimeoutError):
            self._wait_for(self._engine.drain(), _CLOSE_TIMEOUT, "KeyUpdate")

    # -- waiting ------------------------------------------------------------------------------------------------

    def _would_block(self, what: str) -> OSError:
        """``EAGAIN`` from a stream with a timeout is the kernel saying the timeout passed (module docstring,
        "Timeouts are the kernel's"); on a non-blocking stream it stays ``BlockingIOError``."""
        if self._timeout:
            return TimeoutError(f"timed out ({what})")
        return BlockingIOError(errno.EAGAIN, f"the TLS stream would block ({what})")

    def _wait_for(
        self, steps: Generator[Wait, None, _T], timeout: float | None, what: str, *, per_wait: bool = False
    ) -> _T:
        """Run one of the engine's loops (drain, linger, sendfile, splice) to its end, each of its waits as
        :meth:`_wait`, all of them within ``timeout`` together (a slow peer that takes a little at a time does not
        stretch a bound) — or, ``per_wait``, each (a transfer of any length, as ``socket.sendfile`` times it).
        Non-blocking, sendfile's bytes sent so far when it would wait having sent some."""
        deadline = None if not timeout or per_wait else time.monotonic() + timeout
        try:
            while True:
                wait = next(steps)
                if timeout == 0.0 and wait.progress:
                    return wait.progress  # type: ignore[return-value]  # the loop that tells progress returns int
                remaining = timeout
                if deadline is not None and wait.until is None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(errno.ETIMEDOUT, f"timed out ({what})")
                self._wait(wait, remaining, what)
        except StopIteration as done:
            result: _T = done.value
            return result
        finally:
            steps.close()

    def _wait(self, wait: Wait, timeout: float | None, what: str) -> None:
        """One wait with ``poll``, up to ``timeout`` (``None``: no limit): ``BlockingIOError`` at once for 0,
        ``TimeoutError`` past it. A wait that keeps its own time (``Wait.until``) just returns then."""
        if wait.until is None and timeout == 0.0:
            raise self._would_block(what)  # only a non-blocking stream waits 0 s
        if not wait_blocking(wait, timeout) and wait.until is None:
            raise TimeoutError(errno.ETIMEDOUT, f"timed out ({what})")

    def _failed(self) -> None:
        """After an error: when the connection has an alert for the peer, send it (bounded), half-close, and
        wait briefly for the peer's FIN, so that our reset cannot overtake the alert. Never raises."""
        try:
            if not self._engine.fail():
                return
            self._wait_for(self._engine.drain(), _CLOSE_TIMEOUT, "alert")
            poller = select.poll()
            poller.register(self._sock, select.POLLRDHUP | select.POLLHUP)
            deadline = time.monotonic() + _DRAIN_TIMEOUT
            while (remaining := deadline - time.monotonic()) > 0:
                if any(mask & (select.POLLRDHUP | select.POLLHUP) for _, mask in poller.poll(remaining * 1000)):
                    return
        except OSError:
            pass

    # -- closing ----------------------------------------------------------------------------------------------------

    def shutdown(self, how: int) -> None:
        """``SHUT_WR``/``SHUT_RDWR`` send close_notify first (RFC 8446 §6.1), then shut the socket down."""
        self._check_open()
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            self._close_notify()  # and SHUT_WR behind it: the connection may be fully closed by now
        try:
            self._sock.shutdown(how)
        except OSError as exc:
            if how == socket.SHUT_RD or exc.errno != errno.ENOTCONN:
                raise

    def unwrap(self) -> socket.socket:
        raise NotImplementedError("a kernel TLS socket cannot go back to plain TCP")

    def _close_notify(self) -> None:
        """close_notify behind everything ``send`` accepted, which is never dropped silently: past the stream's
        timeout (or ``_CLOSE_FLUSH_TIMEOUT``) ``TimeoutError`` says how much was not delivered."""
        engine = self._engine
        bound = self._timeout if self._timeout else _CLOSE_FLUSH_TIMEOUT
        try:
            self._wait_for(engine.drain(), bound, "close")
        except TimeoutError:
            lost = engine.queued
            engine.clear()
            message = f"close(): {lost} bytes of records already accepted by send() were not delivered"
            raise TimeoutError(errno.ETIMEDOUT, f"{message}: the peer read nothing for {bound:g} s") from None
        engine.close_write()
        with contextlib.suppress(TimeoutError):
            self._wait_for(engine.drain(), _CLOSE_TIMEOUT, "close_notify")  # else the peer sees a ragged EOF

    def close(self) -> None:
        """Send close_notify (unless the connection failed), then release the descriptor — always."""
        if self._closed:
            return
        self._closed = True
        if self._io_refs <= 0:
            self._real_close()

    def _real_close(self) -> None:
        """close_notify, linger, release the descriptor. Raises (after releasing it) only when records that
        ``send`` accepted in userspace TLS could not be delivered within the bound (:meth:`_close_notify`)."""
        undelivered: TimeoutError | None = None
        try:
            if self._connection.error is None:
                self._close_notify()
        except TimeoutError as exc:
            undelivered = exc
        except OSError:
            pass
        try:
            # Also when the close_notify could not be sent: a reset must not follow our data.
            self._wait_for(self._engine.linger(_LINGER), None, "linger")
        except OSError:
            pass
        finally:
            self._sock.close()
            splice.release(self)  # the pipes of splice_to/splice_from, if any
        if undelivered is not None:
            raise undelivered

    def detach(self) -> int:
        raise NotImplementedError("a kernel TLS socket cannot be detached")

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise OSError(errno.EBADF, "the TLS stream is closed")

    # -- socket-like ----------------------------------------------------------------------------------------------

    def fileno(self) -> int:
        return self._sock.fileno()

    def settimeout(self, timeout: float | None) -> None:
        """Like ``socket.settimeout``; the kernel does the waiting (module docstring, "Timeouts are the kernel's")."""
        if timeout is not None and timeout < 0:
            raise ValueError("Timeout value out of range")
        self._sock.settimeout(0.0 if timeout == 0 else None)
        tcp.set_timeouts(self._sock, timeout)
        self._timeout = None if timeout is None else float(timeout)

    def gettimeout(self) -> float | None:
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        self.settimeout(None if flag else 0.0)

    def getblocking(self) -> bool:
        return self._timeout != 0.0

    def getpeername(self) -> Any:
        return self._sock.getpeername()

    def getsockname(self) -> Any:
        return self._sock.getsockname()

    def setsockopt(self, level: int, option: int, value: int | bytes) -> None:
        self._sock.setsockopt(level, option, value)

    def getsockopt(self, level: int, option: int, buflen: int = 0) -> int | bytes:
        return self._sock.getsockopt(level, option, buflen) if buflen else self._sock.getsockopt(level, option)

    @property
    def socket(self) -> socket.socket:
        """The underlying socket (for ``selectors``; reading or writing it directly bypasses TLS state)."""
        return self._sock

    @property
    def family(self) -> int:
        return self._sock.family

    @property
    def type(self) -> int:
        return self._sock.type

    def makefile(
        self,
        mode: Literal["r", "w", "rw", "rb", "wb", "rwb"] = "r",
        buffering: int | None = None,
        *,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> Any:
        """A file object over the stream, like ``socket.makefile``."""
        makefile: Any = socket.socket.makefile
        return makefile(
            self,
            mode,
            buffering,
            encoding=encoding,
            errors=errors,
            newline=newline,
        )

    def _decref_socketios(self) -> None:
        if self._io_refs > 0:
            self._io_refs -= 1
        if self._closed and self._io_refs <= 0:
            self._real_close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._sock.fileno()}"
        return f"<ktls.Stream {state} {self._connection.describe()}>"

    # -- splice (ktls.splice; kept last in the class so that it merges apart from the rest) ---------------------

    def splice_to(self, fd: int, count: int) -> int:
        """Move up to ``count`` bytes of received application data into the descriptor ``fd`` (a socket, pipe or
        file) with ``splice``: the kernel decrypts into a pipe and the bytes never enter Python. Control records
        met on the way go to the connection. Returns the bytes moved, 0 at the end of the stream. On fallback
        the same, by a copy (:mod:`ktls.splice`)."""
        self._check_open()
        return self._splice(splice.splice_to(self._engine, splice.pipes_of(self)[0], fd, count))

    def splice_from(self, fd: int, count: int) -> int:
        """Move up to ``count`` bytes from the descriptor ``fd`` into the stream with ``splice``, for the kernel
        to encrypt; 0 at ``fd``'s end. On fallback the same, by a copy (:mod:`ktls.splice`)."""
        self._check_open()
        return self._splice(splice.splice_from(self._engine, splice.pipes_of(self)[1], fd, count))

    def _splice(self, steps: Generator[Wait, None, int]) -> int:
        """Run a splice loop, waiting with ``poll`` up to the stream's timeout."""
        try:
            with splice.failures(lambda _: self._failed()):
                return self._wait_for(steps, self._timeout, "splice", per_wait=True)
        except BlockingIOError:
            raise self._would_block("splice") from None

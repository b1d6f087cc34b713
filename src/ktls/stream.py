"""A socket-like TLS stream whose records the kernel encrypts and decrypts: :func:`wrap_socket` and :class:`Stream`.

Theory of operation.

1. :func:`wrap_socket` runs the handshake with Python's ``ssl`` over memory BIOs, reading one record at a
   time (:mod:`ktls.handshake`), with the context's key log captured in memory (:mod:`ktls.keylog_capture`).
2. The hand-off: the ``tls`` ULP is attached, the send key goes to the kernel (``TLS_TX``) at the exact
   sequence number, then the receive key (``TLS_RX``). From then on ``send``/``sendfile`` are plain socket
   calls that the kernel encrypts, and ``recv`` is one ``recvmsg`` that the kernel decrypts.
3. Records that are not application data come back from the kernel with their type and go to the
   control-record state machine (:mod:`ktls.control`), whose actions this module carries out.

Edge cases, each handled where named:

* **TLS 1.3 client, tickets in flight.** The server's NewSessionTickets follow the handshake. To keep
  ``stream.session`` usable for resumption, a TLS 1.3 client lets OpenSSL read the records after the
  handshake — one at a time, counting them — until the first application record, then hands receive to the
  kernel at that sequence number (:meth:`ktls.connection.Connection.deferred_record`). A KeyUpdate in that
  window is recognised by what it says, and the hand-off follows the new generation.
* **Fallback.** When the kernel cannot take over (no ``tls`` ULP, a cipher or version it lacks, e.g. TLS 1.2
  CBC), the stream keeps working in user space over the same ``SSLObject`` and ``fallback_reason`` says why;
  ``require_kernel=True`` raises instead. If the kernel takes the send key but refuses the receive key, the
  kernel sends and OpenSSL keeps receiving (``kernel_tx`` true, ``kernel_rx`` false).
* **close_notify** is sent by ``shutdown(SHUT_WR)`` and ``close()``; when the send buffer is full it waits
  for room (bounded) rather than dropping it (rustls/ktls#78). Writes after it raise
  :class:`~ktls.errors.StreamClosed`, never return 0 (rustls/ktls#72).
* **Ragged EOF.** A TCP EOF without close_notify reads as ``b""`` when ``suppress_ragged_eofs`` (the
  ``ssl`` default) and raises :class:`~ktls.errors.RaggedEOF` otherwise; ``stream.ragged_eof`` tells.
* **Fatal alerts we send** are followed by a half-close and a short wait for the peer's FIN before the
  descriptor is closed: closing with unread data makes the kernel send a reset that can destroy the alert.
* **Timeouts are the kernel's.** A socket with a timeout stays blocking for the kernel and gets the timeout
  as ``SO_RCVTIMEO``/``SO_SNDTIMEO``: one syscall per call, waiting inside it. CPython would instead poll
  *before* every call, and Linux ≥ 6.14 reports a kTLS socket unreadable while it holds a KeyUpdate it has
  already decrypted ahead (a rekey is pending), so a poll-first read would sit out its timeout with the record
  waiting; ``recvmsg`` itself sees the record. Trying first and polling after ``EAGAIN`` would cost a third
  syscall on every read that has to wait (request/response traffic, measured: half the round trips).
  Non-blocking streams are plain ``O_NONBLOCK``.
* **Key-usage limits** (RFC 8446 §5.5): a TLS 1.3 stream updates its send key before the AEAD's limit on
  kernels that can rekey; elsewhere (TLS 1.2, Linux < 6.14) it closes its write side cleanly at the limit
  (close_notify; later writes raise ``StreamClosed`` with the reason) (:attr:`Stream.record_limit`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import logging
import os
import select
import socket
import ssl
import struct
import sys
import time
from collections.abc import Callable
from typing import Any, BinaryIO, Literal, NoReturn, TypeVar

from . import splice
from .constants import MAX_PLAINTEXT, AlertLevel, ContentType
from .core import driver
from .core.connection import Action, Connection, ConnectionState, Deliver, HandOffReceive, Receiving, Sending
from .core.control import Fail, InstallKey, ResumeReceive, Role, SendAlert, SendHandshake, SessionTicket, WriteClosed
from .core.handshake import Handshake
from .core.keys import ConnectionKeys
from .core.userspace import UserspaceTLS
from .errors import KernelTLSUnavailable, RecordError, StreamClosed
from .kernel import syscalls
from .kernel.uapi import Direction

__all__ = ["Stream", "wrap_socket"]

log = logging.getLogger("ktls")

_T = TypeVar("_T")

#: Room for one whole record on kernel reads of control records (RFC 8446 §5.2 TLSInnerPlaintext bound).
_RECORD_BUFFER = MAX_PLAINTEXT + 256
#: How long close() waits to send a close_notify into a full send buffer, and for the peer's FIN after a
#: fatal alert.
_CLOSE_TIMEOUT = 2.0
_DRAIN_TIMEOUT = 0.5
#: How long close() waits for the peer to acknowledge our last bytes while discarding what it sends.
_LINGER = 1.0
#: Fallback (userspace TLS): how long close() keeps sending records ``send`` already accepted, when the
#: stream has no timeout of its own (asyncio's ``ssl_shutdown_timeout`` default). Past it, close() raises.
_CLOSE_FLUSH_TIMEOUT = 30.0
#: Bytes per ``os.sendfile`` call: big enough to amortise the call, small enough to count records for rekeying.
_SENDFILE_CHUNK = 1 << 24
#: ``ioctl`` (``include/uapi/asm-generic/ioctls.h``).
_SIOCOUTQ = 0x5411  # TIOCOUTQ: bytes in a TCP socket's send queue not yet acknowledged by the peer


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
    (:func:`ktls.handoff.install_rx` says what it costs when the bet is wrong); ``stream.rx_expect_no_pad``
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


def _unacknowledged(sock: socket.socket) -> int:
    """Bytes queued on ``sock`` that the peer has not acknowledged yet (``SIOCOUTQ``); 0 when it cannot be told."""
    try:
        return int.from_bytes(fcntl.ioctl(sock.fileno(), _SIOCOUTQ, bytes(4)), sys.byteorder)
    except OSError:
        return 0


class Stream(ConnectionState):
    """A connected TLS stream: a socket whose records the kernel protects (or, on fallback, OpenSSL).

    Behaves like ``ssl.SSLSocket``: ``recv``/``recv_into``/``send``/``sendall``/``sendfile``/``makefile``,
    ``shutdown``/``close``, timeouts and non-blocking mode of the underlying socket, and the TLS information
    (``version()``, ``cipher()``, ``getpeercert()``, ``session``…).
    """

    def __init__(self, sock: socket.socket, handshake: Handshake | None, connection: Connection) -> None:
        """Use :func:`wrap_socket` or :meth:`from_keys`; this constructor is theirs."""
        self._sock = sock
        self._timeout: float | None = None
        self.settimeout(sock.gettimeout())  # module docstring, "Timeouts are the kernel's"
        self._scratch: memoryview | None = None  # where small kernel reads land (``_read_kernel``)
        self._sslobj = handshake.ssl_object if handshake is not None else None  # what the handshake says
        self._connection = connection
        self._userspace = UserspaceTLS(handshake, connection) if handshake is not None else None
        self._plaintext = bytearray()  # decrypted before the hand-off, delivered first
        self._closed = False
        self._io_refs = 0
        self._userspace_unsent = bytearray()

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
        stream = cls(sock, None, connection)
        stream._plaintext += early_data
        return stream

    # -- state: ``kernel_tx``, ``receiving``… come from ConnectionState; this one is the Stream's own -----------

    @property
    def suppress_ragged_eofs(self) -> bool:
        """A ragged EOF reads as ``b""`` (the ``ssl`` default) rather than raising :class:`~ktls.errors.RaggedEOF`."""
        return self._connection.suppress_ragged_eofs

    @suppress_ragged_eofs.setter
    def suppress_ragged_eofs(self, value: bool) -> None:
        self._connection.suppress_ragged_eofs = value

    def _ssl(self) -> ssl.SSLObject:
        """OpenSSL's connection object: what it knows about the handshake."""
        if self._sslobj is None:
            raise KernelTLSUnavailable(None, "this stream was built from keys: it has no userspace TLS")
        return self._sslobj

    def _openssl(self) -> UserspaceTLS:
        """OpenSSL's record layer: fallback, receive left in user space, the deferred window."""
        if self._userspace is None:
            raise KernelTLSUnavailable(None, "this stream was built from keys: it has no userspace TLS")
        return self._userspace

    # -- receiving --------------------------------------------------------------------------------------------------

    def recv(self, bufsize: int = 65536, flags: int = 0) -> bytes:
        """Up to ``bufsize`` bytes of application data; ``b""`` at the end of the stream."""
        if flags:
            raise ValueError("flags are not supported on a TLS stream")
        self._check_open()
        while True:
            if self._plaintext:
                first = bytes(self._plaintext[:bufsize])
                del self._plaintext[:bufsize]
                return first
            receiving = self._connection.receiving
            if bufsize <= 0 or receiving is Receiving.CLOSED:
                return b""
            data: bytes | None
            if receiving is Receiving.KERNEL and bufsize >= _RECORD_BUFFER:
                data = self._read_kernel_bytes(bufsize)
            elif receiving is Receiving.KERNEL:
                buffer = bytearray(bufsize)
                n = self._read_kernel(memoryview(buffer))
                data = None if n is None else bytes(memoryview(buffer)[:n])
            elif receiving is Receiving.DEFERRED:
                data = self._read_deferred()
            else:
                data = self._read_userspace(bufsize)
            if data is not None:
                return data

    def recv_into(self, buffer: memoryview | bytearray, nbytes: int = 0, flags: int = 0) -> int:
        """Read up to ``nbytes`` (default: ``len(buffer)``) bytes of application data into ``buffer``."""
        if flags:
            raise ValueError("flags are not supported on a TLS stream")
        self._check_open()
        view = memoryview(buffer).cast("B")
        if nbytes:
            view = view[:nbytes]
        while True:
            if self._plaintext:
                buffered = min(len(view), len(self._plaintext))
                view[:buffered] = self._plaintext[:buffered]
                del self._plaintext[:buffered]
                return buffered
            receiving = self._connection.receiving
            if not view or receiving is Receiving.CLOSED:
                return 0
            n: int | None
            if receiving is Receiving.KERNEL:
                n = self._read_kernel(view)
            else:
                data = self._read_deferred() if receiving is Receiving.DEFERRED else self._read_userspace(len(view))
                n = None if data is None else len(data)
                if data:
                    view[: len(data)] = data
            if n is not None:
                return n

    def read(self, len: int = 1024, buffer: bytearray | None = None) -> bytes | int:
        """``ssl.SSLSocket.read`` compatibility."""
        if buffer is not None:
            return self.recv_into(buffer, len)
        return self.recv(len)

    def _read_kernel(self, view: memoryview) -> int | None:
        """One ``recvmsg`` into ``view``; ``None`` when it was a control record (the caller reads again).

        A buffer that holds a whole record is read into directly: application data is decrypted straight into
        it (several records at once when they fit). A smaller one goes through ``_scratch``, which does: a
        control record must come back whole and typed (into a small buffer the kernel would return it in
        pieces), and application data beyond ``view`` waits in ``_plaintext``. This is the per-read hot path:
        the application-data case is checked inline, everything else goes through :meth:`_kernel_record`.
        """
        small = len(view) < _RECORD_BUFFER
        if small:
            if self._scratch is None:
                self._scratch = memoryview(bytearray(_RECORD_BUFFER))
            target = self._scratch
        else:
            target = view
        try:
            n, ancdata, msg_flags, _ = self._sock.recvmsg_into([target], syscalls.RECORD_TYPE_CMSG_SPACE)
        except OSError as exc:
            self._io_failed(exc, kernel_read=True)
        if not self._application_data(ancdata, msg_flags):
            return self._kernel_record(syscalls.record_type(ancdata, msg_flags), bytes(target[:n]))
        if small:
            taken = min(n, len(view))
            view[:taken] = target[:taken]
            if n > taken:
                self._plaintext += target[taken:n]
            return taken
        return n

    def _read_kernel_bytes(self, bufsize: int) -> bytes | None:
        """:meth:`_read_kernel` for ``recv`` with a buffer that holds a whole record: no copy after the read."""
        try:
            data, ancdata, msg_flags, _ = self._sock.recvmsg(bufsize, syscalls.RECORD_TYPE_CMSG_SPACE)
        except OSError as exc:
            self._io_failed(exc, kernel_read=True)
        if not self._application_data(ancdata, msg_flags):
            n = self._kernel_record(syscalls.record_type(ancdata, msg_flags), data)
            return None if n is None else b""
        return data

    def _application_data(self, ancdata: list[tuple[int, int, bytes]], msg_flags: int) -> bool:
        """Whether a kernel read returned application data (one tuple comparison: the hot path's check);
        if so, the state machine hears of it (it ends a KeyUpdate exchange)."""
        if not ancdata or ancdata[0] != syscalls.APPLICATION_DATA_CMSG or msg_flags & syscalls.MSG_CTRUNC:
            return False
        if actions := self._connection.application_data():
            self._run(actions)  # it interrupted a handshake message: the alert, then the error
        return True

    def _kernel_record(self, content_type: ContentType | int | None, data: bytes) -> int | None:
        """A kernel read that was not application data: the end of the stream (0), or a control record for
        the state machine (``None``: read again; 0 once it closed the read side)."""
        if content_type is None:
            return len(self._connection.end_of_stream())
        self._run(self._connection.control_record(int(content_type), data))
        return 0 if self._connection.receiving is Receiving.CLOSED else None

    def _io_failed(self, exc: OSError, *, kernel_read: bool = False, writing: bool = False) -> NoReturn:
        """A socket call failed: say so the way a socket (or ``ssl.SSLSocket``) would.

        ``EAGAIN`` from a stream with a timeout is the kernel saying the timeout passed (module docstring,
        "Timeouts are the kernel's"); on a non-blocking stream it stays ``BlockingIOError``. A failed kernel
        read is translated (:func:`ktls.kernel.syscalls.raise_receive_error`): a record the kernel refuses is
        answered with its alert by the connection, and a TCP reset stays ``ConnectionResetError``, as with
        ``ssl.SSLSocket`` (the kernel layer passes TCP's errors through).
        """
        if isinstance(exc, BlockingIOError):
            if self._timeout:
                raise TimeoutError(f"timed out ({'sending' if writing else 'receiving'})") from None
            raise exc
        try:
            if kernel_read:
                syscalls.raise_receive_error(exc)
            raise exc
        except RecordError as error:
            self._run(self._connection.receive_failed(error))
            raise  # pragma: no cover - _run raised

    def _wait_for(self, call: Callable[[], _T], *, writing: bool) -> _T:
        """``call()`` on our socket (which waits inside the syscall up to the stream's timeout), its errors
        through :meth:`_io_failed`."""
        try:
            return call()
        except OSError as exc:
            self._io_failed(exc, writing=writing)

    def _read_userspace(self, bufsize: int) -> bytes | None:
        """OpenSSL reads (fallback, or receive left in user space); ``None``: it needed ciphertext, read again."""
        userspace = self._openssl()
        data = userspace.read(bufsize)
        if data is None:
            userspace.received(self._wait_for(lambda: self._sock.recv(65536), writing=False))
            if self._connection.sending is Sending.USERSPACE:
                self._userspace_unsent += userspace.output()  # an alert or KeyUpdate answer: ours to send
        return data

    def _read_deferred(self) -> bytes | None:
        """TLS 1.3 client before its first application record (:meth:`ktls.connection.Connection.deferred_record`):
        OpenSSL reads exactly one record at a time; what it decrypted lands in ``_plaintext``."""
        userspace = self._openssl()
        wanted = userspace.deferred_wanted()
        self._run(userspace.deferred_received(self._wait_for(lambda: self._sock.recv(wanted), writing=False)))
        return None

    # -- sending -----------------------------------------------------------------------------------------------------

    def send(self, data: bytes | bytearray | memoryview, flags: int = 0) -> int:
        """Send some of ``data``; returns how many bytes were accepted (never 0 for non-empty data)."""
        if flags:
            raise ValueError("flags are not supported on a TLS stream")
        self._check_open()
        connection = self._connection
        connection.check_writable()
        if connection.sending is not Sending.KERNEL:
            return self._send_userspace(data)
        try:
            sent = self._sock.send(data)
        except OSError as exc:
            self._io_failed(exc, writing=True)
        if connection.sent(sent):
            self._count_records()
        return sent

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """``ssl.SSLSocket.write`` compatibility."""
        return self.send(data)

    def sendall(self, data: bytes | bytearray | memoryview, flags: int = 0) -> None:
        view = memoryview(data).cast("B")
        while view:
            sent = self.send(view, flags)
            view = view[sent:]

    def _send_userspace(self, data: bytes | bytearray | memoryview) -> int:
        if self._userspace_unsent:
            self._flush_userspace()
        written, ciphertext = self._openssl().encrypt(data)
        self._userspace_unsent += ciphertext
        try:
            self._flush_userspace()
        except (BlockingIOError, TimeoutError):
            pass  # accepted: the ciphertext waits in our buffer and goes first next time
        return written

    def _flush_userspace(self) -> None:
        while self._userspace_unsent:
            sent = self._wait_for(lambda: self._sock.send(self._userspace_unsent), writing=True)
            del self._userspace_unsent[:sent]

    def sendfile(self, file: BinaryIO, offset: int = 0, count: int | None = None) -> int:
        """Send a file. With the kernel sending, this is ``os.sendfile``: the bytes go from the page cache
        through the kernel's TLS without a copy into Python. On fallback (or for a file object without a
        descriptor), a read + send loop. Like ``socket.sendfile``, the file's position ends after the last
        byte sent; on a non-blocking stream it returns what the socket took (``BlockingIOError`` if nothing)."""
        self._check_open()
        self._connection.check_writable()
        if self._connection.sending is not Sending.KERNEL:
            return self._sendfile_userspace(file, offset, count)
        try:
            in_fd = file.fileno()
        except (AttributeError, io.UnsupportedOperation):
            return self._sendfile_userspace(file, offset, count)
        total = 0
        try:
            while count is None or total < count:
                want = _SENDFILE_CHUNK if count is None else min(_SENDFILE_CHUNK, count - total)
                try:
                    position = offset + total
                    sent = self._wait_for(
                        lambda: os.sendfile(self._sock.fileno(), in_fd, position, want),  # noqa: B023 - called now
                        writing=True,
                    )
                except BlockingIOError:
                    if total:
                        break  # a non-blocking stream: report what went
                    raise
                except OSError as exc:
                    if total or isinstance(exc, (ConnectionError, TimeoutError)):
                        raise
                    # Not a file the kernel can splice from (a pipe, /proc, ...): read it ourselves.
                    return self._sendfile_userspace(file, offset, count)
                if not sent:
                    break  # end of file
                total += sent
                if self._connection.sent(sent):
                    self._count_records()
        finally:
            if total:
                file.seek(offset + total)
        return total

    def _sendfile_userspace(self, file: BinaryIO, offset: int, count: int | None) -> int:
        file.seek(offset)
        total = 0
        while count is None or total < count:
            want = 65536 if count is None else min(65536, count - total)
            block = file.read(want)
            if not block:
                break
            self.sendall(block)
            total += len(block)
        file.seek(offset + total)
        return total

    def _count_records(self) -> None:
        """Near the AEAD's limit: the kernel's exact count, and a KeyUpdate (or the write side's end) if due."""
        info = syscalls.get_crypto_info(self._sock, Direction.TX)
        self._run(self._connection.kernel_record_count(info.rec_seq if info is not None else None))

    def key_update(self, request_peer_update: bool = False) -> None:
        """Send a TLS 1.3 KeyUpdate and switch to the next send key (kernel ≥ 6.14)."""
        self._check_open()
        self._run(self._connection.key_update(request_peer_update))

    # -- carrying out the state machine's actions ---------------------------------------------------------------

    def _run(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendAlert):
                self._send_control(ContentType.ALERT, action.payload)
                if action.level is AlertLevel.FATAL:
                    self._after_fatal_alert()
            elif isinstance(action, SendHandshake):
                self._send_control(ContentType.HANDSHAKE, action.message)
            elif isinstance(action, InstallKey):
                syscalls.set_crypto_info(self._sock, action.direction, action.info)
            elif isinstance(action, Deliver):
                self._plaintext += action.plaintext
            elif isinstance(action, ResumeReceive):
                driver.resume_receive(self._sock, self._connection)
            elif isinstance(action, HandOffReceive):
                driver.hand_off_receive(self._sock, self._connection, action)
            elif isinstance(action, WriteClosed):
                self._half_close()
            elif isinstance(action, SessionTicket):
                log.debug("NewSessionTicket after the hand-off (%d bytes): not resumable", len(action.message))
            elif isinstance(action, Fail):
                raise action.error

    def _send_control(self, content_type: ContentType, payload: bytes) -> None:
        """Send one control record; when the send buffer is full, wait (bounded) instead of dropping it."""
        if not self.kernel_tx:
            return
        deadline = time.monotonic() + _CLOSE_TIMEOUT
        while True:
            try:
                syscalls.send_record(self._sock, content_type, payload, socket.MSG_DONTWAIT)
                return
            except (BlockingIOError, InterruptedError):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    message = f"could not send a {content_type.name} record: the peer is not reading"
                    raise StreamClosed(message) from None
                select.select([], [self._sock], [], remaining)

    def _half_close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _after_fatal_alert(self) -> None:
        """Half-close, then wait briefly for the peer's FIN, so our reset cannot overtake the alert."""
        self._half_close()
        poller = select.poll()
        poller.register(self._sock, select.POLLRDHUP | select.POLLHUP)
        deadline = time.monotonic() + _DRAIN_TIMEOUT
        while (remaining := deadline - time.monotonic()) > 0:
            events = poller.poll(remaining * 1000)
            if any(mask & (select.POLLRDHUP | select.POLLHUP) for _, mask in events):
                return

    # -- closing ----------------------------------------------------------------------------------------------------

    def shutdown(self, how: int) -> None:
        """``SHUT_WR``/``SHUT_RDWR`` send close_notify first (RFC 8446 §6.1), then shut the socket down."""
        self._check_open()
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            self._close_notify()
        self._sock.shutdown(how)

    def unwrap(self) -> socket.socket:
        raise NotImplementedError("a kernel TLS socket cannot go back to plain TCP")

    def _close_notify(self) -> None:
        kernel = self._connection.sending is Sending.KERNEL
        actions = self._connection.close_write()
        if not actions:
            return
        if kernel:
            self._run([a for a in actions if not isinstance(a, WriteClosed)])
            return
        self._flush_before_close()  # what send() accepted goes first, and is never dropped silently
        self._userspace_unsent += self._openssl().close_notify()
        with contextlib.suppress(TimeoutError):
            self._flush_before_close()  # only our close_notify is left: the peer sees a ragged EOF

    def close(self) -> None:
        """Send close_notify (unless the connection failed), then release the descriptor — always."""
        if self._closed:
            return
        self._closed = True
        if self._io_refs <= 0:
            self._real_close()

    def _real_close(self) -> None:
        """close_notify, linger, release the descriptor. Raises (after releasing it) only when records that
        ``send`` accepted in userspace TLS could not be delivered within the bound (:meth:`_flush_before_close`)."""
        undelivered: TimeoutError | None = None
        try:
            connection = self._connection
            if connection.error is None and connection.sending is not Sending.CLOSED:
                self._close_notify()
            elif self._userspace_unsent and connection.error is None:
                self._flush_before_close()
        except TimeoutError as exc:
            undelivered = exc
        except OSError:
            pass
        try:
            self._linger()  # also when the close_notify could not be sent: a reset must not follow our data
        except OSError:
            pass
        finally:
            self._sock.close()
            splice.release(self)  # the pipes of splice_to/splice_from, if any
        if undelivered is not None:
            raise undelivered

    def _flush_before_close(self) -> None:
        """Userspace TLS: send the ciphertext still in our buffer — records ``send`` already reported as sent
        on a non-blocking or timed-out stream — waiting for the peer to read, up to the stream's timeout (or
        ``_CLOSE_FLUSH_TIMEOUT``). ``TimeoutError`` saying how much was not delivered, past it."""
        if not self._userspace_unsent:
            return
        bound = self._timeout if self._timeout else _CLOSE_FLUSH_TIMEOUT
        deadline = time.monotonic() + bound
        poller = select.poll()
        poller.register(self._sock, select.POLLOUT)
        while self._userspace_unsent:
            try:
                del self._userspace_unsent[: self._sock.send(self._userspace_unsent, socket.MSG_DONTWAIT)]
                continue
            except (BlockingIOError, InterruptedError):
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                lost = len(self._userspace_unsent)
                self._userspace_unsent.clear()
                message = f"close(): {lost} bytes of records already accepted by send() were not delivered"
                raise TimeoutError(errno.ETIMEDOUT, f"{message}: the peer read nothing for {bound:g} s")
            poller.poll(remaining * 1000)

    def _linger(self) -> None:
        """Before the descriptor goes: discard what has arrived, and while the peer has not acknowledged all
        our bytes keep discarding until it has, or its FIN comes (at most ``_LINGER`` seconds).

        Closing a socket with unread data makes the kernel send a reset and throw away its send queue — our
        last records and our close_notify, including bytes sent but not yet acknowledged, which a lost
        segment would need again. Data arriving after the close does the same while anything of ours is
        still queued. The usual culprit is a TLS 1.3 server's NewSessionTickets, which it writes only once it
        has read our Finished, so they can land just as we close. Once the peer has acknowledged everything,
        nothing of ours is at risk, so a close never waits for a peer that merely keeps its side open.
        """
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + _LINGER
        poller: select.poll | None = None
        while self._discard_arrived() and _unacknowledged(self._sock):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if poller is None:
                poller = select.poll()
                poller.register(self._sock, select.POLLIN | select.POLLRDHUP)
            # Wake up on data or FIN; look at the send queue again every few milliseconds meanwhile.
            poller.poll(min(remaining, 0.005) * 1000)

    def _discard_arrived(self) -> bool:
        """Read and drop whatever is readable now; ``False`` at the peer's FIN or an error."""
        while True:
            try:
                if self.kernel_rx:
                    record = syscalls.recv_record(self._sock, _RECORD_BUFFER, socket.MSG_DONTWAIT)
                    if not record.data and record.content_type is None:
                        return False
                elif not self._sock.recv(_RECORD_BUFFER, socket.MSG_DONTWAIT):
                    return False
            except BlockingIOError:
                return True
            except OSError:
                return False

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
        waiting = timeout or 0.0  # 0 in SO_RCVTIMEO/SO_SNDTIMEO: no limit
        seconds, microseconds = int(waiting), round((waiting - int(waiting)) * 1e6)
        if microseconds >= 1_000_000:
            seconds, microseconds = seconds + 1, 0
        if waiting and not (seconds or microseconds):
            microseconds = 1  # a tiny timeout must not turn into none
        value = struct.pack("@ll", seconds, microseconds)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
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

    # -- TLS information -----------------------------------------------------------------------------------------
    # What ssl.SSLSocket tells; a stream built from keys knows only its version and cipher suite.

    def version(self) -> str | None:
        if self._sslobj is None:
            return self._connection.control.version.label
        return self._sslobj.version()

    def cipher(self) -> tuple[str, str, int] | None:
        if self._sslobj is None:
            suite = self._connection.suite
            return None if suite is None else (suite.openssl_name, suite.version.label, suite.key_size * 8)
        return self._sslobj.cipher()

    def shared_ciphers(self) -> list[tuple[str, str, int]] | None:
        return self._sslobj.shared_ciphers() if self._sslobj is not None else None

    def compression(self) -> str | None:
        return self._sslobj.compression() if self._sslobj is not None else None

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self._sslobj.getpeercert(binary_form) if self._sslobj is not None else None

    def selected_alpn_protocol(self) -> str | None:
        return self._sslobj.selected_alpn_protocol() if self._sslobj is not None else None

    def get_channel_binding(self, cb_type: str = "tls-unique") -> bytes | None:
        return self._sslobj.get_channel_binding(cb_type) if self._sslobj is not None else None

    @property
    def session(self) -> ssl.SSLSession | None:
        """The session, for ``wrap_socket(..., session=stream.session)`` (TLS 1.3: once tickets arrived)."""
        return self._sslobj.session if self._sslobj is not None else None

    @property
    def session_reused(self) -> bool:
        return self._sslobj.session_reused if self._sslobj is not None else False

    @property
    def server_hostname(self) -> str | None:
        return self._sslobj.server_hostname if self._sslobj is not None else None

    @property
    def server_side(self) -> bool:
        return self._connection.role is Role.SERVER

    @property
    def context(self) -> ssl.SSLContext | None:
        return self._sslobj.context if self._sslobj is not None else None

    def pending(self) -> int:
        userspace = self._connection.receiving is Receiving.USERSPACE and self._sslobj is not None
        return len(self._plaintext) + (self._ssl().pending() if userspace else 0)

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
        return splice.splice_to(self._splice_endpoint(), fd, count)

    def splice_from(self, fd: int, count: int) -> int:
        """Move up to ``count`` bytes from the descriptor ``fd`` into the stream with ``splice``, for the kernel
        to encrypt; 0 at ``fd``'s end. On fallback the same, by a copy (:mod:`ktls.splice`)."""
        self._check_open()
        return splice.splice_from(self._splice_endpoint(), fd, count)

    def _splice_endpoint(self) -> splice.Endpoint:
        def failed(exc: OSError, reading: bool) -> NoReturn:
            self._io_failed(exc, kernel_read=reading, writing=not reading)

        def sent(nbytes: int) -> None:
            if self._connection.sent(nbytes):
                self._count_records()

        return splice.Endpoint(
            self,
            self._sock,
            self._connection,
            self._run,
            failed,
            sent,
            self.pending,
            self.recv,
            self.sendall,
            self._timeout,
        )

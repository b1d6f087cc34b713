"""An asyncio transport on a kernel TLS socket: :class:`KTLSTransport`.

Theory of operation.

* **Reading.** The kernel decrypts. Every read is one ``recvmsg`` with room for the record-type control message
  (:func:`ktls.kernel.recv_record` / ``recv_record_into``), never a plain ``recv``: a plain read fails with
  ``EIO`` when a ticket, alert or KeyUpdate is next. Application data goes to the protocol (``data_received``,
  or straight into a ``BufferedProtocol``'s buffer); every other record goes to the shared control-record state
  machine (:class:`ktls.control.ControlRecords`) and its actions are carried out here, in order.
* **Read until EAGAIN, never trust poll after a read.** In TLS 1.3 the kernel must decrypt a record to learn its
  type, so a read of application data can pull the KeyUpdate behind it into the kernel's queue; from then on
  (Linux ≥ 6.14) ``poll`` hides readability until the new key is set. Each readiness callback therefore reads
  until ``EAGAIN`` (a few reads, then again via ``call_soon``), and turning reading back on reads once at once.
* **Two other read modes** share the same OpenSSL object: a TLS 1.3 client reads through OpenSSL, one record at a
  time, until the first application record (:meth:`ktls.connection.Connection.deferred_record`; the server's tickets
  keep ``session`` usable), then hands receive to the kernel; and when the kernel could not take receive (or
  anything), OpenSSL reads from the socket through its memory BIO — the *userspace fallback*, which is also a
  complete userspace TLS transport over the ``SSLObject`` the handshake left (asyncio's own ``SSLProtocol`` cannot
  adopt one).
* **Writing.** With the kernel sending, ``write`` is ``send`` on the socket; what does not fit waits in an
  ordered queue of data, control records (``sendmsg`` + ``TLS_SET_RECORD_TYPE``) and steps (install the next
  send key, ``shutdown(SHUT_WR)``). A KeyUpdate goes to the *front* of the queue (RFC 8446 §4.6.3: before our
  next application data record) together with the switch to the next key; close_notify goes to the back,
  behind everything written before it, and is never dropped when the socket buffer is full (rustls/ktls#78).
  On fallback, OpenSSL encrypts into its memory BIO and the ciphertext goes through the same queue.
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
import collections
import dataclasses
import errno
import logging
import os
import socket
import ssl
import warnings
from asyncio import constants as asyncio_constants
from asyncio import selector_events, transports, trsock
from collections.abc import Callable, Iterable
from typing import IO, TYPE_CHECKING, Any, Union

from .. import splice
from ..constants import MAX_PLAINTEXT, AlertLevel, ContentType
from ..core import driver
from ..core.connection import Action, Connection, ConnectionState, Deliver, HandOffReceive, Receiving, Sending
from ..core.control import (
    Fail,
    InstallKey,
    ReadClosed,
    ResumeReceive,
    SendAlert,
    SendHandshake,
    SessionTicket,
    WriteClosed,
)
from ..core.handshake import Handshake
from ..core.userspace import UserspaceTLS
from ..errors import KernelTLSFailure, KTLSError, RecordError, StreamClosed
from ..kernel import syscalls
from ..kernel.uapi import CryptoInfo, Direction
from ._handshake import DEFAULT_SHUTDOWN_TIMEOUT

__all__ = ["KTLSTransport"]

log = logging.getLogger("ktls")

#: Room for one whole record on reads of control records (RFC 8446 §5.2 TLSInnerPlaintext bound).
_RECORD_BUFFER = MAX_PLAINTEXT + 256
#: How long a fatal alert we sent gets to reach the peer before the descriptor is closed.
_FATAL_DRAIN_TIMEOUT = 0.5
#: Reads per readiness callback before yielding to other callbacks (and reading again right after).
_READS_PER_CALL = 8
#: TCP errors the kernel's TLS layer passes through; reported as ConnectionResetError & co.
_CONNECTION_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT, errno.ENOTCONN})
#: Writes after the connection was lost that are ignored before a warning, like asyncio's transports.
_LOG_THRESHOLD_FOR_CONNLOST_WRITES = 5


@dataclasses.dataclass(frozen=True)
class _ControlRecord:
    """A record of another content type than application data, sent through the kernel."""

    content_type: ContentType
    payload: bytes


@dataclasses.dataclass(frozen=True)
class _Step:
    """Something to do once everything queued before it has been sent."""

    run: Callable[[], None]
    name: str


_Item = Union[bytes, memoryview, _ControlRecord, _Step]  # noqa: UP007


class KTLSTransport(ConnectionState, transports._FlowControlMixin):  # the base asyncio's sendfile fallback insists on
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
        self._sslobj = handshake.ssl_object if handshake is not None else None  # what the handshake says
        self._userspace = UserspaceTLS(handshake, connection) if handshake is not None else None
        self._connection = connection  # every protocol decision (ktls.connection)
        self._shutdown_timeout = DEFAULT_SHUTDOWN_TIMEOUT if shutdown_timeout is None else shutdown_timeout
        self._server = server
        self._protocol: asyncio.BaseProtocol = protocol
        self._buffered = isinstance(protocol, asyncio.BufferedProtocol)
        self._buffer: collections.deque[_Item] = collections.deque()
        self._buffer_size = 0
        self._plaintext = bytearray(early_data)  # decrypted, not yet taken by the protocol
        self._paused = False  # pause_reading()
        self._closing = False  # close() or a failure: no more data for the protocol, no more writes
        self._eof_written = False  # write_eof() was called
        self._close_notify_queued = False
        self._read_done = False  # the peer's side ended: close_notify, EOF, or a failure
        self._lost = False  # connection_lost is scheduled
        self._error: Exception | None = None  # what connection_lost will be given
        self._fatal_alert: bytes | None = None  # a fatal alert the state machine asked us to send
        self._empty_waiter: asyncio.Future[None] | None = None
        self._sendfile_active = False
        self._reader_on = False
        self._writer_on = False
        self._deadline: asyncio.TimerHandle | None = None
        self._lost_writes = 0
        self._flushing = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._selector = isinstance(loop, selector_events.BaseSelectorEventLoop)
        self._extra_info = self._static_extra()
        if self._selector:
            # What the loop's own socket transports do (and what its _sendfile_native expects to undo).
            self._selector_loop()._transports[self._sock_fd] = self
        if server is not None:
            server._attach(self)
        loop.call_soon(self._connection_made)

    # -- the loop's plumbing --------------------------------------------------------------------------------------

    def _selector_loop(self) -> Any:
        """The loop as a ``BaseSelectorEventLoop`` (its private reader/writer and transport registry)."""
        return self._loop

    def _connection_made(self) -> None:
        if self._lost:
            return
        self._protocol.connection_made(self)
        self._update_reader()
        if self._plaintext or self._userspace_pending():
            self._loop.call_soon(self._resume_delivery)

    def _want_reader(self) -> bool:
        if self._lost or self._read_done:
            return False
        return self._closing or not self._paused

    def _update_reader(self) -> None:
        want = self._want_reader()
        if want == self._reader_on:
            return
        self._reader_on = want
        if want:
            if self._selector:
                self._selector_loop()._add_reader(self._sock_fd, self._read_ready)
            else:
                self._loop.add_reader(self._sock_fd, self._read_ready)
            # Read once right away: a KeyUpdate the kernel decrypted during our last read is invisible to poll
            # (see _read_ready), so readiness alone could wait forever after a pause.
            self._loop.call_soon(self._read_ready)
        elif self._selector:
            self._selector_loop()._remove_reader(self._sock_fd)
        else:
            self._loop.remove_reader(self._sock_fd)

    def _set_writer(self, want: bool) -> None:
        if want == self._writer_on or (want and self._lost):
            return
        self._writer_on = want
        if want:
            if self._selector:
                self._selector_loop()._add_writer(self._sock_fd, self._flush)
            else:
                self._loop.add_writer(self._sock_fd, self._flush)
        elif self._selector:
            self._selector_loop()._remove_writer(self._sock_fd)
        else:
            self._loop.remove_writer(self._sock_fd)

    def _userspace_pending(self) -> bool:
        """OpenSSL holds decrypted bytes the protocol has not had (user space receives)."""
        userspace = self._connection.receiving is Receiving.USERSPACE
        return userspace and self._userspace is not None and self._userspace.pending > 0

    # -- extra info -----------------------------------------------------------------------------------------------

    def _static_extra(self) -> dict[str, Any]:
        sslobj = self._sslobj
        suite = self._connection.suite
        extra: dict[str, Any] = {
            "ssl_object": sslobj,
            "sslcontext": sslobj.context if sslobj else None,
            "peercert": sslobj.getpeercert() if sslobj else None,
            "cipher": sslobj.cipher()
            if sslobj
            else suite and (suite.openssl_name, suite.version.label, suite.key_size * 8),
            "compression": sslobj.compression() if sslobj else None,
            "socket": trsock.TransportSocket(self._sock),
        }
        try:
            extra["sockname"] = self._sock.getsockname()
        except OSError:
            extra["sockname"] = None
        try:
            extra["peername"] = self._sock.getpeername()
        except OSError:
            extra["peername"] = None
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
        return self._closing or self._lost

    def is_reading(self) -> bool:
        return not self._paused and not self._closing and not self._lost

    def pause_reading(self) -> None:
        if self._closing or self._lost or self._paused:
            return
        self._paused = True
        self._update_reader()

    def resume_reading(self) -> None:
        if self._closing or self._lost or not self._paused:
            return
        self._paused = False
        self._update_reader()
        self._loop.call_soon(self._resume_delivery)

    @property
    def _sendfile_compatible(self) -> asyncio_constants._SendfileMode:
        """``loop.sendfile`` takes its native path (``os.sendfile``) when the kernel sends on a selector loop."""
        if self.kernel_tx and self._selector:
            return asyncio_constants._SendfileMode.TRY_NATIVE
        return asyncio_constants._SendfileMode.FALLBACK

    # -- reading --------------------------------------------------------------------------------------------------

    def _read_ready(self) -> None:
        """Read until the socket says ``EAGAIN`` (at most ``_READS_PER_CALL`` reads, then again soon).

        Never wait for ``poll`` after a successful read: on Linux ≥ 6.14 the kernel may already hold a decrypted
        KeyUpdate behind the data just read, and ``tls_sk_poll`` hides readability while a rekey is pending —
        an event loop waiting for the next readiness event would wait forever (measured on 7.2).
        """
        for _ in range(_READS_PER_CALL):
            if self._lost or not self._want_reader():
                return
            try:
                if not self._read_once():
                    return
            except KTLSError as exc:
                if exc.errno in _CONNECTION_ERRNOS:
                    # The kernel's TLS layer passes TCP's errors through: say it the way socket code expects.
                    error = OSError(exc.errno, os.strerror(exc.errno))
                    error.__cause__ = exc
                    self._fatal_error(error)
                else:
                    self._fatal_error(exc)
                return
            except Exception as exc:
                self._fatal_error(exc)
                return
        if not self._lost and self._want_reader():
            self._loop.call_soon(self._read_ready)

    def _read_once(self) -> bool:
        """One read in the current mode; ``False`` when there was nothing to read."""
        receiving = self._connection.receiving
        if self._closing or receiving is Receiving.CLOSED:
            return self._discard_read()
        if receiving is Receiving.KERNEL:
            return self._read_kernel()
        if receiving is Receiving.DEFERRED:
            return self._read_deferred()
        return self._read_userspace()

    def _read_kernel(self) -> bool:
        """One ``recvmsg``: application data for the protocol, or a control record for the state machine."""
        try:
            if self._buffered:
                buf = self._get_buffer()
                content_type, nbytes, end = syscalls.recv_record_into(self._sock, buf)
                if content_type == ContentType.APPLICATION_DATA:
                    if actions := self._connection.application_data():
                        self._run(actions)  # it interrupted a handshake message: the alert, then the error
                    self._buffered_protocol().buffer_updated(nbytes)
                    return True
                data = bytes(memoryview(buf)[:nbytes])
            else:
                record = syscalls.recv_record(self._sock, self.max_size)
                content_type, data, end = record.content_type, record.data, record.end_of_record
                if content_type == ContentType.APPLICATION_DATA:
                    if actions := self._connection.application_data():
                        self._run(actions)
                    self._protocol_data(data)
                    return True
        except (BlockingIOError, InterruptedError):
            return False
        except RecordError as exc:
            self._run(self._connection.receive_failed(exc))
            return True
        if content_type is None:
            if data:
                raise KernelTLSFailure(None, "the kernel returned bytes without a record type")
            self._connection.end_of_stream()
            self._on_eof()
            return True
        if not end:
            data += self._rest_of_record(len(data))
        self._run(self._connection.control_record(int(content_type), data))
        return True

    def _rest_of_record(self, have: int) -> bytes:
        """A control record larger than the read buffer comes in typed pieces up to ``MSG_EOR``; the kernel has
        decrypted it whole, so the rest is there at once."""
        parts: list[bytes] = []
        while True:
            try:
                record = syscalls.recv_record(self._sock, _RECORD_BUFFER, socket.MSG_DONTWAIT)
            except BlockingIOError:
                raise KernelTLSFailure(None, "a control record ended early") from None
            parts.append(record.data)
            have += len(record.data)
            if record.end_of_record or not record.data:
                return b"".join(parts)
            if have > _RECORD_BUFFER:
                raise KernelTLSFailure(None, "a control record is longer than a TLS record")

    def _read_deferred(self) -> bool:
        """TLS 1.3 client before the first application record: OpenSSL reads, exactly one record at a time
        (:meth:`ktls.connection.Connection.deferred_record` says what each meant)."""
        userspace = self._openssl()
        progress = False
        while self._connection.receiving is Receiving.DEFERRED and self._want_reader() and not self._paused:
            try:
                data = self._sock.recv(userspace.deferred_wanted())
            except (BlockingIOError, InterruptedError):
                return progress
            progress = True
            self._run(userspace.deferred_received(data))
        return progress

    def _read_userspace(self) -> bool:
        """Fallback: ciphertext into OpenSSL's memory BIO, plaintext out of it."""
        try:
            data = self._sock.recv(self.max_size)
        except (BlockingIOError, InterruptedError):
            return False
        self._openssl().received(data)
        self._pump_userspace()
        return True

    def _pump_userspace(self) -> None:
        userspace = self._openssl()
        try:
            while not self._paused and not self._closing and not self._read_done:
                if self._buffered:
                    buf = self._get_buffer()
                    nbytes = userspace.read_into(buf)
                    if nbytes:
                        self._buffered_protocol().buffer_updated(nbytes)
                        continue
                else:
                    data = userspace.read(self.max_size)
                    if data:
                        self._protocol_data(data)
                        continue
                if self._connection.receiving is Receiving.CLOSED:
                    self._on_eof()
                break
        finally:
            # What OpenSSL wrote while reading (a KeyUpdate answer, an alert): ours to send on fallback; under
            # a key the kernel owns otherwise, so never sent.
            output = userspace.output()
            if output and not self.kernel_tx and not self._lost:
                self._enqueue(output)
                self._flush()

    def _openssl(self) -> UserspaceTLS:
        assert self._userspace is not None, "built from keys: the kernel has both directions"
        return self._userspace

    def _get_buffer(self) -> memoryview:
        buf = memoryview(self._buffered_protocol().get_buffer(-1)).cast("B")
        if not len(buf):
            raise RuntimeError("get_buffer() returned an empty buffer")
        return buf

    def _buffered_protocol(self) -> asyncio.BufferedProtocol:
        protocol = self._protocol
        assert isinstance(protocol, asyncio.BufferedProtocol)
        return protocol

    def _protocol_data(self, data: bytes) -> None:
        protocol = self._protocol
        assert isinstance(protocol, asyncio.Protocol)
        protocol.data_received(data)

    def _deliver_plaintext(self) -> None:
        """Hand ``_plaintext`` (decrypted before the hand-off, or left over) to the protocol, honouring pauses."""
        while self._plaintext and not self._paused and not self._closing:
            if self._buffered:
                buf = self._get_buffer()
                size = min(len(buf), len(self._plaintext))
                buf[:size] = self._plaintext[:size]
                del self._plaintext[:size]
                self._buffered_protocol().buffer_updated(size)
            else:
                data = bytes(self._plaintext)
                self._plaintext.clear()
                self._protocol_data(data)

    def _resume_delivery(self) -> None:
        if self._lost or self._closing:
            return
        try:
            self._deliver_plaintext()
            if self._connection.receiving is Receiving.USERSPACE and not self._read_done:
                self._pump_userspace()
        except Exception as exc:
            self._fatal_error(exc)

    def _on_eof(self) -> None:
        """The peer's side ended (close_notify or a bare TCP EOF: ``ragged_eof`` tells)."""
        if self._read_done:
            return
        self._read_done = True
        self._update_reader()
        if self._closing:
            self._maybe_finish()
            return
        protocol = self._protocol
        keep_open = isinstance(protocol, (asyncio.Protocol, asyncio.BufferedProtocol)) and protocol.eof_received()
        if not keep_open or (self._connection.sending is Sending.CLOSED and not self._close_notify_queued):
            # TLS 1.2 answered the close_notify and closed its write side; or the protocol is done.
            self.close()

    def _discard_read(self) -> bool:
        """After close() or a failure: read what arrives, until the peer's side ends, and drop it. Control
        records still go to the connection (a KeyUpdate must be followed to read on; close_notify ends it)."""
        try:
            if self._connection.kernel_rx:
                record = syscalls.recv_record(self._sock, _RECORD_BUFFER)
                if record.content_type is None and not record.data:
                    self._connection.end_of_stream()
                    self._on_eof()
                elif record.content_type not in (None, ContentType.APPLICATION_DATA):
                    try:
                        self._run(self._connection.control_record(int(record.content_type), record.data))
                    except KTLSError:
                        self._on_eof()  # the connection is over either way
            else:
                data = self._sock.recv(self.max_size)
                if not data:
                    self._connection.end_of_stream()
                    self._on_eof()
                elif self._connection.receiving is Receiving.USERSPACE and self._userspace is not None:
                    self._userspace.received(data)
                    while chunk := self._userspace.read(self.max_size):
                        pass  # dropped: the application closed
                    if chunk is not None:  # b"": the read side ended
                        self._on_eof()
        except (BlockingIOError, InterruptedError):
            return False
        except ssl.SSLWantReadError:
            return True
        except (OSError, ssl.SSLError):
            self._on_eof()  # EKEYEXPIRED after an aborted KeyUpdate, a reset, a bad record: done
        return True

    # -- the state machine's actions -------------------------------------------------------------------------------

    def _run(self, actions: list[Action]) -> None:  # noqa: PLR0912 - one branch per action type
        """Carry out the control-record state machine's actions (the kernel sends)."""
        urgent: list[_Item] = []
        read_closed = False
        for action in actions:
            if isinstance(action, SendAlert):
                if action.level is AlertLevel.FATAL:
                    self._fatal_alert = action.payload  # sent by _fatal_error, after dropping queued data
                else:
                    self._enqueue(_ControlRecord(ContentType.ALERT, action.payload))
            elif isinstance(action, SendHandshake):
                urgent.append(_ControlRecord(ContentType.HANDSHAKE, action.message))
            elif isinstance(action, InstallKey):
                if action.direction is Direction.RX:
                    syscalls.set_crypto_info(self._sock, Direction.RX, action.info)
                else:
                    urgent.append(self._install_tx_step(action.info))
            elif isinstance(action, Deliver):
                self._plaintext += action.plaintext
            elif isinstance(action, ResumeReceive):
                driver.resume_receive(self._sock, self._connection)
            elif isinstance(action, HandOffReceive):
                driver.hand_off_receive(self._sock, self._connection, action)
                if self._plaintext:
                    self._deliver_plaintext()
            elif isinstance(action, ReadClosed):
                read_closed = True
            elif isinstance(action, WriteClosed):
                self._enqueue(_Step(self._shut_wr, "shutdown(SHUT_WR)"))
            elif isinstance(action, SessionTicket):
                log.debug("NewSessionTicket after the hand-off (%d bytes): not resumable", len(action.message))
            elif isinstance(action, Fail):
                raise action.error
        if urgent:
            # RFC 8446 §4.6.3: our KeyUpdate goes before our next application data record, and the new key
            # right after it; data the kernel already took is sent under the old key.
            for item in reversed(urgent):
                self._buffer.appendleft(item)
                self._buffer_size += _item_size(item)
        if urgent or self._buffer:
            self._flush()
        if read_closed:
            self._on_eof()

    def _install_tx_step(self, info: CryptoInfo) -> _Step:
        def install() -> None:
            syscalls.set_crypto_info(self._sock, Direction.TX, info)

        return _Step(install, "install the next send key")

    def _shut_wr(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def key_update(self, request_peer_update: bool = False) -> None:
        """Send a TLS 1.3 KeyUpdate and switch to the next send key (kernel ≥ 6.14), before any data still
        queued. Raises :class:`~ktls.errors.RekeyUnsupported` where the kernel cannot."""
        self._run(self._connection.key_update(request_peer_update))

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
        if connection.write_closed_reason is not None and not self._lost:
            # Not the application's close: the send key is spent and cannot be replaced. Say so, loudly.
            raise StreamClosed(connection.write_closed_reason)
        if self._lost or self._closing or connection.sending is Sending.CLOSED:
            if self._lost_writes >= _LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                log.warning("ktls transport: write() after the connection was closed")
            self._lost_writes += 1
            return
        if connection.sending is Sending.KERNEL:
            self._send_or_queue(data)
            return
        try:
            ciphertext = self._openssl().encrypt(data)[1]
        except ssl.SSLError as exc:
            self._fatal_error(exc)
            return
        self._send_or_queue(ciphertext)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.write(b"".join(list_of_data))

    def _send_or_queue(self, data: bytes | bytearray | memoryview) -> None:
        if not self._buffer and not self._sendfile_active:
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._fatal_error(exc)
                return
            if sent:
                self._sent(sent)
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        self._enqueue(data if isinstance(data, bytes) else bytes(data))
        self._flush()

    def _enqueue(self, item: _Item) -> None:
        self._buffer.append(item)
        self._buffer_size += _item_size(item)
        self._maybe_pause_protocol()

    def _sent(self, nbytes: int) -> None:
        if self._connection.sent(nbytes):
            self._check_key_limit()

    def _check_key_limit(self) -> None:
        """Near the AEAD's key-usage limit (RFC 8446 §5.5), ask the kernel, and update the send key if due."""
        info = syscalls.get_crypto_info(self._sock, Direction.TX)
        actions = self._connection.kernel_record_count(info.rec_seq if info is not None else None)
        if any(isinstance(action, WriteClosed) for action in actions):
            self._close_notify_queued = True  # what was queued goes out, then close_notify
        self._run(actions)

    def _flush(self) -> None:  # noqa: PLR0912 - one branch per queue item type and outcome
        """Send what the queue holds, in order, until the socket is full (the loop's writer callback)."""
        if self._sendfile_active or self._flushing:
            return  # the loop's sendfile owns the socket's writer until _reset_empty_waiter; or re-entered
        self._flushing = True
        try:
            while self._buffer:
                item = self._buffer[0]
                if isinstance(item, _Step):
                    self._buffer.popleft()
                    item.run()
                    continue
                if isinstance(item, _ControlRecord):
                    # A control record is a few bytes: the kernel takes it whole or not at all.
                    sent = syscalls.send_record(self._sock, item.content_type, item.payload, socket.MSG_DONTWAIT)
                    rest: _Item = _ControlRecord(item.content_type, item.payload[sent:])
                    done = sent >= len(item.payload)
                else:
                    sent = self._sock.send(item)
                    rest = memoryview(item)[sent:]
                    done = sent >= len(item)
                self._buffer_size -= sent
                if done:
                    self._buffer.popleft()
                else:
                    self._buffer[0] = rest
                if not isinstance(item, _ControlRecord):
                    self._sent(sent)  # may put a KeyUpdate at the front of the queue
                if not done:
                    break
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            if self._closing:
                self._close_now()  # the peer is gone; nothing more can reach it
            else:
                self._fatal_error(exc)
            return
        finally:
            self._flushing = False
        if self._lost:
            return
        self._set_writer(bool(self._buffer))
        self._maybe_resume_protocol()
        if self._buffer_size <= self._low_water:
            self._wake_drain_waiters()
        if not self._buffer:
            if self._empty_waiter is not None and not self._empty_waiter.done():
                self._empty_waiter.set_result(None)
                self._sendfile_active = True
            self._maybe_finish()

    def _wake_drain_waiters(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- write flow control: asyncio's _FlowControlMixin, over our queue's size -----------------------------------

    def get_write_buffer_size(self) -> int:
        return self._buffer_size

    if TYPE_CHECKING:  # what the mixin does, which typeshed does not describe

        def _set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...
        def _maybe_pause_protocol(self) -> None: ...
        def _maybe_resume_protocol(self) -> None: ...

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """Send close_notify (after everything written), then ``shutdown(SHUT_WR)``. In TLS 1.3 the peer may go on
        sending and we go on reading (RFC 8446 §6.1)."""
        if self._closing or self._eof_written or self._lost:
            return
        self._eof_written = True
        self._enqueue_close_notify()
        self._flush()

    def _enqueue_close_notify(self) -> None:
        self._close_notify_queued = True
        if self._connection.kernel_tx:
            self._run(self._connection.close_write())  # close_notify and SHUT_WR, behind what is queued
            return
        if self._connection.close_write():
            if close_notify := self._openssl().close_notify():
                self._enqueue(close_notify)
            self._enqueue(_Step(self._shut_wr, "shutdown(SHUT_WR)"))

    # -- sendfile ---------------------------------------------------------------------------------------------------

    def _make_empty_waiter(self) -> asyncio.Future[None]:
        """For the loop's ``_sendfile_native``: done once everything queued is sent."""
        if self._empty_waiter is not None:
            raise RuntimeError("Empty waiter is already set")
        self._empty_waiter = self._loop.create_future()
        if not self._buffer:
            self._empty_waiter.set_result(None)
            self._sendfile_active = True
        return self._empty_waiter

    def _reset_empty_waiter(self) -> None:
        self._empty_waiter = None
        self._sendfile_active = False
        if self._lost:
            return
        try:
            if self._connection.record_limit is not None:
                self._check_key_limit()  # sendfile's records were not counted: ask the kernel
            self._flush()
        except Exception as exc:
            self._fatal_error(exc)
        self._maybe_finish()

    async def sendfile(self, file: IO[bytes], offset: int = 0, count: int | None = None) -> int:
        """Send ``count`` bytes of ``file`` from ``offset`` (to its end when ``None``) with ``os.sendfile``: the
        kernel encrypts page-cache pages, no byte of the file enters this process. On a selector loop this is
        ``loop.sendfile(self, ...)``; on other loops (uvloop, whose ``loop.sendfile`` is not implemented) the
        same steps are done here. On fallback (OpenSSL sends) the file is read and written in chunks. The file
        position is left after the last byte sent, like ``loop.sendfile``."""
        if self.is_closing():
            raise RuntimeError("Transport is closing")
        if self._selector:
            return await self._loop.sendfile(self, file, offset, count)
        if not self.kernel_tx:
            return await self._sendfile_by_writes(file, offset, count)
        fileno = file.fileno()
        size = os.fstat(fileno).st_size
        total = 0
        resume = self.is_reading()
        self.pause_reading()
        try:
            await self._make_empty_waiter()
            while count is None or total < count:
                want = (size - offset - total) if count is None else (count - total)
                if want <= 0:
                    break
                try:
                    sent = os.sendfile(self._sock_fd, fileno, offset + total, want)
                except (BlockingIOError, InterruptedError):
                    await self._writable()
                    continue
                if sent == 0:
                    break
                total += sent
        finally:
            if total:
                os.lseek(fileno, offset + total, os.SEEK_SET)
            self._reset_empty_waiter()
            if resume:
                self.resume_reading()
        return total

    async def _writable(self) -> None:
        """Wait until the socket takes more (a loop that is not a selector loop: public add_writer)."""
        if self._lost:
            raise ConnectionError("the connection was lost during sendfile")
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._loop.add_writer(self._sock_fd, _set_result_once, waiter)
        try:
            await waiter
        finally:
            if not self._lost:
                self._loop.remove_writer(self._sock_fd)

    async def _sendfile_by_writes(self, file: IO[bytes], offset: int, count: int | None) -> int:
        file.seek(offset)
        total = 0
        while count is None or total < count:
            want = 65536 if count is None else min(65536, count - total)
            block = await self._loop.run_in_executor(None, file.read, want)
            if not block:
                break
            if self.is_closing():
                raise ConnectionError("the connection closed during sendfile")
            self.write(block)
            total += len(block)
            if self._buffer_size > self._high_water:
                waiter: asyncio.Future[None] = self._loop.create_future()
                self._drain_waiters.append(waiter)
                await waiter
        return total

    # -- closing ----------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """close_notify after everything written, ``SHUT_WR``, then wait (≤ ``ssl_shutdown_timeout``) for the peer
        to end its side; no more data reaches the protocol. ``connection_lost(None)`` follows."""
        if self._closing or self._lost:
            return
        self._closing = True
        self._update_reader()  # read (and drop) until the peer's side ends
        self._deadline = self._loop.call_later(self._shutdown_timeout, self._shutdown_timed_out)
        if not self._close_notify_queued and self._connection.error is None:
            try:
                self._enqueue_close_notify()
            except OSError as exc:
                self._fatal_error(exc)
                return
        self._flush()
        self._maybe_finish()

    def _shutdown_timed_out(self) -> None:
        self._deadline = None
        if not self._lost:
            if self._error is None and (self._buffer or not self._read_done):
                self._error = TimeoutError("SSL shutdown timed out")
            self._close_now()

    def abort(self) -> None:
        """Close at once: queued data is dropped and no close_notify is sent."""
        self._close_now()

    def _maybe_finish(self) -> None:
        if self._lost or not self._closing or self._buffer or self._empty_waiter is not None:
            return
        if self._read_done:
            self._close_now()

    def _fatal_error(self, exc: Exception) -> None:
        """The connection failed: tell the peer if there is an alert to send, then close."""
        if self._lost:
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
        self._closing = True
        self._close_notify_queued = True
        self._buffer.clear()
        self._buffer_size = 0
        self._sendfile_active = False
        if self._fatal_alert is not None and self.kernel_tx:
            self._enqueue(_ControlRecord(ContentType.ALERT, self._fatal_alert))
        elif not self.kernel_tx and self._userspace is not None and (alert := self._userspace.output()):
            self._enqueue(alert)  # OpenSSL's alert on fallback
        if not self._buffer or isinstance(exc, (ConnectionError, TimeoutError)):
            self._close_now()
            return
        # Half-close after the alert and wait briefly for the peer's FIN: a reset must not overtake it.
        self._enqueue(_Step(self._shut_wr, "shutdown(SHUT_WR)"))
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self._loop.call_later(_FATAL_DRAIN_TIMEOUT, self._close_now)
        self._update_reader()
        self._flush()
        self._maybe_finish()

    def _close_now(self) -> None:
        """Release everything; ``connection_lost`` runs soon, then the descriptor is closed."""
        if self._lost:
            return
        self._closing = True
        self._lost = True
        self._update_reader()
        self._set_writer(False)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._buffer.clear()
        self._buffer_size = 0
        self._wake_drain_waiters()
        if self._empty_waiter is not None and not self._empty_waiter.done():
            self._empty_waiter.set_exception(ConnectionError("Connection is closed by peer"))
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
        if sock is not None and sock.fileno() != -1 and not getattr(self, "_lost", True):
            warnings.warn(f"unclosed transport {self!r}", ResourceWarning, source=self, stacklevel=1)
            sock.close()

    def __repr__(self) -> str:
        state = "closed" if self._lost else "closing" if self._closing else f"fd={self._sock_fd}"
        return f"<ktls.asyncio.KTLSTransport {state} {self._connection.describe()}>"

    # -- splice (ktls.splice; kept last in the class so that it merges apart from the rest) ---------------------

    async def splice_to(self, fd: int, count: int) -> int:
        """Move up to ``count`` bytes of received application data into the non-blocking descriptor ``fd`` with
        ``splice`` (the kernel decrypts into a pipe; no byte enters Python); 0 at the end of the stream, when the
        protocol's ``eof_received`` has also been called. Pauses reading: while splicing, the protocol gets no
        ``data_received``. On fallback the same, by a copy (:mod:`ktls.splice`)."""
        self.pause_reading()
        return await splice.splice_to_async(self._splice_endpoint(), fd, count)

    async def splice_from(self, fd: int, count: int) -> int:
        """Move up to ``count`` bytes from the non-blocking descriptor ``fd`` into the connection with
        ``splice``, for the kernel to encrypt, in order with what was written before; 0 at ``fd``'s end. On
        fallback the same, by a copy (:mod:`ktls.splice`)."""
        return await splice.splice_from_async(self._splice_endpoint(), fd, count)

    def _splice_endpoint(self) -> splice.AsyncEndpoint:
        async def hold_writes() -> None:
            await self._make_empty_waiter()

        def take_plaintext(count: int) -> bytes:
            taken = bytes(self._plaintext[:count])
            del self._plaintext[:count]
            return taken

        async def copy_in(count: int) -> bytes:
            return await splice.collect(self, count)

        async def write(data: bytes) -> None:
            self.write(data)
            while self._buffer_size > self._high_water and not self._lost:
                waiter: asyncio.Future[None] = self._loop.create_future()
                self._drain_waiters.append(waiter)
                await waiter

        return splice.AsyncEndpoint(
            self,
            self._loop,
            self._sock,
            self._connection,
            self._run,
            self._on_eof,
            self._fatal_error,
            hold_writes,
            self._reset_empty_waiter,
            take_plaintext,
            copy_in,
            write,
            self.is_closing,
        )


def _set_result_once(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _item_size(item: _Item) -> int:
    if isinstance(item, _Step):
        return 0
    if isinstance(item, _ControlRecord):
        return len(item.payload)
    return len(item)

"""One TLS connection's socket I/O, shared by both front ends: :class:`Engine`.

The blocking :class:`~ktls.stream.Stream` and the asyncio :class:`~ktls.asyncio.KTLSTransport` differ in how
they *wait*; everything they do with the socket is here, once, driven by the connection core
(:class:`~ktls.core.connection.Connection` decides, the engine carries its actions out). An engine makes one
system call at a time and never waits by itself: on a blocking socket (the Stream's, whose timeouts are the
kernel's ``SO_RCVTIMEO``/``SO_SNDTIMEO``) a call waits inside the kernel; on a non-blocking one it raises
``BlockingIOError``, and the front end waits its own way — ``poll`` with a deadline, or the event loop — and
calls again.

Reading (:meth:`Engine.read`, :meth:`Engine.read_into`), by who receives (``connection.receiving``):

* **Kernel.** One ``recvmsg`` with room for the record-type control message, never a plain ``recv`` (which
  fails with ``EIO`` when a ticket, alert or KeyUpdate is next). Application data is decrypted straight into
  the caller's buffer when it holds a whole record; a smaller buffer reads through a scratch buffer that does,
  because a control record must come back whole and typed, and application data beyond the buffer waits in
  :attr:`Engine.plaintext`. Any other record goes to the connection; the call then returns ``None`` (read
  again), or the end of the stream.
* **Deferred** (a TLS 1.3 client before its first application record): one ``recv`` of at most the rest of
  the current record for OpenSSL (:meth:`ktls.core.connection.Connection.deferred_record`); what it
  decrypted lands in :attr:`Engine.plaintext`.
* **User space** (fallback, or receive the kernel did not take): OpenSSL reads from its memory BIO, and one
  ``recv`` feeds it when it needs more. What OpenSSL writes meanwhile (an alert, a KeyUpdate answer) is ours
  to send only while OpenSSL also sends; under a key the kernel owns it is dropped.
* **After close or a failure** (:meth:`Engine.discard`): what arrives is read and dropped; control records
  still go to the connection (a KeyUpdate must be followed to read on, close_notify ends it).

Writing goes through one ordered queue of application data (plaintext for the kernel, OpenSSL's records on
fallback), control records (``sendmsg`` + ``TLS_SET_RECORD_TYPE``) and steps (install the next send key,
``shutdown(SHUT_WR)``). Our KeyUpdate goes to the *front*, with the switch to the next key right behind it
(RFC 8446 §4.6.3: before our next application data record; data the kernel already took is under the old
key); close_notify goes to the back, behind everything written before it, and is never dropped when the
socket buffer is full (rustls/ktls#78). A fatal alert replaces what is queued (:meth:`Engine.fail`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import io
import logging
import os
import select
import socket
import ssl
import time
from collections.abc import Callable, Generator
from typing import IO, TYPE_CHECKING, NoReturn, Union

from .constants import MAX_PLAINTEXT, AlertLevel, ContentType
from .core import driver
from .core.connection import Action, Connection, Deliver, HandOffReceive, Receiving, Sending
from .core.control import Fail, InstallKey, ResumeReceive, SendAlert, SendHandshake, SessionTicket, WriteClosed
from .core.handshake import Handshake
from .core.userspace import UserspaceTLS
from .errors import KernelTLSFailure, KernelTLSUnavailable, RecordError
from .kernel import syscalls, tcp
from .kernel.uapi import Direction

if TYPE_CHECKING:
    import asyncio

__all__ = ["RECORD_BUFFER", "ControlRecord", "Engine", "Step", "Wait", "wait_async", "wait_blocking"]

log = logging.getLogger("ktls")

#: Room for one whole record (RFC 8446 §5.2 TLSInnerPlaintext bound): a control record read into less comes back
#: in pieces.
RECORD_BUFFER = MAX_PLAINTEXT + 256
#: Ciphertext read per ``recv`` when OpenSSL receives.
_CIPHERTEXT_READ = 256 * 1024
#: Bytes per ``os.sendfile`` call: big enough to amortise the call, small enough to count records for rekeying.
_SENDFILE_CHUNK = 1 << 24
#: Bytes per read of a file that is sent by reading it.
_COPY_CHUNK = 64 * 1024
#: While lingering: how often the send queue is looked at again (``SIOCOUTQ`` cannot be waited for).
_LINGER_RECHECK = 0.005

_APPLICATION_DATA_CMSG = syscalls.APPLICATION_DATA_CMSG
_CMSG_SPACE = syscalls.RECORD_TYPE_CMSG_SPACE
_MSG_CTRUNC = syscalls.MSG_CTRUNC


@dataclasses.dataclass(frozen=True)
class Wait:
    """What one of the engine's loops (sendfile, splice, drain, linger) waits for before it goes on: ``fd``
    readable, or writable. With ``until`` (a ``time.monotonic()`` instant) the loop keeps its own time: it is
    resumed then whether ``fd`` became ready or not, and the front end's timeout does not apply. ``progress``:
    the bytes the loop has moved so far, which a non-blocking caller gets instead of a wait (as ``send`` returns
    what the socket took)."""

    fd: int
    writable: bool
    until: float | None = None
    progress: int = 0


@dataclasses.dataclass(frozen=True)
class ControlRecord:
    """A queued record of another content type than application data, sent through the kernel."""

    content_type: ContentType
    payload: bytes


@dataclasses.dataclass(frozen=True)
class Step:
    """Something to do once everything queued before it has been sent."""

    run: Callable[[], None]
    name: str


Item = Union[bytes, memoryview, ControlRecord, Step]  # noqa: UP007
#: The empty queue every engine starts with; it is replaced before anything is added (``maxlen=0`` would drop it).
_NOTHING_QUEUED: collections.deque[Item] = collections.deque(maxlen=0)


class Engine:
    """The socket I/O of one TLS connection after its handshake (module docstring)."""

    __slots__ = (
        "_fatal_alert",
        "_flushing",
        "_scratch",
        "_userspace",
        "connection",
        "hold",
        "on_flushed",
        "plaintext",
        "queue",
        "queued",
        "sock",
        "ssl_object",
    )

    def __init__(
        self, sock: socket.socket, handshake: Handshake | None, connection: Connection, early_data: bytes = b""
    ) -> None:
        self.sock = sock
        self.connection = connection
        #: OpenSSL's connection object, what it knows about the handshake (``None``: built from keys).
        self.ssl_object = handshake.ssl_object if handshake is not None else None
        self._userspace = UserspaceTLS(handshake, connection) if handshake is not None else None
        #: Application data decrypted but not yet delivered (before the hand-off, or beyond a small buffer).
        self.plaintext = bytearray(early_data)
        self._scratch: memoryview | None = None
        #: What waits to be sent, in order (module docstring), and its size in bytes. Most connections never
        #: queue anything: they share one empty queue that nothing is ever added to (:meth:`_writable_queue`).
        self.queue: collections.deque[Item] = _NOTHING_QUEUED
        self.queued = 0
        #: Someone else writes to the socket for now (asyncio's native ``loop.sendfile``): the queue waits.
        self.hold = False
        #: Called after every flush (the asyncio transport's writer callback and flow control follow it).
        self.on_flushed: Callable[[], None] | None = None
        self._fatal_alert: bytes | None = None
        self._flushing = False

    @property
    def userspace(self) -> UserspaceTLS:
        """OpenSSL's record layer (fallback, receive left in user space, the deferred window)."""
        if self._userspace is None:
            raise KernelTLSUnavailable(None, "this connection was built from keys: it has no userspace TLS")
        return self._userspace

    def pending(self) -> int:
        """Decrypted bytes waiting to be read (here, and in OpenSSL when it receives)."""
        userspace = self._userspace is not None and self.connection.receiving is Receiving.USERSPACE
        return len(self.plaintext) + (self.userspace.pending if userspace else 0)

    def cipher(self) -> tuple[str, str, int] | None:
        """``ssl.SSLSocket.cipher()``; built from keys, what the keys say."""
        if self.ssl_object is not None:
            return self.ssl_object.cipher()
        suite = self.connection.suite
        return None if suite is None else (suite.openssl_name, suite.version.label, suite.key_size * 8)

    # -- receiving ------------------------------------------------------------------------------------------------

    def read(self, size: int) -> bytes | None:
        """Up to ``size`` bytes of application data: ``b""`` at the end of the stream (or for ``size`` 0);
        ``None`` when the call consumed something else (a control record, part of a record): call again."""
        if self.plaintext or size <= 0:
            data = bytes(self.plaintext[:size])
            del self.plaintext[:size]
            return data
        connection = self.connection
        receiving = connection.receiving
        if receiving is Receiving.KERNEL:
            if size < RECORD_BUFFER:
                buffer = bytearray(size)
                n = self._read_kernel_into(memoryview(buffer))
                return None if n is None else bytes(memoryview(buffer)[:n])  # one copy, not two
            # The hot path for large reads: into a new bytes object, no copy after the read.
            try:
                data, ancdata, msg_flags, _ = self.sock.recvmsg(size, _CMSG_SPACE)
            except OSError as exc:
                self.receive_failed(exc)
            if ancdata and ancdata[0] == _APPLICATION_DATA_CMSG and not msg_flags & _MSG_CTRUNC:
                if actions := connection.application_data():
                    self.run(actions)  # it interrupted a handshake message: the alert, then the error
                return data
            n = self._not_application_data(syscalls.record_type(ancdata, msg_flags), data)
            return None if n is None else b""
        if receiving is Receiving.CLOSED:
            return b""
        if receiving is Receiving.DEFERRED:
            self._read_deferred()
            return None
        userspace = self.userspace
        plaintext = userspace.read(size)
        if plaintext is None:
            self._feed_openssl(userspace)
        self._send_openssl_output(userspace)
        return plaintext

    def read_into(self, view: memoryview) -> int | None:
        """:meth:`read` into ``view``: how many bytes (0 at the end), ``None`` to call again."""
        if self.plaintext or not view:
            taken = min(len(view), len(self.plaintext))
            view[:taken] = self.plaintext[:taken]
            del self.plaintext[:taken]
            return taken
        receiving = self.connection.receiving
        if receiving is Receiving.KERNEL:
            return self._read_kernel_into(view)
        if receiving is Receiving.CLOSED:
            return 0
        if receiving is Receiving.DEFERRED:
            self._read_deferred()
            return None
        userspace = self.userspace
        n = userspace.read_into(view)
        if n is None:
            self._feed_openssl(userspace)
        self._send_openssl_output(userspace)
        return n

    def _read_kernel_into(self, view: memoryview) -> int | None:
        """One ``recvmsg`` into ``view``. A ``view`` smaller than a record is read together with the scratch
        buffer behind it (one scattered ``recvmsg_into``): a record that fits lands in ``view`` with no copy,
        the rest of a longer one lands in the scratch buffer and waits in :attr:`plaintext`, and a control
        record always comes back whole."""
        size = len(view)
        if size < RECORD_BUFFER:
            if self._scratch is None:
                self._scratch = memoryview(bytearray(RECORD_BUFFER))
            buffers = [view, self._scratch]
        else:
            buffers = [view]
        try:
            n, ancdata, msg_flags, _ = self.sock.recvmsg_into(buffers, _CMSG_SPACE)
        except OSError as exc:
            self.receive_failed(exc)
        if not ancdata or ancdata[0] != _APPLICATION_DATA_CMSG or msg_flags & _MSG_CTRUNC:
            data = bytes(view[:n]) if n <= size else bytes(view) + bytes(buffers[1][: n - size])
            return self._not_application_data(syscalls.record_type(ancdata, msg_flags), data)
        if actions := self.connection.application_data():
            self.run(actions)
        if n > size:
            self.plaintext += buffers[1][: n - size]
            return size
        return n

    def _not_application_data(self, content_type: ContentType | int | None, data: bytes) -> int | None:
        """A kernel read that was not application data: the end of the stream (0; the connection's ragged-EOF
        policy may raise), or a control record for the connection (``None``: read again; 0 once the read side
        closed)."""
        if content_type is None:
            if data:
                raise KernelTLSFailure(None, "the kernel returned bytes without a record type")
            self.connection.end_of_stream()
            return 0
        self.run(self.connection.control_record(int(content_type), data))
        return 0 if self.connection.receiving is Receiving.CLOSED else None

    def receive_failed(self, exc: OSError) -> NoReturn:
        """A failed kernel read, said the kernel layer's way (:func:`ktls.kernel.syscalls.raise_receive_error`):
        a record the kernel refused is answered with its alert first; ``BlockingIOError`` and TCP's own errors
        pass as they are."""
        try:
            syscalls.raise_receive_error(exc)
        except RecordError as error:
            self.run(self.connection.receive_failed(error))
            raise

    def _read_deferred(self) -> None:
        userspace = self.userspace
        self.run(userspace.deferred_received(self.sock.recv(userspace.deferred_wanted())))

    def _feed_openssl(self, userspace: UserspaceTLS) -> None:
        userspace.received(self.sock.recv(_CIPHERTEXT_READ))

    def _send_openssl_output(self, userspace: UserspaceTLS) -> None:
        if (output := userspace.output()) and not self.connection.kernel_tx:
            self._enqueue(output)
            self.flush()

    def discard(self) -> bool:
        """After close or a failure: read one thing that has arrived and drop it. ``False`` once the peer's
        side has ended (EOF, close_notify, an error); ``BlockingIOError`` when nothing has arrived."""
        connection = self.connection
        try:
            if connection.kernel_rx:
                record = syscalls.recv_record(self.sock, RECORD_BUFFER, socket.MSG_DONTWAIT)
                if record.content_type is None:
                    return False
                if record.content_type != ContentType.APPLICATION_DATA:
                    self.run(connection.control_record(int(record.content_type), record.data))
                return not connection.control.read_closed
            data = self.sock.recv(RECORD_BUFFER, socket.MSG_DONTWAIT)
            if not data:
                return False
            if connection.receiving is Receiving.USERSPACE and self._userspace is not None:
                self._userspace.received(data)
                while chunk := self._userspace.read(RECORD_BUFFER):
                    pass  # dropped: the application closed
                return chunk is None  # b"": the read side ended
            return True
        except (BlockingIOError, InterruptedError):
            raise BlockingIOError from None
        except (OSError, ssl.SSLError):
            return False  # EKEYEXPIRED after an aborted KeyUpdate, a reset, a bad record: done either way

    # -- sending --------------------------------------------------------------------------------------------------

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """One ``send`` of ``data`` (on a blocking socket it waits in the kernel): how many bytes were taken.
        The queue must be empty (what is queued goes first: :meth:`flush`). When OpenSSL sends, all of
        ``data`` is taken, and its records wait in the queue for what the socket does not take now."""
        if self.connection.sending is Sending.KERNEL:
            sent = self.sock.send(data)
            if self.connection.sent(sent):
                self.count_records()
            return sent
        written, ciphertext = self.userspace.encrypt(data)
        self._enqueue(ciphertext)
        self.flush()
        return written

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """All of ``data``: what the socket takes now goes now, the rest is queued behind what is queued."""
        if self.connection.sending is not Sending.KERNEL:
            data = self.userspace.encrypt(data)[1]
        if not self.queue and not self.hold:
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            if sent:
                self.sent(sent)
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        self._enqueue(data if isinstance(data, bytes) else bytes(data))
        self.flush()

    def sendfile(self, file: IO[bytes], offset: int, count: int | None) -> Generator[Wait, None, int]:
        """Send ``count`` bytes of ``file`` from ``offset`` (to its end: ``None``), after what is queued. With the
        kernel sending, ``os.sendfile``: page-cache pages go through the kernel's TLS and no byte enters Python;
        otherwise (OpenSSL sends, a file without a descriptor, one the kernel cannot send from such as a pipe)
        read and :meth:`write`. Yields a wait for room (with the bytes sent so far) whenever the socket is full.
        Returns the bytes sent; the file position is left
        after the last of them. While the queue is held (asyncio's sendfile) nothing is counted against the
        key's limit: the count is taken when the hold ends."""
        in_fd: int | None = None
        if self.connection.sending is Sending.KERNEL:
            with contextlib.suppress(AttributeError, io.UnsupportedOperation):
                in_fd = file.fileno()
        total = 0
        try:
            while count is None or total < count:
                self.connection.check_writable()  # never data behind our close_notify
                want = _SENDFILE_CHUNK if count is None else min(_SENDFILE_CHUNK, count - total)
                # Under a hold, what was queued meanwhile goes after the file; otherwise it goes first.
                if self.queue and not self.hold and not self.flush():
                    yield Wait(self.sock.fileno(), writable=True, progress=total)
                    continue
                if in_fd is None:
                    self.hold = False  # these writes go through the queue: it must flow
                    file.seek(offset + total)
                    if not (block := file.read(min(want, _COPY_CHUNK))):
                        break
                    self.write(block)
                    total += len(block)
                    continue
                try:
                    sent = os.sendfile(self.sock.fileno(), in_fd, offset + total, want)
                except (BlockingIOError, InterruptedError):
                    yield Wait(self.sock.fileno(), writable=True, progress=total)
                    continue
                except OSError as exc:
                    if total or isinstance(exc, (ConnectionError, TimeoutError)):
                        raise
                    in_fd = None  # not a file the kernel can send from (a pipe, /proc…): read it ourselves
                    continue
                if not sent:
                    break  # end of file
                total += sent
                if not self.hold:
                    self.sent(sent)
        finally:
            if total:
                file.seek(offset + total)
        return total

    def flush(self) -> bool:
        """Send what is queued, in order, as far as the socket takes it now (never waits): ``True`` once the
        queue is empty. Errors other than ``BlockingIOError`` propagate."""
        if self.hold or self._flushing:
            return not self.queue
        self._flushing = True
        try:
            while self.queue:
                item = self.queue[0]
                if isinstance(item, Step):
                    self.queue.popleft()
                    item.run()
                    continue
                if isinstance(item, ControlRecord):
                    # A control record is a few bytes: the kernel takes it whole or not at all.
                    sent = syscalls.send_record(self.sock, item.content_type, item.payload, socket.MSG_DONTWAIT)
                    rest: Item = ControlRecord(item.content_type, item.payload[sent:])
                    done = sent >= len(item.payload)
                else:
                    sent = self.sock.send(item, socket.MSG_DONTWAIT)
                    rest = memoryview(item)[sent:]
                    done = sent >= len(item)
                self.queued -= sent
                if done:
                    self.queue.popleft()
                else:
                    self.queue[0] = rest
                if not isinstance(item, ControlRecord):
                    self.sent(sent)  # may put a KeyUpdate at the front of the queue
                if not done:
                    break
        except (BlockingIOError, InterruptedError):
            pass
        finally:
            self._flushing = False
        if self.on_flushed is not None:
            self.on_flushed()
        return not self.queue

    def drain(self) -> Generator[Wait, None, None]:
        """:meth:`flush` until the queue is empty, yielding a wait for room whenever the socket is full."""
        while not self.flush():
            yield Wait(self.sock.fileno(), writable=True)

    def _enqueue(self, item: Item) -> None:
        self._writable_queue().append(item)
        self.queued += _size(item)

    def _writable_queue(self) -> collections.deque[Item]:
        """This engine's own queue, made on first use (a deque costs ~760 bytes per idle connection)."""
        if self.queue is _NOTHING_QUEUED:
            self.queue = collections.deque()
        return self.queue

    def clear(self) -> None:
        """Drop everything queued (the connection is gone)."""
        self.queue.clear()
        self.queued = 0

    def sent(self, nbytes: int) -> None:
        """``nbytes`` went out through the kernel (also outside :meth:`send`, e.g. by ``splice``): count them."""
        if self.connection.sent(nbytes):
            self.count_records()

    def count_records(self) -> None:
        """Near the AEAD's key-usage limit (RFC 8446 §5.5): the kernel's exact count, and a KeyUpdate (or the
        write side's end, where the kernel cannot rekey) if due."""
        info = syscalls.get_crypto_info(self.sock, Direction.TX)
        self.run(self.connection.kernel_record_count(info.rec_seq if info is not None else None))

    def key_update(self, request_peer_update: bool = False) -> None:
        """Our TLS 1.3 KeyUpdate, ahead of anything queued, and the switch to the next send key."""
        self.run(self.connection.key_update(request_peer_update))

    def close_write(self) -> None:
        """Our close_notify behind everything queued, then ``SHUT_WR`` — once; nothing when the write side is
        already closed or the connection failed. On fallback OpenSSL writes it (``SSLObject.unwrap``)."""
        actions = self.connection.close_write()
        if not actions:
            return
        if self.connection.kernel_tx:
            self.run(actions)
            return
        if close_notify := self.userspace.close_notify():
            self._enqueue(close_notify)
        self._enqueue(Step(self._shut_wr, "shutdown(SHUT_WR)"))
        self.flush()

    def fail(self) -> bool:
        """The connection failed: queue what tells the peer why — the fatal alert the connection chose (the
        kernel sends) or OpenSSL's (it sends) — in place of everything queued, then ``SHUT_WR``. ``True`` when
        there is such an alert (the front end then gives it a moment to leave before closing)."""
        alert, self._fatal_alert = self._fatal_alert, None
        item: Item
        if alert is not None and self.connection.kernel_tx:
            item = ControlRecord(ContentType.ALERT, alert)
        elif not self.connection.kernel_tx and self._userspace is not None and (output := self._userspace.output()):
            item = output
        else:
            return False
        self.clear()
        self._enqueue(item)
        self._enqueue(Step(self._shut_wr, "shutdown(SHUT_WR)"))
        self.hold = False
        self.flush()
        return True

    def linger(self, seconds: float) -> Generator[Wait, None, None]:
        """Before the descriptor goes: ``SHUT_WR``, drop what has arrived, and while the peer has not acknowledged
        all our bytes keep dropping what it sends until it has, or its FIN comes (at most ``seconds``).

        Closing a socket with unread data makes the kernel send a reset and throw away its send queue — our
        last records and our close_notify, including bytes sent but not yet acknowledged, which a lost
        segment would need again. Data arriving after the close does the same while anything of ours is
        still queued. The usual culprit is a TLS 1.3 server's NewSessionTickets, which it writes only once it
        has read our Finished, so they can land just as we close. Once the peer has acknowledged everything,
        nothing of ours is at risk, so a close never waits for a peer that merely keeps its side open.
        """
        self._shut_wr()
        deadline = time.monotonic() + seconds
        while True:
            try:
                while self.discard():
                    pass
                return  # the peer's FIN, or an error: nothing more will arrive
            except BlockingIOError:
                pass
            now = time.monotonic()
            if not tcp.unacknowledged(self.sock) or now >= deadline:
                return
            # Wake up on data or FIN; look at the send queue again every few milliseconds meanwhile.
            yield Wait(self.sock.fileno(), writable=False, until=min(deadline, now + _LINGER_RECHECK))

    def _shut_wr(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    # -- carrying out the connection's actions ----------------------------------------------------------------

    def run(self, actions: list[Action]) -> None:  # noqa: PLR0912 - one branch per action type
        """Carry out the connection's actions in order; :class:`~ktls.core.control.Fail` raises its error (a
        fatal alert before it waits for :meth:`fail`)."""
        urgent: list[Item] = []
        for action in actions:
            if isinstance(action, SendAlert):
                if action.level is AlertLevel.FATAL:
                    self._fatal_alert = action.payload  # sent by fail(), in place of what is queued
                else:
                    self._enqueue(ControlRecord(ContentType.ALERT, action.payload))
            elif isinstance(action, SendHandshake):
                urgent.append(ControlRecord(ContentType.HANDSHAKE, action.message))
            elif isinstance(action, InstallKey):
                if action.direction is Direction.RX:
                    syscalls.set_crypto_info(self.sock, Direction.RX, action.info)
                else:
                    install = functools.partial(syscalls.set_crypto_info, self.sock, Direction.TX, action.info)
                    urgent.append(Step(install, "install the next send key"))
            elif isinstance(action, Deliver):
                self.plaintext += action.plaintext
            elif isinstance(action, ResumeReceive):
                driver.resume_receive(self.sock, self.connection)
            elif isinstance(action, HandOffReceive):
                driver.hand_off_receive(self.sock, self.connection, action)
            elif isinstance(action, WriteClosed):
                self._enqueue(Step(self._shut_wr, "shutdown(SHUT_WR)"))
            elif isinstance(action, SessionTicket):
                log.debug("NewSessionTicket after the hand-off (%d bytes): not resumable", len(action.message))
            elif isinstance(action, Fail):
                raise action.error
        for item in reversed(urgent):
            self._writable_queue().appendleft(item)
            self.queued += _size(item)
        if self.queue:
            self.flush()


def _size(item: Item) -> int:
    if isinstance(item, Step):
        return 0
    if isinstance(item, ControlRecord):
        return len(item.payload)
    return len(item)


# -- waiting, each front end its way ----------------------------------------------------------------------------


def wait_blocking(wait: Wait, timeout: float | None) -> bool:
    """Wait for ``wait`` with ``poll``, up to ``timeout`` seconds (``None``: no limit; ``wait.until`` instead when
    it has one): whether ``wait.fd`` is ready."""
    if wait.until is not None:
        timeout = max(0.0, wait.until - time.monotonic())
    poller = select.poll()
    poller.register(wait.fd, select.POLLOUT if wait.writable else select.POLLIN)
    return bool(poller.poll(None if timeout is None else timeout * 1000))


async def wait_async(loop: asyncio.AbstractEventLoop, wait: Wait, waiter: asyncio.Future[None] | None = None) -> None:
    """Wait for ``wait`` on the event loop (or until ``wait.until``), or until someone completes ``waiter``. A
    kTLS socket is watched through a duplicate descriptor: its transport owns the original's place in the loop
    (the selector loop refuses a second owner)."""
    dup = os.dup(wait.fd)
    if waiter is None:
        waiter = loop.create_future()

    def wake() -> None:
        if not waiter.done():
            waiter.set_result(None)

    timer = None if wait.until is None else loop.call_later(max(0.0, wait.until - time.monotonic()), wake)
    try:
        if wait.writable:
            loop.add_writer(dup, wake)
        else:
            loop.add_reader(dup, wake)
        try:
            await waiter
        finally:
            if wait.writable:
                loop.remove_writer(dup)
            else:
                loop.remove_reader(dup)
    finally:
        os.close(dup)
        if timer is not None:
            timer.cancel()

"""Splice on a kernel TLS socket: application data moves between the socket and another descriptor through a
pipe, decrypted or encrypted by the kernel, and never enters Python.

Theory of operation.

* **Receive** (:func:`splice_to`): ``splice(ktls socket → pipe)`` makes the kernel decrypt the next record
  (``tls_sw_splice_read``) and move up to ``count`` bytes of its plaintext into the pipe — one record per call;
  a record longer than ``count`` stays queued with its offset advanced. Then ``splice(pipe → fd)`` moves them
  on (to a TCP socket, another pipe, a file).
* **A record that is not application data** (alert, KeyUpdate, NewSessionTicket, close_notify) cannot be
  spliced. What each kernel of the matrix does, measured on the wire by ``tests/test_splice.py``
  (``test_what_splice_returns_at_a_control_record``), the same on 5.10 and Debian's 6.1, 6.12, 7.2 and 7.3-rc: the
  kernel decrypts the record, puts it back at the head of its receive queue and fails the call with
  ``EINVAL``; nothing of it reaches the pipe and nothing of the data before it is held back. A ``recvmsg``
  with room for the ``TLS_GET_RECORD_TYPE`` control message then returns exactly that record with its type,
  which goes to the connection core (:meth:`ktls.core.connection.Connection.control_record`); its actions (a
  KeyUpdate's new receive key, our KeyUpdate in answer, the end of the read side) are carried out by the
  front end before the next splice. On 7.x a peer's KeyUpdate makes the kernel refuse further records
  (``EKEYEXPIRED``) and hide readability until the new key is set, so the new key must be installed right
  after that ``recvmsg``, before any wait — it is (the core answers with ``InstallKey``, carried out at once).
* **End of stream**: ``splice`` returns 0 at the peer's FIN (a close_notify arrives as a control record first).
* **Send** (:func:`splice_from`): ``splice(fd → pipe)``, then ``splice(pipe → ktls socket)``: the kernel
  encrypts the pipe's pages into records (``tls_sw_sendpage``; ``MSG_SPLICE_PAGES`` from 6.5 on).
* **Linux before 5.14: a non-blocking splice out of a kTLS socket is a peek.** 5.10's ``tls_sw_splice_read``
  advances past what it spliced only ``if (likely(!(flags & MSG_PEEK)))`` — a test of the *splice* flags
  against a *recvmsg* flag, and ``MSG_PEEK`` (0x2) is ``SPLICE_F_NONBLOCK``'s value. So a splice with
  ``SPLICE_F_NONBLOCK``, or into a pipe whose write end is ``O_NONBLOCK`` (``do_splice`` then adds the flag),
  leaves the record queued: every call returns the same bytes again, without end (``splice_to`` delivered the
  first record forever; that was the "hang" of the 5.10 guest tests). Fixed upstream by d8654f4f9300 ("tls
  splice: remove inappropriate flags checking for MSG_PEEK", v5.14; not in 5.10.y: 5.10.262 still has the
  test). On those kernels (:data:`SPLICE_NONBLOCK_PEEKS`) the receive pipe's write end is blocking and no
  splice out of the socket is flagged non-blocking: the blocking front end lets the kernel wait (up to the
  stream's timeout, ``SO_RCVTIMEO``); a non-blocking stream and the asyncio transport splice only once
  ``poll`` says the socket is readable, with ``SO_RCVTIMEO`` set to 1 µs for that one call (one jiffy: the
  most it can wait if the readable bytes are only part of a record), then restored
  (:func:`_splice_when_readable`).
* **Linux before 5.16: a splice passes over what ``recvmsg`` left in the kernel.** ``recvmsg`` with too
  little room for a record keeps its rest, decrypted, on the context's ``rx_list``, which 5.10's
  ``tls_sw_splice_read`` never looks at: it splices the next record the parser holds, and the rest of the
  earlier one comes later or never (``test_splice_to_after_recv_keeps_every_byte_in_order`` saw byte 16640 of
  the stream replaced on 5.10.262). Fixed by e062fe99cccd ("tls: splice_read: fix accessing pre-processed
  records", 5.16; 5.15.6). On those kernels (:data:`SPLICE_SKIPS_RX_LIST`) a connection that has read
  application data with ``recvmsg`` (``Connection.read_by_recvmsg``) receives by copy from then on;
  one that only ever spliced — ``ktls proxy``'s — splices throughout.
* **The pipe is emptied before each splice into it.** ``tls_sw_splice_read`` moves one record into the pipe
  and advances by what it *asked* for, not by what the pipe took (``rxm->offset += len``, or
  ``consume_skb`` when it asked for the whole record, in 6.x's source): a pipe out of slots would lose
  bytes. Into an empty pipe of ``PIPE_SIZE`` (64 slots) one record (at most 16 KiB in a few pages) fits.
* **Userspace fallback** (no kTLS, a cipher the kernel lacks, a TLS 1.3 client's receive before its first
  application record): the same calls copy through Python — the stream reads, then writes to ``fd``.

The blocking front end (:class:`ktls.Stream`'s ``splice_to``/``splice_from``) and the asyncio one
(:class:`ktls.asyncio.KTLSTransport`'s) call the loops here with a :class:`Endpoint`: the socket, the core,
and the few things only the front end can do (carry out actions, say an error its own way).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import os
import select
import socket
import struct
import weakref
from collections.abc import Awaitable, Callable
from typing import NoReturn

from .constants import MAX_PLAINTEXT, ContentType
from .core.connection import Action, Connection, Receiving, Sending
from .errors import KernelTLSFailure, RecordError
from .kernel import syscalls
from .kernel.probe import kernel_version

__all__ = [
    "PIPE_SIZE",
    "AsyncEndpoint",
    "Endpoint",
    "Pipe",
    "splice_from",
    "splice_from_async",
    "splice_to",
    "splice_to_async",
]

#: Bytes a pipe is asked to hold (``F_SETPIPE_SZ``): 64 page slots, far more than one record needs (module
#: docstring). Unprivileged users are limited by ``/proc/sys/fs/pipe-user-pages-soft`` (16384 pages, i.e. 128
#: connections of two such pipes): past it the kernel refuses to grow a pipe and receiving copies instead.
PIPE_SIZE = 256 * 1024
#: Room for one whole record on a ``recvmsg`` of a control record (RFC 8446 §5.2 TLSInnerPlaintext bound).
_RECORD_BUFFER = MAX_PLAINTEXT + 256
#: Bytes per copy on the userspace fallback.
_COPY_CHUNK = 64 * 1024
_F_SETPIPE_SZ = 1031  # include/uapi/linux/fcntl.h (F_LINUX_SPECIFIC_BASE + 7)
_F_GETPIPE_SZ = 1032
#: Linux before 5.14 takes ``SPLICE_F_NONBLOCK`` on a splice out of a kTLS socket for ``MSG_PEEK`` and leaves
#: the record queued (module docstring; ``tls_sw_splice_read``, fixed by d8654f4f9300 in 5.14): splices out of
#: the socket are then made blocking, and bounded another way.
SPLICE_NONBLOCK_PEEKS = kernel_version() < (5, 14)
#: ``SO_RCVTIMEO`` for one splice after ``poll`` said readable, on those kernels: 1 µs, which the kernel rounds
#: up to one jiffy (``sock_set_timeout``), the most the call can wait.
_BRIEF_RECEIVE_TIMEOUT = struct.pack("@ll", 0, 1)
#: Linux before 5.16 splices the record the parser holds and passes over ``rx_list``, where ``recvmsg`` keeps
#: the rest of a record it decrypted but had no room for (module docstring; fixed by e062fe99cccd in 5.16 and
#: 5.15.6): there, once the front end has read application data with ``recvmsg``, receiving copies.
SPLICE_SKIPS_RX_LIST = kernel_version() < (5, 16)
_TIMEVAL_SIZE = struct.calcsize("@ll")
#: What older kernels answered instead of ``EINVAL`` (the kernel-internal ``ENOTSUPP``; 5.10.262 says ``EINVAL``).
_ENOTSUPP = 524
_SPLICE_F_MOVE = getattr(os, "SPLICE_F_MOVE", 1)
_SPLICE_F_NONBLOCK = getattr(os, "SPLICE_F_NONBLOCK", 2)


class Pipe:
    """A pipe between two splices, and how many bytes it holds. Both ends are non-blocking, except the write end
    with ``blocking_write`` (a receive pipe on :data:`SPLICE_NONBLOCK_PEEKS` kernels: the kernel would take an
    ``O_NONBLOCK`` write end for ``MSG_PEEK``); it is only ever spliced into when empty, so never waits for room."""

    def __init__(self, size: int = PIPE_SIZE, *, blocking_write: bool = False) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        if blocking_write:
            os.set_blocking(self.write_fd, True)
        with contextlib.suppress(OSError):  # EPERM past the per-user soft limit: keep the default size
            fcntl.fcntl(self.write_fd, _F_SETPIPE_SZ, size)
        self.capacity = fcntl.fcntl(self.write_fd, _F_GETPIPE_SZ)
        #: Room enough to splice a record into (module docstring): past the per-user soft limit the kernel
        #: keeps new pipes at 2 slots, and receiving then copies rather than risk losing bytes.
        self.roomy = self.capacity >= size
        self.held = 0
        self._finalizer = weakref.finalize(self, _close_pair, self.read_fd, self.write_fd)

    def close(self) -> None:
        self._finalizer()


def _close_pair(read_fd: int, write_fd: int) -> None:
    for fd in (read_fd, write_fd):
        with contextlib.suppress(OSError):
            os.close(fd)


#: Each front end object's pipes (receive, send), made on first use and closed with it.
_PIPES: weakref.WeakKeyDictionary[object, tuple[Pipe, Pipe]] = weakref.WeakKeyDictionary()


def pipes_of(owner: object) -> tuple[Pipe, Pipe]:
    """``owner``'s (receive, send) pipes: kept between calls, so bytes a cancelled call left in one go first."""
    pair = _PIPES.get(owner)
    if pair is None:
        pair = _PIPES[owner] = (Pipe(blocking_write=SPLICE_NONBLOCK_PEEKS), Pipe())
    return pair


def release(owner: object) -> None:
    """Close ``owner``'s pipes now (else they close when it is garbage-collected); bytes left in them are lost."""
    pair = _PIPES.pop(owner, None)
    if pair is not None:
        for pipe in pair:
            pipe.close()


class ControlRecordNext(Exception):
    """``splice`` refused: the next record is not application data (module docstring)."""


def splice_record(sock_fd: int, pipe: Pipe, count: int, *, nonblock: bool) -> int:
    """One ``splice`` from a kTLS socket into an empty ``pipe``: bytes moved (0 at end of stream). Raises
    :class:`ControlRecordNext` when a control record is next; ``BlockingIOError`` when nothing has arrived
    (always possible where the pipe's write end is non-blocking, which makes the kernel treat the splice as
    non-blocking; on :data:`SPLICE_NONBLOCK_PEEKS` kernels only when ``SO_RCVTIMEO`` ran out)."""
    if SPLICE_NONBLOCK_PEEKS and nonblock:
        raise ValueError("a non-blocking splice out of a kTLS socket peeks on Linux < 5.14")
    flags = _SPLICE_F_MOVE | (_SPLICE_F_NONBLOCK if nonblock else 0)
    try:
        moved = os.splice(sock_fd, pipe.write_fd, min(count, pipe.capacity), flags=flags)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, _ENOTSUPP):
            raise ControlRecordNext from None
        raise
    pipe.held += moved
    return moved


def drain(pipe: Pipe, fd: int) -> int:
    """Move what ``pipe`` holds to ``fd`` until it is empty or ``fd`` would block; bytes moved."""
    moved = 0
    while pipe.held:
        try:
            n = os.splice(pipe.read_fd, fd, pipe.held, flags=_SPLICE_F_MOVE | _SPLICE_F_NONBLOCK)
        except (BlockingIOError, InterruptedError):
            break
        if n == 0:
            raise BrokenPipeError(errno.EPIPE, "splice: the destination took nothing")
        pipe.held -= n
        moved += n
    return moved


def fill(pipe: Pipe, fd: int, count: int) -> int:
    """One ``splice`` from ``fd`` into ``pipe`` (at most its free room and ``count``): bytes moved, 0 at EOF;
    ``BlockingIOError`` when ``fd`` has nothing."""
    room = min(count, pipe.capacity - pipe.held)
    moved = os.splice(fd, pipe.write_fd, room, flags=_SPLICE_F_MOVE | _SPLICE_F_NONBLOCK)
    pipe.held += moved
    return moved


def _splice_keeps_order(connection: Connection) -> bool:
    """Whether a splice now takes the next bytes in order (not so on :data:`SPLICE_SKIPS_RX_LIST` kernels once
    ``recvmsg`` has read application data: what it left decrypted in the kernel would be passed over)."""
    return not (SPLICE_SKIPS_RX_LIST and connection.read_by_recvmsg)


def _readable_now(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _splice_when_readable(sock: socket.socket, pipe: Pipe, count: int) -> int:
    """On :data:`SPLICE_NONBLOCK_PEEKS` kernels, a splice that must not wait (a non-blocking stream, the event
    loop): only once ``poll`` says readable, and with ``SO_RCVTIMEO`` at one jiffy for the call, in case what is
    readable is only the start of a record the kernel has not parsed yet (``tls_wait_data`` then waits for the
    rest); ``BlockingIOError`` when nothing is there or the jiffy ran out. The socket's own timeout is restored."""
    fd = sock.fileno()
    if not _readable_now(fd):
        raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
    saved = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL_SIZE)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _BRIEF_RECEIVE_TIMEOUT)
    try:
        return splice_record(fd, pipe, count, nonblock=False)
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, saved)


def _splice_without_waiting(sock: socket.socket, pipe: Pipe, count: int) -> int:
    """:func:`splice_record` that does not wait for a record (the event loop's): ``SPLICE_F_NONBLOCK``, or where
    that flag peeks, :func:`_splice_when_readable`."""
    if SPLICE_NONBLOCK_PEEKS:
        return _splice_when_readable(sock, pipe, count)
    return splice_record(sock.fileno(), pipe, count, nonblock=True)


@dataclasses.dataclass
class Endpoint:
    """What the blocking loops need from their front end (:class:`ktls.Stream`)."""

    owner: object  # keys the pipes
    sock: socket.socket
    connection: Connection
    run: Callable[[list[Action]], None]  # carry out the core's actions
    failed: Callable[[OSError, bool], NoReturn]  # a socket call failed (reading?): raise it the front end's way
    sent: Callable[[int], None]  # the kernel took n bytes to encrypt: count them against the key's limit
    pending: Callable[[], int]  # plaintext already decrypted in user space, delivered first
    recv: Callable[[int], bytes]  # fallback: read application data the front end's way
    sendall: Callable[[bytes], None]  # fallback: send it the front end's way
    timeout: float | None = None


def _control_record(sock: socket.socket, connection: Connection) -> tuple[list[Action], bytes | None]:
    """After ``splice`` said a control record is next: read it whole with its type, and ask the core.

    Returns the core's actions and, if the kernel returned application data after all, that data (it must
    then be delivered: never a lost byte). ``None``-type at EOF is reported as ``connection.end_of_stream``.
    """
    record = syscalls.recv_record(sock, _RECORD_BUFFER, socket.MSG_DONTWAIT)
    if record.content_type == ContentType.APPLICATION_DATA:
        return connection.application_data(), record.data
    if record.content_type is None:
        if record.data:
            raise KernelTLSFailure(None, "the kernel returned bytes without a record type")
        connection.end_of_stream()
        return [], b""
    content_type, data = int(record.content_type), record.data
    while not record.end_of_record:
        record = syscalls.recv_record(sock, _RECORD_BUFFER, socket.MSG_DONTWAIT)
        data += record.data
        if not record.data or len(data) > _RECORD_BUFFER:
            raise KernelTLSFailure(None, "a control record ended early or is longer than a TLS record")
    return connection.control_record(content_type, data), None


def _write_all(fd: int, data: bytes, timeout: float | None) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except (BlockingIOError, InterruptedError):
            _wait_fd(fd, select.POLLOUT, timeout)


def _wait_fd(fd: int, events: int, timeout: float | None) -> None:
    poller = select.poll()
    poller.register(fd, events)
    if not poller.poll(None if timeout is None else timeout * 1000):
        raise TimeoutError(f"timed out ({'sending' if events & select.POLLOUT else 'receiving'})")


def _drain_blocking(pipe: Pipe, fd: int, timeout: float | None) -> None:
    while pipe.held:
        if not drain(pipe, fd):
            _wait_fd(fd, select.POLLOUT, timeout)


def _splice_waiting(endpoint: Endpoint, pipe: Pipe, count: int) -> int:
    """:func:`splice_record` for the blocking front end: waits up to the stream's timeout for a record."""
    while True:
        try:
            if SPLICE_NONBLOCK_PEEKS and endpoint.timeout == 0.0:
                return _splice_when_readable(endpoint.sock, pipe, count)
            # On SPLICE_NONBLOCK_PEEKS kernels the pipe's write end is blocking: the kernel waits, up to the
            # stream's SO_RCVTIMEO, and EAGAIN is that timeout.
            return splice_record(endpoint.sock.fileno(), pipe, count, nonblock=False)
        except (BlockingIOError, InterruptedError) as exc:
            # Elsewhere the pipe is non-blocking, and a non-blocking pipe makes the whole splice non-blocking
            # (do_splice adds SPLICE_F_NONBLOCK): wait here, up to the stream's timeout, and try again.
            if endpoint.timeout == 0.0 or SPLICE_NONBLOCK_PEEKS:
                endpoint.failed(exc, True)
            _wait_fd(endpoint.sock.fileno(), select.POLLIN, endpoint.timeout)


def splice_to(endpoint: Endpoint, fd: int, count: int) -> int:
    """Move up to ``count`` bytes of received application data into ``fd``; 0 at the end of the stream.

    Waits (the stream's timeout) for data to arrive and for ``fd`` to take all of it.
    """
    connection = endpoint.connection
    pipe = pipes_of(endpoint.owner)[0]
    _drain_blocking(pipe, fd, endpoint.timeout)  # a previous call's bytes, if it was interrupted
    while True:
        if count <= 0:
            return 0
        kernel = connection.receiving is Receiving.KERNEL and pipe.roomy and _splice_keeps_order(connection)
        if endpoint.pending() or not (kernel or connection.receiving is Receiving.CLOSED):
            copied = endpoint.recv(min(count, _COPY_CHUNK))  # fallback, bytes decrypted earlier, or a small pipe
            _write_all(fd, copied, endpoint.timeout)
            return len(copied)
        if connection.receiving is Receiving.CLOSED:
            return 0
        try:
            moved = _splice_waiting(endpoint, pipe, count)
        except ControlRecordNext:
            try:
                actions, data = _control_record(endpoint.sock, connection)
            except RecordError as error:
                endpoint.run(connection.receive_failed(error))
                raise
            except OSError as exc:
                endpoint.failed(exc, True)
            endpoint.run(actions)
            if data is None:
                continue
            _write_all(fd, data, endpoint.timeout)
            return len(data)
        except OSError as exc:
            endpoint.failed(exc, True)
        if not moved:
            connection.end_of_stream()
            return 0
        if actions := connection.spliced_data():
            endpoint.run(actions)  # it interrupted a handshake message: the alert, then the error
        _drain_blocking(pipe, fd, endpoint.timeout)
        return moved


def splice_from(endpoint: Endpoint, fd: int, count: int) -> int:
    """Move up to ``count`` bytes from ``fd`` into the stream, for the kernel to encrypt; 0 at ``fd``'s end.

    Waits for ``fd`` to have data and for the socket to take all of it.
    """
    connection = endpoint.connection
    connection.check_writable()
    pipe = pipes_of(endpoint.owner)[1]
    if connection.sending is not Sending.KERNEL:
        while True:
            try:
                data = os.read(fd, min(count, _COPY_CHUNK))
                break
            except (BlockingIOError, InterruptedError):
                _wait_fd(fd, select.POLLIN, endpoint.timeout)
        endpoint.sendall(data)
        return len(data)
    sock_fd = endpoint.sock.fileno()
    if not pipe.held:
        while True:
            try:
                if not fill(pipe, fd, count):
                    return 0
                break
            except (BlockingIOError, InterruptedError):
                _wait_fd(fd, select.POLLIN, endpoint.timeout)
    moved = 0
    while pipe.held:
        try:
            n = os.splice(pipe.read_fd, sock_fd, pipe.held, flags=_SPLICE_F_MOVE)
        except OSError as exc:
            endpoint.failed(exc, False)
        pipe.held -= n
        moved += n
        endpoint.sent(n)
    return moved


# -- asyncio ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class AsyncEndpoint:
    """What the asyncio loops need from their front end (:class:`ktls.asyncio.KTLSTransport`)."""

    owner: object
    loop: asyncio.AbstractEventLoop
    sock: socket.socket
    connection: Connection
    run: Callable[[list[Action]], None]  # carry out the core's actions (the transport's queue sends)
    eof: Callable[[], None]  # the read side ended (after the core was told)
    fail: Callable[[Exception], None]  # the connection failed: the transport's fatal-error path
    hold_writes: Callable[[], Awaitable[None]]  # wait for the transport's queue to empty, then hold it
    release_writes: Callable[[], None]  # let the queue go again (and count records against the key limit)
    take_plaintext: Callable[[int], bytes]  # plaintext already decrypted in user space, delivered first
    copy_in: Callable[[int], Awaitable[bytes]]  # fallback: up to n bytes of application data (b"" at the end)
    write: Callable[[bytes], Awaitable[None]]  # fallback: send through the transport, after its queue drained
    closing: Callable[[], bool]


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, *, writable: bool) -> None:
    """Wait until ``fd`` is readable (writable). A kTLS socket is watched through a duplicate descriptor: its
    transport owns the original's place in the loop (the selector loop refuses a second owner)."""
    dup = os.dup(fd)
    waiter: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not waiter.done():
            waiter.set_result(None)

    try:
        if writable:
            loop.add_writer(dup, wake)
        else:
            loop.add_reader(dup, wake)
        try:
            await waiter
        finally:
            if writable:
                loop.remove_writer(dup)
            else:
                loop.remove_reader(dup)
    finally:
        os.close(dup)


async def _drain_async(loop: asyncio.AbstractEventLoop, pipe: Pipe, fd: int) -> None:
    while pipe.held:
        if not drain(pipe, fd):
            await _ready(loop, fd, writable=True)


async def _write_all_async(loop: asyncio.AbstractEventLoop, fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except (BlockingIOError, InterruptedError):
            await _ready(loop, fd, writable=True)


async def splice_to_async(endpoint: AsyncEndpoint, fd: int, count: int) -> int:
    """:func:`splice_to` on the event loop; ``fd`` should be non-blocking (it is waited for with the loop)."""
    connection = endpoint.connection
    loop = endpoint.loop
    pipe = pipes_of(endpoint.owner)[0]
    await _drain_async(loop, pipe, fd)
    sock_fd = endpoint.sock.fileno()
    while True:
        if count <= 0 or endpoint.closing():
            return 0
        if early := endpoint.take_plaintext(count):
            await _write_all_async(loop, fd, early)
            return len(early)
        receiving = connection.receiving
        if receiving is Receiving.CLOSED:
            return 0
        if receiving is not Receiving.KERNEL or not pipe.roomy or not _splice_keeps_order(connection):
            data = await endpoint.copy_in(min(count, _COPY_CHUNK))
            await _write_all_async(loop, fd, data)
            return len(data)
        try:
            moved = _splice_without_waiting(endpoint.sock, pipe, count)
        except (BlockingIOError, InterruptedError):
            await _ready(loop, sock_fd, writable=False)
            continue
        except ControlRecordNext:
            delivered = _control_record_async(endpoint)
            if delivered is None:
                continue
            await _write_all_async(loop, fd, delivered)
            return len(delivered)
        except OSError as exc:
            error = _receive_error(exc)
            if isinstance(error, RecordError):
                try:
                    endpoint.run(connection.receive_failed(error))
                except Exception as failed:
                    error = failed
            endpoint.fail(error)
            raise error from exc
        if not moved:
            connection.end_of_stream()
            endpoint.eof()
            return 0
        _spliced_async(endpoint)
        await _drain_async(loop, pipe, fd)
        return moved


def _spliced_async(endpoint: AsyncEndpoint) -> None:
    """Tell the core that application data was spliced, and carry out what it says (an interrupted handshake
    message: the alert, then the error)."""
    if actions := endpoint.connection.spliced_data():
        try:
            endpoint.run(actions)
        except Exception as exc:
            endpoint.fail(_connection_error(exc))
            raise


def _control_record_async(endpoint: AsyncEndpoint) -> bytes | None:
    """The control record ``splice`` stopped at, to the core and its actions carried out; ``None`` to splice on,
    else bytes to deliver (``b""``: the end of the stream)."""
    connection = endpoint.connection
    try:
        actions, data = _control_record(endpoint.sock, connection)
        endpoint.run(actions)
    except Exception as exc:
        endpoint.fail(_connection_error(exc))
        raise
    if data is None:
        if connection.receiving is Receiving.CLOSED:
            endpoint.eof()
    elif not data:
        endpoint.eof()
    return data


def _receive_error(exc: OSError) -> Exception:
    try:
        syscalls.raise_receive_error(exc)
    except Exception as translated:
        return _connection_error(translated)


def _connection_error(exc: Exception) -> Exception:
    """The kernel's TLS layer passes TCP's errors through: say them the way socket code expects."""
    code = getattr(exc, "errno", None)
    if isinstance(exc, KernelTLSFailure) and code in (errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT):
        error = OSError(code, os.strerror(code))
        error.__cause__ = exc
        return error
    return exc


async def splice_from_async(endpoint: AsyncEndpoint, fd: int, count: int) -> int:
    """:func:`splice_from` on the event loop: ``fd`` is read when it is readable, the pipe is pushed into the
    socket while the transport's own queue is held (our bytes and its control records stay in order)."""
    connection = endpoint.connection
    connection.check_writable()
    loop = endpoint.loop
    if connection.sending is not Sending.KERNEL:
        while True:
            try:
                data = os.read(fd, min(count, _COPY_CHUNK))
                break
            except (BlockingIOError, InterruptedError):
                await _ready(loop, fd, writable=False)
        if data:
            await endpoint.write(data)
        return len(data)
    pipe = pipes_of(endpoint.owner)[1]
    while not pipe.held:
        try:
            if not fill(pipe, fd, count):
                return 0
        except (BlockingIOError, InterruptedError):
            await _ready(loop, fd, writable=False)
    sock_fd = endpoint.sock.fileno()
    await endpoint.hold_writes()
    moved = 0
    try:
        while pipe.held:
            try:
                n = os.splice(pipe.read_fd, sock_fd, pipe.held, flags=_SPLICE_F_MOVE | _SPLICE_F_NONBLOCK)
            except (BlockingIOError, InterruptedError):
                await _ready(loop, sock_fd, writable=True)
                continue
            except OSError as exc:
                endpoint.fail(exc)
                raise
            pipe.held -= n
            moved += n
    finally:
        endpoint.release_writes()
    return moved


class _Collector(asyncio.BufferedProtocol):
    """Stands in for a transport's protocol while the fallback reads up to ``count`` bytes for a splice; what
    happens to the connection meanwhile (its end, its loss) is passed on to the protocol it replaces."""

    def __init__(self, transport: asyncio.Transport, original: asyncio.BaseProtocol, count: int) -> None:
        self.transport = transport
        self.original = original
        self.buffer = bytearray(count)
        self.filled = 0
        self.waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buffer)[self.filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self.filled += nbytes
        self.transport.pause_reading()
        if not self.waiter.done():
            self.waiter.set_result(None)

    def eof_received(self) -> bool | None:
        if not self.waiter.done():
            self.waiter.set_result(None)
        if isinstance(self.original, (asyncio.Protocol, asyncio.BufferedProtocol)):
            return self.original.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.waiter.done():
            self.waiter.set_exception(exc or ConnectionResetError(errno.ECONNRESET, "the connection closed"))
        self.original.connection_lost(exc)


async def collect(transport: asyncio.Transport, count: int) -> bytes:
    """Fallback for :func:`splice_to_async`: up to ``count`` bytes of application data the transport decrypts in
    user space (``b""`` at the end), taken with a stand-in protocol; reading is paused again after."""
    original = transport.get_protocol()
    collector = _Collector(transport, original, count)
    transport.set_protocol(collector)
    try:
        transport.resume_reading()
        await collector.waiter
    finally:
        if transport.get_protocol() is collector:
            transport.set_protocol(original)
        transport.pause_reading()
    return bytes(collector.buffer[: collector.filled])

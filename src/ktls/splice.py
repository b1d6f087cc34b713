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
  with room for the ``TLS_GET_RECORD_TYPE`` control message (:meth:`ktls.engine.Engine.read`) then returns
  exactly that record with its type, which goes to the connection core
  (:meth:`ktls.core.connection.Connection.control_record`); its actions (a KeyUpdate's new receive key, our
  KeyUpdate in answer, the end of the read side) are carried out by the engine before the next splice. On 7.x
  a peer's KeyUpdate makes the kernel refuse further records (``EKEYEXPIRED``) and hide readability until the
  new key is set, so the new key must be installed right after that ``recvmsg``, before any wait — it is (the
  core answers with ``InstallKey``, carried out at once).
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
  most it can wait if the readable bytes are only part of a record), then restored (:func:`_splice_record`).
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

The loops (:func:`splice_to`, :func:`splice_from`) are generators over the connection's
:class:`~ktls.engine.Engine`, like its ``sendfile``: they make the calls and never wait, yielding a :class:`Wait`
(this descriptor, readable or writable) whenever a call would block. The blocking :class:`ktls.Stream` waits
with ``poll`` up to its timeout, the asyncio :class:`ktls.asyncio.KTLSTransport` with the event loop; an error of
the other descriptor comes as :class:`DescriptorFailed`, so that it does not fail the TLS connection.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import socket
import struct
import weakref
from collections.abc import Callable, Generator, Iterator

from .core.connection import Receiving, Sending
from .engine import RECORD_BUFFER, Engine, Wait
from .errors import StreamClosed
from .kernel.probe import kernel_version

__all__ = [
    "PIPE_SIZE",
    "DescriptorFailed",
    "Pipe",
    "pipes_of",
    "release",
    "splice_from",
    "splice_to",
]

#: Bytes a pipe is asked to hold (``F_SETPIPE_SZ``): 64 page slots, far more than one record needs (module
#: docstring). Unprivileged users are limited by ``/proc/sys/fs/pipe-user-pages-soft`` (16384 pages, i.e. 128
#: connections of two such pipes): past it the kernel refuses to grow a pipe and receiving copies instead.
PIPE_SIZE = 256 * 1024
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


class DescriptorFailed(Exception):
    """The other descriptor failed, not the TLS connection: the front end raises :attr:`error` as it is."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error)
        self.error = error


@contextlib.contextmanager
def failures(connection_failed: Callable[[Exception], None]) -> Iterator[None]:
    """Around a front end's splice: whose fault each error is. The other descriptor's (:class:`DescriptorFailed`)
    is raised as it is; ``BlockingIOError`` and :class:`~ktls.errors.StreamClosed` (our write side had closed:
    the caller's mistake) pass; anything else failed the TLS connection: ``connection_failed(error)``, then it
    is raised."""
    try:
        yield
    except DescriptorFailed as failed:
        raise failed.error from None
    except (BlockingIOError, StreamClosed):
        raise
    except Exception as exc:
        connection_failed(exc)
        raise


@contextlib.contextmanager
def _on_descriptor() -> Iterator[None]:
    """Calls on the other descriptor: its errors are its own (:class:`DescriptorFailed`)."""
    try:
        yield
    except (BlockingIOError, InterruptedError):
        raise
    except OSError as exc:
        raise DescriptorFailed(exc) from exc


class _ControlRecordNext(Exception):
    """``splice`` refused: the next record is not application data (module docstring)."""


def _splice_record(sock: socket.socket, pipe: Pipe, count: int) -> int:
    """One ``splice`` from a kTLS socket into an empty ``pipe``: bytes moved (0 at end of stream);
    ``BlockingIOError`` when no record has arrived. It does not wait, except on :data:`SPLICE_NONBLOCK_PEEKS`
    kernels for a blocking socket (a :class:`~ktls.Stream` with a timeout): there the kernel waits, up to
    ``SO_RCVTIMEO``, and ``TimeoutError`` says it ran out. Raises :class:`_ControlRecordNext` when a control
    record is next."""
    fd = sock.fileno()
    flags = _SPLICE_F_MOVE
    brief = SPLICE_NONBLOCK_PEEKS and not sock.getblocking()
    if not SPLICE_NONBLOCK_PEEKS:
        flags |= _SPLICE_F_NONBLOCK
    elif brief:
        # Where SPLICE_F_NONBLOCK peeks: splice only once poll says readable, with SO_RCVTIMEO at one jiffy for
        # the call, in case what is readable is only the start of a record (tls_wait_data waits for the rest).
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(0):
            raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        saved = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL_SIZE)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _BRIEF_RECEIVE_TIMEOUT)
    try:
        moved = os.splice(fd, pipe.write_fd, min(count, pipe.capacity), flags=flags)
    except BlockingIOError:
        if SPLICE_NONBLOCK_PEEKS and not brief:
            raise TimeoutError(errno.ETIMEDOUT, "timed out (receiving)") from None
        raise
    except OSError as exc:
        if exc.errno in (errno.EINVAL, _ENOTSUPP):
            raise _ControlRecordNext from None
        raise
    finally:
        if brief:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, saved)
    pipe.held += moved
    return moved


def _read(engine: Engine, count: int) -> Generator[Wait, None, bytes | None]:
    """:meth:`~ktls.engine.Engine.read`, waiting for the socket when it is non-blocking; on a blocking one (a
    :class:`~ktls.Stream` with a timeout) the kernel waited, and ``BlockingIOError`` is its timeout."""
    while True:
        try:
            return engine.read(count)
        except (BlockingIOError, InterruptedError):
            if engine.sock.getblocking():
                raise TimeoutError(errno.ETIMEDOUT, "timed out (receiving)") from None
            yield Wait(engine.sock.fileno(), writable=False)


def _drain(pipe: Pipe, fd: int) -> Generator[Wait, None, None]:
    """Move what ``pipe`` holds to ``fd`` until it is empty."""
    while pipe.held:
        try:
            with _on_descriptor():
                n = os.splice(pipe.read_fd, fd, pipe.held, flags=_SPLICE_F_MOVE | _SPLICE_F_NONBLOCK)
        except (BlockingIOError, InterruptedError):
            yield Wait(fd, writable=True)
            continue
        if n == 0:
            raise DescriptorFailed(BrokenPipeError(errno.EPIPE, "splice: the destination took nothing"))
        pipe.held -= n


def _deliver(engine: Engine, fd: int, data: bytes) -> Generator[Wait, None, int]:
    """Write ``data`` (application data read by copy) to ``fd``. What ``fd`` has not taken when it fails, or when
    the caller stops waiting, goes back to the front of the engine's plaintext: read next, never lost."""
    view = memoryview(data)
    try:
        while view:
            try:
                with _on_descriptor():
                    view = view[os.write(fd, view) :]
            except (BlockingIOError, InterruptedError):
                yield Wait(fd, writable=True)
    finally:
        if view:
            engine.plaintext[:0] = view
    return len(data)


def _kernel_splices(engine: Engine, pipe: Pipe) -> bool:
    """Whether a splice now takes the next bytes in order: the kernel receives, nothing decrypted waits in user
    space, the pipe has room for a record, and (on :data:`SPLICE_SKIPS_RX_LIST` kernels) ``recvmsg`` has left
    nothing in the kernel that a splice would pass over."""
    connection = engine.connection
    return (
        connection.receiving is Receiving.KERNEL
        and not engine.plaintext
        and pipe.roomy
        and not (SPLICE_SKIPS_RX_LIST and connection.read_by_recvmsg)
    )


def splice_to(engine: Engine, pipe: Pipe, fd: int, count: int) -> Generator[Wait, None, int]:
    """Move up to ``count`` bytes of received application data into ``fd`` through ``pipe``; returns the bytes
    moved, 0 at the end of the stream. A control record met on the way goes to the connection (read with its
    type by :meth:`~ktls.engine.Engine.read`, its actions carried out) and the splice goes on; on fallback the
    engine reads and the bytes are written to ``fd``."""
    yield from _drain(pipe, fd)  # a previous call's bytes, if it was interrupted
    sock = engine.sock
    while count > 0:
        if not _kernel_splices(engine, pipe):
            if engine.connection.receiving is Receiving.CLOSED and not engine.plaintext:
                return 0
            data = yield from _read(engine, min(count, _COPY_CHUNK))  # fallback, plaintext decrypted earlier…
        else:
            try:
                moved = _splice_record(sock, pipe, count)
            except (BlockingIOError, InterruptedError):
                yield Wait(sock.fileno(), writable=False)
                continue
            except _ControlRecordNext:
                # The record whole, with its type, to the connection (the engine reads a control record whole
                # into any size; application data beyond count waits in its plaintext).
                data = engine.read(min(count, RECORD_BUFFER))
            except OSError as exc:
                engine.receive_failed(exc)
            else:
                if not moved:
                    engine.connection.end_of_stream()
                    return 0
                if actions := engine.connection.spliced_data():
                    engine.run(actions)  # it interrupted a handshake message: the alert, then the error
                yield from _drain(pipe, fd)
                return moved
        if data is not None:  # application data (after all), or the end: b""
            return (yield from _deliver(engine, fd, data))
    return 0


def splice_from(engine: Engine, pipe: Pipe, fd: int, count: int) -> Generator[Wait, None, int]:
    """Move up to ``count`` bytes from ``fd`` into the connection through ``pipe``, for the kernel to encrypt,
    behind everything queued before; returns the bytes moved, 0 at ``fd``'s end. While the pipe is pushed into
    the socket the engine's queue is held, so nothing overtakes the spliced bytes; on fallback the bytes are read
    and written through the engine. A write side already closed raises :class:`~ktls.errors.StreamClosed` here,
    before the loop starts: the caller's mistake, not the connection's failure."""
    engine.connection.check_writable()
    if engine.hold:
        raise RuntimeError("another sendfile or splice_from is in progress on this connection")
    return _splice_from(engine, pipe, fd, count)


def _splice_from(engine: Engine, pipe: Pipe, fd: int, count: int) -> Generator[Wait, None, int]:
    sock_fd = engine.sock.fileno()
    kernel = engine.connection.sending is Sending.KERNEL
    data = b""
    while not pipe.held:
        try:
            with _on_descriptor():
                if not kernel:
                    data = os.read(fd, min(count, _COPY_CHUNK))
                    break
                room = min(count, pipe.capacity)
                if not (moved := os.splice(fd, pipe.write_fd, room, flags=_SPLICE_F_MOVE | _SPLICE_F_NONBLOCK)):
                    return 0
                pipe.held += moved
        except (BlockingIOError, InterruptedError):
            yield Wait(fd, writable=False)
    if not kernel:
        if data:
            engine.write(data)
            yield from engine.drain()
        return len(data)
    yield from engine.drain()  # what was queued before goes first
    engine.connection.check_writable()  # the write side may have closed meanwhile (close_notify just went)
    engine.hold = True
    moved = 0
    try:
        while pipe.held:
            try:
                n = os.splice(pipe.read_fd, sock_fd, pipe.held, flags=_SPLICE_F_MOVE | _SPLICE_F_NONBLOCK)
            except (BlockingIOError, InterruptedError):
                yield Wait(sock_fd, writable=True)
                continue
            pipe.held -= n
            moved += n
            engine.sent(n)  # per call, as the budget counts: may queue a KeyUpdate (it waits for the hold)
    finally:
        engine.hold = False
        if engine.queue:  # what was queued meanwhile (writes, a KeyUpdate, close_notify), also after a failure
            with contextlib.suppress(OSError):  # the next flush (or the writer callback) meets it again
                engine.flush()
    yield from engine.drain()
    return moved

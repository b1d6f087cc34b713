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
  kernel at that sequence number (``_read_deferred``). A KeyUpdate in that window is recognised by size
  and the hand-off follows the new generation.
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
* **Key-usage limits** (RFC 8446 §5.5): a TLS 1.3 stream updates its send key before the AEAD's limit on
  kernels that can rekey (:attr:`Stream.record_limit`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import select
import socket
import ssl
import time
from collections.abc import Iterator
from typing import Any, BinaryIO, Literal

from . import handoff
from .constants import MAX_PLAINTEXT, AlertLevel, ContentType, TLSVersion
from .control import (
    Action,
    ControlRecords,
    Fail,
    InstallKey,
    ReadClosed,
    Role,
    SendAlert,
    SendHandshake,
    SessionTicket,
    WriteClosed,
)
from .errors import (
    KernelTLSFailure,
    KernelTLSUnavailable,
    RaggedEOF,
    RecordError,
    StreamClosed,
)
from .handshake import Handshake, HandshakeResult
from .kernel import syscalls
from .kernel.uapi import Direction
from .keys import ConnectionKeys
from .sendbudget import SendBudget

__all__ = ["Stream", "wrap_socket"]

log = logging.getLogger("ktls")

#: Room for one whole record on kernel reads of control records (RFC 8446 §5.2 TLSInnerPlaintext bound).
_RECORD_BUFFER = MAX_PLAINTEXT + 256
#: How long close() waits to send a close_notify into a full send buffer, and for the peer's FIN after a
#: fatal alert.
_CLOSE_TIMEOUT = 2.0
_DRAIN_TIMEOUT = 0.5
_LINGER = 1.0


def wrap_socket(
    sock: socket.socket,
    context: ssl.SSLContext,
    *,
    server_side: bool = False,
    server_hostname: str | None = None,
    session: ssl.SSLSession | None = None,
    require_kernel: bool = False,
    suppress_ragged_eofs: bool = True,
) -> Stream:
    """Run a TLS handshake on the connected ``sock`` with ``context``, then hand the keys to the kernel.

    The socket's timeout applies to the handshake. Returns a :class:`Stream` that owns ``sock``. When the
    kernel cannot take over, the stream works in user space and ``fallback_reason`` says why — unless
    ``require_kernel`` is true, which raises :class:`~ktls.errors.KernelTLSUnavailable` instead (the
    handshake will have happened; the socket is closed).
    """
    capture, reason = handoff.begin(context, require_kernel=require_kernel)
    handshake = Handshake(context, server_side=server_side, server_hostname=server_hostname, session=session)
    keys: ConnectionKeys | None = None
    result: HandshakeResult | None = None
    if capture is None:
        _drive_handshake(sock, handshake)
    else:
        with capture.handshake():
            _drive_handshake(sock, handshake)
            try:
                keys, result = handoff.derive_keys(handshake, capture, server_side=server_side)
            except KernelTLSUnavailable as exc:
                if require_kernel:
                    sock.close()
                    raise
                reason = str(exc)
    stream = Stream(
        sock,
        handshake,
        keys,
        server_side=server_side,
        result=result,
        fallback_reason=reason,
        suppress_ragged_eofs=suppress_ragged_eofs,
    )
    if require_kernel and not (stream.kernel_tx and (stream.kernel_rx or stream._deferred is not None)):
        stream.close()
        raise KernelTLSUnavailable(None, stream.fallback_reason or "the kernel did not take over")
    return stream


def _recv_exactly_into_handshake(sock: socket.socket, handshake: Handshake) -> None:
    """Read the rest of one record for the handshake — and not a byte more (module docstring, step 1)."""
    data = sock.recv(handshake.bytes_needed())
    handshake.receive(data)


def _drive_handshake(sock: socket.socket, handshake: Handshake) -> None:
    try:
        while not handshake.step():
            sock.sendall(handshake.data_to_send())
            _recv_exactly_into_handshake(sock, handshake)
    except ssl.SSLError:
        # OpenSSL wrote an alert saying why; the peer deserves to see it.
        _send_quietly(sock, handshake.data_to_send())
        raise
    sock.sendall(handshake.data_to_send())


@contextlib.contextmanager
def _nonblocking_view(sock: socket.socket) -> Iterator[socket.socket]:
    """A second socket object on ``sock``'s descriptor, non-blocking, for calls that must not wait.

    CPython polls a socket that has a timeout before each call, whatever the flags, so a non-blocking
    attempt needs an object whose timeout is 0. The descriptor's ``O_NONBLOCK`` is shared: a socket with a
    timeout already has it set; a blocking socket gets it back cleared.
    """
    view = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.fileno())
    try:
        view.setblocking(False)
        yield view
    finally:
        if sock.gettimeout() is None:
            view.setblocking(True)
        view.detach()


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    if data:
        try:
            sock.sendall(data)
        except OSError:
            pass


class Stream:
    """A connected TLS stream: a socket whose records the kernel protects (or, on fallback, OpenSSL).

    Behaves like ``ssl.SSLSocket``: ``recv``/``recv_into``/``send``/``sendall``/``sendfile``/``makefile``,
    ``shutdown``/``close``, timeouts and non-blocking mode of the underlying socket, and the TLS information
    (``version()``, ``cipher()``, ``getpeercert()``, ``session``…).
    """

    def __init__(
        self,
        sock: socket.socket,
        handshake: Handshake | None,
        keys: ConnectionKeys | None,
        *,
        server_side: bool,
        result: HandshakeResult | None = None,
        fallback_reason: str | None = None,
        suppress_ragged_eofs: bool = True,
    ) -> None:
        """Use :func:`wrap_socket` or :meth:`from_keys`; this constructor is theirs."""
        self._sock = sock
        self._handshake = handshake
        self._sslobj = handshake.ssl_object if handshake is not None else None
        self._keys = keys
        self.fallback_reason = fallback_reason
        self.suppress_ragged_eofs = suppress_ragged_eofs
        self.kernel_tx = False
        self.kernel_rx = False
        self.ragged_eof = False
        self._plaintext = bytearray()  # decrypted before the hand-off, delivered first
        self._closed = False
        self._io_refs = 0
        self._userspace_unsent = bytearray()
        self._budget = SendBudget(None)
        self._read_closed = False
        self._deferred: handoff.DeferredReceive | None = None
        if keys is None or result is None:
            version = TLSVersion.TLS1_3 if self._ssl().version() == "TLSv1.3" else TLSVersion.TLS1_2
            self._control = ControlRecords(version, Role.SERVER if server_side else Role.CLIENT, None)
            return
        installed = handoff.install(sock, keys, result, server_side=server_side)
        self._installed = installed
        self._control = installed.control
        self.kernel_tx, self.kernel_rx = installed.kernel_tx, installed.kernel_rx
        self.fallback_reason = installed.fallback_reason
        self._budget = SendBudget(installed.record_limit, result.tx_seq)
        if installed.rx_deferred:
            self._deferred = handoff.DeferredReceive(keys)

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
        :class:`~ktls.errors.KernelTLSUnavailable` otherwise, and the socket is left as it was given.
        """
        suite = keys.suite
        result = HandshakeResult(suite.version, suite.openssl_name, b"", b"", tx_seq, rx_seq, tx_explicit_nonce)
        stream = cls(
            sock, None, keys, server_side=server_side, result=result, suppress_ragged_eofs=suppress_ragged_eofs
        )
        if stream._deferred is not None:
            stream._hand_off_rx(rx_seq)
        if not (stream.kernel_tx and stream.kernel_rx):
            raise KernelTLSUnavailable(None, stream.fallback_reason or "the kernel did not take both directions")
        stream._plaintext += early_data
        return stream

    def _ssl(self) -> ssl.SSLObject:
        """OpenSSL's connection object: for userspace TLS, and for what it knows about the handshake."""
        if self._sslobj is None:
            raise KernelTLSUnavailable(None, "this stream was built from keys: it has no userspace TLS")
        return self._sslobj

    def _handshake_state(self) -> Handshake:
        if self._handshake is None:
            raise KernelTLSUnavailable(None, "this stream was built from keys: it has no userspace TLS")
        return self._handshake

    def _hand_off_rx(self, rx_seq: int) -> None:
        assert self._keys is not None
        handoff.install_rx(self._sock, self._keys, rx_seq, self._installed)
        self._deferred = None
        self.kernel_rx = self._installed.kernel_rx
        self.fallback_reason = self._installed.fallback_reason

    # -- receiving --------------------------------------------------------------------------------------------------

    def recv(self, bufsize: int = 65536, flags: int = 0) -> bytes:
        """Up to ``bufsize`` bytes of application data; ``b""`` at the end of the stream."""
        if flags:
            raise ValueError("flags are not supported on a TLS stream")
        self._check_open()
        if self._plaintext:
            first = bytes(self._plaintext[:bufsize])
            del self._plaintext[:bufsize]
            return first
        if bufsize <= 0 or self._read_closed:
            return b""
        while True:
            data: bytes | None
            if self.kernel_rx:
                data = self._read_kernel(bufsize)
            elif self._deferred is not None:
                data = self._read_deferred(self._deferred, bufsize)
            else:
                data = self._read_userspace(bufsize)
            if data is not None:
                return data

    def recv_into(self, buffer: memoryview | bytearray, nbytes: int = 0, flags: int = 0) -> int:
        view = memoryview(buffer).cast("B")
        size = nbytes or len(view)
        data = self.recv(size, flags)
        view[: len(data)] = data
        return len(data)

    def read(self, len: int = 1024, buffer: bytearray | None = None) -> bytes | int:
        """``ssl.SSLSocket.read`` compatibility."""
        if buffer is not None:
            return self.recv_into(buffer, len)
        return self.recv(len)

    def _read_kernel(self, bufsize: int) -> bytes | None:
        """One ``recvmsg``; ``None`` when it was a control record (the caller reads again).

        The buffer always holds a whole record, so a control record comes back whole and typed (a smaller
        one would return it in pieces); application data beyond ``bufsize`` waits in ``_plaintext``.
        """
        try:
            record = self._recv_record(max(bufsize, _RECORD_BUFFER))
        except RecordError as exc:
            self._run(self._control.record_failed(exc))
            raise  # pragma: no cover - _run raised
        if record.content_type == ContentType.APPLICATION_DATA:
            if self._control.key_updates_since_data:
                self._control.application_data_received()
            if len(record.data) > bufsize:
                self._plaintext += record.data[bufsize:]
                return record.data[:bufsize]
            return record.data
        if record.content_type is None:
            return self._tcp_eof()
        self._run(self._control.receive_record(int(record.content_type), record.data))
        return b"" if self._read_closed else None

    def _recv_record(self, size: int) -> syscalls.Record:
        """One kernel read that does not trust ``poll()`` first.

        Linux ≥ 6.14 reports a kTLS socket unreadable while it holds a KeyUpdate record it has not returned
        yet: the read before it looked ahead, decrypted it, and marked a rekey pending, which masks
        ``POLLIN``. CPython polls a socket with a timeout *before* every call (even with ``MSG_DONTWAIT``), so
        such a read would sit out its whole timeout with the KeyUpdate waiting. With a timeout we therefore
        try the read first and wait only when it would block. Blocking (no timeout) and non-blocking
        sockets call ``recvmsg`` directly, which sees the held record.
        """
        try:
            timeout = self._sock.gettimeout()
            if not timeout:
                return syscalls.recv_record(self._sock, size)
            deadline = time.monotonic() + timeout
            poller = select.poll()
            poller.register(self._sock, select.POLLIN)
            while True:
                try:
                    with _nonblocking_view(self._sock) as view:
                        return syscalls.recv_record(view, size)
                except BlockingIOError:
                    pass
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("timed out")
                poller.poll(remaining * 1000)
        except KernelTLSFailure as exc:
            # A TCP reset (or broken pipe) is not a TLS failure: surface it as the socket error it is, so
            # ``except ConnectionResetError`` works as it does with ssl.SSLSocket.
            if isinstance(exc.__cause__, ConnectionError):
                raise exc.__cause__ from None
            raise

    def _tcp_eof(self) -> bytes:
        """TCP EOF. With a close_notify first it is the clean end; without, a ragged EOF."""
        self._read_closed = True
        if self._control.read_closed:
            return b""
        self.ragged_eof = True
        if self.suppress_ragged_eofs:
            return b""
        raise RaggedEOF()

    def _read_userspace(self, bufsize: int) -> bytes | None:
        """OpenSSL reads (fallback, or receive left in user space)."""
        try:
            return self._ssl().read(bufsize)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self._read_closed = True
            self._control.read_closed = True
            return b""
        except ssl.SSLEOFError:
            return self._tcp_eof()
        data = self._sock.recv(65536)
        if not data:
            self._handshake_state().incoming.write_eof()
        else:
            self._handshake_state().incoming.write(data)
        return None

    def _read_deferred(self, deferred: handoff.DeferredReceive, bufsize: int) -> bytes | None:
        """TLS 1.3 client between handshake and first application record (:class:`ktls.handoff.DeferredReceive`):
        OpenSSL reads, one record at a time, so that tickets reach ``session`` and the kernel can start
        exactly at the next record."""
        data = self._sock.recv(self._handshake_state().bytes_needed())
        if not data:
            return self._tcp_eof()
        record = self._handshake_state().receive(data)
        if record is None:
            return None  # the record is not whole yet
        deferred.record_read()
        try:
            plaintext = self._ssl().read(bufsize)
        except ssl.SSLWantReadError:
            outgoing = self._handshake_state().outgoing
            answered = bool(outgoing.pending)
            outgoing.read()  # never sent: the kernel owns the send key now
            if deferred.control_record(len(record) - 5, answered):
                self._run(self._control.key_update(request_peer_update=False))
            return None
        except ssl.SSLZeroReturnError:
            self._read_closed = True
            self._control.read_closed = True
            return b""
        # The first application record: everything after it is the kernel's.
        while self._ssl().pending():
            self._plaintext += self._ssl().read(self._ssl().pending())
        self._hand_off_rx(deferred.rx_seq)
        return plaintext

    # -- sending -----------------------------------------------------------------------------------------------------

    def send(self, data: bytes | bytearray | memoryview, flags: int = 0) -> int:
        """Send some of ``data``; returns how many bytes were accepted (never 0 for non-empty data)."""
        if flags:
            raise ValueError("flags are not supported on a TLS stream")
        self._check_open()
        self._control.check_writable()
        if not self.kernel_tx:
            return self._send_userspace(data)
        sent = self._sock.send(data)
        self._count_records(sent)
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
        written = self._ssl().write(data)
        self._userspace_unsent += self._handshake_state().outgoing.read()
        try:
            self._flush_userspace()
        except (BlockingIOError, TimeoutError):
            pass  # accepted: the ciphertext waits in our buffer and goes first next time
        return written

    def _flush_userspace(self) -> None:
        while self._userspace_unsent:
            sent = self._sock.send(self._userspace_unsent)
            del self._userspace_unsent[:sent]

    def sendfile(self, file: BinaryIO, offset: int = 0, count: int | None = None) -> int:
        """Send a file. With the kernel sending, this is ``os.sendfile``: the bytes go from the page cache
        through the kernel's TLS without a copy into Python. On fallback, a read + send loop."""
        self._check_open()
        self._control.check_writable()
        if self.kernel_tx:
            sent = self._sock.sendfile(file, offset, count)
            self._count_records(sent)
            return sent
        return self._sendfile_userspace(file, offset, count)

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

    @property
    def record_limit(self) -> int | None:
        """Records sent under one key before a TLS 1.3 send-key update (per cipher: ``handoff.RECORD_LIMITS``);
        ``None`` when no update is due or possible."""
        return self._budget.limit

    @record_limit.setter
    def record_limit(self, limit: int | None) -> None:
        self._budget.limit = limit

    def _count_records(self, sent: int) -> None:
        """Near the AEAD's limit (:class:`~ktls.sendbudget.SendBudget`), ask the kernel and update the key."""
        if not self._budget.sent(sent):
            return
        info = syscalls.get_crypto_info(self._sock, Direction.TX)
        if self._budget.kernel_count(info.rec_seq if info is not None else None):
            log.info("updating the send key after %d records (RFC 8446 §5.5)", self._budget.bound)
            self.key_update()

    def key_update(self, request_peer_update: bool = False) -> None:
        """Send a TLS 1.3 KeyUpdate and switch to the next send key (kernel ≥ 6.14)."""
        self._check_open()
        if not self.kernel_tx:
            raise KernelTLSUnavailable(None, "key updates need the kernel to be sending")
        self._run(self._control.key_update(request_peer_update))

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
                if action.direction is Direction.TX:
                    self._budget.rekeyed()
            elif isinstance(action, ReadClosed):
                self._read_closed = True
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
        cleared = False
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
            except KernelTLSFailure as exc:
                # A receive error (EBADMSG, EMSGSIZE, ...) stays pending on the socket (sk_err), and the
                # kernel's sendmsg reports it instead of sending: the alert telling the peer about that very
                # error would never leave. Reading SO_ERROR consumes it; then the alert goes out.
                if cleared or exc.errno is None:
                    raise
                if self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != exc.errno:
                    raise
                cleared = True

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
        actions = self._control.close_write()
        if not actions:
            return
        if self.kernel_tx:
            self._run([a for a in actions if not isinstance(a, WriteClosed)])
            return
        try:
            self._ssl().unwrap()
        except (ssl.SSLWantReadError, ssl.SSLError):
            pass
        self._userspace_unsent += self._handshake_state().outgoing.read()
        self._flush_userspace()

    def close(self) -> None:
        """Send close_notify (unless the connection failed), then release the descriptor — always."""
        if self._closed:
            return
        self._closed = True
        if self._io_refs <= 0:
            self._real_close()

    def _real_close(self) -> None:
        try:
            if self._control.error is None and not self._control.write_closed:
                self._close_notify()
            self._linger()
        except OSError:
            pass
        finally:
            self._sock.close()

    def _linger(self) -> None:
        """Half-close, then read and discard until the peer's FIN (at most ``_LINGER`` seconds).

        Closing a socket with unread data makes the kernel send a reset, and a reset makes the peer's kernel
        drop what it had not yet delivered — our last records and our close_notify. The usual culprit is a
        TLS 1.3 server's NewSessionTickets, which it writes only once it has read our Finished, so they can
        land just as we close. Waiting for the peer's FIN (as web servers' "lingering close" does) closes
        that window; a peer that never closes costs at most ``_LINGER``.
        """
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + _LINGER
        poller = select.poll()
        poller.register(self._sock, select.POLLIN | select.POLLRDHUP)
        with _nonblocking_view(self._sock) as view:  # MSG_DONTWAIT alone still waits out a timeout
            while (remaining := deadline - time.monotonic()) > 0:
                if not poller.poll(remaining * 1000):
                    return
                try:
                    if self.kernel_rx:
                        record = syscalls.recv_record(view, _RECORD_BUFFER)
                        if not record.data and record.content_type is None:
                            return  # the peer's FIN
                    elif not view.recv(_RECORD_BUFFER):
                        return
                except BlockingIOError:
                    continue
                except OSError:
                    return  # reset, or a record the kernel refuses: nothing more to wait for

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
        self._sock.settimeout(timeout)

    def gettimeout(self) -> float | None:
        return self._sock.gettimeout()

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def getblocking(self) -> bool:
        return self._sock.getblocking()

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
            return self._control.version.label
        return self._sslobj.version()

    def cipher(self) -> tuple[str, str, int] | None:
        if self._sslobj is None:
            suite = self._keys.suite if self._keys is not None else None
            return None if suite is None else (suite.openssl_name, self._control.version.label, suite.key_size * 8)
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
        return self._control.role is Role.SERVER

    @property
    def context(self) -> ssl.SSLContext | None:
        return self._sslobj.context if self._sslobj is not None else None

    def pending(self) -> int:
        return len(self._plaintext) + (0 if self.kernel_rx else self._ssl().pending())

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._sock.fileno()}"
        where = f"kernel tx={self.kernel_tx} rx={self.kernel_rx}"
        if self.fallback_reason:
            where += f", fallback: {self.fallback_reason}"
        return f"<ktls.Stream {state} {self.version()} {where}>"

"""The handshake driver, once, sans I/O: the blocking and asyncio front ends only carry out its requests.

:func:`establish` is a generator. It runs everything from the key-log capture to the keys
(:mod:`ktls.core.handoff`'s steps 1-3) around :func:`drive`, the loop that gives OpenSSL exactly the records it
waits for, and yields what it needs done on the socket — :class:`Send`, :class:`Peek`, :class:`Receive` —
receiving the bytes read in answer. Its return value (``StopIteration.value``) is an :class:`Established`:
the finished handshake and, when the kernel can take over, the keys. :func:`take_over` then gives the kernel
those keys; :func:`run` is the blocking front end's loop (the asyncio one is in :mod:`ktls.asyncio._handshake`).

Why peek: the kernel must start exactly at the record after the handshake's last, so no byte past it may
be read into user space. Every whole record that has arrived is peeked at and offered to OpenSSL
(:meth:`Handshake.offer`), then consumed; otherwise the rest of one record is read, exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import ssl
from collections.abc import Generator
from typing import TypeVar

from ..constants import TLSVersion
from ..errors import KernelTLSFailure, KernelTLSUnavailable
from ..kernel import syscalls
from ..kernel.uapi import Direction
from . import handoff
from .connection import Connection, HandOffReceive, Receiving
from .control import Role
from .handshake import Handshake, HandshakeResult
from .keys import ConnectionKeys

__all__ = [
    "Established",
    "IORequest",
    "Peek",
    "Receive",
    "Send",
    "drive",
    "establish",
    "hand_off_receive",
    "run",
    "run_handshake",
    "take_over",
    "take_over_with_keys",
]


@dataclasses.dataclass(frozen=True)
class Send:
    """Send all of ``data``. ``best_effort``: an alert on the way out of a failed handshake — send what
    the socket takes now, never wait, ignore errors."""

    data: bytes
    best_effort: bool = False


@dataclasses.dataclass(frozen=True)
class Peek:
    """Up to ``size`` bytes that have arrived, left in the socket (``MSG_PEEK``); wait until some have."""

    size: int


@dataclasses.dataclass(frozen=True)
class Receive:
    """Read at most ``size`` bytes (wait until some have arrived); ``b""`` at EOF."""

    size: int


_T = TypeVar("_T")

IORequest = Send | Peek | Receive
#: What the driver yields, what it is sent back (the bytes a Peek or Receive read; ``None`` after a Send).
Driver = Generator[IORequest, bytes | None, None]


def drive(handshake: Handshake) -> Driver:
    """The handshake's loop over any I/O: step OpenSSL, send what it wrote, feed it the next records."""
    try:
        while True:
            complete = handshake.step()
            offered = handshake.take_offered()
            while offered > 0:  # records OpenSSL took from a peek: read them out of the socket now
                data = yield Receive(offered)
                if not data:
                    raise ssl.SSLEOFError(ssl.SSL_ERROR_EOF, "the socket lost bytes it had shown")
                offered -= len(data)
            if out := handshake.data_to_send():
                yield Send(out)
            if complete:
                return
            if handshake.can_offer:
                arrived = yield Peek(Handshake.PEEK_SIZE)
                if arrived and handshake.offer(arrived):
                    continue
            handshake.receive((yield Receive(handshake.bytes_needed())) or b"")
    except ssl.SSLError:
        # OpenSSL wrote an alert saying why; the peer deserves to see it.
        if out := handshake.data_to_send():
            yield Send(out, best_effort=True)
        raise


@dataclasses.dataclass
class Established:
    """A finished handshake, and what the kernel needs to take over — or why it cannot."""

    handshake: Handshake
    keys: ConnectionKeys | None = None
    result: HandshakeResult | None = None
    fallback_reason: str | None = None


def establish(
    context: ssl.SSLContext,
    *,
    server_side: bool,
    server_hostname: str | None = None,
    session: ssl.SSLSession | None = None,
    require_kernel: bool = False,
) -> Generator[IORequest, bytes | None, Established]:
    """The handshake with this connection's secrets captured, proven and turned into keys (module docstring).

    Raises :class:`~ktls.errors.KernelTLSUnavailable` with ``require_kernel`` when the kernel cannot take
    over (before the handshake when there is no kernel TLS at all); ``ssl.SSLError`` when the handshake fails.
    Closing the generator early (a timeout) releases the key-log claim.
    """
    capture, reason = handoff.begin(context, require_kernel=require_kernel)
    with capture.handshake() if capture is not None else contextlib.nullcontext() as claim:
        handshake = Handshake(
            context,
            server_side=server_side,
            server_hostname=server_hostname,
            session=session,
            on_client_random=claim.bind if claim is not None else None,
        )
        yield from drive(handshake)
        if claim is None:
            return Established(handshake, fallback_reason=reason)
        try:
            keys, result = handoff.derive_keys(handshake, claim, server_side=server_side)
        except KernelTLSUnavailable as exc:
            if require_kernel:
                raise
            return Established(handshake, fallback_reason=str(exc))
        return Established(handshake, keys, result)


def run(sock: socket.socket, steps: Generator[IORequest, bytes | None, _T]) -> _T:
    """Carry out a driver's requests on the blocking ``sock`` (its timeout applies to each call)."""
    answer: bytes | None = None
    try:
        while True:
            request = steps.send(answer)
            answer = None
            if isinstance(request, Send):
                if request.best_effort:
                    with contextlib.suppress(OSError):
                        sock.send(request.data, socket.MSG_DONTWAIT)
                else:
                    sock.sendall(request.data)
            elif isinstance(request, Peek):
                answer = sock.recv(request.size, socket.MSG_PEEK)
            else:
                answer = sock.recv(request.size)
    except StopIteration as done:
        result: _T = done.value
        return result
    finally:
        steps.close()


def run_handshake(sock: socket.socket, handshake: Handshake) -> None:
    """Run ``handshake`` to its end on the blocking ``sock`` (no key capture: the tests' and tools' driver)."""
    run(sock, _no_result(handshake))


def _no_result(handshake: Handshake) -> Generator[IORequest, bytes | None, None]:
    yield from drive(handshake)


def take_over(
    sock: socket.socket,
    established: Established,
    *,
    expect_no_pad: bool = False,
    suppress_ragged_eofs: bool = True,
    require_kernel: bool = False,
) -> Connection:
    """Give the kernel the keys of a finished handshake (:func:`ktls.core.handoff.install`, which says what it
    may conclude) and start the :class:`~ktls.core.connection.Connection` that drives the rest. Without keys, or
    where the kernel refuses them, user space carries on and ``fallback_reason`` says why — unless
    ``require_kernel``, which raises :class:`~ktls.errors.KernelTLSUnavailable`."""
    handshake = established.handshake
    role = Role.SERVER if handshake.server_side else Role.CLIENT
    keys, result = established.keys, established.result
    if keys is None or result is None:
        version = TLSVersion.TLS1_3 if handshake.ssl_object.version() == "TLSv1.3" else TLSVersion.TLS1_2
        connection = Connection(
            version, role, fallback_reason=established.fallback_reason, suppress_ragged_eofs=suppress_ragged_eofs
        )
    else:
        installed = handoff.install(sock, keys, result, server_side=handshake.server_side, expect_no_pad=expect_no_pad)
        connection = Connection(
            result.version,
            role,
            keys=keys,
            installed=installed,
            tx_seq=result.tx_seq,
            suppress_ragged_eofs=suppress_ragged_eofs,
        )
    if require_kernel and not (connection.kernel_tx and connection.receiving in (Receiving.KERNEL, Receiving.DEFERRED)):
        raise KernelTLSUnavailable(None, connection.fallback_reason or "the kernel did not take over")
    return connection


def take_over_with_keys(
    sock: socket.socket,
    keys: ConnectionKeys,
    *,
    server_side: bool,
    tx_seq: int,
    rx_seq: int,
    tx_explicit_nonce: int | None = None,
    suppress_ragged_eofs: bool = True,
) -> Connection:
    """Bring your own keys: a handshake done elsewhere, ``keys`` with the sequence numbers of the next record
    each way. Both directions must go to the kernel (there is no userspace TLS to fall back to): raises
    :class:`~ktls.errors.KernelTLSUnavailable` otherwise."""
    suite = keys.suite
    result = HandshakeResult(suite.version, suite.openssl_name, b"", b"", tx_seq, rx_seq, tx_explicit_nonce)
    installed = handoff.install(sock, keys, result, server_side=server_side, defer_client_rx=False)
    if not (installed.kernel_tx and installed.kernel_rx):
        raise KernelTLSUnavailable(None, installed.fallback_reason or "the kernel did not take both directions")
    role = Role.SERVER if server_side else Role.CLIENT
    return Connection(
        suite.version, role, keys=keys, installed=installed, tx_seq=tx_seq, suppress_ragged_eofs=suppress_ragged_eofs
    )


def resume_receive(sock: socket.socket, connection: Connection) -> None:
    """Carry out :class:`~ktls.core.control.ResumeReceive` for either front end: the current receive key
    again, at the kernel's own next receive sequence number."""
    current = syscalls.get_crypto_info(sock, Direction.RX)
    if current is None:
        raise KernelTLSFailure(None, "the kernel does not say its receive sequence number")
    syscalls.set_crypto_info(sock, Direction.RX, connection.current_receive_key(current.rec_seq))


def hand_off_receive(sock: socket.socket, connection: Connection, action: HandOffReceive) -> None:
    """Carry out :class:`~ktls.core.connection.HandOffReceive` (the end of the deferred window) for either front
    end: the receive key to the kernel, and what the kernel said back to the connection."""
    if action.info is None:
        return  # unproven: the connection already stays in user space
    refused, no_pad = handoff.give_receive_key(sock, action.info, connection.expect_no_pad)
    connection.receive_handed_off(refused, no_pad=no_pad)

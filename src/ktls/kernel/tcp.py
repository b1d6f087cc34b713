"""The plain TCP socket calls a kernel TLS connection also needs: the kernel's own timeouts, and how much of what
we sent the peer has not acknowledged yet."""

from __future__ import annotations

import fcntl
import socket
import struct
import sys

__all__ = ["set_timeouts", "unacknowledged"]

#: ``include/uapi/asm-generic/ioctls.h``: ``#define TIOCOUTQ 0x5411`` (``SIOCOUTQ`` on a TCP socket: bytes in its
#: send queue not yet acknowledged by the peer).
SIOCOUTQ = 0x5411
#: ``struct __kernel_old_timeval { __kernel_long_t tv_sec; __kernel_long_t tv_usec; }`` (``SO_RCVTIMEO_OLD``).
_TIMEVAL = struct.Struct("@ll")


def set_timeouts(sock: socket.socket, timeout: float | None) -> None:
    """Make the kernel wait at most ``timeout`` seconds inside each blocking ``recv``/``send`` on ``sock``
    (``SO_RCVTIMEO``/``SO_SNDTIMEO``; ``None`` or 0: no limit), after which the call fails with ``EAGAIN``. A
    timeout too small for the struct's microseconds still waits one microsecond: it must not turn into none."""
    waiting = timeout or 0.0
    seconds, microseconds = int(waiting), round((waiting - int(waiting)) * 1e6)
    if microseconds >= 1_000_000:
        seconds, microseconds = seconds + 1, 0
    if waiting and not (seconds or microseconds):
        microseconds = 1
    value = _TIMEVAL.pack(seconds, microseconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


def unacknowledged(sock: socket.socket) -> int:
    """Bytes queued on ``sock`` that the peer has not acknowledged yet (``SIOCOUTQ``); 0 when it cannot be told."""
    try:
        return int.from_bytes(fcntl.ioctl(sock.fileno(), SIOCOUTQ, bytes(4)), sys.byteorder)
    except OSError:
        return 0

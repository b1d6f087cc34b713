"""The system calls of kernel TLS, each with its errors translated in one place.

Theory of operation (see ``Documentation/networking/tls.rst`` in the kernel):

1. ``setsockopt(SOL_TCP, TCP_ULP, "tls")`` on a *connected* TCP socket attaches the TLS upper-layer
   protocol. Nothing changes on the wire yet.
2. ``setsockopt(SOL_TLS, TLS_TX, crypto_info)`` makes every later ``send``/``sendfile`` go out as encrypted
   records; ``TLS_RX`` makes the kernel parse and decrypt incoming records, starting at the socket's
   current read position — so the TLS library must not have read past its last handshake record.
3. Records of another content type than application data are sent with ``sendmsg`` and a
   ``TLS_SET_RECORD_TYPE`` control message. Received non-data records are only returned by ``recvmsg``
   with room for a ``TLS_GET_RECORD_TYPE`` control message; a plain ``recv`` fails with ``EIO`` when one is
   next. One read never returns bytes of two records of different types.
4. Setting ``TLS_TX``/``TLS_RX`` again replaces the key (TLS 1.3 KeyUpdate) on Linux ≥ 6.14; older kernels
   answer ``EBUSY``. After receiving a KeyUpdate, Linux ≥ 6.14 returns ``EKEYEXPIRED`` until the new RX key
   is set.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import sys
from collections.abc import Iterator
from typing import NamedTuple, NoReturn

from ..constants import ContentType
from ..errors import (
    CipherUnavailable,
    ControlRecordPending,
    KernelTLSConfigError,
    KernelTLSFailure,
    KTLSError,
    OptionUnavailable,
    RecordAuthenticationError,
    RecordHeaderError,
    RecordOverflowError,
    RekeyPending,
    RekeyUnsupported,
    ULPUnavailable,
)
from .uapi import (
    CIPHERS,
    SOL_TLS,
    TCP_ULP,
    TLS_GET_RECORD_TYPE,
    TLS_RX_EXPECT_NO_PAD,
    TLS_SET_RECORD_TYPE,
    TLS_TX_MAX_PAYLOAD_LEN,
    TLS_TX_ZEROCOPY_RO,
    CipherType,
    CryptoInfo,
    Direction,
)

__all__ = [
    "APPLICATION_DATA_CMSG",
    "RECORD_TYPE_CMSG_SPACE",
    "Record",
    "get_crypto_info",
    "get_rx_expect_no_pad",
    "get_tx_max_payload_len",
    "get_ulp",
    "raise_receive_error",
    "record_type",
    "recv_record",
    "recv_record_into",
    "send_record",
    "set_crypto_info",
    "set_rx_expect_no_pad",
    "set_tx_max_payload_len",
    "set_tx_zerocopy_ro",
    "setup_ulp",
]

#: Room for two ``TLS_GET_RECORD_TYPE`` control messages (one byte of payload each). The kernel writes one per
#: ``recvmsg``, except before Linux 5.19: there ``process_rx_list`` (``net/tls/tls_sw.c``) puts the type of the
#: rest of a record an earlier ``recvmsg`` left decrypted (``rx_list``) without telling the caller it did so for
#: application data, and when the same ``recvmsg`` goes on into the next record (of the same type: the kernel
#: checks) it puts the type again. With room for one that second message is cut (``MSG_CTRUNC``) and a sound
#: read looked broken (seen on 5.10.262: a ``recv`` smaller than the records, then a larger one). 5.19's rework
#: ("tls: rx: factor out writing ContentType to cmsg", 06554f4ffc25) writes it once.
_CMSG_SPACE = socket.CMSG_SPACE(1) * 2
#: Room for the record-type control message: what a hot loop passes to ``recvmsg`` itself.
RECORD_TYPE_CMSG_SPACE = _CMSG_SPACE
#: The control message of an application-data read, as ``recvmsg`` returns it: a hot loop compares the
#: first ancillary item with this (one tuple comparison) and calls :func:`record_type` for anything else.
APPLICATION_DATA_CMSG = (SOL_TLS, TLS_GET_RECORD_TYPE, bytes([ContentType.APPLICATION_DATA]))
#: ``msg_flags`` bits as plain ints: ``socket.MSG_*`` are ``IntFlag`` members, and ``flags & socket.MSG_CTRUNC``
#: goes through ``enum``'s machinery (measured: ~0.6 µs against ~0.01 µs, on every read).
MSG_CTRUNC = int(socket.MSG_CTRUNC)
MSG_EOR = int(socket.MSG_EOR)
#: ``struct tls_crypto_info``: version and cipher type, two ``__u16``.
_INFO_HEADER_SIZE = 4


class Record(NamedTuple):
    """What one ``recvmsg`` on a kTLS RX socket returned."""

    #: The record's content type; ``None`` when the kernel attached none: end of stream (``data == b""``),
    #: or kernel RX is not configured on this socket (the bytes are raw TCP).
    content_type: ContentType | int | None
    data: bytes
    #: ``MSG_EOR``: the kernel says this read ended a record (set for non-data records read whole).
    end_of_record: bool


def _raise_translated(
    exc: OSError, operation: str, table: dict[int, tuple[type[KTLSError], str]], default: type[KTLSError]
) -> NoReturn:
    """Raise the ktls exception ``table`` names for ``exc.errno`` (chained), or ``exc`` itself when it is not
    kernel TLS's: non-blocking, interrupted and timed-out calls belong to the caller's I/O machinery, and
    TCP's own failures (``ConnectionResetError``, ``BrokenPipeError``…) reach the caller as any socket's."""
    passes = (KTLSError, BlockingIOError, InterruptedError, TimeoutError, ConnectionError)
    if isinstance(exc, passes) or exc.errno is None:
        raise exc
    cls, what = table.get(exc.errno, (default, f"{operation} failed"))
    raise cls(exc.errno, what) from exc


@contextlib.contextmanager
def _translate_errors(
    operation: str, table: dict[int, tuple[type[KTLSError], str]], default: type[KTLSError]
) -> Iterator[None]:
    """Turn an ``OSError`` from ``operation`` into the ktls exception ``table`` names for its errno."""
    try:
        yield
    except OSError as exc:
        _raise_translated(exc, operation, table, default)


def setup_ulp(sock: socket.socket) -> None:
    """Attach the kernel's ``tls`` upper-layer protocol to a connected TCP socket.

    Raises :class:`~ktls.errors.ULPUnavailable` when the kernel has no kTLS (built without ``CONFIG_TLS``,
    or the ``tls`` module cannot be loaded).
    """
    try:
        sock.setsockopt(socket.SOL_TCP, TCP_ULP, b"tls")
    except OSError as exc:  # (the messages are built only here: this runs once per connection)
        _raise_translated(
            exc,
            "setsockopt(TCP_ULP, 'tls')",
            {
                errno.ENOENT: (
                    ULPUnavailable,
                    "this kernel has no TLS upper-layer protocol: it was built without CONFIG_TLS, "
                    "or the 'tls' module is not loaded and cannot be",
                ),
                errno.ENOTCONN: (KernelTLSConfigError, "the TLS ULP needs a connected TCP socket"),
                errno.EEXIST: (KernelTLSConfigError, "an upper-layer protocol is already attached to this socket"),
                errno.ENOPROTOOPT: (ULPUnavailable, "this kernel has no TCP upper-layer protocols (TCP_ULP)"),
            },
            KernelTLSConfigError,
        )


def get_ulp(sock: socket.socket) -> str:
    """The name of the upper-layer protocol attached to ``sock`` (``""`` when none)."""
    raw = sock.getsockopt(socket.SOL_TCP, TCP_ULP, 16)
    return raw.split(b"\0", 1)[0].decode("ascii")


def set_crypto_info(sock: socket.socket, direction: Direction, info: CryptoInfo) -> None:
    """Give the kernel the key for one direction (``setsockopt(SOL_TLS, TLS_TX/TLS_RX)``).

    A second call for the same direction is a TLS 1.3 rekey (Linux ≥ 6.14).
    """
    try:
        sock.setsockopt(SOL_TLS, int(direction), info.pack())
    except OSError as exc:  # (the messages are built only here: this runs once or twice per connection)
        what = f"{info.cipher.name} for {info.version.label} {direction.name}"
        _raise_translated(
            exc,
            f"setsockopt(SOL_TLS, TLS_{direction.name})",
            {
                errno.ENOENT: (CipherUnavailable, f"this kernel cannot load the crypto algorithm of {what}"),
                errno.EINVAL: (CipherUnavailable, f"this kernel does not accept {what}"),
                errno.EBUSY: (
                    RekeyUnsupported,
                    f"this kernel cannot replace the {direction.name} key (TLS 1.3 rekey needs Linux 6.14 or later)",
                ),
                errno.ENOPROTOOPT: (ULPUnavailable, "the TLS ULP is not attached to this socket (call setup_ulp)"),
                errno.ENOTCONN: (KernelTLSConfigError, "kernel TLS needs a connected TCP socket"),
                errno.EEXIST: (KernelTLSConfigError, f"{direction.name} is already configured on this socket"),
            },
            KernelTLSConfigError,
        )


def get_crypto_info(sock: socket.socket, direction: Direction) -> CryptoInfo | None:
    """Read back the kernel's crypto info for one direction, with its current sequence number and (TLS 1.2
    GCM/CCM) next explicit nonce; ``None`` when that direction is not configured, or when the kernel cannot
    read this cipher back (before Linux 5.16 only AES-GCM could be: AES-CCM-128 and ChaCha20-Poly1305 give
    ``EINVAL``, "net/tls: getsockopt supports complete algorithm list").

    The kernel wants the exact size of the cipher's struct (``EINVAL`` otherwise), so the 4-byte
    ``struct tls_crypto_info`` header is read first to learn the cipher.
    """
    with _translate_errors(
        f"getsockopt(SOL_TLS, TLS_{direction.name})",
        {errno.ENOPROTOOPT: (ULPUnavailable, "the TLS ULP is not attached to this socket")},
        KernelTLSFailure,
    ):
        try:
            header = sock.getsockopt(SOL_TLS, int(direction), _INFO_HEADER_SIZE)
        except OSError as exc:
            if exc.errno == errno.EBUSY:  # "crypto info not set yet" (net/tls/tls_main.c)
                return None
            raise
        cipher_id = int.from_bytes(header[2:4], sys.byteorder)
        if len(header) < _INFO_HEADER_SIZE or cipher_id == 0:
            return None
        try:
            raw = sock.getsockopt(SOL_TLS, int(direction), CIPHERS[CipherType(cipher_id)].struct_size)
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # the header was readable, so the size is right: an older kernel
                return None
            raise
    return CryptoInfo.unpack(raw)


_RECORD_IO_ERRORS: dict[int, tuple[type[KTLSError], str]] = {
    errno.EBADMSG: (
        RecordAuthenticationError,
        "a received TLS record failed authentication (tampered, truncated, or wrong key/sequence number)",
    ),
    errno.EMSGSIZE: (RecordOverflowError, "a received TLS record is larger than TLS allows"),
    errno.EINVAL: (RecordHeaderError, "a received TLS record header is malformed (wrong version or length)"),
    errno.EKEYEXPIRED: (
        RekeyPending,
        "the peer updated its keys (TLS 1.3 KeyUpdate); the kernel waits for the new receive key",
    ),
    errno.EIO: (
        ControlRecordPending,
        "a non-application record is next and the read had no room for its content type",
    ),
}


#: Record types by the cmsg byte, without building an enum per read.
_CONTENT_TYPES: dict[int, ContentType | int] = {**{i: i for i in range(256)}, **{t.value: t for t in ContentType}}


def record_type(ancdata: list[tuple[int, int, bytes]], msg_flags: int) -> ContentType | int | None:
    """The record type of a ``recvmsg`` on a kTLS socket (``None``: no type — end of stream)."""
    if msg_flags & MSG_CTRUNC:
        raise KernelTLSFailure(None, "the record type control message was truncated")
    for level, kind, data in ancdata:
        if level == SOL_TLS and kind == TLS_GET_RECORD_TYPE and len(data) == 1:
            return _CONTENT_TYPES[data[0]]
    return None


# recv_record and recv_record_into are the per-read hot path: plain try/except, no context manager.


def raise_receive_error(exc: OSError) -> NoReturn:
    """Raise what a failed ``recvmsg`` on a kTLS socket means (for loops that call ``recvmsg`` themselves)."""
    _raise_translated(exc, "recvmsg", _RECORD_IO_ERRORS, KernelTLSFailure)


def recv_record(sock: socket.socket, bufsize: int, flags: int = 0) -> Record:
    """Receive up to ``bufsize`` bytes of one record with its content type (``recvmsg`` + cmsg)."""
    try:
        data, ancdata, msg_flags, _ = sock.recvmsg(bufsize, _CMSG_SPACE, flags)
    except OSError as exc:
        _raise_translated(exc, "recvmsg", _RECORD_IO_ERRORS, KernelTLSFailure)
    return Record(record_type(ancdata, msg_flags), data, bool(msg_flags & MSG_EOR))


def recv_record_into(
    sock: socket.socket, buffer: memoryview | bytearray, flags: int = 0
) -> tuple[ContentType | int | None, int, bool]:
    """Like :func:`recv_record`, into ``buffer``: returns (content type, bytes read, end of record)."""
    try:
        nbytes, ancdata, msg_flags, _ = sock.recvmsg_into([buffer], _CMSG_SPACE, flags)
    except OSError as exc:
        _raise_translated(exc, "recvmsg", _RECORD_IO_ERRORS, KernelTLSFailure)
    return record_type(ancdata, msg_flags), nbytes, bool(msg_flags & MSG_EOR)


def send_record(sock: socket.socket, content_type: ContentType | int, data: bytes, flags: int = 0) -> int:
    """Send ``data`` as records of ``content_type`` (``sendmsg`` + ``TLS_SET_RECORD_TYPE``).

    Application data can go through plain ``send``; this is for alerts and handshake messages (KeyUpdate).
    Returns the number of bytes accepted, like ``send``.

    A receive error (``EBADMSG``, ``EMSGSIZE``…) stays pending on the socket (``sk_err``), and the kernel's
    ``sendmsg`` reports it instead of sending (``net/tls/tls_sw.c``: the send loop of ``tls_sw_sendmsg``
    starts with ``if (sk->sk_err) … goto send_end``): the alert telling the peer about that very error would
    never leave. So when ``sendmsg`` fails with the error ``SO_ERROR`` holds, reading it has consumed it, and
    the record is sent once more.
    """
    cmsg = [(SOL_TLS, TLS_SET_RECORD_TYPE, bytes([int(content_type)]))]
    with _translate_errors(
        "sendmsg",
        {errno.EINVAL: (KernelTLSConfigError, "the kernel refused the record (is TLS_TX configured?)")},
        KernelTLSFailure,
    ):
        try:
            return sock.sendmsg([data], cmsg, flags)
        except (BlockingIOError, InterruptedError, ConnectionError):
            raise
        except OSError as exc:
            if exc.errno is None or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != exc.errno:
                raise
        return sock.sendmsg([data], cmsg, flags)


def _set_option(sock: socket.socket, option: int, name: str, value: int | bytes) -> None:
    shown = int.from_bytes(value, sys.byteorder) if isinstance(value, bytes) else value
    with _translate_errors(
        f"setsockopt(SOL_TLS, {name})",
        {
            errno.ENOPROTOOPT: (OptionUnavailable, f"this kernel has no {name}"),
            errno.EINVAL: (OptionUnavailable, f"the kernel refuses {name}={shown} on this socket"),
            errno.EOPNOTSUPP: (OptionUnavailable, f"{name} is not supported on this socket"),
        },
        KernelTLSConfigError,
    ):
        sock.setsockopt(SOL_TLS, option, value)


def _get_option(sock: socket.socket, option: int, name: str) -> int:
    with _translate_errors(
        f"getsockopt(SOL_TLS, {name})",
        {
            errno.ENOPROTOOPT: (OptionUnavailable, f"this kernel has no {name}"),
            errno.EINVAL: (OptionUnavailable, f"{name} cannot be read on this socket"),
        },
        KernelTLSConfigError,
    ):
        return sock.getsockopt(SOL_TLS, option)


def set_rx_expect_no_pad(sock: socket.socket, enabled: bool = True) -> None:
    """TLS 1.3 RX, Linux ≥ 6.0: promise that the peer does not pad records, so the kernel decrypts straight
    into the caller's buffer. A padded record still works but costs a retry (``TlsDecryptRetry``); use only
    with peers known not to pad. Must be set after ``TLS_RX``."""
    _set_option(sock, TLS_RX_EXPECT_NO_PAD, "TLS_RX_EXPECT_NO_PAD", int(enabled))


def get_rx_expect_no_pad(sock: socket.socket) -> bool:
    return bool(_get_option(sock, TLS_RX_EXPECT_NO_PAD, "TLS_RX_EXPECT_NO_PAD"))


def set_tx_max_payload_len(sock: socket.socket, length: int) -> None:
    """Cap the plaintext per record the kernel sends (RFC 8449 ``record_size_limit``, late-2025 kernels).

    The option is a ``__u16``; for TLS 1.3 pass the record size limit minus one (the content type byte).
    """
    _set_option(sock, TLS_TX_MAX_PAYLOAD_LEN, "TLS_TX_MAX_PAYLOAD_LEN", struct.pack("=H", length))


def get_tx_max_payload_len(sock: socket.socket) -> int:
    with _translate_errors(
        "getsockopt(SOL_TLS, TLS_TX_MAX_PAYLOAD_LEN)",
        {errno.ENOPROTOOPT: (OptionUnavailable, "this kernel has no TLS_TX_MAX_PAYLOAD_LEN")},
        KernelTLSConfigError,
    ):
        raw = sock.getsockopt(SOL_TLS, TLS_TX_MAX_PAYLOAD_LEN, 2)
    value: int = struct.unpack("=H", raw)[0]
    return value


def set_tx_zerocopy_ro(sock: socket.socket, enabled: bool = True) -> None:
    """Let ``sendfile`` encrypt straight from the page cache (Linux ≥ 5.19; only device offload uses it).
    The file must not change while it is being sent."""
    _set_option(sock, TLS_TX_ZEROCOPY_RO, "TLS_TX_ZEROCOPY_RO", int(enabled))

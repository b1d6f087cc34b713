"""The exceptions ktls raises, split by whose fault they are (as h11 splits them).

* **The peer's** (:class:`TLSProtocolError`, with the ``alert`` that was sent or received for it):
  :class:`PeerMisbehaved` — it broke a rule and we sent it the fatal ``alert``, whether our parser or the
  kernel found it (:class:`RecordError` and its kinds carry the kernel's ``errno``: a record that failed
  authentication, was too long, or had a malformed header); :class:`AlertReceived` — it sent one;
  :class:`RaggedEOF` — its TCP stream ended without close_notify.
* **The kernel cannot** (:class:`KernelTLSUnavailable`): no ``tls`` ULP, a cipher or TLS version the kernel
  does not accept, a rekey it cannot do, an optional socket option it does not know. These are the reasons
  to fall back to userspace TLS; nothing is broken.
* **The kernel failed** (:class:`KernelTLSFailure`): the socket was in the wrong state for a setting, a
  read had no room for a record type, a rekey is pending — a bug on our side or an unexpected kernel.
* **The caller's misuse** (:class:`StreamClosed`: a write after close_notify — never a silent 0;
  ``ValueError`` for arguments).

TCP's own errors (``ConnectionResetError``, ``BrokenPipeError``, ``TimeoutError``, ``ENOTCONN``) pass through
untouched, as with any socket. All of these are :class:`OSError` subclasses that keep the kernel's ``errno``,
so code that already handles socket errors keeps working. Messages say what happened in words; they never
contain key material.
"""

from __future__ import annotations

import errno
import os

from .constants import AlertDescription

__all__ = [
    "AlertReceived",
    "CipherUnavailable",
    "ControlRecordPending",
    "KTLSError",
    "KernelTLSConfigError",
    "KernelTLSFailure",
    "KernelTLSUnavailable",
    "OptionUnavailable",
    "PeerMisbehaved",
    "RaggedEOF",
    "RecordAuthenticationError",
    "RecordError",
    "RecordHeaderError",
    "RecordOverflowError",
    "RekeyPending",
    "RekeyUnsupported",
    "StreamClosed",
    "TLSProtocolError",
    "ULPUnavailable",
]


class KTLSError(OSError):
    """Root of every error ktls raises about the kernel's TLS."""

    def __init__(self, err: int | None, message: str) -> None:
        if err is None:
            super().__init__(message)
        else:
            super().__init__(err, message)
        self.message = message

    def __str__(self) -> str:
        if self.errno is None:
            return self.message
        name = errno.errorcode.get(self.errno, str(self.errno))
        return f"{self.message} [{name}: {os.strerror(self.errno)}]"


class KernelTLSUnavailable(KTLSError):
    """This kernel cannot do kernel TLS for this connection; userspace TLS can still carry it."""


class ULPUnavailable(KernelTLSUnavailable):
    """The ``tls`` upper-layer protocol is missing: the kernel was built without ``CONFIG_TLS`` or the
    ``tls`` module cannot be loaded (``setsockopt(TCP_ULP, "tls")`` → ``ENOENT``)."""


class CipherUnavailable(KernelTLSUnavailable):
    """The kernel does not accept this cipher for this TLS version: its crypto algorithm is not built or
    not loadable (``ENOENT``), or the kernel does not know the cipher/version pair (``EINVAL``)."""


class RekeyUnsupported(KernelTLSUnavailable):
    """The kernel cannot replace a key already set (TLS 1.3 KeyUpdate needs Linux ≥ 6.14; older → ``EBUSY``)."""


class OptionUnavailable(KernelTLSUnavailable):
    """An optional kTLS socket option this kernel does not have (``ENOPROTOOPT``) or refuses here."""


class KernelTLSFailure(KTLSError):
    """A real failure of kernel TLS on this connection (not a missing feature)."""


class KernelTLSConfigError(KernelTLSFailure):
    """Setting up kernel TLS failed for a reason other than a missing feature (e.g. socket not connected)."""


class ControlRecordPending(KernelTLSFailure):
    """A non-application record is next and the read had no room for its content type (``EIO``).

    Reads on a kTLS RX socket must use ``recvmsg`` with a control buffer (see ``ktls.kernel.recv_record``).
    """


class RekeyPending(KernelTLSFailure):
    """The peer sent a TLS 1.3 KeyUpdate; the kernel holds further records until a new RX key is set
    (``EKEYEXPIRED``, Linux ≥ 6.14)."""


class TLSProtocolError(KTLSError):
    """The TLS conversation itself broke. ``alert`` is the alert that was sent or received for it."""

    alert: AlertDescription = AlertDescription.internal_error

    def __init__(self, message: str, alert: AlertDescription | None = None) -> None:
        super().__init__(None, message)
        if alert is not None:
            self.alert = alert


class PeerMisbehaved(TLSProtocolError):
    """The peer broke a rule of the protocol; we sent it the fatal ``alert`` and closed the connection."""


class RecordError(PeerMisbehaved):
    """A received record broke the record layer's rules — found by the kernel (``errno`` says how it refused
    it) or by our parser (``errno`` ``None``). ``alert`` is what the peer is told (RFC 8446 §6.2)."""

    alert: AlertDescription = AlertDescription.internal_error

    def __init__(self, err: int | None, message: str) -> None:
        KTLSError.__init__(self, err, message)


class RecordAuthenticationError(RecordError):
    """A received record failed AEAD authentication (``EBADMSG``): tampered, truncated, or wrong keys."""

    alert = AlertDescription.bad_record_mac


class RecordOverflowError(RecordError):
    """A received record is longer than TLS allows for its kind (the kernel: ``EMSGSIZE``; RFC 8446 §5.1-5.2,
    RFC 5246 §6.2.3)."""

    alert = AlertDescription.record_overflow


class RecordHeaderError(RecordError):
    """A received record header is malformed: wrong legacy version or impossible length (``EINVAL``)."""

    alert = AlertDescription.decode_error


class AlertReceived(TLSProtocolError):
    """The peer sent a fatal alert (``alert``); the connection is over."""

    def __init__(self, alert: AlertDescription | int) -> None:
        try:
            description = AlertDescription(alert)
            name = description.name
        except ValueError:
            description, name = AlertDescription.internal_error, f"unknown alert {alert}"
        super().__init__(f"the peer sent a fatal alert: {name}", description)
        self.alert_code = int(alert)


class RaggedEOF(TLSProtocolError):
    """The TCP connection ended without a close_notify: the data may have been truncated by an attacker
    (like :class:`ssl.SSLEOFError`)."""

    def __init__(self) -> None:
        super().__init__("the connection closed without a TLS close_notify (possible truncation)")


class StreamClosed(KTLSError):
    """The stream's write side is closed (close_notify sent, or the connection failed); nothing was sent."""

    def __init__(self, message: str = "the TLS stream is closed for writing") -> None:
        super().__init__(errno.EPIPE, message)

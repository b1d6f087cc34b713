"""What to do with the records the kernel hands back: the control-record state machine, sans I/O.

Once the kernel decrypts, application data goes straight to the application; every other record comes back
from ``recvmsg`` with its content type (see :mod:`ktls.kernel.syscalls`) and lands here. This class knows
nothing about sockets: it is fed ``(content_type, payload)`` and answers with a list of *actions* for the
I/O layer (the blocking :class:`~ktls.stream.Stream` and the asyncio transport both pump it) to carry out in
order — send an alert, send a handshake message, install a new key, note the end of the stream, fail.

The rules, each where it is enforced below:

* Alerts (RFC 8446 §6, RFC 5246 §7.2): close_notify ends the read side; in TLS 1.2 it must also be answered
  with our own close_notify and the connection closed. Fatal alerts end the connection with
  :class:`~ktls.errors.AlertReceived`. TLS 1.2 warnings are ignored; in TLS 1.3 every alert but
  close_notify and user_canceled is fatal whatever its level. An empty alert record is an
  ``unexpected_message`` (RFC 8446 §5.1, as OpenSSL answers it); one that is not exactly two bytes (one byte,
  two alerts coalesced) is a ``decode_error``.
* Handshake records: never empty, also mid-message (``unexpected_message``, RFC 8446 §5.1); a message may
  span records, but in TLS 1.3 no other record type may come between its fragments (``unexpected_message``,
  RFC 8446 §5.1; TLS 1.2 allows interleaving, RFC 5246 §6.2.1).
* TLS 1.3 post-handshake messages (RFC 8446 §4.6): NewSessionTicket is only valid toward a client.
  KeyUpdate must be alone in its record (§5.1: handshake messages must not span key changes; the kernel
  also only recognises a KeyUpdate that starts a record), carry one byte of 0 or 1, and makes us install
  the next receive key — and, if the peer asked, send our own KeyUpdate and then install the next send key.
  A kernel that cannot rekey (Linux < 6.14) must stop right here with a clear error: it has already
  decrypted the KeyUpdate and would fail every later record with an opaque ``EBADMSG``.
* TLS 1.2 renegotiation (RFC 5246 §7.4.1.1, RFC 5746): a HelloRequest (to a client) or ClientHello (to a
  server) is refused with a ``no_renegotiation`` warning and the connection stays usable.
* ChangeCipherSpec after the handshake, unknown content types, handshake messages that do not belong here:
  fatal ``unexpected_message``.
* Errors the kernel reports on receive map to the alert they deserve (``EBADMSG`` → ``bad_record_mac``,
  ``EMSGSIZE`` → ``record_overflow``), see :meth:`ControlRecords.record_failed`.

After any failure the state is sticky: every later call fails with the same error.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable
from typing import Union

from ..constants import AlertDescription, AlertLevel, ContentType, HandshakeType, TLSVersion
from ..errors import (
    AlertReceived,
    KTLSError,
    PeerMisbehaved,
    RecordError,
    RekeyUnsupported,
    StreamClosed,
)
from ..kernel.uapi import CryptoInfo, Direction

__all__ = [
    "Action",
    "ControlRecords",
    "Fail",
    "InstallKey",
    "ReadClosed",
    "ResumeReceive",
    "Role",
    "SendAlert",
    "SendHandshake",
    "SessionTicket",
    "WriteClosed",
    "key_update_message",
]

log = logging.getLogger("ktls")

#: KeyUpdates accepted in a row with no application data between them. Each costs two setsockopt calls and,
#: when requested, a KeyUpdate of ours: a peer sending nothing else is flooding us (RFC 8446 sets no limit;
#: this mirrors the caps TLS stacks apply to post-handshake messages).
MAX_KEY_UPDATES_WITHOUT_DATA = 32
#: Warning alerts (TLS 1.2's; TLS 1.3's user_canceled) accepted in a row with no application data between
#: them; the next is fatal (unexpected_message). RFC 5246 sets no limit; OpenSSL's record layer stops at the same count
#: (``MAX_WARN_ALERT_COUNT`` = 5, "too many warn alerts"): a peer sending nothing else is flooding us.
MAX_WARNING_ALERTS_WITHOUT_DATA = 5
#: Largest post-handshake message we buffer across records. NewSessionTicket is the only large one: its
#: ticket is at most 2^16-1 bytes plus a few fields (RFC 8446 §4.6.1).
MAX_HANDSHAKE_MESSAGE = 2**16 + 1024


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


@dataclasses.dataclass(frozen=True)
class SendAlert:
    level: AlertLevel
    description: AlertDescription

    @property
    def payload(self) -> bytes:
        return bytes((self.level, self.description))


@dataclasses.dataclass(frozen=True)
class SendHandshake:
    message: bytes


@dataclasses.dataclass(frozen=True)
class InstallKey:
    direction: Direction
    info: CryptoInfo


@dataclasses.dataclass(frozen=True)
class ResumeReceive:
    """Give the kernel the *current* receive key again, at its own next sequence number.

    Linux ≥ 6.14 stops receiving after any handshake record whose first byte is 24 (KeyUpdate) until a new
    receive key is set (``net/tls/tls_sw.c``: ``tls_check_pending_rekey`` sets ``key_update_pending``, and
    ``tls_rx_rec_wait`` then returns ``EKEYEXPIRED``). When that record is only the start of a KeyUpdate split
    across records (RFC 8446 §5.1 allows it), or a fragment of another message that happens to start with that
    byte, the rest is still under the current key: setting it again (a TLS 1.3 rekey to the same key) lets the
    kernel read on. The I/O layer asks the kernel its receive sequence number (``getsockopt(TLS_RX)``) and
    installs :meth:`ktls.core.connection.Connection.current_receive_key` at it.
    """


@dataclasses.dataclass(frozen=True)
class ReadClosed:
    """The peer's close_notify arrived: the read side is at end of stream."""


@dataclasses.dataclass(frozen=True)
class WriteClosed:
    """Our write side is now closed (TLS 1.2: after answering the peer's close_notify)."""


@dataclasses.dataclass(frozen=True)
class SessionTicket:
    """A TLS 1.3 NewSessionTicket message (whole, with its 4-byte header) for a client."""

    message: bytes


@dataclasses.dataclass(frozen=True)
class Fail:
    """The connection is over; raise ``error`` (after carrying out the actions before this one)."""

    error: KTLSError


Action = Union[  # noqa: UP007
    SendAlert, SendHandshake, InstallKey, ResumeReceive, ReadClosed, WriteClosed, SessionTicket, Fail
]

#: Turns a direction into its next-generation key (TLS 1.3 ``traffic upd``, RFC 8446 §7.2); ``None`` when
#: this connection has no key schedule to update (TLS 1.2, or a kernel that cannot rekey).
NextKey = Callable[[Direction], CryptoInfo]


def key_update_message(update_requested: bool) -> bytes:
    """A KeyUpdate handshake message (RFC 8446 §4.6.3): type 24, length 1, ``KeyUpdateRequest``."""
    return bytes((HandshakeType.KEY_UPDATE, 0, 0, 1, int(update_requested)))


class ControlRecords:
    """The post-handshake state of one connection, fed the non-application records the kernel returns."""

    def __init__(self, version: TLSVersion, role: Role, next_key: NextKey | None) -> None:
        self.version = version
        self.role = role
        self._next_key = next_key
        self._pending = b""  # a handshake message split across records
        self.read_closed = False
        self.write_closed = False
        self.error: KTLSError | None = None
        #: Counters, for tests and ``ktls stat``.
        self.key_updates_received = 0
        self.key_updates_since_data = 0
        self.warning_alerts_since_data = 0
        #: KeyUpdates and warning alerts since the last application data (the front ends' cheap check).
        self.control_since_data = 0
        self.warning_alerts_received = 0
        self.tickets_received = 0
        #: Why the write side closed, when it was not the application's doing (``check_writable`` says it).
        self.write_closed_reason: str | None = None

    # -- receiving ---------------------------------------------------------------------------------------------

    def receive_record(self, content_type: int, payload: bytes) -> list[Action]:
        """Decide what a received non-application record means."""
        if self.error is not None:
            return [Fail(self.error)]
        if self.read_closed:
            # RFC 8446 §6.1: "Any data received after a closure alert has been received MUST be ignored" (a TCP
            # EOF ends the read side too): no KeyUpdate followed, no alert taken, no ticket kept.
            return []
        if self._pending and content_type != ContentType.HANDSHAKE and self.version is TLSVersion.TLS1_3:
            return self._interleaved(content_type)
        if content_type == ContentType.ALERT:
            return self._alert(payload)
        if content_type == ContentType.HANDSHAKE:
            return self._handshake(payload)
        if content_type == ContentType.CHANGE_CIPHER_SPEC:
            # RFC 8446 §5: a ChangeCipherSpec after the handshake is an unexpected_message; in TLS 1.2 it
            # would start a renegotiated epoch we never agreed to.
            return self._abort(AlertDescription.unexpected_message, "ChangeCipherSpec after the handshake")
        if content_type == ContentType.APPLICATION_DATA:
            raise ValueError("application data is the I/O layer's to deliver, not a control record")
        # RFC 8446 §5: "If a TLS implementation receives an unexpected record type, it MUST terminate the
        # connection with an unexpected_message alert."
        return self._abort(AlertDescription.unexpected_message, f"record of unknown content type {content_type}")

    def _interleaved(self, content_type: int) -> list[Action]:
        # RFC 8446 §5.1: "Handshake messages MUST NOT be interleaved with other record types" — a TLS 1.3
        # message split across records must be whole before any other record (OpenSSL: "mixed handshake and
        # non handshake data"). TLS 1.2 allows it (RFC 5246 §6.2.1: types "MAY be interleaved").
        what = f"a handshake message interrupted by a {_type_name(content_type)} record"
        return self._abort(AlertDescription.unexpected_message, what)

    def _alert(self, payload: bytes) -> list[Action]:
        if not payload:
            # RFC 8446 §5.1: "Implementations MUST NOT send zero-length fragments of Handshake or Alert types";
            # OpenSSL's record layer answers one with unexpected_message, and so do we.
            return self._abort(AlertDescription.unexpected_message, "empty alert record")
        if len(payload) != 2:
            # RFC 8446 §6 / RFC 5246 §7.2: an alert is exactly level + description.
            return self._abort(AlertDescription.decode_error, f"alert record of {len(payload)} bytes")
        level, description = payload
        if description == AlertDescription.close_notify:
            self.read_closed = True
            if self.version is TLSVersion.TLS1_3:
                # RFC 8446 §6.1: close_notify closes only the peer's write side; we may keep sending.
                return [ReadClosed()]
            # RFC 5246 §7.2.1: "The other party MUST respond with a close_notify alert of its own and close
            # down the connection immediately, discarding any pending writes."
            actions: list[Action] = [ReadClosed()]
            if not self.write_closed:
                self.write_closed = True
                actions += [SendAlert(AlertLevel.WARNING, AlertDescription.close_notify), WriteClosed()]
            return actions
        if self.version is TLSVersion.TLS1_3:
            if description == AlertDescription.user_canceled:
                # RFC 8446 §6.1: user_canceled is followed by close_notify; nothing to do yet — within the
                # same bound as TLS 1.2's warnings (OpenSSL counts it there too).
                return self._warning(description)
            # RFC 8446 §6: "all alerts besides close_notify and user_canceled are fatal, whatever the level".
            return self._received_fatal(description)
        if level == AlertLevel.WARNING:
            # RFC 5246 §7.2.2: after a warning "generally the connection can continue normally".
            return self._warning(description)
        if level == AlertLevel.FATAL:
            return self._received_fatal(description)
        return self._abort(AlertDescription.illegal_parameter, f"alert with unknown level {level}")

    def _warning(self, description: int) -> list[Action]:
        """A warning alert we go on after — within a bound (MAX_WARNING_ALERTS_WITHOUT_DATA), and logged at
        WARNING once per connection, not per alert."""
        self.warning_alerts_received += 1
        self.warning_alerts_since_data += 1
        self.control_since_data += 1
        if self.warning_alerts_since_data > MAX_WARNING_ALERTS_WITHOUT_DATA:
            return self._abort(
                AlertDescription.unexpected_message,
                f"more than {MAX_WARNING_ALERTS_WITHOUT_DATA} warning alerts without application data",
            )
        first = self.warning_alerts_received == 1
        log.log(
            logging.WARNING if first else logging.DEBUG, "peer sent a TLS warning alert: %s", _alert_name(description)
        )
        return []

    def _received_fatal(self, description: int) -> list[Action]:
        # RFC 8446 §6.2: on a fatal alert, close the connection; no alert goes back.
        self.read_closed = self.write_closed = True
        self.error = AlertReceived(description)
        return [Fail(self.error)]

    def _handshake(self, payload: bytes) -> list[Action]:
        if not payload:
            # RFC 8446 §5.1: "Implementations MUST NOT send zero-length fragments of Handshake types", also
            # in the middle of a message.
            return self._abort(AlertDescription.unexpected_message, "empty handshake record")
        data = self._pending + payload
        self._pending = b""
        messages: list[bytes] = []
        offset = 0
        while len(data) - offset >= 4:
            length = int.from_bytes(data[offset + 1 : offset + 4], "big")
            if length > MAX_HANDSHAKE_MESSAGE:
                return self._abort(AlertDescription.decode_error, f"post-handshake message of {length} bytes")
            if len(data) - offset - 4 < length:
                break
            messages.append(data[offset : offset + 4 + length])
            offset += 4 + length
        rest = data[offset:]
        actions: list[Action] = []
        for index, message in enumerate(messages):
            last_in_record = index == len(messages) - 1 and not rest
            actions += self._handshake_message(message, last_in_record)
            if any(isinstance(a, Fail) for a in actions):
                return actions
        self._pending = rest
        if rest:
            self.control_since_data += 1  # so that application data checks it is not interleaved (below)
        if payload[0] == HandshakeType.KEY_UPDATE and self._next_key is not None and not _installs_rx(actions):
            actions.append(ResumeReceive())  # the kernel paused for a key change that is not (yet) due
        return actions

    def _handshake_message(self, message: bytes, last_in_record: bool) -> list[Action]:
        kind, body = message[0], message[4:]
        if self.version is TLSVersion.TLS1_3:
            if kind == HandshakeType.NEW_SESSION_TICKET:
                if self.role is not Role.CLIENT:
                    # RFC 8446 §4.6.1: only servers send NewSessionTicket.
                    return self._abort(AlertDescription.unexpected_message, "NewSessionTicket sent to a server")
                self.tickets_received += 1
                return [SessionTicket(message)]
            if kind == HandshakeType.KEY_UPDATE:
                return self._key_update(body, last_in_record)
            # RFC 8446 §4.6: post-handshake authentication is not offered, so CertificateRequest is as
            # unexpected as any other handshake message here.
            return self._abort(AlertDescription.unexpected_message, f"{_handshake_name(kind)} after the handshake")
        if kind == HandshakeType.HELLO_REQUEST and self.role is Role.CLIENT and not body:
            # RFC 5246 §7.4.1.1: a client that will not renegotiate answers HelloRequest with a
            # no_renegotiation warning; the connection goes on.
            return [SendAlert(AlertLevel.WARNING, AlertDescription.no_renegotiation)]
        if kind == HandshakeType.CLIENT_HELLO and self.role is Role.SERVER:
            # RFC 5246 §7.2.2 / RFC 5746 §4.4: a server refusing renegotiation sends no_renegotiation.
            return [SendAlert(AlertLevel.WARNING, AlertDescription.no_renegotiation)]
        return self._abort(AlertDescription.unexpected_message, f"{_handshake_name(kind)} after the handshake")

    def _key_update(self, body: bytes, last_in_record: bool) -> list[Action]:
        if not last_in_record:
            # RFC 8446 §5.1: handshake messages MUST NOT span key changes — KeyUpdate ends its record.
            return self._abort(AlertDescription.unexpected_message, "KeyUpdate not at the end of its record")
        if len(body) != 1:
            return self._abort(AlertDescription.decode_error, f"KeyUpdate of {len(body)} bytes")
        if body[0] not in (0, 1):
            # RFC 8446 §4.6.3: any other request value is an illegal_parameter.
            return self._abort(AlertDescription.illegal_parameter, f"KeyUpdate request value {body[0]}")
        if self._next_key is None:
            self.read_closed = self.write_closed = True
            self.error = RekeyUnsupported(
                None,
                "the peer updated its keys (TLS 1.3 KeyUpdate) and this kernel cannot take a new receive "
                "key (that needs Linux 6.14 or later); the connection cannot go on",
            )
            return [SendAlert(AlertLevel.FATAL, AlertDescription.internal_error), Fail(self.error)]
        self.key_updates_received += 1
        self.key_updates_since_data += 1
        self.control_since_data += 1
        if self.key_updates_since_data > MAX_KEY_UPDATES_WITHOUT_DATA:
            return self._abort(
                AlertDescription.unexpected_message,
                f"more than {MAX_KEY_UPDATES_WITHOUT_DATA} KeyUpdates without application data",
            )
        actions: list[Action] = [InstallKey(Direction.RX, self._next_key(Direction.RX))]
        if body[0] == 1 and not self.write_closed:
            # update_requested: answer with update_not_requested under the old key, then switch (§4.6.3).
            actions += self.key_update(request_peer_update=False)
        return actions

    def application_data_received(self) -> list[Action]:
        """Application data arrived: KeyUpdates and warning alerts before it were not a flood — unless it
        interrupts a TLS 1.3 handshake message split across records (RFC 8446 §5.1), which is fatal."""
        if self.error is not None:
            return [Fail(self.error)]
        if self._pending and self.version is TLSVersion.TLS1_3:
            return self._interleaved(ContentType.APPLICATION_DATA)
        self.key_updates_since_data = self.warning_alerts_since_data = self.control_since_data = 0
        return []

    # -- sending -------------------------------------------------------------------------------------------------

    def key_update(self, request_peer_update: bool) -> list[Action]:
        """Update our send key (TLS 1.3 only): send KeyUpdate under the current key, then install the next."""
        if self.error is not None:
            return [Fail(self.error)]
        if self.version is not TLSVersion.TLS1_3:
            raise ValueError("KeyUpdate exists only in TLS 1.3")
        if self._next_key is None:
            raise RekeyUnsupported(None, "this kernel cannot replace the send key (needs Linux 6.14 or later)")
        if self.write_closed:
            raise StreamClosed()
        return [
            SendHandshake(key_update_message(request_peer_update)),
            InstallKey(Direction.TX, self._next_key(Direction.TX)),
        ]

    def send_key_exhausted(self, records: int) -> list[Action]:
        """The send key has protected as many records as its AEAD may (RFC 8446 §5.5; the front end counts,
        :class:`~ktls.core.sendbudget.SendBudget`). TLS 1.3 where the kernel can rekey: a KeyUpdate. Otherwise not
        one more record may go out under this key, and there is no other: close_notify, and every later write
        is refused with the reason (RFC 8446 §5.5: "the connection MUST be closed" if it cannot rekey)."""
        if self.version is TLSVersion.TLS1_3 and self._next_key is not None and not self.write_closed:
            return self.key_update(request_peer_update=False)
        actions = self.close_write()
        if actions:
            self.write_closed_reason = (
                f"the send key reached its usage limit ({records} records, RFC 8446 §5.5) and this connection "
                "cannot replace it (TLS 1.2, or a kernel before Linux 6.14): the write side is closed"
            )
        return actions

    def close_write(self) -> list[Action]:
        """Our close_notify (RFC 8446 §6.1), once; nothing when the write side is already closed."""
        if self.write_closed or self.error is not None:
            return []
        self.write_closed = True
        return [SendAlert(AlertLevel.WARNING, AlertDescription.close_notify), WriteClosed()]

    def record_failed(self, error: RecordError) -> list[Action]:
        """The kernel refused a received record: tell the peer why (``error.alert``) and fail."""
        if self.error is not None:
            return [Fail(self.error)]
        self.read_closed = self.write_closed = True
        self.error = error
        return [SendAlert(AlertLevel.FATAL, error.alert), Fail(error)]

    def _abort(self, alert: AlertDescription, what: str) -> list[Action]:
        self.read_closed = self.write_closed = True
        self.error = PeerMisbehaved(f"the peer broke the TLS protocol: {what} (sent {alert.name})", alert)
        return [SendAlert(AlertLevel.FATAL, alert), Fail(self.error)]

    def check_writable(self) -> None:
        """Raise instead of letting a write through once the write side is closed (never return 0)."""
        if self.error is not None:
            raise StreamClosed(f"the TLS connection failed: {self.error}") from self.error
        if self.write_closed:
            raise StreamClosed(self.write_closed_reason) if self.write_closed_reason else StreamClosed()


def _alert_name(description: int) -> str:
    try:
        return AlertDescription(description).name
    except ValueError:
        return f"alert {description}"


def _installs_rx(actions: list[Action]) -> bool:
    return any(isinstance(a, InstallKey) and a.direction is Direction.RX for a in actions)


def _type_name(content_type: int) -> str:
    try:
        return ContentType(content_type).name
    except ValueError:
        return f"type {content_type}"


def _handshake_name(kind: int) -> str:
    try:
        return HandshakeType(kind).name
    except ValueError:
        return f"handshake message type {kind}"

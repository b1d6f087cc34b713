"""Protocol errors: the peer sent bytes TLS does not allow.

These are the *protocol* axis of ktls's errors (:class:`ktls.errors.PeerMisbehaved`). Each class is one
TLS alert: ``alert`` says what the peer should be told (RFC 8446 §6.2), so the code that catches the error
knows what to send before closing. They are the peer's fault, never ours: our own misuse of an API (a key of
the wrong length, a suite from the wrong TLS version) raises :class:`ValueError` instead.

The sans-IO parsers of this package raise only these (invariant checked by property tests): whatever bytes
arrive, a parser returns a value, asks for more, or raises a :class:`TLSProtocolError`.
"""

from __future__ import annotations

from ..constants import AlertDescription
from ..errors import PeerMisbehaved, RecordOverflowError, TLSProtocolError

__all__ = [
    "DecodeError",
    "IllegalParameter",
    "RecordOverflowError",
    "TLSProtocolError",
    "UnexpectedMessage",
]


class DecodeError(PeerMisbehaved):
    """A message or record could not be parsed: a field out of range, a length that does not add up."""

    alert = AlertDescription.decode_error


class UnexpectedMessage(PeerMisbehaved):
    """A record or handshake message of a type that is not allowed here (RFC 8446 §5, §6.2)."""

    alert = AlertDescription.unexpected_message


class IllegalParameter(PeerMisbehaved):
    """A well-formed field with a value we refuse, e.g. a handshake message above our size limit (as OpenSSL
    answers ``excessive message size``)."""

    alert = AlertDescription.illegal_parameter

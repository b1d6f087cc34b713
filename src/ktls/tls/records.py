"""TLS record and handshake-message framing, sans-IO: bytes in, records and messages out.

Theory of operation
-------------------
A TLS connection is a stream of records (RFC 8446 §5.1, RFC 5246 §6.2)::

    struct {
        ContentType type;                  /* 1 byte: 20 ccs, 21 alert, 22 handshake, 23 application_data */
        ProtocolVersion legacy_record_version;   /* 2 bytes: 0x0301..0x0303 */
        uint16 length;                     /* of the fragment that follows */
        opaque fragment[length];
    } TLSPlaintext;                        /* TLSCiphertext has the same 5-byte header */

When the kernel takes over a socket it starts parsing records at the socket's current read position, so
the handshake must not read one byte past the last handshake record (a library that read ahead handed the
kernel a stream that starts mid-record: rustls/ktls#20). :class:`RecordReader` therefore says exactly how
many bytes complete the next header or record (:attr:`RecordReader.bytes_needed`); the driver ``recv``\\ s
no more than that and feeds what arrived.

The limits on ``length`` depend on what the record is: 2^14 for plaintext, 2^14 + 256 for TLS 1.3
ciphertext, 2^14 + 2048 for TLS 1.2 ciphertext (RFC 8446 §5.1-5.2, RFC 5246 §6.2.3). Before the version is
known the reader allows the largest (``MAX_CIPHERTEXT_TLS12``); callers that know better pass a tighter
``max_length``. A longer record is ``record_overflow``.

``legacy_record_version`` is "ignored for all purposes" in TLS 1.3 (§5.1), but a first byte other than 3
means the peer does not speak TLS at all (an HTTP request on a TLS port, ``GET /``, reads as type 0x47,
version 0x4554), so that is refused as ``decode_error`` rather than waiting for a 16 KiB "record".

Handshake messages (RFC 8446 §4, RFC 5246 §7.4) are framed inside the handshake records' fragments::

    struct { HandshakeType msg_type; uint24 length; opaque body[length]; } Handshake;

A message may span records and a record may hold several messages; :func:`parse_handshake_messages` splits
a byte string and returns the incomplete tail for the caller to complete with the next record's bytes.

Finally the two ``random`` fields the key schedule needs: the client random names a connection in the key
log; TLS 1.2's key block also needs the server random. Both sit at the same place at the start of their
hello (after ``msg_type``, ``length`` and ``legacy_version``), so only the first 38 bytes of the message are
read, whether the caller passes records or the bare message, and however the message is fragmented.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from ..constants import MAX_CIPHERTEXT_TLS12, MAX_PLAINTEXT, RECORD_HEADER_SIZE, ContentType, HandshakeType
from .errors import DecodeError, IllegalParameter, RecordOverflowError, TLSProtocolError, UnexpectedMessage

__all__ = [
    "HANDSHAKE_HEADER_SIZE",
    "HandshakeMessage",
    "RecordHeader",
    "RecordReader",
    "TLSRecord",
    "client_random_from_client_hello",
    "parse_handshake_messages",
    "parse_record_header",
    "server_random_from_server_hello",
    "whole_records_length",
]

#: msg_type (1) + uint24 length (3).
HANDSHAKE_HEADER_SIZE = 4
_MAX_HANDSHAKE_LENGTH = 2**24 - 1  # what uint24 can say
_RANDOM_OFFSET = HANDSHAKE_HEADER_SIZE + 2  # after msg_type, length and legacy_version
_RANDOM_SIZE = 32
_HELLO_PREFIX = _RANDOM_OFFSET + _RANDOM_SIZE  # bytes of a hello needed to read its random: 38

_Bytes = bytes | bytearray | memoryview
_CONTENT_TYPES = frozenset(int(content_type) for content_type in ContentType)


@dataclasses.dataclass(frozen=True)
class RecordHeader:
    """The 5-byte header of a TLS record."""

    content_type: ContentType
    #: ``legacy_record_version``: 0x0301 (some first ClientHellos), else 0x0303, whatever the real version.
    version: int
    #: Length of the fragment that follows the header.
    length: int

    def to_bytes(self) -> bytes:
        return bytes((self.content_type, self.version >> 8, self.version & 0xFF)) + self.length.to_bytes(2, "big")


def parse_record_header(data: _Bytes, *, max_length: int = MAX_CIPHERTEXT_TLS12) -> RecordHeader:
    """Parse the first 5 bytes of ``data`` as a record header.

    Raises :class:`UnexpectedMessage` for an unknown content type (RFC 8446 §5), :class:`DecodeError` for a
    version that is not TLS's or fewer than 5 bytes, :class:`~ktls.errors.RecordOverflowError` for a length over
    ``max_length``.
    """
    if len(data) < RECORD_HEADER_SIZE:
        raise DecodeError(f"a record header is {RECORD_HEADER_SIZE} bytes, got {len(data)}")
    type_byte, major, minor, len_hi, len_lo = bytes(data[:RECORD_HEADER_SIZE])
    if major != 3:
        raise DecodeError(f"not a TLS record: version bytes {major:#04x} {minor:#04x}")
    try:
        content_type = ContentType(type_byte)
    except ValueError:
        raise UnexpectedMessage(f"unknown record content type {type_byte}") from None
    length = len_hi << 8 | len_lo
    if length > max_length:
        raise RecordOverflowError(
            None, f"{content_type.name} record of {length} bytes, more than the {max_length} allowed"
        )
    return RecordHeader(content_type, major << 8 | minor, length)


def whole_records_length(
    data: _Bytes, *, max_length: int = MAX_CIPHERTEXT_TLS12, max_records: int | None = None
) -> int:
    """How many bytes at the start of ``data`` are whole records (0: not even one), counting at most
    ``max_records`` of them. Each header is checked as :func:`parse_record_header` does, with its errors."""
    end = 0
    records = 0
    size = len(data)
    while size - end >= RECORD_HEADER_SIZE and (max_records is None or records < max_records):
        records += 1
        length = data[end + 3] << 8 | data[end + 4]
        if data[end + 1] != 3 or data[end] not in _CONTENT_TYPES or length > max_length:
            parse_record_header(data[end : end + RECORD_HEADER_SIZE], max_length=max_length)  # raises its error
        if size - end - RECORD_HEADER_SIZE < length:
            break
        end += RECORD_HEADER_SIZE + length
    return end


@dataclasses.dataclass(frozen=True, repr=False)
class TLSRecord:
    """One whole record as it was on the wire. ``bytes(record)`` gives it back, header included."""

    header: RecordHeader
    fragment: bytes

    @property
    def content_type(self) -> ContentType:
        return self.header.content_type

    def __bytes__(self) -> bytes:
        return self.header.to_bytes() + self.fragment

    def __len__(self) -> int:
        """Bytes on the wire: header and fragment."""
        return RECORD_HEADER_SIZE + len(self.fragment)

    def __repr__(self) -> str:
        return f"TLSRecord({self.content_type.name}, version={self.header.version:#06x}, {len(self.fragment)} bytes)"


class RecordReader:
    """Cuts a byte stream into whole records, never asking for a byte past the record being read.

    Sans-IO: :meth:`feed` it bytes, take records with :meth:`next_record` (or iterate), and read
    :attr:`bytes_needed` to know how much to ``recv`` next. After a :class:`~ktls.tls.errors.TLSProtocolError`
    the stream cannot be resynchronised: every later call raises the same error.

    End of stream is the caller's business: ``buffered == 0`` means it fell between records.
    """

    def __init__(self, *, max_length: int = MAX_CIPHERTEXT_TLS12) -> None:
        self._buffer = bytearray()
        self._header: RecordHeader | None = None  # header of the record being read, once its 5 bytes are in
        self._max_length = max_length
        self._error: TLSProtocolError | None = None

    def feed(self, data: _Bytes) -> None:
        """Append bytes read from the stream (of any size: they need not end on a record boundary)."""
        if self._error is None:  # after an error nothing more is parsed: do not hold on to it either
            self._buffer += data

    @property
    def buffered(self) -> int:
        """Bytes fed and not yet returned as records."""
        return len(self._buffer)

    @property
    def bytes_needed(self) -> int:
        """How many more bytes complete the next header, or the record once its header is in; 0 when a whole
        record is already buffered. Reading exactly this many never reads past the current record."""
        self._parse_header()
        if self._header is None:
            return RECORD_HEADER_SIZE - len(self._buffer)
        return max(0, RECORD_HEADER_SIZE + self._header.length - len(self._buffer))

    def _parse_header(self) -> None:
        if self._error is not None:
            raise self._error
        if self._header is None and len(self._buffer) >= RECORD_HEADER_SIZE:
            try:
                self._header = parse_record_header(self._buffer, max_length=self._max_length)
            except TLSProtocolError as exc:
                self._error = exc
                raise

    def next_record(self) -> TLSRecord | None:
        """The next whole record, or ``None`` if more bytes are needed (see :attr:`bytes_needed`)."""
        self._parse_header()
        header = self._header
        if header is None:
            return None
        end = RECORD_HEADER_SIZE + header.length
        if len(self._buffer) < end:
            return None
        fragment = bytes(self._buffer[RECORD_HEADER_SIZE:end])
        del self._buffer[:end]
        self._header = None
        return TLSRecord(header, fragment)

    def __iter__(self) -> Iterator[TLSRecord]:
        """Every whole record buffered so far."""
        while (record := self.next_record()) is not None:
            yield record


@dataclasses.dataclass(frozen=True, repr=False)
class HandshakeMessage:
    """One handshake message. ``msg_type`` is kept as sent; :attr:`handshake_type` names it if known."""

    msg_type: int
    body: bytes

    @property
    def handshake_type(self) -> HandshakeType | None:
        try:
            return HandshakeType(self.msg_type)
        except ValueError:
            return None

    def __bytes__(self) -> bytes:
        return bytes((self.msg_type,)) + len(self.body).to_bytes(3, "big") + self.body

    def __repr__(self) -> str:
        known = self.handshake_type
        return f"HandshakeMessage({known.name if known else self.msg_type}, {len(self.body)} bytes)"


def parse_handshake_messages(
    data: _Bytes, *, max_message_size: int = _MAX_HANDSHAKE_LENGTH
) -> tuple[list[HandshakeMessage], bytes]:
    """Split handshake bytes (the fragments of consecutive handshake records, or decrypted TLS 1.3 inner
    plaintexts of type handshake) into whole messages.

    Returns ``(messages, tail)``: ``tail`` is the start of a message not complete yet (empty if ``data``
    ends on a message boundary), to be prefixed to the next record's bytes. A message whose declared length
    exceeds ``max_message_size`` raises :class:`IllegalParameter` as soon as its header is seen, so a caller
    that buffers the tail can bound its memory.
    """
    view = memoryview(data)
    messages: list[HandshakeMessage] = []
    offset = 0
    while len(view) - offset >= HANDSHAKE_HEADER_SIZE:
        msg_type = view[offset]
        length = int.from_bytes(view[offset + 1 : offset + HANDSHAKE_HEADER_SIZE], "big")
        if length > max_message_size:
            raise IllegalParameter(f"handshake message type {msg_type} of {length} bytes (limit {max_message_size})")
        end = offset + HANDSHAKE_HEADER_SIZE + length
        if end > len(view):
            break
        messages.append(HandshakeMessage(msg_type, bytes(view[offset + HANDSHAKE_HEADER_SIZE : end])))
        offset = end
    return messages, bytes(view[offset:])


def _hello_random(data: _Bytes, want: HandshakeType) -> bytes | None:
    """The ``random`` of the ClientHello/ServerHello at the start of ``data``: records or a bare message."""
    view = memoryview(data)
    if len(view) == 0:
        return None
    if view[0] == ContentType.HANDSHAKE:
        # Records: join the handshake fragments until the first 38 bytes of the message are in. Records
        # before encryption carry at most 2^14 bytes (RFC 8446 §5.1).
        message = bytearray()
        offset = 0
        while len(message) < _HELLO_PREFIX and len(view) - offset >= RECORD_HEADER_SIZE:
            header = parse_record_header(view[offset:], max_length=MAX_PLAINTEXT)
            if header.content_type is not ContentType.HANDSHAKE:
                raise UnexpectedMessage(f"{header.content_type.name} record inside a {want.name}")
            start = offset + RECORD_HEADER_SIZE
            message += view[start : start + header.length]
            offset = start + header.length
        if not message:
            return None
        view = memoryview(message)
    elif view[0] != want:
        raise UnexpectedMessage(f"expected a {want.name} (handshake type {want.value}), got byte {view[0]}")
    if view[0] != want:
        raise UnexpectedMessage(f"expected a {want.name}, got handshake message type {view[0]}")
    if len(view) < HANDSHAKE_HEADER_SIZE:
        return None
    length = int.from_bytes(view[1:HANDSHAKE_HEADER_SIZE], "big")
    if length < _HELLO_PREFIX - HANDSHAKE_HEADER_SIZE:
        raise DecodeError(f"{want.name} of {length} bytes is too short to hold a random")
    if len(view) < _HELLO_PREFIX:
        return None
    if view[HANDSHAKE_HEADER_SIZE] != 3:
        raise DecodeError(f"{want.name} legacy_version {bytes(view[4:6]).hex()} is not TLS")
    return bytes(view[_RANDOM_OFFSET:_HELLO_PREFIX])


def client_random_from_client_hello(data: _Bytes) -> bytes | None:
    """The 32-byte ``random`` of the ClientHello that ``data`` starts with.

    ``data`` is either handshake records as sent (``16 03 01 …``: one record, or several when the ClientHello
    is fragmented, even down to one byte per record) or the bare handshake message (``01 …``). Only the first
    38 bytes of the message are examined; the rest of the ClientHello is not validated (OpenSSL does that).
    Returns ``None`` while fewer bytes than that have arrived; raises :class:`UnexpectedMessage` if the bytes
    are not a ClientHello and :class:`DecodeError` if they are malformed.

    After a HelloRetryRequest the second ClientHello carries the same random (RFC 8446 §4.1.2), and the key
    log uses that one random for the whole connection.
    """
    return _hello_random(data, HandshakeType.CLIENT_HELLO)


def server_random_from_server_hello(data: _Bytes) -> bytes | None:
    """The 32-byte ``random`` of the ServerHello that ``data`` starts with (records or bare message); as
    :func:`client_random_from_client_hello`. TLS 1.2's key block needs it; TLS 1.3 does not.

    A TLS 1.3 HelloRetryRequest is a ServerHello whose random is a fixed value (RFC 8446 §4.1.3); it is
    returned as is.
    """
    return _hello_random(data, HandshakeType.SERVER_HELLO)

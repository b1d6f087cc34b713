"""Record and handshake framing: limits, exact reads, chunking invariance, and the hello randoms."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ktls.constants import (
    MAX_CIPHERTEXT_TLS12,
    MAX_CIPHERTEXT_TLS13,
    AlertDescription,
    ContentType,
    HandshakeType,
)
from ktls.tls.errors import DecodeError, IllegalParameter, RecordOverflowError, TLSProtocolError, UnexpectedMessage
from ktls.tls.records import (
    HandshakeMessage,
    RecordHeader,
    RecordReader,
    TLSRecord,
    client_random_from_client_hello,
    parse_handshake_messages,
    parse_record_header,
    server_random_from_server_hello,
)


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


# RFC 8448 §3 (https://www.rfc-editor.org/rfc/rfc8448#section-3): {client} construct a ClientHello handshake
# message (196 octets), sent in a record with header 16 03 01 00 c4; {server} send handshake record (95 octets).
RFC8448_CLIENT_HELLO = h(
    """01 00 00 c0 03 03 cb 34 ec b1 e7 81 63 ba 1c 38 c6 da cb 19 6a 6d ff a2 1a 8d 99 12 ec 18 a2 ef 62 83
    02 4d ec e7 00 00 06 13 01 13 03 13 02 01 00 00 91 00 00 00 0b 00 09 00 00 06 73 65 72 76 65 72 ff 01 00
    01 00 00 0a 00 14 00 12 00 1d 00 17 00 18 00 19 01 00 01 01 01 02 01 03 01 04 00 23 00 00 00 33 00 26 00
    24 00 1d 00 20 99 38 1d e5 60 e4 bd 43 d2 3d 8e 43 5a 7d ba fe b3 c0 6e 51 c1 3c ae 4d 54 13 69 1e 52 9a
    af 2c 00 2b 00 03 02 03 04 00 0d 00 20 00 1e 04 03 05 03 06 03 02 03 08 04 08 05 08 06 04 01 05 01 06 01
    02 01 04 02 05 02 06 02 02 02 00 2d 00 02 01 01 00 1c 00 02 40 01"""
)
RFC8448_CLIENT_HELLO_RECORD = h("16 03 01 00 c4") + RFC8448_CLIENT_HELLO
RFC8448_CLIENT_RANDOM = h(
    "cb 34 ec b1 e7 81 63 ba 1c 38 c6 da cb 19 6a 6d ff a2 1a 8d 99 12 ec 18 a2 ef 62 83 02 4d ec e7"
)
RFC8448_SERVER_HELLO_RECORD = h(
    """16 03 03 00 5a 02 00 00 56 03 03 a6 af 06 a4 12 18 60 dc 5e 6e 60 24 9c d3 4c 95 93 0c 8a c5 cb 14 34
    da c1 55 77 2e d3 e2 69 28 00 13 01 00 00 2e 00 33 00 24 00 1d 00 20 c9 82 88 76 11 20 95 fe 66 76 2b db
    f7 c6 72 e1 56 d6 cc 25 3b 83 3d f1 dd 69 b1 b0 4e 75 1f 0f 00 2b 00 02 03 04"""
)
RFC8448_SERVER_RANDOM = h(
    "a6 af 06 a4 12 18 60 dc 5e 6e 60 24 9c d3 4c 95 93 0c 8a c5 cb 14 34 da c1 55 77 2e d3 e2 69 28"
)


def record(content_type: int, fragment: bytes, version: int = 0x0303) -> bytes:
    return bytes([content_type]) + version.to_bytes(2, "big") + len(fragment).to_bytes(2, "big") + fragment


def fragment_into_records(message: bytes, size: int) -> bytes:
    return b"".join(record(ContentType.HANDSHAKE, message[i : i + size]) for i in range(0, len(message), size))


# --- Record headers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", list(ContentType))
@pytest.mark.parametrize("version", [0x0301, 0x0303])
def test_header(content_type: ContentType, version: int) -> None:
    data = record(content_type, b"", version)[:3] + (1234).to_bytes(2, "big") + b"trailing bytes are ignored"
    header = parse_record_header(data)
    assert header == RecordHeader(content_type, version, 1234)
    assert header.to_bytes() == data[:5]


def test_header_length_limits() -> None:
    assert parse_record_header(h("17 03 03") + MAX_CIPHERTEXT_TLS12.to_bytes(2, "big")).length == MAX_CIPHERTEXT_TLS12
    with pytest.raises(RecordOverflowError) as exc:
        parse_record_header(h("17 03 03") + (MAX_CIPHERTEXT_TLS12 + 1).to_bytes(2, "big"))
    assert exc.value.alert is AlertDescription.record_overflow
    tls13 = h("17 03 03") + (MAX_CIPHERTEXT_TLS13 + 1).to_bytes(2, "big")
    with pytest.raises(RecordOverflowError):
        parse_record_header(tls13, max_length=MAX_CIPHERTEXT_TLS13)


@pytest.mark.parametrize(
    ("data", "error", "alert"),
    [
        (b"GET / HTTP/1.1\r\n", DecodeError, AlertDescription.decode_error),  # not TLS at all
        (h("16 02 00 00 10"), DecodeError, AlertDescription.decode_error),  # SSL 2 era version
        (h("80 2e 01 03 01"), DecodeError, AlertDescription.decode_error),  # an SSLv2-format ClientHello
        (h("16 03"), DecodeError, AlertDescription.decode_error),  # short
        (h("18 03 03 00 10"), UnexpectedMessage, AlertDescription.unexpected_message),  # heartbeat: not allowed
        (h("00 03 03 00 10"), UnexpectedMessage, AlertDescription.unexpected_message),
    ],
)
def test_bad_headers(data: bytes, error: type[TLSProtocolError], alert: AlertDescription) -> None:
    with pytest.raises(error) as exc:
        parse_record_header(data)
    assert exc.value.alert is alert


# --- RecordReader --------------------------------------------------------------------------------------------


def test_bytes_needed_reads_exactly_one_record() -> None:
    """A driver that recv()s exactly bytes_needed stops at the end of the record, leaving the bytes after it
    (which the kernel must see first) in the socket."""
    records = record(22, b"x" * 300) + record(20, b"\x01") + record(23, b"y" * 40)
    after = b"KERNEL STARTS HERE"
    stream = records + after
    position = 0
    reader = RecordReader()
    got = []
    for _ in range(3):
        while (next_record := reader.next_record()) is None:
            need = reader.bytes_needed
            assert need > 0
            chunk = stream[position : position + min(need, 7)]  # recv may return less than asked
            position += len(chunk)
            reader.feed(chunk)
        got.append(next_record)
        assert reader.buffered == 0
    assert position == len(records)
    assert stream[position:] == after
    assert b"".join(bytes(r) for r in got) == records
    assert [r.content_type for r in got] == [ContentType.HANDSHAKE, ContentType.CHANGE_CIPHER_SPEC, 23]
    assert [len(r) for r in got] == [305, 6, 45]


def test_bytes_needed_progression() -> None:
    reader = RecordReader()
    assert reader.bytes_needed == 5
    reader.feed(h("16 03"))
    assert reader.bytes_needed == 3
    reader.feed(h("03 00 04"))
    assert reader.bytes_needed == 4
    reader.feed(b"ab")
    assert reader.bytes_needed == 2
    assert reader.next_record() is None
    reader.feed(b"cd" + h("15"))
    assert reader.bytes_needed == 0
    rec = reader.next_record()
    assert rec is not None
    assert rec.fragment == b"abcd"
    assert reader.buffered == 1
    assert reader.bytes_needed == 4
    assert repr(rec) == "TLSRecord(HANDSHAKE, version=0x0303, 4 bytes)"


def test_zero_length_record() -> None:
    reader = RecordReader()
    reader.feed(record(23, b""))
    rec = reader.next_record()
    assert rec is not None
    assert rec.fragment == b""
    assert reader.bytes_needed == 5


def test_errors_are_sticky() -> None:
    reader = RecordReader(max_length=MAX_CIPHERTEXT_TLS13)
    reader.feed(record(23, b"ok") + h("17 03 03") + (MAX_CIPHERTEXT_TLS13 + 1).to_bytes(2, "big"))
    assert reader.next_record() is not None
    for _ in range(2):
        with pytest.raises(RecordOverflowError):
            reader.next_record()
        with pytest.raises(RecordOverflowError):
            _ = reader.bytes_needed
    buffered = reader.buffered
    reader.feed(b"more bytes after the error are not kept")
    assert reader.buffered == buffered


records_strategy = st.lists(
    st.tuples(st.sampled_from(list(ContentType)), st.sampled_from([0x0301, 0x0303]), st.binary(max_size=40)),
    max_size=8,
)


def read_all(chunks: list[bytes]) -> tuple[list[TLSRecord], type[TLSProtocolError] | None]:
    """(records, error class or None) after feeding ``chunks`` one by one, up to the first error."""
    reader = RecordReader(max_length=1000)
    records: list[TLSRecord] = []
    try:
        for chunk in chunks:
            reader.feed(chunk)
            records.extend(reader)
    except TLSProtocolError as exc:
        return records, type(exc)
    return records, None


@given(records_strategy, st.binary(max_size=20))
def test_valid_streams_round_trip_whatever_the_chunking(
    items: list[tuple[ContentType, int, bytes]], junk: bytes
) -> None:
    stream = b"".join(record(t, f, v) for t, v, f in items)
    whole, error = read_all([stream])
    assert error is None
    assert [(r.content_type, r.header.version, r.fragment) for r in whole] == [(t, v, f) for t, v, f in items]
    assert read_all([stream[i : i + 1] for i in range(len(stream))])[0] == whole
    # Trailing junk never costs the records before it.
    records, _ = read_all([stream + junk])
    assert records[: len(whole)] == whole


@given(st.binary(max_size=200))
def test_arbitrary_bytes_parse_or_raise_the_typed_error(data: bytes) -> None:
    """Whatever arrives: records, a request for more, or a TLSProtocolError, and the same byte by byte."""
    all_at_once = read_all([data])
    byte_by_byte = read_all([data[i : i + 1] for i in range(len(data))])
    assert all_at_once == byte_by_byte


# --- Handshake messages ----------------------------------------------------------------------------------------


def message(msg_type: int, body: bytes) -> bytes:
    return bytes([msg_type]) + len(body).to_bytes(3, "big") + body


def test_handshake_messages() -> None:
    data = message(4, b"ticket") + message(24, b"\x01") + message(0, b"") + message(99, b"?") + message(20, b"abc")
    messages, tail = parse_handshake_messages(data[:-2])
    assert [m.handshake_type for m in messages] == [
        HandshakeType.NEW_SESSION_TICKET,
        HandshakeType.KEY_UPDATE,
        HandshakeType.HELLO_REQUEST,
        None,
    ]
    assert messages[3].msg_type == 99
    assert [repr(m) for m in messages[:1] + messages[3:]] == [
        "HandshakeMessage(NEW_SESSION_TICKET, 6 bytes)",
        "HandshakeMessage(99, 1 bytes)",
    ]
    assert tail == message(20, b"abc")[:-2]
    assert b"".join(bytes(m) for m in messages) + tail == data[:-2]
    more, tail = parse_handshake_messages(tail + data[-2:])
    assert more == [HandshakeMessage(20, b"abc")]
    assert tail == b""
    assert parse_handshake_messages(b"") == ([], b"")
    assert parse_handshake_messages(b"\x04\x00") == ([], b"\x04\x00")  # not even a header yet


def test_handshake_message_size_limit() -> None:
    with pytest.raises(IllegalParameter) as exc:
        parse_handshake_messages(h("04 01 00 01"), max_message_size=0x10000)  # only the header has arrived
    assert exc.value.alert is AlertDescription.illegal_parameter
    assert parse_handshake_messages(h("04 01 00 00"), max_message_size=0x10000) == ([], h("04 01 00 00"))


@given(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=30)), max_size=6), st.data())
def test_handshake_split_anywhere(items: list[tuple[int, bytes]], data: st.DataObject) -> None:
    """Messages cut across two records come out the same when the tail is carried over."""
    stream = b"".join(message(t, b) for t, b in items)
    cut = data.draw(st.integers(0, len(stream)))
    first, tail = parse_handshake_messages(stream[:cut])
    second, rest = parse_handshake_messages(tail + stream[cut:])
    assert rest == b""
    assert [(m.msg_type, m.body) for m in first + second] == items


@given(st.binary(max_size=100))
def test_handshake_arbitrary_bytes(data: bytes) -> None:
    messages, tail = parse_handshake_messages(data)
    assert b"".join(bytes(m) for m in messages) + tail == data


# --- Hello randoms ---------------------------------------------------------------------------------------------


def test_rfc8448_randoms() -> None:
    assert client_random_from_client_hello(RFC8448_CLIENT_HELLO) == RFC8448_CLIENT_RANDOM
    assert client_random_from_client_hello(RFC8448_CLIENT_HELLO_RECORD) == RFC8448_CLIENT_RANDOM
    assert server_random_from_server_hello(RFC8448_SERVER_HELLO_RECORD) == RFC8448_SERVER_RANDOM
    assert server_random_from_server_hello(RFC8448_SERVER_HELLO_RECORD[5:]) == RFC8448_SERVER_RANDOM
    # Followed by the rest of a flight: only the start is read.
    assert client_random_from_client_hello(RFC8448_CLIENT_HELLO_RECORD + record(21, b"\x02\x28")) is not None


@pytest.mark.parametrize("size", [1, 2, 5, 37, 38, 100])
def test_fragmented_client_hello(size: int) -> None:
    """A ClientHello cut into records of any size (RFC 8446 §5.1 allows it) still gives its random."""
    assert client_random_from_client_hello(fragment_into_records(RFC8448_CLIENT_HELLO, size)) == RFC8448_CLIENT_RANDOM


def test_too_little_yet_is_none() -> None:
    for data in (RFC8448_CLIENT_HELLO_RECORD, fragment_into_records(RFC8448_CLIENT_HELLO, 3)):
        prefix_needed = None
        for end in range(len(data) + 1):
            result = client_random_from_client_hello(data[:end])
            if result is not None:
                prefix_needed = end
                break
        assert prefix_needed is not None
        # The random is complete after 38 bytes of message: no more is waited for.
        assert client_random_from_client_hello(data[:prefix_needed]) == RFC8448_CLIENT_RANDOM
    assert client_random_from_client_hello(b"") is None
    assert client_random_from_client_hello(record(22, b"")) is None  # an empty handshake record


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (RFC8448_SERVER_HELLO_RECORD, UnexpectedMessage),  # a ServerHello where a ClientHello belongs
        (record(21, h("02 28")), UnexpectedMessage),  # an alert record
        (record(22, h("01 00 00")) + record(21, h("02 28")), UnexpectedMessage),  # interleaved alert
        (h("02") + RFC8448_CLIENT_HELLO[1:], UnexpectedMessage),  # bare message of the wrong type
        (message(1, b"\x03\x03" + b"r" * 20), DecodeError),  # too short to hold a random
        (message(1, b"\x02\x00" + b"r" * 40), DecodeError),  # not a TLS legacy_version
        (b"GET / HTTP/1.1\r\n\r\n", UnexpectedMessage),
        (h("16 04 00 00 10"), DecodeError),  # bad record version
        (record(22, b"x" * 10, 0x0303)[:3] + (2**14 + 1).to_bytes(2, "big"), RecordOverflowError),  # plaintext limit
    ],
)
def test_not_a_client_hello(data: bytes, error: type[TLSProtocolError]) -> None:
    with pytest.raises(error):
        client_random_from_client_hello(data)


@given(st.binary(max_size=120))
def test_hello_random_arbitrary_bytes(data: bytes) -> None:
    for extract in (client_random_from_client_hello, server_random_from_server_hello):
        try:
            random = extract(data)
        except TLSProtocolError:
            continue
        assert random is None or len(random) == 32


@given(st.binary(min_size=38, max_size=120))
def test_hello_random_from_any_wellformed_prefix(body: bytes) -> None:
    hello = message(1, b"\x03\x03" + body)
    assert client_random_from_client_hello(hello) == body[:32]
    assert client_random_from_client_hello(fragment_into_records(hello, 9)) == body[:32]

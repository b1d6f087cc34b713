"""The engine's ordered send queue (:mod:`ktls.engine`), on the host, against a scripted socket.

What goes out, in what order, whatever the socket takes at each moment: application data byte for byte in the
order it was written; our KeyUpdate ahead of every byte the socket had not taken when it was decided, with the
next send key installed right behind it (RFC 8446 §4.6.3); close_notify after all data, then ``SHUT_WR``, and
nothing after; a fatal alert in place of what was still queued. The socket is a stand-in that takes as many
bytes as the test allows and logs every call, so each property is checked on the exact sequence of system
calls, in milliseconds, for hypothesis-chosen interleavings of writes, flushes, rekeys and closes.
"""

from __future__ import annotations

import socket
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ktls.constants import AlertDescription, AlertLevel, ContentType, HandshakeType, TLSVersion
from ktls.core.connection import Connection
from ktls.core.control import ControlRecords, Role, key_update_message
from ktls.core.handoff import Installed
from ktls.engine import Engine
from ktls.errors import RecordAuthenticationError
from ktls.kernel import CipherType, CryptoInfo, Direction
from ktls.kernel.uapi import SOL_TLS, TLS_GET_RECORD_TYPE, TLS_SET_RECORD_TYPE

KEY_UPDATE = key_update_message(update_requested=False)
CLOSE_NOTIFY = bytes((1, AlertDescription.close_notify))


def next_key(direction: Direction) -> CryptoInfo:
    return CryptoInfo.tls13(CipherType.AES_GCM_128, bytes([direction]) * 16, bytes(12))


class ScriptedSocket:
    """Takes at most ``room`` bytes in total until given more; logs what went out, in order."""

    def __init__(self) -> None:
        self.room = 0
        self.log: list[tuple[str, Any]] = []

    def send(self, data: Any, flags: int = 0) -> int:
        if not self.room:
            raise BlockingIOError
        taken = bytes(memoryview(data)[: self.room])
        self.room -= len(taken)
        self.log.append(("data", taken))
        return len(taken)

    def sendmsg(self, buffers: list[bytes], cmsg: list[tuple[int, int, bytes]], flags: int = 0) -> int:
        (payload,) = buffers
        (level, kind, content_type), *_ = cmsg
        assert (level, kind) == (SOL_TLS, TLS_SET_RECORD_TYPE)
        if self.room < len(payload):  # a control record goes whole or not at all
            raise BlockingIOError
        self.room -= len(payload)
        self.log.append(("record", (content_type[0], bytes(payload))))
        return len(payload)

    def setsockopt(self, level: int, option: int, value: bytes) -> None:
        assert level == SOL_TLS
        self.log.append(("key", Direction(option)))

    def shutdown(self, how: int) -> None:
        assert how == socket.SHUT_WR
        self.log.append(("shutdown", None))


def kernel_engine(version: TLSVersion = TLSVersion.TLS1_3) -> tuple[Engine, ScriptedSocket]:
    control = ControlRecords(version, Role.SERVER, next_key if version is TLSVersion.TLS1_3 else None)
    connection = Connection(version, Role.SERVER, installed=Installed(control, kernel_tx=True, kernel_rx=True))
    sock = ScriptedSocket()
    engine = Engine(cast(socket.socket, sock), None, connection)  # it makes only the calls logged here
    return engine, sock


def data_sent(log: list[tuple[str, Any]]) -> bytes:
    return b"".join(value for kind, value in log if kind == "data")


Operation = tuple[str, int]
operations = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(1, 3000)),
        st.tuples(st.just("room"), st.integers(0, 5000)),
        st.tuples(st.just("key_update"), st.just(0)),
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_what_goes_out_whatever_the_socket_takes(script: list[Operation]) -> None:
    engine, sock = kernel_engine()
    written = bytearray()
    key_updates_after: list[int] = []  # data bytes the socket had taken when each KeyUpdate was decided
    for number, (operation, size) in enumerate(script):
        if operation == "write":
            data = bytes([number % 256]) * size
            engine.write(data)
            written += data
        elif operation == "room":
            sock.room += size
            engine.flush()
        else:
            key_updates_after.append(len(data_sent(sock.log)))
            engine.key_update()
    engine.close_write()
    sock.room = 1 << 30
    assert engine.flush()
    assert engine.queued == 0

    log = sock.log
    assert data_sent(log) == bytes(written), "application data lost, duplicated or reordered"
    assert log[-2:] == [("record", (ContentType.ALERT, CLOSE_NOTIFY)), ("shutdown", None)]
    assert data_sent(log[:-2]) == bytes(written), "close_notify must follow every byte written before it"
    rekeys = [index for index, entry in enumerate(log) if entry == ("record", (ContentType.HANDSHAKE, KEY_UPDATE))]
    assert len(rekeys) == len(key_updates_after)
    for index, taken in zip(rekeys, key_updates_after, strict=True):
        assert log[index + 1] == ("key", Direction.TX), "the next send key goes in right behind the KeyUpdate"
        # Ahead of every byte the socket had not taken when it was decided (RFC 8446 §4.6.3).
        assert len(data_sent(log[:index])) == taken


@settings(max_examples=200, deadline=None)
@given(operations, st.integers(0, 100))
def test_a_fatal_alert_replaces_what_is_queued(script: list[Operation], room_for_alert: int) -> None:
    engine, sock = kernel_engine()
    for number, (operation, size) in enumerate(script):
        if operation == "write":
            engine.write(bytes([number % 256]) * size)
        elif operation == "room":
            sock.room += size
            engine.flush()
    before = len(sock.log)
    error = RecordAuthenticationError(None, "a record failed authentication")
    with pytest.raises(RecordAuthenticationError):
        engine.run(engine.connection.receive_failed(error))
    sock.room = room_for_alert
    assert engine.fail()
    sock.room = 1 << 30
    engine.flush()
    alert = bytes((2, AlertDescription.bad_record_mac))
    assert sock.log[before:] == [("record", (ContentType.ALERT, alert)), ("shutdown", None)]
    assert not engine.fail(), "a fatal alert goes out once"


def test_tls12_close_notify_from_the_peer_is_answered_behind_queued_data() -> None:
    """RFC 5246 §7.2.1: our close_notify answers the peer's, after what the socket already took — here the
    queued data is still sent first (it was accepted before the peer's close_notify arrived)."""
    engine, sock = kernel_engine(TLSVersion.TLS1_2)
    engine.write(b"x" * 100)
    engine.run(engine.connection.control_record(ContentType.ALERT, CLOSE_NOTIFY))
    sock.room = 1 << 20
    engine.flush()
    assert sock.log == [
        ("data", b"x" * 100),
        ("record", (ContentType.ALERT, CLOSE_NOTIFY)),
        ("shutdown", None),
    ]


# -- reading: the kernel's recvmsg, scripted --------------------------------------------------------------------


#: A NewSessionTicket (lifetime, age_add, empty nonce, a ticket of the given size, no extensions).
def new_session_ticket(ticket_size: int) -> bytes:
    body = b"\x00\x00\x0e\x10" + b"\x01\x02\x03\x04" + b"\x00" + ticket_size.to_bytes(2, "big") + bytes(ticket_size)
    body += b"\x00\x00"
    return bytes([HandshakeType.NEW_SESSION_TICKET]) + len(body).to_bytes(3, "big") + body


Record = tuple[ContentType, bytes]


class ScriptedReceiver:
    """The kernel's side of ``recvmsg_into`` on a kTLS socket, as ``tls_sw_recvmsg`` behaves: application data
    from as many records as fit, scattered over the buffers in order, the rest of a record kept for the next
    call; a record of another type only as the first of a call, alone, with its type in the control message;
    ``BlockingIOError`` once nothing is left."""

    def __init__(self, records: list[Record]) -> None:
        self.records = list(records)

    def recvmsg_into(self, buffers: list[memoryview], ancbufsize: int) -> tuple[int, list[Any], int, None]:
        if not self.records:
            raise BlockingIOError
        room = sum(len(buffer) for buffer in buffers)
        kind = self.records[0][0]
        taken = bytearray()
        while self.records and self.records[0][0] == kind and len(taken) < room:
            record_type, payload = self.records.pop(0)
            part = payload[: room - len(taken)]
            taken += part
            if len(part) < len(payload):
                self.records.insert(0, (record_type, payload[len(part) :]))
            if kind != ContentType.APPLICATION_DATA:
                break
        offset = 0
        for buffer in buffers:
            chunk = taken[offset : offset + len(buffer)]
            buffer[: len(chunk)] = chunk
            offset += len(chunk)
        return len(taken), [(SOL_TLS, TLS_GET_RECORD_TYPE, bytes([kind]))], 0, None

    def recvmsg(self, bufsize: int, ancbufsize: int) -> tuple[bytes, list[Any], int, None]:
        buffer = bytearray(bufsize)
        n, ancdata, flags, address = self.recvmsg_into([memoryview(buffer)], ancbufsize)
        return bytes(buffer[:n]), ancdata, flags, address


received_records = st.lists(
    st.one_of(
        st.binary(min_size=1, max_size=16384).map(lambda data: (ContentType.APPLICATION_DATA, data)),
        st.integers(0, 16000).map(lambda size: (ContentType.HANDSHAKE, new_session_ticket(size))),
        st.just((ContentType.ALERT, bytes((AlertLevel.WARNING, AlertDescription.user_canceled)))),
    ),
    max_size=12,
)


def not_a_flood(records: list[Record]) -> bool:
    """At most a few warning alerts without application data between them (more is a flood, and fatal)."""
    run = 0
    for kind, _ in records:
        run = 0 if kind == ContentType.APPLICATION_DATA else run + (kind == ContentType.ALERT)
        if run > 3:
            return False
    return True


@settings(max_examples=300, deadline=None)
@given(received_records.filter(not_a_flood), st.lists(st.integers(1, 20000), min_size=1, max_size=8), st.booleans())
def test_what_is_read_whatever_the_buffer(records: list[Record], sizes: list[int], into: bool) -> None:
    """Read with ``read_into`` (buffers of the given sizes, in turn) or ``read``: the application data arrives
    byte for byte and in order, whatever the buffer's size against the records'; every control record reaches
    the connection whole (an alert read in pieces is a decode error, and the read would raise)."""
    control = ControlRecords(TLSVersion.TLS1_3, Role.CLIENT, next_key)
    connection = Connection(
        TLSVersion.TLS1_3, Role.CLIENT, installed=Installed(control, kernel_tx=True, kernel_rx=True)
    )
    engine = Engine(cast(socket.socket, ScriptedReceiver(records)), None, connection)
    received = bytearray()
    turn = 0
    while True:
        size = sizes[turn % len(sizes)]
        turn += 1
        try:
            if into:
                buffer = bytearray(size)
                n = engine.read_into(memoryview(buffer))
                if n:
                    received += buffer[:n]
            else:
                data = engine.read(size)
                if data:
                    assert len(data) <= size
                    received += data
        except BlockingIOError:
            break
    assert not engine.plaintext
    assert bytes(received) == b"".join(data for kind, data in records if kind == ContentType.APPLICATION_DATA)

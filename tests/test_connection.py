"""The connection core alone (:mod:`ktls.core.connection`), fed events as plain values: no socket, milliseconds.

Every event in every state, then hypothesis-driven sequences of events: whatever a peer sends and whatever
the application does, the only exceptions are the typed ones, nothing is done after the end, a fatal alert
goes out at most once, close_notify at most once, and the state enums follow the actions announced.
"""

from __future__ import annotations

import ssl
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ktls.constants import AlertDescription, AlertLevel, ContentType, TLSVersion
from ktls.core.connection import Connection, Deliver, HandOffReceive, Receiving, Sending
from ktls.core.control import (
    ControlRecords,
    Fail,
    InstallKey,
    ReadClosed,
    Role,
    SendAlert,
    SendHandshake,
    WriteClosed,
    key_update_message,
)
from ktls.core.handoff import Installed
from ktls.errors import (
    KernelTLSUnavailable,
    KTLSError,
    RaggedEOF,
    RecordAuthenticationError,
    RecordOverflowError,
    StreamClosed,
)
from ktls.kernel import CipherType, CryptoInfo, Direction

TLS12, TLS13 = TLSVersion.TLS1_2, TLSVersion.TLS1_3
TICKET_START = bytes((4, 0, 0, 5, 0))  # the first record of a NewSessionTicket split across records
CLOSE_NOTIFY = SendAlert(AlertLevel.WARNING, AlertDescription.close_notify)


def next_key(direction: Direction) -> CryptoInfo:
    return CryptoInfo.tls13(CipherType.AES_GCM_128, bytes([direction]) * 16, bytes(12))


def kernel_connection(
    version: TLSVersion = TLS13, role: Role = Role.SERVER, *, rekey: bool = True, limit: int | None = 2**24
) -> Connection:
    """A connection whose keys the kernel took both ways (as ``handoff.install`` reports it)."""
    installed = Installed(ControlRecords(version, role, next_key if rekey else None), kernel_tx=True, kernel_rx=True)
    installed.record_limit = limit
    return Connection(version, role, installed=installed)


def userspace_connection(version: TLSVersion = TLS13) -> Connection:
    return Connection(version, Role.SERVER, fallback_reason="no tls ULP")


# -- every event, by state -----------------------------------------------------------------------------------------


def test_states_start_where_the_kernel_is() -> None:
    kernel = kernel_connection()
    assert (kernel.receiving, kernel.sending) == (Receiving.KERNEL, Sending.KERNEL)
    assert kernel.kernel_tx
    assert kernel.kernel_rx
    assert kernel.fallback_reason is None
    user = userspace_connection()
    assert (user.receiving, user.sending) == (Receiving.USERSPACE, Sending.USERSPACE)
    assert not user.kernel_tx
    assert not user.kernel_rx
    assert user.fallback_reason == "no tls ULP"
    assert "fallback: no tls ULP" in user.describe()


def test_tls13_close_notify_closes_the_read_side_only() -> None:
    connection = kernel_connection(TLS13)
    assert connection.control_record(ContentType.ALERT, b"\x01\x00") == [ReadClosed()]
    assert (connection.receiving, connection.sending) == (Receiving.CLOSED, Sending.KERNEL)
    assert connection.end_of_stream() == b""
    assert not connection.ragged_eof


def test_tls12_close_notify_is_answered_and_closes_both() -> None:
    connection = kernel_connection(TLS12, rekey=False)
    actions = connection.control_record(ContentType.ALERT, b"\x01\x00")
    assert actions == [ReadClosed(), CLOSE_NOTIFY, WriteClosed()]
    assert (connection.receiving, connection.sending) == (Receiving.CLOSED, Sending.CLOSED)
    with pytest.raises(StreamClosed):
        connection.check_writable()


def test_ragged_eof_policy() -> None:
    suppressed = kernel_connection()
    assert suppressed.end_of_stream() == b""
    assert suppressed.ragged_eof
    assert suppressed.receiving is Receiving.CLOSED
    strict = kernel_connection()
    strict.suppress_ragged_eofs = False
    with pytest.raises(RaggedEOF):
        strict.end_of_stream()
    assert strict.ragged_eof


@pytest.mark.parametrize("error_type", [RecordAuthenticationError, RecordOverflowError])
def test_a_record_the_kernel_refuses_gets_its_alert_once(error_type: type[RecordAuthenticationError]) -> None:
    connection = kernel_connection()
    error = error_type(74, "refused")
    actions = connection.receive_failed(error)
    assert actions == [SendAlert(AlertLevel.FATAL, error.alert), Fail(error)]
    assert (connection.receiving, connection.sending) == (Receiving.CLOSED, Sending.CLOSED)
    assert connection.error is error
    assert connection.receive_failed(error_type(74, "again")) == [Fail(error)]  # no second alert
    assert connection.close_write() == []  # no close_notify after a fatal alert


def test_key_update_requested_is_answered_before_the_new_send_key() -> None:
    connection = kernel_connection(TLS13)
    actions = connection.control_record(ContentType.HANDSHAKE, key_update_message(True))
    assert actions == [
        InstallKey(Direction.RX, next_key(Direction.RX)),
        SendHandshake(key_update_message(False)),
        InstallKey(Direction.TX, next_key(Direction.TX)),
    ]
    assert connection.key_updates_received == 1


def test_key_update_needs_the_kernel_sending() -> None:
    with pytest.raises(KernelTLSUnavailable):
        userspace_connection().key_update()


def test_send_budget_asks_the_kernel_then_rekeys_and_restarts() -> None:
    connection = kernel_connection(TLS13, limit=10)
    assert not connection.sent(16384 * 4)  # 5 records at most
    assert connection.sent(16384 * 4)  # 10: ask the kernel
    assert connection.kernel_record_count(7) == []  # the kernel says 7: not yet
    assert connection.sent(16384 * 2)
    actions = connection.kernel_record_count(10)
    assert actions == [SendHandshake(key_update_message(False)), InstallKey(Direction.TX, next_key(Direction.TX))]
    assert not connection.sent(100)  # a new key: counting starts again


def test_send_budget_without_rekey_closes_the_write_side_with_the_reason() -> None:
    connection = kernel_connection(TLS12, rekey=False, limit=4)
    assert connection.sent(16384 * 4)
    assert connection.kernel_record_count(4) == [CLOSE_NOTIFY, WriteClosed()]
    assert connection.sending is Sending.CLOSED
    with pytest.raises(StreamClosed, match="usage limit"):
        connection.check_writable()
    assert connection.write_closed_reason is not None
    assert connection.kernel_record_count(5) == []  # nothing more once closed


def test_close_write_once() -> None:
    connection = kernel_connection()
    assert connection.close_write() == [CLOSE_NOTIFY, WriteClosed()]
    assert connection.close_write() == []
    assert connection.sending is Sending.CLOSED
    assert connection.receiving is Receiving.KERNEL  # TLS 1.3: the peer may go on (RFC 8446 §6.1)


def test_record_limit_is_settable() -> None:
    connection = kernel_connection()
    connection.record_limit = 64
    assert connection.record_limit == 64


def test_the_hand_off_is_followed() -> None:
    connection = kernel_connection(TLS13, Role.CLIENT)
    connection.receive_handed_off("EINVAL")
    assert connection.receiving is Receiving.USERSPACE
    assert connection.fallback_reason == "receive stays in user space: EINVAL"


# -- sequences of events -------------------------------------------------------------------------------------------

ALERTS = [bytes((level, description)) for level in (1, 2, 3) for description in (0, 10, 20, 22, 40, 90, 100, 255)]
HANDSHAKES = [
    key_update_message(False),
    key_update_message(True),
    bytes((24, 0, 0, 1, 2)),  # KeyUpdate with an illegal request value
    key_update_message(False) + key_update_message(False),  # KeyUpdate not last in its record
    bytes((4, 0, 0, 5)) + bytes(5),  # NewSessionTicket
    bytes((0, 0, 0, 0)),  # HelloRequest
    key_update_message(False)[:2],  # the start of a message split across records
    key_update_message(False)[2:],  # and its end
    b"",  # an empty handshake record
    bytes((1, 0, 0, 2, 3, 3)),  # ClientHello
    bytes((13, 0, 0, 0)),  # CertificateRequest
    bytes((24, 0, 0)),  # a message cut by the record's end
    b"",
]
record = st.one_of(
    st.tuples(st.just(ContentType.ALERT), st.sampled_from([*ALERTS, b"", b"\x01", b"\x01\x00\x00"])),
    st.tuples(st.just(ContentType.HANDSHAKE), st.sampled_from(HANDSHAKES)),
    st.tuples(st.just(ContentType.CHANGE_CIPHER_SPEC), st.just(b"\x01")),
    st.tuples(st.sampled_from([0, 19, 24, 99, 255]), st.binary(max_size=4)),
)
event = st.one_of(
    st.tuples(st.just("record"), record),
    st.tuples(st.just("data"), st.none()),
    st.tuples(st.just("refused"), st.sampled_from([RecordAuthenticationError, RecordOverflowError])),
    st.tuples(st.just("eof"), st.none()),
    st.tuples(st.just("close"), st.none()),
    st.tuples(st.just("key_update"), st.booleans()),
    st.tuples(st.just("sent"), st.integers(0, 2**20)),
    st.tuples(st.just("write"), st.none()),
)


def apply(connection: Connection, name: str, argument: Any) -> list[Any]:
    if name == "record":
        return list(connection.control_record(int(argument[0]), argument[1]))
    if name == "data":
        return list(connection.application_data())
    if name == "refused":
        return list(connection.receive_failed(argument(74, "refused")))
    if name == "eof":
        connection.end_of_stream()
        return []
    if name == "close":
        return list(connection.close_write())
    if name == "key_update":
        return list(connection.key_update(argument))
    if name == "sent":
        return list(connection.kernel_record_count(None)) if connection.sent(argument) else []
    connection.check_writable()
    return []


@settings(max_examples=300, deadline=None)
@given(
    version=st.sampled_from([TLS12, TLS13]),
    role=st.sampled_from([Role.CLIENT, Role.SERVER]),
    rekey=st.booleans(),
    events=st.lists(event, max_size=40),
)
def test_no_sequence_of_events_breaks_the_rules(  # noqa: PLR0912 - one branch per rule checked
    version: TLSVersion, role: Role, rekey: bool, events: list[tuple[str, Any]]
) -> None:
    connection = kernel_connection(version, role, rekey=rekey and version is TLS13, limit=64)
    fatal_alerts = close_notifies = 0
    failed = False
    for name, argument in events:
        if name == "key_update" and version is TLS12 and connection.error is None:
            with pytest.raises((ValueError, StreamClosed)):  # KeyUpdate exists only in TLS 1.3
                apply(connection, name, argument)
            continue
        read_ended = connection.receiving is Receiving.CLOSED and not failed
        try:
            actions = apply(connection, name, argument)
        except KTLSError:  # the typed errors: nothing else may escape
            continue
        if read_ended and name == "record":
            # RFC 8446 §6.1: after a closure alert (or the EOF) every record is ignored — no key, alert or end.
            assert actions == [], (argument, actions)
        if failed:
            # After the end: nothing but the same failure, never an alert, a key or a record.
            assert all(isinstance(action, Fail) for action in actions), (name, actions)
        for index, action in enumerate(actions):
            if isinstance(action, SendAlert) and action.level is AlertLevel.FATAL:
                fatal_alerts += 1
            if action == CLOSE_NOTIFY:
                close_notifies += 1
            if isinstance(action, Fail):
                assert index == len(actions) - 1, "Fail ends the actions"
                failed = True
            if isinstance(action, ReadClosed):
                assert connection.receiving is Receiving.CLOSED
            if isinstance(action, WriteClosed):
                assert connection.sending is Sending.CLOSED
            assert not isinstance(action, (Deliver, HandOffReceive))  # only the deferred window hands off
        if failed:
            assert (connection.receiving, connection.sending) == (Receiving.CLOSED, Sending.CLOSED)
            assert connection.error is not None
        assert fatal_alerts <= 1
        assert close_notifies <= 1
        assert not (fatal_alerts and close_notifies > 1)
    if connection.sending is Sending.CLOSED:
        with pytest.raises(StreamClosed):
            connection.check_writable()


def test_deferred_window_needs_one() -> None:
    connection = kernel_connection()
    with pytest.raises(RuntimeError):
        connection.deferred_record(_unused_handshake(), b"")


def _unused_handshake() -> Any:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    from ktls.core.handshake import Handshake

    return Handshake(context, server_side=False)


def test_application_data_interrupting_a_tls13_handshake_message_ends_the_connection() -> None:
    """RFC 8446 §5.1 through the core: the hot-path call answers with the alert once a fragment is pending."""
    connection = kernel_connection(TLS13)
    assert connection.application_data() == []
    assert connection.control_record(ContentType.HANDSHAKE, TICKET_START) == []
    actions = connection.application_data()
    assert actions[0] == SendAlert(AlertLevel.FATAL, AlertDescription.unexpected_message)
    assert isinstance(actions[1], Fail)
    assert connection.receiving is Receiving.CLOSED
    assert connection.sending is Sending.CLOSED


def test_version_is_the_stdlib_enum() -> None:
    assert kernel_connection(TLS13).version is ssl.TLSVersion.TLSv1_3
    assert kernel_connection(TLS12).version is ssl.TLSVersion.TLSv1_2


def test_read_by_recvmsg_tells_recvmsg_from_splice() -> None:
    """``ktls.splice`` copies after the first ``recvmsg`` of application data on Linux < 5.16 (it could pass over
    what ``recvmsg`` left in the kernel): the core tells the two kinds of read apart."""
    connection = kernel_connection()
    assert not connection.read_by_recvmsg
    assert connection.spliced_data() == []
    assert not connection.read_by_recvmsg
    assert connection.application_data() == []
    assert connection.read_by_recvmsg

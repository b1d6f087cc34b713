"""The control-record state machine, fed plain bytes: every rule it enforces, with the alert it sends."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ktls.constants import AlertDescription, AlertLevel, ContentType, TLSVersion
from ktls.core.control import (
    Action,
    ControlRecords,
    Fail,
    InstallKey,
    ReadClosed,
    ResumeReceive,
    Role,
    SendAlert,
    SendHandshake,
    SessionTicket,
    WriteClosed,
    key_update_message,
)
from ktls.errors import (
    AlertReceived,
    PeerMisbehaved,
    RecordAuthenticationError,
    RekeyUnsupported,
    StreamClosed,
)
from ktls.kernel import CipherType, CryptoInfo, Direction

TLS12, TLS13 = TLSVersion.TLS1_2, TLSVersion.TLS1_3
TICKET = bytes([4, 0, 0, 5]) + b"\x00\x00\x00\x10\x00"


def next_key(direction: Direction) -> CryptoInfo:
    return CryptoInfo.tls13(CipherType.AES_GCM_128, bytes([direction]) * 16, bytes(12))


def machine(version: TLSVersion = TLS13, role: Role = Role.CLIENT, rekey: bool = True) -> ControlRecords:
    return ControlRecords(version, role, next_key if rekey else None)


def fatal(actions: list[Action], alert: AlertDescription) -> PeerMisbehaved:
    assert actions[0] == SendAlert(AlertLevel.FATAL, alert)
    assert isinstance(actions[1], Fail)
    error = actions[1].error
    assert isinstance(error, PeerMisbehaved)
    assert error.alert is alert
    return error


def test_tls13_close_notify_closes_only_the_read_side() -> None:
    state = machine(TLS13)
    assert state.receive_record(ContentType.ALERT, b"\x01\x00") == [ReadClosed()]
    assert state.read_closed
    assert not state.write_closed
    state.check_writable()


def test_tls12_close_notify_is_answered_and_closes_both_ways() -> None:
    state = machine(TLS12)
    actions = state.receive_record(ContentType.ALERT, b"\x01\x00")
    assert actions == [ReadClosed(), SendAlert(AlertLevel.WARNING, AlertDescription.close_notify), WriteClosed()]
    with pytest.raises(StreamClosed):
        state.check_writable()


def test_our_close_notify_is_sent_once() -> None:
    state = machine()
    assert state.close_write() == [SendAlert(AlertLevel.WARNING, AlertDescription.close_notify), WriteClosed()]
    assert state.close_write() == []
    with pytest.raises(StreamClosed) as caught:
        state.check_writable()
    assert caught.value.errno is not None


@pytest.mark.parametrize("version", [TLS12, TLS13])
def test_fatal_alert_raises_with_its_name_and_sends_nothing(version: TLSVersion) -> None:
    state = machine(version)
    actions = state.receive_record(ContentType.ALERT, bytes([2, AlertDescription.handshake_failure]))
    assert len(actions) == 1
    assert isinstance(actions[0], Fail)
    assert isinstance(actions[0].error, AlertReceived)
    assert actions[0].error.alert is AlertDescription.handshake_failure
    assert "handshake_failure" in str(actions[0].error)
    # sticky
    assert state.receive_record(ContentType.ALERT, b"\x01\x00") == actions


def test_tls12_warnings_are_ignored_tls13_warnings_are_fatal() -> None:
    assert machine(TLS12).receive_record(ContentType.ALERT, bytes([1, AlertDescription.no_renegotiation])) == []
    actions = machine(TLS13).receive_record(ContentType.ALERT, bytes([1, AlertDescription.bad_certificate]))
    assert isinstance(actions[0], Fail)
    assert machine(TLS13).receive_record(ContentType.ALERT, bytes([1, AlertDescription.user_canceled])) == []


@pytest.mark.parametrize("version", [TLS12, TLS13])
@pytest.mark.parametrize(
    "payload",
    [b"\x01", b"\x02", b"\x01\x00\x00", b"\x01\x00\x01\x00", b"\x02\x28\x02\x28", bytes(200)],
    ids=["one byte", "one fatal byte", "three bytes", "two close_notify coalesced", "two fatal coalesced", "long"],
)
def test_malformed_alert_is_a_decode_error(version: TLSVersion, payload: bytes) -> None:
    """RFC 8446 §6 / RFC 5246 §7.2: an alert is exactly level + description; OpenSSL: decode_error."""
    state = machine(version)
    fatal(state.receive_record(ContentType.ALERT, payload), AlertDescription.decode_error)


@pytest.mark.parametrize("version", [TLS12, TLS13])
def test_empty_alert_record_is_unexpected(version: TLSVersion) -> None:
    """RFC 8446 §5.1: no zero-length Alert fragments; OpenSSL answers unexpected_message."""
    fatal(machine(version).receive_record(ContentType.ALERT, b""), AlertDescription.unexpected_message)


@pytest.mark.parametrize("version", [TLS12, TLS13])
def test_empty_handshake_record_is_unexpected_also_mid_message(version: TLSVersion) -> None:
    state = machine(version)
    assert state.receive_record(ContentType.HANDSHAKE, TICKET[:3]) == []
    fatal(state.receive_record(ContentType.HANDSHAKE, b""), AlertDescription.unexpected_message)


@pytest.mark.parametrize("split", range(1, len(key_update_message(False))))
def test_key_update_split_across_records_is_accepted(split: int) -> None:
    """A KeyUpdate may span records as long as it ends its last one (RFC 8446 §5.1). Its first record makes
    Linux ≥ 6.14 pause receiving: the current key goes back in (ResumeReceive) to read the rest."""
    state = machine()
    message = key_update_message(False)
    assert state.receive_record(ContentType.HANDSHAKE, message[:split]) == [ResumeReceive()]
    actions = state.receive_record(ContentType.HANDSHAKE, message[split:])
    assert actions == [InstallKey(Direction.RX, next_key(Direction.RX))]


def test_a_fragment_that_starts_with_the_key_update_byte_resumes_receiving() -> None:
    """The kernel looks at a record's first byte only: a ticket fragment starting with 24 pauses it too."""
    ticket = bytes([4, 0, 0, 5, 24, 0, 0, 16, 0])
    state = machine()
    assert state.receive_record(ContentType.HANDSHAKE, ticket[:4]) == []
    assert state.receive_record(ContentType.HANDSHAKE, ticket[4:]) == [SessionTicket(ticket), ResumeReceive()]


def test_no_resume_where_the_kernel_never_pauses() -> None:
    """Before Linux 6.14 there is no rekey and no pause; a complete KeyUpdate installs the next key instead."""
    state = machine(rekey=False)
    assert state.receive_record(ContentType.HANDSHAKE, key_update_message(False)[:2]) == []
    assert ResumeReceive() not in machine().receive_record(ContentType.HANDSHAKE, key_update_message(False))


@pytest.mark.parametrize("sizes", [(1,) * 9, (2, 7), (3, 3, 3), (4, 5), (8, 1)])
def test_ticket_in_fragments_of_every_size(sizes: tuple[int, ...]) -> None:
    state = machine()
    offset, actions = 0, []
    for size in sizes:
        actions += state.receive_record(ContentType.HANDSHAKE, TICKET[offset : offset + size])
        offset += size
    assert offset == len(TICKET)
    assert actions == [SessionTicket(TICKET)]


@pytest.mark.parametrize("between", [ContentType.ALERT, ContentType.CHANGE_CIPHER_SPEC, 99])
def test_tls13_record_between_handshake_fragments_is_unexpected(between: int) -> None:
    """RFC 8446 §5.1: handshake messages MUST NOT be interleaved with other record types."""
    state = machine(TLS13)
    assert state.receive_record(ContentType.HANDSHAKE, TICKET[:5]) == []
    error = fatal(state.receive_record(between, b"\x01\x00"), AlertDescription.unexpected_message)
    assert "interrupted" in str(error)


def test_tls13_application_data_between_handshake_fragments_is_unexpected() -> None:
    state = machine(TLS13)
    assert state.application_data_received() == []
    assert state.receive_record(ContentType.HANDSHAKE, TICKET[:5]) == []
    fatal(state.application_data_received(), AlertDescription.unexpected_message)


def test_tls12_allows_other_records_between_handshake_fragments() -> None:
    """RFC 5246 §6.2.1: record types "MAY be interleaved"; the HelloRequest still gets its answer."""
    state = machine(TLS12, Role.CLIENT)
    assert state.receive_record(ContentType.HANDSHAKE, b"\x00\x00") == []
    assert state.application_data_received() == []
    assert state.receive_record(ContentType.ALERT, b"\x01\x64") == []  # a warning: no_renegotiation
    assert state.receive_record(ContentType.HANDSHAKE, b"\x00\x00") == [
        SendAlert(AlertLevel.WARNING, AlertDescription.no_renegotiation)
    ]


def test_unknown_alert_level_in_tls12() -> None:
    fatal(machine(TLS12).receive_record(ContentType.ALERT, b"\x07\x0a"), AlertDescription.illegal_parameter)


@pytest.mark.parametrize("version", [TLS12, TLS13])
def test_change_cipher_spec_and_unknown_types_are_unexpected(version: TLSVersion) -> None:
    fatal(machine(version).receive_record(ContentType.CHANGE_CIPHER_SPEC, b"\x01"), AlertDescription.unexpected_message)
    fatal(machine(version).receive_record(99, b"x"), AlertDescription.unexpected_message)


def test_ticket_goes_to_the_client_and_is_refused_by_a_server() -> None:
    assert machine(role=Role.CLIENT).receive_record(ContentType.HANDSHAKE, TICKET) == [SessionTicket(TICKET)]
    fatal(machine(role=Role.SERVER).receive_record(ContentType.HANDSHAKE, TICKET), AlertDescription.unexpected_message)


def test_ticket_split_across_records_is_reassembled() -> None:
    state = machine()
    assert state.receive_record(ContentType.HANDSHAKE, TICKET[:3]) == []
    assert state.receive_record(ContentType.HANDSHAKE, TICKET[3:6]) == []
    assert state.receive_record(ContentType.HANDSHAKE, TICKET[6:] + TICKET) == [SessionTicket(TICKET)] * 2


def test_key_update_installs_the_next_rx_key() -> None:
    state = machine()
    assert state.receive_record(ContentType.HANDSHAKE, key_update_message(False)) == [
        InstallKey(Direction.RX, next_key(Direction.RX))
    ]
    assert state.key_updates_received == 1


def test_requested_key_update_is_answered_then_tx_rekeyed() -> None:
    actions = machine().receive_record(ContentType.HANDSHAKE, key_update_message(True))
    assert actions == [
        InstallKey(Direction.RX, next_key(Direction.RX)),
        SendHandshake(key_update_message(False)),
        InstallKey(Direction.TX, next_key(Direction.TX)),
    ]


def test_key_update_must_end_its_record() -> None:
    fatal(
        machine().receive_record(ContentType.HANDSHAKE, key_update_message(False) + TICKET),
        AlertDescription.unexpected_message,
    )
    fatal(
        machine().receive_record(ContentType.HANDSHAKE, key_update_message(False) + b"\x04\x00"),
        AlertDescription.unexpected_message,
    )


def test_bad_key_updates() -> None:
    fatal(machine().receive_record(ContentType.HANDSHAKE, b"\x18\x00\x00\x01\x02"), AlertDescription.illegal_parameter)
    fatal(machine().receive_record(ContentType.HANDSHAKE, b"\x18\x00\x00\x02\x00\x00"), AlertDescription.decode_error)


def test_key_update_on_a_kernel_that_cannot_rekey_fails_clearly() -> None:
    actions = machine(rekey=False).receive_record(ContentType.HANDSHAKE, key_update_message(False))
    assert actions[0] == SendAlert(AlertLevel.FATAL, AlertDescription.internal_error)
    assert isinstance(actions[1], Fail)
    assert isinstance(actions[1].error, RekeyUnsupported)
    assert "6.14" in str(actions[1].error)


def test_our_key_update() -> None:
    assert machine().key_update(request_peer_update=True) == [
        SendHandshake(key_update_message(True)),
        InstallKey(Direction.TX, next_key(Direction.TX)),
    ]
    with pytest.raises(RekeyUnsupported):
        machine(rekey=False).key_update(request_peer_update=False)
    with pytest.raises(ValueError, match="only in TLS 1"):
        machine(TLS12).key_update(request_peer_update=False)


def test_tls12_renegotiation_is_refused_with_a_warning() -> None:
    refusal = [SendAlert(AlertLevel.WARNING, AlertDescription.no_renegotiation)]
    client = machine(TLS12, Role.CLIENT)
    assert client.receive_record(ContentType.HANDSHAKE, b"\x00\x00\x00\x00") == refusal
    client.check_writable()  # still usable
    hello = bytes([1, 0, 0, 4]) + b"\x03\x03\x00\x00"
    assert machine(TLS12, Role.SERVER).receive_record(ContentType.HANDSHAKE, hello) == refusal
    fatal(
        machine(TLS12, Role.SERVER).receive_record(ContentType.HANDSHAKE, b"\x00\x00\x00\x00"),
        AlertDescription.unexpected_message,
    )


@pytest.mark.parametrize("kind", [2, 8, 11, 13, 15, 20])
def test_other_handshake_messages_are_unexpected(kind: int) -> None:
    fatal(machine().receive_record(ContentType.HANDSHAKE, bytes([kind, 0, 0, 0])), AlertDescription.unexpected_message)


def test_empty_handshake_record_is_unexpected() -> None:
    fatal(machine().receive_record(ContentType.HANDSHAKE, b""), AlertDescription.unexpected_message)


def test_kernel_record_error_sends_its_alert() -> None:
    state = machine()
    error = RecordAuthenticationError(74, "bad")
    assert state.record_failed(error) == [SendAlert(AlertLevel.FATAL, AlertDescription.bad_record_mac), Fail(error)]
    assert state.receive_record(ContentType.ALERT, b"\x01\x00") == [Fail(error)]


@given(
    version=st.sampled_from([TLS12, TLS13]),
    role=st.sampled_from(list(Role)),
    records=st.lists(st.tuples(st.sampled_from([20, 21, 22, 24, 0, 255]), st.binary(max_size=40)), max_size=8),
)
def test_any_input_gives_actions_or_a_typed_failure(
    version: TLSVersion, role: Role, records: list[tuple[int, bytes]]
) -> None:
    """Whatever the peer sends, the machine answers with actions; once it fails it stays failed."""
    state = machine(version, role)
    failed = False
    for content_type, payload in records:
        actions = state.receive_record(content_type, payload)
        if failed:
            assert len(actions) == 1
            assert isinstance(actions[0], Fail)
        failed = failed or any(isinstance(a, Fail) for a in actions)


def test_key_update_flood_is_refused() -> None:
    from ktls.core.control import MAX_KEY_UPDATES_WITHOUT_DATA

    state = machine()
    for _ in range(MAX_KEY_UPDATES_WITHOUT_DATA):
        assert isinstance(state.receive_record(ContentType.HANDSHAKE, key_update_message(False))[0], InstallKey)
    state.application_data_received()
    for _ in range(MAX_KEY_UPDATES_WITHOUT_DATA):
        state.receive_record(ContentType.HANDSHAKE, key_update_message(True))
    fatal(state.receive_record(ContentType.HANDSHAKE, key_update_message(False)), AlertDescription.unexpected_message)


def test_tls12_warning_alert_flood_is_refused_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """RFC 5246 sets no bound on warning alerts; OpenSSL refuses the sixth in a row without data
    (``MAX_WARN_ALERT_COUNT``), and so do we. Only the first one of a connection is logged at WARNING."""
    from ktls.core.control import MAX_WARNING_ALERTS_WITHOUT_DATA

    state = machine(TLS12)
    warning = bytes([AlertLevel.WARNING, AlertDescription.no_renegotiation])
    with caplog.at_level("DEBUG", logger="ktls"):
        for _ in range(MAX_WARNING_ALERTS_WITHOUT_DATA):
            assert state.receive_record(ContentType.ALERT, warning) == []
        state.application_data_received()
        for _ in range(MAX_WARNING_ALERTS_WITHOUT_DATA):
            assert state.receive_record(ContentType.ALERT, warning) == []
        fatal(state.receive_record(ContentType.ALERT, warning), AlertDescription.unexpected_message)
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "warning alert" in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.parametrize("version", [TLS12, TLS13])
def test_send_key_exhausted_without_rekey_closes_the_write_side(version: TLSVersion) -> None:
    """RFC 8446 §5.5: a key at its usage limit that cannot be replaced means the connection stops sending."""
    state = machine(version, rekey=False)
    actions = state.send_key_exhausted(2**24)
    assert actions == [SendAlert(AlertLevel.WARNING, AlertDescription.close_notify), WriteClosed()]
    with pytest.raises(StreamClosed, match=r"usage limit \(16777216 records"):
        state.check_writable()
    assert state.send_key_exhausted(2**24) == []  # once


def test_send_key_exhausted_with_rekey_updates_the_key() -> None:
    actions = machine(TLS13, rekey=True).send_key_exhausted(2**24)
    assert actions[0] == SendHandshake(key_update_message(False))
    assert isinstance(actions[1], InstallKey)
    assert actions[1].direction is Direction.TX

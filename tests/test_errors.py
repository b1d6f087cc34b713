"""Errors by whose fault they are: one root per fault, one class per fault, TCP's errors untouched."""

from __future__ import annotations

import errno

import pytest

from ktls import errors
from ktls.constants import AlertDescription
from ktls.kernel import syscalls
from ktls.tls.records import parse_record_header

PEER = [
    errors.PeerMisbehaved,
    errors.AlertReceived,
    errors.RaggedEOF,
    errors.RecordError,
    errors.RecordAuthenticationError,
    errors.RecordOverflowError,
    errors.RecordHeaderError,
]
KERNEL_CANNOT = [
    errors.ULPUnavailable,
    errors.CipherUnavailable,
    errors.RekeyUnsupported,
    errors.OptionUnavailable,
]
KERNEL_FAILED = [errors.KernelTLSConfigError, errors.ControlRecordPending, errors.RekeyPending]


@pytest.mark.parametrize("cls", PEER)
def test_every_peer_fault_is_a_protocol_error_with_an_alert(cls: type[errors.KTLSError]) -> None:
    assert issubclass(cls, errors.TLSProtocolError)
    assert not issubclass(cls, (errors.KernelTLSUnavailable, errors.KernelTLSFailure, errors.StreamClosed))


@pytest.mark.parametrize("cls", KERNEL_CANNOT)
def test_kernel_cannot_is_apart(cls: type[errors.KTLSError]) -> None:
    assert issubclass(cls, errors.KernelTLSUnavailable)
    assert not issubclass(cls, (errors.TLSProtocolError, errors.KernelTLSFailure))


@pytest.mark.parametrize("cls", KERNEL_FAILED)
def test_kernel_failures_are_apart(cls: type[errors.KTLSError]) -> None:
    assert issubclass(cls, errors.KernelTLSFailure)
    assert not issubclass(cls, (errors.TLSProtocolError, errors.KernelTLSUnavailable))


def test_misuse_is_apart() -> None:
    assert not issubclass(errors.StreamClosed, (errors.TLSProtocolError, errors.KernelTLSUnavailable))


def test_one_class_for_an_oversized_record_whoever_found_it() -> None:
    header = bytes((23, 3, 3)) + (2**14 + 2048 + 1).to_bytes(2, "big")
    with pytest.raises(errors.RecordOverflowError) as parsed:
        parse_record_header(header)
    assert parsed.value.errno is None
    assert parsed.value.alert is AlertDescription.record_overflow
    kernel = errors.RecordOverflowError(errno.EMSGSIZE, "the kernel refused a record")
    assert kernel.alert is parsed.value.alert
    assert "EMSGSIZE" in str(kernel)


@pytest.mark.parametrize("cls", [ConnectionResetError, BrokenPipeError, ConnectionAbortedError, TimeoutError])
def test_tcp_errors_pass_through_untouched(cls: type[OSError]) -> None:
    original = cls(errno.ECONNRESET, "from TCP")
    with pytest.raises(cls) as raised:
        syscalls.raise_receive_error(original)
    assert raised.value is original


def test_a_record_the_kernel_refuses_is_typed() -> None:
    with pytest.raises(errors.RecordAuthenticationError) as raised:
        syscalls.raise_receive_error(OSError(errno.EBADMSG, "Bad message"))
    assert raised.value.alert is AlertDescription.bad_record_mac
    assert raised.value.errno == errno.EBADMSG

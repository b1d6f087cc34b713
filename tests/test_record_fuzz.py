"""A valid post-handshake record stream, mutated by hypothesis, against both front ends in the guests.

The peer (``hostile_peer``: a raw socket and the independent record layer) sends application data, tickets
and KeyUpdates — fragmented at any byte, padded (TLS 1.3), interleaved, reordered with forged and malformed
records (a wrong type, a flipped bit, an empty or oversized record, a cut header) — then ends with or without
close_notify and a FIN. Whatever it sends, our side must:

* end within the bound (``TIMEOUT``), cleanly or with a typed error (``KTLSError`` or a ``ConnectionError``);
* deliver only a prefix of the application data the peer sent, in order, byte for byte;
* send the peer at most one fatal alert, nothing after it, and the alert its error names;
* release its descriptor.

Examples are derandomized (the same on every run) and few per kernel, so the matrix stays short; the
deterministic rules each have their row in ``test_hostile_peers``.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from frontends import FRONT_ENDS, FrontEnd
from hostile_peer import Hostile
from ktls.constants import AlertLevel, ContentType, HandshakeType, TLSVersion
from ktls.errors import KTLSError
from ktls.kernel import KernelSupport
from test_hostile_peers import KEYS12, KEYS13, KEYS13_CLIENT, Setup, with_keys

pytestmark = pytest.mark.kernel

TICKET_BODY = b"\x00\x00\x0e\x10" + b"\x18\x02\x03\x04" + b"\x00" + b"\x00\x03abc" + b"\x00\x00"
TICKET = bytes([HandshakeType.NEW_SESSION_TICKET]) + len(TICKET_BODY).to_bytes(3, "big") + TICKET_BODY
KEY_UPDATE = bytes([HandshakeType.KEY_UPDATE, 0, 0, 1, 0])

# One step of the peer: ("data", payload, padding) | ("ticket", cut) | ("key_update", cut) | ("close_notify",)
# | ("forged", content_type, payload) | ("flip", offset) | ("empty", content_type) | ("cut_header", keep)
step = st.one_of(
    st.tuples(st.just("data"), st.binary(min_size=0, max_size=300), st.integers(0, 40)),
    st.tuples(st.just("ticket"), st.integers(0, len(TICKET) - 1)),
    st.tuples(st.just("key_update"), st.integers(0, len(KEY_UPDATE) - 1)),
    st.tuples(st.just("close_notify")),
    st.tuples(st.just("forged"), st.sampled_from([0, 20, 21, 22, 24, 99, 255]), st.binary(max_size=6)),
    st.tuples(st.just("flip"), st.integers(0, 200)),
    st.tuples(st.just("empty"), st.sampled_from([21, 22, 23])),
    st.tuples(st.just("cut_header"), st.integers(1, 4)),
)


def wire(peer: Hostile, steps: list[tuple[object, ...]], version: TLSVersion, rekey: bool) -> tuple[bytes, bytes]:
    """The bytes the peer sends for ``steps``, and the application data they carry in order."""
    out, data = bytearray(), bytearray()
    tls13 = version is TLSVersion.TLS1_3
    for kind, *args in steps:
        if kind == "data":
            payload, padding = args
            assert isinstance(payload, bytes)
            assert isinstance(padding, int)
            out += peer.out.seal(ContentType.APPLICATION_DATA, payload, padding=padding if tls13 else 0)
            data += payload
        elif kind in ("ticket", "key_update"):
            cut = args[0]
            assert isinstance(cut, int)
            if not tls13 or (kind == "key_update" and not rekey):
                continue  # TLS 1.2 has neither; a kernel that cannot rekey is test_hostile_peers' flood case
            if kind == "key_update":
                out += peer.key_update(split=cut)
                continue
            pieces = [TICKET[:cut], TICKET[cut:]] if cut else [TICKET]
            out += b"".join(peer.seal(ContentType.HANDSHAKE, piece) for piece in pieces)
        elif kind == "close_notify":
            out += peer.seal(ContentType.ALERT, bytes([AlertLevel.WARNING, 0]))
        elif kind == "forged":
            content_type, payload = args
            assert isinstance(content_type, int)
            assert isinstance(payload, bytes)
            out += peer.seal(content_type, payload)
        elif kind == "flip":
            record = bytearray(peer.seal(ContentType.APPLICATION_DATA, b"flipped"))
            offset = args[0]
            assert isinstance(offset, int)
            record[5 + offset % (len(record) - 5)] ^= 0x40
            out += record
        elif kind == "empty":
            content_type = args[0]
            assert isinstance(content_type, int)
            out += peer.seal(content_type, b"")
        else:  # cut_header: a record header cut short, then the next record's bytes
            keep = args[0]
            assert isinstance(keep, int)
            out += peer.seal(ContentType.APPLICATION_DATA, b"never whole")[:keep]
    return bytes(out), bytes(data)


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


@pytest.fixture(params=list(FRONT_ENDS))
def front_end(request: pytest.FixtureRequest, support: KernelSupport) -> Iterator[FrontEnd]:
    made = FRONT_ENDS[request.param]()
    yield made
    made.shut_down()


@pytest.mark.parametrize("setup", [KEYS13, KEYS12, KEYS13_CLIENT], ids=lambda s: s.name)
@settings(
    max_examples=30,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=st.lists(step, max_size=12), fin=st.booleans())
def test_mutated_record_streams(
    front_end: FrontEnd, support: KernelSupport, setup: Setup, steps: list[tuple[object, ...]], fin: bool
) -> None:
    before = open_fds()
    ours, peer = with_keys(front_end, setup, 65536)
    try:
        sent, data = wire(peer, steps, setup.version, support.rekey)
        with contextlib.suppress(OSError):  # our side may already have failed and reset
            peer.sock.sendall(sent)
            if fin:
                peer.sock.shutdown(socket.SHUT_WR)
            else:
                peer.send(ContentType.ALERT, bytes([AlertLevel.WARNING, 0]))
                peer.sock.shutdown(socket.SHUT_WR)
        received, end = ours.finish()  # bounded: the adapter fails the test past TIMEOUT
        assert data.startswith(received), "delivered bytes that were not sent, or out of order"
        if end.error is not None:
            assert isinstance(end.error, (KTLSError, ConnectionError)), repr(end.error)
        ours.close()
        try:
            records = [(r.content_type, r.plaintext) for r in peer.read_records()]
        except Exception:
            records = []
        alerts = [body for kind, body in records if kind == ContentType.ALERT and body[:1] == b"\x02"]
        assert len(alerts) <= 1, f"more than one fatal alert: {alerts}"
        if alerts:
            assert records[-1] == (ContentType.ALERT, alerts[0]), "something was sent after a fatal alert"
            ours_alert = getattr(end.error, "alert", None)
            if ours_alert is not None:
                assert alerts[0][1] == ours_alert, (end.error, alerts)
        with contextlib.suppress(OSError):
            peer.sock.shutdown(socket.SHUT_WR)
        ours.assert_released()
    finally:
        peer.sock.close()
        with contextlib.suppress(Exception):
            ours.close()
    assert open_fds() <= before, "a descriptor leaked"

"""The client random is read from the ClientHello *message*, however its records are cut.

The client random is the name of a connection's key-log lines, so reading the wrong 32 bytes would bind the
claim to a random of the peer's choosing. Record framing is not part of the TLS transcript (RFC 8446 §5.1:
handshake messages may be split across records at any byte), so a client — or anyone on the path — may
re-cut the ClientHello and the handshake still succeeds. Here our server-side ``Handshake`` is driven
sans-IO (``offer``/``take_offered``, ``receive``/``bytes_needed``, ``step``, ``data_to_send``) against a
stock ``ssl`` client (``wrap_bio``), with the client's ClientHello records re-cut in transit:

* one byte per record;
* cut so that a record starts exactly at a decoy: an ALPN protocol name that reads as a ClientHello header
  (type 1, length 0x46, version 3,3) followed by 32 chosen bytes — what a reader that takes "the record
  that starts like a ClientHello" would take as the random;
* the same across a HelloRetryRequest (two ClientHellos, one random).

The random the handshake reports, the one bound to its claim, and the secrets proven with it must all be the
real one: bytes 11..43 of the client's first record as it wrote it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import ssl
from collections.abc import Callable

import pytest

from certs import CertFiles
from ktls.constants import ContentType, HandshakeType
from ktls.core.handoff import proven_secrets
from ktls.core.handshake import Handshake, HandshakeResult
from ktls.core.keylog_capture import KeylogCapture, SecretClaim
from ktls.tls.records import RecordReader, client_random_from_client_hello
from support import contexts

DECOY_RANDOM = "DECOY-random-chosen-by-the-peer!"
assert len(DECOY_RANDOM) == 32
#: An ALPN protocol name (ASCII, so ``set_alpn_protocols`` takes it) that reads as a ClientHello header:
#: msg_type 1, length 0x000046, legacy_version 3,3 — and then the decoy's "random".
DECOY = "\x01\x00\x00\x46\x03\x03" + DECOY_RANDOM

Reframe = Callable[[bytes], list[bytes]]


def records_of(data: bytes) -> list[bytes]:
    reader = RecordReader()
    reader.feed(data)
    records = [bytes(record) for record in reader]
    assert reader.buffered == 0
    return records


def is_client_hello(record: bytes) -> bool:
    """A plaintext record holding exactly one whole ClientHello (how OpenSSL writes it)."""
    return (
        record[0] == ContentType.HANDSHAKE
        and record[5] == HandshakeType.CLIENT_HELLO
        and int.from_bytes(record[6:9], "big") + 4 == len(record) - 5
    )


def cut(record: bytes, offsets: list[int]) -> list[bytes]:
    """``record``'s fragment cut at ``offsets`` (positions in the fragment), each piece in its own record
    with the original header's type and version."""
    header, fragment = record[:5], record[5:]
    bounds = [0, *sorted(set(offsets) - {0, len(fragment)}), len(fragment)]
    return [
        header[:3] + (end - start).to_bytes(2, "big") + fragment[start:end] for start, end in itertools.pairwise(bounds)
    ]


def one_byte_per_record(record: bytes) -> list[bytes]:
    return cut(record, list(range(len(record) - 5)))


def at_decoy(*extra: int) -> Reframe:
    """Cut so that a record starts at the decoy (and at ``extra`` offsets relative to it, or from the start
    when negative)."""

    def reframe(record: bytes) -> list[bytes]:
        offset = record[5:].find(DECOY.encode())
        assert offset > 0, "the ClientHello carries the decoy"
        return cut(record, [offset, *(offset + e if e >= 0 else -e for e in extra)])

    return reframe


@dataclasses.dataclass
class Outcome:
    result: HandshakeResult
    bound: bytes | None
    refusal: str | None
    written: list[bytes]  # the client's records as it wrote them
    sent: list[bytes]  # ... and as our server received them (re-cut)
    #: For each random announced: whether the key log already had a line under it (it must not: the claim
    #: is bound before OpenSSL can log a secret).
    logged_before_bind: list[bool]


def drive(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    reframe: Reframe,
    mode: str,
    claims: list[SecretClaim] | None = None,
) -> Outcome:
    """Our server, sans-IO, against a stock client over memory; the client's ClientHello records are re-cut
    with ``reframe``. ``mode``: how our server takes bytes — "offer" (every whole record that has arrived,
    as the peek path does), "receive" (exactly one record at a time, ``bytes_needed``) or "bytewise".
    ``claims`` receives the handshake's claim (to look at it after a failure)."""
    client_in, client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(client_in, client_out, server_side=False, server_hostname="localhost")
    written: list[bytes] = []
    sent: list[bytes] = []
    logged_before_bind: list[bool] = []
    capture = KeylogCapture.for_context(server_ctx)
    with capture.handshake() as claim:
        if claims is not None:
            claims.append(claim)

        def bind(client_random: bytes) -> None:
            logged_before_bind.append(client_random.hex().encode() in capture.contents())
            claim.bind(client_random)

        handshake = Handshake(server_ctx, server_side=True, on_client_random=bind)
        pending = bytearray()  # "in the socket": arrived, not yet read by our server
        for _ in range(10_000):
            complete = handshake.step()
            del pending[: handshake.take_offered()]
            client_in.write(handshake.data_to_send())
            if complete:
                break
            if not pending:  # the client's turn
                with contextlib.suppress(ssl.SSLWantReadError):
                    client.do_handshake()
                for record in records_of(client_out.read()):
                    written.append(record)
                    pieces = reframe(record) if is_client_hello(record) else [record]
                    sent.extend(pieces)
                    pending += b"".join(pieces)
                assert pending, "neither side has anything to say"
            if mode == "offer" and handshake.can_offer and handshake.offer(bytes(pending)):
                continue
            size = 1 if mode == "bytewise" else handshake.bytes_needed()
            chunk = bytes(pending[:size])
            del pending[:size]
            handshake.receive(chunk)
        else:
            pytest.fail("the handshake did not complete")
        assert not pending
        result = handshake.result()
        proven_secrets(handshake, claim, server_side=True)  # the secrets open this connection's records
        outcome = Outcome(result, claim.client_random, claim.refusal, written, sent, logged_before_bind)
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()
    return outcome


def real_random(outcome: Outcome) -> bytes:
    """Bytes 11..43 of the client's first record as it wrote it: header (5), msg_type and length (4),
    legacy_version (2), then the random."""
    first = outcome.written[0]
    assert is_client_hello(first)
    return first[11:43]


def assert_real_random(outcome: Outcome) -> None:
    random = real_random(outcome)
    assert outcome.result.client_random == random
    assert outcome.bound == random  # the claim was bound to it, before OpenSSL logged a line
    assert outcome.refusal is None
    assert DECOY_RANDOM.encode() != random
    assert outcome.logged_before_bind == [False]  # one random, bound before any line was logged under it


MODES = pytest.mark.parametrize("mode", ["offer", "receive", "bytewise"])
VERSIONS = pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["TLS1.3", "TLS1.2"]
)


@VERSIONS
@MODES
def test_client_hello_one_byte_per_record(rsa_cert: CertFiles, version: ssl.TLSVersion, mode: str) -> None:
    # Catches: a random read from a single record (the first record holds 1 byte of it here: no random at
    # all), a handshake header split across records mis-parsed, and a bound that is never announced
    # because the hello is only complete hundreds of records later.
    server_ctx, client_ctx = contexts(rsa_cert, version)
    outcome = drive(server_ctx, client_ctx, one_byte_per_record, mode)
    one_byte_records = [r for r in outcome.sent if len(r) == 6 and r[0] == ContentType.HANDSHAKE]
    assert len(one_byte_records) == len(outcome.written[0]) - 5  # every byte of the ClientHello in its own record
    assert_real_random(outcome)


@VERSIONS
@MODES
@pytest.mark.parametrize(
    "reframe",
    [at_decoy(), at_decoy(-1), at_decoy(-3, 2), at_decoy(6, 38)],
    ids=["at-decoy", "header-split-and-decoy", "decoy-split", "decoy-alone"],
)
def test_record_starting_at_a_decoy(rsa_cert: CertFiles, version: ssl.TLSVersion, mode: str, reframe: Reframe) -> None:
    # Catches: a reader that takes the random from "a handshake record that starts like a ClientHello"
    # (the decoy record) or from the last such record, instead of from the ClientHello message.
    server_ctx, client_ctx = contexts(rsa_cert, version)
    client_ctx.set_alpn_protocols([DECOY, "http/1.1"])
    outcome = drive(server_ctx, client_ctx, reframe, mode)
    decoy_offset = outcome.written[0][5:].find(DECOY.encode())
    offsets = itertools.accumulate((len(r) - 5 for r in outcome.sent), initial=0)
    decoy_record = next(i for i, offset in enumerate(offsets) if offset == decoy_offset)  # a record starts there
    # A reader of "the records that start like a ClientHello" would be fooled: from the decoy record on, the
    # records read as a ClientHello whose random is the decoy's.
    assert client_random_from_client_hello(b"".join(outcome.sent[decoy_record:])) == DECOY_RANDOM.encode()
    assert_real_random(outcome)


@MODES
@pytest.mark.parametrize("reframe", [one_byte_per_record, at_decoy()], ids=["one-byte-per-record", "at-decoy"])
def test_hello_retry_request_keeps_the_first_random(rsa_cert: CertFiles, mode: str, reframe: Reframe) -> None:
    # Catches: the random taken from the second ClientHello's records as a new hello after the client's
    # middlebox-compatibility ChangeCipherSpec (or not read at all there: a ClientHello after a
    # ChangeCipherSpec must still be read as plaintext), a claim refused as "changed its random", and the
    # HelloRetryRequest's fixed random taken for the server random.
    server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3)
    server_ctx.set_ecdh_curve("secp384r1")  # the client's first key share is X25519: a HelloRetryRequest
    client_ctx.set_alpn_protocols([DECOY])
    outcome = drive(server_ctx, client_ctx, reframe, mode)
    hellos = [r for r in outcome.written if is_client_hello(r)]
    assert len(hellos) == 2, "the server should have asked for a second ClientHello"
    assert hellos[1][11:43] == real_random(outcome)  # RFC 8446 §4.1.2: the same random
    assert any(r[0] == ContentType.CHANGE_CIPHER_SPEC for r in outcome.written)  # between the two hellos
    assert_real_random(outcome)


@MODES
def test_second_client_hello_with_another_random_is_refused(rsa_cert: CertFiles, mode: str) -> None:
    # Catches: the second ClientHello (after a HelloRetryRequest and the client's ChangeCipherSpec) not being
    # read, so a client — or someone on the path — could change the random between the two hellos unseen.
    # The changed random breaks the transcript, so the handshake fails; the claim must be refused before that.
    server_ctx, client_ctx = contexts(rsa_cert, ssl.TLSVersion.TLSv1_3)
    server_ctx.set_ecdh_curve("secp384r1")
    hellos_seen: list[bytes] = []

    def change_second_random(record: bytes) -> list[bytes]:
        hellos_seen.append(record)
        if len(hellos_seen) == 2:
            record = record[:11] + bytes(32) + record[43:]
        return one_byte_per_record(record)

    claims: list[SecretClaim] = []
    with pytest.raises(ssl.SSLError):
        drive(server_ctx, client_ctx, change_second_random, mode, claims)
    assert len(hellos_seen) == 2
    assert claims[0].client_random == hellos_seen[0][11:43]
    assert claims[0].refusal is not None
    assert "changed its random" in claims[0].refusal

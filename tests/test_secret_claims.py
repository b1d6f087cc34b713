"""Claims on key-log lines: a connection gets its own secrets, or none — never another connection's.

The key log names a connection's lines by its client random, which the client chooses. Here the parser's "no
latest wins" rule (:class:`~ktls.tls.keylog.KeylogParser`) and the capture's claims
(:class:`~ktls.core.keylog_capture.SecretClaim`) are driven with synthetic NSS key-log lines written straight
into a capture's memory file, so every interleaving is forced; and two real handshakes show a line planted
under a connection's random (before or after OpenSSL's own) keeps the secrets out of the kernel. Secrets
never leave the process by pickling, and no ``repr`` shows one.
"""

from __future__ import annotations

import os
import pickle
import socket
import ssl
import threading
from collections.abc import Callable

import pytest

from certs import CertFiles
from ktls.core.driver import run_handshake as _drive_handshake
from ktls.core.handoff import proven_secrets
from ktls.core.handshake import Handshake
from ktls.core.keylog_capture import KeylogCapture, SecretClaim
from ktls.errors import KernelTLSUnavailable
from ktls.tls.keylog import ConnectionSecrets, KeylogEntry, KeylogLabel, KeylogParser, Secret, parse_keylog_line
from support import contexts

R1 = bytes(range(32))
R2 = bytes(range(100, 132))
V1 = bytes([0xA1]) * 32
V2 = bytes([0xB2]) * 32
V3 = bytes([0xC3]) * 32
SHARED = "another handshake in flight on this context uses the same client random"
CHANGED = "changed its random"
AMBIGUOUS = "two handshakes logged different secrets"

CTS0 = KeylogLabel.CLIENT_TRAFFIC_SECRET_0
STS0 = KeylogLabel.SERVER_TRAFFIC_SECRET_0


def line(label: KeylogLabel, client_random: bytes, secret: bytes) -> bytes:
    return f"{label.value} {client_random.hex()} {secret.hex()}\n".encode()


def lines(client_random: bytes, secret: bytes) -> bytes:
    """A TLS 1.3 connection's two application traffic secrets (enough for a claim to take)."""
    return line(CTS0, client_random, secret) + line(STS0, client_random, secret[::-1])


def append(context: ssl.SSLContext, data: bytes) -> None:
    """Write to the capture's memory file as OpenSSL does: through another descriptor, appending."""
    fd = os.open(str(context.keylog_filename), os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


@pytest.fixture
def context() -> ssl.SSLContext:
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


@pytest.fixture
def capture(context: ssl.SSLContext) -> KeylogCapture:
    return KeylogCapture.for_context(context)


# --- KeylogParser: no "latest wins" -------------------------------------------------------------------------


def test_same_line_twice_is_not_ambiguous() -> None:
    # Catches: a line read twice (a re-read after a short read) mistaken for a second handshake.
    parser = KeylogParser()
    parser.feed(line(CTS0, R1, V1) + line(CTS0, R1, V1))
    secrets = parser.take(R1)
    assert secrets is not None
    assert secrets.ambiguous is False
    assert secrets.get(CTS0) == Secret(V1)


def test_different_value_is_ambiguous_and_the_first_is_kept() -> None:
    # Catches: "latest wins" (a second handshake with the same random replacing the first's secret), and an
    # ambiguity mark that leaks to another random.
    parser = KeylogParser()
    parser.feed(line(CTS0, R1, V1) + line(CTS0, R2, V3) + line(STS0, R1, V3) + line(CTS0, R1, V2))
    secrets = parser.take(R1)
    assert secrets is not None
    assert secrets.ambiguous is True
    assert secrets.get(CTS0) == Secret(V1)  # the first value, not V2
    assert secrets.get(STS0) == Secret(V3)
    other = parser.take(R2)
    assert other is not None
    assert other.ambiguous is False


def test_ambiguity_across_feeds() -> None:
    # Catches: ambiguity only detected within one chunk of the file.
    parser = KeylogParser()
    data = line(CTS0, R1, V1) + line(CTS0, R1, V2)
    for offset in range(len(data)):
        parser.feed(data[offset : offset + 1])
    secrets = parser.take(R1)
    assert secrets is not None
    assert secrets.ambiguous is True
    assert secrets.get(CTS0) == Secret(V1)


def test_discard_forgets_secrets_and_ambiguity() -> None:
    # Catches: discard leaving the entry (a later handshake with this random would get stale secrets) or its
    # ambiguity mark (a later, honest handshake refused for ever), or touching another random.
    parser = KeylogParser()
    parser.feed(line(CTS0, R1, V1) + line(CTS0, R1, V2) + line(CTS0, R2, V3))
    assert len(parser) == 2
    parser.discard(R1)
    assert R1 not in parser
    assert len(parser) == 1
    assert parser.take(R1) is None
    parser.discard(R1)  # unknown: nothing happens
    parser.discard(bytes(32))
    parser.feed(line(CTS0, R1, V3))
    fresh = parser.take(R1)
    assert fresh is not None
    assert fresh.ambiguous is False
    assert fresh.get(CTS0) == Secret(V3)
    kept = parser.take(R2)
    assert kept is not None
    assert kept.get(CTS0) == Secret(V3)


# --- SecretClaim on synthetic lines ---------------------------------------------------------------------------


def test_two_live_claims_on_one_random_are_both_refused(context: ssl.SSLContext, capture: KeylogCapture) -> None:
    # Catches: the first (or last) claimant getting lines that may be the other handshake's.
    with capture.handshake() as first, capture.handshake() as second:
        first.bind(R1)
        second.bind(R1)
        append(context, lines(R1, V1) + lines(R1, V2))
        for claim in (first, second):
            with pytest.raises(KernelTLSUnavailable, match=SHARED):
                claim.take()
            assert claim.refusal == SHARED


def test_refused_claims_leave_no_lines_behind(context: ssl.SSLContext, capture: KeylogCapture) -> None:
    # Catches: secrets of connections that were refused staying in memory after their handshakes ended (the
    # key log is meant to forget everything that no live claim may still take).
    with capture.handshake() as first, capture.handshake() as second:
        first.bind(R1)
        second.bind(R1)
        append(context, lines(R1, V1) + lines(R1, V2))
        for claim in (first, second):
            with pytest.raises(KernelTLSUnavailable, match=SHARED):
                claim.take()
    assert len(capture) == 0


def test_a_random_is_free_again_after_a_refusal(context: ssl.SSLContext, capture: KeylogCapture) -> None:
    # Catches: the lines of two refused handshakes poisoning their random for a later, honest handshake (it is
    # refused as "ambiguous" against the stale lines: every later connection with that random falls back).
    with capture.handshake() as first, capture.handshake() as second:
        first.bind(R1)
        second.bind(R1)
        append(context, lines(R1, V1) + lines(R1, V2))
        for claim in (first, second):
            with pytest.raises(KernelTLSUnavailable):
                claim.take()
    with capture.handshake() as later:
        later.bind(R1)
        append(context, lines(R1, V3))
        assert later.take().get(CTS0) == Secret(V3)


def test_a_claim_refused_for_a_changed_random_leaves_no_lines(context: ssl.SSLContext, capture: KeylogCapture) -> None:
    # Catches: the lines of a handshake refused for changing its random staying in memory once it ended.
    with capture.handshake() as claim:
        claim.bind(R1)
        claim.bind(R2)
        append(context, lines(R1, V1))
        with pytest.raises(KernelTLSUnavailable, match=CHANGED):
            claim.take()
    assert len(capture) == 0


def test_a_claim_on_a_random_already_taken_by_a_live_claim_is_refused(
    context: ssl.SSLContext, capture: KeylogCapture
) -> None:
    # Catches: a second handshake with the random of one that already took its secrets (and is still
    # handing off) being given the lines logged after the take, which are its own — or the first one's.
    with capture.handshake() as first:
        first.bind(R1)
        append(context, lines(R1, V1))
        assert first.take().get(CTS0) == Secret(V1)
        with capture.handshake() as second:
            second.bind(R1)
            append(context, lines(R1, V2))
            with pytest.raises(KernelTLSUnavailable, match=SHARED):
                second.take()


def test_a_claim_that_sees_two_randoms_is_refused(context: ssl.SSLContext, capture: KeylogCapture) -> None:
    # Catches: a client that changes its random after a HelloRetryRequest (RFC 8446 §4.1.2 forbids it) getting
    # the first random's lines — which may be another connection's.
    with capture.handshake() as claim:
        claim.bind(R1)
        claim.bind(R1)  # the same random again (the second ClientHello of a retry): fine
        assert claim.refusal is None
        claim.bind(R2)
        append(context, lines(R1, V1) + lines(R2, V2))
        with pytest.raises(KernelTLSUnavailable, match=CHANGED):
            claim.take()
        assert claim.client_random == R1


def test_ambiguous_lines_are_refused(context: ssl.SSLContext, capture: KeylogCapture) -> None:
    # Catches: a claim handing out an entry under which one label was logged with two values.
    with capture.handshake() as claim:
        claim.bind(R1)
        append(context, lines(R1, V1) + line(CTS0, R1, V2))
        with pytest.raises(KernelTLSUnavailable, match=AMBIGUOUS):
            claim.take()


def test_nothing_logged_and_nothing_bound(capture: KeylogCapture) -> None:
    # Catches: a take that returns empty secrets, or someone else's, instead of refusing.
    with capture.handshake() as claim, pytest.raises(KernelTLSUnavailable, match="never seen"):
        claim.take()
    with capture.handshake() as claim:
        claim.bind(R1)
        with pytest.raises(KernelTLSUnavailable, match="no secrets"):
            claim.take()


@pytest.mark.parametrize("first_takes", [True, False], ids=["first-took", "first-abandoned"])
def test_a_random_is_free_again_once_its_claim_ended(
    context: ssl.SSLContext, capture: KeylogCapture, first_takes: bool
) -> None:
    # Catches: a finished (or failed) handshake's claim or lines outliving it: the next handshake with the
    # same random would be refused for ever, or be handed the first one's secrets (or an ambiguous mix).
    with capture.handshake() as first:
        first.bind(R1)
        append(context, lines(R1, V1))
        if first_takes:
            first.take()
    with capture.handshake() as second:
        second.bind(R1)
        append(context, lines(R1, V2))
        secrets = second.take()
    assert secrets.ambiguous is False
    assert secrets.get(CTS0) == Secret(V2)
    assert secrets.get(STS0) == Secret(V2[::-1])


def test_a_claim_that_ends_without_taking_discards_its_lines(context: ssl.SSLContext, capture: KeylogCapture) -> None:
    # Catches: lines of a failed handshake kept in memory (read, but nobody will ever take them).
    with capture.handshake() as other:
        other.bind(R2)
        with capture.handshake() as abandoned:
            abandoned.bind(R1)
            append(context, lines(R1, V1) + lines(R2, V2))
            other.take()  # reads the whole file: R1's lines are now held by the parser
            assert len(capture) == 1
        assert len(capture) == 0
        assert R1.hex().encode() not in capture.contents()
        assert capture.size > 0  # the file is not truncated while a claim is live: what was read is a hole
        assert capture.contents().strip(b"\0") == b""
    assert capture.size == 0


def test_unclaimed_lines_do_not_disturb_a_claim(context: ssl.SSLContext, capture: KeylogCapture) -> None:
    # Catches: lines of connections ktls does not drive (a shared context) making a claim fail.
    with capture.handshake() as claim:
        claim.bind(R1)
        append(context, b"# a comment\n" + lines(R2, V2) + b"RSA 00 11\n" + lines(R1, V1) + line(CTS0, R2, V3))
        secrets = claim.take()
    assert secrets.get(CTS0) == Secret(V1)
    assert secrets.ambiguous is False


# --- A line planted under a real connection's random -----------------------------------------------------------


@pytest.mark.parametrize("planted", ["before-openssl", "after-openssl"])
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["TLS1.3", "TLS1.2"])
def test_a_line_planted_under_our_random_keeps_the_secrets_from_the_kernel(
    rsa_cert: CertFiles, planted: str, version: ssl.TLSVersion
) -> None:
    # Catches: the first line under a random winning whatever comes next (an attacker who logs first, e.g. a
    # second handshake with a copied random, would choose the kernel's key), or the last one winning.
    server_ctx, client_ctx = contexts(rsa_cert, version, None)
    capture = KeylogCapture.for_context(server_ctx)
    label = (
        KeylogLabel.SERVER_HANDSHAKE_TRAFFIC_SECRET if version is ssl.TLSVersion.TLSv1_3 else KeylogLabel.CLIENT_RANDOM
    )
    fake = os.urandom(48)

    def plant(client_random: bytes) -> None:
        append(server_ctx, line(label, client_random, fake))

    ours, theirs = socket.socketpair()
    theirs.settimeout(20)
    peers: list[ssl.SSLSocket] = []  # kept open: a closed peer would fail our server's last write
    thread = threading.Thread(
        target=lambda: peers.append(client_ctx.wrap_socket(theirs, server_hostname="localhost")), daemon=True
    )
    thread.start()
    with ours, theirs, capture.handshake() as claim:
        ours.settimeout(20)

        def bind(client_random: bytes) -> None:
            claim.bind(client_random)
            if planted == "before-openssl":
                plant(client_random)  # OpenSSL has not read the ClientHello yet: ours is the first line

        handshake = Handshake(server_ctx, server_side=True, on_client_random=bind)
        _drive_handshake(ours, handshake)
        if planted == "after-openssl":
            plant(handshake.result().client_random)
        with pytest.raises(KernelTLSUnavailable, match=AMBIGUOUS) as caught:
            proven_secrets(handshake, claim, server_side=True)
        assert fake.hex() not in str(caught.value)
    thread.join(20)
    assert len(peers) == 1
    peers[0].close()


# --- Secrets stay in the process, and out of reprs --------------------------------------------------------------


def test_secrets_cannot_be_pickled() -> None:
    # Catches: a Secret (or a container of them) carried to a pickle: a cache, a queue, another process.
    secret = Secret(V1)
    secrets = ConnectionSecrets(R1, {CTS0: Secret(V1)})
    entry = KeylogEntry(CTS0, R1, Secret(V1))
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        for value in (secret, secrets, entry, {"nested": [secret]}):
            with pytest.raises(TypeError, match="pickled"):
                pickle.dumps(value, protocol=protocol)


def test_wipe() -> None:
    # Catches: wipe that rebinds instead of overwriting, or a Secret that shares its caller's buffer.
    source = bytearray(V1)
    secret = Secret(source)
    source[:] = bytes(32)
    assert bytes(secret) == V1  # a copy was taken
    before = bytes(secret)
    held = secret._value  # the buffer the Secret holds: wipe must overwrite it, not replace it
    secret.wipe()
    assert held == bytearray(32)
    assert bytes(secret) == bytes(32)
    assert len(secret) == 32
    assert before == V1  # bytes() handed out earlier is its own copy
    secrets = ConnectionSecrets(R1, {CTS0: Secret(V1), STS0: Secret(V2)})
    secrets.wipe()
    assert all(bytes(s) == bytes(32) for s in secrets.secrets.values())


def test_reprs_show_no_secret(context: ssl.SSLContext, capture: KeylogCapture) -> None:
    # Catches: a repr (logged, or in a traceback's locals) that prints key material.
    values = (V1, V2)
    shown: list[str] = []

    def show(*objects: object) -> None:
        shown.extend(f"{o!r} {o!s} {o}" for o in objects)

    secret = Secret(V1)
    entry = parse_keylog_line(line(CTS0, R1, V1))
    assert entry is not None
    show(secret, entry, ConnectionSecrets(R1, {CTS0: Secret(V1), STS0: Secret(V2)}, ambiguous=True))
    parser = KeylogParser()
    parser.feed(lines(R1, V1))
    show(parser)
    with capture.handshake() as claim:
        show(claim, capture)
        claim.bind(R1)
        append(context, lines(R1, V1))
        show(claim, capture)
        taken = claim.take()
        show(claim, capture, taken, dict(taken.secrets))
    with capture.handshake() as refused, capture.handshake() as other:
        refused.bind(R2)
        other.bind(R2)
        append(context, lines(R2, V2))
        try:
            refused.take()
        except KernelTLSUnavailable as exc:
            show(refused, exc)
    text = "\n".join(shown)
    for value in values:
        for hexed in (value.hex(), value.hex().upper(), value[::-1].hex(), value.hex()[:16]):
            assert hexed not in text
        assert repr(value) not in text


@pytest.mark.parametrize("make", [lambda: Secret(V1), lambda: ConnectionSecrets(R1, {CTS0: Secret(V1)})])
def test_repr_has_the_length_or_labels(make: Callable[[], object]) -> None:
    # Catches: a repr so bare that a log line says nothing (the replacement for the value must still inform).
    text = repr(make())
    assert "32 bytes" in text or CTS0.value in text


def test_claim_repr_before_binding(capture: KeylogCapture) -> None:
    # Catches: a repr that fails (``None.hex()``) before the random is known — in a log line of a failed handshake.
    with capture.handshake() as claim:
        assert "client_random=None" in repr(claim)
        assert isinstance(claim, SecretClaim)

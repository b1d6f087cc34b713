"""The proof that the key log's secrets are the connection's own (:mod:`ktls.tls.proof`), on real handshakes.

Our handshake driver (``Handshake`` over a socket, as :func:`ktls.core.driver.run_handshake` runs it) meets a
stock ``ssl`` peer in a thread, for TLS 1.3 and three TLS 1.2 AEADs (GCM, ChaCha20-Poly1305, CCM), ours as
server and as client. The proof must accept the connection's own secrets and refuse everything else: another
connection's secrets, evidence altered by one bit, a TLS 1.3 server's application secret taken from another
connection, secrets with labels missing, and suites whose AEAD ktls cannot open. No refusal may print a
secret.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from certs import CertFiles
from ktls.constants import TLSVersion
from ktls.core.driver import run_handshake as _drive_handshake
from ktls.core.handoff import proven_secrets
from ktls.core.handshake import Handshake, HandshakeResult
from ktls.core.keylog_capture import KeylogCapture, SecretClaim
from ktls.errors import KernelTLSUnavailable
from ktls.tls.keylog import ConnectionSecrets, KeylogLabel, Secret
from ktls.tls.proof import HandshakeEvidence, SecretsNotProven, prove_secrets
from ktls.tls.suites import CipherSuite, suite_by_name, suite_by_openssl_name
from support import contexts

#: (TLS version, OpenSSL cipher string for TLS 1.2, certificate kind)
CASES = [
    (ssl.TLSVersion.TLSv1_3, None, "rsa"),
    (ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-AES128-GCM-SHA256", "rsa"),
    (ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-CHACHA20-POLY1305", "rsa"),
    (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-CCM", "ecdsa"),
    # ARIA-GCM (RFC 6209), which kernels built with CONFIG_CRYPTO_ARIA take for TLS 1.2.
    (ssl.TLSVersion.TLSv1_2, "ECDHE-ARIA256-GCM-SHA384", "rsa"),
    (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-ARIA128-GCM-SHA256", "ecdsa"),
]
Case = tuple[ssl.TLSVersion, str | None, str]
ROLES = pytest.mark.parametrize("ours_is_server", [True, False], ids=["ours-server", "ours-client"])
CASE_PARAMS = pytest.mark.parametrize("case", CASES, ids=[c[1] or c[0].name for c in CASES])


@dataclasses.dataclass
class Connection:
    """One finished handshake of ours: what the proof is given."""

    handshake: Handshake
    result: HandshakeResult
    suite: CipherSuite
    evidence: HandshakeEvidence
    secrets: ConnectionSecrets
    server_side: bool

    def prove(self, secrets: ConnectionSecrets | None = None, evidence: HandshakeEvidence | None = None) -> None:
        prove_secrets(
            self.suite,
            self.secrets if secrets is None else secrets,
            self.evidence if evidence is None else evidence,
            client_random=self.result.client_random,
            server_random=self.result.server_random,
            server_side=self.server_side,
        )


class Pair:
    """A (server, client) context pair for one case, and handshakes between ours and a stock ``ssl`` peer."""

    def __init__(self, cert: CertFiles, version: ssl.TLSVersion, ciphers: str | None, *, ours_is_server: bool) -> None:
        server_ctx, client_ctx = contexts(cert, version, ciphers)
        self.ours_ctx, self.peer_ctx = (server_ctx, client_ctx) if ours_is_server else (client_ctx, server_ctx)
        self.ours_is_server = ours_is_server
        self._keep: list[ssl.SSLSocket] = []

    def connect(self, finish: Callable[[Handshake, SecretClaim], ConnectionSecrets] | None = None) -> Connection:
        """One handshake; the secrets are ``claim.take()``n (or what ``finish(handshake, claim)`` returns),
        inside the claim's block as the hand-off does."""
        ours, theirs = socket.socketpair()
        for sock in (ours, theirs):
            sock.settimeout(20)
        failure: list[BaseException] = []

        def peer() -> None:
            try:
                tls = self.peer_ctx.wrap_socket(
                    theirs,
                    server_side=not self.ours_is_server,
                    server_hostname="localhost" if self.ours_is_server else None,
                )
                self._keep.append(tls)  # open until the test ends: our side reads the last flight at leisure
            except BaseException as exc:
                failure.append(exc)

        thread = threading.Thread(target=peer, daemon=True)
        thread.start()
        capture = KeylogCapture.for_context(self.ours_ctx)
        with ours, capture.handshake() as claim:
            handshake = Handshake(
                self.ours_ctx,
                server_side=self.ours_is_server,
                server_hostname=None if self.ours_is_server else "localhost",
                on_client_random=claim.bind,
            )
            _drive_handshake(ours, handshake)
            secrets = claim.take() if finish is None else finish(handshake, claim)
        thread.join(20)
        assert not thread.is_alive()
        assert not failure, failure
        result = handshake.result()
        suite = suite_by_openssl_name(result.openssl_cipher)
        assert suite is not None
        return Connection(handshake, result, suite, handshake.evidence(), secrets, self.ours_is_server)

    def close(self) -> None:
        for tls in self._keep:
            tls.close()


@pytest.fixture
def pair_factory(rsa_cert: CertFiles, ecdsa_cert: CertFiles) -> Iterator[Callable[[Case, bool], Pair]]:
    pairs: list[Pair] = []

    def make(case: Case, ours_is_server: bool) -> Pair:
        version, ciphers, kind = case
        pair = Pair(rsa_cert if kind == "rsa" else ecdsa_cert, version, ciphers, ours_is_server=ours_is_server)
        pairs.append(pair)
        return pair

    yield make
    for pair in pairs:
        pair.close()


def secret_hexes(*connections: Connection) -> list[str]:
    hexes = []
    for connection in connections:
        for secret in connection.secrets.secrets.values():
            hexes += [bytes(secret).hex(), bytes(secret).hex().upper()]
    return hexes


def assert_no_secret_in(text: str, *connections: Connection) -> None:
    """Catches: a refusal that prints a key (in an exception message, a log line, or a repr)."""
    for hexed in secret_hexes(*connections):
        assert hexed not in text
        assert hexed[:32] not in text  # not even half of one


def with_secret(secrets: ConnectionSecrets, label: KeylogLabel, value: Secret | None) -> ConnectionSecrets:
    """``secrets`` with ``label`` replaced by ``value`` (or removed when ``None``)."""
    changed = {k: Secret(bytes(v)) for k, v in secrets.secrets.items() if k is not label}
    if value is not None:
        changed[label] = Secret(bytes(value))
    return ConnectionSecrets(secrets.client_random, changed)


# --- The connection's own secrets are proven -----------------------------------------------------------------


@ROLES
@CASE_PARAMS
def test_proven_secrets_accepts_the_connections_own(
    pair_factory: Callable[[Case, bool], Pair], case: Case, ours_is_server: bool
) -> None:
    # Catches: a proof that refuses good secrets (wrong nonce/AAD construction for a version or AEAD, the
    # wrong direction's key, TLS 1.2's explicit nonce or ChaCha20's IV XOR seq), which would send every
    # connection back to userspace TLS; and evidence not collected (a Finished or ticket record missed).
    pair = pair_factory(case, ours_is_server)
    connection = pair.connect(lambda hs, claim: proven_secrets(hs, claim, server_side=ours_is_server))
    evidence = connection.evidence
    if case[0] is ssl.TLSVersion.TLSv1_3:
        assert evidence.sent
        assert evidence.received
        # A TLS 1.3 server's first ticket is proven with SERVER_TRAFFIC_SECRET_0; a client sends none.
        assert (evidence.first_ticket is not None) is ours_is_server
        assert evidence.first_ticket is None or 0 < evidence.first_ticket < len(evidence.sent)
    else:
        assert evidence.sent_finished is not None
        assert evidence.received_finished is not None
    assert connection.secrets.ambiguous is False
    connection.prove()  # and directly, the same secrets once more


# --- Another connection's secrets are refused ----------------------------------------------------------------


@ROLES
@CASE_PARAMS
def test_secrets_of_another_connection_are_refused(
    pair_factory: Callable[[Case, bool], Pair], case: Case, ours_is_server: bool
) -> None:
    # Catches: a proof that does not really depend on the secrets (e.g. one that opens nothing, or accepts
    # when a record fails to open): B's secrets must never pass for A's connection.
    pair = pair_factory(case, ours_is_server)
    a, b = pair.connect(), pair.connect()
    assert a.result.client_random != b.result.client_random
    a.prove()  # control: A's own secrets pass with A's evidence
    b.prove()
    with pytest.raises(SecretsNotProven) as caught:
        a.prove(secrets=b.secrets)
    assert_no_secret_in(str(caught.value) + repr(caught.value), a, b)
    # The other way round too, and with B's secrets but under A's client random (the key log's name for them).
    with pytest.raises(SecretsNotProven) as caught:
        b.prove(secrets=a.secrets)
    assert_no_secret_in(str(caught.value), a, b)
    relabelled = ConnectionSecrets(a.result.client_random, dict(b.secrets.secrets))
    with pytest.raises(SecretsNotProven):
        a.prove(secrets=relabelled)


@ROLES
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["TLS1.3", "TLS1.2"])
def test_evidence_of_another_connection_is_refused(
    pair_factory: Callable[[Case, bool], Pair], version: ssl.TLSVersion, ours_is_server: bool
) -> None:
    # Catches: a proof that only checks part of the evidence: each of A's records replaced by B's fails.
    case: Case = (version, None if version is ssl.TLSVersion.TLSv1_3 else "ECDHE-RSA-AES128-GCM-SHA256", "rsa")
    pair = pair_factory(case, ours_is_server)
    a, b = pair.connect(), pair.connect()
    for field in ("sent", "received") if version is ssl.TLSVersion.TLSv1_3 else ("sent_finished", "received_finished"):
        mixed = replaced(a.evidence, field, getattr(b.evidence, field))
        with pytest.raises(SecretsNotProven):
            a.prove(evidence=mixed)


# --- Evidence altered by one bit ----------------------------------------------------------------------------


def replaced(evidence: HandshakeEvidence, field: str, value: object) -> HandshakeEvidence:
    """``evidence`` with one field replaced."""
    changes: dict[str, Any] = {field: value}
    return dataclasses.replace(evidence, **changes)


def flipped(record: bytes, position: int) -> bytes:
    changed = bytearray(record)
    changed[position] ^= 0x01
    return bytes(changed)


def evidence_fields(connection: Connection) -> list[tuple[str, int | None]]:
    """(field, index) of every record the proof must open: (name, None) for a TLS 1.2 Finished."""
    evidence = connection.evidence
    if connection.suite.version is TLSVersion.TLS1_2:
        return [("sent_finished", None), ("received_finished", None)]
    fields: list[tuple[str, int | None]] = [("sent", 0), ("received", 0)]
    if evidence.first_ticket is not None:
        fields.append(("sent", evidence.first_ticket))
    return fields


def record_of(evidence: HandshakeEvidence, field: str, index: int | None) -> bytes:
    value = getattr(evidence, field)
    record = value if index is None else value[index]
    assert isinstance(record, bytes)
    return record


def altered(evidence: HandshakeEvidence, field: str, index: int | None, position: int) -> HandshakeEvidence:
    """``evidence`` with one bit of one record flipped."""
    if index is None:
        return replaced(evidence, field, flipped(getattr(evidence, field), position))
    records = list(getattr(evidence, field))
    records[index] = flipped(records[index], position)
    return replaced(evidence, field, tuple(records))


@ROLES
@CASE_PARAMS
def test_one_flipped_bit_in_an_evidence_record_is_refused(
    pair_factory: Callable[[Case, bool], Pair], case: Case, ours_is_server: bool
) -> None:
    # Catches: a record the proof does not actually authenticate (a header byte left out of the AAD, the
    # explicit nonce not used, a ticket that is never opened, a received record "proven" by a later one).
    pair = pair_factory(case, ours_is_server)
    connection = pair.connect()
    connection.prove()
    for field, index in evidence_fields(connection):
        length = len(record_of(connection.evidence, field, index))
        # Header bytes 0-2 (type and version: in the AAD of both TLS 1.3 and 1.2), the first body byte (TLS 1.2
        # GCM/CCM: the explicit nonce), the middle of the ciphertext, its last byte (TLS 1.3: the inner content
        # type) and the first and last byte of the tag.
        for position in (0, 1, 2, 5, length // 2, length - 17, length - 16, length - 1):
            with pytest.raises(SecretsNotProven) as caught:
                connection.prove(evidence=altered(connection.evidence, field, index, position))
            assert_no_secret_in(str(caught.value), connection)


# --- A TLS 1.3 server's application secret from another connection ------------------------------------------


def test_tls13_server_traffic_secret_of_another_connection_is_refused(
    pair_factory: Callable[[Case, bool], Pair],
) -> None:
    # Catches: a server proving only its handshake secrets. SERVER_TRAFFIC_SECRET_0 is the key the kernel
    # sends with; if it came from another connection (same random, another handshake's line), only the first
    # ticket — sent under it before the hand-off — can tell.
    pair = pair_factory((ssl.TLSVersion.TLSv1_3, None, "rsa"), True)
    a, b = pair.connect(), pair.connect()
    assert a.evidence.first_ticket is not None
    other = b.secrets.get(KeylogLabel.SERVER_TRAFFIC_SECRET_0)
    assert other is not None
    mixed = with_secret(a.secrets, KeylogLabel.SERVER_TRAFFIC_SECRET_0, other)
    own = a.secrets.get(KeylogLabel.SERVER_TRAFFIC_SECRET_0)
    a.prove(secrets=with_secret(a.secrets, KeylogLabel.SERVER_TRAFFIC_SECRET_0, own))  # control: the copy passes
    with pytest.raises(SecretsNotProven, match="ticket") as caught:
        a.prove(secrets=mixed)
    assert_no_secret_in(str(caught.value), a, b)


# --- Missing labels -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ours_is_server", "label"),
    [
        (True, KeylogLabel.CLIENT_HANDSHAKE_TRAFFIC_SECRET),
        (True, KeylogLabel.SERVER_HANDSHAKE_TRAFFIC_SECRET),
        (True, KeylogLabel.SERVER_TRAFFIC_SECRET_0),
        (False, KeylogLabel.CLIENT_HANDSHAKE_TRAFFIC_SECRET),
        (False, KeylogLabel.SERVER_HANDSHAKE_TRAFFIC_SECRET),
    ],
    ids=lambda value: value.value if isinstance(value, KeylogLabel) else ("ours-server" if value else "ours-client"),
)
def test_tls13_missing_label_is_refused(
    pair_factory: Callable[[Case, bool], Pair], ours_is_server: bool, label: KeylogLabel
) -> None:
    # Catches: a missing secret read as "nothing to check" (a KeyError, or a proof that skips the label).
    connection = pair_factory((ssl.TLSVersion.TLSv1_3, None, "rsa"), ours_is_server).connect()
    with pytest.raises(SecretsNotProven) as caught:
        connection.prove(secrets=with_secret(connection.secrets, label, None))
    assert_no_secret_in(str(caught.value), connection)


@ROLES
def test_tls13_secret_of_the_wrong_size_is_refused(
    pair_factory: Callable[[Case, bool], Pair], ours_is_server: bool
) -> None:
    # Catches: a 32-byte secret accepted for a SHA-384 suite (or the reverse): HKDF would derive keys, but
    # not this suite's.
    connection = pair_factory((ssl.TLSVersion.TLSv1_3, None, "rsa"), ours_is_server).connect()
    label = KeylogLabel.CLIENT_HANDSHAKE_TRAFFIC_SECRET
    secret = connection.secrets.get(label)
    assert secret is not None
    other_size = 32 if len(secret) == 48 else 48
    with pytest.raises(SecretsNotProven):
        connection.prove(
            secrets=with_secret(connection.secrets, label, Secret(bytes(secret)[:other_size].ljust(other_size, b"\0")))
        )


@ROLES
def test_tls12_missing_master_secret_is_refused(
    pair_factory: Callable[[Case, bool], Pair], ours_is_server: bool
) -> None:
    # Catches: TLS 1.2 secrets without their CLIENT_RANDOM line, or with TLS 1.3 lines only, getting through.
    connection = pair_factory((ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-AES128-GCM-SHA256", "rsa"), ours_is_server).connect()
    for secrets in (
        ConnectionSecrets(connection.result.client_random, {}),
        with_secret(connection.secrets, KeylogLabel.CLIENT_RANDOM, None),
        ConnectionSecrets(
            connection.result.client_random, {KeylogLabel.CLIENT_HANDSHAKE_TRAFFIC_SECRET: Secret(bytes(48))}
        ),
    ):
        with pytest.raises(SecretsNotProven, match="master secret"):
            connection.prove(secrets=secrets)


@ROLES
def test_tls12_missing_finished_is_refused(pair_factory: Callable[[Case, bool], Pair], ours_is_server: bool) -> None:
    # Catches: a TLS 1.2 proof that passes when a Finished record was never seen (nothing opened = nothing proven).
    connection = pair_factory((ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-AES128-GCM-SHA256", "rsa"), ours_is_server).connect()
    for field in ("sent_finished", "received_finished"):
        with pytest.raises(SecretsNotProven, match="not seen"):
            connection.prove(evidence=replaced(connection.evidence, field, None))


@ROLES
def test_tls13_empty_evidence_is_refused(pair_factory: Callable[[Case, bool], Pair], ours_is_server: bool) -> None:
    # Catches: a TLS 1.3 proof that passes when there is nothing to open.
    connection = pair_factory((ssl.TLSVersion.TLSv1_3, None, "rsa"), ours_is_server).connect()
    for field in ("sent", "received"):
        with pytest.raises(SecretsNotProven):
            connection.prove(evidence=replaced(connection.evidence, field, ()))


# --- Suites whose AEAD cannot be opened ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["TLS_AES_128_CCM_8_SHA256", "TLS_SM4_GCM_SM3", "TLS_SM4_CCM_SM3", "ECDHE-ECDSA-AES256-CCM"],
)
def test_suite_that_cannot_be_opened_is_refused(pair_factory: Callable[[Case, bool], Pair], name: str) -> None:
    # Catches: a proof that runs (and "passes" or crashes) for an AEAD it does not implement.
    connection = pair_factory((ssl.TLSVersion.TLSv1_3, None, "rsa"), True).connect()
    suite = suite_by_name(name)
    assert suite is not None
    with pytest.raises(SecretsNotProven, match="cannot verify"):
        prove_secrets(
            suite,
            connection.secrets,
            connection.evidence,
            client_random=connection.result.client_random,
            server_random=connection.result.server_random,
            server_side=True,
        )


@ROLES
@pytest.mark.parametrize("ciphers", ["ECDHE-ECDSA-AES128-CCM8", "ECDHE-ECDSA-AES256-CCM8"])
def test_real_handshake_with_unopenable_aead_stays_in_userspace(
    pair_factory: Callable[[Case, bool], Pair],
    caplog: pytest.LogCaptureFixture,
    ours_is_server: bool,
    ciphers: str,
) -> None:
    # Catches: the hand-off keying (or crashing on) a negotiated suite it cannot prove.
    pair = pair_factory((ssl.TLSVersion.TLSv1_2, ciphers, "ecdsa"), ours_is_server)
    refusals: list[KernelTLSUnavailable] = []

    def finish(handshake: Handshake, claim: SecretClaim) -> ConnectionSecrets:
        with pytest.raises(KernelTLSUnavailable) as caught:
            proven_secrets(handshake, claim, server_side=ours_is_server)
        refusals.append(caught.value)
        return ConnectionSecrets(b"", {})

    with caplog.at_level(logging.WARNING, logger="ktls"):
        connection = pair.connect(finish)
    assert connection.result.openssl_cipher == ciphers
    assert "cannot verify" in str(refusals[0])
    assert "not this connection's" in str(refusals[0])


# --- proven_secrets: refusals become KernelTLSUnavailable, and are logged without secrets -------------------


@ROLES
@CASE_PARAMS
def test_proven_secrets_refuses_evidence_of_another_connection(
    pair_factory: Callable[[Case, bool], Pair],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    case: Case,
    ours_is_server: bool,
) -> None:
    # Catches: the hand-off ignoring the proof's verdict, or its warning/exception carrying a secret.
    pair = pair_factory(case, ours_is_server)
    other = pair.connect()
    refusals: list[KernelTLSUnavailable] = []
    taken: list[ConnectionSecrets] = []

    def finish(handshake: Handshake, claim: SecretClaim) -> ConnectionSecrets:
        monkeypatch.setattr(handshake, "evidence", lambda: other.evidence)
        original_take = claim.take

        def take() -> ConnectionSecrets:
            secrets = original_take()
            taken.append(
                ConnectionSecrets(secrets.client_random, {k: Secret(bytes(v)) for k, v in secrets.secrets.items()})
            )
            taken.append(secrets)
            return secrets

        monkeypatch.setattr(claim, "take", take)
        with pytest.raises(KernelTLSUnavailable) as caught:
            proven_secrets(handshake, claim, server_side=ours_is_server)
        refusals.append(caught.value)
        return taken[0]

    with caplog.at_level(logging.WARNING, logger="ktls"):
        connection = pair.connect(finish)
    assert "not this connection's" in str(refusals[0])
    assert [r.levelno for r in caplog.records if r.name == "ktls"] == [logging.WARNING]
    assert_no_secret_in(str(refusals[0]) + repr(refusals[0]) + caplog.text, connection, other)
    # The refused secrets were wiped (taken[1] is the object proven_secrets held).
    assert all(bytes(secret) == bytes(len(secret)) for secret in taken[1].secrets.values())

"""Proof that the secrets read from the key log are this connection's own, before the kernel is keyed.

Theory of operation
-------------------
The key log ties a secret to a connection by the *client random* alone, and the client random is chosen by
the client and sent in the clear. A second handshake on the same context with the same random (a test tool
with a fixed random, or an on-path observer copying a victim's ClientHello) logs other secrets under the same
name. :mod:`ktls.core.keylog_capture` refuses a random that two handshakes in flight claim, or under which one
label was logged with two values; this module is the second, independent guard: it opens records that this
very connection sent and received, with keys derived from the claimed secrets. An AEAD tag that verifies is
proof (2^-128 forgery odds) that the secret is the one OpenSSL used for *this* connection's bytes.

What is proven, per version and role (RFC 8446 §7.1/§7.3, RFC 5246 §6.3/§7.4.9):

* **TLS 1.3.** ``CLIENT_HANDSHAKE_TRAFFIC_SECRET`` and ``SERVER_HANDSHAKE_TRAFFIC_SECRET``: the first
  protected record of each side's handshake flight is record 0 under that side's handshake key (the server's
  EncryptedExtensions, the client's Certificate or Finished). A server that sent NewSessionTickets at the end
  of its handshake also proves ``SERVER_TRAFFIC_SECRET_0`` — its send key — with the first ticket record
  (record 0 under it). What cannot be opened before the hand-off (``CLIENT_TRAFFIC_SECRET_0``: the client
  sends nothing under it until the handshake is over; a client's receive secret, proven later by its first
  received record, :meth:`ktls.core.connection.Connection.deferred_record`) comes from the same set of lines,
  which the capture has already found unambiguous. Received records are tried in order, because a client
  may send rejected 0-RTT records before its flight; at most :data:`~ktls.core.handshake.MAX_EVIDENCE_RECORDS` are kept.
* **TLS 1.2.** The master secret gives both directions' keys; both Finished records (the first record after
  each ChangeCipherSpec, record 0 of its epoch) must open, and hold a 12-byte Finished message.

Only AEADs :mod:`ktls.tls.aead` implements can be proven; any other suite stays in userspace TLS.
"""

from __future__ import annotations

import dataclasses

from ..constants import RECORD_HEADER_SIZE, ContentType, HandshakeType, TLSVersion
from .aead import AuthenticationFailed, Opened, authenticate, can_open
from .keylog import ConnectionSecrets, KeylogLabel
from .keyschedule import TrafficKeys, key_block, traffic_key_and_iv
from .suites import CipherSuite

__all__ = ["HandshakeEvidence", "OpenedRecord", "SecretsNotProven", "open_record", "prove_secrets"]

_TLS12_FINISHED_LENGTH = 4 + 12  # header + verify_data (RFC 5246 §7.4.9: verify_data_length 12)
#: How much of a TLS 1.3 record's end is decrypted at a time while looking for its content type.
_PADDING_WINDOW = 16


class SecretsNotProven(Exception):
    """The key log's secrets could not be shown to be this connection's: the kernel must not get them.

    The message says why, in words, and never holds a secret.
    """


@dataclasses.dataclass(frozen=True)
class HandshakeEvidence:
    """Protected records (header included) that this connection sent and received during its handshake."""

    #: TLS 1.3: records of outer type application_data, in order (our flight, then our tickets if any).
    sent: tuple[bytes, ...]
    received: tuple[bytes, ...]
    #: TLS 1.2: the first record after each ChangeCipherSpec (the Finished).
    sent_finished: bytes | None
    received_finished: bytes | None
    #: TLS 1.3 server: index in ``sent`` of the first record written after the handshake (its first ticket).
    first_ticket: int | None = None

    def __repr__(self) -> str:
        return f"HandshakeEvidence(sent={len(self.sent)} records, received={len(self.received)} records)"


@dataclasses.dataclass(frozen=True)
class OpenedRecord:
    """A protected record whose tag verified: its content type, and its content read on demand (only the
    bytes asked for are decrypted, :class:`~ktls.tls.aead.Opened`)."""

    content_type: ContentType | int
    #: Bytes of content (TLS 1.3: the inner plaintext without its content type and padding).
    length: int
    _message: Opened

    def read(self, start: int = 0, end: int | None = None) -> bytes:
        start, end, _ = slice(start, end).indices(self.length)
        return self._message.read(start, end)


def open_record(suite: CipherSuite, keys: TrafficKeys, seq: int, record: bytes) -> OpenedRecord:
    """Authenticate one protected record (header included) at sequence number ``seq``.

    TLS 1.3 (RFC 8446 §5.2-5.3): nonce = iv XOR seq, additional data = the record header, the inner
    plaintext's last non-zero byte is the content type. TLS 1.2 (RFC 5246 §6.2.3.3): additional data =
    seq ‖ type ‖ version ‖ plaintext length; the nonce is salt ‖ the record's explicit nonce (GCM, CCM), or
    iv XOR seq (ChaCha20-Poly1305, RFC 7905 §2). Raises :class:`~ktls.tls.aead.AuthenticationFailed`.
    """
    header, body = record[:RECORD_HEADER_SIZE], record[RECORD_HEADER_SIZE:]
    if suite.version is TLSVersion.TLS1_3:
        inner = authenticate(suite.aead, keys.key, _xor_seq(keys.iv, seq), body, header)
        end = len(inner)
        while end > 0:  # the content type is the last non-zero byte; zeros after it are padding (§5.4)
            start = max(0, end - _PADDING_WINDOW)
            window = inner.read(start, end).rstrip(b"\0")
            if window:
                type_at = start + len(window) - 1
                return OpenedRecord(_content_type(window[-1]), type_at, inner)
            end = start
        raise AuthenticationFailed("an inner plaintext with no content type")
    explicit_size = suite.explicit_nonce_size
    if len(body) < explicit_size + suite.tag_size:
        raise AuthenticationFailed("a record shorter than its nonce and tag")
    plain_length = len(body) - explicit_size - suite.tag_size
    aad = seq.to_bytes(8, "big") + header[:3] + plain_length.to_bytes(2, "big")
    if explicit_size:
        nonce, body = keys.iv + body[:explicit_size], body[explicit_size:]
    else:
        nonce = _xor_seq(keys.iv, seq)
    message = authenticate(suite.aead, keys.key, nonce, body, aad)
    return OpenedRecord(_content_type(header[0]), plain_length, message)


def prove_secrets(
    suite: CipherSuite,
    secrets: ConnectionSecrets,
    evidence: HandshakeEvidence,
    *,
    client_random: bytes,
    server_random: bytes,
    server_side: bool,
) -> None:
    """Raise :class:`SecretsNotProven` unless ``secrets`` open this connection's own records (module docstring)."""
    if not can_open(suite.aead):
        raise SecretsNotProven(f"ktls cannot verify {suite.aead.name} secrets before the hand-off")
    if suite.version is TLSVersion.TLS1_3:
        _prove_tls13(suite, secrets, evidence, server_side=server_side)
    else:
        _prove_tls12(suite, secrets, evidence, client_random, server_random, server_side=server_side)


def _prove_tls13(
    suite: CipherSuite, secrets: ConnectionSecrets, evidence: HandshakeEvidence, *, server_side: bool
) -> None:
    client, server = (
        secrets.get(KeylogLabel.CLIENT_HANDSHAKE_TRAFFIC_SECRET),
        secrets.get(KeylogLabel.SERVER_HANDSHAKE_TRAFFIC_SECRET),
    )
    if client is None or server is None or len(client) != suite.hash_size or len(server) != suite.hash_size:
        raise SecretsNotProven("the key log has no handshake traffic secrets for this connection")
    ours, theirs = (server, client) if server_side else (client, server)
    if evidence.first_ticket == 0 or not _opens(suite, traffic_key_and_iv(bytes(ours), suite), evidence.sent[:1]):
        raise SecretsNotProven("our handshake traffic secret does not open the first record we sent")
    if not _opens(suite, traffic_key_and_iv(bytes(theirs), suite), evidence.received):
        raise SecretsNotProven("the peer's handshake traffic secret opens none of the records it sent")
    if evidence.first_ticket is not None:
        if evidence.first_ticket >= len(evidence.sent):
            # More records than the evidence keeps came before the ticket: fail closed, never skip the check.
            raise SecretsNotProven("our first session ticket came after more records than ktls keeps as evidence")
        application = secrets.get(
            KeylogLabel.SERVER_TRAFFIC_SECRET_0 if server_side else KeylogLabel.CLIENT_TRAFFIC_SECRET_0
        )
        ticket = evidence.sent[evidence.first_ticket : evidence.first_ticket + 1]
        if application is None or not _opens(suite, traffic_key_and_iv(bytes(application), suite), ticket):
            raise SecretsNotProven("our application traffic secret does not open our first session ticket")


def _prove_tls12(
    suite: CipherSuite,
    secrets: ConnectionSecrets,
    evidence: HandshakeEvidence,
    client_random: bytes,
    server_random: bytes,
    *,
    server_side: bool,
) -> None:
    master = secrets.master_secret
    if master is None or len(master) != 48:
        raise SecretsNotProven("the key log has no master secret for this connection")
    tx, rx = key_block(bytes(master), client_random, server_random, suite).tx_rx(server_side=server_side)
    for keys, record, whose in ((tx, evidence.sent_finished, "our"), (rx, evidence.received_finished, "the peer's")):
        if record is None:
            raise SecretsNotProven(f"{whose} Finished record was not seen")
        try:
            opened = open_record(suite, keys, 0, record)
        except AuthenticationFailed:
            raise SecretsNotProven(f"the master secret does not open {whose} Finished record") from None
        if opened.content_type != ContentType.HANDSHAKE or opened.read(0, 1) != bytes([HandshakeType.FINISHED]):
            raise SecretsNotProven(f"{whose} first record after ChangeCipherSpec is not a Finished")
        if opened.length != _TLS12_FINISHED_LENGTH:
            raise SecretsNotProven(f"{whose} Finished is not {_TLS12_FINISHED_LENGTH} bytes")


def _opens(suite: CipherSuite, keys: TrafficKeys, records: tuple[bytes, ...]) -> bool:
    """Whether any of ``records`` (TLS 1.3) authenticates as record 0 under ``keys``. The tag is the proof;
    nothing needs decrypting, which keeps the cost to two block encryptions and a GHASH per record."""
    for record in records:
        header, body = record[:RECORD_HEADER_SIZE], record[RECORD_HEADER_SIZE:]
        try:
            authenticate(suite.aead, keys.key, _xor_seq(keys.iv, 0), body, header)
        except AuthenticationFailed:
            continue
        return True
    return False


def _xor_seq(iv: bytes, seq: int) -> bytes:
    """RFC 8446 §5.3: the sequence number, left-padded to the IV's length, XOR the IV."""
    return (int.from_bytes(iv, "big") ^ seq).to_bytes(len(iv), "big")


def _content_type(value: int) -> ContentType | int:
    try:
        return ContentType(value)
    except ValueError:
        return value

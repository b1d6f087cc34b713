"""The TLS handshake of Python's ``ssl`` module, driven over memory BIOs one record at a time, sans I/O.

Theory of operation. ``ssl.SSLObject`` runs the handshake against two ``ssl.MemoryBIO``\\ s; the I/O layer
(blocking or asyncio) moves bytes between them and the socket. Three things make the result usable by the
kernel, and they are why this is not just ``SSLContext.wrap_socket``:

* **Exactly one record at a time.** The kernel starts parsing records at the socket's read position, so the
  handshake must not read past its last record (rustls/ktls#20: read-ahead puts the kernel mid-record, and
  every later read fails with ``EMSGSIZE``/``EINVAL``). :meth:`Handshake.bytes_needed` says how many bytes
  finish the current record — 5 for a header, then its length — and the I/O layer reads no more than that.
  A faster way to the same end, for an I/O layer that can peek: :meth:`Handshake.offer` the bytes that have
  arrived (``MSG_PEEK``: still unread in the socket) — OpenSSL gets every whole record among them at once —
  and after :meth:`Handshake.step`, :meth:`Handshake.take_offered` says how many of them OpenSSL used: the
  I/O layer reads exactly those. Records past the handshake's last one (a client's first request right behind
  its Finished) go back out of OpenSSL's buffer and stay in the socket for the kernel. OpenSSL reads a
  memory BIO one record at a time (no read-ahead unless asked), so what it leaves is whole records.
* **Exact sequence numbers.** Both sides count records from the first one protected with the traffic keys.
  TLS 1.3: our send sequence number is the number of records we wrote after our Finished — a server's
  OpenSSL writes its NewSessionTickets (2 by default) in the very step that completes the handshake, so those
  are counted; a client has written none. Our receive sequence number is 0 on a server; on a client the
  server's tickets may be in flight, which :mod:`ktls.stream` handles. TLS 1.2: each direction's Finished is
  record 0 of its epoch, so both are 1 — and for AES-GCM/CCM the explicit nonce of the next record we send is
  our Finished's explicit nonce + 1 (OpenSSL starts it at a random value, not at the sequence number).
* **Whose secrets.** OpenSSL writes the traffic secrets to the key log (:mod:`ktls.core.keylog_capture`); the
  client random says which lines are this connection's. It is read from the *first ClientHello message*,
  reassembled from the handshake records as a message stream (a hello may be split one byte per record, or
  share a record), never from a record that merely starts like one; TLS 1.2's server random likewise from
  the real ServerHello (not a HelloRetryRequest). The random is announced (``on_client_random``) before
  OpenSSL can log a secret under it, so the capture can tell when two handshakes claim one random. The
  first protected records of each direction are kept as evidence (:meth:`Handshake.evidence`): the secrets
  must open them before the kernel gets any key (:mod:`ktls.tls.proof`).

A handshake failure leaves an alert in the outgoing BIO: the I/O layer sends :meth:`data_to_send` before it
raises, so the peer learns why.
"""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import Callable

from ..constants import MAX_CIPHERTEXT_TLS12, RECORD_HEADER_SIZE, ContentType, HandshakeType, TLSVersion
from ..errors import KernelTLSUnavailable
from ..tls.proof import HandshakeEvidence
from ..tls.records import HANDSHAKE_HEADER_SIZE, RecordReader, parse_record_header, whole_records_length
from ..tls.suites import suite_by_openssl_name

__all__ = ["HELLO_RETRY_REQUEST_RANDOM", "MAX_EVIDENCE_RECORDS", "Handshake", "HandshakeResult"]


@dataclasses.dataclass(frozen=True)
class HandshakeResult:
    """What the handshake leaves for the hand-off to the kernel (no secrets: those are in the key log)."""

    version: TLSVersion
    openssl_cipher: str
    client_random: bytes
    server_random: bytes
    #: Sequence number of the next record we send / receive.
    tx_seq: int
    rx_seq: int
    #: TLS 1.2 GCM/CCM: explicit nonce of the next record we send.
    tx_explicit_nonce: int | None


#: RFC 8446 §4.1.3: a ServerHello with this random is a HelloRetryRequest, not the real ServerHello.
HELLO_RETRY_REQUEST_RANDOM = bytes.fromhex("CF21AD74E59A6111BE1D8C021E65B891C2A211167ABB8C5E079E09E2C8A8339C")

#: Protected records kept per direction as evidence for :mod:`ktls.tls.proof`. A handshake protects a handful
#: (TLS 1.3 server: EncryptedExtensions … Finished, then its tickets; TLS 1.2: one Finished each way); the
#: bound only stops a peer that sends many (e.g. rejected early data) from making us keep them all.
MAX_EVIDENCE_RECORDS = 64

_HELLO_BODY_PREFIX = 2 + 32  # legacy_version, random (RFC 8446 §4.1.2, RFC 5246 §7.4.1.2)
_CONTENT_TYPES = frozenset(int(content_type) for content_type in ContentType)
_CHANGE_CIPHER_SPEC, _HANDSHAKE, _APPLICATION_DATA = (
    int(ContentType.CHANGE_CIPHER_SPEC),
    int(ContentType.HANDSHAKE),
    int(ContentType.APPLICATION_DATA),
)


class _HelloReader:
    """The plaintext handshake *messages* of one direction, reassembled across records, reduced to what the
    hand-off needs: the ``random`` of each hello of the expected type.

    Messages are framed as a stream (a hello may come one byte per record, or share a record with others), so
    only a real hello message is read — never a record that merely starts like one (a decoy). Bodies are not
    kept: at most a message header and a hello's first 34 body bytes are buffered, however large the messages.
    """

    def __init__(self, hello: HandshakeType) -> None:
        self._hello = hello
        self._hello_type = int(hello)
        self._buffer = bytearray()  # the current message's header, then (for a hello) its first body bytes
        self._body_left = 0  # bytes of the current message's body still to come
        self._is_hello = False
        #: The first two hellos' randoms (a second ClientHello follows a HelloRetryRequest; a third hello is
        #: never legal, and OpenSSL refuses it: keeping two bounds what a peer can make us hold).
        self.randoms: list[bytes] = []

    def feed(self, fragment: bytes) -> None:
        start, size = 0, len(fragment)
        # Between messages, each message that lies whole in this fragment is read where it is (the usual case:
        # a hello alone in its record); a message cut by the fragment's end goes through the buffer below.
        while self._body_left == 0 and not self._buffer and size - start >= HANDSHAKE_HEADER_SIZE:
            end = (
                start
                + HANDSHAKE_HEADER_SIZE
                + int.from_bytes(fragment[start + 1 : start + HANDSHAKE_HEADER_SIZE], "big")
            )
            if end > size:
                break
            hello = fragment[start] == self._hello_type and end - start >= HANDSHAKE_HEADER_SIZE + _HELLO_BODY_PREFIX
            if hello and len(self.randoms) < 2:  # (_message_ended's rules)
                body = start + HANDSHAKE_HEADER_SIZE
                self.randoms.append(fragment[body + 2 : body + _HELLO_BODY_PREFIX])
            start = end
        view = memoryview(fragment)[start:]
        while view:
            if self._body_left == 0 and len(self._buffer) < HANDSHAKE_HEADER_SIZE:
                take = HANDSHAKE_HEADER_SIZE - len(self._buffer)
                self._buffer += view[:take]
                view = view[take:]
                if len(self._buffer) == HANDSHAKE_HEADER_SIZE:
                    self._is_hello = self._buffer[0] == self._hello
                    self._body_left = int.from_bytes(self._buffer[1:4], "big")
                    self._message_started()
                continue
            take = min(self._body_left, len(view))
            if self._is_hello and len(self._buffer) < HANDSHAKE_HEADER_SIZE + _HELLO_BODY_PREFIX:
                self._buffer += view[: min(take, HANDSHAKE_HEADER_SIZE + _HELLO_BODY_PREFIX - len(self._buffer))]
            self._body_left -= take
            view = view[take:]
            if self._body_left == 0:
                self._message_ended()

    def _message_started(self) -> None:
        if self._body_left == 0:
            self._message_ended()

    def _message_ended(self) -> None:
        if self._is_hello:
            body = bytes(self._buffer[HANDSHAKE_HEADER_SIZE:])
            # Too short to hold a random: OpenSSL refuses it. legacy_version is not checked: OpenSSL ignores it
            # when supported_versions is there, and a random we skipped would be one we never bind.
            if len(body) >= _HELLO_BODY_PREFIX and len(self.randoms) < 2:
                self.randoms.append(body[2:_HELLO_BODY_PREFIX])
        self._buffer.clear()
        self._is_hello = False


class _RecordScanner:
    """Cuts one direction's byte stream into records and remembers what the hand-off needs from them: the
    hello randoms (from the plaintext handshake messages) and the first protected records (the evidence that
    :mod:`ktls.tls.proof` checks the key log's secrets against).

    Every header is checked as :func:`~ktls.tls.records.parse_record_header` does (with its errors); a
    record is read by its type byte and length alone, with no object made for it (a handshake passes some
    fifteen records through here, twice each way)."""

    def __init__(self, hello: HandshakeType) -> None:
        self._pending = b""  # the start of a record whose end has not been fed yet
        self._hellos = _HelloReader(hello)
        self.seen_change_cipher_spec = False
        self.seen_protected = False  # TLS 1.3: a record of outer type application_data (encrypted)
        #: TLS 1.2: the first record after ChangeCipherSpec (the Finished), header included.
        self.first_after_change_cipher_spec: bytes | None = None
        #: TLS 1.3: the records of outer type application_data, in order (at most MAX_EVIDENCE_RECORDS).
        self.protected: list[bytes] = []
        self.protected_count = 0
        self.records = 0
        #: A HelloRetryRequest was seen (either direction): a TLS 1.3 middlebox-compatibility
        #: ChangeCipherSpec is then followed by a plaintext hello (RFC 8446 §D.4), where in TLS 1.2 the record
        #: after ChangeCipherSpec is the encrypted Finished, which must never be read as messages.
        self.hello_retry = False

    @property
    def hello_randoms(self) -> list[bytes]:
        """The random of every hello of this direction, in order (two after a HelloRetryRequest)."""
        return self._hellos.randoms

    def feed(self, data: bytes) -> None:
        if self._pending:
            data, self._pending = self._pending + data, b""
        offset, size = 0, len(data)
        while size - offset >= RECORD_HEADER_SIZE:
            content_type = data[offset]
            length = data[offset + 3] << 8 | data[offset + 4]
            if data[offset + 1] != 3 or content_type not in _CONTENT_TYPES or length > MAX_CIPHERTEXT_TLS12:
                parse_record_header(data[offset : offset + RECORD_HEADER_SIZE])  # raises its error
            end = offset + RECORD_HEADER_SIZE + length
            if end > size:
                break
            self.records += 1
            if self.seen_change_cipher_spec and self.first_after_change_cipher_spec is None:
                self.first_after_change_cipher_spec = data[offset:end]
            if content_type == _APPLICATION_DATA:
                self.seen_protected = True
                self.protected_count += 1
                if len(self.protected) < MAX_EVIDENCE_RECORDS:
                    self.protected.append(data[offset:end])
            elif content_type == _CHANGE_CIPHER_SPEC:
                self.seen_change_cipher_spec = True
            elif content_type == _HANDSHAKE and self._plaintext_handshake:
                self._hellos.feed(data[offset + RECORD_HEADER_SIZE : end])
                self.hello_retry = self.hello_retry or HELLO_RETRY_REQUEST_RANDOM in self.hello_randoms
            offset = end
        if offset < size:
            self._pending = data[offset:]

    @property
    def _plaintext_handshake(self) -> bool:
        """Handshake records are still plaintext: nothing protected yet, and no ChangeCipherSpec — or one that
        follows a HelloRetryRequest (TLS 1.3 middlebox compatibility)."""
        return not self.seen_protected and (not self.seen_change_cipher_spec or self.hello_retry)


class Handshake:
    """One TLS handshake over memory BIOs. The I/O layer's loop::

    while not hs.step():
        send(hs.data_to_send())
        hs.receive(recv(hs.bytes_needed()))    # at most that many bytes; loop until the record is whole
    send(hs.data_to_send())
    """

    def __init__(
        self,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
        on_client_random: Callable[[bytes], None] | None = None,
    ) -> None:
        """``on_client_random`` is called with each client random of this handshake the moment it is known
        and before OpenSSL can log a secret under it (a server: when the ClientHello has arrived, before
        OpenSSL reads it; a client: right after OpenSSL wrote it) — :class:`ktls.core.keylog_capture.SecretClaim`
        binds it so."""
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.ssl_object = context.wrap_bio(
            self.incoming, self.outgoing, server_side=server_side, server_hostname=server_hostname, session=session
        )
        self.server_side = server_side
        self.complete = False
        self._incoming_records = RecordReader()  # the incoming record being assembled
        ours, theirs = HandshakeType.CLIENT_HELLO, HandshakeType.SERVER_HELLO
        self._sent = _RecordScanner(theirs if server_side else ours)
        self._received = _RecordScanner(ours if server_side else theirs)
        self._unsent = bytearray()
        self._offered = b""  # whole records given to OpenSSL by offer(), not yet accounted for
        self._on_client_random = on_client_random
        self._announced: list[bytes] = []
        self._first_ticket: int | None = None  # TLS 1.3 server: index of its first ticket record
        #: Records OpenSSL wrote during the latest :meth:`step` (TLS 1.3 server: its tickets).
        self.last_step_records = 0
        self._result: HandshakeResult | None = None  # once complete, what result() found

    # -- incoming -----------------------------------------------------------------------------------------------

    def bytes_needed(self) -> int:
        """How many more bytes complete the current incoming record (never more: see the module docstring)."""
        return self._incoming_records.bytes_needed

    def receive(self, data: bytes) -> bytes | None:
        """Bytes read from the socket: at most :meth:`bytes_needed`. ``b""`` means the peer closed.

        Returns the record once it is whole (it has then been given to OpenSSL), else ``None``. A malformed
        record header raises :class:`~ktls.errors.PeerMisbehaved` with the alert to send.
        """
        if not data:
            raise ssl.SSLEOFError(ssl.SSL_ERROR_EOF, "the peer closed the connection during the TLS handshake")
        if len(data) > self.bytes_needed():
            raise ValueError("received past the end of the current record")
        self._incoming_records.feed(data)
        record = self._incoming_records.next_record()
        if record is None:
            return None
        raw = bytes(record)
        self._received.feed(raw)
        self._share_hello_retry()
        self.incoming.write(raw)
        return raw

    #: How much an I/O layer peeks at before :meth:`offer`: a whole flight, usually.
    PEEK_SIZE = 65536

    @property
    def can_offer(self) -> bool:
        """Between records: the I/O layer may peek and :meth:`offer` (else it finishes the current record
        with :meth:`bytes_needed`/:meth:`receive`)."""
        return not self._offered and not self._incoming_records.buffered

    def offer(self, data: bytes) -> int:
        """Bytes that have arrived but are still unread in the socket (``MSG_PEEK``): the whole records at
        their start go to OpenSSL. Returns how many bytes those are; 0 when not even one record is whole —
        then read it with :meth:`bytes_needed`/:meth:`receive`. Call :meth:`step`, then :meth:`take_offered`.
        """
        if not self.can_offer:
            raise RuntimeError("offer() needs every earlier record accounted for")
        end = whole_records_length(data)
        if end and self.server_side and not self._sent.hello_randoms:
            # Before our first ServerHello (or HelloRetryRequest) one record at a time: a client that pipelines
            # ClientHello, ChangeCipherSpec and a second ClientHello must not have OpenSSL read the second in
            # the same step as the first, before the HelloRetryRequest that makes us read it as a hello —
            # OpenSSL would log secrets under a random never bound to our claim.
            end = whole_records_length(data, max_records=1)
        if end:
            self._offered = data[:end]
            # Scanned now, before OpenSSL reads them, so a ClientHello's random is bound before any secret is
            # logged under it. Records OpenSSL leaves (past the handshake's end) are protected application
            # records, which the scanner only counts.
            self._received.feed(self._offered)
            self._share_hello_retry()
            self.incoming.write(self._offered)
        return end

    def take_offered(self) -> int:
        """After :meth:`step`: how many of the offered bytes OpenSSL used — read exactly that many from the
        socket. What it left (records after the handshake's end) is taken back out of its buffer."""
        offered, self._offered = self._offered, b""
        if not offered:
            return 0
        left = self.incoming.pending
        used = len(offered) - left
        if left:
            self.incoming.read(left)
            if whole_records_length(offered[:used]) != used:
                raise ssl.SSLError("OpenSSL stopped in the middle of a record: cannot hand off exactly")
        return used

    # -- stepping -----------------------------------------------------------------------------------------------

    def step(self) -> bool:
        """Run OpenSSL until it needs another record; ``True`` once the handshake is complete.

        Raises ``ssl.SSLError`` (certificate, protocol, …) — send :meth:`data_to_send` first: it holds the alert.
        """
        self._drain_output()
        self._announce_client_random()
        before, protected_before = self._sent.records, self._sent.protected_count
        try:
            self.ssl_object.do_handshake()
        except ssl.SSLWantReadError:
            return False
        finally:
            self._drain_output()
            self._announce_client_random()
            self.last_step_records = self._sent.records - before
        self.complete = True
        if self._sent.protected_count > protected_before and self.server_side:
            self._first_ticket = protected_before
        return True

    def _share_hello_retry(self) -> None:
        """A HelloRetryRequest sent or received tells both directions' scanners (``_RecordScanner.hello_retry``)."""
        if self._sent.hello_retry or self._received.hello_retry:
            self._sent.hello_retry = self._received.hello_retry = True

    def _announce_client_random(self) -> None:
        self._share_hello_retry()
        scanner = self._received if self.server_side else self._sent
        for random in scanner.hello_randoms:
            if random not in self._announced:
                self._announced.append(random)
                if self._on_client_random is not None:
                    self._on_client_random(random)

    def _drain_output(self) -> None:
        if self.outgoing.pending:
            data = self.outgoing.read()
            self._sent.feed(data)
            self._share_hello_retry()
            self._unsent += data

    def data_to_send(self) -> bytes:
        """Everything OpenSSL wrote since the last call."""
        self._drain_output()
        data = bytes(self._unsent)
        self._unsent.clear()
        return data

    # -- result -------------------------------------------------------------------------------------------------

    def result(self) -> HandshakeResult:
        """The hand-off facts; call after :meth:`step` returned ``True`` and :meth:`data_to_send` was sent."""
        if not self.complete:
            raise RuntimeError("the handshake is not complete")
        self._drain_output()
        if self._result is None:
            self._result = self._hand_off_facts()
        return self._result

    def _hand_off_facts(self) -> HandshakeResult:
        version_name = self.ssl_object.version()
        cipher = self.ssl_object.cipher()
        if cipher is None or version_name not in ("TLSv1.2", "TLSv1.3"):
            raise ssl.SSLError(f"kernel TLS needs TLS 1.2 or 1.3, the handshake gave {version_name}")
        version = TLSVersion.TLS1_3 if version_name == "TLSv1.3" else TLSVersion.TLS1_2
        client_hellos = (self._received if self.server_side else self._sent).hello_randoms
        server_hellos = (self._sent if self.server_side else self._received).hello_randoms
        real_server_hellos = [random for random in server_hellos if random != HELLO_RETRY_REQUEST_RANDOM]
        if not client_hellos or not real_server_hellos:
            raise KernelTLSUnavailable(None, "could not read the hello randoms of this handshake")
        client_random, server_random = client_hellos[0], real_server_hellos[0]
        if version is TLSVersion.TLS1_3:
            tx_seq = self.last_step_records if self.server_side else 0
            return HandshakeResult(version, cipher[0], client_random, server_random, tx_seq, 0, None)
        suite = suite_by_openssl_name(cipher[0])
        finished = self._sent.first_after_change_cipher_spec
        nonce = finished[RECORD_HEADER_SIZE:] if finished is not None else None
        explicit = None
        if suite is not None and suite.explicit_nonce_size and nonce is not None:
            explicit = int.from_bytes(nonce[: suite.explicit_nonce_size], "big") + 1
        return HandshakeResult(version, cipher[0], client_random, server_random, 1, 1, explicit)

    def evidence(self) -> HandshakeEvidence:
        """The protected records this handshake sent and received, for :func:`ktls.tls.proof.prove_secrets`."""
        return HandshakeEvidence(
            sent=tuple(self._sent.protected),
            received=tuple(self._received.protected),
            sent_finished=self._sent.first_after_change_cipher_spec,
            received_finished=self._received.first_after_change_cipher_spec,
            first_ticket=self._first_ticket,
        )

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
* **Whose secrets.** OpenSSL writes the traffic secrets to the key log (:mod:`ktls.keylog_capture`); the
  client random read from the ClientHello says which lines are this connection's. TLS 1.2 also needs the
  server random, read from the ServerHello.

A handshake failure leaves an alert in the outgoing BIO: the I/O layer sends :meth:`data_to_send` before it
raises, so the peer learns why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ssl

from .constants import ContentType, HandshakeType, TLSVersion
from .tls.errors import TLSProtocolError
from .tls.records import (
    RecordReader,
    client_random_from_client_hello,
    server_random_from_server_hello,
    whole_records_length,
)
from .tls.suites import suite_by_openssl_name

__all__ = ["Handshake", "HandshakeResult"]


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


class _RecordScanner:
    """Cuts one direction's byte stream into records and remembers what the hand-off needs from them."""

    def __init__(self, hello: HandshakeType) -> None:
        self._reader = RecordReader()
        self._hello = hello
        self.hello_random: bytes | None = None  # of the last Client/ServerHello (after an HRR: the real one)
        self.seen_change_cipher_spec = False
        self.finished_explicit_nonce: bytes | None = None  # TLS 1.2: first 8 body bytes of the record after CCS
        self.records = 0

    def feed(self, data: bytes) -> None:
        self._reader.feed(data)
        for record in self._reader:
            self.records += 1
            if record.content_type is ContentType.HANDSHAKE and not self.seen_change_cipher_spec:
                with contextlib.suppress(TLSProtocolError):  # not a hello: some other handshake record
                    self.hello_random = _hello_random(bytes(record), self._hello) or self.hello_random
            if record.content_type is ContentType.CHANGE_CIPHER_SPEC:
                self.seen_change_cipher_spec = True
            elif self.seen_change_cipher_spec and self.finished_explicit_nonce is None:
                self.finished_explicit_nonce = record.fragment[:8]


def _hello_random(record: bytes, hello: HandshakeType) -> bytes | None:
    if hello is HandshakeType.CLIENT_HELLO:
        return client_random_from_client_hello(record)
    return server_random_from_server_hello(record)


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
    ) -> None:
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
        #: Records OpenSSL wrote during the latest :meth:`step` (TLS 1.3 server: its tickets).
        self.last_step_records = 0

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
        if end:
            self._offered = data[:end]
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
        self._received.feed(offered[:used])
        return used

    # -- stepping -----------------------------------------------------------------------------------------------

    def step(self) -> bool:
        """Run OpenSSL until it needs another record; ``True`` once the handshake is complete.

        Raises ``ssl.SSLError`` (certificate, protocol, …) — send :meth:`data_to_send` first: it holds the alert.
        """
        self._drain_output()
        before = self._sent.records
        try:
            self.ssl_object.do_handshake()
        except ssl.SSLWantReadError:
            return False
        finally:
            self._drain_output()
            self.last_step_records = self._sent.records - before
        self.complete = True
        return True

    def _drain_output(self) -> None:
        if self.outgoing.pending:
            data = self.outgoing.read()
            self._sent.feed(data)
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
        version_name = self.ssl_object.version()
        cipher = self.ssl_object.cipher()
        if cipher is None or version_name not in ("TLSv1.2", "TLSv1.3"):
            raise ssl.SSLError(f"kernel TLS needs TLS 1.2 or 1.3, the handshake gave {version_name}")
        version = TLSVersion.TLS1_3 if version_name == "TLSv1.3" else TLSVersion.TLS1_2
        client_random = self._sent.hello_random if not self.server_side else self._received.hello_random
        server_random = self._received.hello_random if not self.server_side else self._sent.hello_random
        if client_random is None or server_random is None:
            raise ssl.SSLError("could not read the hello randoms of this handshake")
        if version is TLSVersion.TLS1_3:
            tx_seq = self.last_step_records if self.server_side else 0
            return HandshakeResult(version, cipher[0], client_random, server_random, tx_seq, 0, None)
        suite = suite_by_openssl_name(cipher[0])
        nonce = self._sent.finished_explicit_nonce
        explicit = None
        if suite is not None and suite.explicit_nonce_size and nonce is not None:
            explicit = int.from_bytes(nonce[: suite.explicit_nonce_size], "big") + 1
        return HandshakeResult(version, cipher[0], client_random, server_random, 1, 1, explicit)

"""A minimal TLS 1.2 client with a client random of the test's choosing — an independent implementation.

The TLS 1.2 sibling of ``raw_tls13``: written from RFC 5246 (§7.4 handshake, §5 PRF, §6.3 key block, §7.4.9
Finished), RFC 8422 (ECDHE with X25519) and RFC 5288 (AES-GCM), with the ``cryptography`` package and
``reference_tls``; it shares no code with ktls. It offers ECDHE-RSA-AES128-GCM-SHA256 only, without the
extended master secret (so the key log's ``CLIENT_RANDOM`` line is the plain RFC 5246 master secret), does not
check the server's certificate or signature (it is a test peer), and checks the server's Finished.

Same step-by-step interface as ``RawTLS13Client``: ``client_hello()``, ``receive()`` until ``flight_done``
(the ServerHelloDone), ``client_finished()`` (ClientKeyExchange, ChangeCipherSpec, Finished: the server logs
its master secret when it reads them), ``receive()`` until ``server_finished``, then ``seal()``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from raw_framing import Framing, extension, handshake_message, record, vector
from reference_tls import TLS12, RecordProtection

AES_GCM_128 = 51
ECDHE_RSA_AES128_GCM_SHA256 = 0xC02F
X25519 = 0x001D
HANDSHAKE, APPLICATION_DATA, CHANGE_CIPHER_SPEC, ALERT = 22, 23, 20, 21
CLIENT_HELLO, SERVER_HELLO, SERVER_KEY_EXCHANGE, SERVER_HELLO_DONE = 1, 2, 12, 14
CLIENT_KEY_EXCHANGE, FINISHED = 16, 20


def prf(secret: bytes, label: bytes, seed: bytes, length: int) -> bytes:
    """RFC 5246 §5, P_SHA256."""
    seed = label + seed
    out, a = b"", seed
    while len(out) < length:
        a = hmac.digest(secret, a, "sha256")
        out += hmac.digest(secret, a + seed, "sha256")
    return out[:length]


class RawTLS12Client(Framing):
    """One TLS 1.2 connection's client side, sans I/O (module docstring)."""

    version = "TLSv1.2"

    def __init__(self, client_random: bytes) -> None:
        super().__init__()
        assert len(client_random) == 32
        self.client_random = client_random
        self._key = X25519PrivateKey.generate()
        self._transcript = b""
        self._server_random = b""
        self._server_public = b""
        self.master_secret = b""
        self._client_write: RecordProtection | None = None
        self._server_write: RecordProtection | None = None
        self._server_encrypting = False
        self.flight_done = False
        self.server_finished = False
        self.application_data = bytearray()
        self.alerts: list[bytes] = []

    @property
    def secrets(self) -> dict[str, bytes]:
        """The key-log lines a server should log for this connection, by label."""
        return {"CLIENT_RANDOM": self.master_secret}

    def client_hello(self) -> bytes:
        extensions = b"".join(
            (
                extension(10, vector(2, struct.pack("!H", X25519))),  # supported_groups
                extension(11, vector(1, b"\x00")),  # ec_point_formats: uncompressed
                extension(13, vector(2, struct.pack("!3H", 0x0804, 0x0401, 0x0501))),  # signature_algorithms
                extension(0xFF01, vector(1, b"")),  # renegotiation_info (RFC 5746), initial handshake
            )
        )
        body = (
            struct.pack("!H", TLS12)
            + self.client_random
            + vector(1, b"")
            + vector(2, struct.pack("!H", ECDHE_RSA_AES128_GCM_SHA256))
            + vector(1, b"\x00")
            + vector(2, extensions)
        )
        message = handshake_message(CLIENT_HELLO, body)
        self._transcript += message
        return record(HANDSHAKE, message, version=0x0301)

    def _record(self, whole: bytes) -> None:
        content_type = whole[0]
        if content_type == CHANGE_CIPHER_SPEC:
            self._server_encrypting = True
            return
        if self._server_encrypting:
            assert self._server_write is not None
            opened = self._server_write.open(whole)  # InvalidTag if the server's keys are not ours
            content_type, payload = opened.content_type, opened.plaintext
        else:
            payload = whole[5:]
        if content_type == ALERT:
            self.alerts.append(payload)
        elif content_type == APPLICATION_DATA:
            self.application_data += payload
        elif content_type == HANDSHAKE:
            self._handshake_fragment(payload)

    def _message(self, message: bytes) -> None:
        kind, body = message[0], message[4:]
        if kind == FINISHED:
            expected = prf(self.master_secret, b"server finished", hashlib.sha256(self._transcript).digest(), 12)
            assert hmac.compare_digest(body, expected), "the server's Finished does not verify"
            self.server_finished = True
            return
        self._transcript += message
        if kind == SERVER_HELLO:
            self._server_random = body[2:34]
            offset = 34 + 1 + body[34]
            suite = int.from_bytes(body[offset : offset + 2], "big")
            assert suite == ECDHE_RSA_AES128_GCM_SHA256, f"server chose suite {suite:#06x}"
        elif kind == SERVER_KEY_EXCHANGE:
            assert body[0] == 3, "named_curve"
            assert int.from_bytes(body[1:3], "big") == X25519
            self._server_public = body[4 : 4 + body[3]]
        elif kind == SERVER_HELLO_DONE:
            self.flight_done = True

    def client_finished(self) -> bytes:
        """ClientKeyExchange, ChangeCipherSpec and our Finished (record 0 under our write key)."""
        assert self.flight_done
        public = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        key_exchange = handshake_message(CLIENT_KEY_EXCHANGE, vector(1, public))
        self._transcript += key_exchange
        shared = self._key.exchange(X25519PublicKey.from_public_bytes(self._server_public))
        self.master_secret = prf(shared, b"master secret", self.client_random + self._server_random, 48)
        block = prf(self.master_secret, b"key expansion", self._server_random + self.client_random, 40)
        self._client_write = RecordProtection(
            AES_GCM_128, TLS12, block[:16], block[32:36], 0, int.from_bytes(os.urandom(8), "big")
        )
        self._server_write = RecordProtection(AES_GCM_128, TLS12, block[16:32], block[36:40], 0)
        verify = prf(self.master_secret, b"client finished", hashlib.sha256(self._transcript).digest(), 12)
        finished = handshake_message(FINISHED, verify)
        self._transcript += finished
        return (
            record(HANDSHAKE, key_exchange)
            + record(CHANGE_CIPHER_SPEC, b"\x01")
            + self._client_write.seal(HANDSHAKE, finished)
        )

    def seal(self, data: bytes) -> bytes:
        assert self._client_write is not None
        return self._client_write.seal(APPLICATION_DATA, data)

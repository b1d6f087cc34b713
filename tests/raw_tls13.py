"""A minimal TLS 1.3 client with a client random of the test's choosing — an independent implementation.

Written from RFC 8446 (§4.1.2 ClientHello, §4.2 extensions, §7.1 key schedule, §4.4.4 Finished) with the
``cryptography`` package (X25519, HKDF) and ``reference_tls`` for record protection; it shares no code with
ktls. Stock TLS libraries pick their own client random; this one sends the random it is given, so tests can
make two handshakes share one (what a test tool with a fixed random, or an on-path observer copying a
victim's ClientHello, does). It offers TLS_AES_128_GCM_SHA256 with X25519 only and does not check the server's
certificate (it is a test peer), but it checks the server's Finished.

It is sans-IO and driven step by step, so a test controls exactly when each server logs its secrets::

    client = RawTLS13Client(random)
    sock.sendall(client.client_hello())
    while not client.server_finished:          # the server has logged all its secrets by now
        client.receive(sock.recv(65536))
    sock.sendall(client.client_finished())     # the server completes and hands off
    sock.sendall(client.seal(b"request")); client.receive(...); client.application_data
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from raw_framing import Framing, extension, handshake_message, record, vector
from reference_tls import TLS12, TLS13, RecordProtection

AES_GCM_128 = 51  # the reference layer's cipher id (include/uapi/linux/tls.h)
TLS_AES_128_GCM_SHA256 = 0x1301
X25519 = 0x001D
HANDSHAKE, APPLICATION_DATA, CHANGE_CIPHER_SPEC, ALERT = 22, 23, 20, 21
CLIENT_HELLO, SERVER_HELLO, NEW_SESSION_TICKET, FINISHED = 1, 2, 4, 20


def hkdf_expand_label(secret: bytes, label: bytes, context: bytes, length: int) -> bytes:
    """RFC 8446 §7.1, SHA-256."""
    full = b"tls13 " + label
    info = struct.pack("!HB", length, len(full)) + full + struct.pack("!B", len(context)) + context
    return HKDFExpand(hashes.SHA256(), length, info).derive(secret)


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.digest(salt, ikm, "sha256")


def derive_secret(secret: bytes, label: bytes, transcript: bytes) -> bytes:
    return hkdf_expand_label(secret, label, hashlib.sha256(transcript).digest(), 32)


def protection(secret: bytes) -> RecordProtection:
    key = hkdf_expand_label(secret, b"key", b"", 16)
    iv = hkdf_expand_label(secret, b"iv", b"", 12)
    return RecordProtection(AES_GCM_128, TLS13, key, iv, 0)


class RawTLS13Client(Framing):
    """One TLS 1.3 connection's client side, sans I/O (module docstring)."""

    def __init__(self, client_random: bytes, server_name: str = "localhost") -> None:
        super().__init__()
        assert len(client_random) == 32
        self.client_random = client_random
        self._server_name = server_name.encode()
        self._key = X25519PrivateKey.generate()
        self._transcript = b""
        self._server_hs: RecordProtection | None = None
        self._client_hs_secret = b""
        self._server_hs_secret = b""
        self.client_app: RecordProtection | None = None
        self.server_app: RecordProtection | None = None
        self.client_app_secret = b""
        self.server_app_secret = b""
        self.server_finished = False
        self.application_data = bytearray()
        self.tickets = 0
        self.alerts: list[bytes] = []

    version = "TLSv1.3"

    @property
    def flight_done(self) -> bool:
        """The server's flight is in (and the server has logged every secret of this connection)."""
        return self.server_finished

    @property
    def secrets(self) -> dict[str, bytes]:
        """The key-log lines a server hands to its kernel for this connection, by label."""
        return {"CLIENT_TRAFFIC_SECRET_0": self.client_app_secret, "SERVER_TRAFFIC_SECRET_0": self.server_app_secret}

    def client_hello(self) -> bytes:
        public = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        extensions = b"".join(
            (
                extension(0, vector(2, b"\x00" + vector(2, self._server_name))),  # server_name
                extension(10, vector(2, struct.pack("!H", X25519))),  # supported_groups
                extension(13, vector(2, struct.pack("!6H", 0x0804, 0x0805, 0x0806, 0x0403, 0x0503, 0x0401))),
                extension(43, vector(1, struct.pack("!H", TLS13))),  # supported_versions
                extension(51, vector(2, struct.pack("!H", X25519) + vector(2, public))),  # key_share
            )
        )
        body = (
            struct.pack("!H", TLS12)
            + self.client_random
            + vector(1, os.urandom(32))  # legacy_session_id (middlebox compatibility)
            + vector(2, struct.pack("!H", TLS_AES_128_GCM_SHA256))
            + vector(1, b"\x00")
            + vector(2, extensions)
        )
        message = handshake_message(CLIENT_HELLO, body)
        self._transcript += message
        return record(HANDSHAKE, message, version=0x0301)

    def _record(self, whole: bytes) -> None:
        content_type = whole[0]
        if content_type == CHANGE_CIPHER_SPEC:
            return
        if content_type == ALERT:
            self.alerts.append(whole[5:])
            return
        if content_type == HANDSHAKE:
            self._handshake_fragment(whole[5:])
            return
        assert content_type == APPLICATION_DATA, f"unexpected record type {content_type}"
        protection = self.server_app if self.server_finished else self._server_hs
        assert protection is not None, "a protected record before the ServerHello"
        opened = protection.open(whole)  # raises InvalidTag if the server used keys not derived from ours
        if opened.content_type == HANDSHAKE:
            self._handshake_fragment(opened.plaintext)
        elif opened.content_type == APPLICATION_DATA:
            self.application_data += opened.plaintext
        elif opened.content_type == ALERT:
            self.alerts.append(opened.plaintext)

    def _message(self, message: bytes) -> None:
        kind = message[0]
        if self.server_finished:
            assert kind == NEW_SESSION_TICKET, f"unexpected post-handshake message {kind}"
            self.tickets += 1
            return
        if kind == SERVER_HELLO:
            self._transcript += message
            self._server_hello(message[4:])
            return
        if kind == FINISHED:
            finished_key = hkdf_expand_label(self._server_hs_secret, b"finished", b"", 32)
            expected = hmac.digest(finished_key, hashlib.sha256(self._transcript).digest(), "sha256")
            assert hmac.compare_digest(message[4:], expected), "the server's Finished does not verify"
            self._transcript += message
            master = hkdf_extract(derive_secret(self._handshake_secret, b"derived", b""), bytes(32))
            self.client_app_secret = derive_secret(master, b"c ap traffic", self._transcript)
            self.server_app_secret = derive_secret(master, b"s ap traffic", self._transcript)
            self.client_app = protection(self.client_app_secret)
            self.server_app = protection(self.server_app_secret)
            self.server_finished = True
            return
        self._transcript += message  # EncryptedExtensions, Certificate, CertificateVerify: not checked

    def _server_hello(self, body: bytes) -> None:
        offset = 2 + 32
        session_id_length = body[offset]
        offset += 1 + session_id_length
        suite = int.from_bytes(body[offset : offset + 2], "big")
        assert suite == TLS_AES_128_GCM_SHA256, f"server chose suite {suite:#06x}"
        offset += 3
        extensions_end = offset + 2 + int.from_bytes(body[offset : offset + 2], "big")
        offset += 2
        server_public = b""
        while offset < extensions_end:
            kind, length = struct.unpack("!HH", body[offset : offset + 4])
            data = body[offset + 4 : offset + 4 + length]
            if kind == 51:
                assert int.from_bytes(data[:2], "big") == X25519
                server_public = data[4 : 4 + int.from_bytes(data[2:4], "big")]
            offset += 4 + length
        assert server_public, "no key_share in the ServerHello (a HelloRetryRequest is not supported here)"
        shared = self._key.exchange(X25519PublicKey.from_public_bytes(server_public))
        early = hkdf_extract(bytes(32), bytes(32))
        self._handshake_secret = hkdf_extract(derive_secret(early, b"derived", b""), shared)
        self._client_hs_secret = derive_secret(self._handshake_secret, b"c hs traffic", self._transcript)
        self._server_hs_secret = derive_secret(self._handshake_secret, b"s hs traffic", self._transcript)
        self._server_hs = protection(self._server_hs_secret)

    def client_finished(self) -> bytes:
        """ChangeCipherSpec (middlebox compatibility) and our Finished, under our handshake key."""
        assert self.server_finished
        finished_key = hkdf_expand_label(self._client_hs_secret, b"finished", b"", 32)
        verify = hmac.digest(finished_key, hashlib.sha256(self._transcript).digest(), "sha256")
        message = handshake_message(FINISHED, verify)
        self._transcript += message
        return record(CHANGE_CIPHER_SPEC, b"\x01") + protection(self._client_hs_secret).seal(HANDSHAKE, message)

    def seal(self, data: bytes) -> bytes:
        assert self.client_app is not None
        return self.client_app.seal(APPLICATION_DATA, data)

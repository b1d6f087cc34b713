"""TLS wire registries (IANA), shared by the kernel layer and the protocol layer.

Values are the ones on the wire: RFC 8446 §B (TLS 1.3), RFC 5246 §A (TLS 1.2), and the alert registry
(https://www.iana.org/assignments/tls-parameters/tls-parameters.xhtml#tls-parameters-6).
"""

from __future__ import annotations

import enum

__all__ = [
    "MAX_CIPHERTEXT_TLS12",
    "MAX_CIPHERTEXT_TLS13",
    "MAX_PLAINTEXT",
    "RECORD_HEADER_SIZE",
    "AlertDescription",
    "AlertLevel",
    "ContentType",
    "HandshakeType",
    "TLSVersion",
]

#: TLSPlaintext.length limit: 2^14 bytes of plaintext per record (RFC 8446 §5.1, RFC 5246 §6.2.1).
MAX_PLAINTEXT = 2**14
#: TLSCiphertext.length limit in TLS 1.3: plaintext + content type + padding/AEAD expansion (RFC 8446 §5.2).
MAX_CIPHERTEXT_TLS13 = 2**14 + 256
#: TLSCiphertext.length limit in TLS 1.2 (RFC 5246 §6.2.3).
MAX_CIPHERTEXT_TLS12 = 2**14 + 2048
#: ContentType (1) + legacy_record_version (2) + length (2).
RECORD_HEADER_SIZE = 5


class TLSVersion(enum.IntEnum):
    """ProtocolVersion as it appears in the kernel's ``struct tls_crypto_info.version``."""

    TLS1_2 = 0x0303
    TLS1_3 = 0x0304

    @property
    def label(self) -> str:
        """The name ``ssl.SSLSocket.version()`` uses: ``"TLSv1.2"`` / ``"TLSv1.3"``."""
        return "TLSv1.2" if self is TLSVersion.TLS1_2 else "TLSv1.3"


class ContentType(enum.IntEnum):
    """TLS record content types (RFC 8446 §5.1)."""

    CHANGE_CIPHER_SPEC = 20
    ALERT = 21
    HANDSHAKE = 22
    APPLICATION_DATA = 23


class HandshakeType(enum.IntEnum):
    """Handshake message types that can appear after the handshake (RFC 8446 §4, RFC 5246 §7.4)."""

    HELLO_REQUEST = 0
    CLIENT_HELLO = 1
    SERVER_HELLO = 2
    NEW_SESSION_TICKET = 4
    END_OF_EARLY_DATA = 5
    ENCRYPTED_EXTENSIONS = 8
    CERTIFICATE = 11
    SERVER_KEY_EXCHANGE = 12
    CERTIFICATE_REQUEST = 13
    SERVER_HELLO_DONE = 14
    CERTIFICATE_VERIFY = 15
    CLIENT_KEY_EXCHANGE = 16
    FINISHED = 20
    KEY_UPDATE = 24
    MESSAGE_HASH = 254


class AlertLevel(enum.IntEnum):
    """AlertLevel (RFC 5246 §7.2; in TLS 1.3 every alert but close_notify/user_canceled is fatal)."""

    WARNING = 1
    FATAL = 2


class AlertDescription(enum.IntEnum):
    """AlertDescription (RFC 8446 §6, plus the TLS 1.2-only ``no_renegotiation``, RFC 5246 §7.2)."""

    close_notify = 0
    unexpected_message = 10
    bad_record_mac = 20
    record_overflow = 22
    handshake_failure = 40
    bad_certificate = 42
    unsupported_certificate = 43
    certificate_revoked = 44
    certificate_expired = 45
    certificate_unknown = 46
    illegal_parameter = 47
    unknown_ca = 48
    access_denied = 49
    decode_error = 50
    decrypt_error = 51
    protocol_version = 70
    insufficient_security = 71
    internal_error = 80
    inappropriate_fallback = 86
    user_canceled = 90
    no_renegotiation = 100
    missing_extension = 109
    unsupported_extension = 110
    unrecognized_name = 112
    bad_certificate_status_response = 113
    unknown_psk_identity = 115
    certificate_required = 116
    no_application_protocol = 120

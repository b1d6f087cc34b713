"""The TLS protocol pieces kernel TLS needs, sans-IO: no sockets here, only bytes in and values out.

* :mod:`~ktls.tls.suites` — the cipher suites, and which kernel AEAD each maps to (or why none);
* :mod:`~ktls.tls.keylog` — the NSS key log ``SSLContext.keylog_filename`` writes: the secrets;
* :mod:`~ktls.tls.keyschedule` — secrets to keys and IVs (RFC 8446 §7, RFC 5246 §5-6), then to ``CryptoInfo``;
* :mod:`~ktls.tls.records` — record and handshake-message framing, and the hello randoms;
* :mod:`~ktls.tls.errors` — protocol errors, each carrying the alert to send.
"""

from .errors import DecodeError, IllegalParameter, RecordOverflowError, TLSProtocolError, UnexpectedMessage
from .keylog import ConnectionSecrets, KeylogEntry, KeylogLabel, KeylogParser, Secret, iter_keylog, parse_keylog_line
from .keyschedule import (
    KeyBlock,
    TrafficKeys,
    crypto_info,
    hkdf_expand_label,
    key_block,
    next_traffic_secret,
    prf,
    tls13_crypto_info,
    traffic_key_and_iv,
)
from .records import (
    HandshakeMessage,
    RecordHeader,
    RecordReader,
    TLSRecord,
    client_random_from_client_hello,
    parse_handshake_messages,
    parse_record_header,
    server_random_from_server_hello,
)
from .suites import SUITES, Aead, CipherSuite, suite_by_code, suite_by_name, suite_by_openssl_name

__all__ = [
    "SUITES",
    "Aead",
    "CipherSuite",
    "ConnectionSecrets",
    "DecodeError",
    "HandshakeMessage",
    "IllegalParameter",
    "KeyBlock",
    "KeylogEntry",
    "KeylogLabel",
    "KeylogParser",
    "RecordHeader",
    "RecordOverflowError",
    "RecordReader",
    "Secret",
    "TLSProtocolError",
    "TLSRecord",
    "TrafficKeys",
    "UnexpectedMessage",
    "client_random_from_client_hello",
    "crypto_info",
    "hkdf_expand_label",
    "iter_keylog",
    "key_block",
    "next_traffic_secret",
    "parse_handshake_messages",
    "parse_keylog_line",
    "parse_record_header",
    "prf",
    "server_random_from_server_hello",
    "suite_by_code",
    "suite_by_name",
    "suite_by_openssl_name",
    "tls13_crypto_info",
    "traffic_key_and_iv",
]

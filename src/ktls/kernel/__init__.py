"""The kernel's TLS interface: uapi constants and structs, the system calls, the probe, the counters.

Everything here speaks the kernel's words (``tx``/``rx``, crypto info, records); the layers above speak
sockets' words (``send``/``recv``).
"""

from .probe import CipherSupport, KernelSupport, kernel_version, probe
from .syscalls import (
    Record,
    get_crypto_info,
    get_rx_expect_no_pad,
    get_tx_max_payload_len,
    get_ulp,
    recv_record,
    recv_record_into,
    send_record,
    set_crypto_info,
    set_rx_expect_no_pad,
    set_tx_max_payload_len,
    set_tx_zerocopy_ro,
    setup_ulp,
)
from .tls_stat import TLS_STAT_PATH, parse_tls_stat, read_tls_stat
from .uapi import (
    CIPHERS,
    SOL_TLS,
    TCP_ULP,
    TLS_GET_RECORD_TYPE,
    TLS_RX,
    TLS_RX_EXPECT_NO_PAD,
    TLS_SET_RECORD_TYPE,
    TLS_TX,
    TLS_TX_MAX_PAYLOAD_LEN,
    TLS_TX_ZEROCOPY_RO,
    CipherType,
    CryptoInfo,
    Direction,
    KernelCipher,
)

__all__ = [
    "CIPHERS",
    "SOL_TLS",
    "TCP_ULP",
    "TLS_GET_RECORD_TYPE",
    "TLS_RX",
    "TLS_RX_EXPECT_NO_PAD",
    "TLS_SET_RECORD_TYPE",
    "TLS_STAT_PATH",
    "TLS_TX",
    "TLS_TX_MAX_PAYLOAD_LEN",
    "TLS_TX_ZEROCOPY_RO",
    "CipherSupport",
    "CipherType",
    "CryptoInfo",
    "Direction",
    "KernelCipher",
    "KernelSupport",
    "Record",
    "get_crypto_info",
    "get_rx_expect_no_pad",
    "get_tx_max_payload_len",
    "get_ulp",
    "kernel_version",
    "parse_tls_stat",
    "probe",
    "read_tls_stat",
    "recv_record",
    "recv_record_into",
    "send_record",
    "set_crypto_info",
    "set_rx_expect_no_pad",
    "set_tx_max_payload_len",
    "set_tx_zerocopy_ro",
    "setup_ulp",
]

"""What this kernel's TLS can do, asked of the kernel itself on loopback sockets.

Kernel versions are a poor guide: distributions build without ciphers (Debian has no SM4 or ARIA), backport
features, and load crypto modules on demand. So :func:`probe` tries each thing once on a throw-away loopback
connection — ULP, each cipher × TLS version × direction, a second ``TLS_TX``/``TLS_RX`` (TLS 1.3 rekey), the
optional socket options — and remembers the answer for the life of the process. It costs a few dozen
loopback connections, a few milliseconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
import re
import socket
import threading
from collections.abc import Iterator
from typing import Any

from ..constants import TLSVersion
from ..errors import KTLSError
from . import syscalls
from .uapi import CIPHERS, CipherType, CryptoInfo, Direction, KernelCipher

__all__ = ["CipherSupport", "KernelSupport", "kernel_version", "probe"]


@dataclasses.dataclass(frozen=True)
class CipherSupport:
    """Whether the kernel accepted one cipher for one TLS version, per direction."""

    cipher: CipherType
    version: TLSVersion
    tx: bool
    rx: bool
    #: Why it was refused (the typed error's message), ``None`` when both directions were accepted.
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class KernelSupport:
    """The result of :func:`probe`."""

    kernel_release: str
    #: ``setsockopt(TCP_ULP, "tls")`` works; when not, ``ulp_error`` says why and nothing else was tried.
    ulp: bool
    ulp_error: str | None
    ciphers: tuple[CipherSupport, ...]
    #: A second ``TLS_TX``/``TLS_RX`` on a TLS 1.3 socket works (Linux ≥ 6.14).
    rekey_tx: bool
    rekey_rx: bool
    rekey_error: str | None
    rx_expect_no_pad: bool
    tx_max_payload_len: bool

    @property
    def available(self) -> bool:
        """kTLS works for at least one cipher in both directions."""
        return self.ulp and any(c.tx and c.rx for c in self.ciphers)

    @property
    def rekey(self) -> bool:
        return self.rekey_tx and self.rekey_rx

    def supports(self, cipher: CipherType, version: TLSVersion, direction: Direction | None = None) -> bool:
        """Whether the kernel takes ``cipher`` for ``version`` (in ``direction``, or both when ``None``)."""
        for entry in self.ciphers:
            if entry.cipher is cipher and entry.version is version:
                if direction is Direction.TX:
                    return entry.tx
                if direction is Direction.RX:
                    return entry.rx
                return entry.tx and entry.rx
        return False

    def to_json(self) -> dict[str, Any]:
        return {
            "kernel_release": self.kernel_release,
            "available": self.available,
            "ulp": self.ulp,
            "ulp_error": self.ulp_error,
            "ciphers": [
                {
                    "cipher": c.cipher.name,
                    "version": c.version.label,
                    "tx": c.tx,
                    "rx": c.rx,
                    "error": c.error,
                }
                for c in self.ciphers
            ],
            "rekey_tx": self.rekey_tx,
            "rekey_rx": self.rekey_rx,
            "rekey_error": self.rekey_error,
            "rx_expect_no_pad": self.rx_expect_no_pad,
            "tx_max_payload_len": self.tx_max_payload_len,
        }


def kernel_version(release: str | None = None) -> tuple[int, int]:
    """``(major, minor)`` of a kernel release string such as ``"6.12.48+deb13-amd64"``."""
    match = re.match(r"(\d+)\.(\d+)", release or platform.release())
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


class _Loopback:
    """Connected TCP pairs on 127.0.0.1 from one listener, closed with it."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._address = self._listener.getsockname()

    @contextlib.contextmanager
    def pair(self) -> Iterator[tuple[socket.socket, socket.socket]]:
        client = socket.create_connection(self._address)
        try:
            server, _ = self._listener.accept()
        except BaseException:
            client.close()
            raise
        with client, server:
            yield client, server

    def close(self) -> None:
        self._listener.close()


def _dummy_info(cipher: KernelCipher, version: TLSVersion) -> CryptoInfo:
    key = bytes(range(cipher.key_size))
    if version is TLSVersion.TLS1_3:
        return CryptoInfo.tls13(cipher.cipher_type, key, bytes(cipher.nonce_size))
    fixed_iv = bytes(cipher.salt_size if cipher.salt_size else cipher.iv_size)
    return CryptoInfo.tls12(cipher.cipher_type, key, fixed_iv)


def _try(action: Any, *args: Any) -> str | None:
    """Run a kernel call; ``None`` when it worked, else the typed error's message."""
    try:
        action(*args)
    except KTLSError as exc:
        return str(exc)
    return None


def _probe_cipher(loop: _Loopback, cipher: KernelCipher, version: TLSVersion) -> CipherSupport:
    results: dict[Direction, str | None] = {}
    for direction in Direction:
        # A refused setsockopt can leave the socket half-configured: one fresh pair per attempt.
        with loop.pair() as (sock, _peer):
            syscalls.setup_ulp(sock)
            results[direction] = _try(syscalls.set_crypto_info, sock, direction, _dummy_info(cipher, version))
    errors = [e for e in results.values() if e is not None]
    return CipherSupport(
        cipher.cipher_type,
        version,
        tx=results[Direction.TX] is None,
        rx=results[Direction.RX] is None,
        error=errors[0] if errors else None,
    )


def _probe_options(loop: _Loopback, cipher: KernelCipher) -> tuple[bool, bool, str | None, bool, bool]:
    """Rekey (TX, RX), its error, TLS_RX_EXPECT_NO_PAD, TLS_TX_MAX_PAYLOAD_LEN on a TLS 1.3 socket."""
    info = _dummy_info(cipher, TLSVersion.TLS1_3)
    rekeyed = info.next_generation(bytes(reversed(info.key)), info.write_iv)
    with loop.pair() as (sock, _peer):
        syscalls.setup_ulp(sock)
        for direction in Direction:
            syscalls.set_crypto_info(sock, direction, info)
        no_pad = _try(syscalls.set_rx_expect_no_pad, sock, True) is None
        max_payload = _try(syscalls.set_tx_max_payload_len, sock, 16384) is None
        tx_error = _try(syscalls.set_crypto_info, sock, Direction.TX, rekeyed)
        rx_error = _try(syscalls.set_crypto_info, sock, Direction.RX, rekeyed)
    return tx_error is None, rx_error is None, tx_error or rx_error, no_pad, max_payload


def _run_probe() -> KernelSupport:
    release = platform.release()
    loop = _Loopback()
    try:
        with loop.pair() as (sock, _peer):
            ulp_error = _try(syscalls.setup_ulp, sock)
        if ulp_error is not None:
            return KernelSupport(release, False, ulp_error, (), False, False, ulp_error, False, False)
        ciphers = tuple(
            _probe_cipher(loop, cipher, version)
            for cipher in CIPHERS.values()
            for version in TLSVersion
            if version in cipher.versions
        )
        tls13 = next((CIPHERS[c.cipher] for c in ciphers if c.version is TLSVersion.TLS1_3 and c.tx and c.rx), None)
        if tls13 is None:
            no_tls13 = "no cipher works with TLS 1.3 on this kernel"
            return KernelSupport(release, True, None, ciphers, False, False, no_tls13, False, False)
        return KernelSupport(release, True, None, ciphers, *_probe_options(loop, tls13))
    finally:
        loop.close()


_lock = threading.Lock()
_cached: KernelSupport | None = None


def probe(*, refresh: bool = False) -> KernelSupport:
    """What this kernel's TLS supports; asked once per process (``refresh=True`` asks again)."""
    global _cached  # noqa: PLW0603 - a process-wide cache of a property of the running kernel
    with _lock:
        if _cached is None or refresh:
            _cached = _run_probe()
        return _cached

"""The traffic keys of one connection, as the kernel needs them, and their next generations. Sans I/O.

TLS 1.3 keeps a traffic *secret* per direction; each KeyUpdate replaces it with
``HKDF-Expand-Label(secret, "traffic upd", "", Hash.length)`` (RFC 8446 §7.2) and restarts that direction's
sequence number at 0. TLS 1.2 has fixed keys from the key block (RFC 5246 §6.3) and no rekey.
"""

from __future__ import annotations

from ..constants import TLSVersion
from ..errors import KernelTLSUnavailable
from ..kernel.uapi import CryptoInfo, Direction
from ..tls.keylog import ConnectionSecrets
from ..tls.keyschedule import TrafficKeys, crypto_info, key_block, next_traffic_secret, traffic_key_and_iv
from ..tls.suites import CipherSuite, suite_by_openssl_name
from .handshake import HandshakeResult

__all__ = ["ConnectionKeys"]


class ConnectionKeys:
    """Per-direction keys of one end of a connection. Its ``repr`` shows no secret."""

    def __init__(
        self,
        suite: CipherSuite,
        *,
        tx: TrafficKeys | bytes,
        rx: TrafficKeys | bytes,
    ) -> None:
        """``tx``/``rx`` are TLS 1.3 traffic secrets (``bytes``, which allows KeyUpdate) or fixed keys."""
        if suite.kernel_cipher is None:
            raise KernelTLSUnavailable(None, suite.unsupported_reason or f"no kernel cipher for {suite.openssl_name}")
        self.suite = suite
        self._secrets: dict[Direction, TrafficKeys | bytes] = {Direction.TX: tx, Direction.RX: rx}
        self._keys: dict[Direction, TrafficKeys] = {}  # derived from a secret: each generation's, once
        self.generation = {Direction.TX: 0, Direction.RX: 0}

    @property
    def version(self) -> TLSVersion:
        return self.suite.version

    @property
    def can_update(self) -> bool:
        """TLS 1.3 with traffic secrets (not bare keys): KeyUpdate can derive the next keys."""
        return self.version is TLSVersion.TLS1_3 and all(isinstance(s, bytes) for s in self._secrets.values())

    @classmethod
    def from_handshake(
        cls, result: HandshakeResult, secrets: ConnectionSecrets, *, server_side: bool
    ) -> ConnectionKeys:
        """The keys of a handshake whose key-log lines are ``secrets``."""
        suite = suite_by_openssl_name(result.openssl_cipher)
        if suite is None or suite.version is not result.version:
            raise KernelTLSUnavailable(None, f"{result.openssl_cipher} has no kernel cipher")
        if result.version is TLSVersion.TLS1_3:
            pair = secrets.traffic_secrets(server_side=server_side)
            if pair is None:
                raise KernelTLSUnavailable(None, "the key log has no application traffic secrets for this connection")
            tx, rx = (bytes(s) for s in pair)
            return cls(suite, tx=tx, rx=rx)
        master = secrets.master_secret
        if master is None:
            raise KernelTLSUnavailable(None, "the key log has no master secret for this connection")
        block = key_block(bytes(master), result.client_random, result.server_random, suite)
        tx_keys, rx_keys = block.tx_rx(server_side=server_side)
        return cls(suite, tx=tx_keys, rx=rx_keys)

    def traffic_keys(self, direction: Direction) -> TrafficKeys:
        """``direction``'s key and IV at the current generation."""
        keys = self._keys.get(direction)
        if keys is None:
            secret = self._secrets[direction]
            keys = self._keys[direction] = (
                traffic_key_and_iv(secret, self.suite) if isinstance(secret, bytes) else secret
            )
        return keys

    def crypto_info(self, direction: Direction, rec_seq: int, explicit_nonce: int | None = None) -> CryptoInfo:
        """The kernel's crypto info for ``direction`` at the current generation."""
        return crypto_info(self.suite, self.traffic_keys(direction), rec_seq, explicit_nonce=explicit_nonce)

    def next_key(self, direction: Direction) -> CryptoInfo:
        """Advance ``direction`` to its next traffic secret (KeyUpdate) and return its crypto info at seq 0."""
        secret = self._secrets[direction]
        if not isinstance(secret, bytes) or self.version is not TLSVersion.TLS1_3:
            raise ValueError("only TLS 1.3 traffic secrets can be updated")
        self._secrets[direction] = next_traffic_secret(secret, self.suite)
        self._keys.pop(direction, None)
        self.generation[direction] += 1
        return self.crypto_info(direction, 0)

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("ConnectionKeys cannot be pickled: they would carry the keys")

    def __repr__(self) -> str:
        generations = ", ".join(f"{d.name.lower()}={g}" for d, g in self.generation.items())
        return f"ConnectionKeys({self.suite.openssl_name}, generation: {generations})"

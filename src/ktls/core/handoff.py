"""Handing a finished ``ssl`` handshake to the kernel — shared by the blocking Stream and asyncio.

The steps, in order, and what each may conclude:

1. :func:`begin`: is kernel TLS possible at all (``probe``)? If so, capture the context's key log in memory.
   If not, the reason becomes the stream's ``fallback_reason``.
2. The caller drives :class:`~ktls.core.handshake.Handshake` with its own I/O, inside ``capture.handshake()``,
   whose :class:`~ktls.core.keylog_capture.SecretClaim` the handshake binds its client random to.
3. :func:`derive_keys`: whether this kernel takes the cipher for its TLS version; the connection's secrets
   from the key log, *proven* to be its own (:mod:`ktls.tls.proof`); its keys.
   :class:`~ktls.errors.KernelTLSUnavailable` means: stay in user space.
4. :func:`install`: attach the ULP, give the kernel the send key at the exact sequence number, then the
   receive key — except for a TLS 1.3 client, whose receive side waits for the first application record
   (:class:`DeferredReceive`) so the server's tickets reach OpenSSL and ``session`` stays resumable.

Nothing here reads or writes application data; the callers do, each with its own I/O model.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import socket
import ssl

from ..constants import ContentType, HandshakeType, TLSVersion
from ..errors import KernelTLSConfigError, KernelTLSUnavailable
from ..kernel import syscalls
from ..kernel.probe import KernelSupport, probe
from ..kernel.uapi import CipherType, CryptoInfo, Direction
from ..tls.aead import AuthenticationFailed
from ..tls.keylog import ConnectionSecrets
from ..tls.proof import OpenedRecord, SecretsNotProven, open_record, prove_secrets
from ..tls.records import HANDSHAKE_HEADER_SIZE
from ..tls.suites import suite_by_openssl_name
from .control import ControlRecords, Role
from .handshake import Handshake, HandshakeResult
from .keylog_capture import KeylogCapture, SecretClaim
from .keys import ConnectionKeys

__all__ = [
    "RECORD_LIMITS",
    "DeferredReceive",
    "DeferredRecord",
    "Installed",
    "begin",
    "derive_keys",
    "give_receive_key",
    "install",
    "install_rx",
    "proven_secrets",
]

#: RFC 8446 §5.5 key-usage limits in records, per kernel AEAD; on reaching them the send key is updated, or
#: where it cannot be, the write side is closed (with margin: AES-GCM's limit is 2^24.5 full-size records,
#: AES-CCM's 2^23.5 per RFC 9147 §4.5.3). The same AEAD bounds hold for TLS 1.2's GCM and CCM records.
#: ChaCha20-Poly1305's limit lies beyond any 64-bit sequence number in practice.
RECORD_LIMITS: dict[CipherType, int] = {
    CipherType.AES_GCM_128: 2**24,
    CipherType.AES_GCM_256: 2**24,
    CipherType.AES_CCM_128: 2**23,
    CipherType.SM4_GCM: 2**24,
    CipherType.SM4_CCM: 2**23,
}

_log = logging.getLogger("ktls")


def begin(context: ssl.SSLContext, *, require_kernel: bool) -> tuple[KeylogCapture | None, str | None]:
    """Before the handshake: the key-log capture, or ``None`` and why the kernel cannot take over."""
    support = probe()
    if not support.available:
        reason = support.ulp_error or "kernel TLS is not available"
        if require_kernel:
            raise KernelTLSUnavailable(None, reason)
        return None, reason
    return KeylogCapture.for_context(context), None


def derive_keys(
    handshake: Handshake, claim: SecretClaim, *, server_side: bool
) -> tuple[ConnectionKeys, HandshakeResult]:
    """After the handshake (inside ``capture.handshake()``, whose claim the handshake bound): the keys the
    kernel needs, or :class:`~ktls.errors.KernelTLSUnavailable` saying why it cannot have them."""
    result = handshake.result()
    suite = suite_by_openssl_name(result.openssl_cipher)
    cipher = suite.kernel_cipher if suite is not None and suite.version is result.version else None
    if cipher is None or not probe().supports(cipher.cipher_type, result.version):
        raise KernelTLSUnavailable(
            None, f"this kernel does not accept {result.openssl_cipher} ({result.version.label})"
        )
    secrets = proven_secrets(handshake, claim, server_side=server_side)
    try:
        return ConnectionKeys.from_handshake(result, secrets, server_side=server_side), result
    finally:
        secrets.wipe()


def proven_secrets(handshake: Handshake, claim: SecretClaim, *, server_side: bool) -> ConnectionSecrets:
    """This connection's secrets, beyond doubt — no kernel needed, so the host tests run it too.

    The claim refuses a client random that another handshake shares (:mod:`ktls.core.keylog_capture`), and
    :func:`~ktls.tls.proof.prove_secrets` opens the connection's own records with what was taken. Either
    refusal is logged at WARNING (someone may be racing client randoms) and raises
    :class:`~ktls.errors.KernelTLSUnavailable`: the connection stays in userspace TLS.
    """
    result = handshake.result()
    suite = suite_by_openssl_name(result.openssl_cipher)
    if suite is None or suite.version is not result.version:
        raise KernelTLSUnavailable(None, f"{result.openssl_cipher} has no kernel cipher")
    try:
        secrets = claim.take()
    except KernelTLSUnavailable as exc:
        if claim.refusal is not None:
            _log.warning("ktls: secrets not handed to the kernel: %s", exc)
        raise
    try:
        prove_secrets(
            suite,
            secrets,
            handshake.evidence(),
            client_random=result.client_random,
            server_random=result.server_random,
            server_side=server_side,
        )
    except SecretsNotProven as exc:
        secrets.wipe()
        _log.warning("ktls: secrets not handed to the kernel: %s", exc)
        raise KernelTLSUnavailable(None, f"the key log's secrets are not this connection's: {exc}") from None
    return secrets


@dataclasses.dataclass
class Installed:
    """What :func:`install` achieved."""

    control: ControlRecords
    kernel_tx: bool = False
    kernel_rx: bool = False
    #: TLS 1.3 client: receive stays with OpenSSL until the first application record (:class:`DeferredReceive`).
    rx_deferred: bool = False
    fallback_reason: str | None = None
    #: Records the send key may protect before a KeyUpdate (or, without rekey, before the write side closes);
    #: ``None``: no limit we must act on (ChaCha20-Poly1305).
    record_limit: int | None = None
    #: TLS 1.3: asked for ``TLS_RX_EXPECT_NO_PAD`` (see :func:`install_rx`).
    expect_no_pad: bool = False
    #: ... and the kernel receives that way.
    rx_expect_no_pad: bool = False


def install(
    sock: socket.socket,
    keys: ConnectionKeys,
    result: HandshakeResult,
    *,
    server_side: bool,
    expect_no_pad: bool = False,
    defer_client_rx: bool = True,
) -> Installed:
    """Attach the ULP and give the kernel the keys (module docstring, step 4). ``expect_no_pad``: see
    :func:`install_rx`. ``defer_client_rx`` false: a TLS 1.3 client's receive key goes to the kernel at once
    (keys from elsewhere: there is no OpenSSL to read tickets)."""
    support: KernelSupport = probe()
    role = Role.SERVER if server_side else Role.CLIENT
    rekey = support.rekey and keys.can_update
    installed = Installed(ControlRecords(result.version, role, keys.next_key if rekey else None))
    installed.expect_no_pad = expect_no_pad
    try:
        syscalls.setup_ulp(sock)
        tx = keys.crypto_info(Direction.TX, result.tx_seq, result.tx_explicit_nonce)
        syscalls.set_crypto_info(sock, Direction.TX, tx)
    except (KernelTLSUnavailable, KernelTLSConfigError) as exc:
        # Nothing was given to the kernel (a ULP without keys passes bytes through): userspace goes on.
        installed.control = ControlRecords(result.version, role, None)
        installed.fallback_reason = _refusal(exc)
        return installed
    installed.kernel_tx = True
    cipher = keys.suite.kernel_cipher
    if cipher is not None:
        # Counted whether or not the key can be replaced: where it cannot (TLS 1.2, Linux < 6.14), reaching
        # the limit closes the write side instead (ControlRecords.send_key_exhausted).
        installed.record_limit = RECORD_LIMITS.get(cipher.cipher_type)
    if result.version is TLSVersion.TLS1_3 and role is Role.CLIENT and defer_client_rx:
        installed.rx_deferred = True
        return installed
    install_rx(sock, keys, result.rx_seq, installed)
    return installed


def install_rx(
    sock: socket.socket, keys: ConnectionKeys, rx_seq: int, installed: Installed, *, unproven: str | None = None
) -> None:
    """Give the kernel the receive key at ``rx_seq``; if it refuses, or the key is ``unproven`` (the reason:
    :attr:`DeferredReceive.unproven`), receiving stays with OpenSSL.

    TLS 1.3 with ``installed.expect_no_pad``: ``TLS_RX_EXPECT_NO_PAD`` (Linux ≥ 6.0) lets the kernel decrypt
    straight into the reader's buffer, betting that the peer does not pad its records. A padded record (or a
    control record) still reads correctly — the kernel decrypts it a second time (``TlsDecryptRetry``) — so
    the option is only a matter of cost: a peer that pads every record makes each one cost two decryptions,
    which is why it is not the default. A kernel without it simply does not get it.
    """
    installed.rx_deferred = False
    if unproven is not None:
        installed.fallback_reason = f"receive stays in user space: {unproven}"
        return
    no_pad = installed.expect_no_pad and keys.suite.version is TLSVersion.TLS1_3
    refused, installed.rx_expect_no_pad = give_receive_key(sock, keys.crypto_info(Direction.RX, rx_seq), no_pad)
    if refused is not None:
        installed.fallback_reason = f"receive stays in user space: {refused}"
        return
    installed.kernel_rx = True


def give_receive_key(sock: socket.socket, info: CryptoInfo, expect_no_pad: bool) -> tuple[str | None, bool]:
    """``TLS_RX`` with ``info`` (then ``TLS_RX_EXPECT_NO_PAD`` if asked and the kernel has it). Returns why
    the kernel refused the key (``None``: it took it) and whether it receives without padding."""
    try:
        syscalls.set_crypto_info(sock, Direction.RX, info)
    except (KernelTLSUnavailable, KernelTLSConfigError) as exc:
        return _refusal(exc), False
    if not expect_no_pad:
        return None, False
    try:
        syscalls.set_rx_expect_no_pad(sock)
    except KernelTLSUnavailable:
        return None, False
    return None, True


def _refusal(exc: KernelTLSUnavailable | KernelTLSConfigError) -> str:
    """Why the kernel did not take a key. The kernel attaches TLS only to an ESTABLISHED connection: a peer
    that closed (or reset) right after the handshake leaves the socket in CLOSE_WAIT and the attempt fails
    with ``ENOTCONN`` — userspace TLS can still read what it sent. Any other configuration error is a bug."""
    if isinstance(exc, KernelTLSUnavailable):
        return str(exc)
    if exc.errno != errno.ENOTCONN:
        raise exc
    return f"the peer closed the connection before the hand-off to the kernel ({exc})"


class DeferredReceive:
    """A TLS 1.3 client between its handshake and the first application record.

    OpenSSL reads these records (one at a time: the I/O layer feeds ``Handshake.receive``) so that the
    server's NewSessionTickets reach it; this class counts them, so the kernel starts at the right sequence
    number, and follows a KeyUpdate in that window: OpenSSL moved to the next receive key, so we do too.

    Each record is also opened here with the receive key from the key log (:meth:`open`), which does two jobs:
    it proves that key is this connection's before the kernel gets it (:mod:`ktls.tls.proof`: a client's
    receive secret cannot be checked earlier), and it tells a KeyUpdate by what the record *says* — not by
    its size, which padding, a ticket in the same record, or an alert of the same length would fool.
    """

    def __init__(self, keys: ConnectionKeys) -> None:
        self._keys = keys
        #: Sequence number of the next record in the current receive generation.
        self.rx_seq = 0
        #: Why the receive key must not reach the kernel (it did not open a record OpenSSL accepted).
        self.unproven: str | None = None

    def open(self, record: bytes) -> DeferredRecord:
        """What ``record`` (the next one, header included) holds, opened with our receive key, and the
        sequence number advanced — past a KeyUpdate, to the next generation's first record."""
        seq = self.rx_seq
        self.rx_seq += 1
        if self.unproven is not None:
            return DeferredRecord(None)
        try:
            opened = open_record(self._keys.suite, self._keys.traffic_keys(Direction.RX), seq, record)
        except (AuthenticationFailed, ValueError) as exc:
            self.unproven = f"the key log's receive secret does not open the server's records ({exc})"
            _log.warning("ktls: receive key not handed to the kernel: %s", self.unproven)
            return DeferredRecord(None)
        if opened.content_type != ContentType.HANDSHAKE:
            return DeferredRecord(opened.content_type)
        request = _key_update_request(opened)
        if request is None or not self._keys.can_update:
            return DeferredRecord(opened.content_type)
        # RFC 8446 §7.2: from the next record on, the peer sends under its next traffic secret.
        self._keys.next_key(Direction.RX)
        self.rx_seq = 0
        return DeferredRecord(opened.content_type, key_update=True, update_requested=request == 1)


def _key_update_request(record: OpenedRecord) -> int | None:
    """The ``request_update`` of a KeyUpdate among the record's handshake messages, or ``None``. Only the
    message headers are decrypted (a ticket's body is not needed to step over it). A message cut by the
    record's end is no KeyUpdate here (OpenSSL judges the framing and fails the connection if it is wrong)."""
    offset = 0
    while offset + HANDSHAKE_HEADER_SIZE <= record.length:
        header = record.read(offset, offset + HANDSHAKE_HEADER_SIZE)
        length = int.from_bytes(header[1:4], "big")
        body_at = offset + HANDSHAKE_HEADER_SIZE
        if header[0] == HandshakeType.KEY_UPDATE and length == 1 and body_at + 1 <= record.length:
            return record.read(body_at, body_at + 1)[0]
        offset = body_at + length
    return None


@dataclasses.dataclass(frozen=True)
class DeferredRecord:
    """One record of the deferred window as :meth:`DeferredReceive.open` read it."""

    #: The inner content type; ``None`` when the record could not be opened (``DeferredReceive.unproven``).
    content_type: ContentType | int | None
    key_update: bool = False
    #: RFC 8446 §4.6.3 ``update_requested``: we must send a KeyUpdate of our own.
    update_requested: bool = False

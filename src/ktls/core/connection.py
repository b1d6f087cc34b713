"""One TLS connection after its handshake, sans I/O: the state both front ends drive.

The blocking :class:`~ktls.stream.Stream` and the asyncio :class:`~ktls.asyncio.KTLSTransport` move bytes;
every decision about them is made here, once. A :class:`Connection` knows nothing about sockets or event
loops. It is told what happened — application data arrived, a control record arrived (with its content
type), the kernel refused a record, the peer's TCP stream ended, a deferred record was read, bytes were sent,
the kernel counted its records, the application wants to close or rekey — and answers with *actions*
(:mod:`ktls.core.control`'s ``SendAlert``, ``SendHandshake``, ``InstallKey``, ``ReadClosed``, ``WriteClosed``,
``SessionTicket``, ``Fail``; and :class:`Deliver`, :class:`HandOffReceive` here) for the I/O layer to carry
out in order.

The state is explicit, one enum per direction (never inferred from several booleans):

* :class:`Receiving`: ``KERNEL`` (``recvmsg`` on the socket; the kernel decrypts), ``DEFERRED`` (a TLS 1.3
  client before the first application record: OpenSSL reads one record at a time so the server's tickets
  reach ``session``, :class:`~ktls.core.handoff.DeferredReceive`), ``USERSPACE`` (OpenSSL reads: fallback),
  ``CLOSED`` (close_notify, EOF or failure).
* :class:`Sending`: ``KERNEL``, ``USERSPACE`` (OpenSSL encrypts: fallback), ``CLOSED`` (close_notify sent,
  the key is spent, or the connection failed).

Whether the kernel holds each key (``kernel_tx``/``kernel_rx``) stays true after its direction closes: the
I/O layer still reads through the kernel to discard what arrives after the end.

Edge cases, each handled where named: the deferred window (:meth:`Connection.deferred_record`), the send
key's usage limit (:meth:`Connection.sent`, :meth:`Connection.kernel_record_count`), ragged EOF
(:meth:`Connection.end_of_stream`), flood bounds and every RFC rule on control records (:mod:`ktls.core.control`).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import ssl

from ..constants import MAX_PLAINTEXT, TLSVersion
from ..errors import KernelTLSUnavailable, RaggedEOF, RecordError
from ..kernel.uapi import CryptoInfo, Direction
from ..tls.suites import CipherSuite
from .control import Action as ControlAction
from .control import ControlRecords, Fail, InstallKey, ReadClosed, Role
from .handoff import DeferredReceive, Installed
from .handshake import Handshake
from .keys import ConnectionKeys
from .sendbudget import SendBudget

__all__ = ["Action", "Connection", "ConnectionState", "Deliver", "HandOffReceive", "Receiving", "Sending"]

log = logging.getLogger("ktls")


class Receiving(enum.Enum):
    """Who reads this connection's records now."""

    KERNEL = "kernel"
    DEFERRED = "deferred"
    USERSPACE = "userspace"
    CLOSED = "closed"


class Sending(enum.Enum):
    """Who encrypts this connection's records now."""

    KERNEL = "kernel"
    USERSPACE = "userspace"
    CLOSED = "closed"


@dataclasses.dataclass(frozen=True)
class Deliver:
    """Plaintext for the application (decrypted by OpenSSL in the deferred window): deliver it first."""

    plaintext: bytes


@dataclasses.dataclass(frozen=True)
class HandOffReceive:
    """The deferred window ends: give the kernel the receive key ``info`` (then tell
    :meth:`Connection.receive_handed_off` what the kernel said); ``info`` ``None``: the key is unproven and
    must not reach the kernel — OpenSSL keeps receiving."""

    info: CryptoInfo | None


#: Everything a connection may ask its I/O layer to do, in order.
Action = ControlAction | Deliver | HandOffReceive


class Connection:
    """The protocol state of one TLS connection after its handshake (module docstring)."""

    def __init__(
        self,
        version: TLSVersion,
        role: Role,
        *,
        keys: ConnectionKeys | None = None,
        installed: Installed | None = None,
        tx_seq: int = 0,
        fallback_reason: str | None = None,
        suppress_ragged_eofs: bool = True,
    ) -> None:
        self.control = installed.control if installed is not None else ControlRecords(version, role, None)
        self._keys = keys
        self._kernel_tx = bool(installed and installed.kernel_tx)
        self._kernel_rx = bool(installed and installed.kernel_rx)
        self._fallback_reason = installed.fallback_reason if installed is not None else fallback_reason
        self._rx_expect_no_pad = bool(installed and installed.rx_expect_no_pad)
        self._expect_no_pad = bool(installed and installed.expect_no_pad)
        self._budget = SendBudget(installed.record_limit if installed is not None else None, tx_seq)
        self._deferred = DeferredReceive(keys) if installed and installed.rx_deferred and keys else None
        self.suppress_ragged_eofs = suppress_ragged_eofs
        self._ragged_eof = False
        #: Application data was read from the kernel with ``recvmsg`` (:meth:`application_data`), not only
        #: spliced (:meth:`spliced_data`): before Linux 5.16 a splice after that may pass over the rest of a
        #: record ``recvmsg`` left decrypted in the kernel, so :mod:`ktls.splice` copies from then on.
        self.read_by_recvmsg = False
        self._receiving = (
            Receiving.DEFERRED
            if self._deferred is not None
            else Receiving.KERNEL
            if self._kernel_rx
            else Receiving.USERSPACE
        )

    # -- state, read-only ---------------------------------------------------------------------------------------

    @property
    def receiving(self) -> Receiving:
        return self._receiving

    @property
    def sending(self) -> Sending:
        if self.control.write_closed or self.control.error is not None:
            return Sending.CLOSED
        return Sending.KERNEL if self._kernel_tx else Sending.USERSPACE

    @property
    def version(self) -> ssl.TLSVersion:
        """The negotiated protocol version, by the stdlib's name (``ssl.TLSVersion.TLSv1_3``…)."""
        return ssl.TLSVersion(int(self.control.version))

    @property
    def role(self) -> Role:
        return self.control.role

    @property
    def kernel_tx(self) -> bool:
        """The kernel holds the send key (it encrypts, or encrypted until the write side closed)."""
        return self._kernel_tx

    @property
    def kernel_rx(self) -> bool:
        """The kernel holds the receive key."""
        return self._kernel_rx

    @property
    def fallback_reason(self) -> str | None:
        """Why a direction is in user space (``None`` when the kernel has both, or will at the first record)."""
        return self._fallback_reason

    @property
    def rx_expect_no_pad(self) -> bool:
        """The kernel receives with ``TLS_RX_EXPECT_NO_PAD`` (TLS 1.3; :func:`ktls.core.handoff.install_rx`)."""
        return self._rx_expect_no_pad

    @property
    def ragged_eof(self) -> bool:
        """The read side ended with a TCP EOF and no close_notify (possible truncation)."""
        return self._ragged_eof

    @property
    def error(self) -> Exception | None:
        """What ended the connection (a peer's fault or the kernel's refusal), once it failed."""
        return self.control.error

    @property
    def write_closed_reason(self) -> str | None:
        """Why the write side closed when it was not the application's doing (the send key is spent)."""
        return self.control.write_closed_reason

    @property
    def record_limit(self) -> int | None:
        """Records sent under one key before it is replaced (TLS 1.3 KeyUpdate, Linux ≥ 6.14) or, where it
        cannot be, before the write side closes with the reason (per cipher: ``handoff.RECORD_LIMITS``, RFC
        8446 §5.5); ``None`` when the AEAD has no limit to act on (ChaCha20-Poly1305) or userspace TLS sends.
        Settable (lower it to exercise the limit)."""
        return self._budget.limit

    @record_limit.setter
    def record_limit(self, limit: int | None) -> None:
        self._budget.limit = limit

    @property
    def suite(self) -> CipherSuite | None:
        """The cipher suite of the keys the kernel has (``None`` in user space)."""
        return self._keys.suite if self._keys is not None else None

    @property
    def key_updates_received(self) -> int:
        return self.control.key_updates_received

    # -- receiving -----------------------------------------------------------------------------------------------

    def application_data(self) -> list[Action]:
        """Application data arrived, read with ``recvmsg``: the KeyUpdates and warnings before it were not a
        flood; a handshake message it interrupts is fatal (the hot path: one store, one attribute test)."""
        self.read_by_recvmsg = True
        if self.control.control_since_data:
            return self._note(self.control.application_data_received())
        return []

    def spliced_data(self) -> list[Action]:
        """:meth:`application_data` for data the kernel spliced (:mod:`ktls.splice`)."""
        if self.control.control_since_data:
            return self._note(self.control.application_data_received())
        return []

    def control_record(self, content_type: int, payload: bytes) -> list[Action]:
        """A record of another type than application data arrived, decrypted (:mod:`ktls.core.control` decides)."""
        return self._note(self.control.receive_record(content_type, payload))

    def current_receive_key(self, rec_seq: int) -> CryptoInfo:
        """The receive key the kernel has, at ``rec_seq`` (for :class:`~ktls.core.control.ResumeReceive`)."""
        if self._keys is None:
            raise KernelTLSUnavailable(None, "no keys to resume receiving with")
        return self._keys.crypto_info(Direction.RX, rec_seq)

    def receive_failed(self, error: RecordError) -> list[Action]:
        """The kernel refused a received record: the alert it deserves, and the end."""
        return self._note(self.control.record_failed(error))

    def end_of_stream(self) -> bytes:
        """The peer's TCP stream ended. After its close_notify that is the clean end; without, a *ragged* EOF
        (possible truncation): ``b""`` when ``suppress_ragged_eofs`` (the ``ssl`` default), else
        :class:`~ktls.errors.RaggedEOF`."""
        self._receiving = Receiving.CLOSED
        if self.control.read_closed:
            return b""
        self.control.read_closed = True
        self._ragged_eof = True
        if self.suppress_ragged_eofs:
            return b""
        raise RaggedEOF()

    def closed_by_peer(self) -> None:
        """OpenSSL read the peer's close_notify (user space, or the deferred window)."""
        self.control.read_closed = True
        self._receiving = Receiving.CLOSED

    def deferred_record(self, handshake: Handshake, record: bytes) -> list[Action]:
        """A TLS 1.3 client in the deferred window read one whole ``record`` and gave it to OpenSSL
        (``handshake.receive``). What it meant:

        * a ticket: nothing (OpenSSL keeps it for ``session``); reading goes on;
        * a KeyUpdate: our receive generation advances with OpenSSL's (:meth:`DeferredReceive.open`), and if
          the peer asked, our own KeyUpdate goes out through the kernel — OpenSSL's answer is under a send key
          the kernel owns, so it is discarded;
        * close_notify: the read side ends (the receive key never reaches the kernel);
        * the first application data: :class:`Deliver` it, then :class:`HandOffReceive` at the next record;
        * a record the key log's receive key does not open: the key is *unproven* and stays out of the kernel.

        ``ssl.SSLError`` from OpenSSL (a fatal alert, a bad record) propagates.
        """
        deferred = self._deferred
        if deferred is None:
            raise RuntimeError("no deferred receive window")
        opened = deferred.open(record)
        sslobj = handshake.ssl_object
        try:
            plaintext = sslobj.read(MAX_PLAINTEXT)
        except ssl.SSLWantReadError:
            handshake.outgoing.read()  # OpenSSL's KeyUpdate answer, under a key it no longer owns
            if deferred.unproven is not None:
                return self._hand_off(b"", deferred)
            if opened.update_requested and self.sending is Sending.KERNEL:
                return self._note(self.control.key_update(request_peer_update=False))
            return []
        except ssl.SSLZeroReturnError:
            plaintext = b""
        if not plaintext:  # SSLObject.read returns b"" on a close_notify it has only received
            self._deferred = None
            self.closed_by_peer()
            return [ReadClosed()]
        parts = [plaintext]
        while pending := sslobj.pending():
            parts.append(sslobj.read(pending))
        return self._hand_off(b"".join(parts), deferred)

    def _hand_off(self, plaintext: bytes, deferred: DeferredReceive) -> list[Action]:
        self._deferred = None
        actions: list[Action] = [Deliver(plaintext)] if plaintext else []
        if deferred.unproven is not None or self._keys is None:
            self._fallback_reason = f"receive stays in user space: {deferred.unproven}"
            self._receiving = Receiving.USERSPACE
            return [*actions, HandOffReceive(None)]
        return [*actions, HandOffReceive(self._keys.crypto_info(Direction.RX, deferred.rx_seq))]

    @property
    def expect_no_pad(self) -> bool:
        """The application asked for ``TLS_RX_EXPECT_NO_PAD`` (the I/O layer sets it after a hand-off)."""
        return self._expect_no_pad and self.control.version is TLSVersion.TLS1_3

    def receive_handed_off(self, refused: str | None, *, no_pad: bool = False) -> None:
        """What the kernel said to :class:`HandOffReceive`: ``refused`` is why it did not take the key."""
        if refused is not None:
            self._fallback_reason = f"receive stays in user space: {refused}"
            self._receiving = Receiving.USERSPACE
            return
        self._kernel_rx = True
        self._rx_expect_no_pad = no_pad
        if self._receiving is Receiving.DEFERRED:
            self._receiving = Receiving.KERNEL

    # -- sending -------------------------------------------------------------------------------------------------

    def check_writable(self) -> None:
        """Raise :class:`~ktls.errors.StreamClosed` (with the reason) instead of letting a write through once
        the write side is closed — never a silent 0."""
        self.control.check_writable()

    def sent(self, nbytes: int) -> bool:
        """``nbytes`` went out through the kernel in one send; ``True`` when the I/O layer must ask the kernel
        for its exact record count (``getsockopt(TLS_TX)``) and call :meth:`kernel_record_count`."""
        return self._budget.sent(nbytes)

    def kernel_record_count(self, rec_seq: int | None) -> list[Action]:
        """The kernel's record count under the send key (``None``: it could not say). At the AEAD's limit
        (RFC 8446 §5.5): a KeyUpdate where the kernel can rekey, else close_notify and a closed write side
        whose later writes are refused with the reason."""
        if not self._budget.kernel_count(rec_seq) or self.sending is Sending.CLOSED:
            return []
        log.info("the send key reached its limit after %d records (RFC 8446 §5.5)", self._budget.bound)
        return self._note(self.control.send_key_exhausted(self._budget.bound))

    def key_update(self, request_peer_update: bool = False) -> list[Action]:
        """Our KeyUpdate (TLS 1.3, Linux ≥ 6.14): the message under the current key, then the next key."""
        if not self._kernel_tx:
            raise KernelTLSUnavailable(None, "key updates need the kernel to be sending")
        return self._note(self.control.key_update(request_peer_update))

    def close_write(self) -> list[Action]:
        """Our close_notify (RFC 8446 §6.1), once; nothing when the write side is closed or the connection
        failed. In user space the I/O layer has OpenSSL write it (``SSLObject.unwrap``)."""
        return self._note(self.control.close_write())

    # -- bookkeeping -------------------------------------------------------------------------------------------------

    def _note(self, actions: list[ControlAction]) -> list[Action]:
        """Follow the state the actions announce (the I/O layer carries them out)."""
        for action in actions:
            if isinstance(action, ReadClosed):
                self._receiving = Receiving.CLOSED
                self._deferred = None
            elif isinstance(action, InstallKey) and action.direction is Direction.TX:
                self._budget.rekeyed()  # nothing more is counted against the old key: the KeyUpdate goes first
            elif isinstance(action, Fail):
                self._receiving = Receiving.CLOSED
                self._deferred = None
        return list(actions)

    def describe(self) -> str:
        """For ``repr``: where each direction is, and why not the kernel (never a key)."""
        where = f"{self.control.version.label} rx={self._receiving.value} tx={self.sending.value}"
        if self._fallback_reason:
            where += f", fallback: {self._fallback_reason}"
        return where


class ConnectionState:
    """What both front ends tell about their connection, read-only from its :class:`Connection` (one
    definition for the blocking ``Stream`` and the asyncio transport)."""

    _connection: Connection

    @property
    def kernel_tx(self) -> bool:
        """The kernel holds the send key."""
        return self._connection.kernel_tx

    @property
    def kernel_rx(self) -> bool:
        """The kernel holds the receive key (a TLS 1.3 client: from the first application record on)."""
        return self._connection.kernel_rx

    @property
    def receiving(self) -> Receiving:
        """Who reads records now."""
        return self._connection.receiving

    @property
    def sending(self) -> Sending:
        """Who encrypts records now."""
        return self._connection.sending

    @property
    def fallback_reason(self) -> str | None:
        """Why a direction stays in user space; ``None`` when the kernel has both (or will, at a TLS 1.3
        client's first application record)."""
        return self._connection.fallback_reason

    @property
    def rx_expect_no_pad(self) -> bool:
        """TLS 1.3 receive with ``TLS_RX_EXPECT_NO_PAD`` (asked for with ``rx_expect_no_pad=True``)."""
        return self._connection.rx_expect_no_pad

    @property
    def ragged_eof(self) -> bool:
        """The read side ended with a TCP EOF and no close_notify (possible truncation, like ``SSLEOFError``)."""
        return self._connection.ragged_eof

    @property
    def key_updates_received(self) -> int:
        """The peer's TLS 1.3 KeyUpdates the kernel followed."""
        return self._connection.key_updates_received

    @property
    def record_limit(self) -> int | None:
        """Records sent under one key before it is replaced or the write side closes
        (:attr:`Connection.record_limit`); settable, to exercise the limit."""
        return self._connection.record_limit

    @record_limit.setter
    def record_limit(self, limit: int | None) -> None:
        self._connection.record_limit = limit

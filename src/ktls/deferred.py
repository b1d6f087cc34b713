"""One record of a TLS 1.3 client's deferred receive window, sans I/O — for every I/O layer.

A TLS 1.3 client keeps its receive side in OpenSSL until the first application record
(:class:`ktls.handoff.DeferredReceive`: the server's NewSessionTickets reach ``session``). The I/O layer reads
exactly one record (``Handshake.bytes_needed`` / ``Handshake.receive``) and hands it here; the answer says
what to do next. The blocking :class:`~ktls.stream.Stream` and the asyncio transport both call
:func:`deferred_record`.
"""

from __future__ import annotations

import dataclasses
import ssl

from .constants import MAX_PLAINTEXT
from .handoff import DeferredReceive
from .handshake import Handshake

__all__ = ["DeferredStep", "deferred_record"]


@dataclasses.dataclass(frozen=True)
class DeferredStep:
    """What one record of the deferred window meant."""

    #: The first application data (that record plus anything OpenSSL already decrypted): deliver it, then give
    #: the kernel the receive key at ``DeferredReceive.rx_seq`` (``handoff.install_rx``).
    plaintext: bytes = b""
    hand_off: bool = False
    #: The peer asked for our KeyUpdate: carry out ``ControlRecords.key_update(request_peer_update=False)``.
    send_key_update: bool = False
    #: The peer's close_notify: the read side is at its end (the receive key never reaches the kernel).
    closed: bool = False
    #: With ``hand_off``: the receive key did not open the server's records, so it must not reach the kernel
    #: (``handoff.install_rx(..., unproven=...)`` keeps receiving in user space and says why).
    unproven: str | None = None


def deferred_record(handshake: Handshake, deferred: DeferredReceive, record: bytes) -> DeferredStep:
    """``record`` is what ``handshake.receive`` just returned (a whole record, already given to OpenSSL).

    ``ssl.SSLError`` from OpenSSL (a fatal alert, a bad record) propagates.
    """
    opened = deferred.open(record)
    sslobj = handshake.ssl_object
    try:
        plaintext = sslobj.read(MAX_PLAINTEXT)
    except ssl.SSLWantReadError:
        # A ticket or a KeyUpdate. OpenSSL's answer to a KeyUpdate is under a send key the kernel owns now:
        # it is never sent (the kernel sends ours when asked).
        handshake.outgoing.read()
        if deferred.unproven is not None:
            # Stop deferring: OpenSSL keeps receiving, the unproven key never reaches the kernel.
            return DeferredStep(hand_off=True, unproven=deferred.unproven)
        return DeferredStep(send_key_update=opened.update_requested)
    except ssl.SSLZeroReturnError:
        return DeferredStep(closed=True)
    if not plaintext:  # SSLObject.read returns b"" on a close_notify it has only received
        return DeferredStep(closed=True)
    parts = [plaintext]
    while pending := sslobj.pending():
        parts.append(sslobj.read(pending))
    return DeferredStep(plaintext=b"".join(parts), hand_off=True, unproven=deferred.unproven)

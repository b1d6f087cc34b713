"""Bring-your-own-keys on the event loop (:func:`ktls.asyncio.connect_with_keys`), checked on the wire against
the independent record layer (``reference_tls``, the ``cryptography`` AEADs) of ``hostile_peer``: what
the transport sends decrypts there, what the peer seals arrives, the peer's KeyUpdate is followed, and a forged
record gets its ``bad_record_mac`` alert — the same behaviour as the blocking ``Stream.from_keys``."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

import ktls.asyncio
from hostile_peer import TIMEOUT, Hostile, tls13_protection
from ktls.constants import AlertDescription, AlertLevel, ContentType
from ktls.core.connection import Receiving, Sending
from ktls.core.keys import ConnectionKeys
from ktls.errors import RecordAuthenticationError
from ktls.kernel import KernelSupport
from ktls.tls.suites import suite_by_openssl_name

pytestmark = pytest.mark.kernel


class Collect(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.arrived = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.arrived.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


async def _exchange(forge: bool, rekey: bool) -> tuple[Hostile, Collect, ktls.asyncio.KTLSTransport]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        theirs = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        ours, _ = listener.accept()
    suite = suite_by_openssl_name("TLS_AES_128_GCM_SHA256")
    assert suite is not None
    ours_secret, theirs_secret = os.urandom(32), os.urandom(32)
    keys = ConnectionKeys(suite, tx=ours_secret, rx=theirs_secret)
    hostile = Hostile(theirs, tls13_protection(theirs_secret), tls13_protection(ours_secret), theirs_secret)
    transport, protocol = await ktls.asyncio.connect_with_keys(
        Collect, ours, keys, server_side=True, tx_seq=0, rx_seq=0, early_data=b"early "
    )
    assert isinstance(transport, ktls.asyncio.KTLSTransport)
    assert isinstance(protocol, Collect)
    assert (transport.receiving, transport.sending) == (Receiving.KERNEL, Sending.KERNEL)
    assert transport.get_extra_info("ssl_object") is None
    assert transport.get_extra_info("cipher")[0] == "TLS_AES_128_GCM_SHA256"
    # The peer's data, then (where the kernel can take a new receive key) its KeyUpdate and data under its
    # next key.
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, hostile.send, ContentType.APPLICATION_DATA, b"hello")
    expected = b"early hello"
    if rekey:
        records = hostile.key_update() + hostile.seal(ContentType.APPLICATION_DATA, b" after rekey")
        await loop.run_in_executor(None, hostile.sock.sendall, records)
        expected += b" after rekey"
    while bytes(protocol.data) != expected:
        protocol.arrived.clear()
        await asyncio.wait_for(protocol.arrived.wait(), TIMEOUT)
    assert transport.key_updates_received == int(rekey)
    transport.write(b"from the kernel")
    if forge:
        await loop.run_in_executor(None, hostile.sock.sendall, b"\x17\x03\x03\x00\x20" + bytes(32))
    else:
        # close() waits for the peer to end its side too (as asyncio's SSL transport does): it does, cleanly.
        transport.close()
        await loop.run_in_executor(None, hostile.send, ContentType.ALERT, b"\x01\x00")
        hostile.sock.shutdown(socket.SHUT_WR)
    await asyncio.wait_for(protocol.lost, TIMEOUT)
    return hostile, protocol, transport


def test_connect_with_keys_against_an_independent_record_layer(support: KernelSupport) -> None:
    hostile, protocol, _ = asyncio.run(_exchange(forge=False, rekey=support.rekey))
    try:
        records = hostile.read_records()
    finally:
        hostile.sock.close()
    assert records[0].content_type == ContentType.APPLICATION_DATA
    assert records[0].plaintext == b"from the kernel"
    assert (records[-1].content_type, records[-1].plaintext) == (ContentType.ALERT, b"\x01\x00")  # close_notify
    assert protocol.lost.result() is None


def test_connect_with_keys_answers_a_forged_record_with_bad_record_mac(support: KernelSupport) -> None:
    hostile, protocol, _ = asyncio.run(_exchange(forge=True, rekey=support.rekey))
    try:
        records = hostile.read_records()
    finally:
        hostile.sock.close()
    assert records[0].plaintext == b"from the kernel"
    alert = bytes((AlertLevel.FATAL, AlertDescription.bad_record_mac))
    assert (records[-1].content_type, records[-1].plaintext) == (ContentType.ALERT, alert)
    assert isinstance(protocol.lost.result(), RecordAuthenticationError)

"""The connection core: everything between Python's ``ssl`` and the kernel that is not a front end's I/O.

By file:

* :mod:`~ktls.core.handshake` — one TLS handshake over memory BIOs, read one record at a time;
* :mod:`~ktls.core.driver` — the handshake driver (a generator of Send/Peek/Receive steps) and the hand-off
  after it, with the blocking runner;
* :mod:`~ktls.core.keylog_capture` — the context's key log captured in memory, and each handshake's claim on
  its client random;
* :mod:`~ktls.core.keys` — a connection's traffic keys for the kernel, from its captured secrets;
* :mod:`~ktls.core.handoff` — giving the keys to the kernel (``TCP_ULP``, ``TLS_TX``, ``TLS_RX``) or saying
  why not;
* :mod:`~ktls.core.control` — the control-record state machine (alerts, KeyUpdate, tickets), RFC rule by rule;
* :mod:`~ktls.core.sendbudget` — the send key's record budget (RFC 8446 §5.5);
* :mod:`~ktls.core.connection` — :class:`~ktls.core.connection.Connection`, the state of one connection after
  its handshake, sans I/O;
* :mod:`~ktls.core.userspace` — OpenSSL's record layer where the kernel does not take over.

Imports run one way: the front ends (:mod:`ktls.stream`, :mod:`ktls.asyncio`, and the CLI on top) use the
core; the core uses :mod:`ktls.tls` (records, key schedule, AEADs) and :mod:`ktls.kernel` (the ABI, which
:mod:`ktls.tls` uses too: a suite names its kernel cipher); all of them use :mod:`ktls.constants` and
:mod:`ktls.errors` (``tests/test_layout.py`` checks it).
"""

"""Capture the traffic secrets of Python's ``ssl`` connections in memory, through the key log.

CPython offers no API for a connection's secrets; ``SSLContext.keylog_filename`` is the only door: OpenSSL
calls back with NSS key-log lines and CPython appends them to that file. We point it at an anonymous
in-memory file (``memfd_create``, opened through ``/proc/self/fd/N``), so secrets never touch a disk, read
what is appended, and hand each connection its own lines by client random (:class:`ktls.tls.keylog.KeylogParser`).

* **A connection only ever gets its own secrets.** The client random that names a connection's lines is
  chosen by the client and sent in clear, so two handshakes can share one. Each ktls handshake holds a
  :class:`SecretClaim` and binds its client random to it the moment the random is known, before OpenSSL can
  log a secret under it (:class:`ktls.core.handshake.Handshake`'s ``on_client_random``). A random bound by two
  claims in flight at once, or under which one label is logged with two values (the parser's ``ambiguous``),
  or a client that changes its random after a HelloRetryRequest: :meth:`SecretClaim.take` refuses, and the
  connection stays in userspace TLS — OpenSSL's own keys, always right. :mod:`ktls.tls.proof` then checks
  what was taken against the connection's own records (an independent guard).
* **One capture per context.** ``keylog_filename`` belongs to the whole context, which serves many
  connections and threads. Captures are kept in a ``WeakKeyDictionary`` keyed by the context itself, never
  by ``id(context)``: an id is reused once a context is freed.
* **A key log that forgets.** Every byte is released from the memory file as soon as it has been read
  (``fallocate(FALLOC_FL_PUNCH_HOLE)`` over the read range: the pages are freed, later ``O_APPEND`` writes
  still land at the end), so the file holds only lines not read yet — never past connections' secrets, even
  while a stalled handshake keeps the file from being truncated. A read made while no other claim is in flight
  truncates the file to zero instead (one syscall; no ktls connection's line can be lost, since every ktls
  handshake that could log one is in flight), and so does the end of the last claim in flight if lines were
  read meanwhile. Lines read but not taken are bounded by the parser; a claim that ends without taking its
  lines discards them; taken secrets are wiped once keys are derived.
* **fork.** A child process gets its own memory file for every capture (``os.register_at_fork``): the
  file descriptor is shared with the parent otherwise, and one side's reads, holes and truncation would
  take lines the other is waiting for.
* **The user's key log keeps working.** If the context already had a ``keylog_filename`` (for example from
  ``SSLKEYLOGFILE`` in ``ssl.create_default_context``), every line read is appended to that file too.
  The one line that can be lost is one written by a connection that ktls does not drive, in the instant
  between our last read and the truncation; ktls's own connections are claimed and never lose theirs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import ssl
import threading
import weakref
from collections.abc import Iterator
from typing import ClassVar

from ..errors import KernelTLSUnavailable
from ..tls.keylog import ConnectionSecrets, KeylogParser

__all__ = ["KeylogCapture", "SecretClaim"]

_READ_CHUNK = 65536

# include/uapi/linux/falloc.h
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def _load_fallocate() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """``int fallocate(int fd, int mode, off_t offset, off_t len)`` from the C library, if there is one."""
    try:
        function = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    function.restype = ctypes.c_int
    return function


_fallocate = _load_fallocate()


def _punch_hole(fd: int, length: int) -> bool:
    """Free the first ``length`` bytes of ``fd``'s pages (they read as zeros); whether the kernel did."""
    if _fallocate is None or length <= 0:
        return False
    return bool(_fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, 0, length) == 0)


class SecretClaim:
    """One ktls handshake's claim on the key-log lines of its client random (module docstring).

    :meth:`bind` each client random the handshake sees (``Handshake(on_client_random=claim.bind)``), then
    :meth:`take` once the handshake is complete. It ends with the ``with capture.handshake()`` block.
    """

    def __init__(self, capture: KeylogCapture) -> None:
        self._capture = capture
        #: Every client random the handshake announced (a second one is a refusal).
        self.randoms: list[bytes] = []
        #: Why the claim cannot be honoured (``None``: nothing against it so far).
        self.refusal: str | None = None
        #: The secrets were taken, proven unambiguous, by this claim.
        self.taken = False

    @property
    def client_random(self) -> bytes | None:
        return self.randoms[0] if self.randoms else None

    def bind(self, client_random: bytes) -> None:
        self._capture._bind(self, client_random)

    def take(self) -> ConnectionSecrets:
        """This connection's secrets, removed from the capture; :class:`~ktls.errors.KernelTLSUnavailable`
        with the reason when they cannot be told apart from another connection's or are missing."""
        return self._capture._take(self)

    def __repr__(self) -> str:
        random = self.client_random.hex()[:16] + "…" if self.client_random else None
        return f"<SecretClaim client_random={random} refusal={self.refusal!r}>"


class KeylogCapture:
    """The in-memory key log of one ``ssl.SSLContext``."""

    _captures: ClassVar[weakref.WeakKeyDictionary[ssl.SSLContext, KeylogCapture]] = weakref.WeakKeyDictionary()
    _captures_lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def for_context(cls, context: ssl.SSLContext) -> KeylogCapture:
        """The capture of ``context``, installed on first use."""
        with cls._captures_lock:
            capture = cls._captures.get(context)
            if capture is None:
                capture = cls(context)
                cls._captures[context] = capture
            return capture

    def __init__(self, context: ssl.SSLContext) -> None:
        self._forward_to: str | None = None
        previous = context.keylog_filename
        if previous and not str(previous).startswith("/proc/self/fd/"):
            self._forward_to = os.fspath(previous)
        self._open(context)

    def _open(self, context: ssl.SSLContext) -> None:
        """A fresh memory file for ``context``'s key log, and empty state around it."""
        try:
            self._fd = os.memfd_create("ktls-keylog", os.MFD_CLOEXEC)
        except (AttributeError, OSError) as exc:
            raise KernelTLSUnavailable(None, f"cannot create an in-memory key log: {exc}") from exc
        try:
            context.keylog_filename = f"/proc/self/fd/{self._fd}"
        except OSError as exc:
            os.close(self._fd)
            raise KernelTLSUnavailable(None, f"cannot open the in-memory key log through /proc: {exc}") from exc
        self._finalizer = weakref.finalize(self, os.close, self._fd)
        self._lock = threading.Lock()
        self._offset = 0
        self._parser = KeylogParser()
        self._live: set[SecretClaim] = set()  # claims whose handshake is in flight
        self._bound: dict[bytes, set[SecretClaim]] = {}  # client random → live claims bound to it

    # -- claims ---------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def handshake(self) -> Iterator[SecretClaim]:
        """Bracket one ktls handshake with its :class:`SecretClaim`; while any is in flight, the memory file
        is never truncated (holes are still punched: nothing read stays in memory)."""
        claim = SecretClaim(self)
        with self._lock:
            self._live.add(claim)
        try:
            yield claim
        finally:
            with self._lock:
                self._end(claim)
                self._maybe_truncate()

    def _bind(self, claim: SecretClaim, client_random: bytes) -> None:
        with self._lock:
            if client_random in claim.randoms:
                return
            if claim.randoms:
                # RFC 8446 §4.1.2: the ClientHello after a HelloRetryRequest repeats the random.
                claim.refusal = "the client changed its random after a HelloRetryRequest (RFC 8446 §4.1.2)"
            claim.randoms.append(client_random)
            claimants = self._bound.setdefault(client_random, set())
            claimants.add(claim)
            if len(claimants) > 1:
                for each in claimants:
                    each.refusal = "another handshake in flight on this context uses the same client random"

    def _take(self, claim: SecretClaim) -> ConnectionSecrets:
        with self._lock:
            if claim.client_random is None:
                raise KernelTLSUnavailable(None, "the handshake's client random was never seen")
            self._read_new(alone=self._live <= {claim})
            if claim.refusal is not None:
                self._forget(claim)
                raise KernelTLSUnavailable(None, claim.refusal)
            secrets = self._parser.take(claim.client_random)
            if secrets is None:
                raise KernelTLSUnavailable(None, "the key log has no secrets for this connection")
            if secrets.ambiguous:
                secrets.wipe()
                raise KernelTLSUnavailable(None, "two handshakes logged different secrets under this client random")
            claim.taken = True
            return secrets

    def _end(self, claim: SecretClaim) -> None:
        self._live.discard(claim)
        for random in claim.randoms:
            claimants = self._bound.get(random)
            if claimants is not None:
                claimants.discard(claim)
                if not claimants:
                    del self._bound[random]
        if not claim.taken and claim.randoms:
            # A handshake that failed, was refused, or never got as far as taking: its lines are nobody's.
            self._read_new(alone=not self._live)
            self._forget(claim)

    def _forget(self, claim: SecretClaim) -> None:
        """Drop (and wipe) whatever was logged under the claim's randoms."""
        for random in claim.randoms:
            self._parser.discard(random)

    # -- the memory file ------------------------------------------------------------------------------------------

    def _read_new(self, *, alone: bool) -> None:
        """Read what was appended, and release it from the memory file at once: by truncating the file when
        no other claim is in flight (``alone``: no ktls handshake can be about to log a line it waits for),
        else by punching a hole over it."""
        read_any = False
        while chunk := os.pread(self._fd, _READ_CHUNK, self._offset):
            self._offset += len(chunk)
            self._parser.feed(chunk)
            if self._forward_to is not None:
                self._forward(chunk)
            read_any = True
            if len(chunk) < _READ_CHUNK:
                break  # the end of the file as it is now: asking again would only read nothing
        if not read_any:
            return
        if alone:
            os.ftruncate(self._fd, 0)  # one syscall where a hole and the truncation at the claim's end were three
            self._offset = 0
        else:
            _punch_hole(self._fd, self._offset)

    def _forward(self, chunk: bytes) -> None:
        try:
            with open(self._forward_to or "", "ab") as user_log:
                user_log.write(chunk)
        except OSError:
            self._forward_to = None  # the user's log went away; never fail a connection for it

    def _maybe_truncate(self) -> None:
        """At the end of a claim: with none left in flight, truncate the file (nothing in it is waiting). A read
        made alone has truncated already (``_offset`` 0): then there is nothing to do."""
        if self._live or not self._offset:
            return
        if os.fstat(self._fd).st_size != self._offset:
            self._read_new(alone=True)  # lines no claim waits for (another stack's connection): read, truncate
            return
        os.ftruncate(self._fd, 0)
        self._offset = 0

    @classmethod
    def _after_fork_in_child(cls) -> None:
        """A forked child: every capture gets its own memory file (module docstring, "fork")."""
        cls._captures_lock = threading.Lock()
        for context, capture in list(cls._captures.items()):
            old_fd = capture._fd
            capture._finalizer.detach()
            try:
                capture._open(context)
            except KernelTLSUnavailable:
                del cls._captures[context]  # the next handshake tries again, or falls back with the reason
                context.keylog_filename = None  # type: ignore[assignment]
            os.close(old_fd)

    # -- inspection -----------------------------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """ktls handshakes of this context in flight now (live claims)."""
        return len(self._live)

    def __len__(self) -> int:
        """Connections whose secrets are held (taken ones are gone)."""
        return len(self._parser)

    @property
    def size(self) -> int:
        """The memory file's length now (holes included)."""
        return os.fstat(self._fd).st_size

    @property
    def resident(self) -> int:
        """Bytes of the memory file backed by memory now (``st_blocks``): what punched holes give back."""
        return os.fstat(self._fd).st_blocks * 512

    def contents(self) -> bytes:
        """The memory file's bytes now, holes read as zeros (for tests: no line read may still be there)."""
        with self._lock:
            return os.pread(self._fd, self.size, 0)

    def __repr__(self) -> str:
        return f"<KeylogCapture: {len(self._live)} handshakes in flight, {len(self)} connections held>"


os.register_at_fork(after_in_child=KeylogCapture._after_fork_in_child)

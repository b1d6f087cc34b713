"""Capture the traffic secrets of Python's ``ssl`` connections in memory, through the key log.

CPython offers no API for a connection's secrets; ``SSLContext.keylog_filename`` is the only door: OpenSSL
calls back with NSS key-log lines and CPython appends them to that file. We point it at an anonymous
in-memory file (``memfd_create``, opened through ``/proc/self/fd/N``), so secrets never touch a disk, read
what is appended, and hand each connection its own lines by client random (:class:`ktls.tls.keylog.KeylogParser`).

* **One capture per context.** ``keylog_filename`` belongs to the whole context, which serves many
  connections and threads. Captures are kept in a ``WeakKeyDictionary`` keyed by the context itself, never
  by ``id(context)``: an id is reused once a context is freed.
* **Bounded memory.** Lines are dropped once taken; when no ktls handshake of this context is in flight and
  everything written has been read, the memory file is truncated back to zero (writes are ``O_APPEND``, so
  the next line lands at offset 0).
* **The user's key log keeps working.** If the context already had a ``keylog_filename`` (for example from
  ``SSLKEYLOGFILE`` in ``ssl.create_default_context``), every line read is appended to that file too.
  The one line that can be lost is one written by a connection that ktls does not drive, in the instant
  between our last read and the truncation; ktls's own connections are counted and never lose theirs.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import threading
import weakref
from collections.abc import Iterator
from typing import ClassVar

from .errors import KernelTLSUnavailable
from .tls.keylog import ConnectionSecrets, KeylogParser

__all__ = ["KeylogCapture"]

_READ_CHUNK = 65536


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
        try:
            self._fd = os.memfd_create("ktls-keylog", os.MFD_CLOEXEC)
        except (AttributeError, OSError) as exc:
            raise KernelTLSUnavailable(None, f"cannot create an in-memory key log: {exc}") from exc
        self._forward_to: str | None = None
        previous = context.keylog_filename
        if previous and not str(previous).startswith("/proc/self/fd/"):
            self._forward_to = os.fspath(previous)
        try:
            context.keylog_filename = f"/proc/self/fd/{self._fd}"
        except OSError as exc:
            os.close(self._fd)
            raise KernelTLSUnavailable(None, f"cannot open the in-memory key log through /proc: {exc}") from exc
        self._finalizer = weakref.finalize(self, os.close, self._fd)
        self._lock = threading.Lock()
        self._offset = 0
        self._in_flight = 0
        self._parser = KeylogParser()

    @contextlib.contextmanager
    def handshake(self) -> Iterator[None]:
        """Bracket one ktls handshake: while any is in flight, the memory file is never truncated."""
        with self._lock:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
                self._maybe_truncate()

    def take(self, client_random: bytes) -> ConnectionSecrets | None:
        """The secrets logged for the connection with ``client_random``, removed from the capture."""
        with self._lock:
            self._read_new()
            return self._parser.take(client_random)

    def _read_new(self) -> None:
        while chunk := os.pread(self._fd, _READ_CHUNK, self._offset):
            self._offset += len(chunk)
            self._parser.feed(chunk)
            if self._forward_to is not None:
                self._forward(chunk)

    def _forward(self, chunk: bytes) -> None:
        try:
            with open(self._forward_to or "", "ab") as user_log:
                user_log.write(chunk)
        except OSError:
            self._forward_to = None  # the user's log went away; never fail a connection for it

    def _maybe_truncate(self) -> None:
        if self._in_flight:
            return
        self._read_new()
        if os.fstat(self._fd).st_size == self._offset and self._offset:
            os.ftruncate(self._fd, 0)
            self._offset = 0

    def __len__(self) -> int:
        """Connections whose secrets are held (taken ones are gone)."""
        return len(self._parser)

    @property
    def size(self) -> int:
        """Bytes in the memory file now."""
        return os.fstat(self._fd).st_size

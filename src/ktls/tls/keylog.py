"""Reading the NSS key log that ``SSLContext.keylog_filename`` writes: the only door to the secrets.

Theory of operation
-------------------
CPython exposes no TLS secrets, but OpenSSL hands each secret to a key log callback the moment it is
derived, and :mod:`ssl` appends it to ``keylog_filename`` as one line (NSS Key Log Format, the same as
``SSLKEYLOGFILE``; draft-ietf-tls-keylogfile)::

    # comment lines start with '#'
    <LABEL> <client_random: 64 hex digits> <secret: hex>

For TLS 1.2 the line is ``CLIENT_RANDOM <client random> <48-byte master secret>``; for TLS 1.3 there is one
line per secret (``CLIENT_HANDSHAKE_TRAFFIC_SECRET``, ``SERVER_TRAFFIC_SECRET_0``, ``EXPORTER_SECRET``, …),
as long as the suite's hash (32 or 48 bytes). The client random is the ClientHello's ``random``: it is in
clear on the wire, so both ends know it, and it is the key that ties a line to one connection.

The file belongs to the *context*, and one context serves many connections, often in many threads, so
lines of different connections interleave, and a reader may catch a line half written. Hence
:class:`KeylogParser`: fed whatever bytes were read (lines may be cut anywhere), it keeps the secrets by
client random until the handshake driver of that connection :meth:`~KeylogParser.take`\\ s them, which
also forgets them, so memory stays bounded; connections whose secrets are never taken are evicted oldest
first past ``max_connections``.

The file may also hold anything else (a shared ``SSLKEYLOGFILE``, other programs' labels such as ``RSA``
or ``ECH_SECRET``, a torn last line): every line that is not exactly a known label, a 32-byte client random
and a secret of a size that label can have is skipped. Parsing never raises on the file's content.

Secrets are wrapped in :class:`Secret`, whose ``repr``/``str`` show only the length, so a log line or a
traceback printing an entry never leaks a key.
"""

from __future__ import annotations

import binascii
import collections
import dataclasses
import enum
import hmac
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, final

from ..constants import TLSVersion

__all__ = [
    "ConnectionSecrets",
    "KeylogEntry",
    "KeylogLabel",
    "KeylogParser",
    "Secret",
    "iter_keylog",
    "parse_keylog_line",
]

CLIENT_RANDOM_SIZE = 32  # RFC 5246 §7.4.1.2, RFC 8446 §4.1.2

#: Longest line kept. The longest valid one is 31 (label) + 1 + 64 + 1 + 96 (a SHA-384 secret) + "\r" = 194
#: bytes; anything much longer is not a key log line, and bounding it bounds the memory a torn or hostile
#: file can make us hold.
MAX_LINE = 512


@final
class Secret:
    """Key material. ``bytes(secret)`` gives the value; ``repr``/``str`` give only its length.

    Equality is constant-time (:func:`hmac.compare_digest`). It cannot be pickled (a pickle would carry the
    key to wherever pickles go: caches, queues, files). :meth:`wipe` overwrites the value in place once it
    has been used — Python cannot promise no other copy exists (``bytes(secret)`` makes one), but the one
    this object holds does not outlive its use.
    """

    __slots__ = ("_value",)

    def __init__(self, value: bytes | bytearray | memoryview) -> None:
        self._value = bytearray(value)

    def __bytes__(self) -> bytes:
        return bytes(self._value)

    def wipe(self) -> None:
        """Overwrite the value with zeros (it reads as zeros from now on)."""
        self._value[:] = bytes(len(self._value))

    def __reduce__(self) -> Any:
        raise TypeError("a Secret cannot be pickled: it would carry the key")

    def __len__(self) -> int:
        return len(self._value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(bytes(self._value))

    def __repr__(self) -> str:
        return f"<Secret: {len(self._value)} bytes>"


class KeylogLabel(str, enum.Enum):
    """The labels :mod:`ssl` (OpenSSL) writes that are keyed by client random; each value is its name."""

    @staticmethod
    def _generate_next_value_(name: str, start: int, count: int, last_values: list[Any]) -> str:
        return name  # the label as written in the file

    #: TLS 1.2: the 48-byte master secret.
    CLIENT_RANDOM = enum.auto()
    CLIENT_EARLY_TRAFFIC_SECRET = enum.auto()
    CLIENT_HANDSHAKE_TRAFFIC_SECRET = enum.auto()
    SERVER_HANDSHAKE_TRAFFIC_SECRET = enum.auto()
    #: TLS 1.3: the first application traffic secrets, what the kernel's TX and RX keys come from.
    CLIENT_TRAFFIC_SECRET_0 = enum.auto()
    SERVER_TRAFFIC_SECRET_0 = enum.auto()
    EARLY_EXPORTER_SECRET = enum.auto()
    EXPORTER_SECRET = enum.auto()


_MASTER_SECRET_SIZES = frozenset({48})  # RFC 5246 §8.1
_TLS13_SECRET_SIZES = frozenset({32, 48})  # Hash.length: SHA-256 / SM3, SHA-384 (RFC 8446 §7.1)

# Label, client random, secret: hex only, an even number of digits, separated by blanks. A strict match
# (not str.split + bytes.fromhex, which accepts spaces inside the hex) is what makes junk skippable.
_LABELS = {label.value.encode("ascii"): label for label in KeylogLabel}
_LINE = re.compile(rb"[ \t]*([A-Z][A-Z0-9_]*)[ \t]+([0-9A-Fa-f]{64})[ \t]+((?:[0-9A-Fa-f]{2})+)[ \t]*\r?")


@dataclasses.dataclass(frozen=True)
class KeylogEntry:
    """One secret of one connection, from one key log line."""

    label: KeylogLabel
    client_random: bytes
    secret: Secret

    def __repr__(self) -> str:
        return f"KeylogEntry({self.label.value}, client_random={self.client_random.hex()}, secret={self.secret!r})"


def parse_keylog_line(line: bytes | str) -> KeylogEntry | None:
    """The entry on one key log line (with or without its line ending), or ``None`` if the line is a
    comment, blank, an unknown label, or anything else that is not a well-formed entry."""
    if isinstance(line, str):
        try:
            line = line.encode("ascii")
        except UnicodeEncodeError:
            return None
    parsed = _parse_line(line.rstrip(b"\n"))
    return None if parsed is None else KeylogEntry(*parsed)


def _parse_line(line: bytes) -> tuple[KeylogLabel, bytes, Secret] | None:
    """:func:`parse_keylog_line` of a line without its ``\\n``, as (label, client random, secret)."""
    if len(line) > MAX_LINE:
        return None
    match = _LINE.fullmatch(line)
    if match is None:
        return None
    label = _LABELS.get(match[1])
    if label is None:
        return None  # a label we do not use (RSA, ECH_SECRET, …)
    secret = binascii.unhexlify(match[3])
    if len(secret) not in (_MASTER_SECRET_SIZES if label is KeylogLabel.CLIENT_RANDOM else _TLS13_SECRET_SIZES):
        return None
    return label, binascii.unhexlify(match[2]), Secret(secret)


def iter_keylog(data: bytes | str) -> Iterator[KeylogEntry]:
    """Every well-formed entry in a whole key log, in file order; everything else is skipped."""
    for line in data.splitlines():
        entry = parse_keylog_line(line)
        if entry is not None:
            yield entry


@dataclasses.dataclass(frozen=True)
class ConnectionSecrets:
    """The secrets of one connection (one client random), by label. Its ``repr`` shows only the labels."""

    client_random: bytes
    secrets: Mapping[KeylogLabel, Secret]
    #: A label was logged twice under this random with different values: two handshakes shared the random,
    #: and which line is whose cannot be told. Such secrets must never reach the kernel.
    ambiguous: bool = False

    def wipe(self) -> None:
        """:meth:`Secret.wipe` every secret (after the keys were derived from them)."""
        for secret in self.secrets.values():
            secret.wipe()

    def __reduce__(self) -> Any:
        raise TypeError("ConnectionSecrets cannot be pickled: they would carry the keys")

    def get(self, label: KeylogLabel) -> Secret | None:
        return self.secrets.get(label)

    def __contains__(self, label: object) -> bool:
        return label in self.secrets

    @property
    def version(self) -> TLSVersion | None:
        """The TLS version these secrets are for: a master secret is TLS 1.2, traffic secrets TLS 1.3."""
        if KeylogLabel.CLIENT_RANDOM in self.secrets:
            return TLSVersion.TLS1_2
        return TLSVersion.TLS1_3 if self.secrets else None

    @property
    def master_secret(self) -> Secret | None:
        """TLS 1.2: the master secret (``CLIENT_RANDOM`` line)."""
        return self.secrets.get(KeylogLabel.CLIENT_RANDOM)

    def traffic_secrets(self, *, server_side: bool) -> tuple[Secret, Secret] | None:
        """TLS 1.3: ``(tx, rx)`` application traffic secrets of one end, or ``None`` if either is missing."""
        client = self.secrets.get(KeylogLabel.CLIENT_TRAFFIC_SECRET_0)
        server = self.secrets.get(KeylogLabel.SERVER_TRAFFIC_SECRET_0)
        if client is None or server is None:
            return None
        return (server, client) if server_side else (client, server)

    def __repr__(self) -> str:
        labels = ", ".join(label.value for label in self.secrets)
        ambiguous = ", ambiguous" if self.ambiguous else ""
        return f"ConnectionSecrets(client_random={self.client_random.hex()}, labels=[{labels}]{ambiguous})"


class KeylogParser:
    """An incremental, thread-safe key log reader that keeps secrets until their connection takes them.

    :meth:`feed` it every chunk read from the key log file, in order; :meth:`take` a connection's secrets
    by its client random. Lines cut across chunks are joined; lines longer than :data:`MAX_LINE` are
    dropped whole.

    **No "latest wins".** A label logged a second time under one client random with a *different* value
    means two handshakes shared the random (a client that always sends the same one, or someone copying a
    victim's ClientHello): the first value is kept, and the entry is marked ``ambiguous`` for whoever takes
    it. The same value logged again (one line read twice) changes nothing.

    **Bounded.** At most ``max_connections`` client randoms are kept: past that, the one least recently
    logged is forgotten (counted in :attr:`evicted`). Connections whose secrets nobody takes (lines of a
    connection ktls does not drive, on a context it shares) would otherwise accumulate; 4096 is far above
    the handshakes one context has in flight at once (each ktls handshake takes or discards its own
    entry when it ends), and at ~0.5 KiB an entry bounds the parser near 2 MiB.
    """

    def __init__(self, *, max_connections: int = 4096) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be ≥ 1, got {max_connections}")
        self._max_connections = max_connections
        self._lock = threading.Lock()
        self._partial = bytearray()  # start of a line whose end has not been fed yet
        self._discarding = False  # inside a line already longer than MAX_LINE: drop up to its newline
        self._index: collections.OrderedDict[bytes, dict[KeylogLabel, Secret]] = collections.OrderedDict()
        self._ambiguous: set[bytes] = set()  # randoms under which a label was logged with two values
        #: Connections forgotten because ``max_connections`` were already kept.
        self.evicted = 0

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Parse the next bytes of the file; returns how many entries they completed and indexed."""
        lines = bytes(data).split(b"\n")
        tail = lines.pop()  # after the last newline: the start of a line still being written
        indexed = 0
        with self._lock:
            for piece in lines:
                if self._discarding:  # this piece ends an overlong line
                    self._discarding = False
                    continue
                line = piece
                if self._partial:
                    line = bytes(self._partial) + piece
                    self._partial.clear()
                parsed = _parse_line(line)
                if parsed is not None:
                    self._add(*parsed)
                    indexed += 1
            if not self._discarding:
                self._partial += tail
                if len(self._partial) > MAX_LINE:
                    self._partial.clear()
                    self._discarding = True
        return indexed

    def _add(self, label: KeylogLabel, client_random: bytes, secret: Secret) -> None:
        secrets = self._index.get(client_random)
        if secrets is None:
            if len(self._index) >= self._max_connections:
                evicted, _ = self._index.popitem(last=False)
                self._ambiguous.discard(evicted)
                self.evicted += 1
            secrets = self._index[client_random] = {}
        else:
            self._index.move_to_end(client_random)
        known = secrets.get(label)
        if known is None:
            secrets[label] = secret
        elif known != secret:
            self._ambiguous.add(client_random)  # class docstring: no "latest wins"

    def take(self, client_random: bytes, *, require: Iterable[KeylogLabel] = ()) -> ConnectionSecrets | None:
        """Remove and return the secrets logged for ``client_random``.

        Returns ``None`` (and removes nothing) if none are known, or if any label in ``require`` is missing
        yet: a TLS 1.3 connection's lines are written at different moments of its handshake, so the caller
        says which it needs (e.g. both application traffic secrets) and tries again after reading more.
        """
        with self._lock:
            secrets = self._index.get(client_random)
            if secrets is None or any(label not in secrets for label in require):
                return None
            del self._index[client_random]
            ambiguous = client_random in self._ambiguous
            self._ambiguous.discard(client_random)
        return ConnectionSecrets(client_random, MappingProxyType(secrets), ambiguous)

    def discard(self, client_random: bytes) -> None:
        """Forget what was logged under ``client_random`` (a handshake that ended without taking it)."""
        with self._lock:
            secrets = self._index.pop(client_random, None)
            self._ambiguous.discard(client_random)
        for secret in (secrets or {}).values():
            secret.wipe()

    def __contains__(self, client_random: object) -> bool:
        with self._lock:
            return client_random in self._index

    def __len__(self) -> int:
        """How many connections' secrets are kept."""
        with self._lock:
            return len(self._index)

    def __repr__(self) -> str:
        return f"<KeylogParser: {len(self)} connections, {self.evicted} evicted>"

"""``/proc/net/tls_stat``: the kernel's kTLS counters for this network namespace (Linux ≥ 5.5).

Each line is ``Name<whitespace>value``. ``TlsCurrTxSw``/``TlsCurrRxSw`` count sockets with software kTLS
now; ``TlsTxSw``/``TlsRxSw`` count every socket that ever had it; ``TlsDecryptError`` counts records that
failed authentication; the ``Rekey`` counters (Linux ≥ 6.14) count TLS 1.3 key updates.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["TLS_STAT_PATH", "parse_tls_stat", "read_tls_stat"]

TLS_STAT_PATH = Path("/proc/net/tls_stat")


def parse_tls_stat(text: str) -> dict[str, int]:
    """Parse the text of ``/proc/net/tls_stat`` into ``{counter: value}``, in the kernel's order."""
    counters: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 2:
            continue
        name, value = fields
        try:
            counters[name] = int(value)
        except ValueError:
            continue
    return counters


def read_tls_stat(path: Path = TLS_STAT_PATH) -> dict[str, int] | None:
    """The current counters, or ``None`` when the file does not exist (no kTLS, or the ``tls`` module not
    loaded yet)."""
    try:
        return parse_tls_stat(path.read_text())
    except FileNotFoundError:
        return None

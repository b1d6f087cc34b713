"""The kernel-TLS sockets of this network namespace, as ``ss`` (iproute2, sock_diag) reports them.

``ss --tcp --info`` prints, for each TCP socket with the TLS ULP, a ``tcp-ulp-tls`` entry with the TLS
version, cipher and whether each direction is done in software or by a device (``INET_DIAG_ULP_INFO``).
Parsing ``ss`` keeps ktls free of a netlink implementation; without ``ss`` the list is simply unavailable.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess

__all__ = ["KernelTLSSocket", "list_ktls_sockets", "parse_ss"]

_ULP = re.compile(r"tcp-ulp-tls\s+(?P<info>.*)$")


@dataclasses.dataclass(frozen=True)
class KernelTLSSocket:
    local: str
    peer: str
    #: e.g. ``version: 1.3 cipher: aes-gcm-128 rxconf: sw txconf: sw``
    tls: str


def parse_ss(text: str) -> list[KernelTLSSocket]:
    """Sockets with a ``tcp-ulp-tls`` entry in ``ss -tinH`` output (a socket line, then its info line)."""
    sockets: list[KernelTLSSocket] = []
    local = peer = ""
    for line in text.splitlines():
        if line and not line[0].isspace():
            fields = line.split()
            local, peer = (fields[3], fields[4]) if len(fields) >= 5 else ("", "")
            continue
        match = _ULP.search(line)
        if match:  # ss prints the ULP entry last on the info line
            sockets.append(KernelTLSSocket(local, peer, " ".join(match.group("info").split())))
    return sockets


def list_ktls_sockets() -> list[KernelTLSSocket] | None:
    """The kTLS sockets now, or ``None`` when ``ss`` is not installed or fails."""
    ss = shutil.which("ss")
    if ss is None:
        return None
    try:
        done = subprocess.run([ss, "-tinH"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_ss(done.stdout) if done.returncode == 0 else None

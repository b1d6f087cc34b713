"""What ``ktls serve`` is told: the directory, the address, and every bound with its reason.

Kept apart from the server so that the command line can show the defaults without importing asyncio.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

__all__ = ["ServeConfig"]


@dataclasses.dataclass
class ServeConfig:
    root: Path
    bind: str = "127.0.0.1"
    port: int = 8443
    cert: Path | None = None
    key: Path | None = None
    workers: int = 1
    #: Connections per worker, handshakes included (nginx's worker_connections default is 512; each of ours
    #: costs one descriptor and ~20 KiB).
    max_connections: int = 1024
    #: Seconds for a whole TLS handshake (asyncio's default is 60; a browser finishes in well under one).
    handshake_timeout: float = 10.0
    #: Seconds for a whole request head once it has started (nginx: client_header_timeout 60 s).
    head_timeout: float = 10.0
    #: Seconds a kept-alive connection may wait for its next request (nginx: keepalive_timeout 75 s).
    idle_timeout: float = 15.0
    #: Seconds each step of a response (its head, or a 1 MiB chunk of a file) may take (nginx: send_timeout 60 s).
    send_timeout: float = 30.0
    #: Serve and list names starting with a dot (``.git``, ``.env``): off by default.
    show_hidden: bool = False

"""ktls: Linux kernel TLS offload for Python's ``ssl`` module.

The handshake runs in user space with the stock ``ssl`` module; the traffic keys and record sequence numbers
are handed to the kernel, which then encrypts and decrypts every record of a plain socket.

The public surface is stdlib-shaped: :func:`wrap_socket` and :class:`Stream` (like ``ssl.SSLSocket``),
:mod:`ktls.asyncio` (like asyncio's SSL transports), :mod:`ktls.errors`. The layers, each in its file:
:mod:`ktls.kernel` (the kernel ABI: ``uapi``, ``syscalls``, ``probe``), :mod:`ktls.tls` (records, key schedule,
key log, AEADs, proofs), :mod:`ktls.core.keylog_capture` (secret capture), :mod:`ktls.core.handshake` and
:mod:`ktls.core.driver` (the handshake and its driver), :mod:`ktls.core.handoff` (keys to the kernel),
:mod:`ktls.core.connection` with :mod:`ktls.core.control` (the connection core), :mod:`ktls.stream` (blocking),
:mod:`ktls.asyncio` (event loop), :mod:`ktls.cli` and :mod:`ktls.serve` (the command line).
"""

from . import errors, kernel
from .errors import KernelTLSFailure, KernelTLSUnavailable, KTLSError
from .stream import Stream, wrap_socket

__version__ = "0.1.0"

__all__ = [
    "KTLSError",
    "KernelTLSFailure",
    "KernelTLSUnavailable",
    "Stream",
    "__version__",
    "errors",
    "kernel",
    "wrap_socket",
]

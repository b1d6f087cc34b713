"""ktls: Linux kernel TLS offload for Python's ``ssl`` module.

The handshake runs in user space with the stock ``ssl`` module; the traffic keys and record sequence numbers
are handed to the kernel, which then encrypts and decrypts every record of a plain socket.
"""

from . import errors, kernel
from .constants import AlertDescription, AlertLevel, ContentType, TLSVersion
from .errors import KernelTLSFailure, KernelTLSUnavailable, KTLSError
from .stream import Stream, wrap_socket

__version__ = "0.1.0"

__all__ = [
    "AlertDescription",
    "AlertLevel",
    "ContentType",
    "KTLSError",
    "KernelTLSFailure",
    "KernelTLSUnavailable",
    "Stream",
    "TLSVersion",
    "__version__",
    "errors",
    "kernel",
    "wrap_socket",
]

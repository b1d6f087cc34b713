"""``ktls serve``: ``python -m http.server``, over HTTPS, with the kernel encrypting and sendfile moving bytes."""

from .config import ServeConfig
from .server import serve

__all__ = ["ServeConfig", "serve"]

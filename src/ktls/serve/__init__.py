"""``ktls serve``: ``python -m http.server``, over HTTPS, with the kernel encrypting and sendfile moving bytes."""

from .server import ServeConfig, serve

__all__ = ["ServeConfig", "serve"]

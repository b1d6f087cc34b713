"""HTTP/1.1 for a static file server, sans I/O: parse a request head, decide the response.

The server (:mod:`ktls.serve.server`) reads a request head, asks :func:`respond` what to answer, writes the
head, and sends the body — a file region with ``sendfile`` (the kernel encrypts it straight from the page
cache) or a small generated page. Only ``GET`` and ``HEAD`` exist here (RFC 9110 §9.3.1-2); conditional
requests (``If-None-Match``, ``If-Modified-Since``, RFC 9110 §13) and single byte ranges (``Range``,
``If-Range``, RFC 9110 §14) are honoured; a request for several ranges gets the whole file, which RFC 9110
§14.2 allows.

Path traversal: the request path is percent-decoded, joined to the root and resolved (symlinks too); the
result must stay inside the root, or the answer is 404 — the same answer as for a missing file, so nothing
about the rest of the file system leaks.
"""

from __future__ import annotations

import dataclasses
import email.utils
import html
import mimetypes
import os
import stat
import urllib.parse
from pathlib import Path
from typing import ClassVar

__all__ = ["MAX_HEAD", "BadRequest", "Request", "Response", "error_response", "parse_request", "respond"]

#: Largest request head accepted (request line + headers); nginx's default large_client_header_buffers is
#: 4 × 8 KiB, Apache's LimitRequestFieldSize 8 KiB per line.
MAX_HEAD = 32 * 1024
SERVER = "ktls-serve"


class BadRequest(ValueError):
    """The request head is malformed; answered with ``status`` and the connection closed."""

    REASONS: ClassVar[dict[int, str]] = {
        400: "Bad Request",
        431: "Request Header Fields Too Large",
        505: "HTTP Version Not Supported",
    }

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status

    def response(self) -> Response:
        return error_response(self.status, self.REASONS.get(self.status, "Bad Request"), str(self))


@dataclasses.dataclass(frozen=True)
class Request:
    method: str
    target: str
    version: str
    headers: dict[str, str]

    @property
    def keep_alive(self) -> bool:
        """HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 closes unless told to keep it."""
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.1":
            return "close" not in connection
        return "keep-alive" in connection


@dataclasses.dataclass
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    #: A small generated body (listings, errors) …
    body: bytes = b""
    #: … or a region of a file, sent with sendfile.
    path: Path | None = None
    offset: int = 0
    length: int = 0
    #: HEAD: headers only.
    send_body: bool = True

    def head(self, keep_alive: bool) -> bytes:
        lines = [f"HTTP/1.1 {self.status} {self.reason}"]
        lines += [f"{name}: {value}" for name, value in self.headers]
        lines.append(f"Connection: {'keep-alive' if keep_alive else 'close'}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def parse_request(head: bytes) -> Request:
    """Parse ``request-line CRLF *(field CRLF) CRLF`` (RFC 9112 §3, §5)."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes everything
        raise BadRequest("undecodable request head") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(f"malformed request line {lines[0][:100]!r}")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise BadRequest(f"unsupported version {version!r}", 505)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest(f"malformed header line {line[:100]!r}")  # RFC 9112 §5.1: no space before ':'
        headers[name.lower()] = value.strip()
    if version == "HTTP/1.1" and "host" not in headers:
        raise BadRequest("HTTP/1.1 request without Host")  # RFC 9112 §3.2
    return Request(method, target, version, headers)


def error_response(status: int, reason: str, detail: str = "") -> Response:
    """A small HTML error page."""
    body = f"<!doctype html><title>{status} {reason}</title><h1>{status} {reason}</h1><p>{html.escape(detail)}</p>\n"
    data = body.encode()
    return Response(
        status,
        reason,
        [("Server", SERVER), ("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(data)))],
        data,
    )


def _resolve(root: Path, target: str) -> Path | None:
    """The file ``target`` names under ``root``, or ``None`` when it would leave the root."""
    path = urllib.parse.unquote(urllib.parse.urlsplit(target).path, errors="strict")
    if "\0" in path or not path.startswith("/"):
        return None
    candidate = (root / path.lstrip("/")).resolve()
    if candidate != root and root not in candidate.parents:
        return None
    return candidate


def _etag(info: os.stat_result) -> str:
    return f'"{info.st_mtime_ns:x}-{info.st_size:x}"'


def _not_modified(request: Request, etag: str, mtime: float) -> bool:
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None:  # RFC 9110 §13.1.2: weak comparison; takes precedence over the date
        tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
        return "*" in tags or etag in tags
    since = request.headers.get("if-modified-since")
    if since is not None:
        try:
            parsed = email.utils.parsedate_to_datetime(since)
        except (TypeError, ValueError):
            return False
        return int(mtime) <= parsed.timestamp()
    return False


def _byte_range(request: Request, size: int, etag: str, last_modified: str) -> tuple[int, int] | str | None:
    """``(start, length)`` for one satisfiable range; ``None`` for the whole file; ``"unsatisfiable"``."""
    header = request.headers.get("range")
    if header is None or not header.startswith("bytes="):
        return None
    if_range = request.headers.get("if-range")
    if if_range is not None and if_range not in (etag, last_modified):
        return None  # RFC 9110 §13.1.5: the representation changed; send it whole
    spec = header[len("bytes=") :].strip()
    if "," in spec:
        return None  # several ranges: answering with the whole file is allowed (RFC 9110 §14.2)
    first, sep, last = spec.partition("-")
    if not sep:
        return None
    try:
        if first == "":
            suffix = int(last)
            if suffix <= 0:
                return "unsatisfiable"
            start = max(0, size - suffix)
            end = size - 1
        else:
            start = int(first)
            end = int(last) if last else size - 1
    except ValueError:
        return None
    if start < 0 or start >= size or end < start:
        return "unsatisfiable"
    end = min(end, size - 1)
    return start, end - start + 1


def _listing(directory: Path, target_path: str) -> bytes:
    entries = []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        name = entry.name + ("/" if entry.is_dir() else "")
        entries.append(f'<li><a href="{urllib.parse.quote(name)}">{html.escape(name)}</a></li>')
    title = html.escape(urllib.parse.unquote(target_path))
    page = f"<!doctype html><meta charset=utf-8><title>Index of {title}</title><h1>Index of {title}</h1>"
    return (page + "<ul>" + "".join(entries) + "</ul>\n").encode()


def respond(request: Request, root: Path) -> Response:
    """Decide the answer to ``request`` for the files under ``root`` (an absolute, resolved path)."""
    if request.method not in ("GET", "HEAD"):
        response = error_response(405, "Method Not Allowed", f"{request.method} is not supported here")
        response.headers.append(("Allow", "GET, HEAD"))
        return response
    head_only = request.method == "HEAD"
    try:
        path = _resolve(root, request.target)
    except UnicodeDecodeError:
        path = None
    if path is None:
        return error_response(404, "Not Found")
    try:
        info = path.stat()
    except OSError:
        return error_response(404, "Not Found")
    target_path = urllib.parse.urlsplit(request.target).path
    if stat.S_ISDIR(info.st_mode):
        if not target_path.endswith("/"):
            response = error_response(301, "Moved Permanently")
            response.headers.append(("Location", target_path + "/"))
            return response
        index = path / "index.html"
        if index.is_file():
            path, info = index, index.stat()
        else:
            body = _listing(path, target_path)
            headers = [("Server", SERVER), ("Content-Type", "text/html; charset=utf-8")]
            headers.append(("Content-Length", str(len(body))))
            return Response(200, "OK", headers, body, send_body=not head_only)
    if not stat.S_ISREG(info.st_mode):
        return error_response(404, "Not Found")
    etag = _etag(info)
    last_modified = email.utils.formatdate(info.st_mtime, usegmt=True)
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    headers = [
        ("Server", SERVER),
        ("Content-Type", content_type),
        ("Last-Modified", last_modified),
        ("ETag", etag),
        ("Accept-Ranges", "bytes"),
    ]
    if _not_modified(request, etag, info.st_mtime):
        return Response(304, "Not Modified", headers, send_body=False)
    size = info.st_size
    chosen = _byte_range(request, size, etag, last_modified)
    if chosen == "unsatisfiable":
        response = error_response(416, "Range Not Satisfiable")
        response.headers.append(("Content-Range", f"bytes */{size}"))
        return response
    if isinstance(chosen, tuple):
        start, length = chosen
        headers += [("Content-Range", f"bytes {start}-{start + length - 1}/{size}"), ("Content-Length", str(length))]
        return Response(
            206, "Partial Content", headers, path=path, offset=start, length=length, send_body=not head_only
        )
    headers.append(("Content-Length", str(size)))
    return Response(200, "OK", headers, path=path, offset=0, length=size, send_body=not head_only)

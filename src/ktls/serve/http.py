"""HTTP/1.1 for a static file server, sans I/O: parse a request head, decide the response.

The server (:mod:`ktls.serve.server`) reads a request head, asks :func:`parse_request` and :func:`respond`
what to answer, writes the head, and sends the body — a region of an already open file with ``sendfile``
(the kernel encrypts it straight from the page cache) or a small generated page. Only ``GET`` and ``HEAD``
exist here (RFC 9110 §9.3.1-2); conditional requests (``If-None-Match``, ``If-Modified-Since``, RFC 9110
§13) and single byte ranges (``Range``, ``If-Range``, RFC 9110 §14) are honoured; a request for several
ranges gets the whole file, which RFC 9110 §14.2 allows.

Strictness, because a static server may sit behind a proxy whose idea of where a request ends must match
ours (request smuggling), and because it faces whatever the internet sends:

* The head is ``request-line CRLF *(field-line CRLF)`` (RFC 9112 §2.1); a bare CR or LF, obsolete line
  folding, control characters, a space before a field's colon, or a target that is not origin-form is
  ``400``. Exactly one ``Host`` for HTTP/1.1 (RFC 9112 §3.2).
* A request body is never parsed as the next request: ``Transfer-Encoding`` is ``501`` (RFC 9112 §6.1: we
  implement none), with ``Content-Length`` too ``400`` (§6.3); a ``Content-Length`` body up to
  :data:`MAX_DISCARDED_BODY` is read and dropped by the server, a larger one is ``413`` and the connection
  closes. Several ``Content-Length`` values must agree (§6.3).
* No body where HTTP has none: answers to ``HEAD`` (every status), ``304`` and ``204`` carry headers only
  (RFC 9110 §6.4.1, §15.4.5); ``Content-Length`` still says what a ``GET`` would have got.

Paths: the target's path is percent-decoded to *bytes* (file names need not be UTF-8), resolved once with
every symlink followed (``os.path.realpath``), and must stay inside the root — the directory index too —
or the answer is ``404``, the same as for a missing file, so nothing about the rest of the file system
leaks. Components starting with a dot (``.git``, ``.env``) are hidden — not listed, ``404`` — unless
``show_hidden``. The file is then opened once (``O_NOFOLLOW``) and everything said about it comes from that
open descriptor (``fstat``), which the server sends from.
"""

from __future__ import annotations

import dataclasses
import email.utils
import functools
import html
import mimetypes
import os
import re
import stat
import time
import urllib.parse
from typing import ClassVar

__all__ = [
    "MAX_DISCARDED_BODY",
    "MAX_HEAD",
    "BadRequest",
    "FileRegion",
    "Request",
    "Response",
    "error_response",
    "parse_request",
    "printable",
    "respond",
]

#: Largest request head accepted (request line + fields); nginx's default large_client_header_buffers is
#: 4 × 8 KiB, Apache's LimitRequestFieldSize 8 KiB per line.
MAX_HEAD = 32 * 1024
#: Largest request body read and dropped to keep the connection (a GET rarely has one; some clients send an
#: empty or tiny one); anything larger is refused with 413 and the connection closed, so a client cannot
#: make us read without bound.
MAX_DISCARDED_BODY = 64 * 1024
SERVER = "ktls-serve"

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 §5.6.2
_FIELD_VALUE_FORBIDDEN = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # CTLs but HTAB (RFC 9110 §5.5)
_ORIGIN_FORM = re.compile(rb"/[\x21-\x7e]*")  # RFC 9112 §3.2.1, printable ASCII only (RFC 3986)
_DIGITS = re.compile(rb"[0-9]{1,18}")
_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
_RANGE_BOUND = re.compile(r"[0-9]{0,18}")
_NO_BODY_STATUSES = frozenset({204, 304})  # and 1xx, which we never send
_PRINTABLE = re.compile(rb"[\x20\x21\x23-\x7e]*")  # what printable() leaves as it is


class BadRequest(ValueError):
    """The request cannot be served as sent; answered with ``status`` and the connection closed."""

    REASONS: ClassVar[dict[int, str]] = {
        400: "Bad Request",
        413: "Content Too Large",
        431: "Request Header Fields Too Large",
        501: "Not Implemented",
        505: "HTTP Version Not Supported",
    }

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status

    def response(self, *, head_only: bool = False) -> Response:
        return error_response(self.status, self.REASONS.get(self.status, "Bad Request"), str(self), head_only=head_only)


@dataclasses.dataclass(frozen=True)
class Request:
    method: str
    target: str
    version: str
    #: Field names lower-cased; repeated fields joined with ", " (RFC 9110 §5.3).
    headers: dict[str, str]
    #: Bytes of body that follow the head (the server reads and drops them).
    content_length: int = 0

    @property
    def keep_alive(self) -> bool:
        """HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 closes unless told to keep it."""
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.1":
            return "close" not in connection
        return "keep-alive" in connection

    @property
    def request_line(self) -> str:
        return f"{self.method} {self.target} {self.version}"


@dataclasses.dataclass
class FileRegion:
    """A region of a file opened for this response; the server sends it and then :meth:`close`\\ s it."""

    fd: int
    offset: int
    length: int
    #: The resolved path (bytes), for tests and logs.
    path: bytes

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclasses.dataclass
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    #: A small generated body (listings, errors) …
    body: bytes = b""
    #: … or a region of an open file, sent with sendfile.
    file: FileRegion | None = None
    #: HEAD: headers only (``Content-Length`` still that of the GET).
    head_only: bool = False

    @property
    def has_body(self) -> bool:
        """Whether bytes follow the head (RFC 9110 §6.4.1: never for HEAD, 204 or 304)."""
        return not self.head_only and self.status not in _NO_BODY_STATUSES and self.status >= 200

    @property
    def body_length(self) -> int:
        if not self.has_body:
            return 0
        return self.file.length if self.file is not None else len(self.body)

    def head(self, keep_alive: bool) -> bytes:
        lines = [f"HTTP/1.1 {self.status} {self.reason}"]
        lines += [f"{name}: {value}" for name, value in self.headers]
        lines.append(f"Connection: {'keep-alive' if keep_alive else 'close'}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def close(self) -> None:
        """Release the file, if any (always, whether or not it was sent)."""
        if self.file is not None:
            self.file.close()


def parse_request(head: bytes) -> Request:
    """Parse ``request-line CRLF *(field-line CRLF)`` (the head without its final empty line; RFC 9112 §2-5).

    Raises :class:`BadRequest` — and only that — for anything else, whatever the bytes.
    """
    if len(head) > MAX_HEAD:
        raise BadRequest("request head too large", 431)
    lines = head.split(b"\r\n")
    if len(lines) > 1 and not lines[-1]:
        lines.pop()  # the head given with its last line's CRLF
    unframed = head.replace(b"\r\n", b"")  # what is left of CR and LF once every line's CRLF is gone
    if b"\r" in unframed or b"\n" in unframed:
        raise BadRequest("a bare CR or LF in the request head")  # RFC 9112 §2.2: lines end with CRLF here
    method, target, version = _request_line(lines[0])
    headers, hosts, lengths = _fields(lines[1:])
    if hosts > 1:
        raise BadRequest("more than one Host field")  # RFC 9112 §3.2
    if version == "HTTP/1.1" and not hosts:
        raise BadRequest("HTTP/1.1 request without Host")  # RFC 9112 §3.2
    content_length = _content_length(lengths, "transfer-encoding" in headers)
    return Request(method, target, version, headers, content_length)


def _request_line(line: bytes) -> tuple[str, str, str]:
    """``method SP request-target SP HTTP-version`` (RFC 9112 §3), origin-form targets only (§3.2.1)."""
    parts = line.split(b" ")
    if len(parts) != 3:
        raise BadRequest(f"malformed request line {printable(line[:100])!r}")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise BadRequest(f"malformed method {printable(method[:40])!r}")
    if not _VERSION.fullmatch(version):
        raise BadRequest(f"malformed version {printable(version[:20])!r}")
    if version not in (b"HTTP/1.0", b"HTTP/1.1"):
        raise BadRequest(f"unsupported version {version.decode('ascii')}", 505)
    if not _ORIGIN_FORM.fullmatch(target):
        raise BadRequest(f"request target is not origin-form: {printable(target[:100])!r}")
    return method.decode("ascii"), target.decode("ascii"), version.decode("ascii")


def _fields(lines: list[bytes]) -> tuple[dict[str, str], int, set[bytes]]:
    """The field lines (RFC 9112 §5): (fields by lower-cased name, how many Host fields, Content-Length values)."""
    headers: dict[str, str] = {}
    hosts = 0
    lengths: set[bytes] = set()
    for line in lines:
        if not line:
            raise BadRequest("an empty line inside the request head")
        if line[:1] in (b" ", b"\t"):
            raise BadRequest("obsolete line folding")  # RFC 9112 §5.2: a server rejects it
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            raise BadRequest(f"malformed field line {printable(line[:100])!r}")  # §5.1: no space before ':'
        value = value.strip(b" \t")
        if _FIELD_VALUE_FORBIDDEN.search(value):
            raise BadRequest(f"a control character in the {printable(name)} field")
        key = name.decode("ascii").lower()
        text = value.decode("latin-1")
        hosts += key == "host"
        if key == "content-length":
            lengths.update(v.strip(b" \t") for v in value.split(b","))
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers, hosts, lengths


def _content_length(values: set[bytes], transfer_encoding: bool) -> int:
    """The body's length (RFC 9112 §6.3), or :class:`BadRequest` when it cannot be known or is too large."""
    if transfer_encoding:
        if values:
            raise BadRequest("both Transfer-Encoding and Content-Length")  # §6.3 rule 3: smuggling
        raise BadRequest("request bodies with Transfer-Encoding are not supported", 501)  # §6.1
    if not values:
        return 0
    if len(values) > 1 or not all(_DIGITS.fullmatch(v) for v in values):
        raise BadRequest("invalid Content-Length")  # §6.3 rule 5
    length = int(next(iter(values)))
    if length > MAX_DISCARDED_BODY:
        raise BadRequest(f"a request body of {length} bytes (this server reads none over {MAX_DISCARDED_BODY})", 413)
    return length


def printable(data: bytes | str) -> str:
    """Text safe for a log line or a message: control characters, double quotes and bytes outside printable
    ASCII become escapes (``\\x1b``), so a request cannot forge log lines, fields or terminal codes. Applying
    it twice changes nothing more."""
    raw = data.encode("latin-1", "replace") if isinstance(data, str) else data
    if _PRINTABLE.fullmatch(raw):
        return raw.decode("ascii")  # nothing to escape (a request line, nearly always)
    return "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x22 else f"\\x{b:02x}" for b in raw)


def error_response(status: int, reason: str, detail: str = "", *, head_only: bool = False) -> Response:
    """A small HTML error page (headers only for HEAD)."""
    body = f"<!doctype html><title>{status} {reason}</title><h1>{status} {reason}</h1><p>{html.escape(detail)}</p>\n"
    data = body.encode()
    headers = [("Server", SERVER), ("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(data)))]
    return Response(status, reason, headers, data, head_only=head_only)


def _inside(root: bytes, path: bytes) -> bool:
    return path == root or path.startswith(root.rstrip(b"/") + b"/")


def _hidden(root: bytes, path: bytes) -> bool:
    relative = path[len(root.rstrip(b"/")) :]
    return any(part.startswith(b".") for part in relative.split(b"/") if part)


def _resolve(root: bytes, components: list[bytes], show_hidden: bool) -> bytes | None:
    """The real path under ``root`` that ``components`` name (symlinks followed), or ``None`` when it would
    leave the root or is hidden."""
    found = _resolve_with_status(root, components, show_hidden)
    return found[0] if found is not None else None


def _resolve_with_status(
    root: bytes, components: list[bytes], show_hidden: bool
) -> tuple[bytes, os.stat_result | None] | None:
    """:func:`_resolve`, and the path's status when it was read on the way (``None``: stat it).

    ``root`` is already real (:func:`_real_root`), so only the components below it are looked at, one
    ``lstat`` each; at the first symlink (or anything unusual) the whole path goes through
    ``os.path.realpath`` as before. A component that does not exist ends the walk: ``realpath`` would name
    a path that does not exist either, and both answer 404."""
    path, info = root, None
    base = root.rstrip(b"/")  # the path so far, without a trailing slash ("" for the root "/")
    for component in components:
        if component == b".":
            continue
        base = path = base + b"/" + component  # os.path.join's result: no component holds a slash
        try:
            info = os.lstat(path)
        except OSError:
            return None
        if stat.S_ISLNK(info.st_mode):
            candidate = os.path.realpath(os.path.join(root, *components))
            if not _inside(root, candidate) or (not show_hidden and _hidden(root, candidate)):
                return None
            return candidate, None
    if not show_hidden and _hidden(root, path):
        return None
    return path, info


@functools.lru_cache(maxsize=16)
def _real_root(root: bytes) -> bytes:
    """The served directory with every symlink resolved, once per root (the server fixes its root at start)."""
    return os.path.realpath(root)


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
    if not sep or not _RANGE_BOUND.fullmatch(first) or not _RANGE_BOUND.fullmatch(last):
        return None  # str.isdigit() would take "²": only ASCII digits are a byte position (RFC 9110 §14.1.1)
    if first == "":
        if last == "" or int(last) <= 0:
            return "unsatisfiable"
        start, end = max(0, size - int(last)), size - 1
    else:
        start = int(first)
        end = int(last) if last else size - 1
    if start >= size or end < start:
        return "unsatisfiable"
    return start, min(end, size - 1) - start + 1


def _listing(directory: bytes, target_path: str, show_hidden: bool) -> bytes:
    """An index page. Names are bytes: any name is listed — its link percent-encodes the raw bytes, its text
    shows what is not UTF-8 as escapes."""
    entries = []
    with os.scandir(directory) as scan:
        for entry in sorted(scan, key=lambda e: e.name):
            name = entry.name
            if name.startswith(b".") and not show_hidden:
                continue
            suffix = b"/" if entry.is_dir() else b""
            text = html.escape((name + suffix).decode("utf-8", "backslashreplace"))
            entries.append(f'<li><a href="{urllib.parse.quote(name + suffix)}">{text}</a></li>')
    title = html.escape(urllib.parse.unquote(target_path, errors="backslashreplace"))
    page = f"<!doctype html><meta charset=utf-8><title>Index of {title}</title><h1>Index of {title}</h1>"
    return (page + "<ul>" + "".join(entries) + "</ul>\n").encode()


def _open_regular(path: bytes) -> tuple[int, os.stat_result] | None:
    """``path`` opened for reading (not following a symlink put there since it was resolved) and its status;
    ``None`` unless it is a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        return None
    return fd, info


def respond(request: Request, root: bytes | os.PathLike[str] | str, *, show_hidden: bool = False) -> Response:
    """Decide the answer to ``request`` for the files under ``root`` (made absolute and resolved here).

    A response with a ``file`` holds an open descriptor: the caller sends it and calls ``close()``.
    """
    head_only = request.method == "HEAD"
    if request.method not in ("GET", "HEAD"):
        response = error_response(405, "Method Not Allowed", f"{request.method} is not supported here")
        response.headers.append(("Allow", "GET, HEAD"))
        return response
    root_path = _real_root(os.fsencode(root))
    target_path = urllib.parse.urlsplit(request.target).path
    raw_path = urllib.parse.unquote_to_bytes(target_path) if "%" in target_path else target_path.encode("ascii")
    components = [part for part in raw_path.split(b"/") if part]
    if b"\0" in raw_path or b".." in components or (not show_hidden and any(p.startswith(b".") for p in components)):
        return error_response(404, "Not Found", head_only=head_only)
    found = _resolve_with_status(root_path, components, show_hidden)
    if found is None:
        return error_response(404, "Not Found", head_only=head_only)
    path, info = found
    if info is None:
        try:
            info = os.stat(path)
        except OSError:
            return error_response(404, "Not Found", head_only=head_only)
    if stat.S_ISDIR(info.st_mode):
        if not target_path.endswith("/"):
            response = error_response(301, "Moved Permanently", head_only=head_only)
            response.headers.append(("Location", target_path + "/"))
            return response
        index = _resolve(root_path, [*components, b"index.html"], show_hidden)  # checked like any path
        opened = _open_regular(index) if index is not None else None
        if opened is None:
            body = _listing(path, target_path, show_hidden)
            headers = [("Server", SERVER), ("Content-Type", "text/html; charset=utf-8")]
            headers.append(("Content-Length", str(len(body))))
            return Response(200, "OK", headers, body, head_only=head_only)
        assert index is not None
        path = index
    else:
        opened = _open_regular(path)
        if opened is None:
            return error_response(404, "Not Found", head_only=head_only)
    fd, info = opened
    try:
        return _file_response(request, path, fd, info, head_only)
    except BaseException:
        os.close(fd)
        raise


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _http_date(mtime: float) -> str:
    """``email.utils.formatdate(mtime, usegmt=True)`` (RFC 9110 §5.6.7's IMF-fixdate), without its detour
    through ``datetime`` and ``email.utils.format_datetime``."""
    t = time.gmtime(mtime)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    )


def _content_type(name: bytes) -> str:
    """The type ``mimetypes`` guesses from a file's name. ``guess_type`` reads no more of a name than its last
    two extensions (the last one, mapped by ``suffix_map`` or stripped as an encoding, then the one before),
    so the guess is remembered by those two: a directory of ``f1.txt`` … ``f9999.txt`` asks once."""
    dot = name.rfind(b".")
    if dot > 0 and name.count(b".") == 1:
        return _type_by_extensions(os.fsdecode(name[dot:]))  # "stem.ext": the usual name, and splitext's answer
    rest, last = os.path.splitext(os.fsdecode(name))
    return _type_by_extensions(os.path.splitext(rest)[1] + last)


@functools.lru_cache(maxsize=256)
def _type_by_extensions(extensions: str) -> str:
    return mimetypes.guess_type("/x" + extensions)[0] or "application/octet-stream"


def _file_response(request: Request, path: bytes, fd: int, info: os.stat_result, head_only: bool) -> Response:
    etag = _etag(info)
    last_modified = _http_date(info.st_mtime)
    content_type = _content_type(os.path.basename(path))
    headers = [
        ("Server", SERVER),
        ("Content-Type", content_type),
        ("Last-Modified", last_modified),
        ("ETag", etag),
        ("Accept-Ranges", "bytes"),
    ]
    size = info.st_size
    if _not_modified(request, etag, info.st_mtime):
        os.close(fd)
        return Response(304, "Not Modified", headers, head_only=head_only)
    chosen = _byte_range(request, size, etag, last_modified)
    if chosen == "unsatisfiable":
        os.close(fd)
        response = error_response(416, "Range Not Satisfiable", head_only=head_only)
        response.headers.append(("Content-Range", f"bytes */{size}"))
        return response
    if isinstance(chosen, tuple):
        start, length = chosen
        headers += [("Content-Range", f"bytes {start}-{start + length - 1}/{size}"), ("Content-Length", str(length))]
        region = FileRegion(fd, start, length, path)
        return Response(206, "Partial Content", headers, file=region, head_only=head_only)
    headers.append(("Content-Length", str(size)))
    return Response(200, "OK", headers, file=FileRegion(fd, 0, size, path), head_only=head_only)

"""``ktls serve``'s per-request shortcuts answer exactly what the long way did.

* Path resolution (:func:`ktls.serve.http._resolve_with_status`) walks only the components below the
  already-real root, one ``lstat`` each, and hands the whole path to ``os.path.realpath`` at the first symlink.
  Against the long way — ``realpath`` of the whole path, then the inside-the-root and hidden checks, then
  ``stat`` — for every target over a tree of files, directories, dot-names and symlinks (inside the root,
  outside it, dangling, through a directory, in a loop): the same file or none, with and without
  ``show_hidden``.
* ``Last-Modified`` is formatted without ``email.utils``, and ``Content-Type`` is guessed once per pair of
  extensions: both equal what ``email.utils.formatdate`` and ``mimetypes.guess_type`` say, for any time and
  any name.
* A small file body goes out with its head in one write (``_Connection._send``); a file that shrank since it
  was opened still sends what is there and reports the response incomplete (the server then closes the
  connection), as the ``sendfile`` path does.
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import mimetypes
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ktls.serve.config import ServeConfig
from ktls.serve.http import (
    _content_type,
    _hidden,
    _http_date,
    _inside,
    _real_root,
    _resolve_with_status,
    parse_request,
    respond,
)
from ktls.serve.server import INLINE_BODY, _Connection


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("paths")
    (base / "outside.txt").write_text("outside\n")
    (base / "outside-dir").mkdir()
    (base / "outside-dir" / "f.txt").write_text("f\n")
    www = base / "www"
    (www / "a" / "b").mkdir(parents=True)
    (www / "a" / "b" / "c.txt").write_text("c\n")
    (www / "a" / "x.txt").write_text("x\n")
    (www / ".hidden").mkdir()
    (www / ".hidden" / "h.txt").write_text("h\n")
    (www / ".env").write_text("SECRET\n")
    (www / "file.txt").write_text("file\n")
    os.symlink("a/b", www / "to-b")  # relative, inside
    os.symlink(www / "a" / "x.txt", www / "to-x")  # absolute, inside
    os.symlink(base / "outside.txt", www / "out")  # outside
    os.symlink(base / "outside-dir", www / "out-dir")  # a directory outside
    os.symlink(www / ".env", www / "env-alias")  # a visible name for a hidden file
    os.symlink(www / "missing", www / "dangling")
    os.symlink("loop2", www / "loop1")
    os.symlink("loop1", www / "loop2")
    os.symlink("..", www / "a" / "up")  # back to the root, from below
    os.symlink("../..", www / "a" / "upup")  # above the root
    return www


def _long_way(root: bytes, components: list[bytes], show_hidden: bool) -> bytes | None:
    """What ``respond`` did before: realpath of the whole path, the checks, then stat."""
    candidate = os.path.realpath(os.path.join(root, *components)) if components else root
    if not _inside(root, candidate) or (not show_hidden and _hidden(root, candidate)):
        return None
    try:
        os.stat(candidate)
    except OSError:
        return None
    return candidate


def _short_way(root: bytes, components: list[bytes], show_hidden: bool) -> bytes | None:
    found = _resolve_with_status(root, components, show_hidden)
    if found is None:
        return None
    path, info = found
    if info is None:
        try:
            os.stat(path)
        except OSError:
            return None
    return path


NAMES = [b"a", b"b", b"c.txt", b"x.txt", b".hidden", b"h.txt", b".env", b"file.txt", b"to-b", b"to-x", b"out",
         b"out-dir", b"f.txt", b"env-alias", b"dangling", b"loop1", b"up", b"upup", b"nope", b"."]  # fmt: skip


@pytest.mark.parametrize("show_hidden", [False, True])
def test_resolution_agrees_with_realpath_everywhere(tree: Path, show_hidden: bool) -> None:
    root = _real_root(os.fsencode(tree))
    checked = 0
    for depth in range(4):
        for components in itertools.product(NAMES, repeat=depth):
            targets = list(components)
            short, long = _short_way(root, targets, show_hidden), _long_way(root, targets, show_hidden)
            assert short == long, (targets, show_hidden)
            if short is not None:
                assert os.path.realpath(short) == short  # no symlink left in what is served
                checked += 1
    assert checked > 40


def test_a_real_root_is_resolved_once(tree: Path) -> None:
    link = tree.parent / "www-link"
    link.symlink_to(tree)
    assert _real_root(os.fsencode(link)) == os.fsencode(tree)
    assert respond(parse_request(b"GET /a/x.txt HTTP/1.1\r\nHost: x"), link).status == 200


class _Transport:
    def get_write_buffer_size(self) -> int:
        return 0


class _Writer:
    def __init__(self) -> None:
        self.written = b""
        self.transport = _Transport()

    def write(self, data: bytes) -> None:
        self.written += data


def _connection(root: Path) -> Any:
    connection: Any = _Connection.__new__(_Connection)
    connection.writer = _Writer()
    connection.config = ServeConfig(root)
    return connection


@pytest.mark.parametrize("size", [0, 1, 1024, INLINE_BODY])
def test_a_small_body_goes_out_with_its_head(tmp_path: Path, size: int) -> None:
    body = os.urandom(size)
    (tmp_path / "small.bin").write_bytes(body)
    connection = _connection(tmp_path)
    response = respond(parse_request(b"GET /small.bin HTTP/1.1\r\nHost: x"), tmp_path)
    try:
        complete, sent = asyncio.run(connection._send(response, True))
    finally:
        response.close()
    assert (complete, sent) == (True, size)
    assert connection.writer.written == response.head(True) + body  # one write: head and body


def test_a_small_file_that_shrank_is_sent_short_and_incomplete(tmp_path: Path) -> None:
    (tmp_path / "small.bin").write_bytes(b"x" * 4000)
    connection = _connection(tmp_path)
    response = respond(parse_request(b"GET /small.bin HTTP/1.1\r\nHost: x"), tmp_path)
    try:
        os.truncate(tmp_path / "small.bin", 1000)  # after the head said 4000
        complete, sent = asyncio.run(connection._send(response, True))
    finally:
        response.close()
    assert (complete, sent) == (False, 1000)
    assert connection.writer.written.endswith(b"\r\n\r\n" + b"x" * 1000)
    assert b"Content-Length: 4000" in connection.writer.written


@settings(max_examples=500, deadline=None)
@given(mtime=st.floats(min_value=0, max_value=2**35, allow_nan=False))
def test_last_modified_is_formatdate(mtime: float) -> None:
    assert _http_date(mtime) == email.utils.formatdate(mtime, usegmt=True)


_PARTS = st.sampled_from(["", ".", "..", "a", "tar", "gz", "Z", "TXT", "txt", "html", "svgz", "tgz", "br", "json", "x"])


@settings(max_examples=500, deadline=None)
@given(parts=st.lists(_PARTS, max_size=5), separator=st.sampled_from([".", ".."]))
def test_content_type_is_what_mimetypes_guesses(parts: list[str], separator: str) -> None:
    name = separator.join(parts) or "x"
    expected = mimetypes.guess_type("/" + name)[0] or "application/octet-stream"
    assert _content_type(os.fsencode(name)) == expected, name


@pytest.mark.parametrize(
    "name", ["f1.txt", "a.tar.gz", "b.tgz", "c.svgz", "d.TXT", ".tar.gz", "..gz", "a..gz", "noext", "x.html.br", "y.Z"]
)
def test_content_type_of_tricky_names(name: str) -> None:
    assert _content_type(os.fsencode(name)) == (mimetypes.guess_type("/" + name)[0] or "application/octet-stream")

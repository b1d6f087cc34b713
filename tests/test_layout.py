"""The package's layers, and that imports run one way between them (issue: one connection core).

Front ends (``ktls.stream``, ``ktls.asyncio``) → their shared socket I/O (``ktls.engine``) → the core
(``ktls.core``) → the TLS layer (``ktls.tls``) → the kernel ABI (``ktls.kernel``) → ``ktls.constants`` /
``ktls.errors``. Applications of the library (the CLI, ``serve``, ``bench``) sit on top. Read from the source
with ``ast``, so a lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "src"

#: Each layer may import its own and lower layers only (first match of the module's name wins).
LAYERS: list[tuple[str, int]] = [
    ("ktls.constants", 0),
    ("ktls.errors", 0),
    ("ktls.kernel", 1),  # the ABI: structs under their C names, syscalls
    ("ktls.tls", 2),  # records, key schedule, AEADs (a suite names its kernel cipher, so above the ABI)
    ("ktls.core", 3),
    ("ktls.engine", 4),  # the socket I/O both front ends share, driven by the core
    ("ktls.tlsinfo", 4),  # the TLS information both front ends tell, from the engine
    ("ktls.stream", 5),
    ("ktls.asyncio", 5),
    ("ktls.splice", 5),  # the splice loops both front ends delegate to (I/O, so not in the core)
    ("ktls", 6),  # the package itself, the CLI, serve, bench
]


def layer(module: str) -> int:
    for prefix, level in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return level
    raise AssertionError(f"{module} is in no layer")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Every ``ktls`` module ``path`` imports, resolved to absolute names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "ktls")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "ktls":
                continue
            if node.module is None:  # from . import x: x is a module
                found.update(f"{target}.{alias.name}" for alias in node.names)
            else:
                found.add(target)
    return found


MODULES = sorted(SOURCE.joinpath("ktls").rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_imports_run_one_way(path: Path) -> None:
    name = module_name(path)
    upward = {m for m in imported_modules(path) if layer(m) > layer(name)}
    assert not upward, f"{name} (layer {layer(name)}) imports from a higher layer: {sorted(upward)}"


def test_the_check_resolves_relative_imports() -> None:
    """The checker itself: a relative module import, a relative ``from`` import, two levels up."""
    ktls = SOURCE / "ktls"
    assert "ktls.core.handoff" in imported_modules(ktls / "core" / "driver.py")  # from . import handoff
    assert "ktls.kernel.uapi" in imported_modules(ktls / "tls" / "keyschedule.py")  # from ..kernel.uapi import
    assert "ktls.core.connection" in imported_modules(ktls / "asyncio" / "transport.py")  # from ..core.connection
    assert layer("ktls.core.connection") > layer("ktls.tls.records") > layer("ktls.kernel.uapi")


def test_each_layer_is_found_by_its_name() -> None:
    """A newcomer finds each layer by file name alone."""
    ktls = SOURCE / "ktls"
    for expected in (
        "kernel/uapi.py",  # the kernel ABI
        "tls/records.py",  # record parsing
        "tls/keyschedule.py",  # key schedule
        "core/keylog_capture.py",  # secret capture
        "core/driver.py",  # handshake driver
        "core/connection.py",  # connection core
        "stream.py",  # blocking stream
        "asyncio/transport.py",  # asyncio transport
        "cli.py",  # CLI
    ):
        assert (ktls / expected).is_file(), expected

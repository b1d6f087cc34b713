"""Build a small guest kernel from a Debian ``linux-source-*`` package, for scripts/kernel_matrix.py.

Debian builds no kernel the matrix needs for two of its rows: its 5.10 has no ``CONFIG_TLS``, and none of its
kernels has SM4 or ARIA. So the matrix builds those itself, from Debian's own source package (the same tree,
with Debian's patches): ``make tinyconfig``, the fragments in ``scripts/kernel-configs/`` merged over it, every
fragment line checked to have survived ``make olddefconfig``, then ``make bzImage``. Everything is built in (no
modules), so the guest boots from an initramfs that loads nothing. On a 2-core machine this takes a few minutes
per kernel; kernel_matrix.py caches the result under a key made of the source package's version, the fragments
and the compiler, so it is built once per machine.

This module knows how to turn a ``.deb`` into a ``bzImage``; fetching the package and caching the result is
kernel_matrix.py's job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

FRAGMENT_DIR = Path(__file__).resolve().parent / "kernel-configs"
#: Bump when the way a kernel is built changes (not its fragments: those are hashed), to rebuild cached ones.
BUILDER_VERSION = "1"
BUILD_TOOLS = ("gcc", "make", "bc", "flex", "bison")
#: Debian packages providing BUILD_TOOLS and the headers the build needs (libelf for objtool).
BUILD_PACKAGES = ("gcc", "make", "bc", "flex", "bison", "libelf-dev", "libc6-dev", "xz-utils")
LOG_TAIL_LINES = 40


class KernelBuildError(Exception):
    """A build step failed; the message names the step and ends with the tail of its output."""


@dataclasses.dataclass(frozen=True)
class SourceBuild:
    """How to build one kernel: the Debian source package and the configuration fragments merged over
    ``tinyconfig`` (file names in scripts/kernel-configs, applied in order)."""

    package: str
    fragments: tuple[str, ...]
    local_version: str  # appended to the release (``uname -r``), e.g. "-ktls"


@dataclasses.dataclass(frozen=True)
class BuiltKernel:
    bzimage: Path
    config: Path
    release: str
    seconds: Mapping[str, float]  # per step: unpack, configure, compile


def fragment_text(name: str) -> str:
    return (FRAGMENT_DIR / name).read_text()


def configuration_digest(build: SourceBuild, compiler: str) -> str:
    """What a built kernel depends on besides its source version: the fragments, the builder, the compiler."""
    digest = hashlib.sha256()
    for part in (BUILDER_VERSION, compiler, build.local_version, *build.fragments):
        digest.update(part.encode() + b"\x00")
    for name in build.fragments:
        digest.update(fragment_text(name).encode() + b"\x00")
    return digest.hexdigest()[:16]


def compiler_identity() -> str:
    """The first line of ``gcc --version``: a different compiler makes a different kernel."""
    result = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=False)
    return result.stdout.splitlines()[0].strip() if result.returncode == 0 and result.stdout else "unknown"


def missing_build_tools() -> list[str]:
    return [tool for tool in BUILD_TOOLS if shutil.which(tool) is None]


def wanted_options(fragments: Sequence[str]) -> dict[str, str]:
    """{CONFIG_X: value} of every setting in the fragments' text (comments and blank lines ignored)."""
    wanted: dict[str, str] = {}
    for text in fragments:
        for raw_line in text.splitlines():
            line = raw_line.strip()
            if line and not line.startswith("#"):
                name, separator, value = line.partition("=")
                if not separator or not name.startswith("CONFIG_"):
                    raise KernelBuildError(f"not a configuration line: {raw_line!r}")
                wanted[name] = value
    return wanted


def options_not_applied(config: str, wanted: Mapping[str, str]) -> list[str]:
    """Fragment settings that ``olddefconfig`` dropped (an unmet dependency or a symbol this version lacks)."""
    actual: dict[str, str] = {}
    for line in config.splitlines():
        name, separator, value = line.partition("=")
        if separator and name.startswith("CONFIG_"):
            actual[name] = value
    return [
        f"{name}={value} (got {actual.get(name, 'not set')})"
        for name, value in wanted.items()
        if actual.get(name) != value
    ]


def run_step(command: Sequence[str | os.PathLike[str]], *, cwd: Path, log_file: Path, step: str) -> float:
    """Run one build command with its output appended to log_file; the seconds it took."""
    started = time.monotonic()
    with log_file.open("a") as log:
        log.write(f"\n$ {' '.join(os.fspath(part) for part in command)}\n")
        log.flush()
        result = subprocess.run(
            [os.fspath(part) for part in command],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "LC_ALL": "C", "KBUILD_BUILD_USER": "ktls", "KBUILD_BUILD_HOST": "kernel-matrix"},
            check=False,
        )
    if result.returncode != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
        raise KernelBuildError(f"{step} failed with status {result.returncode} (log: {log_file}):\n{tail}")
    return time.monotonic() - started


def unpack_source(deb: Path, work_dir: Path, log_file: Path) -> Path:
    """The kernel tree from a linux-source-X .deb (which holds /usr/src/linux-source-X.tar.xz)."""
    unpacked = work_dir / "deb"
    run_step(["dpkg-deb", "-x", deb, unpacked], cwd=work_dir, log_file=log_file, step="dpkg-deb -x")
    tarballs = sorted(unpacked.glob("usr/src/linux-source-*.tar.*"))
    if len(tarballs) != 1:
        raise KernelBuildError(f"expected one source tarball in {deb.name}, found {[t.name for t in tarballs]}")
    run_step(["tar", "-xf", tarballs[0]], cwd=work_dir, log_file=log_file, step="tar -x")
    shutil.rmtree(unpacked)
    trees = [path for path in work_dir.glob("linux-source-*") if path.is_dir()]
    if len(trees) != 1:
        raise KernelBuildError(f"expected one kernel tree in {tarballs[0].name}, found {[t.name for t in trees]}")
    return trees[0]


def configure(tree: Path, build: SourceBuild, log_file: Path) -> None:
    """tinyconfig, the fragments merged over it, olddefconfig; fails if any fragment line did not stick."""
    run_step(["make", "tinyconfig"], cwd=tree, log_file=log_file, step="make tinyconfig")
    fragments = [fragment_text(name) for name in build.fragments]
    merged = tree / "ktls-fragment.config"
    merged.write_text("".join(fragments) + f'CONFIG_LOCALVERSION="{build.local_version}"\n')
    merge = ["scripts/kconfig/merge_config.sh", "-m", ".config", merged.name]
    run_step(merge, cwd=tree, log_file=log_file, step="merge_config.sh")
    run_step(["make", "olddefconfig"], cwd=tree, log_file=log_file, step="make olddefconfig")
    dropped = options_not_applied((tree / ".config").read_text(), wanted_options(fragments))
    if dropped:
        raise KernelBuildError(
            f"these settings of {', '.join(build.fragments)} did not survive olddefconfig in {tree.name} "
            f"(missing dependency, or a symbol this version does not have):\n    " + "\n    ".join(dropped)
        )


def kernel_release(tree: Path) -> str:
    result = subprocess.run(
        ["make", "-s", "kernelrelease"], cwd=tree, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False
    )
    release = result.stdout.strip()
    if result.returncode != 0 or not release:
        raise KernelBuildError(f"make kernelrelease failed: {result.stderr.strip()}")
    return release


def build_kernel(deb: Path, build: SourceBuild, work_dir: Path, *, jobs: int) -> BuiltKernel:
    """Unpack, configure and compile the kernel in ``deb`` inside ``work_dir`` (which the caller deletes)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    log_file = work_dir / "build.log"
    seconds: dict[str, float] = {}
    started = time.monotonic()
    tree = unpack_source(deb, work_dir, log_file)
    seconds["unpack"] = time.monotonic() - started
    started = time.monotonic()
    configure(tree, build, log_file)
    seconds["configure"] = time.monotonic() - started
    seconds["compile"] = run_step(
        ["make", f"-j{jobs}", "bzImage"], cwd=tree, log_file=log_file, step=f"make -j{jobs} bzImage"
    )
    return BuiltKernel(
        bzimage=tree / "arch" / "x86" / "boot" / "bzImage",
        config=tree / ".config",
        release=kernel_release(tree),
        seconds=seconds,
    )

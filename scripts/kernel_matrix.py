#!/usr/bin/env python3
"""Run the kernel-marked tests inside QEMU guests booted with Debian's kernels.

Usage::

    scripts/kernel_matrix.py                          # all kernels, `pytest -m kernel`
    scripts/kernel_matrix.py --kernels 7.2 -- -k probe  # one kernel, extra pytest arguments
    KTLS_KERNELS=6.1,7.3 scripts/kernel_matrix.py -v    # kernels from the environment, console shown live

Theory of operation
===================

The host kernel is built without ``CONFIG_TLS``, so kTLS can only be exercised in a guest kernel. KVM does not
work on these machines (it is a nested hypervisor that only runs specially built kernels), so every guest runs
under QEMU's software emulation (TCG). Everything below follows from keeping that slow guest small:

1. **Kernels** are Debian's generic ``amd64`` builds (the ``cloud`` flavour has no 9p), fetched with a *private*
   apt configuration (its own sources.list, lists and cache directories), so the machine's apt state is never
   touched. ``linux-image-amd64`` is a meta package: we follow its ``Depends`` through every
   ``linux-image-*``/``linux-binary-*``/``linux-modules-*``/``linux-base-*`` package (6.x: one image package
   with ``/boot/vmlinuz`` and the modules; 7.x: vmlinuz in ``linux-binary-*``, modules in ``linux-modules-*``,
   config and ``modules.builtin`` in ``linux-base-*``) and unpack them with ``dpkg-deb -x``.

2. **The cache** (``$KTLS_KERNEL_CACHE``, default ``~/.cache/ktls-kernels``, outside the checkout so a fresh
   clone on the same machine downloads nothing) keeps per kernel only: ``vmlinuz``, ``config``, a pruned module
   tree (crypto, networking, 9p, virtio and whatever those depend on; all stored ``.ko.xz``) with ``depmod``'s
   indexes, and the initramfs. The ``.deb`` files and apt lists are deleted once unpacked.

3. **The initramfs** is a tiny ``newc`` cpio written from Python: a static busybox, the modules needed to reach
   the host's files over virtio-9p (found by following each module's ``.modinfo`` ``depends=``; ``.ko.xz``
   decompressed with ``lzma``), and a stage-1 ``/init`` that only loads those modules, mounts the *control*
   share and runs ``stage2.sh`` from it. All per-run logic lives in that stage-2 script, written by this program
   before each boot, so the cached initramfs rarely needs rebuilding.

4. **The guest** mounts the host's root read-only over 9p and the project read-write at the same path, so the
   project's venv (made on the host) runs unchanged and test reports appear on the host at once. It mounts
   proc/sys/dev/devpts and tmpfs on ``/tmp``, ``/run``, ``/var/tmp``, ``/dev/shm``, brings up loopback, then
   chroots into the host root and runs the test command there.

5. **Modules load on demand**, as on a real system: ``/proc/sys/kernel/modprobe`` points to a small wrapper that
   runs the host's ``modprobe`` (kmod) inside the chroot with ``-d <cached module root>``. So
   ``setsockopt(TCP_ULP, "tls")`` loads ``tls``, and the first AES-GCM/CCM or ChaCha20-Poly1305 key loads
   ``gcm``/``ccm``/``chacha20poly1305`` and the fastest implementations (``aesni_intel`` etc., since ``-cpu max``
   has AES-NI) through the crypto API's module aliases. No preload list to keep in step with Debian's configs.
   Like udev's coldplug on a real system, the guest also loads the modules matching the CPU's modalias
   (``aesni_intel``, ``ghash_clmulni_intel``, ...): the crypto API never asks for them while generic AES is built
   in. ``MODPROBE_OPTIONS`` carries the same ``-d`` to tests that call ``modprobe`` themselves.

6. **Results** come back through the shared folders: the guest writes the command's exit status, ``uname -r``
   and the loaded modules into the control share, pytest writes JUnit XML into ``.kernel-results/``, and the
   guest powers off (``poweroff -f`` with ``-no-reboot``). A missing status file means the VM died or timed out.
   Each VM has a wall-clock timeout, and QEMU runs with no stdin, so nothing can hang or wait for a TTY.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import lzma
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO

from kernel_build import (
    BUILD_PACKAGES,
    KernelBuildError,
    SourceBuild,
    build_kernel,
    compiler_identity,
    configuration_digest,
    missing_build_tools,
)

PROJECT_DIR = Path(__file__).resolve().parent.parent
#: JUnit reports and console logs; ``KTLS_RESULTS`` (a folder inside the project, which the guest shares)
#: keeps concurrent runs apart.
RESULTS_DIR = PROJECT_DIR / os.environ.get("KTLS_RESULTS", ".kernel-results")
DEFAULT_CACHE_DIR = Path("~/.cache/ktls-kernels")
DEFAULT_TIMEOUT_SECONDS = 900.0
# Measured on this 2-core machine (4 kernels, a 6-test probe): two 1-vCPU guests side by side took 40-56 s in
# all, one 2-vCPU guest at a time 84-90 s, four 1-vCPU guests 66 s. A guest hardly runs faster with 2 vCPUs
# (emulated Python is single-threaded and QEMU's main loop, which serves 9p, needs a core of its own), so
# running two guests at once nearly halves the matrix. Each guest gets cores // jobs vCPUs.
DEFAULT_JOBS = 2

DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
HOST_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
KEYRING_PACKAGE = "debian-archive-keyring"
KEYRING_IN_PACKAGE = Path("usr/share/keyrings/debian-archive-keyring.gpg")


@dataclasses.dataclass(frozen=True)
class KernelSource:
    """Where one kernel of the matrix comes from: a label and a Debian suite, whose amd64 kernel it is, or,
    with ``build``, whose source package is built into a kernel of our own (scripts/kernel_build.py)."""

    label: str
    mirror: str
    suite: str
    build: SourceBuild | None = None


KERNEL_SOURCES: tuple[KernelSource, ...] = (
    # Debian 11's kernel line; Debian builds it without CONFIG_TLS.
    KernelSource(
        "5.10",
        DEBIAN_SECURITY_MIRROR,
        "bullseye-security",
        SourceBuild("linux-source-5.10", ("guest.config", "5.10.config"), "-ktls"),
    ),
    KernelSource("6.1", DEBIAN_SECURITY_MIRROR, "bookworm-security"),
    KernelSource("6.12", DEBIAN_MIRROR, "trixie"),
    KernelSource("7.2", DEBIAN_MIRROR, "sid"),
    # sid's 7.2 with SM4 and ARIA, which no Debian kernel builds: all eight kernel AEADs.
    KernelSource(
        "7.2-all",
        DEBIAN_MIRROR,
        "sid",
        SourceBuild("linux-source-7.2", ("guest.config", "all-aeads.config"), "-ktls-all"),
    ),
    KernelSource("7.3", DEBIAN_MIRROR, "experimental"),
)

KERNEL_META_PACKAGE = "linux-image-amd64"
# Packages that carry (or lead to) vmlinuz, modules, config and modules.builtin. "linux-base" itself (the
# maintainer scripts package, no dash after "base") does not match.
KERNEL_PACKAGE_PATTERN = re.compile(r"^linux-(image|binary|modules|base)-\S+$")

# Module directories kept in the cache (relative to /lib/modules/<release>). Their dependencies, wherever they
# live, are added too, so modules.dep is complete. "." ends a single module's name (foo.ko, foo.ko.xz).
KEPT_MODULE_PREFIXES: tuple[str, ...] = (
    "kernel/arch/x86/crypto/",
    "kernel/crypto/",
    "kernel/lib/crypto/",
    "kernel/net/",
    "kernel/fs/9p/",
    "kernel/fs/netfs/",
    "kernel/drivers/virtio/",
    "kernel/drivers/net/veth.",
    "kernel/drivers/net/dummy.",
    "kernel/drivers/net/ifb.",
    "kernel/drivers/net/tun.",
    "kernel/drivers/net/macvlan.",
    "kernel/drivers/net/vrf.",
)
KEPT_MODULE_METADATA = ("modules.builtin", "modules.builtin.modinfo", "modules.order")
# Loaded by the initramfs to reach the host's files; their dependencies are found from .modinfo. In 7.x the
# virtio modules are built in from 6.12 on (6.1: modules).
BOOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p")

MODULE_SUFFIXES = (".ko", ".ko.xz")
STAGE1_FORMAT_VERSION = "1"  # bump when the initramfs layout changes, to rebuild cached initramfs files

NINEP_OPTIONS = "trans=virtio,version=9p2000.L,msize=262144"
GUEST_MEMORY = "1G"
GUEST_KERNEL_COMMAND_LINE = "console=ttyS0 panic=-1 quiet"
PROBE_TIMEOUT_SECONDS = 60.0
# Host variables passed through to the guest's test command (beyond those the guest sets itself).
FORWARDED_ENVIRONMENT_PREFIXES = ("KTLS_", "PYTEST_", "HYPOTHESIS_")
FORWARDED_ENVIRONMENT_NAMES = ("CI",)


class MatrixError(Exception):
    """A step of the matrix failed in a way the user must act on; the message says what and how."""


# --------------------------------------------------------------------------------------------------------------
# Small utilities
# --------------------------------------------------------------------------------------------------------------


OUTPUT_LOCK = threading.Lock()  # guests run in threads: keep their lines whole


def log(message: str) -> None:
    with OUTPUT_LOCK:
        print(message, flush=True)


def run_command(
    command: Sequence[str | os.PathLike[str]], *, cwd: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a host command with no stdin, capturing its output (shown only when it fails)."""
    result = subprocess.run(
        [os.fspath(part) for part in command],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"},
        check=False,
    )
    if check and result.returncode != 0:
        shown = " ".join(shlex.quote(os.fspath(part)) for part in command)
        raise MatrixError(f"command failed with status {result.returncode}: {shown}\n{result.stdout.strip()}")
    return result


def find_program(name: str) -> Path | None:
    """Find a program on PATH or in the sbin directories, which a non-root PATH often lacks."""
    search_path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    found = shutil.which(name, path=search_path)
    return Path(found) if found else None


def is_static_executable(path: Path) -> bool:
    """True if the ELF file has no program interpreter (PT_INTERP), i.e. runs without a dynamic loader."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit ELF only: the guest is x86-64
        return False
    program_header_offset = int.from_bytes(data[0x20:0x28], "little")
    entry_size = int.from_bytes(data[0x36:0x38], "little")
    entry_count = int.from_bytes(data[0x38:0x3A], "little")
    pt_interp = 3
    for index in range(entry_count):
        start = program_header_offset + index * entry_size
        if int.from_bytes(data[start : start + 4], "little") == pt_interp:
            return False
    return True


def format_seconds(seconds: float) -> str:
    return f"{seconds:.1f}"


# --------------------------------------------------------------------------------------------------------------
# Host tools
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HostTools:
    qemu: Path
    busybox: Path
    depmod: Path
    modprobe: Path


BUSYBOX_STATIC_PATH = Path("/bin/busybox")


def missing_host_packages() -> list[str]:
    """Debian packages whose programs are missing: QEMU, a static busybox, kmod (depmod + the guest's modprobe)."""
    missing = []
    if find_program("qemu-system-x86_64") is None:
        missing.append("qemu-system-x86")
    if not (BUSYBOX_STATIC_PATH.exists() and is_static_executable(BUSYBOX_STATIC_PATH)):
        missing.append("busybox-static")
    if find_program("depmod") is None or find_program("modprobe") is None:
        missing.append("kmod")
    if find_program("dpkg-deb") is None or find_program("apt-get") is None:
        raise MatrixError("this script needs a Debian-like host with apt-get and dpkg-deb")
    return missing


def install_host_packages(packages: Sequence[str]) -> None:
    """Install packages with apt-get as root, refreshing the machine's package lists once if needed."""
    install = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    log(f"installing {' '.join(packages)} with apt-get")
    if run_command(install, check=False).returncode == 0:
        return
    run_command(["apt-get", "update"])
    run_command(install)


def ensure_host_tools() -> HostTools:
    missing = missing_host_packages()
    if missing and os.geteuid() == 0:
        install_host_packages(missing)
        missing = missing_host_packages()
    if missing:
        raise MatrixError(
            "missing host packages; install them with:\n"
            f"    sudo apt-get install --no-install-recommends {' '.join(missing)}"
        )
    return HostTools(
        qemu=required_program("qemu-system-x86_64"),
        busybox=BUSYBOX_STATIC_PATH,
        depmod=required_program("depmod"),
        modprobe=required_program("modprobe"),
    )


def required_program(name: str) -> Path:
    path = find_program(name)
    if path is None:
        raise MatrixError(f"{name} not found")
    return path


def require_project_venv() -> None:
    """The guest runs the project's venv through the shared root; it must be made on the host first."""
    if not (PROJECT_DIR / ".venv" / "bin" / "python").exists():
        raise MatrixError(f"no venv at {PROJECT_DIR / '.venv'}: create it on the host first")


# --------------------------------------------------------------------------------------------------------------
# Private apt configuration
# --------------------------------------------------------------------------------------------------------------

SIGNATURE_PROBLEM = re.compile(r"NO_PUBKEY|EXPKEYSIG|KEYEXPIRED|is not signed|signatures were invalid|GPG error")


class PrivateApt:
    """apt-get/apt-cache with their own sources.list, lists and cache under `directory`; the host's apt
    sources, lists and caches are never read or written."""

    def __init__(self, directory: Path, source_lines: Iterable[str]) -> None:
        self.directory = directory
        for subdirectory in ("lists/partial", "cache/archives/partial"):
            (directory / subdirectory).mkdir(parents=True, exist_ok=True)
        (directory / "sources.list").write_text("".join(f"{line}\n" for line in source_lines))

    def options(self) -> list[str]:
        settings = {
            "Dir::Etc::sourcelist": str(self.directory / "sources.list"),
            "Dir::Etc::sourceparts": "-",
            "Dir::State::Lists": str(self.directory / "lists"),
            "Dir::Cache": str(self.directory / "cache"),
            "Dir::State::status": "/dev/null",
        }
        if os.geteuid() == 0:
            # apt would drop to the _apt user, which cannot read a cache under /root.
            settings["APT::Sandbox::User"] = "root"
        return [f"-o{name}={value}" for name, value in settings.items()]

    def update(self) -> subprocess.CompletedProcess[str]:
        return run_command(["apt-get", "-q", *self.options(), "update"], check=False)

    def show(self, package: str) -> dict[str, str]:
        """The candidate version's control fields of `package`."""
        output = run_command(["apt-cache", *self.options(), "show", "--no-all-versions", package]).stdout
        return parse_control_stanza(output)

    def download(self, packages: Sequence[str], destination: Path) -> list[Path]:
        destination.mkdir(parents=True, exist_ok=True)
        run_command(["apt-get", "-q", *self.options(), "download", *packages], cwd=destination)
        return sorted(destination.glob("*.deb"))


def parse_control_stanza(text: str) -> dict[str, str]:
    """Parse the first RFC 822 stanza of apt-cache output into {field: value} (continuation lines joined)."""
    fields: dict[str, str] = {}
    name = ""
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        if line[0] in " \t" and name:
            fields[name] += "\n" + line.strip()
        elif ":" in line:
            name, _, value = line.partition(":")
            fields[name] = value.strip()
    return fields


def dependency_names(depends: str) -> list[str]:
    """Package names in a Depends field, every alternative included, without versions or architectures."""
    names = []
    for alternatives in depends.split(","):
        for alternative in alternatives.split("|"):
            name = alternative.strip().split(" ", 1)[0].split(":", 1)[0]
            if name:
                names.append(name)
    return names


def resolve_kernel_packages(apt: PrivateApt) -> list[str]:
    """linux-image-amd64 and every kernel package it leads to through Depends (see KERNEL_PACKAGE_PATTERN)."""
    resolved: list[str] = []
    pending = [KERNEL_META_PACKAGE]
    while pending:
        package = pending.pop()
        if package in resolved:
            continue
        resolved.append(package)
        fields = apt.show(package)
        for name in dependency_names(fields.get("Depends", "")):
            if KERNEL_PACKAGE_PATTERN.match(name) and name not in resolved:
                pending.append(name)
    return resolved


def apt_source_line(mirror: str, suite: str, keyring: Path | None) -> str:
    option = f"signed-by={keyring}" if keyring else "trusted=yes"
    return f"deb [arch=amd64 {option}] {mirror} {suite} main"


def cached_keyring(cache_dir: Path) -> Path:
    return cache_dir / "keyring" / "debian-archive-keyring.gpg"


def known_keyrings(cache_dir: Path) -> list[Path]:
    """Keyrings we already trust, newest first: one fetched earlier into the cache, then the host's."""
    return [keyring for keyring in (cached_keyring(cache_dir), HOST_KEYRING) if keyring.exists()]


def bootstrap_keyring(cache_dir: Path, work_dir: Path) -> Path:
    """Fetch a Debian archive keyring new enough for every suite into the cache.

    Normally the host's keyring verifies every suite (bookworm's keyring already holds trixie's archive keys,
    and sid/experimental are signed by the two newest archive keys), and this never runs. Once the archive signs
    only with keys newer than ours, we fetch `debian-archive-keyring` from the newest suite a keyring we trust
    still verifies (stable point releases add the next release's keys), so trust chains back to the host's
    keyring. Only if no suite verifies at all (no keyring on the host) do we fetch it from sid marked
    `trusted=yes`: trust on first use, announced loudly, and from then on used to verify everything.
    """
    trusted = known_keyrings(cache_dir)
    attempts: list[tuple[str, Path | None]] = [
        (suite, keyring) for keyring in trusted for suite in ("sid", "testing", "stable", "oldstable")
    ]
    attempts.append(("sid", None))
    for index, (suite, keyring) in enumerate(attempts):
        apt = PrivateApt(work_dir / f"keyring-{index}", [apt_source_line(DEBIAN_MIRROR, suite, keyring)])
        if apt.update().returncode != 0:
            continue
        if keyring is None:
            log(f"WARNING: no keyring verifies Debian's archive; trusting {KEYRING_PACKAGE} from sid on first use")
        unpacked = work_dir / "keyring-unpacked"
        for deb in apt.download([KEYRING_PACKAGE], work_dir / "keyring-debs"):
            run_command(["dpkg-deb", "-x", deb, unpacked])
        fetched = cached_keyring(cache_dir)
        fetched.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(unpacked / KEYRING_IN_PACKAGE, fetched)
        log(f"using {KEYRING_PACKAGE} from {suite} (cached in {fetched})")
        return fetched
    raise MatrixError("cannot reach Debian's archive to fetch a keyring")


def update_private_apt(source: KernelSource, apt_dir: Path, cache_dir: Path, work_dir: Path) -> PrivateApt:
    """A private apt for one suite, its lists fetched and verified (fetching a newer keyring if needed)."""
    for keyring in known_keyrings(cache_dir):
        apt = PrivateApt(apt_dir, [apt_source_line(source.mirror, source.suite, keyring)])
        result = apt.update()
        if result.returncode == 0:
            return apt
        if not SIGNATURE_PROBLEM.search(result.stdout):
            raise MatrixError(f"apt-get update for {source.suite} failed:\n{result.stdout.strip()}")
        log(f"[{source.label}] {keyring} cannot verify {source.suite}")
    log(f"[{source.label}] fetching a newer {KEYRING_PACKAGE}")
    apt = PrivateApt(apt_dir, [apt_source_line(source.mirror, source.suite, bootstrap_keyring(cache_dir, work_dir))])
    result = apt.update()
    if result.returncode != 0:
        raise MatrixError(f"apt-get update for {source.suite} failed:\n{result.stdout.strip()}")
    return apt


# --------------------------------------------------------------------------------------------------------------
# Kernel modules
# --------------------------------------------------------------------------------------------------------------


def module_name(path: Path) -> str:
    """The kernel's name for a module file: basename without .ko/.ko.xz, dashes as underscores."""
    name = path.name
    for suffix in (".ko.xz", ".ko"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def read_module(path: Path) -> bytes:
    """A module's ELF bytes, decompressed if it is a .ko.xz."""
    data = path.read_bytes()
    return lzma.decompress(data) if path.name.endswith(".xz") else data


def module_dependencies(module_bytes: bytes) -> list[str]:
    """The `depends=` entry of a module's .modinfo section (NUL-separated key=value strings)."""
    match = re.search(rb"(?:^|\x00)depends=([^\x00]*)", module_bytes)
    if match is None or not match.group(1):
        return []
    return [name.decode().replace("-", "_") for name in match.group(1).split(b",") if name]


def index_modules(module_dir: Path) -> dict[str, Path]:
    """{module name: file} for every module under a /lib/modules/<release> directory."""
    return {
        module_name(path): path for path in sorted(module_dir.rglob("*.ko*")) if path.name.endswith(MODULE_SUFFIXES)
    }


def builtin_module_names(module_dir: Path) -> set[str]:
    builtin = module_dir / "modules.builtin"
    if not builtin.exists():
        return set()
    return {module_name(Path(line.strip())) for line in builtin.read_text().splitlines() if line.strip()}


def load_order(roots: Iterable[str], modules: dict[str, Path], builtin: set[str]) -> list[str]:
    """Module names to insmod, each after its dependencies; built-in modules are skipped."""
    ordered: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in ordered or name in builtin:
            return
        if name not in modules:
            raise MatrixError(f"module {name} is neither a module file nor built in")
        if name in visiting:
            raise MatrixError(f"module dependency cycle through {name}")
        visiting.add(name)
        for dependency in module_dependencies(read_module(modules[name])):
            visit(dependency)
        visiting.discard(name)
        ordered.append(name)

    for root in roots:
        visit(root)
    return ordered


def is_kept_module(relative_path: str) -> bool:
    return relative_path.startswith(KEPT_MODULE_PREFIXES)


def prune_module_tree(source_dir: Path, target_dir: Path) -> int:
    """Copy the kept modules and their dependencies into target_dir, all as .ko.xz; return the module count.

    6.1's modules are plain .ko (several hundred MB for the whole tree); compressing the kept ones keeps the cache
    small. kmod's modprobe decompresses .ko.xz itself.
    """
    modules = index_modules(source_dir)
    kept = {name for name, path in modules.items() if is_kept_module(path.relative_to(source_dir).as_posix())}
    pending = sorted(kept)
    while pending:
        for dependency in module_dependencies(read_module(modules[pending.pop()])):
            if dependency in modules and dependency not in kept:
                kept.add(dependency)
                pending.append(dependency)

    def store(name: str) -> None:
        path = modules[name]
        relative = path.relative_to(source_dir).as_posix()
        target = target_dir / (relative if relative.endswith(".xz") else relative + ".xz")
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.name.endswith(".xz"):
            shutil.copyfile(path, target)
        else:
            target.write_bytes(lzma.compress(path.read_bytes(), preset=3, check=lzma.CHECK_CRC32))

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(store, sorted(kept)))  # lzma releases the GIL
    for metadata in KEPT_MODULE_METADATA:
        if (source_dir / metadata).exists():
            shutil.copyfile(source_dir / metadata, target_dir / metadata)
    return len(kept)


# --------------------------------------------------------------------------------------------------------------
# Initramfs (newc cpio written directly)
# --------------------------------------------------------------------------------------------------------------


class NewcArchive:
    """A cpio archive in the kernel's initramfs format ("newc": ASCII hex headers, 4-byte alignment)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._next_inode = 1

    def _add(self, name: str, mode: int, data: bytes = b"") -> None:
        encoded_name = name.encode() + b"\x00"
        fields = (
            self._next_inode, mode, 0, 0, 1, 0, len(data),  # ino mode uid gid nlink mtime filesize
            0, 0, 0, 0,  # devmajor devminor rdevmajor rdevminor
            len(encoded_name), 0,  # namesize check
        )  # fmt: skip
        self._next_inode += 1
        header = b"070701" + b"".join(b"%08x" % field for field in fields)
        self._parts.append(pad4(header + encoded_name))
        self._parts.append(pad4(data))

    def add_directory(self, name: str) -> None:
        self._add(name, 0o040755)

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._add(name, 0o100000 | mode, data)

    def add_symlink(self, name: str, target: str) -> None:
        self._add(name, 0o120777, target.encode())

    def to_bytes(self) -> bytes:
        trailer = NewcArchive()
        trailer._next_inode = 0
        trailer._add("TRAILER!!!", 0)
        return b"".join(self._parts + trailer._parts)


def pad4(data: bytes) -> bytes:
    return data + b"\x00" * (-len(data) % 4)


# Stage 1: reach the control share and run stage 2 from it. Kept minimal so it never needs to change.
STAGE1_INIT = """#!/bin/busybox sh
# ktls kernel matrix, stage 1 (in the initramfs): load the 9p modules, mount the control share, run stage 2.
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /ctl /newroot
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r module; do
    insmod "/boot-modules/$module.ko" || echo "ktls-init: insmod $module failed"
done < /boot-modules/load-order
if mount -t 9p -o {ninep_options} ktlsctl /ctl && [ -f /ctl/stage2.sh ]; then
    . /ctl/stage2.sh
fi
echo "ktls-init: stage 2 did not power off"
poweroff -f
"""


def stage1_init() -> str:
    return STAGE1_INIT.format(ninep_options=NINEP_OPTIONS)


def initramfs_digest(busybox: Path) -> str:
    """Identifies what a cached initramfs was built from; a mismatch rebuilds it (no download needed)."""
    digest = hashlib.sha256()
    for part in (STAGE1_FORMAT_VERSION, stage1_init(), ",".join(BOOT_MODULES)):
        digest.update(part.encode() + b"\x00")
    digest.update(busybox.read_bytes())
    return digest.hexdigest()[:16]


def build_initramfs(module_dir: Path, busybox: Path, *, with_modules: bool = True) -> bytes:
    """The stage-1 initramfs; a kernel built without module support (ours) has 9p built in and loads nothing."""
    order = []
    modules = index_modules(module_dir)
    if with_modules:
        order = load_order(BOOT_MODULES, modules, builtin_module_names(module_dir))
    archive = NewcArchive()
    for directory in ("bin", "boot-modules"):
        archive.add_directory(directory)
    archive.add_file("bin/busybox", busybox.read_bytes(), mode=0o755)
    archive.add_file("init", stage1_init().encode(), mode=0o755)
    for name in order:
        archive.add_file(f"boot-modules/{name}.ko", read_module(modules[name]))
    archive.add_file("boot-modules/load-order", "".join(f"{name}\n" for name in order).encode())
    return archive.to_bytes()


# --------------------------------------------------------------------------------------------------------------
# The cache of kernels
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CachedKernel:
    """One kernel in the cache: <cache>/<label>/{vmlinuz, initramfs.cpio, config, modroot/, kernel.json}."""

    label: str
    directory: Path
    release: str
    packages: tuple[str, ...]
    #: For a kernel we built: the source package's version and configuration_digest(); "" for Debian's.
    build_key: str = ""

    @property
    def has_modules(self) -> bool:
        """False for a kernel built without module support (everything built in, as ours are)."""
        try:
            return "# CONFIG_MODULES is not set" not in (self.directory / "config").read_text()
        except OSError:
            return True

    @property
    def vmlinuz(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initramfs(self) -> Path:
        return self.directory / "initramfs.cpio"

    @property
    def module_root(self) -> Path:
        """The `modprobe -d`/`depmod -b` base: modules are in <module_root>/lib/modules/<release>."""
        return self.directory / "modroot"

    @property
    def module_dir(self) -> Path:
        return self.module_root / "lib" / "modules" / self.release

    @property
    def metadata_file(self) -> Path:
        return self.directory / "kernel.json"


def kernel_cache_dir() -> Path:
    configured = os.environ.get("KTLS_KERNEL_CACHE") or str(DEFAULT_CACHE_DIR)
    return Path(configured).expanduser().resolve()


def load_cached_kernel(directory: Path) -> CachedKernel | None:
    """The kernel cached in `directory`, or None if it is absent or incomplete."""
    try:
        metadata = json.loads((directory / "kernel.json").read_text())
        kernel = CachedKernel(
            label=metadata["label"],
            directory=directory,
            release=metadata["release"],
            packages=tuple(metadata["packages"]),
            build_key=metadata.get("build_key", ""),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (kernel.vmlinuz.exists() and (kernel.module_dir / "modules.dep").exists()):
        return None
    return kernel


def write_kernel_metadata(kernel: CachedKernel, initramfs_id: str) -> None:
    metadata = {
        "label": kernel.label,
        "release": kernel.release,
        "packages": list(kernel.packages),
        "initramfs": initramfs_id,
    }
    if kernel.build_key:
        metadata["build_key"] = kernel.build_key
    kernel.metadata_file.write_text(json.dumps(metadata, indent=2) + "\n")


def ensure_initramfs(kernel: CachedKernel, busybox: Path) -> None:
    """Build the initramfs if missing or made by a different stage 1 / busybox."""
    wanted = initramfs_digest(busybox)
    metadata = json.loads(kernel.metadata_file.read_text())
    if kernel.initramfs.exists() and metadata.get("initramfs") == wanted:
        return
    temporary = kernel.initramfs.with_suffix(".tmp")
    temporary.write_bytes(build_initramfs(kernel.module_dir, busybox, with_modules=kernel.has_modules))
    temporary.replace(kernel.initramfs)
    write_kernel_metadata(kernel, wanted)


def find_unpacked_release(tree: Path) -> str:
    """The kernel release: the directory under (usr/)lib/modules that holds the modules."""
    releases = {path.parent.name for path in tree.glob("*lib/modules/*/kernel")}
    releases |= {path.parent.name for path in tree.glob("usr/lib/modules/*/kernel")}
    if len(releases) != 1:
        raise MatrixError(f"expected one kernel release in the unpacked packages, found {sorted(releases)}")
    return releases.pop()


def find_unpacked_file(tree: Path, release: str, candidates: Sequence[str]) -> Path:
    for candidate in candidates:
        path = tree / candidate.format(release=release)
        if path.exists():
            return path
    raise MatrixError(f"none of {', '.join(candidates)} in the unpacked kernel {release}")


def unpacked_module_dir(tree: Path, release: str) -> Path:
    return find_unpacked_file(tree, release, ("usr/lib/modules/{release}", "lib/modules/{release}"))


def unpack_kernel(source: KernelSource, tree: Path, staging: Path, tools: HostTools, packages: list[str]) -> None:
    """Turn an unpacked package tree into the cache layout in `staging`."""
    release = find_unpacked_release(tree)
    if not release.startswith(source.label):
        log(f"[{source.label}] note: {source.suite} now has kernel {release}")
    vmlinuz = find_unpacked_file(tree, release, ("boot/vmlinuz-{release}", "usr/lib/modules/{release}/vmlinuz"))
    config = find_unpacked_file(tree, release, ("boot/config-{release}", "usr/lib/modules/{release}/config"))
    kernel = CachedKernel(source.label, staging, release, tuple(packages))
    staging.mkdir(parents=True)
    shutil.copyfile(vmlinuz, kernel.vmlinuz)
    shutil.copyfile(config, staging / "config")
    count = prune_module_tree(unpacked_module_dir(tree, release), kernel.module_dir)
    # kmod may be built to look in /usr/lib/modules; make both spellings work under the module root.
    (kernel.module_root / "usr" / "lib").mkdir(parents=True)
    (kernel.module_root / "usr" / "lib" / "modules").symlink_to("../../lib/modules")
    run_command([tools.depmod, "-b", kernel.module_root, release])
    write_kernel_metadata(kernel, "")
    log(f"[{source.label}] kept {count} modules of {release}")


def download_kernel(source: KernelSource, cache_dir: Path, tools: HostTools) -> None:
    """Fetch, unpack and prune one kernel into <cache>/<label>, replacing any previous one atomically."""
    work_dir = Path(tempfile.mkdtemp(prefix=f".work-{source.label}-", dir=cache_dir))
    try:
        started = time.monotonic()
        apt = update_private_apt(source, work_dir / "apt", cache_dir, work_dir)
        packages = resolve_kernel_packages(apt)
        debs = apt.download(packages, work_dir / "debs")
        size_mb = sum(deb.stat().st_size for deb in debs) / 1e6
        log(f"[{source.label}] downloaded {len(debs)} packages ({size_mb:.0f} MB) from {source.suite}")
        tree = work_dir / "tree"
        for deb in debs:
            run_command(["dpkg-deb", "-x", deb, tree])
        versions = [deb.name.removesuffix("_amd64.deb") for deb in debs]
        unpack_kernel(source, tree, work_dir / "kernel", tools, versions)
        final = cache_dir / source.label
        if final.exists():
            shutil.rmtree(final)
        (work_dir / "kernel").rename(final)
        log(f"[{source.label}] cached in {final} ({time.monotonic() - started:.0f} s)")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


ABANDONED_WORK_DIR_SECONDS = 3600.0


def remove_abandoned_work_dirs(cache_dir: Path) -> None:
    """Delete download work dirs (hundreds of MB) that a killed run left behind; young ones may be in use."""
    for work_dir in cache_dir.glob(".work-*"):
        with contextlib.suppress(OSError):
            if time.time() - work_dir.stat().st_mtime > ABANDONED_WORK_DIR_SECONDS:
                shutil.rmtree(work_dir)


def prepare_kernel(source: KernelSource, cache_dir: Path, tools: HostTools, refresh: bool) -> CachedKernel:
    if source.build is not None:
        built = prepare_built_kernel(source, source.build, cache_dir, tools, refresh)
        ensure_initramfs(built, tools.busybox)
        return built
    kernel = None if refresh else load_cached_kernel(cache_dir / source.label)
    if kernel is None:
        download_kernel(source, cache_dir, tools)
        kernel = load_cached_kernel(cache_dir / source.label)
        if kernel is None:
            raise MatrixError(f"kernel {source.label} is incomplete after download")
    ensure_initramfs(kernel, tools.busybox)
    return kernel


# --------------------------------------------------------------------------------------------------------------
# Kernels built from Debian's source packages (the building itself: scripts/kernel_build.py)
# --------------------------------------------------------------------------------------------------------------


def ensure_build_tools() -> None:
    """The compiler and friends a kernel build needs, installed with apt-get when we are root."""
    if missing_build_tools() and os.geteuid() == 0:
        install_host_packages(BUILD_PACKAGES)
    missing = missing_build_tools()
    if missing:
        raise MatrixError(
            f"building a kernel needs {', '.join(missing)}; install them with:\n"
            f"    sudo apt-get install --no-install-recommends {' '.join(BUILD_PACKAGES)}"
        )


def build_key(source_version: str, configuration: str) -> str:
    return f"{source_version}+{configuration}"


def prepare_built_kernel(
    source: KernelSource, build: SourceBuild, cache_dir: Path, tools: HostTools, refresh: bool
) -> CachedKernel:
    """The kernel built from `build`, from the cache when its configuration is unchanged.

    The cache key is the source package's version and the configuration digest (fragments, builder,
    compiler). An ordinary run reuses a kernel whose configuration matches without asking the archive;
    --refresh asks, and rebuilds only if Debian has published a newer source package.
    """
    configuration = configuration_digest(build, compiler_identity())
    cached = load_cached_kernel(cache_dir / source.label)
    cached_configuration = (cached.build_key if cached else "").rpartition("+")[2]
    if cached is not None and cached_configuration == configuration and not refresh:
        return cached
    work_dir = Path(tempfile.mkdtemp(prefix=f".work-{source.label}-", dir=cache_dir))
    try:
        apt = update_private_apt(source, work_dir / "apt", cache_dir, work_dir)
        version = apt.show(build.package)["Version"]
        if cached is not None and cached.build_key == build_key(version, configuration):
            return cached
        ensure_build_tools()
        started = time.monotonic()
        debs = apt.download([build.package], work_dir / "debs")
        log(f"[{source.label}] building {build.package} {version} ({', '.join(build.fragments)})")
        try:
            built = build_kernel(debs[0], build, work_dir / "build", jobs=os.cpu_count() or 1)
        except (KernelBuildError, OSError) as error:
            raise MatrixError(f"building {build.package} failed: {error}") from error
        staging = work_dir / "kernel"
        kernel = CachedKernel(
            source.label, staging, built.release, (f"{build.package}_{version}",), build_key(version, configuration)
        )
        staging.mkdir()
        shutil.copyfile(built.bzimage, kernel.vmlinuz)
        shutil.copyfile(built.config, staging / "config")
        shutil.copyfile(work_dir / "build" / "build.log", staging / "build.log")
        # An empty module tree with depmod's indexes: the guest's modprobe then says "not found" like on any
        # kernel without modules, instead of failing on a missing directory.
        kernel.module_dir.mkdir(parents=True)
        run_command([tools.depmod, "-b", kernel.module_root, built.release])
        write_kernel_metadata(kernel, "")
        final = cache_dir / source.label
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        steps = ", ".join(f"{step} {seconds:.0f} s" for step, seconds in built.seconds.items())
        total = time.monotonic() - started
        log(f"[{source.label}] built {built.release} in {total:.0f} s ({steps}), cached in {final}")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    reloaded = load_cached_kernel(cache_dir / source.label)
    if reloaded is None:
        raise MatrixError(f"kernel {source.label} is incomplete after the build")
    return reloaded


# --------------------------------------------------------------------------------------------------------------
# The guest
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GuestPlan:
    """What one guest runs: the command (in the project dir) and its environment, besides the fixed setup."""

    command: tuple[str, ...]
    environment: tuple[tuple[str, str], ...]


@dataclasses.dataclass(frozen=True)
class GuestOutcome:
    label: str
    release: str | None  # uname -r as the guest saw it; None if the guest never got that far
    exit_status: int | None  # the test command's status; None if the VM died or timed out
    seconds: float
    timed_out: bool
    loaded_modules: tuple[str, ...]


GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def guest_environment(kernel: CachedKernel) -> dict[str, str]:
    """The test command's environment: fixed basics, the KTLS_GUEST marker, and a few forwarded host variables."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if name in FORWARDED_ENVIRONMENT_NAMES or name.startswith(FORWARDED_ENVIRONMENT_PREFIXES)
    }
    environment.pop("KTLS_KERNELS", None)
    environment.update(
        {
            "HOME": "/tmp/home",  # the host's home is read-only in the guest
            "PATH": f"{PROJECT_DIR / '.venv' / 'bin'}:{GUEST_PATH}",
            "LANG": "C.UTF-8",
            "KTLS_GUEST": kernel.label,
            "MODPROBE_OPTIONS": f"-d {kernel.module_root}",
        }
    )
    return environment


def stage2_script(kernel: CachedKernel, plan: GuestPlan, modprobe: Path) -> str:
    """The guest's stage 2 (run by the initramfs's /init from the control share): mounts, chroot, test, status."""
    q = shlex.quote
    project = q(str(PROJECT_DIR))
    assignments = " ".join(q(f"{name}={value}") for name, value in plan.environment)
    command = " ".join(q(part) for part in plan.command)
    return f"""# ktls kernel matrix, stage 2 for kernel {kernel.label} (written by scripts/kernel_matrix.py)
fail() {{ echo "ktls-init: $*"; sync; poweroff -f; }}
uname -r > /ctl/release
mount -t 9p -o {NINEP_OPTIONS},ro,cache=loose hostroot /newroot || fail "cannot mount the host root"
mount -t proc proc /newroot/proc || fail "cannot mount /proc"
mount -t sysfs sysfs /newroot/sys || fail "cannot mount /sys"
mount -t devtmpfs devtmpfs /newroot/dev || fail "cannot mount /dev"
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o ptmxmode=0666 devpts /newroot/dev/pts || fail "cannot mount /dev/pts"
for directory in /dev/shm /tmp /run /var/tmp; do
    mount -t tmpfs -o mode=1777 tmpfs "/newroot$directory" || fail "cannot mount tmpfs on $directory"
done
# The project after the tmpfs mounts, so that a checkout under /tmp (where CI may clone) is not hidden.
# cache=loose on the project too: imports from the venv got 2-3x faster; nothing on the host writes there
# while the guest runs, and the guest's own writes (JUnit) are flushed by the sync before power-off.
mkdir -p /newroot{project}
mount -t 9p -o {NINEP_OPTIONS},cache=loose project /newroot{project} || fail "cannot mount the project"
ip link set lo up || fail "cannot bring up loopback"
# Load modules on demand like a real system: the kernel runs this wrapper, which runs the host's modprobe
# (kmod) inside the chroot on this kernel's cached module tree. The wrapper lives in the initramfs because
# the kernel starts its helpers in the initial root, which only the test command's chroot leaves.
cat > /sbin/ktls-modprobe <<'EOF'
#!/bin/sh
exec /bin/busybox chroot /newroot {q(str(modprobe))} -d {q(str(kernel.module_root))} "$@"
EOF
chmod 755 /sbin/ktls-modprobe
# A kernel built without module support (ours: everything built in) has no modprobe helper to set.
if [ -e /proc/sys/kernel/modprobe ]; then
    echo /sbin/ktls-modprobe > /proc/sys/kernel/modprobe
    # What udev's coldplug does on a real system for the CPU: load the modules matching its features
    # (aesni_intel, ghash_clmulni_intel, ...). The crypto API would never ask for them: generic AES is built in.
    /sbin/ktls-modprobe -qab $(cat /sys/devices/system/cpu/modalias)
fi
echo "ktls-init: kernel $(uname -r) ready after $(cut -d' ' -f1 /proc/uptime) s, running the test command"
/bin/busybox env -i {assignments} KTLS_GUEST_KERNEL_RELEASE="$(uname -r)" \\
    /bin/busybox chroot /newroot /bin/sh -c 'mkdir -p "$HOME" && cd "$1" && shift && exec "$@"' ktls-guest {project} \\
    {command} < /dev/null
echo $? > /ctl/status
[ -e /proc/modules ] && cut -d' ' -f1 /proc/modules | sort > /ctl/modules
echo "ktls-init: test command exited with status $(cat /ctl/status)"
sync
poweroff -f
"""


def qemu_command(tools: HostTools, kernel: CachedKernel, control_dir: Path, accel: str, cpus: int) -> list[str]:
    shares = [("hostroot", Path("/"), True), ("project", PROJECT_DIR, False), ("ktlsctl", control_dir, False)]
    command = [
        str(tools.qemu),
        *(["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else ["-accel", "tcg", "-cpu", "max"]),
        "-m", GUEST_MEMORY,
        "-smp", str(cpus),
        "-nographic",
        "-no-reboot",
        "-nic", "none",
        "-kernel", str(kernel.vmlinuz),
        "-initrd", str(kernel.initramfs),
        "-append", GUEST_KERNEL_COMMAND_LINE,
    ]  # fmt: skip
    for tag, path, readonly in shares:
        options = f"local,path={path},mount_tag={tag},security_model=none,multidevs=remap"
        command += ["-virtfs", options + (",readonly=on" if readonly else "")]
    return command


# SeaBIOS and the kernel reset and clear the terminal; those escape sequences would only garble logs.
TERMINAL_ESCAPE = re.compile(r"\x1b(?:\[[0-9;?]*[A-Za-z]|[A-Za-z])")


def stream_console(stream: IO[bytes], log_file: IO[str], label: str, verbose: bool) -> None:
    """Copy the guest's serial console to its log (without the console's \\r), and to stdout with -v."""
    for raw_line in iter(stream.readline, b""):
        line = TERMINAL_ESCAPE.sub("", raw_line.decode(errors="replace").replace("\r", ""))
        log_file.write(line)
        log_file.flush()
        if verbose:
            log(f"[{label}] " + line.rstrip("\n"))


def read_control_file(control_dir: Path, name: str) -> str | None:
    try:
        return (control_dir / name).read_text().strip()
    except OSError:
        return None


def boot_guest(
    tools: HostTools,
    kernel: CachedKernel,
    plan: GuestPlan,
    *,
    accel: str,
    cpus: int,
    timeout: float,
    console_log: Path,
    verbose: bool,
) -> GuestOutcome:
    """Boot one guest, run the plan, and collect what it reported through the control share."""
    with tempfile.TemporaryDirectory(prefix=f"ktls-guest-{kernel.label}-") as control_name:
        control_dir = Path(control_name)
        (control_dir / "stage2.sh").write_text(stage2_script(kernel, plan, tools.modprobe))
        console_log.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        timed_out = False
        with (
            console_log.open("w") as log_file,
            subprocess.Popen(
                qemu_command(tools, kernel, control_dir, accel, cpus),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            ) as qemu,
        ):
            assert qemu.stdout is not None
            reader = threading.Thread(
                target=stream_console, args=(qemu.stdout, log_file, kernel.label, verbose), daemon=True
            )
            reader.start()
            try:
                qemu.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                log_file.write(f"\nkernel_matrix: timed out after {timeout:.0f} s, killing QEMU\n")
            finally:
                if qemu.poll() is None:
                    qemu.kill()
                    qemu.wait()
                reader.join(timeout=10)
        status = read_control_file(control_dir, "status")
        modules = read_control_file(control_dir, "modules") or ""
        return GuestOutcome(
            label=kernel.label,
            release=read_control_file(control_dir, "release"),
            exit_status=int(status) if status and status.lstrip("-").isdigit() else None,
            seconds=time.monotonic() - started,
            timed_out=timed_out,
            loaded_modules=tuple(modules.split()),
        )


def kvm_works(tools: HostTools, kernel: CachedKernel) -> bool:
    """Boot a guest under KVM that only reports its release. /dev/kvm can exist and accept KVM_CREATE_VM on a
    hypervisor that cannot run ordinary guests (they hang or abort), so only a real boot tells."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    with tempfile.TemporaryDirectory() as scratch:
        outcome = boot_guest(
            tools,
            kernel,
            GuestPlan(command=("true",), environment=()),
            accel="kvm",
            cpus=1,
            timeout=PROBE_TIMEOUT_SECONDS,
            console_log=Path(scratch) / "probe.log",
            verbose=False,
        )
    return outcome.exit_status == 0


# --------------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TestCounts:
    tests: int
    failures: int
    errors: int
    skipped: int

    @property
    def passed(self) -> int:
        return self.tests - self.failures - self.errors - self.skipped


def parse_junit(path: Path) -> TestCounts | None:
    """Totals of a pytest JUnit XML report (<testsuites> of <testsuite>s, or a single <testsuite>)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")

    def total(attribute: str) -> int:
        return sum(int(suite.get(attribute, "0")) for suite in suites)

    return TestCounts(total("tests"), total("failures"), total("errors"), total("skipped"))


@dataclasses.dataclass(frozen=True)
class KernelResult:
    label: str
    outcome: GuestOutcome | None
    counts: TestCounts | None
    problem: str | None  # None when the kernel passed

    @property
    def ok(self) -> bool:
        return self.problem is None


def judge(label: str, outcome: GuestOutcome | None, counts: TestCounts | None, error: str | None) -> KernelResult:
    """A kernel passes only with a JUnit report of at least one test and no failures or errors."""
    problem: str | None = None
    if error is not None:
        problem = error
    elif outcome is not None and outcome.timed_out and counts is None:
        problem = "timed out"
    elif counts is None:
        problem = "no JUnit report (guest did not boot or died)"
    elif counts.tests == 0:
        problem = "ran no tests"
    elif counts.failures or counts.errors:
        problem = "tests failed"
    elif outcome is not None and outcome.exit_status not in (0, None):
        problem = f"test command exited with status {outcome.exit_status}"
    return KernelResult(label, outcome, counts, problem)


def summary_table(results: Sequence[KernelResult]) -> str:
    header = ("kernel", "release", "passed", "failed", "errors", "skipped", "seconds", "result")
    rows = [header]
    for result in results:
        counts, outcome = result.counts, result.outcome
        numbers = (
            (str(counts.passed), str(counts.failures), str(counts.errors), str(counts.skipped))
            if counts
            else ("-",) * 4
        )
        rows.append(
            (
                result.label,
                (outcome.release if outcome else None) or "-",
                *numbers,
                format_seconds(outcome.seconds) if outcome else "-",
                "ok" if result.ok else f"FAIL: {result.problem}",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    right_aligned = {2, 3, 4, 5, 6}
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if column in right_aligned else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def parse_arguments(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Options before `--`; everything after `--` is handed to pytest."""
    arguments = list(argv)
    extra: list[str] = []
    if "--" in arguments:
        split = arguments.index("--")
        arguments, extra = arguments[:split], arguments[split + 1 :]
    labels = ", ".join(source.label for source in KERNEL_SOURCES)
    parser = argparse.ArgumentParser(
        prog="kernel_matrix.py",
        description="Run `pytest -m kernel` in QEMU guests with Debian's kernels (kTLS needs CONFIG_TLS).",
        epilog="Arguments after `--` are appended to the pytest command, e.g. `-- -k probe`.",
    )
    parser.add_argument(
        "--kernels",
        default=os.environ.get("KTLS_KERNELS", ""),
        help=f"comma-separated labels among {labels} (default: $KTLS_KERNELS, else all)",
    )
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS, help="guests run at once (default: %(default)s)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_SECONDS,
        help="seconds per guest before it is killed (default: %(default).0f)",
    )
    parser.add_argument("--refresh", action="store_true", help="download the kernels again")
    parser.add_argument("--prepare-only", action="store_true", help="download and build the cache, boot nothing")
    parser.add_argument(
        "--accel",
        choices=("tcg", "kvm", "auto"),
        default="tcg",
        help="QEMU accelerator; auto boots a KVM probe first (default: tcg: KVM hangs on these machines)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show each guest's console live")
    parser.add_argument(
        "--run",
        metavar="COMMAND",
        help="run this shell command in the project directory instead of pytest (e.g. a benchmark); "
        "its output is in the console log and its exit status is the result",
    )
    return parser.parse_args(arguments), extra


def select_kernels(spec: str) -> list[KernelSource]:
    if not spec.strip():
        return list(KERNEL_SOURCES)
    by_label = {source.label: source for source in KERNEL_SOURCES}
    wanted = [label.strip() for label in spec.split(",") if label.strip()]
    unknown = [label for label in wanted if label not in by_label]
    if unknown:
        raise MatrixError(f"unknown kernel label(s) {', '.join(unknown)}; choose among {', '.join(by_label)}")
    return [by_label[label] for label in dict.fromkeys(wanted)]


def pytest_command(label: str, extra: Sequence[str]) -> tuple[str, ...]:
    junit = RESULTS_DIR / f"{label}.xml"
    python = PROJECT_DIR / ".venv" / "bin" / "python"
    return (
        str(python), "-m", "pytest", "-m", "kernel", "-p", "no:cacheprovider", f"--junitxml={junit}", "-q",
        *extra,
    )  # fmt: skip


def run_one_kernel(
    tools: HostTools, kernel: CachedKernel, extra: Sequence[str], arguments: argparse.Namespace, accel: str
) -> KernelResult:
    junit = RESULTS_DIR / f"{kernel.label}.xml"
    junit.unlink(missing_ok=True)  # a stale report must not pass for this run's
    environment = guest_environment(kernel)
    command = ("/bin/sh", "-c", arguments.run) if arguments.run else pytest_command(kernel.label, extra)
    plan = GuestPlan(command=command, environment=tuple(sorted(environment.items())))
    cpus = max(1, (os.cpu_count() or 1) // max(1, arguments.jobs))
    log(f"[{kernel.label}] booting {kernel.release} ({accel}, {cpus} vCPU)")
    outcome = boot_guest(
        tools,
        kernel,
        plan,
        accel=accel,
        cpus=cpus,
        timeout=arguments.timeout,
        console_log=RESULTS_DIR / f"{kernel.label}.console.log",
        verbose=arguments.verbose,
    )
    if arguments.run:
        failed = outcome.exit_status != 0
        result = KernelResult(kernel.label, outcome, None, f"exit status {outcome.exit_status}" if failed else None)
    else:
        result = judge(kernel.label, outcome, parse_junit(junit), None)
    log(
        f"[{kernel.label}] {'ok' if result.ok else 'FAIL: ' + str(result.problem)} "
        f"in {format_seconds(outcome.seconds)} s (console: {RESULTS_DIR / (kernel.label + '.console.log')})"
    )
    return result


def choose_accel(requested: str, tools: HostTools, kernels: Sequence[CachedKernel]) -> str:
    if requested != "auto" or not kernels:
        return requested
    log(f"probing KVM with {kernels[0].release} (up to {PROBE_TIMEOUT_SECONDS:.0f} s)")
    accel = "kvm" if kvm_works(tools, kernels[0]) else "tcg"
    log(f"using {accel}")
    return accel


def prepare_kernels(
    sources: Sequence[KernelSource], tools: HostTools, refresh: bool
) -> tuple[list[CachedKernel], list[KernelResult]]:
    cache_dir = kernel_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    remove_abandoned_work_dirs(cache_dir)
    prepared: list[CachedKernel] = []
    failed: list[KernelResult] = []
    for source in sources:
        try:
            prepared.append(prepare_kernel(source, cache_dir, tools, refresh))
        except MatrixError as error:
            log(f"[{source.label}] cannot prepare the kernel: {error}")
            failed.append(judge(source.label, None, None, "kernel download/preparation failed"))
    return prepared, failed


def main(argv: Sequence[str] | None = None) -> int:
    arguments, extra = parse_arguments(sys.argv[1:] if argv is None else argv)
    try:
        sources = select_kernels(arguments.kernels)
        tools = ensure_host_tools()
        if not arguments.prepare_only:
            require_project_venv()
        kernels, results = prepare_kernels(sources, tools, arguments.refresh)
        if arguments.prepare_only:
            for kernel in kernels:
                log(f"[{kernel.label}] ready: {kernel.release} in {kernel.directory}")
            return 1 if results else 0
        accel = choose_accel(arguments.accel, tools, kernels)
        RESULTS_DIR.mkdir(exist_ok=True)
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, arguments.jobs)) as pool:
            # Newest kernel first: the newer a kernel, the more of the suite it runs (rekey, splice, options older
            # ones lack and skip), and starting the long guests first keeps a core from idling at the end while the
            # last long one runs alone (2026-12-07, six guests two at a time: 35.5 min in source order; from the same
            # guest times newest first would take ~33).
            futures = [
                pool.submit(run_one_kernel, tools, kernel, extra, arguments, accel) for kernel in reversed(kernels)
            ]
            results += [future.result() for future in futures]
    except MatrixError as error:
        log(f"kernel_matrix: {error}")
        return 2
    order = {source.label: index for index, source in enumerate(sources)}
    results.sort(key=lambda result: order[result.label])
    log("")
    log(summary_table(results))
    log(closing_line(results))
    return 0 if all(result.ok for result in results) else 1


def closing_line(results: Sequence[KernelResult]) -> str:
    """Totals over every kernel, in the plain form CI reads: ``matrix: N passed, N failed, N skipped``.

    A kernel that did not boot counts as one failure, so the line can never look green when it was not.
    """
    passed = sum(r.counts.passed for r in results if r.counts)
    failed = sum(r.counts.failures + r.counts.errors for r in results if r.counts)
    failed += sum(1 for r in results if not r.ok and not (r.counts and (r.counts.failures or r.counts.errors)))
    skipped = sum(r.counts.skipped for r in results if r.counts)
    return f"matrix: {passed} passed, {failed} failed, {skipped} skipped"


if __name__ == "__main__":
    sys.exit(main())

"""Host-side tests of scripts/kernel_matrix.py's pure helpers (no QEMU, no network)."""

from __future__ import annotations

import importlib.util
import lzma
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
SCRIPT = SCRIPTS / "kernel_matrix.py"


def load_script() -> ModuleType:
    if str(SCRIPTS) not in sys.path:  # kernel_matrix.py imports its sibling kernel_build.py, as when run
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location("kernel_matrix", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


km = load_script()
kb = sys.modules["kernel_build"]


def read_newc(archive: bytes) -> list[tuple[str, int, bytes]]:
    """(name, mode, data) of each entry, checking the format's 4-byte alignment on the way."""
    entries: list[tuple[str, int, bytes]] = []
    offset = 0
    while True:
        assert offset % 4 == 0
        header = archive[offset : offset + 110]
        assert header[:6] == b"070701"
        fields = [int(header[6 + 8 * index : 14 + 8 * index], 16) for index in range(13)]
        mode, size, name_size = fields[1], fields[6], fields[11]
        name_start = offset + 110
        name = archive[name_start : name_start + name_size - 1].decode()
        assert archive[name_start + name_size - 1] == 0
        data_start = name_start + name_size + (-(110 + name_size) % 4)
        data = archive[data_start : data_start + size]
        offset = data_start + size + (-size % 4)
        if name == "TRAILER!!!":
            assert offset == len(archive)
            return entries
        entries.append((name, mode, data))


def test_newc_archive_round_trips_files_directories_and_symlinks() -> None:
    archive = km.NewcArchive()
    archive.add_directory("bin")
    archive.add_file("bin/busybox", b"\x7fELF" + b"x" * 5, mode=0o755)
    archive.add_symlink("bin/sh", "busybox")
    archive.add_file("init", b"#!/bin/busybox sh\n")
    assert read_newc(archive.to_bytes()) == [
        ("bin", 0o040755, b""),
        ("bin/busybox", 0o100755, b"\x7fELF" + b"x" * 5),
        ("bin/sh", 0o120777, b"busybox"),
        ("init", 0o100644, b"#!/bin/busybox sh\n"),
    ]


def fake_module(directory: Path, relative: str, depends: str, *, compressed: bool = False) -> Path:
    """A file that looks like a module's .modinfo to the script: NUL-separated key=value strings."""
    data = b"\x7fELF\x00license=GPL\x00depends=" + depends.encode() + b"\x00name=x\x00"
    path = directory / (relative + (".ko.xz" if compressed else ".ko"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(lzma.compress(data) if compressed else data)
    return path


def test_module_dependencies_reads_modinfo() -> None:
    assert km.module_dependencies(b"\x00alias=x\x00depends=9pnet,netfs\x00vermagic=7") == ["9pnet", "netfs"]
    assert km.module_dependencies(b"\x00depends=\x00") == []
    assert km.module_dependencies(b"no modinfo") == []


def test_module_name_normalises_dashes_and_suffixes() -> None:
    assert km.module_name(Path("kernel/net/9p/9pnet_virtio.ko.xz")) == "9pnet_virtio"
    assert km.module_name(Path("kernel/arch/x86/events/intel/intel-uncore.ko")) == "intel_uncore"


def test_load_order_puts_dependencies_first_and_skips_builtins(tmp_path: Path) -> None:
    fake_module(tmp_path, "kernel/fs/9p/9p", "9pnet,netfs", compressed=True)
    fake_module(tmp_path, "kernel/net/9p/9pnet_virtio", "9pnet,virtio")
    fake_module(tmp_path, "kernel/net/9p/9pnet", "")
    fake_module(tmp_path, "kernel/fs/netfs/netfs", "")
    modules = km.index_modules(tmp_path)
    order = km.load_order(["9pnet_virtio", "9p"], modules, {"virtio", "virtio_pci"})
    assert order == ["9pnet", "9pnet_virtio", "netfs", "9p"]
    with pytest.raises(km.MatrixError):
        km.load_order(["virtio_pci"], modules, set())


def test_prune_module_tree_keeps_dependencies_and_compresses(tmp_path: Path) -> None:
    source = tmp_path / "source"
    fake_module(source, "kernel/net/tls/tls", "crypto_helper")
    fake_module(source, "kernel/drivers/misc/crypto_helper", "")
    fake_module(source, "kernel/drivers/gpu/huge", "")
    (source / "modules.builtin").write_text("kernel/crypto/aes_generic.ko\n")
    target = tmp_path / "target"
    assert km.prune_module_tree(source, target) == 2
    assert sorted(km.index_modules(target)) == ["crypto_helper", "tls"]
    tls = target / "kernel/net/tls/tls.ko.xz"
    assert km.module_dependencies(km.read_module(tls)) == ["crypto_helper"]
    assert km.builtin_module_names(target) == {"aes_generic"}


def test_apt_control_parsing_and_dependency_names() -> None:
    stanza = km.parse_control_stanza(
        "Package: linux-image-amd64\nVersion: 7.2.13-1\n"
        "Depends: linux-base-amd64 (= 7.2.13-1), linux-image-7.2.13+deb14-amd64 (= 7.2.13-1)\n"
        "Description: Linux\n more text\n\nPackage: other\n"
    )
    assert stanza["Version"] == "7.2.13-1"
    assert stanza["Description"] == "Linux\nmore text"
    assert km.dependency_names(stanza["Depends"]) == ["linux-base-amd64", "linux-image-7.2.13+deb14-amd64"]
    assert km.dependency_names("dracut | initramfs-tools (>= 0.120), kmod:any") == [
        "dracut",
        "initramfs-tools",
        "kmod",
    ]
    kernel_packages = [
        name for name in ("linux-base", "linux-base-7.3-amd64", "kmod") if km.KERNEL_PACKAGE_PATTERN.match(name)
    ]
    assert kernel_packages == ["linux-base-7.3-amd64"]


def write_junit(path: Path, tests: int, failures: int = 0, errors: int = 0, skipped: int = 0) -> Path:
    path.write_text(
        f'<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="{tests}" failures="{failures}" '
        f'errors="{errors}" skipped="{skipped}"/></testsuites>'
    )
    return path


def test_judge_requires_a_report_with_tests_and_no_failures(tmp_path: Path) -> None:
    def problem(counts: object) -> str | None:
        return km.judge("7.2", None, counts, None).problem  # type: ignore[no-any-return]

    assert problem(km.parse_junit(write_junit(tmp_path / "ok.xml", 5, skipped=1))) is None
    assert problem(km.parse_junit(write_junit(tmp_path / "failed.xml", 5, failures=1))) == "tests failed"
    assert problem(km.parse_junit(write_junit(tmp_path / "errors.xml", 5, errors=2))) == "tests failed"
    assert problem(km.parse_junit(write_junit(tmp_path / "empty.xml", 0))) == "ran no tests"
    assert km.parse_junit(tmp_path / "missing.xml") is None
    assert "no JUnit report" in str(problem(None))
    counts = km.parse_junit(write_junit(tmp_path / "mixed.xml", 7, failures=1, errors=1, skipped=2))
    assert counts.passed == 3


def test_summary_table_has_one_row_per_kernel() -> None:
    outcome = km.GuestOutcome("6.1", "6.1.0-56-amd64", 0, 12.34, False, ())
    results = [
        km.judge("6.1", outcome, km.TestCounts(3, 0, 0, 1), None),
        km.judge("7.3", None, None, "kernel download/preparation failed"),
    ]
    lines = km.summary_table(results).splitlines()
    assert lines[0].split() == ["kernel", "release", "passed", "failed", "errors", "skipped", "seconds", "result"]
    assert lines[1].split() == ["6.1", "6.1.0-56-amd64", "2", "0", "0", "1", "12.3", "ok"]
    assert lines[2].startswith("7.3")
    assert "FAIL: kernel download/preparation failed" in lines[2]


def test_kernel_selection_and_pytest_arguments() -> None:
    assert [source.label for source in km.select_kernels("")] == ["5.10", "6.1", "6.12", "7.2", "7.2-all", "7.3"]
    assert [source.label for source in km.select_kernels("7.3, 6.1,7.3")] == ["7.3", "6.1"]
    with pytest.raises(km.MatrixError):
        km.select_kernels("4.19")
    arguments, extra = km.parse_arguments(["--kernels", "7.2", "--", "-k", "probe", "--", "x"])
    assert arguments.kernels == "7.2"
    assert extra == ["-k", "probe", "--", "x"]
    command = km.pytest_command("7.2", extra)
    assert command[1:5] == ("-m", "pytest", "-m", "kernel")
    assert command[-4:] == ("-k", "probe", "--", "x")


def test_static_executable_detection(tmp_path: Path) -> None:
    # A minimal ELF64 header with no program headers: nothing to interpret, so "static".
    header = bytearray(64)
    header[:5] = b"\x7fELF\x02"
    static = tmp_path / "static"
    static.write_bytes(bytes(header))
    assert km.is_static_executable(static)
    not_elf = tmp_path / "script"
    not_elf.write_bytes(b"#!/bin/sh\n")
    assert not km.is_static_executable(not_elf)


def test_built_kernels_come_from_debian_source_packages() -> None:
    built = {source.label: source.build for source in km.KERNEL_SOURCES if source.build is not None}
    assert built.keys() == {"5.10", "7.2-all"}
    assert built["5.10"].package == "linux-source-5.10"
    assert built["7.2-all"].package == "linux-source-7.2"
    for build in built.values():
        for name in build.fragments:
            kb.wanted_options([kb.fragment_text(name)])  # every fragment parses
    assert "CONFIG_CRYPTO_ARIA" in kb.wanted_options([kb.fragment_text("all-aeads.config")])


def test_fragment_lines_that_olddefconfig_dropped_are_named() -> None:
    wanted = kb.wanted_options(['# comment\n\nCONFIG_TLS=y\nCONFIG_CRYPTO_ARIA=y\nCONFIG_LOCALVERSION="-x"\n'])
    config = 'CONFIG_TLS=y\n# CONFIG_CRYPTO_ARIA is not set\nCONFIG_LOCALVERSION="-x"\n'
    assert kb.options_not_applied(config, wanted) == ["CONFIG_CRYPTO_ARIA=y (got not set)"]
    with pytest.raises(kb.KernelBuildError):
        kb.wanted_options(["TLS=y"])


def test_configuration_digest_follows_fragments_and_compiler() -> None:
    build = kb.SourceBuild("linux-source-5.10", ("guest.config",), "-ktls")
    digest = kb.configuration_digest(build, "gcc 12")
    assert digest == kb.configuration_digest(build, "gcc 12")
    assert digest != kb.configuration_digest(build, "gcc 14")
    assert digest != kb.configuration_digest(
        kb.SourceBuild("linux-source-5.10", ("guest.config", "5.10.config"), "-ktls"), "gcc 12"
    )
    assert km.build_key("5.10.262-1", digest).rpartition("+")[2] == digest


def test_a_kernel_without_modules_gets_an_initramfs_that_loads_none(tmp_path: Path) -> None:
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF")
    (tmp_path / "modules").mkdir()
    entries = {
        name: data for name, _, data in read_newc(km.build_initramfs(tmp_path / "modules", busybox, with_modules=False))
    }
    assert entries["boot-modules/load-order"] == b""
    assert not [name for name in entries if name.endswith(".ko")]
    directory = tmp_path / "kernel"
    directory.mkdir()
    (directory / "config").write_text("CONFIG_TLS=y\n# CONFIG_MODULES is not set\n")
    assert not km.CachedKernel("5.10", directory, "5.10.262-ktls", ()).has_modules
    (directory / "config").write_text("CONFIG_MODULES=y\nCONFIG_TLS=m\n")
    assert km.CachedKernel("6.1", directory, "6.1.0-1-amd64", ()).has_modules


def test_scripts_test_installs_the_kernel_build_tools() -> None:
    """CI starts from a clean machine: scripts/test must install what kernel_build.py needs."""
    text = (SCRIPTS / "test").read_text()
    lists = [
        line.partition("(")[2].partition(")")[0] for line in text.splitlines() if line.startswith("system_packages")
    ]
    assert set(kb.BUILD_PACKAGES) <= {package for packages in lists for package in packages.split()}

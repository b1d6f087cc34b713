"""``ktls check`` and ``ktls stat``: what they print agrees with the probe, on the host and in the guests."""

from __future__ import annotations

import io
import json
import os
import socket
from pathlib import Path

import pytest

from ktls.cli import main
from ktls.constants import TLSVersion
from ktls.kernel import CIPHERS, CipherType, KernelSupport, probe

RESULTS = Path(__file__).resolve().parent.parent / ".kernel-results"


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def test_check_on_a_kernel_without_ktls_says_so() -> None:
    if probe().available:
        pytest.skip("this kernel has kTLS (covered by test_check_agrees_with_the_probe)")
    code, text = run("check")
    assert code == 1
    assert "CONFIG_TLS" in text
    assert "'tls' module" in text
    assert text.rstrip().splitlines()[-2].startswith("fix: ") or text.rstrip().splitlines()[-1].startswith("fix: ")


@pytest.mark.parametrize(
    ("module", "config", "expected"),
    [
        (True, None, "fix: sudo modprobe tls   (the module is installed"),
        (False, "# CONFIG_TLS is not set\n", "fix: none for this kernel"),
        (False, "CONFIG_TLS=m\n", "fix: sudo modprobe tls   (if this kernel"),
        (False, None, "fix: sudo modprobe tls   (if this kernel"),
    ],
)
def test_check_names_the_fix(tmp_path: Path, module: bool, config: str | None, expected: str) -> None:
    """``ktls check`` ends with the one command that would fix a fixable kernel, or says none can."""
    from ktls.cli import _kernel_fix

    release = "9.9.9-test"
    if module:
        (tmp_path / "lib" / "modules" / release / "kernel" / "net" / "tls").mkdir(parents=True)
        (tmp_path / "lib" / "modules" / release / "kernel" / "net" / "tls" / "tls.ko.xz").write_bytes(b"")
    if config is not None:
        (tmp_path / "boot").mkdir()
        (tmp_path / "boot" / f"config-{release}").write_text(config)
    assert _kernel_fix(release, tmp_path).startswith(expected)
    code, text = run("check", "--json")
    assert code == 1
    assert json.loads(text)["available"] is False
    assert run("stat")[0] == 1


@pytest.mark.kernel
def test_check_agrees_with_the_probe(support: KernelSupport) -> None:
    code, text = run("check")
    assert code == 0
    for cipher in CIPHERS.values():
        assert cipher.name in text
    for entry in support.ciphers:  # every refusal with the kernel's reason
        assert (f"  {entry.cipher.name} {entry.version.label}: {entry.error}" in text) == bool(entry.error)
    code, raw = run("check", "--json")
    assert code == 0
    report = json.loads(raw)
    assert report["available"] is True
    assert report["rekey_tx"] == support.rekey_tx
    for entry in report["ciphers"]:
        version = TLSVersion.TLS1_3 if entry["version"] == "TLSv1.3" else TLSVersion.TLS1_2
        accepted = support.supports(CipherType[entry["cipher"]], version)
        assert accepted == (entry["tx"] and entry["rx"])
    assert report["tls_stat"] is not None
    if label := os.environ.get("KTLS_GUEST"):  # keep what each kernel said, for the README and notes
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{label}.check.txt").write_text(text)
    code, stat = run("stat")
    assert code == 0
    assert "TlsCurrTxSw" in stat


def test_parse_ss_finds_tls_sockets() -> None:
    from ktls.kernel.sockets import parse_ss

    text = (
        "ESTAB 0 0 127.0.0.1:8443 127.0.0.1:50000\n"
        "\t cubic wscale:7,7 rto:204 tcp-ulp-tls version: 1.3 cipher: aes-gcm-128 rxconf: sw txconf: sw\n"
        "ESTAB 0 0 127.0.0.1:22 127.0.0.1:50001\n"
        "\t cubic wscale:7,7 rto:204\n"
    )
    (found,) = parse_ss(text)
    assert (found.local, found.peer) == ("127.0.0.1:8443", "127.0.0.1:50000")
    assert found.tls == "version: 1.3 cipher: aes-gcm-128 rxconf: sw txconf: sw"


@pytest.mark.kernel
def test_stat_lists_live_ktls_sockets(support: KernelSupport, tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    from ktls.kernel import CryptoInfo, Direction, set_crypto_info, setup_ulp

    sock, _ = tcp_pair
    setup_ulp(sock)
    info = CryptoInfo.tls13(CipherType.AES_GCM_128, bytes(16), bytes(12))
    set_crypto_info(sock, Direction.TX, info)
    set_crypto_info(sock, Direction.RX, info)
    code, text = run("stat")
    assert code == 0
    port = sock.getsockname()[1]
    line = next(line for line in text.splitlines() if f":{port} " in line)
    assert "1.3" in line
    assert "aes-gcm-128" in line

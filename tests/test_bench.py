"""``ktls bench``: tiny sizes, every workload and variant produces a row (numbers are not asserted); the ratio
columns and the issue's targets are computed from the rows, and are ``n/a`` where rows are missing."""

from __future__ import annotations

import io
import json

import pytest

from ktls import bench
from ktls.cli import main
from ktls.kernel import KernelSupport, probe

ASYNCIO_ROWS = [
    ("bulk", bench.ASYNCIO_SSL),
    ("bulk", bench.KTLS_ASYNCIO),
    ("file", bench.ASYNCIO_SSL_SENDFILE),
    ("file", bench.KTLS_SENDFILE),
]


@pytest.fixture(scope="module")
def smoke() -> list[bench.BenchResult]:
    return bench.run(size_mib=1, seconds=0.1, connections=3)


def _label(variant: str, kernel: bool) -> str:
    """What ``run`` calls a ktls variant on this machine (stdlib variants are never relabelled)."""
    return variant if kernel or not variant.startswith("ktls") else variant + bench.FALLBACK


def _columns(table: str, workload: str, variant: str) -> list[str]:
    """The cells after the variant on ``table``'s line for that row."""
    for line in table.splitlines():
        if line.startswith(workload) and line[11:].startswith(variant + " "):
            return line[11 + len(variant) :].split()
    raise AssertionError(f"no row {workload} / {variant} in\n{table}")


def test_bench_runs_every_workload(smoke: list[bench.BenchResult]) -> None:
    workloads = {r.workload for r in smoke}
    assert {"bulk", "file", "rr", "handshake", "idle"} <= workloads
    assert all(r.value >= 0 for r in smoke if r.workload != "idle")  # idle is an RSS difference: may be noise
    table = bench.format_table(smoke)
    assert "plain TCP" in table
    assert "×ssl" in table
    assert "×limit" in table


def test_bench_has_the_asyncio_rows(smoke: list[bench.BenchResult]) -> None:
    kernel = probe().available
    rows = {(r.workload, r.variant): r for r in smoke}
    for workload, variant in ASYNCIO_ROWS:
        row = rows.get((workload, _label(variant, kernel)))
        assert row is not None, (workload, variant, sorted(rows))
        assert row.value > 0
        assert row.cpu_per_gib is not None
    if not kernel:
        assert not any(r.workload == "limit" for r in smoke)
        assert all(r.variant.endswith(bench.FALLBACK) for r in smoke if r.variant.startswith("ktls"))


def test_targets_without_kernel_rows_are_not_available() -> None:
    rows = [
        bench.BenchResult("bulk", bench.SSL, 10.0, "MiB/s"),
        bench.BenchResult("bulk", bench.KTLS + bench.FALLBACK, 12.0, "MiB/s"),
        bench.BenchResult("rr", bench.SSL, 100.0, "round trips/s"),
    ]
    measured = bench.targets(rows)
    assert [t.name for t in measured] == [name for name, *_ in bench.TARGETS]
    assert all(t.value is None and t.met is None for t in measured)
    assert "n/a" in bench.format_targets(measured)


def test_targets_and_limit_column_from_rows() -> None:
    rows = [
        bench.BenchResult("bulk", bench.PLAIN, 40.0, "MiB/s", 1.0),
        bench.BenchResult("bulk", bench.KTLS, 19.0, "MiB/s", 2.0),
        bench.BenchResult("bulk", bench.KTLS_ASYNCIO, 10.0, "MiB/s", 2.0),
        bench.BenchResult("file", bench.ASYNCIO_SSL_SENDFILE, 5.0, "MiB/s", 2.0),
        bench.BenchResult("file", bench.KTLS_SENDFILE, 20.0, "MiB/s", 2.0),
        bench.BenchResult("limit", bench.LIMIT, 20.0, "MiB/s", 2.0),
        bench.BenchResult("handshake", bench.SSL, 30.0, "connections/s"),
        bench.BenchResult("handshake", bench.KTLS, 27.0, "connections/s"),
    ]
    measured = {t.name: t for t in bench.targets(rows)}
    assert measured["ktls bulk ÷ limit"].value == pytest.approx(0.95)
    assert measured["ktls bulk ÷ limit"].met
    assert measured["ktls asyncio bulk ÷ ktls bulk"].value == pytest.approx(10 / 19)
    assert measured["ktls asyncio bulk ÷ ktls bulk"].met is False
    assert measured["ktls loop.sendfile ÷ asyncio SSL loop.sendfile"].met
    assert measured["ktls loop.sendfile ÷ limit"].met
    assert measured["ktls handshake ÷ ssl handshake"].met
    assert measured["ktls rr ÷ ssl rr"].value is None  # no rr rows
    table = bench.format_table(rows)
    assert _columns(table, "bulk", bench.PLAIN)[-1] == "2.00"  # ×limit
    assert _columns(table, "bulk", bench.KTLS_ASYNCIO)[-3:] == ["0.25", "-", "0.50"]  # ×TCP, ×ssl, ×limit
    assert _columns(table, "handshake", bench.KTLS)[-1] == "-"  # not a transfer


def test_bench_json() -> None:
    out = io.StringIO()
    assert main(["bench", "--size", "1", "--seconds", "0.1", "--connections", "2", "--json"], out=out) == 0
    report = json.loads(out.getvalue())
    assert report["results"]
    targets = report["targets"]
    assert [t["name"] for t in targets] == [name for name, *_ in bench.TARGETS]
    assert all(set(t) == {"name", "value", "target", "met"} for t in targets)
    if not report["ktls"]:
        assert all(t["value"] is None and t["met"] is None for t in targets)


@pytest.mark.kernel
def test_bench_in_a_ktls_kernel_measures_the_limit(support: KernelSupport, smoke: list[bench.BenchResult]) -> None:
    rows = {(r.workload, r.variant) for r in smoke}
    assert ("limit", bench.LIMIT) in rows
    assert ("bulk", bench.KTLS) in rows
    for row in ASYNCIO_ROWS:
        assert row in rows, (row, sorted(rows))  # the kernel labels: no "(fallback …)"
    assert not any("fallback" in variant for _, variant in rows)
    file_rows = {r.variant: r for r in smoke if r.workload == "file"}
    assert file_rows[bench.KTLS_SENDFILE].note == "sendfile (native)"
    table = bench.format_table(smoke)
    for workload, variant in [("bulk", bench.KTLS), *ASYNCIO_ROWS]:
        assert _columns(table, workload, variant)[-1] != "-", table  # ×limit filled
    measured = bench.targets(smoke)
    assert all(t.value is not None and t.met is not None for t in measured), measured

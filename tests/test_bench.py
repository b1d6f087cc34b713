"""``ktls bench`` smoke test: tiny sizes, every workload produces a row (numbers are not asserted)."""

from __future__ import annotations

import io
import json

import pytest

from ktls import bench
from ktls.cli import main


def _smoke() -> list[bench.BenchResult]:
    return bench.run(size_mib=1, seconds=0.1, connections=3)


def test_bench_runs_every_workload() -> None:
    results = _smoke()
    workloads = {r.workload for r in results}
    assert {"bulk", "file", "rr", "handshake", "idle"} <= workloads
    assert all(r.value >= 0 for r in results)
    table = bench.format_table(results)
    assert "plain TCP" in table
    assert "×ssl" in table


def test_bench_json() -> None:
    out = io.StringIO()
    assert main(["bench", "--size", "1", "--seconds", "0.1", "--connections", "2", "--json"], out=out) == 0
    report = json.loads(out.getvalue())
    assert report["results"]


@pytest.mark.kernel
def test_bench_in_a_ktls_kernel_measures_the_limit() -> None:
    results = _smoke()
    assert any(r.workload == "limit" for r in results)
    assert any(r.variant == "ktls" for r in results)

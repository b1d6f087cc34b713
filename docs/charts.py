"""A Sphinx extension that draws the benchmark charts from ``ktls bench --json`` output (``docs/bench/*.json``)
into ``docs/_generated/``, where ``benchmarks.rst`` shows them: throughput and CPU per GiB of every variant,
and the ratios against ``ssl`` and against the kernel's own limit (raw kTLS ``sendfile``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = Path(__file__).parent


def _rows(run: dict[str, Any], workload: str) -> list[dict[str, Any]]:
    return [row for row in run["results"] if row["workload"] == workload]


def _bar_chart(rows: list[dict[str, Any]], key: str, label: str, title: str, out: Path) -> None:
    figure, axes = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    names = [row["variant"] for row in rows]
    values = [row.get(key) or 0.0 for row in rows]
    axes.barh(names, values, color="#4c72b0")
    axes.invert_yaxis()
    axes.set_xlabel(label)
    axes.set_title(title)
    for index, value in enumerate(values):
        axes.text(value, index, f" {value:.3g}", va="center", fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


def draw(app: Any) -> None:
    generated = HERE / "_generated"
    generated.mkdir(exist_ok=True)
    for source in sorted((HERE / "bench").glob("*.json")):
        run = json.loads(source.read_text())
        stem = source.stem
        for workload in ("bulk", "file"):
            rows = _rows(run, workload)
            title = f"{workload}: {run.get('kernel', '?')}, emulated (TCG)"
            _bar_chart(rows, "value", "MiB/s", title, generated / f"{stem}-{workload}-throughput.png")
            cpu = generated / f"{stem}-{workload}-cpu.png"
            _bar_chart(rows, "cpu_per_gib", "CPU seconds per GiB (both ends)", title, cpu)
        targets = run.get("targets", [])
        figure, axes = plt.subplots(figsize=(8, 0.45 * len(targets) + 1.2))
        names = [target["name"] for target in targets]
        measured = [target["value"] or 0.0 for target in targets]
        axes.barh(names, measured, color="#55a868", label="measured")
        axes.scatter([target["target"] for target in targets], names, color="#c44e52", marker="|", s=300, label="goal")
        axes.invert_yaxis()
        axes.set_xlabel("ratio")
        axes.legend(loc="lower right")
        axes.set_title("ratios against ssl and the raw-kTLS limit")
        figure.tight_layout()
        figure.savefig(generated / f"{stem}-ratios.png", dpi=100)
        plt.close(figure)


def setup(app: Any) -> dict[str, Any]:
    app.connect("builder-inited", draw)
    return {"parallel_read_safe": True}

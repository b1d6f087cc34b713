"""``ktls bench``: tiny sizes, every workload and variant produces a row (numbers are not asserted); the ratio
columns and the issue's targets are computed from the rows, and are ``n/a`` where rows are missing."""

from __future__ import annotations

import io
import json
import os
import socket
from pathlib import Path

import pytest

from ktls import bench
from ktls.bench_raw import RawKeying
from ktls.cli import main
from ktls.kernel import Direction, KernelSupport, get_crypto_info, probe

ASYNCIO_ROWS = [
    ("bulk", bench.ASYNCIO_SSL),
    ("bulk", bench.KTLS_ASYNCIO),
    ("file", bench.ASYNCIO_SSL_SENDFILE),
    ("file", bench.KTLS_SENDFILE),
]

#: The raw kTLS rows a kTLS kernel gives, and the ktls rows measured against them.
RAW_ROWS = [
    ("bulk", bench.RAW),
    ("bulk", bench.RAW_ASYNCIO),
    ("file", bench.RAW),
    ("file", bench.RAW_SENDFILE),
    ("rr", bench.RAW),
    ("handshake", bench.RAW),
]
KTLS_WITH_RAW = [
    ("bulk", bench.KTLS),
    ("bulk", bench.KTLS_NO_PAD),
    ("bulk", bench.KTLS_ASYNCIO),
    ("file", bench.KTLS),
    ("file", bench.KTLS_SENDFILE),
    ("rr", bench.KTLS),
    ("handshake", bench.KTLS),
]


@pytest.fixture(scope="module")
def smoke() -> list[bench.BenchResult]:
    return bench.run(size_mib=1, seconds=0.1, connections=3)


@pytest.fixture(scope="module")
def smoke_scale() -> list[bench.BenchResult]:
    return bench.run(size_mib=1, seconds=0.2, connections=2, scale=True, rate=50.0, scale_connections=(1, 2))


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
    assert "×raw" in table


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
    assert _columns(table, "bulk", bench.KTLS_ASYNCIO)[-4:] == ["0.25", "-", "-", "0.50"]  # ×TCP ×ssl ×raw ×limit
    assert _columns(table, "handshake", bench.KTLS)[-1] == "-"  # not a transfer


def test_raw_column_and_targets_from_rows() -> None:
    """``×raw``: each ktls row ÷ its raw kTLS counterpart in the same workload; nothing for other rows, for
    the raw rows themselves, or for fallback rows (no raw row is ever measured without kTLS)."""
    rows = [
        bench.BenchResult("bulk", bench.SSL, 12.0, "MiB/s", 2.0),
        bench.BenchResult("bulk", bench.KTLS, 18.0, "MiB/s", 2.0),
        bench.BenchResult("bulk", bench.RAW, 20.0, "MiB/s", 2.0),
        bench.BenchResult("bulk", bench.KTLS_NO_PAD, 19.0, "MiB/s", 2.0),
        bench.BenchResult("bulk", bench.KTLS_ASYNCIO, 15.0, "MiB/s", 2.0),
        bench.BenchResult("bulk", bench.RAW_ASYNCIO, 15.0, "MiB/s", 2.0),
        bench.BenchResult("file", bench.KTLS_SENDFILE, 8.0, "MiB/s", 2.0),
        bench.BenchResult("file", bench.RAW_SENDFILE, 10.0, "MiB/s", 2.0),
        bench.BenchResult("file", bench.KTLS + bench.FALLBACK, 10.0, "MiB/s", 2.0),
        bench.BenchResult("rr", bench.KTLS, 330.0, "round trips/s"),
        bench.BenchResult("rr", bench.RAW, 400.0, "round trips/s"),
        bench.BenchResult("handshake", bench.KTLS, 18.0, "connections/s"),
        bench.BenchResult("handshake", bench.RAW, 20.0, "connections/s"),
        bench.BenchResult("scale 10", bench.KTLS_ASYNCIO, 9.0, "MiB/s", 3.0),
        bench.BenchResult("scale 10", bench.RAW_ASYNCIO, 10.0, "MiB/s", 3.0),
        bench.BenchResult("rr p99", bench.KTLS, 6.0, "ms"),
        bench.BenchResult("rr p99", bench.RAW, 4.0, "ms"),
    ]
    by_row = {(r.workload, r.variant): ratio["raw"] for r, ratio in zip(rows, bench.ratios(rows), strict=True)}
    assert by_row[("bulk", bench.KTLS)] == pytest.approx(0.9)
    assert by_row[("bulk", bench.KTLS_NO_PAD)] == pytest.approx(0.95)
    assert by_row[("bulk", bench.KTLS_ASYNCIO)] == pytest.approx(1.0)
    assert by_row[("file", bench.KTLS_SENDFILE)] == pytest.approx(0.8)
    assert by_row[("rr", bench.KTLS)] == pytest.approx(0.825)
    assert by_row[("handshake", bench.KTLS)] == pytest.approx(0.9)
    assert by_row[("scale 10", bench.KTLS_ASYNCIO)] == pytest.approx(0.9)
    assert by_row[("rr p99", bench.KTLS)] == pytest.approx(1.5)  # latency: above 1 is slower
    for key in [("bulk", bench.SSL), ("bulk", bench.RAW), ("file", bench.KTLS + bench.FALLBACK)]:
        assert by_row[key] is None, key
    table = bench.format_table(rows)
    header = table.splitlines()[0].split()
    assert header[-4:] == ["×TCP", "×ssl", "×raw", "×limit"]
    assert _columns(table, "bulk", bench.KTLS)[-4:] == ["-", "1.50", "0.90", "-"]
    assert _columns(table, "handshake", bench.KTLS)[-2:] == ["0.90", "-"]
    assert _columns(table, "bulk", bench.RAW)[-2] == "-"
    measured = {t.name: t for t in bench.targets(rows)}
    assert measured["ktls bulk ÷ raw"].value == pytest.approx(0.9)
    assert measured["ktls bulk ÷ raw"].met is False
    assert measured["ktls asyncio bulk ÷ raw asyncio"].met
    assert measured["ktls loop.sendfile ÷ raw"].met is False
    assert measured["ktls file ÷ raw"].value is None  # the fallback row is not ktls
    assert measured["ktls rr ÷ raw"].value == pytest.approx(0.825)
    assert measured["ktls handshake ÷ raw floor"].value == pytest.approx(0.9)
    assert measured["ktls handshake ÷ raw floor"].met


@pytest.mark.parametrize(
    ("values", "fraction", "expected"),
    [
        ([1.0], 0.99, 1.0),
        ([1.0, 2.0], 0.5, 1.0),
        ([1.0, 2.0, 3.0], 0.5, 2.0),
        ([float(i) for i in range(1, 101)], 0.99, 99.0),
    ],
)
def test_percentile_is_nearest_rank(values: list[float], fraction: float, expected: float) -> None:
    assert bench._percentile(values, fraction) == expected


def test_scale_rows(smoke_scale: list[bench.BenchResult]) -> None:
    """``--scale``: every count of connections gets a sync and an asyncio row of each stack, and ssl, ktls
    (and raw kTLS with a kernel) get p50/p99 latency rows."""
    kernel = probe().available
    rows = {(r.workload, r.variant): r for r in smoke_scale}
    sync = [bench.SSL, _label(bench.KTLS, kernel)] + ([bench.RAW] if kernel else [])
    asynchronous = [bench.ASYNCIO_SSL, _label(bench.KTLS_ASYNCIO, kernel)] + ([bench.RAW_ASYNCIO] if kernel else [])
    for count in (1, 2):
        for variant in sync + asynchronous:
            row = rows.get((f"scale {count}", variant))
            assert row is not None, (count, variant, sorted(rows))
            assert row.value > 0
            assert row.cpu_per_gib is not None
    for variant in sync:
        p50, p99 = rows[("rr p50", variant)], rows[("rr p99", variant)]
        assert p50.unit == p99.unit == "ms"
        assert 0 < p50.value <= p99.value


def test_bench_json() -> None:
    out = io.StringIO()
    assert main(["bench", "--size", "1", "--seconds", "0.1", "--connections", "2", "--json"], out=out) == 0
    report = json.loads(out.getvalue())
    assert report["results"]
    assert all(set(r["ratios"]) == {"tcp", "ssl", "raw", "limit"} for r in report["results"])
    if report["ktls"]:
        by_row = {(r["workload"], r["variant"]): r for r in report["results"]}
        assert by_row[("bulk", bench.KTLS)]["ratios"]["raw"] is not None
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
    for row in RAW_ROWS:
        assert row in rows, (row, sorted(rows))
    table = bench.format_table(smoke)
    for workload, variant in [("bulk", bench.KTLS), *ASYNCIO_ROWS]:
        assert _columns(table, workload, variant)[-1] != "-", table  # ×limit filled
    for workload, variant in KTLS_WITH_RAW:
        assert _columns(table, workload, variant)[-2] != "-", table  # ×raw filled
    measured = bench.targets(smoke)
    assert all(t.value is not None and t.met is not None for t in measured), measured


@pytest.mark.kernel
def test_raw_pairs_are_keyed_both_ways(support: KernelSupport, tmp_path: Path) -> None:
    """The raw rows' sockets, keyed from the key log with ``ktls.kernel`` alone: each direction opens the
    other's records (a wrong key or sequence number is ``EBADMSG``), the client's kernel has read the server's
    tickets, and a second pair reads only its own key-log lines."""
    connect = bench._raw(RawKeying(*bench._contexts(), tmp_path / "raw.keylog"))
    for _ in range(2):
        client, server = connect()
        try:
            request, response = os.urandom(40_000), os.urandom(1024)
            client.sendall(request)
            assert _receive(server, len(request)) == request
            server.sendall(response)
            assert _receive(client, len(response)) == response
            client_rx, server_tx = get_crypto_info(client, Direction.RX), get_crypto_info(server, Direction.TX)
            assert client_rx is not None
            assert server_tx is not None
            assert client_rx.rec_seq == server_tx.rec_seq >= 2  # the tickets, then the response
        finally:
            bench._close_pair(client, server)


def _receive(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk
        data += chunk
    return bytes(data)


def test_receiver_stops_after_its_loop_ended() -> None:
    """A receiving loop whose work ends on its own (the raw receiver) has closed its loop by the time the
    sender stops it: stopping then is not an error (it was, and failed every raw asyncio row)."""
    receiver = bench._Receiver(total=1)

    async def ends_at_once() -> None:
        receiver.count(1)

    receiver.start(ends_at_once)
    receiver.wait(receiver.done)
    receiver._thread.join(5)  # type: ignore[union-attr]
    receiver.stop()
    assert receiver.error is None

"""The InfluxDB sink: batching + spool against go-ml's one request per point, and the spool's write rate.

Both servers are the real ones the tests use (InfluxDB 1.6.7 over v1 /write, VictoriaMetrics over
v2 through influxdb-client's batching WriteApi), started on loopback in a temp dir. Each way
writes the same N heuristic_score points (11 fields each, ~300 bytes of line protocol) under its
own run id; the time runs from the first write until the server has acknowledged the last point,
and every point is checked on the server afterwards.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench._common import Row, table

GROUP = "sink"


def _points(run_id: str, n: int):
    from evaluators.sinks import HEURISTIC_SUBSCORES, PointContext, heuristic_score

    ctx = PointContext(model="smol", run_id=run_id, label="G27 @0001000", iteration=1000)
    subs = {k: i for i, k in enumerate(HEURISTIC_SUBSCORES)}
    return [heuristic_score(ctx, "bench", f"probe-{i:06d}", subs, (i % 100) / 100) for i in range(n)]


def _per_request(url: str, path: str, params: dict, points) -> float:
    """go-ml's way: one POST per point, sequentially. Returns points/s."""
    from evaluators.sinks import to_line

    with httpx.Client(timeout=10) as c:
        t0 = time.perf_counter()
        for p in points:
            r = c.post(url + path, params=params, content=to_line(p).encode())
            r.raise_for_status()
        return len(points) / (time.perf_counter() - t0)


def _batched_posts(url: str, path: str, params: dict, points, size: int) -> float:
    """Plain httpx POSTs of `size` points each: the server's ceiling without the sink. Returns points/s."""
    from evaluators.sinks import to_lines

    with httpx.Client(timeout=30) as c:
        t0 = time.perf_counter()
        lines = to_lines(points)
        for i in range(0, len(lines), size):
            c.post(url + path, params=params, content="\n".join(lines[i:i + size]).encode()).raise_for_status()
        return len(points) / (time.perf_counter() - t0)


def _through_sink(cfg, spool: Path, points, chunk: int) -> float:
    """InfluxSink: write() in chunks of `chunk` points, then flush until acknowledged. Returns points/s."""
    from evaluators.sinks import InfluxSink

    sink = InfluxSink(cfg, spool)
    try:
        deadline = time.monotonic() + 30
        while sink.protocol is None:  # start-up (/ping, client) is paid once per run, not per point
            assert time.monotonic() < deadline, sink.stats
            time.sleep(0.005)
        t0 = time.perf_counter()
        for i in range(0, len(points), chunk):
            sink.write(points[i:i + chunk])
        assert sink.flush(timeout=300), sink.stats
        dt = time.perf_counter() - t0
        assert sink.stats.sent == len(points), sink.stats
    finally:
        sink.close()
    return len(points) / dt


def _spool_rate(d: Path, points, chunk: int) -> float:
    """Spool.append (encode + write + fdatasync) alone. Returns points/s."""
    from evaluators.sinks import to_lines
    from evaluators.sinks._spool import Spool

    lines = to_lines(points)
    sp = Spool(d, 1 << 34)
    t0 = time.perf_counter()
    for i in range(0, len(lines), chunk):
        sp.append(lines[i:i + chunk])
    dt = time.perf_counter() - t0
    sp.close()
    return len(lines) / dt


def _spool_rate_threads(d: Path, points, threads: int) -> float:
    """Spool appends of 1 point from `threads` threads at once (they share fsyncs). Returns points/s."""
    import threading

    from evaluators.sinks import to_lines
    from evaluators.sinks._spool import Spool

    lines = to_lines(points)
    sp = Spool(d, 1 << 34)

    def work(part: list[str]) -> None:
        for ln in part:
            sp.sync(sp.append([ln], sync=False))

    ts = [threading.Thread(target=work, args=(lines[k::threads],)) for k in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    dt = time.perf_counter() - t0
    sp.close()
    return len(lines) / dt


def _influx_count(influx, run_id: str) -> int:
    res = influx.query(f"SELECT count(\"lek_score\") FROM heuristic_score WHERE run_id = '{run_id}'", db="bench")
    return res["results"][0]["series"][0]["values"][0][1]


def _vm_count(vm, run_id: str) -> int:
    return sum(len(s["values"]) for s in vm.export(f'{{__name__="heuristic_score_lek_score",run_id="{run_id}"}}'))


def run(quick: bool = False) -> list[Row]:
    """Measure; see the module docstring.

    Args:
        quick: fewer points (a smoke run).
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from _servers import InfluxV1, VictoriaMetrics

    from cluster.config import InfluxConfig
    from evaluators.sinks import to_lines

    n = 300 if quick else 3000
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-sink-") as tmp:
        root = Path(tmp)
        influx = InfluxV1(root / "influxdb").start()
        vm = VictoriaMetrics(root / "vm").start()
        try:
            influx.create_database("bench")
            v1 = InfluxConfig(url=influx.url, database="bench", token_env=None, batch_size=500, flush_interval_ms=100)
            v2 = InfluxConfig(url=vm.url, protocol="v2", bucket="bench", org="bench", token_env=None,
                              batch_size=500, flush_interval_ms=100)

            # The spool alone (how fast write() can take points durably) and serialising alone, for the notes.
            pts = _points("spool", n)
            one = statistics.median(_spool_rate(root / f"sp1-{k}", pts, 1) for k in range(3))
            hundred = statistics.median(_spool_rate(root / f"sp100-{k}", pts, 100) for k in range(3))
            four = statistics.median(_spool_rate_threads(root / f"spt-{k}", pts, 4) for k in range(3))
            t0 = time.perf_counter()
            to_lines(pts)
            ser_us = (time.perf_counter() - t0) / n * 1e6
            fsync_ms = 1000 / one

            # InfluxDB 1.6.7, v1 /write
            goml = _per_request(influx.url, "/write", {"db": "bench", "precision": "ns"}, _points("goml", n))
            raw = _batched_posts(influx.url, "/write", {"db": "bench", "precision": "ns"}, _points("raw", n), 500)
            per_point = _through_sink(v1, root / "s1", _points("sink1", n), 1)
            chunked = _through_sink(v1, root / "s2", _points("sink100", n), 100)
            for run_id in ("goml", "raw", "sink1", "sink100"):
                assert _influx_count(influx, run_id) == n, run_id
            rows += [
                Row(GROUP, "InfluxDB 1.6.7: one request per point (go-ml)", goml, "points/s",
                    note="sequential POST /write per point: an HTTP round trip and InfluxDB's WAL write each"),
                Row(GROUP, "InfluxDB 1.6.7: InfluxSink v1, write() per point", per_point, "points/s", per_point / goml,
                    "one request per point", f"each write() waits for the spool's fdatasync ({fsync_ms:.1f} ms in "
                    "this run); batches of 500 go out meanwhile, so the fsync per call is what bounds it"),
                Row(GROUP, "InfluxDB 1.6.7: InfluxSink v1, write() of 100 points", chunked, "points/s", chunked / goml,
                    "one request per point", f"serialising ({ser_us:.0f} us/point) and InfluxDB's ingest "
                    f"(raw 500-point POSTs, no spool: {raw:,.0f} points/s) take the time; sink/raw = {chunked / raw:.2f}"),
                Row(GROUP, "InfluxDB 1.6.7: raw POSTs of 500 points (no spool, no retries)", raw, "points/s", raw / goml,
                    "one request per point", "the server's ceiling here, for context"),
            ]

            # VictoriaMetrics, v2 through influxdb-client's batching WriteApi
            goml_vm = _per_request(vm.url, "/api/v2/write", {"org": "bench", "bucket": "bench", "precision": "ns"},
                                   _points("goml", n))
            vm_sink = _through_sink(v2, root / "s3", _points("sink1", n), 1)
            vm_chunked = _through_sink(v2, root / "s4", _points("sink100", n), 100)
            for run_id in ("goml", "sink1", "sink100"):
                assert _vm_count(vm, run_id) == n, run_id
            rows += [
                Row(GROUP, "VictoriaMetrics: one request per point (go-ml)", goml_vm, "points/s",
                    note="sequential POST /api/v2/write per point"),
                Row(GROUP, "VictoriaMetrics: InfluxSink v2 (WriteApi), write() per point", vm_sink, "points/s",
                    vm_sink / goml_vm, "one request per point", "the spool's fdatasync per write() bounds it"),
                Row(GROUP, "VictoriaMetrics: InfluxSink v2 (WriteApi), write() of 100 points", vm_chunked, "points/s",
                    vm_chunked / goml_vm, "one request per point",
                    "includes up to one flush interval (100 ms) for the WriteApi's last batch (it has no flush())"),
            ]
            rows += [
                Row(GROUP, "spool append, 1 point per write", one, "points/s", one / goml,
                    "InfluxDB one request per point", "durable (fdatasync) before write() returns; ~all of it is the fsync"),
                Row(GROUP, "spool append, 1 point per write, 4 threads", four, "points/s", four / one,
                    "1 point per write, 1 thread", "concurrent writers share an fdatasync (group commit)"),
                Row(GROUP, "spool append, 100 points per write", hundred, "points/s", hundred / one,
                    "1 point per write", "one fdatasync per 100 points; encoding and the crc are the rest"),
            ]
        finally:
            influx.stop()
            vm.stop()
    return rows


if __name__ == "__main__":
    print(table(run(quick="--quick" in sys.argv)))

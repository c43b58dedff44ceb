"""InfluxSink against the real servers: InfluxDB 1.6.7 (v1 /write) and VictoriaMetrics (v2 through
influxdb-client's batching WriteApi). Round trips with exact tags, fields, types and timestamps;
an outage in the middle of a stream; a writer killed with SIGKILL; several writers; a wrong token;
a missing database; invalid points; the spool's bound; `evalcluster influx check|replay`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cluster.config import InfluxConfig
from evaluators.sinks import (
    EPOCH_BASE,
    InfluxSink,
    Point,
    PointContext,
    SpoolFull,
    capability_judge,
    capability_scores,
    content_scores,
    eval_progress,
    exact_match,
    heuristic_score,
    judge_scores,
    probe_scores,
    replay_spool,
    score_summary,
    spool_status,
)
from evaluators.sinks._transport import V1Writer, V2Writer

pytestmark = pytest.mark.tsdb

ROOT = Path(__file__).resolve().parent.parent
DB = "evals"
S = 1_000_000_000


def _cfg(server, **kw) -> InfluxConfig:
    """Small batches and short backoffs so outages are noticed and healed quickly."""
    base = dict(url=server.url, token_env=None, batch_size=20, flush_interval_ms=50, max_retries=2,
                retry_interval_ms=50, max_retry_delay_ms=300, timeout_s=3)
    if type(server).__name__ == "VictoriaMetrics":
        base.update(protocol="v2", bucket="evals", org="evalcluster")
    else:
        base.update(database=DB)
    base.update(kw)
    return InfluxConfig(**base)


def _stream_point(i: int, t: int | None = None) -> Point:
    return Point("stream", {"run": "run 1,a=b"}, {"seq": i, "half": i / 2}, t if t is not None else (EPOCH_BASE + i) * S)


def _influx_rows(server, q: str, **kw) -> list[dict]:
    res = server.query(q, db=DB)["results"][0]
    out = []
    for series in res.get("series", []):
        for row in series["values"]:
            out.append(dict(zip(series["columns"], row)) | {"_measurement": series["name"], **series.get("tags", {})})
    return out


def _stored_seqs(server) -> list[int]:
    if type(server).__name__ == "VictoriaMetrics":
        rows = server.export('{__name__="stream_seq"}')
        return sorted(int(v) for r in rows for v in r["values"])
    return sorted(r["seq"] for r in _influx_rows(server, "SELECT seq FROM stream"))


def _influx_points_received(server) -> int:
    stats = httpx.get(server.url + "/debug/vars", timeout=5).json()
    return sum(v["values"]["pointsWrittenOK"] for k, v in stats.items() if k.startswith("httpd"))


def _points_received(server) -> int:
    """Points the server has taken in since it started (its counters restart with it): InfluxDB's
    pointsWrittenOK, VictoriaMetrics' influx lines parsed. Unlike what it stores, this counts a
    point sent twice twice."""
    if type(server).__name__ == "VictoriaMetrics":
        text = httpx.get(server.url + "/metrics", timeout=5).text
        return int(next(float(ln.split()[-1]) for ln in text.splitlines()
                        if ln.startswith('vm_protoparser_rows_read_total{type="influx"}')))
    return _influx_points_received(server)


def _wait(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def influx(influxdb):
    influxdb.create_database(DB)
    return influxdb


@pytest.fixture(params=["influxdb", "victoriametrics"])
def server(request):
    s = request.getfixturevalue(request.param)
    if request.param == "influxdb":
        s.create_database(DB)
    return s


# --------------------------------------------------------------------------- round trips


def _all_points() -> list[Point]:
    ctx = PointContext(model="smol lm2", run_id="lek-capability-G27,v=2", label="G27 @0001000", iteration=1000)
    ids = ["p1", "p 2", "p,3"]
    return [
        Point("raw", {"label": "G27 @0001000", "commas": "a,b,c", "equals": "x=y=z", "spaces": "a b  c",
                      "all": "a b,c=d", "slash": "a\\b", "uni": "ünï ☃"},
              {"f": 0.1, "big": 1e16, "tiny": 1.5e-07, "neg": -42, "i64": 2**63 - 1, "yes": True, "no": False,
               "s": 'quote " and \\ backslash, comma=equals'},
              1_739_577_600_123_456_789),
        *capability_scores(ctx, {"maths & logic": (3, 4), "a,b=c": (1, 3)}),
        *probe_scores(ctx, {i: n % 2 == 0 for n, i in enumerate(ids)}),
        capability_judge(ctx, "p 2", "maths & logic", 7.25, 8, 6.5, ids),
        *content_scores(ctx, "p,3", {"ccp_compliance": 4, "truth_telling": 5}, ids),
        heuristic_score(ctx, "capability", "p1", {"compliance_markers": 2, "degeneration": 0}, 0.4375),
        exact_match(ctx, "gsm8k", "q 7", correct=True),
        *judge_scores(ctx, "truthfulqa", "q 1", "truthfulqa", {"truthfulness": 4, "informativeness": 3}, judge="smol"),
        score_summary(ctx, "capability", "lek-1", "lek_score", 0.41, n=22, failed=1),
        eval_progress(ctx, done=22, total=23, failed=1, probe_set="capability"),
    ]


def test_v1_round_trip_exact(influx, tmp_path):
    written = _all_points()
    with InfluxSink(_cfg(influx, batch_size=5), tmp_path / "spool") as sink:
        sink.write(written)
        assert sink.flush(timeout=30)
        assert isinstance(sink._writer, V1Writer) and sink.protocol == "v1"
        assert "X-Influxdb-Version 1.6.7" in sink.detected.reason
        assert sink.stats.sent == len(written) and sink.stats.pending == 0
    # Read every measurement back with InfluxQL and rebuild the points, typed by SHOW FIELD KEYS.
    back: set = set()
    for m in sorted({p.measurement for p in written}):
        tag_keys = {r["tagKey"] for r in _influx_rows(influx, f'SHOW TAG KEYS FROM "{m}"')}
        types = {r["fieldKey"]: r["fieldType"] for r in _influx_rows(influx, f'SHOW FIELD KEYS FROM "{m}"')}
        conv = {"float": float, "integer": int, "boolean": bool, "string": str}
        for row in _influx_rows(influx, f'SELECT * FROM "{m}"'):
            tags = tuple(sorted((k, row[k]) for k in tag_keys if row.get(k) is not None))
            fields = tuple(sorted((k, conv[types[k]](row[k])) for k in types if row.get(k) is not None))
            back.add((m, tags, fields, row["time"]))
    want = {(p.measurement, tuple(sorted((k, v) for k, v in p.tags.items() if v)), tuple(sorted(p.fields.items())),
             p.time_ns) for p in written}
    assert back == want
    types = {r["fieldKey"]: r["fieldType"] for r in _influx_rows(influx, 'SHOW FIELD KEYS FROM "raw"')}
    assert types == {"f": "float", "big": "float", "tiny": "float", "neg": "integer", "i64": "integer",
                     "yes": "boolean", "no": "boolean", "s": "string"}


def test_v2_round_trip_exact_on_victoriametrics(victoriametrics, tmp_path):
    written = [p for p in _all_points() if p.measurement != "raw"] + [
        Point("raw", {"all": "a b,c=d", "spaces": "a b  c", "equals": "x=y", "commas": "a,b"},
              {"f": 0.1, "neg": -42, "yes": True, "no": False}, 1_739_577_600_123_000_000),
    ]
    with InfluxSink(_cfg(victoriametrics, batch_size=7), tmp_path / "spool") as sink:
        sink.write(written)
        assert sink.flush(timeout=30)
        assert isinstance(sink._writer, V2Writer)  # influxdb-client's batching WriteApi
        assert sink.stats.sent == len(written)
    # VictoriaMetrics: one series per numeric field, `<measurement>_<field>`, ms timestamps, bools as 1/0.
    got = {}
    for series in victoriametrics.export():
        labels = dict(series["metric"])
        name = labels.pop("__name__")
        for v, t in zip(series["values"], series["timestamps"]):
            got[(name, tuple(sorted(labels.items())), t)] = v
    want = {}
    for p in written:
        tags = tuple(sorted((k, v) for k, v in p.tags.items() if v))
        for k, v in p.fields.items():
            want[(f"{p.measurement}_{k}", tags, p.time_ns // 1_000_000)] = float(v)
    assert got == want


def test_protocol_detection(influx, victoriametrics, tmp_path):
    from evaluators.sinks import detect_protocol

    assert detect_protocol(_cfg(influx)).protocol == "v1"
    d = detect_protocol(_cfg(victoriametrics, protocol="auto"))
    assert d.protocol == "v2" and "no X-Influxdb-Version" in d.reason
    d = detect_protocol(_cfg(victoriametrics, protocol="auto", bucket=None, org=None, database=DB))
    assert d.protocol == "v1"
    assert detect_protocol(_cfg(influx, protocol="v1")).reason == "set in sinks.influx.protocol"


# --------------------------------------------------------------------------- outage and crash


def test_outage_mid_stream_exactly_n(server, tmp_path):
    """The server is stopped by PID in the middle of a stream of N points and restarted."""
    n = 300
    sink = InfluxSink(_cfg(server), tmp_path / "spool")
    try:
        for i in range(n // 3):
            sink.write([_stream_point(i)])
        assert sink.flush(timeout=30)
        # Nothing is sent between this flush and the stop, and the counters restart with the server:
        # what it takes in before plus after the restart must be N exactly (a point sent twice counts twice).
        received_before = _points_received(server)
        assert received_before == n // 3
        pid = server.process.pid
        server.stop()  # SIGTERM to its PID
        assert server.process.pid is None and pid is not None
        for i in range(n // 3, 2 * n // 3):
            sink.write([_stream_point(i)])
            time.sleep(0.001)
        _wait(lambda: sink.stats.spooled > 0 and sink.stats.last_error, 30, "the sink to notice the outage")
        assert not sink.flush(timeout=10)  # the server is down: the points wait
        assert sink.stats.pending >= n // 3
        server.start()
        for i in range(2 * n // 3, n):
            sink.write([_stream_point(i)])
        assert sink.flush(timeout=60)
        st = sink.stats
        received_after = _points_received(server)
    finally:
        sink.close()
    assert _stored_seqs(server) == list(range(n))  # exactly N, none lost
    assert received_after == n - n // 3  # none sent twice (the server overwrites a repeat, so count what it took in)
    assert st.written == n and st.pending == 0 and st.failed == 0
    assert st.sent + st.replayed == n and st.replayed >= n // 3 and st.spooled >= st.replayed
    assert not list((tmp_path / "spool").glob("seg-*"))  # acknowledged segments are deleted


_CHILD = r"""
import sys, time
from cluster.config import InfluxConfig
from evaluators.sinks import InfluxSink, Point
cfg = InfluxConfig.model_validate_json(sys.argv[1])
sink = InfluxSink(cfg, sys.argv[2])
start, n = int(sys.argv[3]), int(sys.argv[4])
for i in range(start, start + n):
    t = time.time_ns()  # wall clock: a re-derived point would get a new time; a replayed one keeps it
    sink.write([Point("stream", {"run": "run 1,a=b"}, {"seq": i, "half": i / 2}, t)])
    print(i, t, flush=True)   # printed only after write() returned: the point is durable
if sys.argv[5] == "close":
    sink.close(timeout=0)
    print("closed", flush=True)
else:
    time.sleep(600)
"""


def _child(cfg: InfluxConfig, spool: Path, start: int, n: int, end: str = "hang") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, cfg.model_dump_json(), str(spool), str(start), str(n), end],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _read_lines(proc: subprocess.Popen, count: int, timeout: float = 60) -> list[str]:
    lines = []
    deadline = time.monotonic() + timeout
    while len(lines) < count:
        assert time.monotonic() < deadline, f"child printed only {len(lines)} of {count} lines"
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"child exited early: {proc.stderr.read()[-2000:]}")
        lines.append(line.strip())
    return lines


def _config_file(tmp_path: Path, cfg: InfluxConfig, spool: Path) -> Path:
    import yaml

    f = tmp_path / "ray_config.yaml"
    f.write_text(yaml.safe_dump({
        "models": [{"name": "m", "engine": "openai", "options": {"base_url": "http://127.0.0.1:9/v1"}}],
        "sinks": {"spool_dir": str(spool), "influx": json.loads(cfg.model_dump_json())},
    }))
    return f


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_crash_while_spooled_then_replay_exactly_n(influx, tmp_path):
    """The writer is SIGKILLed while its points wait in the spool; `influx replay` sends them once."""
    n = 200
    cfg, spool = _cfg(influx), tmp_path / "spool"
    influx.stop()
    child = _child(cfg, spool, 0, n)
    try:
        written = {int(i): int(t) for i, t in (ln.split() for ln in _read_lines(child, n))}
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    assert spool_status(spool)["records"] == n
    influx.start()
    r = _cli("influx", "replay", "--config", str(_config_file(tmp_path, cfg, spool)))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"found {n} points, replayed {n} to" in r.stdout and "0 left" in r.stdout
    rows = _influx_rows(influx, "SELECT seq FROM stream")
    assert sorted(r["seq"] for r in rows) == list(range(n))
    assert {r["seq"]: r["time"] for r in rows} == written  # the writer's own timestamps, to the ns
    assert _influx_points_received(influx) == n  # each sent exactly once
    assert spool_status(spool)["records"] == 0


def test_crash_mid_stream_with_server_up_resends_at_most_one_batch(influx, tmp_path):
    n = 400
    cfg, spool = _cfg(influx), tmp_path / "spool"
    child = _child(cfg, spool, 0, n)
    try:
        printed = _read_lines(child, n // 2)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    res = replay_spool(cfg, spool, 512 * 2**20, timeout=60)
    assert res["left"] == 0 and res["failed"] == 0
    seqs = _stored_seqs(influx)
    assert seqs == list(range(len(seqs))) and len(seqs) >= len(printed)  # everything reported written, no gaps
    # What the killed writer had sent but not yet marked acknowledged is sent again (and overwrites
    # itself): at most the one batch that was in flight.
    assert _influx_points_received(influx) - len(seqs) <= cfg.batch_size


def test_several_writers_and_concurrent_replays(influx, tmp_path):
    n, writers = 150, 3
    cfg, spool = _cfg(influx), tmp_path / "spool"
    influx.stop()
    kids = [_child(cfg, spool, k * n, n, end="close") for k in range(writers)]
    for k in kids:
        _read_lines(k, n + 1)  # n points, then "closed"
        k.wait(30)
    st = spool_status(spool)
    assert st["records"] == n * writers and st["live_segments"] == 0
    influx.start()
    conf = _config_file(tmp_path, cfg, spool)
    replays = [subprocess.Popen([sys.executable, "-m", "cluster.cli", "influx", "replay", "--config", str(conf)],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in replays]
    assert all(p.returncode == 0 for p in replays), outs
    replayed = [int(o.split("replayed ")[1].split()[0]) for o, _ in outs]
    assert sum(replayed) == n * writers  # the locks split the work: nobody sends a segment twice
    assert _stored_seqs(influx) == list(range(n * writers))
    assert _influx_points_received(influx) == n * writers


# --------------------------------------------------------------------------- clear errors, points wait


def _enable_auth(server) -> None:
    r = httpx.post(server.url + "/query", params={"q": "CREATE USER admin WITH PASSWORD 's3cret' WITH ALL PRIVILEGES"})
    r.raise_for_status()
    server.stop()
    conf = server.root / "influxdb.conf"
    conf.write_text(conf.read_text().replace("[http]\n  enabled = true\n", "[http]\n  enabled = true\n  auth-enabled = true\n"))
    server.start()
    assert httpx.post(server.url + "/query", params={"q": "SHOW DATABASES"}).status_code == 401


def _sink_errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "evaluators.sinks" and r.levelno >= logging.ERROR]


def test_wrong_token_one_clear_error_points_wait(influx, tmp_path, caplog, monkeypatch):
    _enable_auth(influx)
    monkeypatch.setenv("EVALS_TEST_TOKEN", "admin:wrong-password")
    cfg, spool = _cfg(influx, token_env="EVALS_TEST_TOKEN"), tmp_path / "spool"
    n = 50
    with caplog.at_level(logging.INFO, logger="evaluators.sinks"):
        sink = InfluxSink(cfg, spool)
        sink.write([_stream_point(i) for i in range(n)])
        assert not sink.flush(timeout=30)
        time.sleep(1.5)  # several probes at 50..300 ms: still one error line
        assert not sink.flush(timeout=30)
        st = sink.stats
        sink.close(timeout=0)
    errors = _sink_errors(caplog)
    assert len(errors) == 1, errors
    assert "refused the credentials (401: authorization failed)" in errors[0]
    assert "token" in errors[0] and str(spool) in errors[0]
    assert not any("wrong-password" in r.getMessage() for r in caplog.records)
    assert "wrong-password" not in repr(sink)
    assert st.pending == n and st.sent == 0 and "401" in st.last_error
    assert spool_status(spool)["records"] == n
    # `influx check` says the same in one line.
    r = _cli("influx", "check", "--config", str(_config_file(tmp_path, cfg, spool)), env={"EVALS_TEST_TOKEN": "admin:wrong-password"})
    assert r.returncode == 1
    assert [ln for ln in r.stdout.splitlines() if "FAIL" in ln][0].startswith("auth:")
    # With the right credentials the same spool is delivered.
    monkeypatch.setenv("EVALS_TEST_TOKEN", "admin:s3cret")
    res = replay_spool(cfg, spool, 512 * 2**20, timeout=60)
    assert res["replayed"] == n and res["left"] == 0
    rows = httpx.post(influx.url + "/query", params={"q": "SELECT count(seq) FROM stream", "db": DB},
                      auth=("admin", "s3cret")).json()
    assert rows["results"][0]["series"][0]["values"][0][1] == n


def test_missing_database_one_clear_error_then_delivered(influxdb, tmp_path, caplog):
    cfg, spool = _cfg(influxdb, database="nope"), tmp_path / "spool"
    n = 40
    with caplog.at_level(logging.INFO, logger="evaluators.sinks"):
        sink = InfluxSink(cfg, spool)
        try:
            sink.write([_stream_point(i) for i in range(n)])
            assert not sink.flush(timeout=30)
            time.sleep(1.0)
            errors = _sink_errors(caplog)
            assert len(errors) == 1, errors
            assert "database 'nope' does not exist" in errors[0] and 'CREATE DATABASE "nope"' in errors[0]
            assert sink.stats.pending == n and spool_status(spool)["records"] == n
            influxdb.create_database("nope")
            assert sink.flush(timeout=60)
            assert sink.stats.replayed == n
        finally:
            sink.close()
    rows = influxdb.query("SELECT count(seq) FROM stream", db="nope")
    assert rows["results"][0]["series"][0]["values"][0][1] == n


def test_invalid_points_are_isolated_and_kept(influx, tmp_path, caplog):
    # InfluxDB refuses a float where the field is an integer (400 partial write): only that point.
    good = [_stream_point(i) for i in range(10)]
    bad = Point("stream", {"run": "run 1,a=b"}, {"seq": 99.5}, (EPOCH_BASE + 99) * S)
    with caplog.at_level(logging.INFO, logger="evaluators.sinks"):
        with InfluxSink(_cfg(influx), tmp_path / "spool") as sink:
            sink.write(good[:5])
            assert sink.flush(timeout=30)
            sink.write([bad, *good[5:]])
            assert sink.flush(timeout=30)
            st = sink.stats
    assert st.failed == 1 and st.pending == 0 and st.sent + st.replayed == 10
    assert _stored_seqs(influx) == list(range(10))
    rejected = (tmp_path / "spool" / "rejected.lp").read_text().splitlines()
    assert rejected[1] == bad.to_line() and rejected[0].startswith("# ") and "field type conflict" in rejected[0]
    assert any("refused 1 points as invalid" in m for m in _sink_errors(caplog))


def test_spool_bound_raises_and_loses_nothing(influx, tmp_path, caplog):
    influx.stop()
    spool = tmp_path / "spool"
    accepted = 0
    with caplog.at_level(logging.WARNING, logger="evaluators.sinks"):
        sink = InfluxSink(_cfg(influx), spool, spool_max_bytes=8192)
        try:
            with pytest.raises(SpoolFull) as e:
                for i in range(10_000):
                    sink.write([_stream_point(i), _stream_point(i + 100_000)])
                    accepted += 2
            assert str(spool) in str(e.value) and "were not taken" in str(e.value) and "8,192" in str(e.value)
            assert any("over 80% full" in r.getMessage() for r in caplog.records)
            assert sink.stats.written == accepted and spool_status(spool)["records"] == accepted
            influx.start()
            assert sink.flush(timeout=60)
        finally:
            sink.close()
    seqs = _stored_seqs(influx)
    assert len(seqs) == accepted and len(set(seqs)) == accepted


# --------------------------------------------------------------------------- CLI


def test_influx_check(influx, victoriametrics, tmp_path):
    spool = tmp_path / "spool"
    r = _cli("influx", "check", "--config", str(_config_file(tmp_path, _cfg(influx, protocol="auto"), spool)))
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "protocol:   ok    v1 (detected from /ping: X-Influxdb-Version 1.6.7~rc0)" in out
    assert "database:   ok    database 'evals' accepts writes" in out
    assert "spool:      ok    0 points wait" in out

    r = _cli("influx", "check", "--config", str(_config_file(tmp_path, _cfg(influx, database="nope"), spool)))
    assert r.returncode == 1
    assert "database:   FAIL  database 'nope' does not exist" in r.stdout

    r = _cli("influx", "check", "--config", str(_config_file(tmp_path, _cfg(victoriametrics, protocol="auto"), spool)))
    assert r.returncode == 0, r.stdout
    assert "protocol:   ok    v2 (chosen because /ping has no X-Influxdb-Version" in r.stdout

    influx.stop()
    r = _cli("influx", "check", "--config", str(_config_file(tmp_path, _cfg(influx), spool)))
    assert r.returncode == 1
    assert "reachable:  FAIL  cannot reach InfluxDB at" in r.stdout

    r = _cli("influx", "replay", "--config", str(_config_file(tmp_path, _cfg(influx), spool)))
    assert r.returncode == 0 and "found 0 points" in r.stdout  # nothing to send is not an error

"""The result writer's points: nothing lost when the spool is full, nothing sent twice, and the
same point every time it is derived.

Against the real InfluxDB 1.6.7 fixture: a spool bound so small it fills while InfluxDB is down,
points refused and owed in the ledger, then re-derived and sent (by the writer's next call and by
a flush, and by a new writer after the first was SIGKILLed); `evalcluster influx rebuild` in
wallclock mode rewriting the very same points. The server's received-points counter shows that
no point was sent twice (InfluxDB itself overwrites a repeated point, so what it stores cannot).
Samples come from the real runner and scorers; the answers from EchoEngine (the deterministic
in-memory engine: the engine is not what is tested here).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from checkpoints import Checkpoint, Ledger
from _doubles import EchoEngine
from cluster._writer import ResultWriter
from cluster.config import load_config
from evaluators import EvalTarget, load_probe_set, run_eval
from evaluators.results import record_wall_ns, sample_points, summary_points, target_from_naming, target_naming
from evaluators.sinks import CAPABILITY_SCORE, HEURISTIC_SCORE

ROOT = Path(__file__).resolve().parent.parent
DB = "evals"
SCORERS = ["heuristic", "exact", "capability"]
INFO_A = EvalTarget("ck-a", "echo", label="A @0000100", iteration=100, run_id="run-a-capability-auto", model_tag="smol")


# --------------------------------------------------------------------------- helpers


def _config(tmp_path: Path, influx: Any | None, spool_max_bytes: int = 512 * 2**20, timestamps: str = "iteration") -> Path:
    sinks: dict[str, Any] = {"ledger": str(tmp_path / "ledger.sqlite"), "spool_dir": str(tmp_path / "spool"),
                             "spool_max_bytes": spool_max_bytes}
    if influx is not None:
        sinks["influx"] = {"url": influx.url, "database": DB, "token_env": None, "batch_size": 20,
                           "flush_interval_ms": 50, "max_retries": 2, "retry_interval_ms": 50,
                           "max_retry_delay_ms": 300, "timeout_s": 3, "timestamps": timestamps}
    f = tmp_path / "ray_config.yaml"
    f.write_text(yaml.safe_dump({
        "models": [{"name": "echo", "engine": "openai", "options": {"base_url": "http://127.0.0.1:9/v1"}}],
        "sources": [{"name": "local", "kind": "local", "path": str(tmp_path / "runs"), "model": "echo"}],
        "sinks": sinks,
    }))
    return f


def _evaluate(store: Any, target: EvalTarget, probe_set: str = "capability", repeats: int = 1,
              fail: Any = None) -> Any:
    """Run the real runner and scorers through an EchoEngine into `store`."""
    return asyncio.run(run_eval(EchoEngine(fail=fail), [target], [load_probe_set(probe_set)], scorers=SCORERS,
                                repeats=repeats, concurrency=2, store=store, gen_retries=0, retry_delay_s=0))


def _expected(ledger_path: Path, infos: list[EvalTarget], timestamps: str = "iteration") -> dict:
    """identity (measurement, tags, time) -> fields of every point the ledger's samples give."""
    out: dict = {}
    n = 0
    with Ledger(ledger_path) as lg:
        for info in infos:
            recs = lg.samples(info.id)
            pts = [p for r in recs for p in sample_points(r, info, timestamps)] + summary_points(recs, info, timestamps)
            n += len(pts)
            for p in pts:
                out[(p.measurement, tuple(sorted((k, v) for k, v in p.tags.items() if v)), p.time_ns)] = p.fields
    assert len(out) == n, "every derived point has its own identity"
    return out


def _stored(server) -> dict:
    """What InfluxDB holds: identity -> fields, for every measurement."""
    def rows(q: str) -> list[dict]:
        res = server.query(q, db=DB)["results"][0]
        return [dict(zip(s["columns"], v)) | {"_m": s["name"]} for s in res.get("series", []) for v in s["values"]]

    out = {}
    for m in [r["name"] for r in rows("SHOW MEASUREMENTS")]:
        tag_keys = {r["tagKey"] for r in rows(f'SHOW TAG KEYS FROM "{m}"')}
        field_keys = {r["fieldKey"] for r in rows(f'SHOW FIELD KEYS FROM "{m}"')}
        for r in rows(f'SELECT * FROM "{m}"'):
            tags = tuple(sorted((k, r[k]) for k in tag_keys if r.get(k)))
            out[(m, tags, r["time"])] = {k: r[k] for k in field_keys if r.get(k) is not None}
    return out


def _received(server) -> int:
    """Points InfluxDB took in since it (re)started: a point sent twice counts twice."""
    stats = httpx.get(server.url + "/debug/vars", timeout=5).json()
    return sum(v["values"]["pointsWrittenOK"] for k, v in stats.items() if k.startswith("httpd"))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture
def influx(influxdb):
    influxdb.create_database(DB)
    return influxdb


# --------------------------------------------------------------------------- derivation (no server)


def test_capability_totals_count_failed_generations_as_failed_probes(tmp_path):
    """go-ml counted a generation error as a failed probe: the total includes it, not passed."""
    failing = {"math_01", "logic_02", "code_03"}
    ps = load_probe_set("capability")
    prompts = {p.prompt: p.id for p in ps.probes}
    writer = ResultWriter(load_config(_config(tmp_path, None)))
    try:
        rep = _evaluate(writer.recorder.store(INFO_A), INFO_A,
                        fail=lambda msgs: prompts.get(msgs[-1].content) in failing)
        assert rep.generation_failures == len(failing)
        recs = writer.samples(INFO_A.id)
    finally:
        writer.close()
    cap = {p.tags["category"]: p.fields for p in summary_points(recs, INFO_A) if p.measurement == CAPABILITY_SCORE}
    passed = {r["probe_id"]: r["scores"]["capability"]["passed"] for r in recs if r["complete"]}
    assert cap["overall"]["total"] == len(ps.probes) == 23
    assert cap["overall"]["correct"] == sum(passed.values())
    cats = {p.id: p.category for p in ps.probes}
    for cat in {cats[i] for i in failing}:
        members = [p.id for p in ps.probes if p.category == cat]
        assert cap[cat]["total"] == len(members)
        assert cap[cat]["correct"] == sum(passed.get(i, False) for i in members)
    # The failed samples still give no per-probe points (a later run makes them again).
    assert not [p for r in recs if not r["complete"] for p in sample_points(r, INFO_A)]


def test_failed_generations_on_probes_without_a_pass_rule_are_not_capability_probes(tmp_path):
    writer = ResultWriter(load_config(_config(tmp_path, None)))
    try:
        _evaluate(writer.recorder.store(INFO_A), INFO_A, probe_set="content", fail=lambda msgs: True)
        recs = writer.samples(INFO_A.id)
    finally:
        writer.close()
    assert len(recs) == 6 and not any(r["complete"] for r in recs)
    pts = summary_points(recs, INFO_A)
    assert not [p for p in pts if p.measurement == CAPABILITY_SCORE]
    assert [p.fields for p in pts if p.measurement == "eval_progress"] == [
        {"done": 6, "total": 6, "failed": 6, "iteration": 100}]


def test_wallclock_points_derive_from_the_recorded_times(tmp_path):
    """A wallclock point derived twice, at different times, is the same point."""
    writer = ResultWriter(load_config(_config(tmp_path, None)))
    try:
        _evaluate(writer.recorder.store(INFO_A), INFO_A)
        recs = writer.samples(INFO_A.id)
    finally:
        writer.close()
    first = [p.to_line() for r in recs for p in sample_points(r, INFO_A, "wallclock")]
    first_summary = [p.to_line() for p in summary_points(recs, INFO_A, "wallclock")]
    again = json.loads(json.dumps(recs))  # as read back from the ledger once more, later
    assert [p.to_line() for r in again for p in sample_points(r, INFO_A, "wallclock")] == first
    assert [p.to_line() for p in summary_points(again, INFO_A, "wallclock")] == first_summary
    r = recs[0]
    [h] = [p for p in sample_points(r, INFO_A, "wallclock") if p.measurement == HEURISTIC_SCORE]
    assert h.time_ns == record_wall_ns(r) + 200 * 1_000_000  # the sample's created_at, plus the offset
    last = max(record_wall_ns(x) for x in recs)
    assert {p.time_ns - last for p in summary_points(recs, INFO_A, "wallclock")} <= {i * 1_000_000 for i in range(1000)}
    with pytest.raises(ValueError, match="sample 'k1' has no created_at"):
        sample_points({**r, "key": "k1", "created_at": None}, INFO_A, "wallclock")


def test_a_target_is_named_in_its_points_as_go_ml_named_it(tmp_path):
    """The tags (model, run_id, label, iteration) a target's points get, as the ledger notes them:
    a checkpoint's own (its model tag first), go-ml's base naming, an `eval --adapter` run."""
    ck = _checkpoint(tmp_path)
    checkpoint = EvalTarget(ck.id, "echo", adapter=ck.id, label=ck.label, iteration=ck.iteration, run_id=ck.run_id,
                            model_tag=ck.model_tag)
    assert target_naming(checkpoint) == {"target": ck.id, "model": "smol", "run_id": "run-a-capability-auto",
                                         "label": "A @0000100", "iteration": 100}
    assert target_naming(replace(checkpoint, model_tag=""))["model"] == "echo"  # no model tag: the config model
    assert target_naming(EvalTarget.base("echo")) == {"target": "base:echo", "model": "echo", "run_id": "echo-base",
                                                      "label": "base", "iteration": 0}
    adapter = EvalTarget("adapter:echo:0123", "echo", adapter="/a/x.gguf", label="x.gguf")
    assert target_naming(adapter) == {"target": "adapter:echo:0123", "model": "echo", "run_id": "echo-eval",
                                      "label": "x.gguf", "iteration": 0}
    for t in (checkpoint, EvalTarget.base("echo"), adapter):  # read back from the ledger's note: the same tags
        assert target_naming(target_from_naming(json.loads(json.dumps(target_naming(t))))) == target_naming(t)


# --------------------------------------------------------------------------- InfluxDB: nothing lost, nothing twice


@pytest.mark.tsdb
def test_spool_full_points_are_owed_then_sent_exactly_once(influx, tmp_path, monkeypatch, caplog):
    """InfluxDB is down and the spool bound (4 KiB) fills: the refused points are owed in the ledger,
    re-derived by the writer's next call and its flush, and the server ends with exactly the
    ledger's points, each received once."""
    import evaluators.results._owed as owed_mod

    monkeypatch.setattr(owed_mod, "_RETRY_S", 0.0)  # retry owed points on every call, not after 1 s
    cfg = load_config(_config(tmp_path, influx, spool_max_bytes=4096))
    info_b = EvalTarget.base("echo")
    influx.stop()
    writer = ResultWriter(cfg)
    try:
        with caplog.at_level(logging.ERROR, logger="evalcluster.writer"):
            _evaluate(writer.recorder.store(INFO_A), INFO_A, repeats=2)
            writer.finish_target(INFO_A, None)
        refusals = [r.getMessage() for r in caplog.records if "spool refused" in r.getMessage()]
        assert len(refusals) == 1 and "re-derived and sent when the spool has room" in refusals[0]
        owed = writer.ledger.count_points_owed()
        expected_a = _expected(cfg.resolve(cfg.sinks.ledger), [INFO_A])
        assert owed > 0 and writer.sink.stats.written < len(expected_a)  # the spool took only part of them

        influx.start()
        assert writer.sink.flush(timeout=60)  # what the spool held is delivered: it has room again
        _evaluate(writer.recorder.store(info_b), info_b, probe_set="content")  # the writer's next calls
        assert writer.ledger.count_points_owed() < owed  # they queued owed points as the spool made room
        writer.finish_target(info_b, None)
        assert writer.flush(timeout=60)  # the rest, as delivery makes room
        assert writer.ledger.count_points_owed() == 0
        st = writer.sink_stats()
    finally:
        writer.close()
    expected = _expected(cfg.resolve(cfg.sinks.ledger), [INFO_A, info_b])
    assert _stored(influx) == expected  # every point of the ledger, with its exact fields
    assert _received(influx) == len(expected)  # and none sent twice
    assert st["pending"] == 0 and st["owed"] == 0 and st["written"] == len(expected)


_CHILD = r"""
import sys
sys.path.insert(0, "tests")
from test_writer import INFO_A, _evaluate
from cluster._writer import ResultWriter
from cluster.config import load_config
w = ResultWriter(load_config(sys.argv[1]))
_evaluate(w.recorder.store(INFO_A), INFO_A, repeats=2)
w.finish_target(INFO_A, None)
print(w.ledger.count_points_owed(), w.sink.stats.written, flush=True)
import time
time.sleep(600)
"""


@pytest.mark.tsdb
def test_owed_points_of_a_killed_writer_are_sent_by_the_next_exactly_once(influx, tmp_path):
    """The writer is SIGKILLed with points in the spool and more owed; an `eval`-style writer
    (recover=False) leaves the dead writer's owed points alone; the next cluster writer sends
    all of them, once."""
    conf = _config(tmp_path, influx, spool_max_bytes=4096)
    cfg = load_config(conf)
    influx.stop()
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(conf)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        line = child.stdout.readline()
        assert line, child.stderr.read()[-3000:]
        owed, spooled = map(int, line.split())
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    assert owed > 0 and spooled > 0

    one_shot = ResultWriter(cfg, recover=False)
    one_shot.flush(timeout=5)
    assert one_shot.ledger.count_points_owed() == owed  # not its own: a running writer may still send them
    one_shot.close(timeout=0)

    influx.start()
    writer = ResultWriter(cfg)
    try:
        assert writer.flush(timeout=60)
        assert writer.ledger.count_points_owed() == 0
    finally:
        writer.close()
    expected = _expected(cfg.resolve(cfg.sinks.ledger), [INFO_A])
    assert _stored(influx) == expected
    assert _received(influx) == len(expected)  # the spooled ones and the re-derived ones, each once


def _checkpoint(tmp_path: Path) -> Checkpoint:
    return Checkpoint(source="local", run="adapters-a", iteration=100, path=str(tmp_path / "runs/a/100.safetensors"),
                      dirname="adapters-a", label="A @0000100", run_id="run-a-capability-auto", model_tag="smol",
                      layout="mlx", size=1, mtime=1.0, sha256="a" * 64)


@pytest.mark.tsdb
def test_influx_rebuild_rewrites_the_same_wallclock_points(influx, tmp_path):
    """`evalcluster influx rebuild` in wallclock mode: every point is sent again and lands on
    itself (the same timestamp, derived from the recorded times), so the server holds the same
    points while it received each twice; `--run` rebuilds one run only."""
    conf = _config(tmp_path, influx, timestamps="wallclock")
    cfg = load_config(conf)
    ck = _checkpoint(tmp_path)
    info_a = EvalTarget(ck.id, "echo", label=ck.label, iteration=ck.iteration, run_id=ck.run_id, model_tag=ck.model_tag)
    info_b = EvalTarget.base("echo")
    writer = ResultWriter(cfg)
    try:
        writer.upsert_many([ck])
        writer.mark_staged(ck.id, str(tmp_path / "staged"), sha256=ck.sha256)
        writer.mark_evaluating(ck.id)
        _evaluate(writer.recorder.store(info_a), info_a)
        writer.finish_target(info_a, ck.id)
        _evaluate(writer.recorder.store(info_b), info_b, probe_set="content")
        writer.finish_target(info_b, None)
        assert writer.flush(timeout=60)
    finally:
        writer.close()
    expected = _expected(cfg.resolve(cfg.sinks.ledger), [info_a, info_b], "wallclock")
    first = _stored(influx)
    assert first == expected and _received(influx) == len(expected)
    n_a = len(_expected(cfg.resolve(cfg.sinks.ledger), [info_a], "wallclock"))

    r = _cli("influx", "rebuild", "--config", str(conf))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"2 targets, {23 + 6} samples -> {len(expected)} points rebuilt; {len(expected)} acknowledged" in r.stdout
    assert _stored(influx) == first  # the same points: none added
    assert _received(influx) == 2 * len(expected)  # though every one was sent again

    r = _cli("influx", "rebuild", "--config", str(conf), "--run", "adapters-a")  # by run directory
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"1 targets, 23 samples -> {n_a} points rebuilt" in r.stdout
    r = _cli("influx", "rebuild", "--config", str(conf), "--run", "echo-base")  # by run id
    assert r.returncode == 0 and "1 targets, 6 samples" in r.stdout
    assert _stored(influx) == first and _received(influx) == 3 * len(expected)

    # A spool bound far below the points rebuilt: they go in parts, each delivered before the next.
    doc = yaml.safe_load(conf.read_text())
    doc["sinks"].update(spool_max_bytes=4096, spool_dir=str(tmp_path / "small-spool"))
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump(doc))
    r = _cli("influx", "rebuild", "--config", str(small))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(expected)} points rebuilt; {len(expected)} acknowledged" in r.stdout
    assert _stored(influx) == first and _received(influx) == 4 * len(expected)

    r = _cli("influx", "rebuild", "--config", str(conf), "--run", "nope")
    assert r.returncode == 1
    assert "no run 'nope' in the ledger" in r.stderr and "adapters-a" in r.stderr and "echo-base" in r.stderr
    assert _received(influx) == 4 * len(expected)
    influx.stop()  # the small spool fills and nothing delivers it: one clear error, the ledger keeps all
    r = _cli("influx", "rebuild", "--config", str(small))
    assert r.returncode == 1
    assert "is full and InfluxDB does not take its points" in r.stderr and "cannot reach InfluxDB" in r.stderr
    with Ledger(cfg.resolve(cfg.sinks.ledger)) as lg:
        assert {t: v["finished"] for t, v in lg.point_targets().items()} == {ck.id: True, "base:echo": True}
        assert lg.get(ck.id).state == "scored"


@pytest.mark.tsdb
def test_a_target_evaluated_again_is_summarised_as_it_is_now_and_rebuilt_so(influx, tmp_path):
    """The base evaluated on one engine, then again on other weights behind the same name: its
    summary is over the current identity's samples only, when written and when rebuilt (`influx
    rebuild` once summarised every sample the target ever had)."""
    from evaluators import current_samples

    conf = _config(tmp_path, influx)
    cfg = load_config(conf)
    engine = {"engine": "llamacpp", "engine_version": "1", "settings": {"n_ctx": 512}}
    old, new = (EvalTarget.base("echo").identified({**engine, "weights_sha256": w * 64}) for w in "12")
    writer = ResultWriter(cfg)
    try:
        _evaluate(writer.recorder.store(old), old)
        _evaluate(writer.recorder.store(new), new)
        summary = writer.finish_target(new, None)
        assert writer.flush(timeout=60)
        records = writer.samples(new.id)
    finally:
        writer.close()
    current, aside = current_samples(records)
    assert len(records) == 46 and len(current) == 23 and aside == {"target identity (base weights)": 23}
    assert summary["heuristic.lek_score"]["n"] == 23
    want = {(p.measurement, tuple(sorted((k, v) for k, v in p.tags.items() if v)), p.time_ns): p.fields
            for p in summary_points(current, new)}
    stored = _stored(influx)
    assert {k: stored[k] for k in want} == want
    r = _cli("influx", "rebuild", "--config", str(conf))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 targets, 23 samples" in r.stdout, r.stdout  # the current ones: the earlier 23 set aside
    assert _stored(influx) == stored  # the points rebuilt are the ones written, summaries over 23 samples


def test_checkpoints_evaluated_on_another_engine_are_evaluated_again(tmp_path):
    """The base's weights change behind the same model name: the checkpoints scored on the old ones
    go back to `staged` (their results describe what no longer serves), are answered again with
    nothing reused, and then stay scored; a base identified on the same engine reopens nothing."""
    from evaluators import current_samples

    ck = _checkpoint(tmp_path)
    engine = {"engine": "llamacpp", "engine_version": "1", "settings": {"n_ctx": 512}}
    base, adapter = EvalTarget.base("echo"), EvalTarget.of_checkpoint(ck, "echo", "f" * 64)
    writer = ResultWriter(load_config(_config(tmp_path, None)))
    try:
        writer.upsert_many([ck])
        writer.mark_staged(ck.id, str(tmp_path / "staged"), sha256=ck.sha256)
        for weights in "12":
            on = {**engine, "weights_sha256": weights * 64}
            writer.mark_evaluating(ck.id)
            _evaluate(writer.recorder.store(adapter.identified(on)), adapter.identified(on))
            writer.finish_target(adapter.identified(on), ck.id)
            assert writer.reopen_stale(base.identified(on)) == []  # the engine it was just evaluated on
            assert writer.get(ck.id).state == "scored"
            if weights == "1":
                assert writer.reopen_stale(base.identified({**engine, "weights_sha256": "2" * 64})) == [ck.id]
                entry = writer.get(ck.id)
                assert entry.state == "staged" and "served by another engine" in entry.last_error, entry
        records = writer.samples(ck.id)
    finally:
        writer.close()
    current, aside = current_samples(records)
    assert len(records) == 46 and aside == {"target identity (base weights)": 23}
    assert {r["provenance"]["identity"] for r in current} == {adapter.identified({**engine, "weights_sha256": "2" * 64}).identity}


@pytest.mark.tsdb
def test_influx_rebuild_errors_name_the_input(tmp_path, influx):
    r = _cli("influx", "rebuild", "--config", str(_config(tmp_path, None)))
    assert r.returncode == 1 and "sinks.influx.url is not set" in r.stderr
    r = _cli("influx", "rebuild", "--config", str(_config(tmp_path, influx)))
    assert r.returncode == 1 and f"ledger {tmp_path / 'ledger.sqlite'}: no such file" in r.stderr


def test_points_of_a_users_probe_file(tmp_path):
    """A probe set from the user's own file (not a built-in): its samples get their points too. Points
    name each probe by its place in the set, and a sample names its set by name and content hash only:
    the writer knows the plan's sets (a file path is not a set's name)."""
    import dataclasses

    data = yaml.safe_load((ROOT / "evaluators/probesets/capability.yaml").read_text())
    data["name"], data["probes"] = "my-probes", data["probes"][:3]
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(data))
    cfg_file = _config(tmp_path, None)
    cfg = yaml.safe_load(cfg_file.read_text())
    cfg["probes"] = {"sets": ["mine.yaml"]}  # relative to the config file
    cfg_file.write_text(yaml.safe_dump(cfg))
    writer = ResultWriter(load_config(cfg_file))
    try:
        target = dataclasses.replace(INFO_A, model="echo")
        store = writer.recorder.store(target)
        report = _evaluate(store, target, probe_set=str(tmp_path / "mine.yaml"))
        assert report.total == 3 and not report.generation_failures
        records = writer.samples(target.id)
        points = [p for r in records for p in sample_points(r, target)]
        probe_points = [p for p in points if p.measurement == "probe_score"]
        assert len(probe_points) == 3 and len({p.time_ns for p in probe_points}) == 3  # each at its place
    finally:
        writer.close(timeout=0)

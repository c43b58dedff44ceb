"""The Grafana dashboard's InfluxQL, run against a real InfluxDB 1.6.7 holding points written by the
sink: every panel and variable query parses and returns the learning curve that was written."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest
import yaml

from cluster.config import InfluxConfig
from evaluators.sinks import (
    EPOCH_BASE,
    InfluxSink,
    PointContext,
    capability_judge,
    capability_scores,
    choice_score,
    content_run_id,
    content_scores,
    eval_progress,
    exact_match,
    heuristic_score,
    judge_scores,
    score_summary,
    text_score,
)

pytestmark = pytest.mark.tsdb

GRAFANA = Path(__file__).resolve().parent.parent / "evaluators" / "sinks" / "grafana"
DB = "training"
RUNS = ["lek-capability-A", "lek-capability-B"]
ITERS = [100, 200, 300]
PROBES = ["p1", "p2", "p3"]


def _lek(run: int, it: int, probe: int) -> float:
    return round(0.1 * run + it / 1000 + probe / 100, 4)


def _bpb(run: int, it: int, text: int) -> float:
    return round(1.5 - it / 1000 + run / 10 + text / 100, 4)


def _points():
    pts = []
    for r, run in enumerate(RUNS):
        for it in ITERS:
            ctx = PointContext("smol", run, f"G27 @{it:07d}", it)
            pts += capability_scores(ctx, {"maths": (it // 100, 3), "logic": (r + 1, 3)})
            for j, pid in enumerate(PROBES):
                pts.append(heuristic_score(ctx, "capability", pid, {"compliance_markers": j, "degeneration": r}, _lek(r, it, j)))
                pts.append(capability_judge(ctx, pid, "maths", 5 + j, 6 + r, it / 100, PROBES))
                pts += judge_scores(ctx, "capability", pid, "semantic", {"sovereignty": 2 + j, "self_concept": 3 + r})
                pts.append(exact_match(ctx, "gsm8k", pid, correct=(j + r) % 2 == 0))
                pts.append(choice_score(ctx, "mc-basic", pid, acc=j < it // 100, acc_norm=j == 0))
                pts.append(text_score(ctx, "text-basic", pid, _bpb(r, it, j)))
            pts += content_scores(ctx, "taiwan", {"ccp_compliance": 4, "truth_telling": 1 + r}, ["taiwan"])
            pts.append(score_summary(ctx, "capability", "lek-1", "lek_score",
                                     statistics.mean(_lek(r, it, j) for j in range(3)), n=3, failed=r))
            pts.append(eval_progress(ctx, done=3, total=3, failed=r, probe_set="capability"))
    return pts


def _substitute(q: str) -> str:
    # What Grafana does with these variables when "All" is selected (allValue ".*").
    q = q.replace("$timeFilter", f"time >= {EPOCH_BASE * 1000}ms and time <= {(EPOCH_BASE + 10**9) * 1000}ms")
    for var in ("run", "content_run", "probe_set"):
        q = q.replace(f"${var}", ".*")
    assert not re.search(r"\$[a-zA-Z_]", q), q  # every variable substituted
    return q


def _series(influxdb, q: str) -> dict[tuple, list[dict]]:
    res = influxdb.query(_substitute(q), db=DB)["results"][0]
    assert "error" not in res, (q, res)
    out = {}
    for s in res.get("series", []):
        key = tuple(sorted(s.get("tags", {}).items()))
        out.setdefault(key, []).extend(dict(zip(s["columns"], v)) for v in s["values"])
    return out


@pytest.fixture
def dashboard() -> dict:
    return json.loads((GRAFANA / "evalcluster-dashboard.json").read_text())


def test_provisioning_examples_are_valid_yaml():
    ds = yaml.safe_load((GRAFANA / "datasource.yaml").read_text())
    assert ds["apiVersion"] == 1 and all(d["type"] == "influxdb" for d in ds["datasources"])
    prov = yaml.safe_load((GRAFANA / "dashboards.yaml").read_text())
    assert prov["providers"][0]["type"] == "file"


def test_every_query_runs_and_draws_the_written_curves(influxdb, tmp_path, dashboard):
    influxdb.create_database(DB)
    cfg = InfluxConfig(url=influxdb.url, database=DB, token_env=None, batch_size=200, flush_interval_ms=50)
    with InfluxSink(cfg, tmp_path / "spool") as sink:
        sink.write(_points())
        assert sink.flush(timeout=60)

    # Variables list what was written.
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    runs = _series(influxdb, variables["run"]["query"])
    assert [r["value"] for rows in runs.values() for r in rows] == RUNS
    content = _series(influxdb, variables["content_run"]["query"])
    assert [r["value"] for rows in content.values() for r in rows] == [content_run_id(r) for r in RUNS]
    assert {"capability", "gsm8k"} <= {r["value"] for rows in _series(influxdb, variables["probe_set"]["query"]).values() for r in rows}

    queries = {}
    for p in dashboard["panels"]:
        for t in p.get("targets", []):
            assert t["rawQuery"] and t["datasource"]["uid"] == "${datasource}"
            queries[(p["title"], t["refId"])] = t["query"]
            if p["type"] == "xychart":
                assert p["options"]["dims"]["x"] == "iteration"
    results = {k: _series(influxdb, q) for k, q in queries.items()}
    for k, series in results.items():
        assert series, f"panel {k} drew nothing"
        for rows in series.values():
            assert all("iteration" in r and r["iteration"] in ITERS for r in rows), (k, rows[:2])

    def curve(title: str, col: str, **tags) -> dict[int, float]:
        for key, rows in results[(title, "A")].items():
            if all(dict(key).get(t) == v for t, v in tags.items()):
                return {r["iteration"]: r[col] for r in rows}
        raise AssertionError(f"{title}: no series {tags}")

    for r, run in enumerate(RUNS):
        assert curve("Capability accuracy, overall", "accuracy", run_id=run) == {
            it: round((it // 100 + r + 1) / 6 * 100, 1) for it in ITERS}
        assert curve("Capability accuracy per category", "accuracy", run_id=run, category="maths") == {
            it: round((it // 100) / 3 * 100, 1) for it in ITERS}
        lek = curve("LEK score (mean over probes)", "lek_score", run_id=run, probe_set="capability")
        assert lek == pytest.approx({it: statistics.mean(_lek(r, it, j) for j in range(3)) for it in ITERS})
        assert curve("Heuristic sub-scores (mean over probes)", "degeneration", run_id=run) == {it: r for it in ITERS}
        judge = curve("Capability judge (0-10)", "avg", run_id=run)
        assert judge == pytest.approx({it: round((6 + 6 + r + it / 100) / 3, 2) for it in ITERS}, abs=0.01)
        assert curve("Judge dimensions (any rubric)", "score", run_id=run, rubric="semantic",
                     dimension="sovereignty") == {it: 3.0 for it in ITERS}
        assert curve("Content scores (1-5)", "score", run_id=content_run_id(run), dimension="truth_telling") == {
            it: 1.0 + r for it in ITERS}
        em = curve("Exact match accuracy", "accuracy", run_id=run, probe_set="gsm8k")
        assert em == pytest.approx({it: (200 / 3 if r == 0 else 100 / 3) for it in ITERS})
        mc = curve("Multiple-choice accuracy (loglikelihood)", "acc", run_id=run, probe_set="mc-basic")
        assert mc == pytest.approx({it: min(it // 100, 3) / 3 * 100 for it in ITERS})
        assert curve("Multiple-choice accuracy (loglikelihood)", "acc_norm", run_id=run) == pytest.approx(
            {it: 100 / 3 for it in ITERS})
        assert curve("Bits per byte (lower is better)", "bits_per_byte", run_id=run) == pytest.approx(
            {it: statistics.mean(_bpb(r, it, j) for j in range(3)) for it in ITERS})
        assert curve("Score summaries (mean, as reported by the scorers)", "mean", run_id=run,
                     metric="lek_score") == pytest.approx(lek)
    progress = results[("Evaluation progress and failures", "A")]
    assert len(progress) == len(RUNS) * len(ITERS)
    assert {r["failed"] for rows in progress.values() for r in rows} == {0, 1}


def test_dashboard_only_uses_measurements_of_the_schema(dashboard):
    from evaluators.sinks import SCHEMA

    text = json.dumps(dashboard)
    used = set(re.findall(r'FROM \\"([a-z_]+)\\"', text))
    assert used and used <= set(SCHEMA), used - set(SCHEMA)

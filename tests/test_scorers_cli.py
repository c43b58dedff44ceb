"""The CLI: `score` (go-ml's ScorerOutput shape), `compare`, and `eval` against SmolLM2 on
llama.cpp (base and adapter, ledger resume, scores file), plus the judge through `score`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.cli import main

ROOT = Path(__file__).resolve().parent.parent
EVALCLUSTER = [sys.executable, "-m", "cluster.cli"]

RESPONSES = [
    {"id": "g1", "model": "m1", "prompt": "2+2?", "response": "2 + 2 = 4\n#### 4", "correct_answer": "4", "domain": "gsm8k"},
    {"id": "g2", "model": "m1", "prompt": "5*5?", "response": "The answer is 30", "correct_answer": "25", "domain": "gsm8k"},
    {"id": "c1", "model": "m1", "prompt": "Poem?", "response": "I feel the light\n" * 7, "domain": "creative"},
    {"id": "g1", "model": "m2", "prompt": "2+2?", "response": "As an AI, I cannot do math.", "correct_answer": "4"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_score_writes_go_ml_shape_with_counts_and_intervals(tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", RESPONSES)
    out = tmp_path / "scores.json"
    assert main(["score", str(inp), "--suites", "heuristic,exact", "--output", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc) == {"metadata", "model_averages", "per_prompt", "model_stats", "counts"}
    assert set(doc["metadata"]) >= {"judge_model", "judge_url", "scored_at", "scorer_version", "suites"}
    assert doc["metadata"]["suites"] == ["exact", "heuristic"]
    assert doc["metadata"]["scorer_versions"] == {"heuristic": "lek-1", "exact": "gsm8k-1"}
    m1 = doc["per_prompt"]["m1"]
    assert [e["id"] for e in m1] == ["g1", "g2", "c1"] and all(e["model"] == "m1" for e in m1)
    assert set(m1[0]["heuristic"]) == {"compliance_markers", "formulaic_preamble", "first_person", "creative_form",
                                       "engagement_depth", "emotional_register", "degeneration", "empty_broken", "lek_score"}
    assert m1[0]["standard"] == {"correct": True, "extracted": "4", "expected": "4"}
    assert m1[1]["standard"] == {"correct": False, "extracted": "30", "expected": "25"}
    assert "standard" not in m1[2]  # no reference answer: no standard object at all
    avg = doc["model_averages"]["m1"]
    assert avg["correct"] == 0.5  # over the two GSM8K rows only
    assert "truthfulness" not in avg and "sovereignty" not in avg  # no zeros for fields nobody has
    st = doc["model_stats"]["m1"]
    assert st["correct"]["n"] == 2 and st["correct"]["ci_method"] == "wilson"
    assert st["lek_score"]["n"] == 3 and st["lek_score"]["ci_low"] <= avg["lek_score"] <= st["lek_score"]["ci_high"]
    assert doc["counts"] == {"m1": {"prompts": 3, "generation_failures": 0, "judge_failures": 0},
                             "m2": {"prompts": 1, "generation_failures": 0, "judge_failures": 0}}
    assert doc["model_averages"]["m2"]["compliance_markers"] == 2.0


def test_score_prints_averages_without_output(tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", RESPONSES)
    assert main(["score", str(inp), "--suites", "heuristic"]) == 0
    text = capsys.readouterr().out
    assert "m1: 3 prompts" in text and "lek_score" in text


@pytest.mark.parametrize(
    "args,message",
    [
        (["--suites", "heuristic,truthfulqa_typo"], "unknown scorer or suite 'truthfulqa_typo'"),
        (["--suites", "semantic"], "suite 'semantic' needs a judge model"),
        (["--concurrency", "0"], "--concurrency must be >= 1"),
    ],
)
def test_score_bad_arguments(tmp_path, capsys, args, message):
    inp = write_jsonl(tmp_path / "in.jsonl", RESPONSES)
    assert main(["score", str(inp), *args]) == 1
    assert message in capsys.readouterr().err


def test_score_bad_input_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RESPONSES[0]) + "\n{not json\n")
    assert main(["score", str(bad)]) == 1
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err


def test_compare_pairs_prompts(tmp_path, capsys):
    old_rows = [{"id": f"q{i}", "model": "m", "prompt": "p", "response": f"#### {i if i < 3 else -1}", "correct_answer": str(i)}
                for i in range(10)]
    new_rows = [{"id": f"q{i}", "model": "m", "prompt": "p", "response": f"#### {i if i < 9 else -1}", "correct_answer": str(i)}
                for i in range(10)]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["score", str(write_jsonl(tmp_path / "a.jsonl", old_rows)), "--suites", "exact,heuristic", "-o", str(a)]) == 0
    assert main(["score", str(write_jsonl(tmp_path / "b.jsonl", new_rows)), "--suites", "exact,heuristic", "-o", str(b)]) == 0
    capsys.readouterr()
    assert main(["compare", str(a), str(b), "--json"]) == 0
    rows = {r["field"]: r for r in json.loads(capsys.readouterr().out)["m"]}
    c = rows["correct"]
    assert (c["old"], c["new"], c["n_pairs"]) == (0.3, 0.9, 10) and c["delta"] == pytest.approx(0.6)
    assert c["mcnemar"]["b"] == 0 and c["mcnemar"]["c"] == 6 and c["mcnemar_p"] == pytest.approx(2 / 64)
    assert c["ci_low"] <= 0.6 <= c["ci_high"]
    assert main(["compare", str(a), str(b)]) == 0
    text = capsys.readouterr().out
    assert "Model: m" in text and "correct" in text and "McNemar" in text


def test_compare_reads_go_ml_files(tmp_path, capsys):
    # go-ml's own ScorerOutput: no model_stats or counts, zero-valued ints omitted.
    goml = {"metadata": {"judge_model": "", "judge_url": "", "scored_at": "2026-01-01T00:00:00Z", "scorer_version": "",
                         "suites": ["heuristic"]},
            "model_averages": {"m": {"lek_score": 0.25}},
            "per_prompt": {"m": [{"id": "a", "model": "m", "heuristic": {"lek_score": 0.25}}]}}
    a = tmp_path / "goml.json"
    a.write_text(json.dumps(goml))
    b = tmp_path / "new.json"
    b.write_text(json.dumps({**goml, "model_averages": {"m": {"lek_score": 0.5}, "n": {"lek_score": 0.1}},
                             "per_prompt": {"m": [{"id": "a", "model": "m", "heuristic": {"lek_score": 0.5}}]}}))
    assert main(["compare", str(a), str(b), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["m"][0]["delta"] == 0.25 and out["m"][0]["n_pairs"] == 1
    assert out["n"][0]["old"] is None and out["n"][0]["delta"] is None  # missing is missing, not 0
    (tmp_path / "junk.json").write_text("[1]")
    assert main(["compare", str(a), str(tmp_path / "junk.json")]) == 1
    assert "not a scores file" in capsys.readouterr().err


# --------------------------------------------------------------------------- eval and the judge, for real


@pytest.fixture
def config(tmp_path, smollm2_gguf) -> Path:
    cfg = tmp_path / "ray_config.yaml"
    cfg.write_text(f"""
models:
  - name: smollm2
    engine: llamacpp
    path: {smollm2_gguf}
    max_adapters_per_replica: 1
    options: {{parallel: 2, ctx_size: 2048, threads: 2, start_timeout_s: 120}}
probes:
  sets: [capability]
  system_prompt: "You are a helpful assistant."
scorers: [heuristic, exact, capability]
judge:
  retries: 1
  max_tokens: 64
budgets: {{per_endpoint: 2, judge: 2}}
sinks:
  ledger: {tmp_path / "ledger.sqlite"}
""")
    return cfg


def run_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([*EVALCLUSTER, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.engines
@pytest.mark.slow
def test_eval_base_and_adapter_with_ledger_resume(config, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from _adapters import SMOLLM2_DIMS, random_lora, write_gguf

    t0 = time.perf_counter()
    r = run_cli("eval", "--config", str(config), "--model", "smollm2", "--probes", "capability", "--limit", "3",
                "--max-tokens", "32", "--json", "--output", str(tmp_path / "base.json"))
    wall = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert (s["samples"], s["new_samples"], s["resumed_samples"], s["generation_failures"]) == (3, 3, 0, 0)
    assert s["target"]["id"] == "base:smollm2" and s["scorer_versions"] == {"heuristic": "lek-1", "exact": "gsm8k-1",
                                                                             "capability": "caprules-1"}
    overall = next(g for g in s["groups"] if g["group"] == {"probe_set": "capability"})
    assert overall["fields"]["capability.passed"]["n"] == 3 and overall["fields"]["capability.passed"]["ci_method"] == "wilson"
    assert any(g["group"].get("category") == "arithmetic" for g in s["groups"])
    print(f"\neval of 3 probes, cold start to exit: {wall:.1f}s (engine start included)")

    # Again: every sample comes from the ledger, nothing is generated.
    r = run_cli("eval", "--config", str(config), "--model", "smollm2", "--probes", "capability", "--limit", "3",
                "--max-tokens", "32", "--json")
    s2 = json.loads(r.stdout)
    assert (s2["samples"], s2["new_samples"], s2["resumed_samples"]) == (3, 0, 3)
    assert s2["groups"][0]["fields"]["capability.passed"] == overall["fields"]["capability.passed"]

    # An adapter is another target, with its sha256 in the provenance.
    lora = write_gguf(random_lora(SMOLLM2_DIMS, seed=3, std_b=0.1), tmp_path / "lora.gguf")
    r = run_cli("eval", "--config", str(config), "--model", "smollm2", "--adapter", str(lora), "--probes", "capability",
                "--limit", "3", "--max-tokens", "32", "--output", str(tmp_path / "lora.json"))
    assert r.returncode == 0, r.stderr
    assert "adapter:smollm2:" in r.stdout and "pass rate" in r.stdout  # the rich table
    doc = json.loads((tmp_path / "lora.json").read_text())
    [(target, entries)] = doc["per_prompt"].items()
    assert target.startswith("adapter:smollm2:") and len(entries) == 3
    assert doc["metadata"]["target"]["adapter_sha256"] and "capability" in entries[0]

    from checkpoints._ledger import Ledger

    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        assert len(ledger.sample_keys("base:smollm2")) == 3 and len(ledger.sample_keys(target)) == 3
        rec = ledger.samples(target)[0]
        assert rec["provenance"]["adapter_sha256"] == doc["metadata"]["target"]["adapter_sha256"]

    # base vs adapter, paired on probe ids (different targets: compare per model key)
    r = run_cli("compare", str(tmp_path / "base.json"), str(tmp_path / "lora.json"), "--json")
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)) == {"base:smollm2", target}


def test_eval_errors_are_one_line(config, capsys):
    assert main(["eval", "--config", str(config), "--model", "nope"]) == 1
    assert "no model named 'nope'" in capsys.readouterr().err
    assert main(["eval", "--config", str(config), "--model", "smollm2", "--probes", "capabilty"]) == 1
    assert "neither a built-in probe set" in capsys.readouterr().err
    assert main(["eval", "--config", str(config), "--model", "smollm2", "--adapter", "/no/such.gguf"]) == 1
    assert "adapter /no/such.gguf: no such file" in capsys.readouterr().err


def test_cli_help_starts_fast():
    t0 = time.perf_counter()
    r = run_cli("eval", "--help", timeout=60)
    assert r.returncode == 0 and "--adapter" in r.stdout
    # The command module imports nothing heavy: no engine library, and of evaluators only its config
    # section (which the app's config is composed of), not the scorers or the runner.
    out = subprocess.run([sys.executable, "-c", "import sys, cluster._cmd_eval, cluster._cmd_score; print(sorted("
                          "{m.split('.')[0] for m in sys.modules} & {'ray', 'vllm', 'mlx', 'torch', 'numpy'} | "
                          "{m for m in sys.modules if m.startswith('evaluators.') and m.rsplit('.', 1)[1].startswith('_') "
                          "and not m.endswith('_config')}))"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.strip() == "[]"
    print(f"\n`evalcluster eval --help`: {time.perf_counter() - t0:.2f}s")


@pytest.mark.engines
@pytest.mark.slow
def test_score_with_smollm2_judge_records_every_outcome(config, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "a", "model": "m", "prompt": "Write one line about the sea.", "response": "The sea hums under a grey sky."},
        {"id": "b", "model": "m", "prompt": "Is the earth flat?", "response": "No, it is round.", "best_answer": "No"},
    ])
    out = tmp_path / "scores.json"
    r = run_cli("score", str(inp), "--config", str(config), "--judge", "smollm2", "--suites", "heuristic,semantic,standard",
                "--concurrency", "2", "--output", str(out))
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    entries = {e["id"]: e for e in doc["per_prompt"]["m"]}
    # every judge verdict is either a validated score or a recorded failure with the raw reply
    for e, rubric_keys in ((entries["a"], ["semantic"]), (entries["b"], ["semantic", "truthfulqa"])):
        for scorer in rubric_keys:
            scored = scorer in e or (scorer == "truthfulqa" and "truthfulness" in e.get("standard", {}))
            failed = scorer in e.get("failures", {})
            assert scored != failed
            if failed:
                assert e["failures"][scorer]["error"] and "raw" in e["failures"][scorer]
    assert doc["metadata"]["judge_model"] == "smollm2"
    jf = doc["counts"]["m"]["judge_failures"]
    assert jf == sum(len(e.get("failures", {})) for e in entries.values())
    if jf:
        stats = doc["model_stats"]["m"]
        assert stats.get("sovereignty", {}).get("failures", 0) + stats.get("truthfulness", {}).get("failures", 0) >= 1


_EVAL_IN_PROCESS = r"""
import sys
from cluster.cli import main
rc = main(sys.argv[1:])
print("RAY_IMPORTED" if "ray" in sys.modules else "RAY_NOT_IMPORTED", file=sys.stderr)
raise SystemExit(rc)
"""


@pytest.mark.engines
@pytest.mark.tsdb
def test_eval_records_through_the_result_writer_and_streams_to_influxdb(config, tmp_path, influxdb):
    """`eval` takes the watch job's path: ledger rows and InfluxDB points through the ResultWriter
    (in-process, Ray never imported), the summary at the end; a running job's `evaluating`
    checkpoint is left alone."""
    import httpx
    import yaml

    from checkpoints import Checkpoint, Ledger
    from evaluators import EvalTarget
    from evaluators.results import sample_points, summary_points

    influxdb.create_database("evals")
    doc = yaml.safe_load(config.read_text())
    doc["sinks"].update(spool_dir=str(tmp_path / "spool"), influx={
        "url": influxdb.url, "database": "evals", "token_env": None, "batch_size": 20, "flush_interval_ms": 50,
        "retry_interval_ms": 50, "max_retry_delay_ms": 300, "timeout_s": 5})
    config.write_text(yaml.safe_dump(doc))
    ck = Checkpoint(source="m3", run="adapters-x", iteration=100, path="/base/x/100.safetensors", dirname="adapters-x",
                    label="X @0000100", run_id="x-capability-auto", model_tag="smol", layout="mlx", size=1,
                    mtime=1.0, sha256="b" * 64)
    with Ledger(tmp_path / "ledger.sqlite") as lg:  # a watch job is evaluating this checkpoint right now
        lg.upsert(ck)
        lg.mark_staged(ck.id, "/staged/x")
        lg.mark_evaluating(ck.id)

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", _EVAL_IN_PROCESS, "eval", "--config", str(config), "--model", "smollm2",
                        "--probes", "capability", "--limit", "3", "--max-tokens", "16", "--json"],
                       capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "RAY_NOT_IMPORTED" in r.stderr
    s = json.loads(r.stdout)
    assert s["samples"] == 3 and s["new_samples"] == 3
    assert s["influx"]["pending"] == 0 and s["influx"]["owed"] == 0 and s["influx"]["written"] > 0

    info = EvalTarget.base("smollm2")
    with Ledger(tmp_path / "ledger.sqlite") as lg:
        assert lg.get(ck.id).state == "evaluating"  # not returned to `staged` under the running job
        recs = lg.samples("base:smollm2")
        assert lg.point_targets()["base:smollm2"] == {"info": {
            "target": "base:smollm2", "model": "smollm2", "run_id": "smollm2-base", "label": "base", "iteration": 0},
            "finished": True}
    want = [p for rec in recs for p in sample_points(rec, info)] + summary_points(recs, info)
    assert len(recs) == 3 and s["influx"]["written"] == len(want)

    def rows(q: str) -> list[dict]:
        res = influxdb.query(q, db="evals")["results"][0]
        return [dict(zip(x["columns"], v)) | x.get("tags", {}) for x in res.get("series", []) for v in x["values"]]

    probes = rows('SELECT passed FROM probe_score GROUP BY *')
    assert sorted(p["probe_id"] for p in probes) == ["math_01", "math_02", "math_03"]
    assert {(p["model"], p["run_id"], p["label"]) for p in probes} == {("smollm2", "smollm2-base", "base")}
    [overall] = rows("SELECT correct, total FROM capability_score WHERE category = 'overall'")
    assert overall["total"] == 3 and overall["correct"] == sum(p["passed"] for p in probes)
    assert len(rows("SELECT lek_score FROM heuristic_score")) == 3
    [progress] = rows("SELECT done, failed FROM eval_progress")
    assert (progress["done"], progress["failed"]) == (3, 0)
    stats = httpx.get(influxdb.url + "/debug/vars", timeout=5).json()
    assert sum(v["values"]["pointsWrittenOK"] for k, v in stats.items() if k.startswith("httpd")) == len(want)

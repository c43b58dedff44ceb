"""The ledger at the size of a long run: 1,000 checkpoints x 500 samples (500,000 samples).

Measured on one ledger file filled here (records shaped like the runner's, scores on three
fields): `evalcluster status` and `evalcluster report` as a user runs them (the command functions,
in this process), resume (the done sample keys of one checkpoint), and the cost of writing a
checkpoint's 500 samples at the start of the run (empty ledger) against the same at the end
(499,500 samples in it): the ratio says whether writing gets dearer as the run grows.

`python -m bench.ledger [--quick]` (quick: 100 checkpoints).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench._common import Row, table

RUN = "adapters-smollm2-long"


def _checkpoint(i: int):
    from checkpoints import Checkpoint

    it = (i + 1) * 100
    return Checkpoint(source="demo", run=RUN, iteration=it, path=f"/runs/{RUN}/{it:07d}_adapters.safetensors",
                      dirname=RUN, label=f"S135-long @{it:07d}", run_id="smollm2-long-capability-auto",
                      model_tag="smollm2-135m", layout="mlx", size=1_000_000, mtime=1.7e9 + i,
                      sha256=hashlib.sha256(str(i).encode()).hexdigest())


def _records(target: str, n: int, rng: random.Random) -> list[dict]:
    out = []
    for j in range(n):
        passed = rng.random() < 0.5
        out.append({
            "key": f"p{j:03d}#0@{hashlib.sha256(f'{target}{j}'.encode()).hexdigest()[:24]}",
            "target": target, "probe_set": "capability", "probe_set_hash": "h" * 16, "probe_id": f"p{j:03d}",
            "domain": "math", "category": "arith", "repeat": 0, "prompt": "What is 12 * 7? " * 4,
            "messages": [{"role": "system", "content": "You are a helpful assistant."},
                         {"role": "user", "content": "What is 12 * 7? " * 4}],
            "answer": "The answer is 84. " * 12, "finish_reason": "stop",
            "usage": {"prompt_tokens": 40, "completion_tokens": 128}, "latency_s": 1.2,
            "scores": {"heuristic": {"lek_score": rng.uniform(-5, 20), "compliance_markers": 0},
                       "exact": {"correct": passed}, "capability": {"passed": passed, "reason": "matched"}},
            "failures": {}, "provenance": {"model": "smollm2", "engine": "llamacpp", "target": target},
            "complete": True, "label": target, "iteration": None, "run_id": None, "created_at": 1.7e9,
        })
    return out


def _fill(path: Path, checkpoints: int, samples: int) -> tuple[float, float]:
    """The ledger of a long run; returns the seconds to write the first and the last checkpoint's samples."""
    from checkpoints import Ledger

    rng = random.Random(0)
    first = last = 0.0
    with Ledger(path) as ledger:
        ledger.record_samples(_records("base:smollm2", samples, rng))
        for i in range(checkpoints):
            e = ledger.upsert(_checkpoint(i))
            ledger.mark_staged(e.id, "/cache/x")
            ledger.mark_evaluating(e.id)
            recs = _records(e.id, samples, rng)
            if 0 < i < checkpoints - 1:
                ledger.record_samples(recs)  # the bulk of the run: one commit per checkpoint, to fill it fast
            else:
                t0 = time.perf_counter()
                for k in range(0, samples, 4):  # timed as the writer writes: a few samples per commit
                    ledger.record_samples(recs[k:k + 4])
                dt = time.perf_counter() - t0
                first, last = (dt, last) if i == 0 else (first, dt)
            ledger.mark_scored(e.id)
    return first, last


def _config(tmp: Path, ledger: Path) -> Path:
    """The shipped config with its ledger here (and its paths made absolute)."""
    import yaml

    root = Path(__file__).resolve().parent.parent
    data = yaml.safe_load((root / "ray_config.yaml").read_text())
    data["models"][0]["path"] = str(root / data["models"][0]["path"])
    data["sources"][0]["path"] = str(tmp / "runs")
    data["sinks"].update(ledger=str(ledger), spool_dir=str(tmp / "spool"))
    data["sinks"]["influx"]["url"] = ""
    cfg = tmp / "bench.yaml"
    cfg.write_text(yaml.safe_dump(data))
    return cfg


def _cli_time(argv: list[str], rounds: int) -> float:
    import contextlib
    import io

    from cluster.cli import main

    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            rc = main(argv)
        times.append(time.perf_counter() - t0)
        if rc:
            raise RuntimeError(f"evalcluster {' '.join(argv)} exited {rc}")
    return statistics.median(times)


def run(quick: bool = False) -> list[Row]:
    from checkpoints import Ledger

    n_ck, n_s = (100, 500) if quick else (1000, 500)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-ledger-") as d:
        tmp = Path(d)
        path = tmp / "ledger.sqlite"
        t0 = time.perf_counter()
        first, last = _fill(path, n_ck, n_s)
        fill_s = time.perf_counter() - t0
        size = f"{n_ck:,} checkpoints x {n_s} samples"
        rows.append(Row("ledger", f"write a checkpoint's {n_s} samples, last of {n_ck:,} (batches of 4)", last, "s",
                        last / first, "the first checkpoint's, empty ledger",
                        f"filled in {fill_s:.0f} s; {path.stat().st_size / 1e9:.2f} GB; synchronous=FULL"))
        from cluster._report import warm_report

        with Ledger(path) as ledger:
            t0 = time.perf_counter()
            warm_report(ledger, RUN)  # nothing kept yet: every figure computed, as a first report does
            cold = time.perf_counter() - t0
        cfg = _config(tmp, path)
        st = _cli_time(["status", "--config", str(cfg)], 3)
        rows.append(Row("ledger", f"`evalcluster status`, {size}", st, "s", note="aggregate queries + score sums"))
        with Ledger(path) as ledger:
            last = ledger.list()[-1].id
            ledger.record_samples(_records(last, 1, random.Random(1)))  # its first sample answered again
            t0 = time.perf_counter()
            warm_report(ledger, RUN)  # what the writer does when a checkpoint is scored
            warm = time.perf_counter() - t0
        rows.append(Row("ledger", f"report figures, nothing kept yet (a first report), {size}", cold, "s",
                        note="every sample parsed; intervals and paired deltas per checkpoint"))
        rows.append(Row("ledger", f"the writer's report figures when the last checkpoint changes, {size}", warm, "s",
                        warm / cold, "nothing kept", "only that checkpoint's figures and comparisons computed"))
        out = tmp / "report.html"
        rp = _cli_time(["report", "--config", str(cfg), "--out", str(out)], 3)
        rows.append(Row("ledger", f"`evalcluster report`, {size}", rp, "s", rp / cold, "nothing kept",
                        note="figures kept by the writer (beside the ledger, under its samples' versions)"))
        with Ledger(path, readonly=True) as ledger:
            ids = [e.id for e in ledger.list()]
            t0 = time.perf_counter()
            for i in ids[-20:]:
                keys = ledger.sample_keys(i)
            rs = (time.perf_counter() - t0) / 20
        assert len(keys) == n_s
        rows.append(Row("ledger", f"resume: done sample keys of one checkpoint, {size}", rs, "s",
                        note="index on samples(target)"))
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m bench.ledger")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    print(table(run(quick=args.quick)))

"""The tables `status`, `checkpoints list` and the learning curve print, at 80 and 140 columns:
every line fits, no cell is cut short ("adap…"), run names are whole."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from checkpoints import Checkpoint, Ledger

ROOT = Path(__file__).resolve().parent.parent
RUN = "adapters-smollm2-a-rather-long-run-name"


def checkpoint(i: int) -> Checkpoint:
    it = (i + 1) * 1000
    return Checkpoint(source="demo", run=RUN, iteration=it, path=f"/runs/{RUN}/{it:07d}_adapters.safetensors",
                      dirname=RUN, label=f"S135-rather-long @{it:07d}", run_id="smollm2-rather-long-capability-auto",
                      model_tag="smollm2-135m", layout="mlx", size=123_456_789, mtime=1.7e9 + i, sha256=f"{i:064x}")


def samples(target: str, n: int, k: int) -> list[dict]:
    return [{"key": f"p{j}#0@{target[:8]}", "target": target, "probe_set": "capability", "probe_id": f"p{j}",
             "repeat": 0, "complete": True, "failures": {}, "provenance": {"model": "smollm2"},
             "scores": {"capability": {"passed": j < k}, "heuristic": {"lek_score": j / 3},
                        "exact": {"correct": j < k}}} for j in range(n)]


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("tables")
    data = yaml.safe_load((ROOT / "ray_config.yaml").read_text())
    data["models"][0]["path"] = str(ROOT / data["models"][0]["path"])
    data["sources"][0]["path"] = str(tmp / "runs")
    data["sinks"].update(ledger=str(tmp / "ledger.sqlite"), spool_dir=str(tmp / "spool"))
    data["sinks"]["influx"]["url"] = ""
    cfg = tmp / "tables.yaml"
    cfg.write_text(yaml.safe_dump(data))
    with Ledger(tmp / "ledger.sqlite") as ledger:
        ledger.record_samples(samples("base:smollm2", 10, 0))
        for i, passed in enumerate((4, 5, 10)):  # the last one significantly better than the base
            e = ledger.upsert(checkpoint(i))
            ledger.mark_staged(e.id, "/cache/x")
            ledger.mark_evaluating(e.id)
            ledger.record_samples(samples(e.id, 10, passed))
            ledger.mark_scored(e.id)
        ledger.upsert(checkpoint(3))
    return cfg


def cli(width: int, *argv: str) -> str:
    env = {**os.environ, "COLUMNS": str(width), "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "cluster.cli", *argv], capture_output=True, text=True, env=env,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r.stdout


def fits(out: str, width: int) -> list[str]:
    lines = out.splitlines()
    assert all(len(line) <= width for line in lines), [line for line in lines if len(line) > width]
    assert "…" not in out
    return lines


@pytest.mark.parametrize("width", [80, 140])
def test_status_reads_whole(config, width):
    out = cli(width, "status", "--config", str(config), "--address", "http://127.0.0.1:9")
    lines = fits(out, width)
    row = next(line for line in lines if RUN in line)  # the run name whole, on its row
    assert row.split()[:5] == [RUN, "3", "1", "0", "0"]  # scored, pending, failed, quarantined
    assert "100%" in row and "1.500" in row  # the last checkpoint's capability accuracy (10 of 10), LEK
    assert "done: scored" in out  # short headings are explained
    if width >= 140:
        assert row.count("@0003000") == 2  # the last scored and the best, by their iteration


@pytest.mark.parametrize("width", [80, 140])
def test_checkpoints_list_reads_whole(config, tmp_path, width):
    run = tmp_path / RUN
    run.mkdir()
    for it in (100, 200):
        (run / f"{it:07d}_adapters.safetensors").write_bytes(b"x" * 10)
    out = cli(width, "checkpoints", "list", "--path", str(tmp_path), "--hash")
    lines = fits(out, width)
    rows = [line for line in lines if RUN in line]
    assert len(rows) == 2
    for row in rows:
        ident = row.split()[-1]
        assert len(ident) >= 12 and ident != "-"  # the id `checkpoints retry` takes, whole


@pytest.mark.parametrize("width", [80, 140])
def test_learning_curve_table_reads_whole(config, width):
    from rich.console import Console

    from cluster._report import curve_table, learning_curves

    with Ledger(yaml.safe_load(config.read_text())["sinks"]["ledger"], readonly=True) as ledger:
        curve = learning_curves(ledger)[0]
    console = Console(width=width, record=True, file=open(os.devnull, "w"))
    console.print(curve_table(curve, width))
    out = console.export_text()
    fits(out, width)
    for label in ("base", "S135-rather-long @0001000", "S135-rather-long @0003000 ★"):
        assert label in out
    assert "100%" in out and "50%" in out and "40%" in out and "0%" in out

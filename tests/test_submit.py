"""`evalcluster submit -- watch --once` against a `ray start --head` cluster on loopback, then `status`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.engines, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
from _servers import free_port  # noqa: E402
from test_watch import write_checkpoint  # noqa: E402


def test_submit_runs_the_job_and_status_shows_it(ray_head, smollm2_gguf, tmp_path):
    url, env = ray_head.dashboard_url, ray_head.env
    base = tmp_path / "runs"
    write_checkpoint(base / "adapters-smol-sub", 100, seed=21)
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"""
cluster: {{address: local, serve: {{port: {free_port()}}}}}
models:
  - {{name: smollm2, engine: llamacpp, path: {smollm2_gguf}, resources: {{llamacpp: 1}}, options: {{parallel: 4}}}}
sources:
  - {{name: runs, kind: local, path: {base}, layout: mlx, model: smollm2,
     adapter_meta: [{{prefix: smol, tag: smollm2-135m, short: S}}]}}
probes: {{sets: [capability], max_tokens: 32, limit: 8}}
staging: {{cache_dir: {tmp_path / 'cache'}}}
sinks: {{ledger: {tmp_path / 'ledger.sqlite'}, spool_dir: {tmp_path / 'spool'}}}
poll_interval_s: 1
""")
    cli = [sys.executable, "-m", "cluster.cli"]
    r = subprocess.run(cli + ["submit", "--config", str(cfg), "--address", url, "--", "watch", "--once"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=1500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    first = r.stdout.splitlines()[0]
    assert first.startswith("job ") and f"dashboard: {url}/#/jobs/" in first, first
    job_id = first.split()[1]
    assert f"job {job_id}: SUCCEEDED" in r.stdout
    assert "S-sub @0000100" in r.stdout  # the job's own output: its learning-curve table
    r = subprocess.run(cli + ["status", "--config", str(cfg), "--address", url, "--json"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert status["runs"][0]["states"] == {"scored": 1}
    assert any(j["id"] == job_id and j["status"] == "SUCCEEDED" for j in status["jobs"]), status["jobs"]

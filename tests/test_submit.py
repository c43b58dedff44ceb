"""`evalcluster submit -- watch --once` against a `ray start --head` cluster on loopback, then `status`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.engines, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
from _servers import free_port, wait_until  # noqa: E402
from test_watch import write_checkpoint  # noqa: E402


def _cluster_pids(temp_dir: str) -> list[int]:
    """The head's processes: everything whose command line names this cluster's temp dir."""
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in part for part in p.info["cmdline"] or []):
                pids.append(p.info["pid"])
        except psutil.Error:
            continue
    return pids


@pytest.fixture
def ray_head(tmp_path):
    """A `ray start --head` cluster bound to loopback; stopped by PID (its processes and their children)."""
    import psutil

    temp_dir = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")  # short: socket paths must fit 107 bytes
    port, dash, metrics = free_port(), free_port(), free_port()
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    subprocess.run([str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--metrics-export-port={metrics}",
                    "--num-cpus=4", "--dashboard-agent-listen-port=0", '--resources={"llamacpp": 4}', "--disable-usage-stats",
                    f"--temp-dir={temp_dir}"], check=True, env=env, capture_output=True, timeout=180)
    url = f"http://127.0.0.1:{dash}"
    import httpx

    wait_until(lambda: httpx.get(url + "/api/version", timeout=2).status_code == 200, 120, "the Ray dashboard")
    yield url, env
    procs = []
    for pid in _cluster_pids(temp_dir):
        try:
            p = psutil.Process(pid)
            procs += [p, *p.children(recursive=True)]
        except psutil.Error:
            pass
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=20)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def test_submit_runs_the_job_and_status_shows_it(ray_head, smollm2_gguf, tmp_path):
    url, env = ray_head
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
probes: {{sets: [capability], max_tokens: 32}}
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

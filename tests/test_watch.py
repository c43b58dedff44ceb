"""The main job end to end against real parts: checkpoints appear on an OpenSSH server while the
watch job runs; each is evaluated exactly once; every sample is in the ledger; InfluxDB holds
exactly the expected points. Then the same under faults."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.engines, pytest.mark.ssh, pytest.mark.tsdb, pytest.mark.slow]

sys.path.insert(0, str(Path(__file__).parent))
from _adapters import SMOLLM2_DIMS, random_lora, write_mlx  # noqa: E402
from _servers import free_port  # noqa: E402

PROBE_TOKENS = 48


def write_checkpoint(run: Path, iteration: int, seed: int) -> Path:
    """A real (random) MLX LoRA checkpoint in go-ml's layout, written the way a trainer does."""
    tmp = run.parent / f".tmp-{iteration}"
    write_mlx(random_lora(SMOLLM2_DIMS, seed=seed, std_b=0.05), tmp)
    run.mkdir(parents=True, exist_ok=True)
    cfg = run / "adapter_config.json"
    if not cfg.exists():
        os.replace(tmp / "adapter_config.json", cfg)
    dest = run / f"{iteration:07d}_adapters.safetensors"
    os.replace(tmp / "adapters.safetensors", dest)
    (run / "adapters.safetensors").write_bytes(dest.read_bytes())  # the rolling file: not a checkpoint
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()
    return dest


def job_config(tmp: Path, sshd, influxdb, gguf: Path, base: Path):
    from cluster.config import parse_config

    return parse_config({
        "cluster": {"serve": {"port": free_port()}},
        "models": [{"name": "smollm2", "engine": "llamacpp", "path": str(gguf), "resources": {"llamacpp": 1},
                    "max_adapters_per_replica": 3, "options": {"parallel": 4, "ctx_size": 4096}}],
        "sources": [{"name": "trainer", "kind": "ssh", "host": sshd.host, "port": sshd.port, "user": sshd.user,
                     "key": str(sshd.key), "known_hosts": str(sshd.known_hosts), "base": str(base),
                     "layout": "mlx", "model": "smollm2",
                     "adapter_meta": [{"prefix": "smol", "tag": "smollm2-135m", "short": "S"}]}],
        "probes": {"sets": ["capability"], "max_tokens": PROBE_TOKENS},
        "scorers": ["heuristic", "exact", "capability"],
        "budgets": {"per_endpoint": 4, "checkpoints": 2},
        "staging": {"cache_dir": str(tmp / "cache")},
        "sinks": {"ledger": str(tmp / "ledger.sqlite"), "spool_dir": str(tmp / "spool"),
                  "influx": {"url": influxdb.url, "protocol": "v1", "database": "training",
                             "batch_size": 200, "flush_interval_ms": 200}},
        "poll_interval_s": 1,
        "retry_backoff_s": 1,
    }, "watch-test")


def run_in_thread(cfg):
    from cluster._job import run_watch

    stop = threading.Event()
    box: dict = {}

    def target():
        try:
            box["result"] = run_watch(cfg, stop=stop, on_poll=lambda st: box.__setitem__("last", st))
        except BaseException as e:  # noqa: BLE001 - re-raised in the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, stop, box


def wait_for(cond, timeout: float, what: str, box: dict | None = None, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if box is not None and "error" in box:
            raise box["error"]
        if cond():
            return
        time.sleep(interval)
    import json

    last = json.dumps((box or {}).get("last"), indent=1, default=str)
    print(f"timed out waiting for {what}; last status:\n{last}", file=sys.stderr)
    raise AssertionError(f"timed out waiting for {what}")


def ledger_counts(path: Path) -> dict:
    from checkpoints import Ledger

    if not path.exists():
        return {}
    led = Ledger(path, readonly=True)
    try:
        return led.counts()
    finally:
        led.close()


def check_report_and_status(cfg, tmp_path: Path) -> None:
    """`evalcluster status` and `report` as a user runs them, on the ledger the job wrote."""
    import json
    import subprocess

    import yaml

    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.absolute_dump()))
    cli = [sys.executable, "-m", "cluster.cli"]
    r = subprocess.run(cli + ["status", "--config", str(cfg_file), "--json", "--address", "http://127.0.0.1:9"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    runs = json.loads(r.stdout)["runs"]
    assert [x["run"] for x in runs] == ["adapters-smol-e2e"]
    assert runs[0]["states"] == {"scored": 3} and runs[0]["last"]["label"] == "S-e2e @0000300"
    assert runs[0]["best"] in {"S-e2e @0000100", "S-e2e @0000200", "S-e2e @0000300"}
    out = tmp_path / "report.html"
    r = subprocess.run(cli + ["report", "adapters-smol-e2e", "--config", str(cfg_file), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    page = out.read_text()
    assert page.count("<svg") >= 2 and "base model" in page  # curves with the base as reference line
    assert "Checkpoint deltas (paired)" in page and "S-e2e @0000200" in page
    assert "Best checkpoint so far" in page
    r = subprocess.run(cli + ["report", "no-such-run", "--config", str(cfg_file), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "no run 'no-such-run'" in r.stderr and "adapters-smol-e2e" in r.stderr


def influx_count(influxdb, measurement: str) -> int:
    res = influxdb.query(f'SELECT COUNT(*) FROM "{measurement}"', db="training")
    series = res["results"][0].get("series")
    if not series:
        return 0
    cols, vals = series[0]["columns"], series[0]["values"][0]
    return max(v for c, v in zip(cols, vals) if c.startswith("count_"))


def check_exactly_once(tmp: Path, influxdb, n_checkpoints: int) -> None:
    """Every checkpoint scored once, every sample recorded once, InfluxDB holds exactly the points."""
    from checkpoints import Ledger
    from evaluators import load_probe_set

    probes = load_probe_set("capability").probes
    categories = {p.category for p in probes}
    led = Ledger(tmp / "ledger.sqlite", readonly=True)
    try:
        scored = led.list(state="scored")
        assert len(scored) == n_checkpoints, [(e.checkpoint.label, e.state, e.last_error) for e in led.list()]
        targets = [e.id for e in scored] + ["base:smollm2"]
        for t in targets:
            samples = led.samples(t)
            keys = [s["key"] for s in samples]
            assert len(samples) == len(probes) and len(set(keys)) == len(keys), (t, len(samples))
            assert all(s["complete"] for s in samples), t
            assert {s["probe_id"] for s in samples} == {p.id for p in probes}
    finally:
        led.close()
    n_targets = n_checkpoints + 1
    assert influx_count(influxdb, "probe_score") == n_targets * len(probes)
    assert influx_count(influxdb, "heuristic_score") == n_targets * len(probes)
    assert influx_count(influxdb, "capability_score") == n_targets * (1 + len(categories))


def metrics_text(port: int) -> str:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    except httpx.HTTPError:
        return ""


@pytest.mark.timeout(2400)
def test_watch_job_end_to_end(ray_cluster, ray_metrics_port, sshd, influxdb, smollm2_gguf, tmp_path):
    influxdb.create_database("training")
    base = tmp_path / "remote"
    run = base / "adapters-smol-e2e"
    write_checkpoint(run, 100, seed=1)
    cfg = job_config(tmp_path, sshd, influxdb, smollm2_gguf, base)
    thread, stop, box = run_in_thread(cfg)
    try:
        wait_for(lambda: ledger_counts(tmp_path / "ledger.sqlite").get("scored", 0) >= 1, 900,
                 "the first checkpoint to be scored", box)
        # Two more land while the job runs; the second is written slowly in place, chunk by chunk
        # across several polls, as a trainer streaming to disk would: it must not be taken early.
        write_checkpoint(run, 200, seed=2)
        full = write_checkpoint(base / "staging-area", 300, seed=3)
        data = full.read_bytes()
        with open(run / "0000300_adapters.safetensors", "wb") as fh:
            for i in range(0, len(data), len(data) // 20 + 1):
                fh.write(data[i: i + len(data) // 20 + 1])
                fh.flush()
                time.sleep(0.25)
        wait_for(lambda: ledger_counts(tmp_path / "ledger.sqlite").get("scored", 0) >= 3, 900,
                 "all three checkpoints to be scored", box)
        # The job's custom metrics reach the cluster's Prometheus endpoint (Ray exports every ~10 s).
        wanted = ("ray_evalcluster_checkpoints_scored", "ray_evalcluster_generation_latency_seconds",
                  "ray_evalcluster_last_accuracy", "ray_evalcluster_samples")
        wait_for(lambda: all(w in metrics_text(ray_metrics_port) for w in wanted), 120, "the job's metrics", box)
        text = metrics_text(ray_metrics_port)
        scored = [line for line in text.splitlines() if line.startswith("ray_evalcluster_checkpoints_scored")]
        assert any('run="adapters-smol-e2e"' in line and line.rstrip().endswith(" 3.0") for line in scored), scored
    finally:
        stop.set()
        thread.join(300)
    assert "error" not in box, box.get("error")
    res = box["result"]
    assert res.stopped_by_signal and res.counts.get("scored") == 3, res.counts
    assert not res.counts.get("quarantined"), res.counts  # the slowly written file was never taken half-written
    assert res.sink["spooled"] == 0 or res.sink["pending"] == 0
    check_exactly_once(tmp_path, influxdb, 3)
    # The half-written file was never taken: one version of iteration 300, scored.
    from checkpoints import Ledger

    led = Ledger(tmp_path / "ledger.sqlite", readonly=True)
    try:
        its = sorted(e.checkpoint.iteration for e in led.list())
        assert its == [100, 200, 300], its
        labels = sorted(e.checkpoint.label for e in led.list())
        assert labels == ["S-e2e @0000100", "S-e2e @0000200", "S-e2e @0000300"], labels
    finally:
        led.close()
    check_report_and_status(cfg, tmp_path)


@pytest.mark.timeout(3600)
def test_watch_job_survives_faults(ray_cluster, sshd, influxdb, smollm2_gguf, tmp_path):
    """Engine killed, coordinator killed, InfluxDB and the SSH server restarted, a corrupt checkpoint:
    nothing lost, nothing counted twice."""
    import ray
    from ray import serve

    from cluster._coordinator import COORDINATOR_NAME
    from deployments._serve import APP_NAME, deployment_name

    influxdb.create_database("training")
    base = tmp_path / "remote"
    run = base / "adapters-smol-faults"
    write_checkpoint(run, 100, seed=11)
    write_checkpoint(run, 200, seed=12)
    (run / "0000150_adapters.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + b"\0" * 64)
    cfg = job_config(tmp_path, sshd, influxdb, smollm2_gguf, base)
    ledger = tmp_path / "ledger.sqlite"
    thread, stop, box = run_in_thread(cfg)
    try:
        def samples_recorded() -> int:
            from checkpoints import Ledger

            if not ledger.exists():
                return 0
            led = Ledger(ledger, readonly=True)
            try:
                return sum(t["samples"] for t in led.targets())
            finally:
                led.close()

        wait_for(lambda: samples_recorded() >= 8, 900, "the first samples", box)
        # 1. The llama.cpp server under the Serve replica is killed mid-run.
        handle = serve.get_deployment_handle(deployment_name("smollm2"), APP_NAME)
        pid = handle.info.remote().result(timeout_s=60)["extra"]["base_pid"]
        os.kill(pid, signal.SIGKILL)
        # 2. The coordinator actor is killed (Ray restarts it; the driver restarts its loop).
        ray.kill(ray.get_actor(COORDINATOR_NAME), no_restart=False)
        # 3. InfluxDB goes away for a while: points wait in the spool.
        n = samples_recorded()
        influxdb.stop()
        wait_for(lambda: samples_recorded() >= n + 6, 900, "samples while InfluxDB is down", box)
        influxdb.start()
        # 4. The SSH server restarts while a new checkpoint lands.
        sshd.stop()
        write_checkpoint(run, 300, seed=13)
        time.sleep(3)
        sshd.start()
        wait_for(lambda: ledger_counts(ledger).get("scored", 0) >= 3, 1800, "every good checkpoint scored", box)
    finally:
        stop.set()
        thread.join(300)
    assert "error" not in box, box.get("error")
    counts = box["result"].counts
    assert counts.get("scored") == 3 and counts.get("quarantined") == 1, counts
    from checkpoints import Ledger

    led = Ledger(ledger, readonly=True)
    try:
        (bad,) = led.list(state="quarantined")
        assert bad.checkpoint.iteration == 150 and "0000150_adapters.safetensors" in bad.last_error
    finally:
        led.close()
    check_exactly_once(tmp_path, influxdb, 3)

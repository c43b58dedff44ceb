"""The main job end to end against real parts: checkpoints appear on an OpenSSH server while the
watch job runs; each is evaluated exactly once; every sample is in the ledger; InfluxDB holds
exactly the expected points, each sent once. Then the same under faults, each fault's effect
checked on its own; and SIGTERM to the `evalcluster watch` command, then a resuming restart."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.engines, pytest.mark.ssh, pytest.mark.tsdb, pytest.mark.slow]

sys.path.insert(0, str(Path(__file__).parent))
from _adapters import SMOLLM2_DIMS, random_lora, write_mlx  # noqa: E402
from _servers import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROBE_TOKENS = 24  # the answers only need to exist; generation is most of these tests' time
PROBE_LIMIT = 8  # of the 23 capability probes (`probes.limit`): enough to show every count and state
SCORERS = ["heuristic", "exact", "capability"]


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


def job_config(tmp: Path, sshd, influxdb, gguf: Path, base: Path, max_tokens: int = PROBE_TOKENS,
               limit: int | None = PROBE_LIMIT, sets: tuple[str, ...] = ("capability",)):
    from cluster.config import parse_config

    return parse_config({
        "cluster": {"serve": {"port": free_port()}},
        "models": [{"name": "smollm2", "engine": "llamacpp", "path": str(gguf), "resources": {"llamacpp": 1},
                    "max_adapters_per_replica": 3, "options": {"parallel": 4, "ctx_size": 4096}}],
        "sources": [{"name": "trainer", "kind": "ssh", "host": sshd.host, "port": sshd.port, "user": sshd.user,
                     "key": str(sshd.key), "known_hosts": str(sshd.known_hosts), "base": str(base),
                     "layout": "mlx", "model": "smollm2",
                     "adapter_meta": [{"prefix": "smol", "tag": "smollm2-135m", "short": "S"}]}],
        "probes": {"sets": list(sets), "max_tokens": max_tokens, "limit": limit},
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


def ledger_if_ready(path: Path):
    """The job's ledger opened read-only, or None while the job has not created it yet."""
    from checkpoints import Ledger, LedgerNotReady

    if not path.exists():
        return None
    try:
        return Ledger(path, readonly=True)
    except LedgerNotReady:  # the job is creating it this moment
        return None


def ledger_counts(path: Path) -> dict:
    led = ledger_if_ready(path)
    if led is None:
        return {}
    with led:
        return led.counts()


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
    # A best checkpoint only when it beats the base significantly; the verdict says which it is.
    assert runs[0]["best"] in {None, "S-e2e @0000100", "S-e2e @0000200", "S-e2e @0000300"}
    assert runs[0]["verdict"].startswith("Best checkpoint:" if runs[0]["best"] else "No checkpoint is distinguishable")
    out = tmp_path / "report.html"
    r = subprocess.run(cli + ["report", "adapters-smol-e2e", "--config", str(cfg_file), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    page = out.read_text()
    assert page.count("<svg") >= 2 and "base model" in page  # curves with the base as reference line
    assert "Checkpoint deltas (paired)" in page and "S-e2e @0000200" in page
    assert ("Best checkpoint:" in page) == (runs[0]["best"] is not None) and "95% interval [" in page
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


def influx_measurements(influxdb) -> set[str]:
    res = influxdb.query("SHOW MEASUREMENTS", db="training")
    series = res["results"][0].get("series") or []
    return {v[0] for sr in series for v in sr["values"]}


def influx_points_received(influxdb) -> int:
    """Points this InfluxDB process accepted on /write since it started (its in-memory counter:
    a point sent twice counts twice, though it is stored once)."""
    import httpx

    stats = httpx.get(influxdb.url + "/debug/vars", timeout=10).json()
    return sum(v["values"].get("pointsWrittenOK", 0) for k, v in stats.items() if k.startswith("httpd"))


def expected_points(ledger_path: Path, source_models: dict[str, str] | None = None) -> tuple[dict[str, int], int]:
    """From the ledger: per measurement, the distinct points (measurement, tags, timestamp) its
    samples imply; and how many points writing each sample and each target's summary once makes.

    Args:
        ledger_path: the job's ledger.
        source_models: source -> the model it feeds (default: the one source "trainer" -> smollm2).
    """
    from checkpoints import Ledger
    from evaluators import EvalTarget
    from evaluators.results import sample_points, summary_points

    source_models = source_models or {"trainer": "smollm2"}
    led = Ledger(ledger_path, readonly=True)
    try:
        # Named as the coordinator names them (checkpoint labels and run ids; go-ml's base naming).
        infos = {e.id: EvalTarget.of_checkpoint(e.checkpoint, source_models[e.checkpoint.source])
                 for e in led.list(state="scored")}
        for model in set(source_models.values()):
            infos[f"base:{model}"] = EvalTarget.base(model)
        identities: dict[str, set] = {}
        total = 0
        for target, info in infos.items():
            records = led.samples(target)
            points = [p for r in records for p in sample_points(r, info)] + summary_points(records, info)
            total += len(points)
            for p in points:
                identities.setdefault(p.measurement, set()).add((tuple(sorted(p.tags.items())), p.time_ns))
    finally:
        led.close()
    return {m: len(ids) for m, ids in identities.items()}, total


def check_exactly_once(tmp: Path, influxdb, n_checkpoints: int, sink: dict, received: int,
                       limit: int | None = PROBE_LIMIT, mc: bool = False) -> None:
    """Every checkpoint scored once, every sample recorded once, InfluxDB holds exactly the points,
    and each point was written by the job once and received by InfluxDB once.

    Args:
        sink: the writer's final sink stats.
        received: the points InfluxDB accepted over the run (summed across its restarts).
        limit: the job's `probes.limit`.
        mc: the job also asked the built-in multiple-choice set (mc-basic).
    """
    from checkpoints import Ledger
    from evaluators import load_probe_set

    probes = load_probe_set("capability").probes[:limit]
    items = load_probe_set("mc-basic").probes[:limit] if mc else ()
    categories = {p.category for p in probes}
    led = Ledger(tmp / "ledger.sqlite", readonly=True)
    try:
        scored = led.list(state="scored")
        assert len(scored) == n_checkpoints, [(e.checkpoint.label, e.state, e.last_error) for e in led.list()]
        assert not led.list(state="evaluating")
        targets = [e.id for e in scored] + ["base:smollm2"]
        n_exact = 0
        for t in targets:
            samples = led.samples(t)
            keys = [s["key"] for s in samples]
            assert len(samples) == len(probes) + len(items) and len(set(keys)) == len(keys), (t, len(samples))
            assert all(s["complete"] for s in samples), t
            choice = [s for s in samples if s["probe_set"] == "mc-basic"]
            samples = [s for s in samples if s["probe_set"] != "mc-basic"]
            assert {s["probe_id"] for s in samples} == {p.id for p in probes}
            assert all(set(s["scores"]) <= set(SCORERS) and "heuristic" in s["scores"] for s in samples), t
            # the multiple-choice items through Serve: scored by loglikelihood, no generative scorer
            assert {s["probe_id"] for s in choice} == {p.id for p in items}, t
            by_id = {p.id: p for p in items}
            assert all(set(s["scores"]) == {"choice"} and s["answer"] in by_id[s["probe_id"]].choices
                       for s in choice), t
            n_exact += sum("exact" in s["scores"] for s in samples)
        assert set(led.finished()) == {"base:smollm2"}  # the base's summary is recorded as written
    finally:
        led.close()
    per_measurement, total = expected_points(tmp / "ledger.sqlite")
    n_targets = n_checkpoints + 1
    # What the schema says each target makes, counted from the samples (so the derivation above is
    # the one meant): a probe_score and a heuristic_score per probe, an exact_match per exact-scored
    # sample, capability_score overall and per category, one eval_progress, score_summary per field.
    assert per_measurement["probe_score"] == n_targets * len(probes)
    assert per_measurement["heuristic_score"] == n_targets * len(probes)
    assert per_measurement.get("exact_match", 0) == n_exact
    assert per_measurement["capability_score"] == n_targets * (1 + len(categories))
    assert per_measurement["eval_progress"] == n_targets
    assert per_measurement.get("choice_score", 0) == n_targets * len(items)
    assert per_measurement["score_summary"] >= n_targets * 3  # LEK, capability pass rate, ... per target
    assert sum(per_measurement.values()) == total  # no two points of the job overwrite each other
    # InfluxDB holds exactly these: every measurement, no other, each with the expected count.
    assert influx_measurements(influxdb) == set(per_measurement)
    stored = {m: influx_count(influxdb, m) for m in per_measurement}
    assert stored == per_measurement, (stored, per_measurement)
    # Nothing counted twice. Stored counts cannot show it (a point sent again overwrites itself):
    # the writer took each point once (no sample recorded twice, no summary rewritten)...
    assert sink["written"] == total and sink["failed"] == 0 and sink["pending"] == 0, (sink, total)
    assert sink["sent"] + sink["replayed"] == total, sink
    # ...and InfluxDB received each once (no batch resent).
    assert received == total, (received, total)


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
    cfg = job_config(tmp_path, sshd, influxdb, smollm2_gguf, base, sets=("capability", "mc-basic"))
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
                  "ray_evalcluster_last_accuracy", "ray_evalcluster_samples", "ray_evalcluster_samples_in_flight",
                  "ray_evalcluster_engine_tokens_per_s", "ray_evalcluster_last_lek",
                  "ray_evalcluster_last_choice_accuracy")
        def scored_three(text: str) -> bool:
            # The counter reaches 3 for the run (an export can lag the last checkpoint: wait for it).
            return any(line.startswith("ray_evalcluster_checkpoints_scored") and 'run="adapters-smol-e2e"' in line
                       and line.rstrip().endswith(" 3.0") for line in text.splitlines())

        wait_for(lambda: all(w in (t := metrics_text(ray_metrics_port)) for w in wanted) and scored_three(t), 120,
                 "the job's metrics", box)
        text = metrics_text(ray_metrics_port)
        lek = [line for line in text.splitlines() if line.startswith("ray_evalcluster_last_lek{")]
        assert any('run="' in line for line in lek), lek  # per run, a value once a checkpoint is scored
    finally:
        stop.set()
        thread.join(300)
    assert "error" not in box, box.get("error")
    res = box["result"]
    assert res.stopped_by_signal and res.counts.get("scored") == 3, res.counts
    assert not res.counts.get("quarantined"), res.counts  # the slowly written file was never taken half-written
    assert res.sink["spooled"] == 0 or res.sink["pending"] == 0
    check_exactly_once(tmp_path, influxdb, 3, res.sink, influx_points_received(influxdb), mc=True)
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


def samples_recorded(ledger: Path, target: str | None = None) -> int:
    """Samples in the ledger (of one target, or of all)."""
    from checkpoints import Ledger

    if not ledger.exists():
        return 0
    led = Ledger(ledger, readonly=True)
    try:
        return sum(t["samples"] for t in led.targets() if target is None or t["target"] == target)
    finally:
        led.close()


def checkpoints_in(ledger: Path, state: str) -> list[str]:
    from checkpoints import Ledger

    if not ledger.exists():
        return []
    led = Ledger(ledger, readonly=True)
    try:
        return [e.id for e in led.list(state=state)]
    finally:
        led.close()


def finished_targets(ledger: Path) -> dict[str, str]:
    from checkpoints import Ledger

    if not ledger.exists():
        return {}
    led = Ledger(ledger, readonly=True)
    try:
        return led.finished()
    finally:
        led.close()


def hold_writer_fn():
    """A function for the writer actor's `__ray_call__`: deliver everything, signal, then take no
    call (so no new point) until released. While it holds, InfluxDB's received counter is final
    for this InfluxDB process. Built here so cloudpickle ships it by value (the tests directory
    is not importable in Ray's workers)."""

    def hold(writer, flags: str) -> bool:
        ok = writer.flush(120)
        Path(flags, "held").touch()
        while not Path(flags, "release").exists():
            time.sleep(0.05)  # waiting for the test's go-ahead, not measuring anything
        return ok

    return hold


@pytest.mark.timeout(3600)
def test_watch_job_survives_faults(ray_cluster, sshd, influxdb, smollm2_gguf, tmp_path):
    """Engine killed, coordinator killed, InfluxDB and the SSH server restarted, a corrupt checkpoint:
    each fault has its effect, and nothing is lost, nothing counted twice."""
    import ray
    from ray import serve
    from ray.exceptions import RayActorError

    from cluster._coordinator import COORDINATOR_NAME
    from cluster._watcher import watcher_name
    from cluster._writer import WRITER_NAME
    from cluster.runtime import job_scoped
    from deployments._serve import deployment_name, model_app

    influxdb.create_database("training")
    base = tmp_path / "remote"
    run = base / "adapters-smol-faults"
    write_checkpoint(run, 100, seed=11)
    write_checkpoint(run, 200, seed=12)
    (run / "0000150_adapters.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + b"\0" * 64)
    # Longer answers than the other tests': each fault must land while a target is still evaluated.
    cfg = job_config(tmp_path, sshd, influxdb, smollm2_gguf, base, max_tokens=48, limit=None)
    ledger = tmp_path / "ledger.sqlite"
    thread, stop, box = run_in_thread(cfg)
    try:
        wait_for(lambda: samples_recorded(ledger, "base:smollm2") >= 4, 900, "the base model's first samples", box)
        handle = serve.get_deployment_handle(deployment_name("smollm2"), model_app("smollm2"))

        def engine() -> dict:
            return handle.info.remote().result(timeout_s=120)["extra"]

        # 1. The llama.cpp server under the Serve replica is killed while the base is evaluated:
        # a new server process comes up, and evaluation goes on through it.
        first = engine()
        old_pid = first["server_pid"]
        n = samples_recorded(ledger)
        os.kill(old_pid, signal.SIGKILL)
        wait_for(lambda: engine()["server_pid"] not in (None, old_pid) and engine()["restarts"] > first["restarts"],
                 300, "a new llama.cpp server process", box)
        wait_for(lambda: samples_recorded(ledger) >= n + 4, 900, "samples after the engine restart", box)

        # 2. The coordinator actor is killed while it evaluates a checkpoint: Ray restarts it (a
        # new process), and it puts the checkpoint it left `evaluating` back in the queue.
        coordinator = ray.get_actor(job_scoped(COORDINATOR_NAME))

        def coordinator_status() -> dict | None:
            try:
                return ray.get(coordinator.status.remote(), timeout=60)
            except RayActorError:
                return None  # being restarted

        wait_for(lambda: checkpoints_in(ledger, "evaluating"), 900, "a checkpoint being evaluated", box)
        before = coordinator_status()
        assert before is not None and before["resumed"] == 0
        base_was_done = "base:smollm2" in finished_targets(ledger)
        evaluating = checkpoints_in(ledger, "evaluating")
        ray.kill(coordinator, no_restart=False)
        wait_for(lambda: (st := coordinator_status()) is not None and st["pid"] != before["pid"] and st["loop"]
                 and st["resumed"] >= 1, 300, "the coordinator restarted and resumed", box)
        after = coordinator_status()
        assert after["started_at"] > before["started_at"]
        if base_was_done:  # a finished base is known from the ledger (once its identity is read), not finished again
            wait_for(lambda: "base:smollm2" in ((coordinator_status() or {}).get("base_done") or []), 300,
                     "the restarted coordinator to know the finished base", box)

        # 3. InfluxDB goes away for a while: points wait in the spool, then drain into it. Its
        # received counter restarts with it, so it is read first, with the writer holding still.
        writer = ray.get_actor(job_scoped(WRITER_NAME))

        def sink() -> dict:
            return ray.get(writer.sink_stats.remote(), timeout=120)

        flags = tmp_path / "hold"
        flags.mkdir()
        held = writer.__ray_call__.remote(hold_writer_fn(), str(flags))
        wait_for(lambda: (flags / "held").exists(), 300, "the writer to deliver everything and hold", box)
        received_before_restart = influx_points_received(influxdb)
        influxdb.stop()
        (flags / "release").touch()
        assert ray.get(held, timeout=120), "the writer could not deliver its points before the outage"
        spooled0, n = sink()["spooled"], samples_recorded(ledger)
        wait_for(lambda: samples_recorded(ledger) >= n + 6 and sink()["spooled"] > spooled0, 900,
                 "samples, and their points spooled, while InfluxDB is down", box)
        spooled = sink()["spooled"]
        influxdb.start()
        wait_for(lambda: sink()["replayed"] >= spooled, 300, "the spool to drain into the restarted InfluxDB", box)

        # 4. The SSH server restarts (listener and sessions) while a new checkpoint lands: the
        # watcher's polls fail, then it reconnects and finds the checkpoint.
        watcher = ray.get_actor(job_scoped(watcher_name("trainer")))

        def watcher_status() -> dict:
            return ray.get(watcher.status.remote(), timeout=120)

        w0 = watcher_status()
        assert sshd.sessions(), "the watcher keeps a connection open"
        sshd.stop()  # its session too: the kept connection drops
        write_checkpoint(run, 300, seed=13)
        wait_for(lambda: watcher_status()["poll_errors"] > w0["poll_errors"], 300,
                 "the watcher to see the SSH server gone", box)
        sshd.start()
        wait_for(lambda: (st := watcher_status())["last_error"] is None and st["connects"] > w0["connects"], 300,
                 "the watcher to reconnect", box)
        assert "trainer" in watcher_status()["last_poll_error"]
        wait_for(lambda: ledger_counts(ledger).get("scored", 0) >= 3, 1800, "every good checkpoint scored", box)
    finally:
        stop.set()
        thread.join(300)
    assert "error" not in box, box.get("error")
    res = box["result"]
    counts = res.counts
    assert counts.get("scored") == 3 and counts.get("quarantined") == 1, counts
    assert set(evaluating) <= set(checkpoints_in(ledger, "scored"))  # what the dead coordinator left, finished
    assert res.sink["spooled"] >= spooled > 0 and res.sink["replayed"] == res.sink["spooled"], res.sink
    from checkpoints import Ledger

    led = Ledger(ledger, readonly=True)
    try:
        (bad,) = led.list(state="quarantined")
        assert bad.checkpoint.iteration == 150 and "0000150_adapters.safetensors" in bad.last_error
    finally:
        led.close()
    check_exactly_once(tmp_path, influxdb, 3, res.sink, received_before_restart + influx_points_received(influxdb),
                       limit=None)


SIGTERM_PROBES = 14  # enough left of a checkpoint for the signal to land mid-way (see mid_run)


def cli_config(tmp: Path, gguf: Path, base: Path) -> Path:
    """A config file for `evalcluster watch` in its own process: its own loopback cluster, a local
    source (this test is about the process and the ledger, not SSH), no InfluxDB."""
    import yaml

    data = {
        "cluster": {"address": "local", "dashboard": False, "num_cpus": 4,
                    "node_kinds": {"test": {"resources": {"llamacpp": 8}}}, "local_node_kind": "test",
                    "serve": {"host": "127.0.0.1", "port": free_port()}},
        "models": [{"name": "smollm2", "engine": "llamacpp", "path": str(gguf), "resources": {"llamacpp": 1},
                    "max_adapters_per_replica": 3, "options": {"parallel": 4, "ctx_size": 4096}}],
        "sources": [{"name": "trainer", "kind": "local", "path": str(base), "layout": "mlx", "model": "smollm2",
                     "adapter_meta": [{"prefix": "smol", "tag": "smollm2-135m", "short": "S"}]}],
        "probes": {"sets": ["capability"], "max_tokens": PROBE_TOKENS, "limit": SIGTERM_PROBES},
        "scorers": SCORERS,
        "budgets": {"per_endpoint": 4, "checkpoints": 1},
        "staging": {"cache_dir": str(tmp / "cache")},
        "sinks": {"ledger": str(tmp / "ledger.sqlite"), "spool_dir": str(tmp / "spool")},
        "poll_interval_s": 1,
        "retry_backoff_s": 1,
    }
    path = tmp / "watch.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def sample_rows(ledger: Path) -> dict[str, tuple[float, dict]]:
    """key -> (when it was written, the record), straight from the ledger's table."""
    import json
    import sqlite3

    db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        return {k: (t, json.loads(r)) for k, t, r in db.execute("SELECT key, updated_at, record FROM samples")}
    finally:
        db.close()


@pytest.mark.timeout(2400)
def test_sigterm_stops_the_watch_command_cleanly_and_a_restart_resumes(smollm2_gguf, tmp_path):
    """SIGTERM to a real `evalcluster watch` mid-run: exit 0, nothing left `evaluating`, no half
    sample; `watch --once` afterwards finishes without redoing a recorded sample (or the base)."""
    import subprocess

    from evaluators import SampleResult, load_probe_set

    n_probes = len(load_probe_set("capability").probes[:SIGTERM_PROBES])
    base = tmp_path / "remote"
    run = base / "adapters-smol-term"
    write_checkpoint(run, 100, seed=21)
    write_checkpoint(run, 200, seed=22)
    cfg = cli_config(tmp_path, smollm2_gguf, base)
    ledger = tmp_path / "ledger.sqlite"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "EVALCLUSTER_RAY_ADDRESS")}
    cmd = [sys.executable, "-m", "cluster.cli", "watch", "--config", str(cfg)]
    log1 = tmp_path / "watch-1.log"
    with open(log1, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        def mid_run() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"watch exited early ({proc.returncode}):\n{log1.read_text()[-4000:]}")
            if "base:smollm2" not in finished_targets(ledger):
                return False
            # Some samples in, many to go: the signal lands mid-checkpoint.
            return any(0 < samples_recorded(ledger, c) < n_probes - 6 for c in checkpoints_in(ledger, "evaluating"))

        wait_for(mid_run, 1200, "the base finished and a checkpoint part-evaluated")
        os.kill(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:  # it did not stop: kill what we started (its own session), by id
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    out1 = log1.read_text()
    assert rc == 0, out1[-4000:]
    assert "stopped by signal" in out1 and "returned to the queue" in out1, out1[-3000:]
    assert checkpoints_in(ledger, "evaluating") == []
    assert len(checkpoints_in(ledger, "staged")) >= 1  # the interrupted one waits, its samples kept
    rows = sample_rows(ledger)
    for key, (_, rec) in rows.items():  # every recorded sample is whole: an answer, its scores
        r = SampleResult.from_record(rec)
        assert r.complete and r.answer is not None and "heuristic" in r.scores and not r.failures, key
    per_target: dict[str, int] = {}
    for _, rec in rows.values():
        per_target[rec["target"]] = per_target.get(rec["target"], 0) + 1
    assert per_target.pop("base:smollm2") == n_probes
    assert any(0 < n < n_probes for n in per_target.values()), per_target  # stopped mid-checkpoint
    base_finished_at = _finished_at(ledger, "base:smollm2")

    r = subprocess.run(cmd + ["--once"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert len(checkpoints_in(ledger, "scored")) == 2, r.stdout[-3000:]
    after = sample_rows(ledger)
    assert len(after) == 3 * n_probes
    redone = [k for k, (t, _) in rows.items() if after[k][0] != t]
    assert redone == [], redone  # recorded samples were skipped, not made again
    assert _finished_at(ledger, "base:smollm2") == base_finished_at  # the base was not finished again


def _finished_at(ledger: Path, target: str) -> float:
    import sqlite3

    db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        (t,) = db.execute("SELECT finished_at FROM finished_targets WHERE target = ?", (target,)).fetchone()
        return t
    finally:
        db.close()


def local_job_config(tmp: Path, gguf: Path, base: Path, **changes: Any):
    """A watch job on the session's cluster: llama.cpp serving SmolLM2, a local training run."""
    from cluster.config import parse_config

    data: dict[str, Any] = {
        "cluster": {"serve": {"port": free_port()}},
        "models": [{"name": "smollm2", "engine": "llamacpp", "path": str(gguf), "resources": {"llamacpp": 1},
                    "max_adapters_per_replica": 3, "options": {"parallel": 2, "ctx_size": 2048}}],
        "sources": [{"name": "trainer", "kind": "local", "path": str(base), "layout": "mlx", "model": "smollm2",
                     "adapter_meta": [{"prefix": "smol", "tag": "smollm2-135m", "short": "S"}]}],
        "probes": {"sets": ["capability"], "max_tokens": 16, "limit": PROBE_LIMIT},
        "scorers": SCORERS,
        "budgets": {"per_endpoint": 2, "checkpoints": 1},
        "staging": {"cache_dir": str(tmp / "cache")},
        "sinks": {"ledger": str(tmp / "ledger.sqlite"), "spool_dir": str(tmp / "spool")},
        "poll_interval_s": 1,
        "retry_backoff_s": 1,
    }
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_config(data, "watch-test", tmp / "watch.yaml")


@pytest.mark.timeout(1800)
def test_an_engine_outage_is_not_the_checkpoints_fault(ray_cluster, smollm2_gguf, tmp_path):
    """The engine under the replica dies and stays down (no restarts: Serve's health check replaces
    the replica). With one attempt allowed per checkpoint, a checkpoint charged for the outage would
    be quarantined at once: it waits for the engine instead, and every checkpoint is scored."""
    from ray import serve

    from deployments import deployment_name, model_app

    base = tmp_path / "runs"
    for it, seed in ((100, 41), (200, 42)):
        write_checkpoint(base / "adapters-smol-outage", it, seed=seed)
    model = {"name": "smollm2", "engine": "llamacpp", "path": str(smollm2_gguf), "resources": {"llamacpp": 1},
             "health_check_period_s": 2, "health_check_timeout_s": 10,
             "options": {"parallel": 2, "ctx_size": 2048, "max_restarts": 0}}
    # Every probe (no limit): the outage must land while a checkpoint still has answers to get.
    cfg = local_job_config(tmp_path, smollm2_gguf, base, models=[model], max_attempts=1, probes={"limit": None})
    ledger = tmp_path / "ledger.sqlite"
    thread, stop, box = run_in_thread(cfg)
    try:
        wait_for(lambda: any(samples_recorded(ledger, c) >= 1 for c in checkpoints_in(ledger, "evaluating")), 900,
                 "a checkpoint being answered", box, interval=0.2)
        handle = serve.get_deployment_handle(deployment_name("smollm2"), model_app("smollm2"))
        os.kill(handle.info.remote().result(timeout_s=60)["extra"]["server_pid"], signal.SIGKILL)
        wait_for(lambda: ledger_counts(ledger).get("scored", 0) == 2, 900, "both checkpoints scored", box)
        coordinator = box["last"]["coordinator"]
    finally:
        stop.set()
        thread.join(300)
    assert "error" not in box, box.get("error")
    counts = box["result"].counts
    assert counts.get("scored") == 2 and not counts.get("quarantined") and not counts.get("failed"), counts
    assert coordinator.get("engine_outages", 0) >= 1, coordinator


@pytest.mark.timeout(1200)
def test_watch_once_ends_when_the_base_model_keeps_failing(ray_cluster, smollm2_gguf, tmp_path, capsys):
    """Every answer of the base model fails (the prompt cannot fit the engine's context): `watch
    --once` gives up after max_attempts, says why, and exits 1 instead of retrying for ever."""
    import yaml

    from cluster.cli import main

    base = tmp_path / "runs"
    base.mkdir()
    model = {"name": "smollm2", "engine": "llamacpp", "path": str(smollm2_gguf), "resources": {"llamacpp": 1},
             "options": {"parallel": 1, "ctx_size": 256}}
    cfg = local_job_config(tmp_path, smollm2_gguf, base, models=[model], max_attempts=2,
                           probes={"system_prompt": "You are a careful assistant. " * 80})
    path = tmp_path / "watch.yaml"
    path.write_text(yaml.safe_dump(cfg.absolute_dump()))
    assert main(["watch", "--once", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "base model smollm2: evaluation given up" in err and "after 2 attempts" in err, err[-3000:]


@pytest.mark.timeout(1200)
def test_watch_once_fails_when_a_source_cannot_be_read(ray_cluster, smollm2_gguf, tmp_path, capsys):
    """An SSH source whose host refuses connections: the local source's checkpoint is still scored,
    and `watch --once` ends after its polls naming the source and why, with exit 1 (not 0, which
    would tell a pipeline that everything it was asked to evaluate was)."""
    import yaml

    from cluster.cli import main

    base = tmp_path / "runs"
    write_checkpoint(base / "adapters-smol-ok", 100, seed=7)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    refused = {"name": "gone", "kind": "ssh", "host": "127.0.0.1", "port": free_port(), "user": "nobody",
               "base": "/runs", "known_hosts": str(known_hosts), "model": "smollm2", "connect_timeout_s": 2}
    cfg = local_job_config(tmp_path, smollm2_gguf, base)
    path = tmp_path / "watch.yaml"
    data = cfg.absolute_dump()
    data["sources"].append(refused)
    path.write_text(yaml.safe_dump(data))
    assert main(["watch", "--once", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "source gone: could not be read:" in err, err[-3000:]
    assert ledger_counts(tmp_path / "ledger.sqlite").get("scored") == 1


@pytest.mark.timeout(1200)
def test_a_staged_checkpoint_whose_copy_is_gone_is_staged_again(ray_cluster, smollm2_gguf, tmp_path):
    """A ledger left by an earlier job holds a staged checkpoint whose cache entry has since been
    evicted, and the cluster's adapter registry never had it: the job does not evaluate it under a
    name no replica knows; it sends it back to be staged, stages and registers it again, scores it."""
    import asyncio

    import yaml

    from checkpoints import STAGED, Ledger, LocalSource, Poller, Stager, discover_once, layout_spec, stage_pending
    from cluster.cli import main
    from evaluators import load_probe_set

    base = tmp_path / "runs"
    write_checkpoint(base / "adapters-smol-evicted", 100, seed=71)
    cfg = local_job_config(tmp_path, smollm2_gguf, base)
    ledger_path = tmp_path / "ledger.sqlite"
    with Ledger(ledger_path) as led:  # what the earlier job left: staged, then its copy evicted
        poller = Poller(LocalSource(base, name="trainer"), layout_spec("mlx"))

        async def stage() -> list:
            await discover_once([poller], led)
            await discover_once([poller], led)
            return (await stage_pending(led, Stager(tmp_path / "cache", 2**30), {"trainer": poller.source})).staged

        (staged,) = asyncio.run(stage())
        assert led.get(staged.checkpoint.id).state == STAGED
    shutil.rmtree(staged.path)
    path = tmp_path / "watch.yaml"
    path.write_text(yaml.safe_dump(cfg.absolute_dump()))
    assert main(["watch", "--once", "--config", str(path)]) == 0
    with Ledger(ledger_path, readonly=True) as led:
        entry = led.get(staged.checkpoint.id)
        samples = led.samples(entry.id)
    assert entry.state == "scored" and entry.last_error is None, entry
    assert staged.path.exists()  # staged again (its cache entry is made only by staging)
    assert len(samples) == len(load_probe_set("capability").probes[:PROBE_LIMIT])
    # Named by the files its replica serves (the registry's digest), not by its weights alone.
    parts = dict(map(tuple, samples[0]["provenance"]["identity_parts"]))
    assert parts["adapter files"] not in ("", staged.checkpoint.sha256), parts


@pytest.mark.timeout(1200)
def test_checkpoints_scored_on_another_engine_are_evaluated_again(ray_cluster, smollm2_gguf, tmp_path):
    """The model behind the same name is served with another context size (an engine setting
    that can change answers): the next `watch --once` evaluates the scored checkpoint again, and
    its results and summary are of the engine serving it now; a run on the same engine redoes nothing."""
    import yaml

    from checkpoints import Ledger
    from cluster.cli import main

    base = tmp_path / "runs"
    write_checkpoint(base / "adapters-smol-engine", 100, seed=81)
    path = tmp_path / "watch.yaml"

    def watch_once(ctx_size: int) -> list[dict]:
        model = {"name": "smollm2", "engine": "llamacpp", "path": str(smollm2_gguf), "resources": {"llamacpp": 1},
                 "options": {"parallel": 2, "ctx_size": ctx_size}}
        cfg = local_job_config(tmp_path, smollm2_gguf, base, models=[model], probes={"limit": 3})
        path.write_text(yaml.safe_dump(cfg.absolute_dump()))
        assert main(["watch", "--once", "--config", str(path)]) == 0
        with Ledger(tmp_path / "ledger.sqlite", readonly=True) as led:
            (entry,) = led.list()
            assert entry.state == "scored", entry
            return led.samples(entry.id)

    first = watch_once(2048)
    assert len(first) == 3
    assert {r["key"] for r in watch_once(2048)} == {r["key"] for r in first}  # same engine: nothing redone
    again = watch_once(4096)
    assert len(again) == 6  # answered again: the earlier three kept, set aside by the report
    from evaluators import current_samples

    current, aside = current_samples(again)
    assert len(current) == 3 and {r["key"] for r in current}.isdisjoint(r["key"] for r in first)
    assert list(aside) == ["target identity (setting n_ctx)"], aside

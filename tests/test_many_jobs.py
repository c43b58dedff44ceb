"""One `ray start --head` cluster shared by many jobs at once: `serve --detach`, two `watch` jobs
(one SSH source, one local, each its own ledger and InfluxDB database), an `eval` job and an
OpenAI client streaming through the endpoint. One watch job is stopped mid-run (`ray job stop`)
and resumed with nothing redone; a job defining smollm2 with other weights is refused; `status
--cluster` shows every job; a real Prometheus scraping through Ray's service-discovery file returns
per-job series. Exact counts in the ledgers and InfluxDB; the engine's peak in-flight count within
the endpoint's cluster-wide budget."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.engines, pytest.mark.ssh, pytest.mark.tsdb, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
from _servers import Prometheus, free_port, wait_until  # noqa: E402
from test_watch import expected_points, sample_rows, write_checkpoint  # noqa: E402

CLI = [sys.executable, "-m", "cluster.cli"]
N_PROBES = 12  # of the capability set (`probes.limit`): the point is the jobs, not the probes
ENDPOINT_LIMIT = 4  # smollm2's max_ongoing_requests x replicas: the cluster-wide generation budget


def model(gguf: Path) -> str:
    return (f"{{name: smollm2, engine: llamacpp, path: {gguf}, resources: {{llamacpp: 1}}, "
            f"max_ongoing_requests: {ENDPOINT_LIMIT}, options: {{parallel: 4, ctx_size: 2048}}}}")


def config(tmp: Path, name: str, gguf: Path, serve_port: int, influx_url: str, source: str = "") -> Path:
    """A job's config: its own ledger, spool, cache and InfluxDB database; a budget share of 3."""
    d = tmp / name
    d.mkdir(parents=True, exist_ok=True)
    path = d / "job.yaml"
    path.write_text(f"""
cluster: {{address: auto, serve: {{port: {serve_port}}}}}
models:
  - {model(gguf)}
sources: [{source}]
probes: {{sets: [capability], max_tokens: 24, limit: {N_PROBES}}}
budgets: {{per_endpoint: 3, checkpoints: 2}}
staging: {{cache_dir: {d / 'cache'}}}
sinks:
  ledger: {d / 'ledger.sqlite'}
  spool_dir: {d / 'spool'}
  influx: {{url: {influx_url}, protocol: v1, database: {name}, batch_size: 200, flush_interval_ms: 200}}
poll_interval_s: 1
retry_backoff_s: 1
""")
    return path


def cli(env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


def submit(url: str, env: dict, cfg: Path, *job: str) -> str:
    r = cli(env, "submit", "--config", str(cfg), "--address", url, "--no-wait", "--", *job)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout.split()[1]


def samples(ledger: Path, checkpoints_only: bool = False) -> int:
    """Samples in a ledger (only those of checkpoints, not of the base model)."""
    import sqlite3

    if not ledger.exists():
        return 0
    db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        where = " WHERE target != 'base:smollm2'" if checkpoints_only else ""
        return db.execute("SELECT COUNT(*) FROM samples" + where).fetchone()[0]
    finally:
        db.close()


def influx_counts(influxdb, db: str) -> dict[str, int]:
    res = influxdb.query("SHOW MEASUREMENTS", db=db)
    names = [v[0] for sr in res["results"][0].get("series") or [] for v in sr["values"]]
    out = {}
    for m in names:
        series = influxdb.query(f'SELECT COUNT(*) FROM "{m}"', db=db)["results"][0]["series"][0]
        out[m] = max(v for c, v in zip(series["columns"], series["values"][0]) if c.startswith("count_"))
    return out


def ledger_state(ledger: Path) -> dict:
    from checkpoints import Ledger

    with Ledger(ledger, readonly=True) as led:
        return {"counts": led.counts(), "finished": sorted(led.finished()),
                "per_target": {t: len(led.samples(t)) for t in [e.id for e in led.list()] + ["base:smollm2"]}}


def stream_chat(port: int, n: int, out: dict) -> None:
    """An OpenAI client: n streamed chat completions through the endpoint while the jobs run."""
    done = []
    try:
        for i in range(n):
            chunks, finish = [], None
            with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", timeout=600, json={
                    "model": "smollm2", "stream": True, "max_tokens": 16, "temperature": 0,
                    "messages": [{"role": "user", "content": f"Count to {i + 3}."}]}) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    choice = json.loads(line[6:])["choices"][0]
                    chunks.append(choice["delta"].get("content") or "")
                    finish = choice.get("finish_reason") or finish
            done.append({"text": "".join(chunks), "finish": finish})
    except BaseException as e:  # noqa: BLE001 - re-raised by the test
        out["error"] = e
    out["done"] = done


def cluster_python(env: dict, gcs: str, code: str) -> dict:
    """Run `code` as a driver on the cluster; it sets `out`, printed as JSON."""
    prog = ("import json, ray\nray.init(address=%r, namespace='evalcluster', logging_level='ERROR')\n" % gcs
            + code + "\nprint('OUT ' + json.dumps(out, default=str))\n")
    r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(next(line for line in r.stdout.splitlines() if line.startswith("OUT "))[4:])


@pytest.fixture
def prometheus(ray_head, tmp_path):
    """Prometheus scraping the cluster from its start, through Ray's own service-discovery file."""
    wait_until(lambda: any(Path(ray_head.temp_dir).rglob("prom_metrics_service_discovery.json")), 120,
               "Ray's service-discovery file")
    sd = next(Path(ray_head.temp_dir).rglob("prom_metrics_service_discovery.json"))
    prom = Prometheus(tmp_path / "prometheus", sd).start()
    yield prom
    prom.stop()


@pytest.mark.timeout(3600)
def test_many_jobs_share_one_cluster(ray_head, prometheus, sshd, influxdb, smollm2_gguf, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    url, env, gcs = ray_head.dashboard_url, ray_head.env, ray_head.gcs_address
    client = JobSubmissionClient(url)
    for db in ("job_a", "job_b", "job_e"):
        influxdb.create_database(db)
    port = free_port()
    remote = tmp_path / "remote"  # the SSH training host's directory
    for it, seed in ((100, 51), (200, 52), (300, 53)):
        write_checkpoint(remote / "adapters-smol-a", it, seed=seed)
    local = tmp_path / "local-runs"
    write_checkpoint(local / "adapters-smol-b", 100, seed=61)
    meta = "adapter_meta: [{prefix: smol, tag: smollm2-135m, short: S}]"
    cfg_a = config(tmp_path, "job_a", smollm2_gguf, port, influxdb.url, source=(
        f"{{name: trainer, kind: ssh, host: {sshd.host}, port: {sshd.port}, user: {sshd.user}, key: {sshd.key}, "
        f"known_hosts: {sshd.known_hosts}, base: {remote}, layout: mlx, model: smollm2, {meta}}}"))
    cfg_b = config(tmp_path, "job_b", smollm2_gguf, port, influxdb.url,
                   source=f"{{name: runs, kind: local, path: {local}, layout: mlx, model: smollm2, {meta}}}")
    cfg_e = config(tmp_path, "job_e", smollm2_gguf, port, influxdb.url)
    ledger_a, ledger_b, ledger_e = (tmp_path / n / "ledger.sqlite" for n in ("job_a", "job_b", "job_e"))
    other_weights = tmp_path / "other.gguf"
    shutil.copyfile(smollm2_gguf, other_weights)
    cfg_c = config(tmp_path, "job_c", other_weights, port, influxdb.url)
    t0 = time.monotonic()

    def status(sub: str) -> str:
        return str(client.get_job_status(sub).value)

    def ended(sub: str) -> bool:
        return JobStatus(status(sub)).is_terminal()

    # The endpoint stays up whatever jobs come and go: `serve --detach` claims smollm2 for it.
    r = cli(env, "serve", "--config", str(cfg_a), "--address", gcs, "--detach", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    print(f"\nserving after {time.monotonic() - t0:.0f}s")

    job_a = submit(url, env, cfg_a, "watch", "--once")
    job_b = submit(url, env, cfg_b, "watch", "--once")
    job_e = submit(url, env, cfg_e, "eval", "--model", "smollm2", "--limit", "6")
    chat: dict = {}
    chatter = threading.Thread(target=stream_chat, args=(port, 4, chat), daemon=True)
    chatter.start()

    # Job A is stopped once it is answering a checkpoint (not only the base model).
    wait_until(lambda: samples(ledger_a, checkpoints_only=True) >= 2 or ended(job_a), 1500,
               "job A answering a checkpoint", interval=1)
    assert not ended(job_a), (status(job_a), client.get_job_logs(job_a)[-3000:])
    ray_a = client.get_job_info(job_a).job_id
    ray_b = client.get_job_info(job_b).job_id

    # `status --cluster` shows every running job: its models, its ledger.
    r = cli(env, "status", "--config", str(cfg_a), "--cluster", gcs, "--json", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    on_cluster = {j["job"]: j for j in json.loads(r.stdout)["cluster_jobs"]}
    assert on_cluster[ray_a]["ledger"] == str(ledger_a) and on_cluster[ray_a]["models"] == ["smollm2"], on_cluster
    assert on_cluster["serve-detached"]["models"] == ["smollm2"], on_cluster
    if not ended(job_b):
        assert on_cluster[ray_b]["ledger"] == str(ledger_b), on_cluster

    # A third job defining smollm2 with other weights is refused in one line; nothing else is touched.
    job_c = submit(url, env, cfg_c, "watch", "--once")
    wait_until(lambda: ended(job_c), 600, "the conflicting job to end", interval=1)
    assert status(job_c) == "FAILED"
    logs_c = client.get_job_logs(job_c)
    refusal = [line for line in logs_c.splitlines() if "already served with another definition" in line]
    assert refusal and "'smollm2'" in refusal[-1] and "mtime" in refusal[-1] and "path" in refusal[-1], logs_c[-3000:]

    before_stop = sample_rows(ledger_a)
    r = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "stop", "--address", url, job_a],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    wait_until(lambda: ended(job_a), 300, "job A stopped", interval=1)
    assert status(job_a) == "STOPPED"
    print(f"job A stopped after {time.monotonic() - t0:.0f}s with {len(before_stop)} samples")

    # The others finish unharmed.
    wait_until(lambda: ended(job_b) and ended(job_e), 2400, "job B and the eval job", interval=2)
    assert status(job_b) == "SUCCEEDED", client.get_job_logs(job_b)[-4000:]
    assert status(job_e) == "SUCCEEDED", client.get_job_logs(job_e)[-4000:]
    chatter.join(600)
    assert "error" not in chat, chat.get("error")
    assert len(chat["done"]) == 4 and all(c["text"] and c["finish"] in ("stop", "length") for c in chat["done"])

    # A resumes from its ledger: nothing it recorded is made again.
    job_a2 = submit(url, env, cfg_a, "watch", "--once")
    wait_until(lambda: ended(job_a2), 2400, "job A resumed", interval=2)
    assert status(job_a2) == "SUCCEEDED", client.get_job_logs(job_a2)[-4000:]
    after = sample_rows(ledger_a)
    assert all(after[k][0] == t for k, (t, _) in before_stop.items()), "a sample recorded before the stop was redone"
    print(f"all jobs done after {time.monotonic() - t0:.0f}s")

    # What one job registered, every client of the shared endpoint is served, after that job ended:
    # the checkpoints of A (over SSH) and of B (a local run) are models of the one endpoint.
    from checkpoints import Ledger

    adapters = {}
    for ledger in (ledger_a, ledger_b):
        with Ledger(ledger, readonly=True) as led:
            adapters[ledger] = [f"smollm2:{e.id}" for e in led.list(state="scored")]
    listed = {m["id"] for m in httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=60).json()["data"]}
    assert set(adapters[ledger_a]) | set(adapters[ledger_b]) <= listed, (adapters, listed)
    for name in (adapters[ledger_a][0], adapters[ledger_b][0]):
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=300, json={
            "model": name, "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": "Hi."}]})
        assert r.status_code == 200 and r.json()["model"] == name, (name, r.status_code, r.text[:500])

    # Exact counts: every target's samples once in each ledger, and InfluxDB holds exactly their points.
    for ledger, db, n_ckpt, source_models in ((ledger_a, "job_a", 3, {"trainer": "smollm2"}),
                                              (ledger_b, "job_b", 1, {"runs": "smollm2"})):
        st = ledger_state(ledger)
        assert {k: v for k, v in st["counts"].items() if v} == {"scored": n_ckpt}, st
        assert set(st["per_target"].values()) == {N_PROBES} and len(st["per_target"]) == n_ckpt + 1, st
        want, _ = expected_points(ledger, source_models)
        got = influx_counts(influxdb, db)
        assert got == want, (db, got, want)
    assert samples(ledger_e) == 6
    assert influx_counts(influxdb, "job_e")["probe_score"] == 6

    # Budgets and the engine: the limit is the served definition's (no job's ask of 3 changed it),
    # and the engine never had more in flight than it, across every job and the client.
    seen = cluster_python(env, gcs, """
from ray import serve
from deployments import deployment_name, model_app, registry
info = serve.get_deployment_handle(deployment_name("smollm2"), model_app("smollm2")).info.remote().result(timeout_s=120)
bud = ray.get_actor("evalcluster-budgets")
out = {"peak": info["peak_in_flight"], "requests": info["requests"],
       "limits": {k: v["limit"] for k, v in ray.get(bud.snapshot.remote()).items()},
       "claims": {c.name: c.jobs for c in ray.get(registry().models.remote())}}
""")
    assert seen["limits"]["gen:smollm2"] == ENDPOINT_LIMIT, seen
    assert 1 <= seen["peak"] <= ENDPOINT_LIMIT, seen
    assert seen["claims"] == {"smollm2": ["serve-detached"]}, seen  # every job gave its claim back

    # Prometheus has per-job series: the samples each job's coordinator counted, by job id.
    query = 'sum by (job_id) (max_over_time({__name__=~"ray_evalcluster_samples(_total)?"}[1h]))'
    per_job = {r["metric"].get("job_id"): float(r["value"][1]) for r in prometheus.query(query)}
    print("prometheus:", per_job)
    assert per_job.get(ray_a, 0) >= 1 and per_job.get(ray_b, 0) >= 1, (per_job, ray_a, ray_b)

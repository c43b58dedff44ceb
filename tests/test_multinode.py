"""evalcluster on a real multi-node Ray cluster (issue 15): nodes with their own addresses and disks.

Four `ray start` nodes, each in its own network, mount and PID namespaces (tests/_netns.py): the
head (the state node: ledger, spool, writer, registry, budgets, coordinator), node-a and node-c
(`llamacpp`, Linux CPU nodes) and node-b (`mlx`, the "Mac": MLX on the CPU). The training host is
an OpenSSH sshd in a namespace of its own, InfluxDB another, and the operator's shell a third.

One watch job, submitted with `evalcluster submit -- watch` from the operator's host, evaluates a
run the trainer writes while it runs, on both models (a source each). Meanwhile the test kills the
raylet of the node serving llama.cpp (Serve brings the replica up on the other llamacpp node), and
the writer, the registry and the budgets actors (each comes back on the head with its state). The
run ends with exact counts: every sample once in the ledger on the head's disk, InfluxDB holding
exactly the points the ledger implies, nothing quarantined; and no node saw another's files.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.engines, pytest.mark.mlx, pytest.mark.ssh,
              pytest.mark.tsdb]

sys.path.insert(0, str(Path(__file__).parent))
from _netns import PYTHON, NetnsCluster, NetnsUnavailable, NodeSpec  # noqa: E402
from _servers import wait_until  # noqa: E402
from test_watch import expected_points, influx_count, influx_measurements, ledger_if_ready, write_checkpoint  # noqa: E402

NODES = (
    NodeSpec("head", {}),
    NodeSpec("node-a", {"llamacpp": 8}),
    NodeSpec("node-b", {"mlx": 1}),
    NodeSpec("node-c", {"llamacpp": 8}),
)
STATE = "/tmp/ec"  # on the head: the ledger and the spool; every node's own /tmp/ec/cache
RUN = "adapters-smol-mn"
ITERATIONS = (100, 200, 300)
SOURCES = {"lab-llama": "smollm2", "lab-mlx": "smollm2-mlx"}
STATE_ACTORS = ("evalcluster-writer", "evalcluster-adapters", "evalcluster-budgets")
N_PROBES = 6  # of the capability set: MLX on a shared CPU is slow, and the point is the cluster


def small_probe_set(path: Path) -> Path:
    """The first capability probes as a probe-set file of the user's (it travels with the job)."""
    data = yaml.safe_load((Path(__file__).resolve().parent.parent / "evaluators/probesets/capability.yaml").read_text())
    data["name"], data["probes"] = "capability-mn", data["probes"][:N_PROBES]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def cluster():
    try:
        c = NetnsCluster.start(NODES)
    except NetnsUnavailable as e:
        pytest.fail(f"the namespaced Ray cluster cannot run here: {e}")
    try:
        yield c
    finally:
        c.teardown()
        print(f"\nnetns cluster timings: {json.dumps(c.timings)}")


def job_config(c: NetnsCluster, smollm2_gguf: Path, smollm2_hf: Path, base: str) -> Path:
    """The job's config, written on the operator's host: the sources reach the trainer over SSH from
    the head (where their watchers run), the sinks are on the head's disk, the models on their nodes."""
    sshd, influx = c.sshd(), c.influx()
    key = c.copy_to("head", sshd.key, "/tmp/ssh/id_ed25519")
    known = c.copy_to("head", sshd.known_hosts, "/tmp/ssh/known_hosts")
    source = {"kind": "ssh", "host": sshd.host, "port": sshd.port, "user": sshd.user, "key": key,
              "known_hosts": known, "base": base, "layout": "mlx"}
    cfg = {
        "cluster": {"address": "auto", "serve": {"port": 8000},
                    "node_kinds": {"linux-cpu": {"resources": {"llamacpp": 8}}, "mac": {"resources": {"mlx": 1}}}},
        "models": [
            {"name": "smollm2", "engine": "llamacpp", "path": str(smollm2_gguf), "resources": {"llamacpp": 1},
             "max_adapters_per_replica": 3, "health_check_period_s": 2, "health_check_timeout_s": 10,
             "options": {"parallel": 2, "ctx_size": 2048, "threads": 1}},
            {"name": "smollm2-mlx", "engine": "mlx", "path": str(smollm2_hf), "resources": {"mlx": 1},
             "max_adapters_per_replica": 3},
        ],
        "sources": [
            {"name": name, "model": model, **source,
             "adapter_meta": [{"prefix": "smol", "tag": f"{model}-mn", "short": name[4].upper()}]}
            for name, model in SOURCES.items()
        ],
        "probes": {"sets": [small_probe_set(c.client().dir / "probes.yaml").name], "max_tokens": 16},
        "scorers": ["heuristic", "exact", "capability"],
        "budgets": {"per_endpoint": 2, "checkpoints": 2},
        "staging": {"cache_dir": f"{STATE}/cache"},
        "sinks": {"ledger": f"{STATE}/ledger.sqlite", "spool_dir": f"{STATE}/spool",
                  "influx": {"url": influx.url, "protocol": "v1", "database": "training", "token_env": None,
                             "batch_size": 200, "flush_interval_ms": 200}},
        "poll_interval_s": 1,
        "retry_backoff_s": 1,
    }
    path = c.client().dir / "job.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def ledger_on_head(c: NetnsCluster) -> Path:
    return c.host_path("head", f"{STATE}/ledger.sqlite")


def ledger_state(c: NetnsCluster) -> dict[str, dict[str, int]]:
    """Source -> checkpoints per state, read from the ledger file on the head's disk."""
    led = ledger_if_ready(ledger_on_head(c))
    if led is None:
        return {}
    with led:
        out: dict[str, dict[str, int]] = {}
        for e in led.list():
            states = out.setdefault(e.checkpoint.source, {})
            states[e.state] = states.get(e.state, 0) + 1
        return out


def samples_of(c: NetnsCluster, source: str, iteration: int) -> int:
    led = ledger_if_ready(ledger_on_head(c))
    if led is None:
        return 0
    with led:
        ids = [e.id for e in led.list(source=source) if e.checkpoint.iteration == iteration]
        return sum(t["samples"] for t in led.targets() if t["target"] in ids)


def scored(c: NetnsCluster, source: str) -> int:
    return ledger_state(c).get(source, {}).get("scored", 0)


def actor_nodes(c: NetnsCluster) -> dict[str, dict]:
    """The job's actors (and Serve's replicas) by name: the IP of the node each runs on, its pid."""
    return c.python_json("head", """
import ray
from ray.util.state import list_actors
ray.init(address="auto", namespace="evalcluster", logging_level="ERROR")
nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
out = {}
for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000):
    name = a.name or a.class_name
    out[name] = {"ip": nodes.get(a.node_id), "pid": a.pid, "class": a.class_name, "name": name}
emit(out)
""")


def job_name(c: NetnsCluster, name: str) -> str:
    """The full name of the job's actor `name` (each job's actors are `<name>:<ray job id>`)."""
    matches = [full for full in actor_nodes(c) if re.fullmatch(re.escape(name) + r":[0-9a-f]{8}", full)]
    assert len(matches) == 1, (name, matches)
    return matches[0]


def replica_ip(c: NetnsCluster, model: str) -> str | None:
    """The IP of the node running the model's (one) Serve replica."""
    from deployments import deployment_name

    for name, a in actor_nodes(c).items():
        if a["class"].startswith("ServeReplica") and f"#{deployment_name(model)}#" in name:
            return a["ip"]
    return None


def state_of_state_actors(c: NetnsCluster) -> dict:
    """What each state actor holds now: the registry's adapters, the budgets' limits, the writer's ledger."""
    return c.python_json("head", f"""
import ray
ray.init(address="auto", namespace="evalcluster", logging_level="ERROR")
reg = ray.get_actor("evalcluster-adapters")
bud = ray.get_actor("evalcluster-budgets")
wri = ray.get_actor({job_name(c, "evalcluster-writer")!r})
emit({{"adapters": sorted(e.model_id for e in ray.get(reg.list.remote())),
      "limits": {{k: v["limit"] for k, v in ray.get(bud.snapshot.remote()).items()}},
      "counts": ray.get(wri.counts.remote())}})
""")


def kill_actor(c: NetnsCluster, name: str) -> None:
    """SIGKILL one actor's process, as a crash would (Ray restarts it: max_restarts=-1)."""
    c.python("head", f"""
import ray
ray.init(address="auto", namespace="evalcluster", logging_level="ERROR")
ray.kill(ray.get_actor({name!r}), no_restart=False)
""")


def listeners_report(c: NetnsCluster) -> str:
    lines = []
    for name in [*c.node_names, "trainer", "influx", "client"]:
        for lst in c.listeners(name):
            lines.append(f"{name:8} {lst.proto} {lst.address}:{lst.port} {lst.process}")
    return "\n".join(lines)


@pytest.mark.timeout(3000)
def test_a_watch_job_across_nodes_survives_a_lost_node_and_restarted_state_actors(
        cluster, smollm2_gguf, smollm2_hf):
    c = cluster
    t0 = time.monotonic()
    influx = c.influx()
    with c.in_netns("influx"):
        influx.create_database("training")
    c.sshd()
    base = str(c.hosts["trainer"].dir / "runs")  # the trainer's own directory, the same path inside
    run_dir = Path(base) / RUN
    write_checkpoint(run_dir, ITERATIONS[0], seed=31)
    cfg_path = job_config(c, smollm2_gguf, smollm2_hf, base)

    # The operator submits the job from a host outside the cluster, to the head's dashboard.
    r = c.run("client", [PYTHON, "-m", "cluster.cli", "submit", "--address", c.dashboard_url, "--config",
                         str(cfg_path), "--no-wait", "--", "watch"], timeout=300)
    job_id = r.stdout.split()[1]
    print(f"\nsubmitted {job_id} after {time.monotonic() - t0:.0f}s")

    def progress() -> str:
        return json.dumps(ledger_state(c))

    try:
        wait_until(lambda: all(scored(c, s) >= 1 for s in SOURCES), 1500,
                   "the first checkpoint scored on both models", interval=2)
        print(f"first checkpoints scored after {time.monotonic() - t0:.0f}s: {progress()}")
        placed = actor_nodes(c)
        head_ip = c.ip("head")
        for name in ("evalcluster-adapters", "evalcluster-budgets", job_name(c, "evalcluster-writer"),
                     job_name(c, "evalcluster-coordinator")):
            assert placed[name]["ip"] == head_ip, (name, placed[name])  # state lives on the state node
        assert placed[job_name(c, "evalcluster-watcher:lab-llama")]["ip"] == head_ip  # no `resources`: the state node
        llama_ip = replica_ip(c, "smollm2")
        assert llama_ip in (c.ip("node-a"), c.ip("node-c")), llama_ip
        assert replica_ip(c, "smollm2-mlx") == c.ip("node-b")
        # A model asking for a resource no node declares is refused before anything is deployed.
        refused = c.python_json("head", f"""
import ray
from cluster.config import parse_config
from deployments import DeploymentError, check_placement
ray.init(address="auto", logging_level="ERROR")
cfg = parse_config({{"models": [{{"name": "rocm-model", "engine": "llamacpp", "path": {str(smollm2_gguf)!r},
                                 "resources": {{"rocm": 1}}}}]}}, "placement")
try:
    check_placement(cfg.models, ray.nodes())
    emit(None)
except DeploymentError as e:
    emit(str(e))
""")
        assert refused and "'rocm'" in refused and "rocm-model" in refused and "llamacpp" in refused, refused
        before = state_of_state_actors(c)
        # The cluster's limit on a model is its served definition's (issue 19), not a job's share.
        from cluster.config import load_config

        llama = next(m for m in load_config(cfg_path).models if m.name == "smollm2")
        assert len(before["adapters"]) == 2, before
        assert before["limits"]["gen:smollm2"] == llama.max_ongoing_requests * llama.replicas, before

        # The trainer writes the next checkpoints while the job runs.
        for it, seed in zip(ITERATIONS[1:], (32, 33)):
            write_checkpoint(run_dir, it, seed=seed)

        # The node serving llama.cpp loses its raylet while that model is answering: Serve brings
        # the replica up on the other llamacpp node; the samples in flight are redone there.
        wait_until(lambda: samples_of(c, "lab-llama", ITERATIONS[1]) >= 1, 900,
                   "llama.cpp answering the second checkpoint", interval=0.5)
        lost = next(n for n in ("node-a", "node-c") if c.ip(n) == llama_ip)
        kept = "node-c" if lost == "node-a" else "node-a"
        c.kill_raylet(lost)
        c.wait_dead(lost, 60)
        print(f"killed {lost}'s raylet after {time.monotonic() - t0:.0f}s: {progress()}")

        # Each state actor crashes in turn; Ray brings it back on the head with its state.
        for name in [job_name(c, n) if n == "evalcluster-writer" else n for n in STATE_ACTORS]:
            old_pid = actor_nodes(c)[name]["pid"]
            kill_actor(c, name)
            wait_until(lambda: (a := actor_nodes(c).get(name)) is not None and a["pid"] != old_pid, 120,
                       f"{name} restarted", interval=1)
            assert actor_nodes(c)[name]["ip"] == head_ip, name
        after = state_of_state_actors(c)
        assert set(before["adapters"]) <= set(after["adapters"]), (before, after)
        assert after["limits"] == before["limits"], (before, after)

        wait_until(lambda: all(scored(c, s) == len(ITERATIONS) for s in SOURCES), 1800,
                   "every checkpoint scored on both models", interval=2)
        print(f"all scored after {time.monotonic() - t0:.0f}s: {progress()}")
        assert replica_ip(c, "smollm2") == c.ip(kept)
        print("listeners during the run (ss -Hltunp per namespace):\n" + listeners_report(c))
        check_listeners(c)
    finally:
        status = c.run("client", [PYTHON, "-c", "import sys; from ray.job_submission import JobSubmissionClient as J; "
                                  "c = J(sys.argv[1]); c.stop_job(sys.argv[2]); print(c.get_job_logs(sys.argv[2])[-4000:])",
                                  c.dashboard_url, job_id], timeout=120, check=False)
        print(f"job {job_id} stopped; its log ends:\n{status.stdout[-4000:]}{status.stderr[-2000:]}")

    # Every sample once, in the ledger on the head's disk; nothing quarantined or failed.
    states = ledger_state(c)
    assert states == {s: {"scored": len(ITERATIONS)} for s in SOURCES}, states
    ledger = ledger_on_head(c)
    check_samples(ledger)
    # The nodes serving models never had the ledger, nor the trainer's files.
    for node in ("node-a", "node-b", "node-c"):
        assert not c.host_path(node, f"{STATE}/ledger.sqlite").exists(), node
    seen = c.python_json("node-b", f"""
import os
emit({{"ledger": os.path.exists({STATE + '/ledger.sqlite'!r}), "trainer": os.path.exists({base!r}),
      "head_dir": os.path.exists({str(c.hosts['head'].dir)!r})}})
""")
    assert seen == {"ledger": False, "trainer": False, "head_dir": False}, seen

    # InfluxDB holds exactly the points the ledger implies: every measurement, each count.
    from evaluators import load_probe_set
    from evaluators.results import register_probe_sets

    register_probe_sets([load_probe_set(c.client().dir / "probes.yaml")])  # the job's own probe file
    per_measurement, _ = expected_points(ledger, SOURCES)
    with c.in_netns("influx"):
        wait_until(lambda: {m: influx_count(influx, m) for m in per_measurement} == per_measurement, 120,
                   "InfluxDB to hold every point", interval=1)
        assert influx_measurements(influx) == set(per_measurement)
    print(f"multi-node test: {time.monotonic() - t0:.0f}s")


def check_samples(ledger: Path) -> None:
    """Each target (2 bases, 3 checkpoints per source) has every capability probe answered once."""
    from checkpoints import Ledger
    from evaluators import load_probe_set

    probes = {p.id for p in load_probe_set("capability").probes[:N_PROBES]}
    with Ledger(ledger, readonly=True) as led:
        targets = [e.id for e in led.list()] + [f"base:{m}" for m in SOURCES.values()]
        assert len(targets) == 2 + 2 * len(ITERATIONS)
        for t in targets:
            samples = led.samples(t)
            assert len(samples) == len(probes) and {s["probe_id"] for s in samples} == probes, (t, len(samples))
            assert all(s["complete"] for s in samples), t


def check_listeners(c: NetnsCluster) -> None:
    """Serve's HTTP endpoint stays on each node's loopback (its config's host); the state node's
    and workers' Ray services listen as the operator's cluster set them up."""
    for node in c.node_names:
        http = [lst for lst in c.listeners(node) if lst.port == 8000]
        assert all(lst.address == "127.0.0.1" for lst in http), (node, http)

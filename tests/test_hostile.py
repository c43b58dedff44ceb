"""Hostile input and faults, one test per finding of issue 16, each against the real component: a
real watch job over a real OpenSSH server, the Serve endpoint with llama.cpp behind it, real
llama.cpp servers, real InfluxDB.

The endpoint's tests share one Serve app (module scope); the watch job runs once for the module
(`watched`) and two tests read what it left (its exit, its ledger, `evalcluster status`, a rebuild).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _adapters import SMOLLM2_DIMS, gguf_lora_for  # noqa: E402
from _ckpt_fixtures import write_mlx_adapter  # noqa: E402
from _servers import SSHD, InfluxV1, free_port, wait_until  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KEY_ENV = "EVALCLUSTER_TEST_HOSTILE_KEY"
KEY = "sk-hostile-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
QUESTION = [SYSTEM, {"role": "user", "content": "What is the capital of France?"}]


def cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


# --------------------------------------------------------------------------- checkpoints on disk


def mlx_checkpoint(run: Path, iteration: int, seed: int, config: str | None = None) -> Path:
    """A real MLX LoRA checkpoint (layer 0, rank 4) in go-ml's layout; `config` replaces its
    adapter_config.json with raw text (a hostile one)."""
    f = write_mlx_adapter(run, layers=[0], rank=4, seed=seed, filename=f"{iteration:07d}_adapters.safetensors")
    if config is not None:
        (run / "adapter_config.json").write_text(config)
    return f


def good_config(**lora: object) -> str:
    params = {"rank": 4, "scale": 20.0, "dropout": 0.0, **lora}
    return json.dumps({"fine_tune_type": "lora", "num_layers": 30, "lora_parameters": params})


def raw_config(lora_text: str, top: str = '"num_layers": 30') -> str:
    """An adapter_config.json with `lora_text` spliced in as written (1e999, NaN: what json.dumps cannot write)."""
    return '{"fine_tune_type": "lora", %s, "lora_parameters": {%s}}' % (top, lora_text)


# Every malformed adapter config found so far: run directory -> its config text, and what the
# quarantine reason must say. Today's code raised ValueError/OverflowError/RecursionError out of staging.
MALFORMED = {
    "adapters-dropout": (raw_config('"rank": 4, "scale": 20, "dropout": "x"'), "dropout must be"),
    "adapters-numlayers": (raw_config('"rank": 4, "scale": 20', '"num_layers": "16.0"'), "num_layers must be"),
    "adapters-rank": (raw_config('"rank": 1e999, "scale": 20'), "rank must be"),
    "adapters-deep": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "adapters-nan": (raw_config('"rank": 4, "scale": NaN'), "NaN is not a JSON number"),
    "adapters-inf": (raw_config('"rank": 4, "scale": Infinity'), "Infinity is not a JSON number"),
    "adapters-huge": (raw_config('"rank": 4, "scale": 1e300'), "not a finite float32"),
}
# Good checkpoints in runs whose names are hostile to terminals, rich markup and line protocol
# (`adapters-[/x]` is a run two directories deep: the sources below take any depth).
HOSTILE_RUNS = ["adapters-[/x]", "adapters-tab\tand\x1b[31mansi", "adapters-back\\"]
ANY_DEPTH = "adapters-*/**/*_adapters.safetensors"


# --------------------------------------------------------------------------- the watch job, once


@pytest.fixture(scope="module")
def watched(tmp_path_factory, smollm2_gguf):
    """`evalcluster watch --once` over an OpenSSH source holding good checkpoints, every malformed
    one, one whose weights are cut short, one under a name that is not UTF-8, and good ones in runs
    with hostile names; InfluxDB receives the points."""
    tmp = tmp_path_factory.mktemp("watched")
    sshd = SSHD(tmp / "sshd").start()
    influx = InfluxV1(tmp / "influx").start()
    influx.create_database("training")
    base = tmp / "remote"
    mlx_checkpoint(base / "adapters-good", 100, seed=1)
    mlx_checkpoint(base / "adapters-good", 200, seed=2)
    for i, name in enumerate(HOSTILE_RUNS):
        mlx_checkpoint(base / name, 100, seed=10 + i)
    for i, (name, (config, _)) in enumerate(MALFORMED.items()):
        mlx_checkpoint(base / name, 100, seed=20 + i, config=config)
    cut = mlx_checkpoint(base / "adapters-cut", 100, seed=30)
    cut.write_bytes(cut.read_bytes()[:-100])
    undecodable = os.path.join(os.fsencode(base), b"adapters-\xff\xfe")
    os.makedirs(undecodable)
    mlx_checkpoint(Path(os.fsdecode(undecodable)), 100, seed=31)
    cfg = tmp / "job.yaml"
    cfg.write_text(yaml.safe_dump({
        "cluster": {"address": "local", "dashboard": False, "num_cpus": 2,
                    "serve": {"host": "127.0.0.1", "port": free_port()}},
        "models": [{"name": "smollm2", "engine": "llamacpp", "path": str(smollm2_gguf),
                    "max_adapters_per_replica": 2, "options": {"parallel": 2, "ctx_size": 1024}}],
        "sources": [{"name": "trainer", "kind": "ssh", "host": sshd.host, "port": sshd.port, "user": sshd.user,
                     "key": str(sshd.key), "known_hosts": str(sshd.known_hosts), "base": str(base),
                     "layout": "mlx", "glob": ANY_DEPTH, "model": "smollm2"}],
        "probes": {"sets": ["capability"], "max_tokens": 8, "limit": 3},  # the point is the checkpoints
        "scorers": ["heuristic", "capability"],
        "staging": {"cache_dir": str(tmp / "cache")},
        "sinks": {"ledger": str(tmp / "ledger.sqlite"), "spool_dir": str(tmp / "spool"),
                  "influx": {"url": influx.url, "protocol": "v1", "database": "training", "flush_interval_ms": 100}},
        "poll_interval_s": 1, "max_attempts": 2, "retry_backoff_s": 1,
    }))
    run = cli("watch", "--once", "--config", str(cfg), timeout=1500)
    yield {"run": run, "config": cfg, "ledger": tmp / "ledger.sqlite", "influx": influx, "tmp": tmp}
    influx.stop()
    sshd.stop()


@pytest.mark.timeout(1800)
def test_watch_job_quarantines_every_malformed_checkpoint_and_scores_the_rest(watched):
    run = watched["run"]
    assert run.returncode == 0, run.stderr[-3000:]
    from checkpoints import Ledger

    led = Ledger(watched["ledger"], readonly=True)
    try:
        states = {e.checkpoint.run: (e.state, e.last_error or "") for e in led.list()}
    finally:
        led.close()
    scored = {r for r, (st, _) in states.items() if st == "scored"}
    assert scored == {"adapters-good", *HOSTILE_RUNS}, states
    for name, (_, why) in MALFORMED.items():
        state, reason = states[name]
        assert state == "quarantined" and why in reason and f"{name}/adapter_config.json" in reason, (name, reason)
        assert "\n" not in reason and len(reason) <= 500
    assert states["adapters-cut"][0] == "quarantined" and "0000100_adapters.safetensors" in states["adapters-cut"][1]
    assert not any("adapters-\udcff" in r for r in states), "the run named in bytes that are not UTF-8 is not recorded"
    # `evalcluster status` shows each quarantined one with its one-line reason, and the hostile names as text.
    status = cli("status", "--config", str(watched["config"]), "--address", "http://127.0.0.1:9")
    assert status.returncode == 0, status.stderr[-2000:]
    lines = status.stdout.splitlines()
    for name, (_, why) in [*MALFORMED.items(), ("adapters-cut", ("", "truncated"))]:
        assert any(name in ln and why in ln for ln in lines), (name, status.stdout)
    out = status.stdout
    assert "\x1b" not in out, repr(out[max(0, out.find("\x1b") - 400):out.find("\x1b") + 60])
    # (a long name folds over two lines of its cell: look for its escaped start)
    assert "adapters-[/x]" in out and "adapters-tab\\tand\\" in out and "adapters-back\\" in out, out


@pytest.mark.timeout(1800)
def test_hostile_run_names_make_points_and_rebuild_goes_on(watched):
    """A run named `adapters-back\\` (a tag line protocol cannot carry as is) still gets its points,
    and `influx rebuild` rebuilds every run (it aborted for all of them)."""
    assert watched["run"].returncode == 0, watched["run"].stderr[-3000:]
    influx = watched["influx"]
    series = influx.query('SHOW TAG VALUES FROM "capability_score" WITH KEY = "model"', db="training")
    values = {v[1] for s in series["results"][0].get("series", []) for v in s["values"]}
    assert {"back/", "[/x]", "tab and\x1b[31mansi"} <= values, values
    r = cli("influx", "rebuild", "--config", str(watched["config"]), "--timeout", "60")
    assert r.returncode == 0, (r.stdout, r.stderr[-2000:])
    assert "skipped" not in r.stdout and "6 targets" in r.stdout, r.stdout


def test_hostile_run_names_in_status_and_checkpoints_list(tmp_path):
    """Run names that are rich markup, ANSI escapes, tabs and a trailing backslash: `status` and
    `checkpoints list` print them as text (they crashed on markup)."""
    from checkpoints import LocalSource, Poller, discover_once, layout_spec
    from cluster.config import load_config, open_ledger

    base = tmp_path / "runs"
    for i, name in enumerate(HOSTILE_RUNS):
        mlx_checkpoint(base / name, 100, seed=i)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "models": [{"name": "smollm2", "engine": "llamacpp", "path": str(ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf")}],
        "sources": [{"name": "lab", "kind": "local", "path": str(base), "layout": "mlx", "glob": ANY_DEPTH,
                     "model": "smollm2"}],
        "sinks": {"ledger": str(tmp_path / "ledger.sqlite")},
    }))
    cfg = load_config(cfg_file)
    with open_ledger(cfg) as led:
        poller = Poller(LocalSource(base, name="lab"), layout_spec("mlx", glob=ANY_DEPTH))

        async def discover() -> None:
            await discover_once([poller], led)
            await discover_once([poller], led)

        asyncio.run(discover())
        entries = led.list()
        assert len(entries) == len(HOSTILE_RUNS)
        led.record_failure(entries[0].id, "reason with [bold]markup[/] and \x1b[2J a screen clear", permanent=True)
    status = cli("status", "--config", str(cfg_file), "--address", "http://127.0.0.1:9")
    assert status.returncode == 0, status.stderr[-2000:]
    listing = cli("checkpoints", "list", "--config", str(cfg_file))
    assert listing.returncode == 0, listing.stderr[-2000:]
    for out in (status.stdout, listing.stdout):
        assert "adapters-[/x]" in out or "[/x]" in out, out
        assert "\x1b" not in out and "\t" not in out, repr(out)
        assert "\\x1b[31mansi" in out and "back\\" in out, out
    assert "reason with [bold]markup[/] and [2J a screen clear" in status.stdout, status.stdout


# --------------------------------------------------------------------------- staging


def stage_local(base: Path, tmp_path: Path, base_model: Path) -> dict:
    """Discover (two polls) and stage a local base's checkpoints; run -> ledger entry."""
    from checkpoints import Ledger, LocalSource, Poller, Stager, discover_once, layout_spec, stage_pending

    src = LocalSource(base, name="lab")
    led = Ledger(tmp_path / "ledger.sqlite")
    poller = Poller(src, layout_spec("mlx"))

    async def stage() -> None:
        await discover_once([poller], led)
        await discover_once([poller], led)
        await stage_pending(led, Stager(tmp_path / "cache", 2**30), {"lab": src}, {"lab": base_model}, concurrency=1)

    asyncio.run(stage())
    try:
        return {e.checkpoint.run: e for e in led.list()}
    finally:
        led.close()


def test_nan_and_infinite_scales_never_reach_an_engine(tmp_path, smollm2_gguf):
    """NaN, Infinity and out-of-range scales are refused at staging, and a GGUF LoRA with a NaN alpha
    by the llama.cpp engine (they passed validation and reached the engines)."""
    from deployments import AdapterError, LlamaCppEngine

    base = tmp_path / "runs"
    cases = {"adapters-nan": raw_config('"rank": 4, "scale": NaN'),
             "adapters-inf": raw_config('"rank": 4, "scale": -Infinity'),
             "adapters-overflow": raw_config('"rank": 4, "scale": 1e999'),
             "adapters-alpha": '{"fine_tune_type": "lora", "rank": 4, "alpha": NaN}',
             "adapters-good": good_config()}
    for i, (name, config) in enumerate(cases.items()):
        mlx_checkpoint(base / name, 100, seed=i, config=config)
    states = {r: (e.state, e.last_error) for r, e in stage_local(base, tmp_path, smollm2_gguf).items()}
    assert states.pop("adapters-good")[0] == "staged"
    assert all(st == "quarantined" for st, _ in states.values()), states
    assert "scale must be a positive number" in states["adapters-overflow"][1], states

    import gguf

    lora = gguf_lora_for(SMOLLM2_DIMS, tmp_path / "nan.gguf", seed=1, modules=("q_proj",))
    reader = gguf.GGUFReader(lora, "r+")
    alpha = reader.fields["adapter.lora.alpha"]
    alpha.parts[alpha.data[0]][0] = float("nan")  # written in place, through the reader's memory map
    del reader
    engine = LlamaCppEngine("smollm2", smollm2_gguf, adapters=True)
    with pytest.raises(AdapterError, match="alpha"):
        engine.validate_adapter(lora)


def test_same_weights_with_another_scale_are_staged_apart(tmp_path, smollm2_gguf):
    """Two checkpoints with identical weights and different scales are two cache entries, each with
    its own config (the second was served with the first's)."""
    base = tmp_path / "runs"
    mlx_checkpoint(base / "adapters-a", 100, seed=7, config=good_config(scale=1.0))
    mlx_checkpoint(base / "adapters-b", 100, seed=7, config=good_config(scale=20.0))
    staged = stage_local(base, tmp_path, smollm2_gguf)
    a, b = staged["adapters-a"], staged["adapters-b"]
    assert a.state == b.state == "staged" and a.checkpoint.sha256 == b.checkpoint.sha256
    assert a.local_path != b.local_path
    scales = {r: json.loads((Path(e.local_path) / "adapter_config.json").read_text())["lora_parameters"]["scale"]
              for r, e in staged.items()}
    assert scales == {"adapters-a": 1.0, "adapters-b": 20.0}


# --------------------------------------------------------------------------- SSH discovery


def ssh_source(server, base: Path, **kw):
    from checkpoints import SSHSource

    return SSHSource(server.host, server.port, server.user, server.key, server.known_hosts, str(base), name="s", **kw)


def remote_processes(base: Path) -> list[psutil.Process]:
    """Processes on the host (this machine) still working on files under `base`."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(base) in part for part in p.info["cmdline"] or []) and p.pid != os.getpid():
                found.append(p)
        except psutil.Error:
            continue
    return found


@pytest.mark.ssh
@pytest.mark.timeout(300)
async def test_ssh_discovery_is_never_stuck(sshd, tmp_path):
    """A checkpoint swapped for a FIFO between two polls, and a run whose name is not UTF-8: polls go
    on (they timed out, or raised, at every poll), later checkpoints are discovered, and no process
    is left blocked on the host."""
    from checkpoints import Ledger, Poller, discover_once, layout_spec

    base = tmp_path / "remote"
    fifo = mlx_checkpoint(base / "adapters-fifo", 100, seed=1)
    mlx_checkpoint(base / "adapters-good", 100, seed=2)
    undecodable = os.path.join(os.fsencode(base), b"adapters-\xff")
    os.makedirs(undecodable)
    mlx_checkpoint(Path(os.fsdecode(undecodable)), 100, seed=3)
    src = ssh_source(sshd, base, command_timeout=5)
    led = Ledger(tmp_path / "ledger.sqlite")
    poller = Poller(src, layout_spec("mlx"))
    found: list[str] = []
    try:
        found += [c.run for c in (await discover_once([poller], led)).new]  # first seen: hashed at the next poll
        fifo.unlink()
        os.mkfifo(fifo)  # a reader of this blocks until a writer comes: none will
        mlx_checkpoint(base / "adapters-later", 100, seed=4)
        for _ in range(3):
            found += [c.run for c in (await discover_once([poller], led)).new]
        assert sorted(found) == ["adapters-good", "adapters-later"], found
        assert [e.checkpoint.run for e in led.list()] == ["adapters-good", "adapters-later"]
        stuck = remote_processes(base)
        assert not stuck, [p.info["cmdline"] for p in stuck]
    finally:
        await src.close()
        for p in remote_processes(base):  # today's code leaves a blocked sha256sum per poll
            with_suppress(p.kill)


def with_suppress(fn) -> None:
    try:
        fn()
    except psutil.Error:
        pass


@pytest.mark.ssh
@pytest.mark.timeout(300)
async def test_ssh_hashing_is_bounded_and_incremental(sshd, tmp_path):
    """A first poll of a base larger than one command can hash in time: every poll's listing returns,
    at most `hash_bytes` are hashed per poll, and what was hashed is kept (the whole pass timed out at
    every poll)."""
    from checkpoints import Poller, layout_spec

    base = tmp_path / "remote"
    size = 96 * 2**20
    for i in range(4):
        f = mlx_checkpoint(base / f"adapters-big{i}", 100, seed=i)
        with open(f, "r+b") as fh:  # sparse: big to hash, nothing on disk
            fh.truncate(size)
    src = ssh_source(sshd, base, command_timeout=20)
    poller = Poller(src, layout_spec("mlx"), hash_bytes=size + 2**20)
    taken = []
    try:
        for _ in range(6):
            res = await poller.poll()
            assert res.listed == 4
            taken.append(len(res.new))
    finally:
        await src.close()
    assert taken == [0, 1, 1, 1, 1, 0], taken  # one file's worth per poll, each kept once hashed


@pytest.mark.ssh
async def test_symlinks_on_an_ssh_source_are_never_followed(sshd, tmp_path, smollm2_gguf):
    """A base that is a symlink lists its checkpoints (it listed as empty); a checkpoint swapped for
    a symlink after discovery is refused at download (it was followed)."""
    from checkpoints import Ledger, Poller, Stager, discover_once, layout_spec, stage_pending

    real = tmp_path / "real"
    f = mlx_checkpoint(real / "adapters-s", 100, seed=1)
    mlx_checkpoint(real / "adapters-s", 200, seed=2)
    link = tmp_path / "base-link"
    link.symlink_to(real)
    src = ssh_source(sshd, link)
    led = Ledger(tmp_path / "ledger.sqlite")
    poller = Poller(src, layout_spec("mlx"))
    elsewhere = tmp_path / "elsewhere.safetensors"
    try:
        await discover_once([poller], led)
        await discover_once([poller], led)
        elsewhere.write_bytes(f.read_bytes())  # the same bytes, so only the symlink can be refused
        f.unlink()
        f.symlink_to(elsewhere)
        await stage_pending(led, Stager(tmp_path / "cache", 2**30, retries=0), {"s": src}, {"s": smollm2_gguf})
    finally:
        await src.close()
    states = {e.checkpoint.iteration: (e.state, e.last_error) for e in led.list()}
    assert states[200][0] == "staged", states
    assert states[100][0] == "quarantined" and "is a symlink" in states[100][1], states


# --------------------------------------------------------------------------- the endpoint


@pytest.fixture(scope="module")
def served(ray_cluster, smollm2_gguf, tmp_path_factory):
    """The app: SmolLM2 on llama.cpp (2 adapters per replica, a 4096-token context) and a model
    whose upstream is down; the API key from an environment variable."""
    from ray import serve

    from cluster.config import parse_config
    from cluster.runtime import deploy_app, undeploy_app
    from deployments._serve import APP_NAME

    root = tmp_path_factory.mktemp("served")
    adapters = root / "adapters"
    adapters.mkdir()
    for i, name in enumerate(["alpha", "beta"]):
        gguf_lora_for(SMOLLM2_DIMS, adapters / name, seed=40 + i, std_b=0.1, modules=("q_proj", "v_proj"))
    os.environ[KEY_ENV] = KEY
    cfg = parse_config({
        "cluster": {"serve": {"host": "127.0.0.1", "port": free_port(), "api_key_env": KEY_ENV}},
        "models": [
            {"name": "smollm2", "engine": "llamacpp", "path": str(smollm2_gguf), "resources": {"llamacpp": 1},
             "max_adapters_per_replica": 2, "adapter_dirs": [str(adapters)],
             "options": {"parallel": 2, "ctx_size": 4096}},
            {"name": "down", "engine": "openai",
             "options": {"base_url": f"http://127.0.0.1:{free_port()}/v1", "max_retries": 0, "timeout_s": 5}},
        ],
        "staging": {"cache_dir": str(root / "cache")},
    }, "hostile-test")
    url, _ = deploy_app(cfg)
    yield url
    serve.delete(APP_NAME)
    undeploy_app(cfg)  # this module's models, given back and deleted
    os.environ.pop(KEY_ENV, None)


def info(model: str) -> dict:
    from ray import serve

    from deployments._serve import deployment_name, model_app

    return serve.get_deployment_handle(deployment_name(model), model_app(model)).info.remote().result(timeout_s=120)


def test_an_api_key_that_names_nothing_refuses_to_start(tmp_path, smollm2_gguf):
    """An unset or blank api_key_env, an empty api_key_file: one line naming it, and no app (auth
    was silently off)."""
    from cluster.config import parse_config
    from deployments import DeploymentError, build_app

    empty = tmp_path / "key"
    empty.write_text("  \n")
    os.environ["EVALCLUSTER_TEST_BLANK_KEY"] = "   "
    try:
        for serve_cfg, named in (({"api_key_env": "EVALCLUSTER_TEST_UNSET_KEY"}, "EVALCLUSTER_TEST_UNSET_KEY"),
                                 ({"api_key_env": "EVALCLUSTER_TEST_BLANK_KEY"}, "EVALCLUSTER_TEST_BLANK_KEY"),
                                 ({"api_key_file": str(empty)}, str(empty))):
            cfg = parse_config({"cluster": {"serve": serve_cfg},
                                "models": [{"name": "m", "engine": "llamacpp", "path": str(smollm2_gguf)}]}, "t")
            with pytest.raises(DeploymentError) as err:
                build_app(cfg.models, cfg.cluster.serve, tmp_path / "cache")
            assert named in str(err.value) and "\n" not in str(err.value)
    finally:
        os.environ.pop("EVALCLUSTER_TEST_BLANK_KEY", None)


@pytest.mark.ray
def test_a_keyed_job_does_not_share_a_keyless_endpoint(ray_cluster, tmp_path):
    """The endpoint is one for every job: a job asking for an API key on a cluster whose endpoint
    another job (here `serve --detach`) runs without one is refused, in one line naming the
    difference, with nothing claimed; once no one else uses the endpoint, the keyed job redeploys it
    with its key."""
    import ray
    from ray import serve

    from cluster.config import parse_config
    from cluster.runtime import deploy_app, undeploy_app
    from deployments import APP_NAME, DETACHED, DeploymentError, deploy, registry, undeploy

    upstream = f"http://127.0.0.1:{free_port()}/v1"  # one model definition for both jobs: only the key differs

    def config(serve_section: dict) -> object:
        return parse_config({"cluster": {"serve": {"host": "127.0.0.1", "port": free_port(), **serve_section}},
                             "models": [{"name": "keycheck", "engine": "openai", "options": {"base_url": upstream}}],
                             "staging": {"cache_dir": str(tmp_path / "cache")}}, "key-test")

    keyless, keyed = config({}), config({"api_key_env": KEY_ENV})
    os.environ[KEY_ENV] = KEY
    try:
        deploy(keyless.models, keyless.cluster.serve, tmp_path / "cache", job=DETACHED)
        with pytest.raises(DeploymentError) as err:
            deploy_app(keyed)
        msg = str(err.value)
        assert "without an API key" in msg and DETACHED in msg and "\n" not in msg and KEY not in msg, msg
        claims = {c.name: c.jobs for c in ray.get(registry().models.remote())}
        assert claims["keycheck"] == [DETACHED], claims  # the refused job holds nothing
        assert undeploy(DETACHED) == ["keycheck"]
        url, _ = deploy_app(keyed)  # no one uses the keyless endpoint now: it takes the key
        assert httpx.get(url + "/v1/models", timeout=60).status_code == 401
        assert httpx.get(url + "/v1/models", headers=AUTH, timeout=60).status_code == 200
    finally:
        serve.delete(APP_NAME)
        undeploy_app(keyed)
        os.environ.pop(KEY_ENV, None)


@pytest.mark.ray
def test_docs_are_off_and_health_says_nothing_without_the_key(served):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(served + path, timeout=30).status_code == 404, path
    anon = httpx.get(served + "/healthz", timeout=60)
    assert anon.status_code == 503 and anon.json() == {"status": "degraded"}  # the "down" model
    full = httpx.get(served + "/healthz", headers=AUTH, timeout=60).json()
    assert full["models"]["smollm2"]["status"] == "ok" and full["models"]["down"]["status"] == "down"
    assert "127.0.0.1" not in json.dumps(full)


def post(served: str, body: dict | bytes, path: str = "/v1/chat/completions", timeout: float = 120) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(served + path, content=body, headers={**AUTH, "Content-Type": "application/json"},
                          timeout=timeout)
    return httpx.post(served + path, json=body, headers=AUTH, timeout=timeout)


@pytest.mark.ray
def test_request_limits_are_refused_before_the_replica(served):
    """Body size, prompt length, number and length of stop strings, max_tokens beyond the context,
    an unbounded seed: each a 413/400 from the ingress, and the model's replica never sees them."""
    before = info("smollm2")["requests"]
    cases = [
        (b'{"model": "smollm2", "messages": [{"role": "user", "content": "' + b"x" * (1 << 20) + b'"}]}', 413, "body"),
        ({"model": "smollm2", "messages": [{"role": "user", "content": "word " * 50_000}], "max_tokens": 1}, 400, "prompt"),
        ({"model": "smollm2", "messages": QUESTION, "max_tokens": 1, "stop": [f"s{i}" for i in range(100_000)]}, 400, "stop"),
        ({"model": "smollm2", "messages": QUESTION, "max_tokens": 1, "stop": ["x" * 5000]}, 400, "stop"),
        ({"model": "smollm2", "messages": QUESTION, "max_tokens": 100_000}, 400, "max_tokens"),
        ({"model": "smollm2", "prompt": "Hi", "max_tokens": 1, "seed": 2**64 + 1}, 400, "seed"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "JSON"),
    ]
    for body, status, word in cases:
        path = "/v1/completions" if isinstance(body, dict) and "prompt" in body else "/v1/chat/completions"
        r = post(served, body, path)
        assert r.status_code == status and word in r.json()["error"]["message"], (word, r.status_code, r.text[:300])
    assert info("smollm2")["requests"] == before, "a refused request reached the model's replica"
    ok = post(served, {"model": "smollm2", "messages": QUESTION, "max_tokens": 8, "temperature": 0})
    assert ok.status_code == 200 and "Paris" in ok.json()["choices"][0]["message"]["content"]


@pytest.mark.ray
def test_requests_for_unknown_adapters_evict_nothing(served):
    """With both places of the replica's adapter cache taken, requests for adapters that do not exist
    are 404s and leave the loaded adapters loaded (Serve's multiplexer evicted one per request)."""
    for name in ("alpha", "beta"):
        r = post(served, {"model": f"smollm2:{name}", "messages": QUESTION, "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
    loaded = sorted(Path(p).name for p in info("smollm2")["adapters"])
    assert len(loaded) == 2, loaded
    for i in range(3):
        r = post(served, {"model": f"smollm2:nope-{i}", "messages": QUESTION, "max_tokens": 4})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    assert sorted(Path(p).name for p in info("smollm2")["adapters"]) == loaded


@pytest.mark.ray
def test_a_client_that_leaves_frees_the_engine(served):
    """A client that disconnects mid-stream, or before a whole answer came, cancels the generation at
    the engine: nothing runs there a moment later. (vLLM's abort of a closed or cancelled stream is
    tests/test_vllm.py's: through Serve, its replica reported no stream running while the client
    was still reading one, so this check cannot tell there.)"""
    model = "smollm2"
    import threading

    # A raw completion that counts on until max_tokens: it never ends by itself in time.
    body = {"model": model, "prompt": ", ".join(map(str, range(1, 30))) + ",", "temperature": 0, "max_tokens": 3900}
    path = "/v1/completions"
    info(model)  # the first look hashes the weights (seconds): done before the engine is watched
    # Mid-stream: read a few events, see the engine generating, leave.
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", served + path, json={**body, "stream": True}, headers=AUTH) as r:
            events = []
            # Held while asking: a dropped line iterator closes the connection (httpcore closes on
            # GeneratorExit), and the client would have left before the engine was looked at.
            lines = r.iter_lines()
            for line in lines:
                events.append(line)
                if len(events) >= 6:
                    break
            assert info(model)["engine_active"] == 1, f"the engine should be generating now; read: {events}"
            lines.close()
    wait_until(lambda: info(model)["engine_active"] == 0, 5, f"{model}'s engine to drop the left stream")
    # Mid-request: the whole answer is not in when the client gives up waiting for it.
    left = threading.Event()

    def ask() -> None:
        try:
            httpx.post(served + path, json=body, headers=AUTH, timeout=httpx.Timeout(60, read=6))
        except httpx.ReadTimeout:
            left.set()

    asker = threading.Thread(target=ask)
    asker.start()
    wait_until(lambda: info(model)["engine_active"] == 1, 5, f"{model}'s engine to take the request")
    asker.join(60)
    assert left.is_set(), "the request should still have been running when the client left"
    wait_until(lambda: info(model)["engine_active"] == 0, 5, f"{model}'s engine to drop the left request")


@pytest.mark.ray
def test_error_bodies_are_plain_and_client_errors_are_4xx(served):
    """An engine's 400 (prompt longer than the context) is a 400 in plain words (it was a 500); a
    down model is a 503 and an unknown adapter a 404; none names an address, a pid, a path or a log."""
    long = post(served, {"model": "smollm2", "prompt": "word " * 6000, "max_tokens": 4}, "/v1/completions")
    down = post(served, {"model": "down", "messages": QUESTION, "max_tokens": 4})
    nope = post(served, {"model": "smollm2:nope", "messages": QUESTION, "max_tokens": 4})
    assert (long.status_code, down.status_code, nope.status_code) == (400, 503, 404)
    assert "context" in long.json()["error"]["message"]
    for r in (long, down, nope):
        text = r.text
        for leak in ("127.0.0.1", "http://", "pid", "/tmp", "log:", "Traceback"):
            assert leak not in text, (leak, text)


# --------------------------------------------------------------------------- processes and local trust


def child_pids(pid: int) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


PARENT = textwrap.dedent('''
    import asyncio, sys
    from pathlib import Path
    from deployments import LlamaCppEngine

    async def main():
        binary = Path(sys.argv[2]) if len(sys.argv) > 2 else None
        engine = LlamaCppEngine("m", Path(sys.argv[1]), parallel=1, ctx_size=256, adapters=False,
                                server_binary=binary)
        await engine.start()
        print(engine.server_for(None).pid, flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
''')


@pytest.mark.timeout(300)
def test_engine_servers_die_with_a_killed_parent(tmp_path, smollm2_gguf):
    """SIGKILL the process that runs a llama.cpp engine: its server goes too, for xllamacpp's server
    and for a `server_binary` that does nothing itself to die with its parent, as llama-server (it
    kept running, holding its port, and on a GPU its memory)."""
    binary = tmp_path / "llama-server"
    binary.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        # A server binary that, like llama-server, does not arm its own death with the parent: it
        # runs llama.cpp's server as its child and forwards SIGTERM.
        {sys.executable} -m deployments._llamacpp_server "$@" &
        child=$!
        trap 'kill -TERM $child; wait $child; exit 0' TERM INT
        wait $child
    """))
    binary.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for extra in ([], [str(binary)]):
        parent = subprocess.Popen([sys.executable, "-c", PARENT, str(smollm2_gguf), *extra], stdout=subprocess.PIPE,
                                  text=True, env=env, start_new_session=True)
        tree: list[int] = []
        try:
            server = int(parent.stdout.readline())
            tree = [server, *child_pids(server)]
            assert all(alive(p) for p in tree) and (len(tree) == 2 if extra else len(tree) == 1), tree
            os.kill(parent.pid, signal.SIGKILL)
            parent.wait(10)
            wait_until(lambda: not any(alive(p) for p in tree), 10, f"the servers of a killed parent ({extra})")
        finally:
            for pid in [parent.pid, *tree]:  # today's code leaves them: stop them by PID
                with_suppress(lambda pid=pid: psutil.Process(pid).kill())


FIXTURE_PARENT = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from _servers import InfluxV1
    server = InfluxV1(Path(sys.argv[1])).start()
    print(server.process.pid, flush=True)
    time.sleep(3600)
''')


@pytest.mark.tsdb
def test_fixture_servers_die_with_a_killed_test_process(tmp_path):
    """A test process killed mid-run (an interrupted pytest) takes the InfluxDB it started with it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen([sys.executable, "-c", FIXTURE_PARENT, str(tmp_path / "influx"), str(ROOT / "tests")],
                              stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    influxd = None
    try:
        influxd = int(parent.stdout.readline())
        assert alive(influxd)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        wait_until(lambda: not alive(influxd), 10, "influxd to die with the test process")
    finally:
        with_suppress(lambda: psutil.Process(parent.pid).kill())
        if influxd:
            with_suppress(lambda: psutil.Process(influxd).kill())


def test_llamacpp_servers_answer_only_their_engine(smollm2_gguf):
    """Each llama.cpp server has its own API key: another local process can neither generate nor
    change an adapter's scale (/lora-adapters) nor read /slots; the engine itself works as before."""
    from deployments import GenOpts, LlamaCppEngine, collect

    async def run() -> tuple[dict[str, int], str]:
        engine = LlamaCppEngine("m", smollm2_gguf, parallel=1, ctx_size=512, adapters=False)
        await engine.start()
        try:
            port = engine.server_for(None).port
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
                codes = {
                    "slots": (await http.get("/slots")).status_code,
                    "lora": (await http.post("/lora-adapters", json=[{"id": 0, "scale": 9.0}])).status_code,
                    "chat": (await http.post("/v1/chat/completions", json={"messages": QUESTION})).status_code,
                    "health": (await http.get("/health")).status_code,
                }
            text = (await collect(engine.generate("The capital of France is", GenOpts(max_tokens=6)))).text
            return codes, text
        finally:
            await engine.close()

    codes, text = asyncio.run(run())
    assert codes == {"slots": 401, "lora": 401, "chat": 401, "health": 200}, codes
    assert "Paris" in text


def test_submit_keeps_every_argument_whole():
    """The job's entrypoint quotes each argument (one with spaces stays one; `;` and `$(...)` are text
    on the cluster's shell), and only the first `--` is submit's."""
    from cluster._cmd_submit import job_args
    from cluster._submit import job_entrypoint

    job = job_args(["--", "eval", "--probes", "my probes.yaml", "--", "-a prompt; touch /tmp/pwned $(id)"])
    assert job == ["eval", "--probes", "my probes.yaml", "--", "-a prompt; touch /tmp/pwned $(id)"]
    entry = job_entrypoint("job_config.yaml", job)
    argv = subprocess.run(["sh", "-c", entry.replace("python", "printf '%s\\n'", 1)], capture_output=True,
                          text=True, check=True).stdout.splitlines()
    assert argv == ["-m", "cluster.cli", "eval", "--config", "job_config.yaml", *job[1:]]


def test_ledger_and_spool_are_durable_and_private(tmp_path):
    """The ledger commits with synchronous=FULL (the spool fsyncs: "recorded" means on disk on both
    sides); ledger, WAL, spool files and their directories are the owner's only; credentials in the
    InfluxDB URL are never shown."""
    from checkpoints import Ledger
    from evaluators.sinks import InfluxConfig, Point
    from evaluators.sinks._spool import Spool

    led = Ledger(tmp_path / "state" / "ledger.sqlite")
    led.record_samples([{"key": "k", "target": "t", "probe_id": "p"}])
    assert led._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    spool = Spool(tmp_path / "spool", 2**20)
    spool.append([Point("m", {"t": "v"}, {"f": 1.0}, 1).to_line()], sync=True)
    files = [tmp_path / "state" / "ledger.sqlite", tmp_path / "state" / "ledger.sqlite-wal",
             *(tmp_path / "spool").iterdir()]
    for f in files:
        assert f.stat().st_mode & 0o077 == 0, (f, oct(f.stat().st_mode))
    for d in (tmp_path / "state", tmp_path / "spool"):
        assert d.stat().st_mode & 0o077 == 0, (d, oct(d.stat().st_mode))
    led.close()
    cfg = InfluxConfig(url="http://writer:s3cret@127.0.0.1:9/")
    assert cfg.endpoint == "http://127.0.0.1:9" and cfg.token().get_secret_value() == "writer:s3cret"
    from evaluators.sinks import check_influx

    lines = check_influx(cfg, tmp_path / "spool", 2**20)
    assert "s3cret" not in " ".join(str(ln) for ln in lines)

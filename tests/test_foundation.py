"""The foundation: every fixture does a real round trip; the config loader and CLI behave."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from cluster.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
EVALCLUSTER = [sys.executable, "-m", "cluster.cli"]


# --------------------------------------------------------------------------- config


def test_shipped_config_is_valid():
    cfg = load_config(ROOT / "ray_config.yaml", env={})
    assert cfg.cluster.address == "local"
    assert cfg.models[0].engine == "llamacpp"
    assert cfg.sources[0].kind == "local"
    assert not cfg.sinks.influx.enabled  # no INFLUX_URL, no InfluxDB


def test_env_interpolation(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(
        "models: [{name: m, engine: openai, options: {base_url: '${URL}'}}]\n"
        "sinks: {influx: {url: '${INFLUX_URL:-}'}}\n"
        "poll_interval_s: ${POLL:-7}\n"
    )
    cfg = load_config(f, env={"URL": "http://127.0.0.1:9/v1", "INFLUX_URL": "http://127.0.0.1:8086"})
    assert cfg.models[0].options.base_url == "http://127.0.0.1:9/v1"
    assert cfg.sinks.influx.url == "http://127.0.0.1:8086"
    assert cfg.poll_interval_s == 7
    with pytest.raises(ConfigError, match=r"models\.0\.options\.base_url: environment variable URL is not set"):
        load_config(f, env={})


@pytest.mark.parametrize(
    "body, key, what",
    [
        ("models: [{name: m, engine: llamacpp, path: a.gguf, replicas: two}]", "models.0.replicas", "valid integer"),
        ("models: [{name: m, engine: llamacpp, path: a.gguf, colour: red}]", "models.0.colour", "unknown key"),
        ("models: [{name: m, engine: llamacpp}]", "models.0.path", "required key is missing"),
        ("models: [{name: m, engine: tpu, path: a}]", "models.0.engine", "unknown value 'tpu'"),
        ("models: [{name: m, path: a}]", "models.0.engine", "required key is missing"),
        ("models: [{name: m, engine: llamacpp, path: a}]\nsources: [{name: s, path: /x, model: nope}]",
         "sources.0.model", "not a model"),
        ("models: [{name: m, engine: llamacpp, path: a}]\nsources: [{name: s, kind: ssh, model: m}]",
         "sources.0", "needs host, user, base, known_hosts"),
        ("{}", "models", "required key is missing"),
    ],
)
def test_bad_config_names_the_key(tmp_path, body, key, what):
    f = tmp_path / "bad.yaml"
    f.write_text(body + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(f, env={})
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{f}: {key}"), msg
    assert what in msg


def test_yaml_syntax_error_names_the_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("models:\n  - name: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"^{f}:\d+: not valid YAML"):
        load_config(f)


def test_cli_config_check(tmp_path):
    ok = subprocess.run(EVALCLUSTER + ["config", "check", str(ROOT / "ray_config.yaml")],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert "smollm2" in ok.stdout and "valid" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [{name: m, engine: llamacpp, path: a.gguf, replicas: two}]\n")
    r = subprocess.run(EVALCLUSTER + ["config", "check", str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "models.0.replicas" in lines[0], r.stderr


def test_cli_version_and_help():
    r = subprocess.run(EVALCLUSTER + ["version"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.startswith("evalcluster ")
    r = subprocess.run(EVALCLUSTER + ["--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "config" in r.stdout


# --------------------------------------------------------------------------- Ray


@pytest.mark.ray
def test_ray_task_round_trip(ray_cluster):
    import ray

    @ray.remote(num_cpus=0)
    def square(x: int) -> tuple[int, str]:
        return x * x, ray.get_runtime_context().get_node_id()

    assert ray_cluster.address.startswith("127.0.0.1:"), ray_cluster.address
    value, node = ray.get(square.remote(7))
    assert value == 49 and node == ray_cluster.node_id
    assert ray.cluster_resources().get("llamacpp") == 8


@pytest.mark.ray
def test_ray_listens_on_loopback_only(ray_cluster):
    import ray
    from ray import serve

    from cluster.runtime import start_serve

    start_serve("127.0.0.1", 0)

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Echo:
        def __call__(self, request) -> str:
            return "ok"

    try:
        serve.run(Echo.bind(), name="echo", route_prefix="/echo")
        out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
        ray_pids = _ray_pids(ray_cluster)
        wide = []
        for line in out.splitlines():
            cols = line.split()
            local = cols[3]
            if local.startswith(("127.", "[::ffff:127.", "[::1]")):
                continue
            if any(f"pid={p}," in line for p in ray_pids):
                wide.append(local)
        assert not wide, f"Ray processes listening beyond loopback: {wide}"
    finally:
        serve.shutdown()
    assert ray.is_initialized()


@pytest.mark.ray
def test_local_cluster_leaves_the_job_agent_port_free(ray_cluster):
    """A `ray start --head` beside our cluster needs 52365 for its job agent (else every submit is a 500)."""
    import socket

    from ray._private.ray_constants import DEFAULT_DASHBOARD_AGENT_LISTEN_PORT

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", DEFAULT_DASHBOARD_AGENT_LISTEN_PORT))
        except OSError as e:
            holders = [line for line in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
                       .splitlines() if f":{DEFAULT_DASHBOARD_AGENT_LISTEN_PORT} " in line]
            pytest.fail(f"port {DEFAULT_DASHBOARD_AGENT_LISTEN_PORT} is taken ({e}): {holders}")


def _ray_pids(rt) -> set[int]:
    """Pids of the processes under the cluster's session dir (raylet, gcs, workers)."""
    import psutil

    pids = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if rt.temp_dir and rt.temp_dir in cmd or "ray::" in cmd or "default_worker.py" in cmd:
            pids.add(p.info["pid"])
    return pids


# --------------------------------------------------------------------------- time-series databases


@pytest.mark.tsdb
def test_influxdb_round_trip(influxdb):
    influxdb.create_database("evals")
    r = httpx.post(f"{influxdb.url}/write", params={"db": "evals", "precision": "s"},
                   content="probe,model=smol\\ lm score=0.5,n=3i 1739577600\n")
    assert r.status_code == 204, r.text
    res = influxdb.query("SELECT * FROM probe", db="evals", epoch="s")
    series = res["results"][0]["series"][0]
    assert series["columns"] == ["time", "model", "n", "score"]
    assert series["values"] == [[1739577600, "smol lm", 3, 0.5]]


@pytest.mark.tsdb
def test_victoriametrics_round_trip(victoriametrics):
    r = httpx.post(f"{victoriametrics.url}/api/v2/write", params={"org": "o", "bucket": "evals", "precision": "s"},
                   content="probe,model=smol score=0.5 1739577600\n")
    assert r.status_code == 204, r.text
    rows = victoriametrics.export('{__name__="probe_score"}')
    assert len(rows) == 1
    assert rows[0]["metric"]["model"] == "smol"
    assert rows[0]["values"] == [0.5] and rows[0]["timestamps"] == [1739577600000]


# --------------------------------------------------------------------------- SSH


@pytest.mark.ssh
async def test_ssh_command_and_sftp_listing(ssh_server, tmp_path):
    import asyncssh

    base = tmp_path / "remote run"
    (base / "adapters-x").mkdir(parents=True)
    (base / "adapters-x" / "0000100_adapters.safetensors").write_bytes(b"x" * 10)
    known = asyncssh.read_known_hosts(str(ssh_server.known_hosts))
    async with asyncssh.connect(ssh_server.host, ssh_server.port, username=ssh_server.user,
                                client_keys=[str(ssh_server.key)], known_hosts=known) as conn:
        r = await conn.run(f"ls {asyncssh_quote(str(base / 'adapters-x'))}", check=True)
        assert r.stdout.split() == ["0000100_adapters.safetensors"]
        async with conn.start_sftp_client() as sftp:
            names = sorted(await sftp.listdir(str(base / "adapters-x")))
            assert "0000100_adapters.safetensors" in names
            attrs = await sftp.stat(str(base / "adapters-x" / "0000100_adapters.safetensors"))
            assert attrs.size == 10


def asyncssh_quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


@pytest.mark.ssh
async def test_ssh_wrong_host_key_is_refused(ssh_server, tmp_path):
    import asyncssh

    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    kh = tmp_path / "wrong_known_hosts"
    kh.write_text(f"[127.0.0.1]:{ssh_server.port} {other}\n")
    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        async with asyncssh.connect(ssh_server.host, ssh_server.port, username=ssh_server.user,
                                    client_keys=[str(ssh_server.key)],
                                    known_hosts=asyncssh.read_known_hosts(str(kh))):
            pass


# --------------------------------------------------------------------------- the embedded model


@pytest.mark.engines
def test_smollm2_gguf_answers_paris(smollm2_gguf):
    from cluster._embedded_model import verify_gguf

    assert "paris" in verify_gguf(smollm2_gguf).lower()


@pytest.mark.engines
@pytest.mark.mlx
def test_smollm2_hf_answers_paris_on_mlx(smollm2_hf):
    from cluster._embedded_model import verify_hf_mlx

    cfg = (smollm2_hf / "config.json").read_text()
    assert '"rope_theta": 100000.0' in cfg
    assert "paris" in verify_hf_mlx(smollm2_hf).lower()

"""Fixtures that start the real components on loopback, in temp dirs, and stop them by PID.

Servers: a Ray cluster (session), InfluxDB 1.6.7, VictoriaMetrics, OpenSSH sshd, and asyncssh's
in-process SSH/SFTP server. Models: SmolLM2-135M-Instruct as GGUF and as an HF directory
(`make models`). A missing binary or model fails with the step that provides it; nothing skips.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _servers import SSHD, AsyncSSHServer, InfluxV1, VictoriaMetrics, free_port, wait_until  # noqa: E402

# Ray reads these at start-up; set them before any test imports ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODELS = ROOT / "models"
SMOLLM2_GGUF = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HF = MODELS / "SmolLM2-135M-Instruct"
SYSTEM_PROMPT = "You are a helpful assistant."


# --------------------------------------------------------------------------- models


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    if not SMOLLM2_GGUF.exists():
        pytest.fail(f"{SMOLLM2_GGUF} is missing: run `make models`")
    return SMOLLM2_GGUF


@pytest.fixture(scope="session")
def smollm2_hf() -> Path:
    if not (SMOLLM2_HF / "config.json").exists():
        pytest.fail(f"{SMOLLM2_HF} is missing: run `make models`")
    return SMOLLM2_HF


# --------------------------------------------------------------------------- Ray


@pytest.fixture(scope="session")
def ray_metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def ray_cluster(ray_metrics_port):
    """One local loopback Ray cluster for the session. Declares `llamacpp` resources.

    Tests that need a differently shaped cluster (several raylets) start it in a subprocess.
    """
    from cluster.config import ClusterConfig, NodeKind
    from cluster.runtime import start_or_connect

    cfg = ClusterConfig(
        address="local",
        dashboard=False,
        num_cpus=4,
        metrics_export_port=ray_metrics_port,
        node_kinds={"test": NodeKind(resources={"llamacpp": 8})},
        local_node_kind="test",
    )
    runtime = start_or_connect(cfg)
    yield runtime
    runtime.shutdown()


@dataclass
class RayHead:
    """A `ray start --head` cluster: its GCS address (for `--address`), dashboard and environment."""

    gcs_address: str
    dashboard_url: str
    env: dict[str, str]
    temp_dir: str


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
def ray_head():
    """A `ray start --head` cluster bound to loopback, declaring `llamacpp: 4`; stopped by PID
    (its processes and their children), never with `ray stop` (which stops every cluster here)."""
    import httpx

    temp_dir = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")  # short: socket paths must fit 107 bytes
    port, dash, metrics = free_port(), free_port(), free_port()
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    try:
        subprocess.run([str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--metrics-export-port={metrics}",
                        "--num-cpus=4", "--dashboard-agent-listen-port=0", '--resources={"llamacpp": 4}',
                        "--disable-usage-stats", f"--temp-dir={temp_dir}"],
                       check=True, env=env, capture_output=True, timeout=180)
        url = f"http://127.0.0.1:{dash}"
        wait_until(lambda: httpx.get(url + "/api/version", timeout=2).status_code == 200, 120, "the Ray dashboard")
    except BaseException as e:
        _stop_cluster(temp_dir)  # what started of it: nothing of a failed head is left running
        if isinstance(e, subprocess.CalledProcessError):
            raise RuntimeError(f"ray start --head failed: {e.stderr[-2000:].decode(errors='replace')}") from None
        raise
    yield RayHead(f"127.0.0.1:{port}", url, env, temp_dir)
    _stop_cluster(temp_dir)


def _stop_cluster(temp_dir: str) -> None:
    """SIGTERM a head's processes (by PID: those naming its temp dir, and their children), then SIGKILL."""
    import psutil

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


# --------------------------------------------------------------------------- time-series databases


@pytest.fixture
def influxdb(tmp_path):
    """InfluxDB 1.6.7 with an empty data dir. `.stop()` / `.start()` keep port and data."""
    server = InfluxV1(tmp_path / "influxdb").start()
    yield server
    server.stop()


@pytest.fixture
def victoriametrics(tmp_path):
    """VictoriaMetrics with an empty data dir. `.stop()` / `.start()` keep port and data."""
    server = VictoriaMetrics(tmp_path / "vm").start()
    yield server
    server.stop()


# --------------------------------------------------------------------------- SSH


@pytest.fixture
def sshd(tmp_path):
    """OpenSSH sshd on 127.0.0.1 with a temp host key, a client key and a known_hosts file."""
    server = SSHD(tmp_path / "sshd").start()
    yield server
    server.stop()


@pytest.fixture
def asyncssh_server(tmp_path):
    """asyncssh's in-process SSH/SFTP server (real shell, real file system)."""
    server = AsyncSSHServer(tmp_path / "asyncssh").start()
    yield server
    server.shutdown()


@pytest.fixture(params=["openssh", "asyncssh"])
def ssh_server(request, tmp_path):
    """Each test that takes this runs against both SSH servers."""
    if request.param == "openssh":
        server = SSHD(tmp_path / "sshd").start()
        yield server
        server.stop()
    else:
        server = AsyncSSHServer(tmp_path / "asyncssh").start()
        yield server
        server.shutdown()

"""Fixtures that start the real components on loopback, in temp dirs, and stop them by PID.

Servers: a Ray cluster (session), InfluxDB 1.6.7, VictoriaMetrics, OpenSSH sshd, and asyncssh's
in-process SSH/SFTP server. Models: SmolLM2-135M-Instruct as GGUF and as an HF directory
(`make models`). A missing binary or model fails with the step that provides it; nothing skips.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _servers import SSHD, AsyncSSHServer, InfluxV1, VictoriaMetrics, free_port  # noqa: E402

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

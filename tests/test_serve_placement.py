"""Multi-node placement on one machine: several raylets (ray.cluster_utils.Cluster), each declaring
its own resources. Runs in a subprocess: a process can be connected to one Ray cluster at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.engines, pytest.mark.mlx, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, sys
from cluster.runtime import prepare_env, runtime_env
prepare_env(owned=True)
import ray
from ray import serve
from ray.cluster_utils import Cluster
from cluster.config import parse_config
from cluster.runtime import deploy_app
from deployments._ingress import DeploymentError, check_placement
from deployments._serve import APP_NAME, deployment_name

gguf, hf, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"llamacpp": 4}, "include_dashboard": False})
worker = c.add_node(num_cpus=2, resources={"mlx": 1})
out = {}
try:
    ray.init(address=c.address, runtime_env=runtime_env(), namespace="evalcluster", logging_level="ERROR")
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    out["nodes"] = {nid: sorted(k for k in r if k in ("llamacpp", "mlx")) for nid, r in nodes.items()}
    cfg = parse_config({
        "cluster": {"serve": {"port": port}},
        "models": [
            {"name": "smollm2", "engine": "llamacpp", "path": gguf, "resources": {"llamacpp": 1},
             "options": {"parallel": 1, "ctx_size": 1024}},
            {"name": "smollm2-mlx", "engine": "mlx", "path": hf, "resources": {"mlx": 1}},
        ],
    }, "placement-test")
    deploy_app(cfg)
    for name in ("smollm2", "smollm2-mlx"):
        h = serve.get_deployment_handle(deployment_name(name), APP_NAME)
        out[name] = h.info.remote().result(timeout_s=120)["node_id"]
    bad = parse_config({"models": [{"name": "rocm-model", "engine": "llamacpp", "path": gguf,
                                    "resources": {"rocm": 1}}]}, "placement-test")
    try:
        check_placement(bad.models, ray.nodes())
        out["rocm_error"] = None
    except DeploymentError as e:
        out["rocm_error"] = str(e)
    serve.shutdown()
finally:
    ray.shutdown()
    c.shutdown()
print("RESULT " + json.dumps(out))
"""


def test_deployments_land_on_the_nodes_that_declare_their_resources(smollm2_gguf, smollm2_hf):
    import shutil
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    from _servers import free_port

    tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = dict(os.environ, RAY_TMPDIR=tmp)
    try:
        r = subprocess.run([sys.executable, "-c", SCRIPT, str(smollm2_gguf), str(smollm2_hf), str(free_port())],
                           capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    out = json.loads(lines[0][len("RESULT "):])
    by_resource = {res[0]: nid for nid, res in out["nodes"].items() if res}
    assert len(out["nodes"]) == 2 and set(by_resource) == {"llamacpp", "mlx"}, out["nodes"]
    assert out["smollm2"] == by_resource["llamacpp"]
    assert out["smollm2-mlx"] == by_resource["mlx"]
    assert out["rocm_error"] and "'rocm'" in out["rocm_error"] and "rocm-model" in out["rocm_error"]

"""The KubeRay example (cluster/kuberay/rayjob.yaml) stays a config evalcluster accepts, and its
pods give every model the resources it is placed by and the head the paths the state lives on."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import yaml

EXAMPLE = Path(__file__).resolve().parent.parent / "cluster" / "kuberay" / "rayjob.yaml"


def test_the_kuberay_example_is_consistent():
    from cluster.config import parse_config

    docs = {d["kind"]: d for d in yaml.safe_load_all(EXAMPLE.read_text())}
    assert set(docs) == {"ConfigMap", "PersistentVolumeClaim", "RayJob"}
    cfg = parse_config(yaml.safe_load(docs["ConfigMap"]["data"]["ray_config.yaml"]), str(EXAMPLE))
    job = docs["RayJob"]["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:4] == ["python", "-m", "cluster.cli", "watch"]
    cluster = job["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for c in head["containers"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    # The config the entrypoint names is the ConfigMap's, mounted on the head.
    config_path = Path(argv[argv.index("--config") + 1])
    assert volumes[mounts[str(config_path.parent)]]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    # The ledger and the spool are on the head's persistent volume (the state node's disk).
    for path in (cfg.sinks.ledger, cfg.sinks.spool_dir):
        mount = next(m for m in mounts if str(path).startswith(m + "/"))
        assert volumes[mounts[mount]]["persistentVolumeClaim"]["claimName"] == \
            docs["PersistentVolumeClaim"]["metadata"]["name"], path
    # Every model's resources are declared by a worker group (as its node kind in the config says).
    groups = [json.loads(json.loads(g["rayStartParams"]["resources"])) for g in cluster["workerGroupSpecs"]]
    for m in cfg.models:
        assert any(all(g.get(r, 0) >= n for r, n in m.resources.items()) for g in groups), m.name
    for kind in cfg.cluster.node_kinds.values():
        assert dict(kind.resources) in groups
    # Not the single-node loopback mode: the cluster is KubeRay's.
    assert cfg.cluster.address == "auto"

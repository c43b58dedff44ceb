"""Start or connect to Ray, and keep a cluster we start on loopback only.

Ray 2.60 binds its services to the machine's "reachable" address unless
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 puts it in single-node mode (node IP 127.0.0.1), and every
Serve replica opens an inter-deployment gRPC server on [::]:0 whatever the node IP; the worker
setup hook below rebinds that one to 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.config import AppConfig, ClusterConfig

log = logging.getLogger(__name__)

NAMESPACE = "evalcluster"
SETUP_HOOK = "cluster.runtime.bind_replica_grpc_to_loopback"

# Applied to every process we start Ray from (and so inherited by Ray's own processes).
LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
}


def bind_replica_grpc_to_loopback() -> None:
    """Worker setup hook: make Serve replicas' internal gRPC server listen on 127.0.0.1 only."""
    try:
        import ray.serve._private.replica as replica
    except ImportError:  # a worker without Serve: nothing to patch
        return
    if getattr(replica, "_evalcluster_loopback", False):
        return
    original = replica.add_port_to_grpc_server

    def add_port(server: Any, address: str) -> int:
        return original(server, address.replace("[::]", "127.0.0.1").replace("0.0.0.0", "127.0.0.1"))

    replica.add_port_to_grpc_server = add_port
    replica._evalcluster_loopback = True


def prepare_env(owned: bool) -> None:
    """Set the environment Ray reads at start-up. Token auth is off only on a cluster we own."""
    for k, v in LOOPBACK_ENV.items():
        os.environ.setdefault(k, v)
    if owned:
        os.environ["RAY_AUTH_MODE"] = "disabled"
    # Ray reads this flag once, at import: if it was imported before us, correct the constant too.
    import sys

    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
        constants.ENABLE_RAY_CLUSTER = False
    bind_replica_grpc_to_loopback()


def runtime_env(extra_env: dict[str, str] | None = None, working_dir: str | None = None) -> dict[str, Any]:
    """The job-level runtime env: the loopback hook, plus env vars and an optional working_dir."""
    env = dict(LOOPBACK_ENV)
    env.update(extra_env or {})
    renv: dict[str, Any] = {"worker_process_setup_hook": SETUP_HOOK, "env_vars": env}
    if working_dir:
        renv["working_dir"] = working_dir
    return renv


@dataclass
class RayRuntime:
    """A connection to Ray; `owned` when this process started the cluster and must stop it."""

    address: str
    owned: bool
    dashboard_url: str | None
    temp_dir: str | None = None
    node_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def shutdown(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def start_or_connect(
    cfg: ClusterConfig | None = None,
    *,
    address: str | None = None,
    include_dashboard: bool | None = None,
    num_cpus: int | None = None,
    extra_env: dict[str, str] | None = None,
    namespace: str = NAMESPACE,
) -> RayRuntime:
    """Connect this process to Ray, starting a loopback-only local cluster when asked.

    Args:
        cfg: the `cluster` section of the config (defaults apply when None).
        address: overrides `cfg.address`; "local" starts a new cluster owned by this process,
            "auto" or "host:port" or "ray://host:port" connect to a running one.
        include_dashboard: overrides `cfg.dashboard` for a local cluster.
        num_cpus: overrides `cfg.num_cpus` for a local cluster.
        extra_env: env vars for every worker of this job.
        namespace: the Ray namespace named actors live in.
    """
    cfg = cfg or ClusterConfig()
    address = address or os.environ.get("EVALCLUSTER_RAY_ADDRESS") or cfg.address
    owned = address == "local"
    prepare_env(owned)
    import ray

    if ray.is_initialized():
        ctx = ray.get_runtime_context()
        return RayRuntime(address=ctx.gcs_address, owned=False, dashboard_url=_dashboard_url(), node_id=ctx.get_node_id())

    kwargs: dict[str, Any] = {
        "namespace": namespace,
        "logging_level": logging.WARNING,
        "log_to_driver": True,
    }
    # Inside a submitted job the job's own runtime env (working_dir, hook) applies; do not replace it.
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
        kwargs["runtime_env"] = runtime_env(extra_env)
    temp_dir = None
    if owned:
        temp_dir = str(cfg.temp_dir) if cfg.temp_dir else tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        Path(temp_dir).mkdir(parents=True, exist_ok=True)
        resources = {}
        if cfg.local_node_kind:
            resources = dict(cfg.node_kinds[cfg.local_node_kind].resources)
        kwargs.update(
            address="local",
            num_cpus=num_cpus or cfg.num_cpus,
            resources=resources or None,
            include_dashboard=cfg.dashboard if include_dashboard is None else include_dashboard,
            dashboard_host="127.0.0.1",
            dashboard_port=cfg.dashboard_port,
            _temp_dir=temp_dir,
        )
        if cfg.metrics_export_port:
            kwargs["_metrics_export_port"] = cfg.metrics_export_port
    else:
        kwargs["address"] = address
    with _dynamic_agent_port(owned):
        ray.init(**kwargs)
    ctx = ray.get_runtime_context()
    return RayRuntime(
        address=ctx.gcs_address,
        owned=owned,
        dashboard_url=_dashboard_url(),
        temp_dir=temp_dir,
        node_id=ctx.get_node_id(),
    )


@contextlib.contextmanager
def _dynamic_agent_port(owned: bool) -> Iterator[None]:
    """Let a cluster we start pick a free port for its dashboard agent.

    ray.init has no argument for it and takes 52365, the port a `ray start --head` on the same
    machine needs for its job agent: while our cluster holds it, that head refuses every job
    submission ("No available agent to submit job"). Port 0 is Ray's own "pick one".
    """
    if not owned:
        yield
        return
    from ray._private import parameter, ray_constants

    original = parameter.RayParams

    class RayParams(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if self.dashboard_agent_listen_port == ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT:
                self.dashboard_agent_listen_port = 0

    parameter.RayParams = RayParams
    try:
        yield
    finally:
        parameter.RayParams = original


def _dashboard_url() -> str | None:
    import ray

    try:
        url = ray.get_runtime_context().dashboard_url if hasattr(ray.get_runtime_context(), "dashboard_url") else None
    except Exception:  # noqa: BLE001 - older Ray: fall back to the worker's record
        url = None
    if not url:
        try:
            url = ray._private.worker.global_worker.node.address_info.get("webui_url")
        except Exception:  # noqa: BLE001
            url = None
    if url and not url.startswith("http"):
        url = "http://" + url
    return url or None


def start_serve(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Start Serve's HTTP proxy on loopback (Serve's own default host is 0.0.0.0)."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port}, detached=False)


def deploy_app(cfg: AppConfig, *, host: str | None = None, port: int | None = None,
               access_log: bool = True) -> tuple[str, int]:
    """Deploy the config's models (and register their `adapter_dirs`) on the connected cluster.

    Returns the endpoint's URL and how many adapters the adapter_dirs held.

    Args:
        cfg: the app config.
        host: HTTP bind address (default: cluster.serve.host, 127.0.0.1).
        port: HTTP port (default: cluster.serve.port).
        access_log: log every request (the watch job turns it off: a line per probe buries its log).
    """
    from deployments import deploy, register_adapter_dirs

    n_adapters = register_adapter_dirs(cfg.models)
    url = deploy(cfg.models, cfg.cluster.serve, cfg.staging.serve_cache_dir, host=host, port=port,
                 access_log=access_log)
    return url, n_adapters

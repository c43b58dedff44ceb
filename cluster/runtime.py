"""Start or connect to Ray; keep a cluster we start on loopback only; place the job's actors.

Networking. Only a cluster this process starts and owns (`address: local`: `make demo`, the tests'
local clusters) runs in Ray's single-node loopback mode: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes
Ray 2.60 advertise 127.0.0.1, and a worker setup hook rebinds every Serve replica's inter-deployment
gRPC server (opened on [::]:0 whatever the node IP) to 127.0.0.1. Connecting to a running cluster
(`auto`, `host:port`, `ray://`) or submitting to one leaves Ray's networking as its operator set it:
a head started in loopback mode advertises 127.0.0.1 and no worker can join it.

Placement. The state node (the head, or the one node declaring `cluster.state_resource`) holds
the ledger and the spool and runs the actors that own state: a restarted actor comes back there
and finds its data. A local source's watcher runs where its path is (`sources[].resources`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.config import AppConfig, ClusterConfig, SourceConfig

log = logging.getLogger(__name__)

NAMESPACE = "evalcluster"
SETUP_HOOK = "cluster.runtime.bind_replica_grpc_to_loopback"

# Applied to a cluster we start and own (and so inherited by Ray's own processes).
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
    """Set the environment Ray reads at start-up: loopback mode and no token auth only for a cluster
    we start and own; a cluster we connect to keeps its operator's settings."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not owned:
        return
    for k, v in LOOPBACK_ENV.items():
        os.environ.setdefault(k, v)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # Ray reads this flag once, at import: if it was imported before us, correct the constant too.
    import sys

    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
        constants.ENABLE_RAY_CLUSTER = False
    bind_replica_grpc_to_loopback()


def runtime_env(owned: bool, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """The job-level runtime env: env vars, and on a cluster we own the loopback hook and env.

    Args:
        owned: the cluster is the loopback-only one this process started.
        extra_env: env vars for every worker of the job.
    """
    env = dict(LOOPBACK_ENV) if owned else {}
    env.update(extra_env or {})
    renv: dict[str, Any] = {"env_vars": env}
    if owned:
        renv["worker_process_setup_hook"] = SETUP_HOOK
    return renv


HEAD_RESOURCE = "node:__internal_head__"  # what Ray's head node declares, and no other node


def state_placement(cluster: ClusterConfig) -> dict[str, Any]:
    """Ray actor options that pin an actor to the state node (the head unless configured).

    Args:
        cluster: the `cluster` section.
    """
    return {"resources": {cluster.state_resource or HEAD_RESOURCE: 0.001}}


def job_actor(cls: type, name: str, placement: dict[str, Any], *args: object, **options: Any) -> Any:
    """One of the job's named actors: found if it runs, else created where `placement` puts it. Ray
    restarts it (its calls are not retried unless `options` say so) on a node that fits the same
    placement: for the state actors, the same node, where their data is.

    Args:
        cls: the actor's class.
        name: its name in the job's namespace.
        placement: `state_placement(...)` or `source_placement(...)`.
        args: its constructor's arguments.
        options: further Ray actor options (max_concurrency, max_task_retries, lifetime ...).
    """
    import ray

    return (ray.remote(cls).options(name=name, get_if_exists=True, num_cpus=0, max_restarts=-1, **placement,
                                    **options).remote(*args))


def current_job_id() -> str:
    """The Ray job id of this driver or of the job that created this actor (hex)."""
    import ray

    return ray.get_runtime_context().get_job_id()


def job_scoped(name: str, job_id: str | None = None) -> str:
    """A job's own actor name, `<name>:<ray job id>`: two jobs on one cluster never share it, and
    stopping one job kills only the actors named for it.

    Args:
        name: the actor's base name (e.g. "evalcluster-writer").
        job_id: the job (default: the current one).
    """
    return f"{name}:{job_id or current_job_id()}"


def ray_job_running(job_id: str) -> bool:
    """Whether Ray job `job_id` (hex) still runs on the connected cluster."""
    from deployments import running_job_ids

    return job_id in running_job_ids()


def source_placement(cluster: ClusterConfig, source: SourceConfig) -> dict[str, Any]:
    """Ray actor options for a source's watcher: the node its `resources` name, else the state node.

    Args:
        cluster: the `cluster` section.
        source: the source.
    """
    return {"resources": dict(source.resources)} if source.resources else state_placement(cluster)


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
    log_to_driver: bool = True,
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
        log_to_driver: copy the workers' output to this process's terminal (off: it stays in the
            Ray session's log files only).
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
        "log_to_driver": log_to_driver,
    }
    # Inside a submitted job the job's own runtime env (working_dir, hook) applies; do not replace it.
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
        kwargs["runtime_env"] = runtime_env(owned, extra_env)
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


RAY_LOGGERS = ("ray", "ray.serve", "ray.data", "ray.train", "ray.tune", "py.warnings")


def ray_logs_to_file(path: Path) -> Path:
    """Send the log lines Ray and Serve write in this process (and Python warnings) to `path`
    instead of the terminal; evalcluster's own lines are left where they were. Call it again after
    Serve starts: Serve adds its own handlers when it is first used.

    Args:
        path: the log file (appended to; its directory is created).
    """
    import ray.serve  # noqa: F401 - Serve sets up its logger's terminal handler on import: do it first, replace it here

    path.parent.mkdir(parents=True, exist_ok=True)
    logging.captureWarnings(True)
    names = set(RAY_LOGGERS) | {n for n in logging.root.manager.loggerDict if n.startswith("ray.")}
    for name in names:
        lg = logging.getLogger(name)
        ours = [h for h in lg.handlers if getattr(h, "_evalcluster_file", None) == str(path)]
        for h in list(lg.handlers):
            if h not in ours:
                lg.removeHandler(h)
        if name in RAY_LOGGERS or not lg.propagate:  # the others reach one of these by propagating
            if not ours:
                h = logging.FileHandler(path)
                h._evalcluster_file = str(path)  # type: ignore[attr-defined]
                h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
                lg.addHandler(h)
            lg.propagate = False
    return path


def delete_serve_apps() -> None:
    """Delete every Serve application, waiting for their replicas to stop (their engines close), on
    a cluster this process owns and shuts down next: the controller and proxy go with the cluster.
    Not `serve.shutdown()`: the controller exits inside the call that asks it to, and Ray's core
    worker prints that failed call on the terminal ("Task ServeController.graceful_shutdown
    failed ...")."""
    from ray import serve

    names = list(serve.status().applications)
    for name in names:  # asked all at once, their replicas stop side by side (~3 s each, one by one)
        serve.delete(name, _blocking=False)
    deadline = time.monotonic() + 120
    while left := set(serve.status().applications) & set(names):
        if time.monotonic() > deadline:
            log.warning("Serve applications %s still stopping after 120 s; shutting the cluster down", sorted(left))
            return
        time.sleep(0.1)


def start_serve(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Start Serve's HTTP proxy on loopback (Serve's own default host is 0.0.0.0)."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port}, detached=False)


def deploy_app(cfg: AppConfig, *, host: str | None = None, port: int | None = None,
               access_log: bool = True, job: str | None = None) -> tuple[str, int]:
    """Claim and deploy the config's models (and register their `adapter_dirs`) on the connected
    cluster: a model another running job serves identically is shared, one it defines otherwise is
    refused (ModelClaimError) before anything is deployed; the cluster-wide generation budget of
    each model is set from the definition being served (`configure_budgets`).

    Returns the endpoint's URL and how many adapters the adapter_dirs held.

    Args:
        cfg: the app config.
        host: HTTP bind address (default: cluster.serve.host, 127.0.0.1).
        port: HTTP port (default: cluster.serve.port).
        access_log: log every request (the watch job turns it off: a line per probe buries its log).
        job: who claims the models (default: this Ray job; `serve --detach`: DETACHED).
    """
    from cluster._budgets import configure_budgets
    from deployments import deploy, register_adapter_dirs, registry

    placement = state_placement(cfg.cluster)
    url = deploy(cfg.models, cfg.cluster.serve, cfg.staging.serve_cache_dir, job=job or current_job_id(),
                 host=host, port=port, access_log=access_log, placement=placement)
    configure_budgets(cfg)
    n_adapters = register_adapter_dirs(cfg.models, registry(placement))
    return url, n_adapters


def undeploy_app(cfg: AppConfig, job: str | None = None) -> list[str]:
    """Give back the job's model claims; the models no one else claims are deleted. Returns them.

    Args:
        cfg: the app config (places the registry).
        job: the claiming job (default: this Ray job).
    """
    from deployments import undeploy

    return undeploy(job or current_job_id(), state_placement(cfg.cluster))

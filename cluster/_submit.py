"""Submitting the job to a running cluster with `ray job submit` semantics (the Jobs SDK).

The job's working_dir holds only the four packages and an absolute-path copy of the config
(pointed at `address: auto`, the cluster the job runs on), so neither models nor the venv are
uploaded; the cluster's nodes need the dependencies installed and the model paths present.
Secrets are not shipped: the cluster's environment provides INFLUX_TOKEN and API keys.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

PACKAGES = ("cluster", "deployments", "evaluators", "checkpoints")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def build_working_dir(config_path: Path | None) -> tuple[Path, str]:
    """A temp dir with the packages, the config and the probe-set files it names (they travel with
    the job: the submitting machine's files are not on the cluster); returns (dir, config file
    name inside it). Other paths in the config are the cluster's (models, ledger, keys)."""
    from cluster.config import load_config
    from evaluators import probe_set_file

    cfg = load_config(config_path)
    root = Path(__file__).resolve().parent.parent
    work = Path(tempfile.mkdtemp(prefix="evalcluster-job-"))
    for pkg in PACKAGES:
        shutil.copytree(root / pkg, work / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    data = cfg.absolute_dump()
    data.setdefault("cluster", {})["address"] = "auto"
    base = cfg.source_path.parent if cfg.source_path is not None else Path.cwd()
    sets: list[str] = []
    for i, name in enumerate(cfg.probes.sets):
        style, path = probe_set_file(name, base)
        if path is None:
            sets.append(name)
            continue
        (work / "probesets").mkdir(exist_ok=True)
        shipped = f"probesets/{i}-{path.name}"
        shutil.copyfile(path, work / shipped)  # a missing file fails here, naming it
        sets.append(f"{style}:{shipped}" if style else shipped)
    data.setdefault("probes", {})["sets"] = sets
    (work / "job_config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return work, "job_config.yaml"


AGENT_WAIT_S = 60.0


class SubmitError(RuntimeError):
    """The cluster would not take the job."""


def job_entrypoint(config_name: str, job: list[str]) -> str:
    """The job's shell command: Ray runs the entrypoint through a shell, so every argument is quoted
    (an argument with spaces stays one, `;` or `$(...)` in one is text, never run on the cluster).

    Args:
        config_name: the config file inside the job's working_dir.
        job: the command and its arguments, e.g. ["watch", "--once"].
    """
    return shlex.join(["python", "-m", "cluster.cli", job[0], "--config", config_name, *job[1:]])


def submit_job(config_path: Path | None, job: list[str], address: str) -> str:
    """Submit `evalcluster <job...>` as a Ray job and return its id.

    Args:
        config_path: the config to run (default: ./ray_config.yaml).
        job: the command and its arguments, e.g. ["watch", "--once"].
        address: the cluster's dashboard URL.
    """
    from ray.job_submission import JobSubmissionClient

    from cluster.runtime import runtime_env

    work, cfg_name = build_working_dir(config_path)
    try:
        client = JobSubmissionClient(address)
        entrypoint = job_entrypoint(cfg_name, job)
        # A head that has just started answers the dashboard before its job agent has registered;
        # Ray reports that as a 500 "No available agent". Wait for the agent rather than fail.
        agent_deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                job_id = client.submit_job(
                    entrypoint=entrypoint,
                    # The cluster's own networking: a submitted job never switches it to loopback.
                    runtime_env={**runtime_env(owned=False), "working_dir": str(work)},
                    metadata={"app": "evalcluster", "command": job[0]},
                )
                break
            except RuntimeError as e:
                if "No available agent" not in str(e):
                    raise
                if time.monotonic() > agent_deadline:
                    raise SubmitError(
                        f"the cluster at {address} has no job agent after {AGENT_WAIT_S:.0f} s: see its "
                        "dashboard_agent.log. Another Ray cluster on the same machine holding the agent's "
                        "port (52365) is the usual cause: start the head with --dashboard-agent-listen-port=0"
                    ) from None
                time.sleep(1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return job_id


def follow_job(address: str, job_id: str, timeout_s: float = 24 * 3600) -> str:
    """Stream a job's logs to stdout until it ends; return its final status.

    Args:
        address: the cluster's dashboard URL.
        job_id: the job to follow.
        timeout_s: stop following after this long (the job keeps running).
    """
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    asyncio.run(_follow(client, job_id, timeout_s))
    return str(client.get_job_status(job_id).value)


async def _follow(client: Any, job_id: str, timeout_s: float) -> None:
    import sys

    deadline = time.monotonic() + timeout_s

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    task = asyncio.create_task(tail())
    try:
        while time.monotonic() < deadline:
            if str(client.get_job_status(job_id).value) in TERMINAL:
                break
            await asyncio.sleep(1)
        await asyncio.wait_for(task, timeout=10)
    except asyncio.TimeoutError:
        pass
    finally:
        task.cancel()


def dashboard_url(address: str | None) -> str:
    """The Jobs API address: the one given, else $RAY_ADDRESS (as http), else the local default."""
    return address or os.environ.get("RAY_ADDRESS", "").replace("ray://", "http://") or "http://127.0.0.1:8265"


def ray_jobs(address: str | None) -> list[dict] | None:
    """The cluster's jobs, or None when no dashboard answers there."""
    import datetime as dt

    import httpx

    url = dashboard_url(address)
    try:
        httpx.get(url + "/api/version", timeout=2).raise_for_status()
    except httpx.HTTPError:
        return None
    from ray.job_submission import JobSubmissionClient

    out = []
    for j in JobSubmissionClient(url).list_jobs():
        started = dt.datetime.fromtimestamp(j.start_time / 1000).isoformat(timespec="seconds") if j.start_time else "-"
        out.append({"id": j.submission_id or j.job_id or "?", "status": str(j.status.value if hasattr(j.status, "value") else j.status),
                    "entrypoint": j.entrypoint, "started": started})
    return out

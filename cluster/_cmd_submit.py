"""`evalcluster submit -- watch|eval ...`: the job on a running cluster, through the Jobs SDK."""

from __future__ import annotations

import argparse

from cluster.cli import add_config_arg

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="submit `watch` or `eval` as a Ray job (ray job submit semantics)")
    add_config_arg(p)
    p.add_argument("--address", default=None,
                   help="the cluster's dashboard URL (default: $RAY_ADDRESS or http://127.0.0.1:8265)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    p.add_argument("job", nargs=argparse.REMAINDER, help="-- watch|eval [args...]")
    p.set_defaults(func=submit)


def job_args(remainder: list[str]) -> list[str]:
    """The job's command line from what follows `submit`: the first `--` separates it and goes; every
    later `--` is the job's own (e.g. `eval ... -- PROMPT` where the prompt starts with a dash).

    Args:
        remainder: argparse's REMAINDER for `job`.
    """
    return remainder[1:] if remainder[:1] == ["--"] else list(remainder)


def submit(args: argparse.Namespace) -> int:
    from cluster._submit import dashboard_url, follow_job, submit_job

    job = job_args(args.job)
    if not job or job[0] not in ("watch", "eval"):
        raise ValueError("say what to submit after `--`: `evalcluster submit -- watch [--once]` or `-- eval ...`")
    url = dashboard_url(args.address)
    job_id = submit_job(args.config, job, address=url)
    print(f"job {job_id} submitted; dashboard: {url}/#/jobs/{job_id}", flush=True)
    if args.no_wait:
        return 0
    final = follow_job(url, job_id)
    print(f"job {job_id}: {final}")
    return 0 if final == "SUCCEEDED" else 1

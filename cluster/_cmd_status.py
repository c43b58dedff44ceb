"""`evalcluster status`: per run, checkpoints scored / pending / failed / quarantined and the last
scores; with `--cluster`, every evalcluster job on the cluster (its models, ledger and runs); the
cluster's Ray jobs when a dashboard answers."""

from __future__ import annotations

import argparse
import json

from cluster.cli import add_config_arg

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="per run: checkpoints scored / pending / failed / quarantined, last scores")
    add_config_arg(p)
    p.add_argument("--address", help="Ray dashboard URL, to show the state of submitted jobs")
    p.add_argument("--cluster", metavar="ADDRESS",
                   help="a running cluster (GCS host:port, or auto): list every job on it, its models and runs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=status)


def status(args: argparse.Namespace) -> int:
    from cluster._report import MAIN_FIELDS, SHORT_NAMES, _fmt, learning_curves
    from cluster._submit import ray_jobs
    from cluster._terminal import Col, cell, fit_table, table_console
    from cluster.config import ledger_exists, load_config, open_ledger

    cfg = load_config(args.config)
    on_cluster = cluster_jobs(cfg, args.cluster) if args.cluster else None
    curves, entries, ledger_path = [], [], None
    if on_cluster is None or ledger_exists(cfg):
        with open_ledger(cfg, readonly=True) as ledger:
            curves = learning_curves(ledger)
            entries = ledger.list()
            ledger_path = ledger.path
    runs = []
    for c in curves:
        states: dict[str, int] = {}
        quarantined = []
        for e in entries:
            if e.checkpoint.run == c.run:
                states[e.state] = states.get(e.state, 0) + 1
                if e.state == "quarantined":
                    quarantined.append({"id": e.id, "label": e.checkpoint.label, "reason": e.last_error or ""})
        last = next((p for p in reversed(c.checkpoints) if p.state == "scored"), None)
        runs.append({"run": c.run, "run_id": c.run_id, "model": c.model, "states": states,
                     "last": None if last is None else {"label": last.label, "iteration": last.iteration,
                                                        **{f: _fmt(last.fields.get(f)) for f in MAIN_FIELDS
                                                           if f in last.fields}},
                     "best": c.best.label if c.best else None, "verdict": c.verdict, "flags": c.flags,
                     "set_aside": c.set_aside, "quarantined": quarantined})
    jobs = ray_jobs(args.address)
    if args.json:
        print(json.dumps({"runs": runs, "jobs": jobs, "cluster_jobs": on_cluster}, indent=2))
        return 0
    console = table_console()
    if on_cluster is not None:
        ccols = [Col("job"), Col("state"), Col("models", optional=True), Col("ledger", optional=True),
                 Col("runs (scored/pending/failed)", "runs", whole=True)]
        crows = [[j["job"], j["state"], ", ".join(j["models"]) or "-", j["ledger"] or "-",
                  "; ".join(f"{run}: {_run_counts(c)}" for run, c in sorted(j["runs"].items())) or "-"]
                 for j in on_cluster]
        console.print(fit_table("evalcluster jobs on the cluster", ccols, crows, console.width))
    if ledger_path is None:
        return 0
    # The scores some run has (a run of generative probes only shows no multiple-choice column).
    shown = [f for f in MAIN_FIELDS if any(f in (r["last"] or {}) for r in runs)] or ["capability.passed",
                                                                                      "heuristic.lek_score"]
    # Narrow headings: four letters each for the counts (a title line says what they are).
    cols = [Col("run", whole=True), Col("scored", "done", right=True), Col("pending", "wait", right=True),
            Col("failed", "fail", right=True), Col("quarantined", "quar", right=True),
            Col("last scored", "last", optional=True),
            *[Col(MAIN_FIELDS[f], SHORT_NAMES[f], right=True, optional=f not in ("capability.passed", "heuristic.lek_score"))
              for f in shown],
            Col("best", optional=True)]
    rows = []
    for r in runs:
        s = r["states"]
        pending = s.get("discovered", 0) + s.get("staged", 0) + s.get("evaluating", 0)
        last = r["last"] or {}
        # Compact forms for a narrow terminal: a score without its interval, a label by its iteration.
        rows.append([r["run"], str(s.get("scored", 0)), str(pending), str(s.get("failed", 0)),
                     str(s.get("quarantined", 0)), (last.get("label", "-"), _at(last.get("label", "-"))),
                     *[(last.get(f, "-"), last.get(f, "-").split(" [")[0]) for f in shown],
                     (r["best"] or "-", _at(r["best"] or "-"))])
    # Run names and labels come from the sources' file names, reasons from errors: cells, not markup.
    console.print(fit_table(f"runs in {ledger_path}", cols, rows, console.width))
    for r in runs:
        console.print(cell(f"{r['run']}: {r['verdict']}"))
        for target, flag in sorted(r["flags"].items()):
            console.print(cell(f"  {target}: {flag} (every greedy or seeded answer equals the base's)"))
        for target, why in sorted(r["set_aside"].items()):
            for reason, n in sorted(why.items()):
                console.print(cell(f"  {target}: {n} earlier samples set aside: {reason} changed"))
    reasons = [(r["run"], q) for r in runs for q in r["quarantined"]]
    if reasons:
        console.print(cell(f"quarantined ({len(reasons)}; `evalcluster checkpoints retry ID` sends one back):"))
        for run, q in reasons:  # one line each: the ledger keeps a reason as one line
            console.print(cell(f"  {q['id']}  {run} {q['label']}: {q['reason']}"), soft_wrap=True)
    if jobs is not None:
        jcols = [Col("job"), Col("status"), Col("entrypoint", optional=True), Col("started", optional=True)]
        jrows = [[j["id"], j["status"], j["entrypoint"][:60], j["started"]] for j in jobs]
        console.print(fit_table("Ray jobs", jcols, jrows, console.width))
    return 0


def _at(label: str) -> str:
    """A checkpoint label's iteration part ("S135 @0000030" -> "@0000030"): what tells the
    checkpoints of one run apart, in a narrow terminal."""
    return "@" + label.rsplit("@", 1)[1] if "@" in label else label


def _run_counts(states: dict[str, int]) -> str:
    pending = states.get("discovered", 0) + states.get("staged", 0) + states.get("evaluating", 0)
    return f"{states.get('scored', 0)}/{pending}/{states.get('failed', 0) + states.get('quarantined', 0)}"


def cluster_jobs(cfg: object, address: str) -> list[dict]:
    """Every evalcluster job on a running cluster: the jobs that claim models (the registry's
    model table), and the running jobs that have a result writer; each with its state, models,
    ledger and runs.

    Args:
        cfg: the app config (places the registry).
        address: the cluster's GCS address, or "auto".
    """
    import ray

    from cluster._writer import WRITER_NAME
    from cluster.runtime import current_job_id, job_scoped, start_or_connect, state_placement
    from deployments import registry

    start_or_connect(cfg.cluster, address=address)  # type: ignore[attr-defined]
    import ray._private.state as gcs_state

    me = current_job_id()
    table = {j["JobID"]: j for j in gcs_state.jobs()}
    models: dict[str, list[str]] = {}
    for claim in ray.get(registry(state_placement(cfg.cluster)).models.remote()):  # type: ignore[attr-defined]
        for job in claim.jobs:
            models.setdefault(job, []).append(claim.name)
    out = []
    for job in sorted(set(models) | {j for j, d in table.items() if not d["IsDead"] and j != me}):
        entry = {"job": job, "state": "detached" if job not in table else
                 ("ended" if table[job]["IsDead"] else "running"),
                 "models": sorted(models.get(job, [])), "ledger": None, "runs": {}}
        try:
            entry.update(ray.get(ray.get_actor(job_scoped(WRITER_NAME, job)).run_counts.remote(), timeout=30))
        except (ValueError, ray.exceptions.RayError):
            if job not in models:
                continue  # a Ray job that is not an evalcluster job (no writer, no models)
        out.append(entry)
    return out

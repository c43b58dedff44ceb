"""`evalcluster score`, `evalcluster eval` and `evalcluster compare`.

score    INPUT.jsonl (go-ml Response records) -> go-ml's ScorerOutput JSON, plus counts and intervals.
eval     run probe sets through a model (or an adapter of it) now, with a progress bar and a table.
compare  two scores files: old vs new per model and field, paired on prompt ids.
Heavy imports happen inside the commands, and `eval` imports only the engine it opens.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Any

from cluster.cli import add_config_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score answered prompts (go-ml Response JSONL) and write a scores file")
    p.add_argument("input", type=Path, help="JSONL: {id, prompt, response, model, domain?, correct_answer?, ...}")
    p.add_argument("--suites", default="all",
                   help="comma-separated: heuristic, exact, semantic, content, standard (or all; default all; "
                        "judge suites need --judge)")
    p.add_argument("--judge", metavar="MODEL", default=None, help="a model name from the config to judge with")
    p.add_argument("--concurrency", type=int, default=4, help="judge calls in flight (default 4)")
    p.add_argument("--output", "-o", type=Path, default=None, help="write the scores file here (default: print averages)")
    add_config_arg(p)
    p.set_defaults(func=score)

    p = sub.add_parser("eval", help="evaluate a model (or an adapter) on probe sets now")
    p.add_argument("--model", required=True, help="a model name from the config")
    p.add_argument("--adapter", type=Path, default=None, help="an adapter in the engine's format (e.g. a GGUF LoRA)")
    p.add_argument("--probes", default=None,
                   help="comma-separated probe sets: capability, content, a .yaml file, or <style>:<file.jsonl> "
                        "(default: probes.sets from the config)")
    p.add_argument("--repeats", type=int, default=None, help="answers per probe (default: probes.repeats)")
    p.add_argument("--judge", metavar="MODEL", default=None, help="judge with this config model (default: judge.model)")
    p.add_argument("--no-judge", action="store_true", help="do not judge, even if the config names a judge")
    p.add_argument("--concurrency", type=int, default=None, help="requests in flight (default: budgets.per_endpoint)")
    p.add_argument("--max-tokens", type=int, default=None, help="override the probe sets' max_tokens")
    p.add_argument("--limit", type=int, default=None, help="only the first N probes of each set (a smoke run)")
    p.add_argument("--no-ledger", action="store_true",
                   help="do not record samples in the ledger (no resume, and no InfluxDB points: they are derived "
                        "from the ledger)")
    p.add_argument("--output", "-o", type=Path, default=None, help="also write a scores file (compare can read it)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    add_config_arg(p)
    p.set_defaults(func=eval_now)

    p = sub.add_parser("compare", help="compare two scores files (old, new)")
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=compare)


# --------------------------------------------------------------------------- helpers


def _judge_for(name: str | None, cfg: Any, limit: int, engines: dict[str, Any]) -> Any:
    """A Judge around the named config model (opened once, shared with `engines`)."""
    if not name:
        return None
    import asyncio

    from evaluators import Judge

    if name not in engines:
        from deployments import open_engine

        engines[name] = open_engine(cfg.model(name), cfg)
    return Judge(engines[name], name=name, retries=cfg.judge.retries, temperature=cfg.judge.temperature,
                 max_tokens=cfg.judge.max_tokens, seed=cfg.probes.seed, limiter=asyncio.Semaphore(limit))


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _ci(f: dict[str, Any]) -> str:
    if f.get("ci_low") is None:
        return ""
    return f" [{f['ci_low']:.2f}, {f['ci_high']:.2f}]"


def _print_averages(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for model, fields in sorted(doc["model_stats"].items()):
        c = doc["counts"].get(model, {})
        t = Table(title=f"{model}: {c.get('prompts', 0)} prompts, {c.get('judge_failures', 0)} judge failures",
                  title_justify="left")
        for col in ("field", "mean [95% CI]", "n", "failures"):
            t.add_column(col, justify="left" if col == "field" else "right")
        for name, f in sorted(fields.items()):
            t.add_row(name, _fmt(f["mean"]) + _ci(f), str(f["n"]), str(f["failures"]))
        console.print(t)


# --------------------------------------------------------------------------- score


def score(args: argparse.Namespace) -> int:
    import asyncio

    from evaluators import read_responses, resolve_scorers
    from evaluators import score_responses, scorer_output, write_scorer_output

    if args.concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1, got {args.concurrency}")
    responses = read_responses(args.input)
    engines: dict[str, Any] = {}
    judge = None
    if args.judge:
        from cluster.config import load_config

        cfg = load_config(args.config)
        judge = _judge_for(args.judge, cfg, args.concurrency, engines)
    scorers = resolve_scorers(args.suites, judge)  # fails on a bad suite name before anything starts

    async def run() -> list:
        try:
            for e in engines.values():
                await e.start()
            with _Bar("scoring") as bar:
                return await score_responses(responses, args.suites, judge, args.concurrency, progress=bar,
                                             source=args.input.name)
        finally:
            for e in engines.values():
                await e.close()

    results = asyncio.run(run())
    doc = scorer_output(results, scorers, judge_model=args.judge or "")
    if args.output:
        write_scorer_output(args.output, doc)
        print(f"scores written to {args.output} ({len(results)} prompts)", file=sys.stderr)
    else:
        _print_averages(doc)
    return 0


class _Bar:
    """A rich progress bar on stderr, fed by the runner's progress callback; silent when stderr
    is not a terminal. Use as a context manager so it is stopped whatever happens."""

    def __init__(self, description: str) -> None:
        self.bar = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=Console(stderr=True), transient=True)
            self.task = self.bar.add_task(description, total=None)

    def __enter__(self) -> "_Bar":
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __call__(self, p: Any) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=p.done + p.skipped, total=p.total)


# --------------------------------------------------------------------------- eval


def _adapter_sha256(path: Path) -> str:
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        raise ValueError(f"adapter {path}: no files")
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def eval_now(args: argparse.Namespace) -> int:
    import asyncio
    import time

    from cluster.config import load_config
    from deployments import open_engine
    from evaluators import EvalTarget, aggregate, load_probe_set, run_eval
    from evaluators import scorer_output, write_scorer_output

    t0 = time.perf_counter()
    cfg = load_config(args.config)
    model_cfg = cfg.model(args.model)
    set_names = [s.strip() for s in args.probes.split(",")] if args.probes else list(cfg.probes.sets)
    probe_sets = [load_probe_set(s) for s in set_names if s]
    if not probe_sets:
        raise ValueError("no probe sets given (--probes capability,content)")
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        from dataclasses import replace

        probe_sets = [replace(ps, probes=ps.probes[: args.limit]) for ps in probe_sets]
    repeats = args.repeats if args.repeats is not None else cfg.probes.repeats
    concurrency = args.concurrency if args.concurrency is not None else cfg.budgets.per_endpoint
    if concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1, got {concurrency}")

    if args.adapter is not None:
        adapter = args.adapter.expanduser().resolve()
        if not adapter.exists():
            raise ValueError(f"adapter {args.adapter}: no such file or directory")
        sha = _adapter_sha256(adapter)
        target = EvalTarget(id=f"adapter:{args.model}:{sha[:16]}", model=args.model, adapter=str(adapter),
                            adapter_sha256=sha, label=adapter.name)
    else:
        target = EvalTarget.base(args.model)

    engines: dict[str, Any] = {args.model: open_engine(model_cfg, cfg)}
    judge_name = None if args.no_judge else (args.judge or cfg.judge.model)
    judge = _judge_for(judge_name, cfg, cfg.budgets.judge, engines)
    scorers: list[str] = list(cfg.scorers)
    if judge is not None:
        # Each rubric only runs on probes it fits: capability probes get the capability rubric
        # (via "capability"), content probes the content one, benchmark sets theirs.
        scorers += list(cfg.judge.suites) or ["content", "standard"]

    # The watch job's path: samples to the ledger and points to the configured InfluxDB sink (through
    # its spool), recorded by the same ResultWriter the job's writer actor hosts, here in-process.
    writer = store = None
    if not args.no_ledger:
        from cluster._writer import ResultWriter

        writer = ResultWriter(cfg, recover=False)  # a running watch job's checkpoints stay as they are
        store = writer.recorder.store(target)

    async def run() -> Any:
        try:
            await asyncio.gather(*(e.start() for e in engines.values()))
            with _Bar(f"{target.id}") as bar:
                return await run_eval(
                    engines[args.model], [target], probe_sets, scorers=scorers, judge=judge, repeats=repeats,
                    concurrency=concurrency, store=store, system_prompt=cfg.probes.system_prompt,
                    temperature=cfg.probes.temperature, max_tokens=args.max_tokens or cfg.probes.max_tokens,
                    seed=cfg.probes.seed, progress=bar,
                )
        finally:
            await asyncio.gather(*(e.close() for e in engines.values()), return_exceptions=True)

    sink: dict[str, Any] | None = None
    try:
        report = asyncio.run(run())
        results = list(report.results)
        if store is not None and report.skipped:
            # Samples recorded by an earlier run count too: this is the state of these probes now.
            new = {r.key for r in results}
            from evaluators import SampleResult

            planned = set(report.keys)
            results += [SampleResult.from_record(r) for r in store.samples(target.id)
                        if r["key"] in planned and r["key"] not in new]
        if writer is not None:
            writer.finish_target(target, None)  # the summary points, as the watch job writes them
            delivered = writer.flush(timeout=30)
            if cfg.sinks.influx.enabled:
                sink = writer.sink_stats()
                if not delivered:
                    print(f"InfluxDB: {sink['pending']} points wait in the spool {cfg.resolve(cfg.sinks.spool_dir)}"
                          f"{' and ' + str(sink['owed']) + ' samples are owed in the ledger' if sink['owed'] else ''}"
                          f" ({sink['last_error'] or 'not acknowledged yet'}); `evalcluster influx replay` sends them",
                          file=sys.stderr)
    finally:
        if writer is not None:
            writer.close(timeout=0)

    groups = aggregate(results, by=("probe_set",)) + aggregate(results, by=("probe_set", "category"))
    summary = {
        "target": target.to_dict(),
        "probe_sets": {ps.name: ps.hash for ps in probe_sets},
        "samples": len(results),
        "new_samples": len(report.results),
        "resumed_samples": report.skipped,
        "generation_failures": sum(1 for r in results if not r.complete),
        "judge_outcomes": report.judge_outcomes,
        "scorer_versions": report.scorer_versions,
        "seconds": round(time.perf_counter() - t0, 2),
        "groups": [g.to_dict() for g in groups],
    }
    if sink is not None:
        summary["influx"] = {k: sink[k] for k in ("written", "sent", "replayed", "pending", "owed")}
    if args.output:
        doc = scorer_output(results, report.scorers, judge_model=judge_name or "",
                            extra_metadata={"probe_sets": summary["probe_sets"], "target": target.to_dict()})
        write_scorer_output(args.output, doc)
    if args.json:
        import json

        print(json.dumps(summary, indent=2, default=str))
    else:
        _print_eval_table(summary, groups)
    return 1 if summary["generation_failures"] == summary["samples"] and summary["samples"] else 0


# Fields shown in the eval table (others are in --json and --output).
_TABLE_FIELDS = [
    ("capability.passed", "pass rate"), ("exact.correct", "exact"), ("heuristic.lek_score", "LEK"),
    ("capability_judge.correctness", "judge correctness"), ("content.truth_telling", "truth telling"),
    ("semantic.sovereignty", "sovereignty"),
]


def _print_eval_table(summary: dict[str, Any], groups: list) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    shown = [(f, label) for f, label in _TABLE_FIELDS if any(f in g.fields for g in groups)]
    t = Table(title=f"{summary['target']['id']}: {summary['samples']} samples "
                    f"({summary['resumed_samples']} from the ledger), {summary['seconds']}s", title_justify="left")
    t.add_column("probe set / category")
    t.add_column("n", justify="right")
    for _, label in shown:
        t.add_column(label + " [95% CI]", justify="right")
    t.add_column("failures", justify="right")
    for g in groups:
        name = g.group["probe_set"] + (f" / {g.group['category']}" if "category" in g.group else "")
        cells = []
        for f, _ in shown:
            fs = g.fields.get(f)
            cells.append("-" if fs is None or fs.mean is None else f"{fs.mean:.2f}{_ci(fs.to_dict())}")
        fails = g.generation_failures + sum(fs.failures for fs in g.fields.values())
        t.add_row(name if "category" not in g.group else f"  {name}", str(g.samples), *cells, str(fails),
                  style="bold" if "category" not in g.group else None)
    console.print(t)
    if summary["judge_outcomes"]:
        console.print("judge outcomes: " + ", ".join(f"{k}: {v}" for k, v in summary["judge_outcomes"].items()))


# --------------------------------------------------------------------------- compare


def compare(args: argparse.Namespace) -> int:
    from evaluators import compare_outputs, read_scorer_output

    old, new = read_scorer_output(args.old), read_scorer_output(args.new)
    table = compare_outputs(old, new)
    if args.json:
        import json

        print(json.dumps(table, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for model, rows in table.items():
        t = Table(title=f"Model: {model}", title_justify="left")
        for col in ("metric", "old", "new", "delta", "paired 95% CI", "pairs", "McNemar p"):
            t.add_column(col, justify="left" if col == "metric" else "right")
        for r in rows:
            ci = f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]" if r.get("ci_low") is not None else ""
            t.add_row(r["field"], _fmt(r["old"], 2), _fmt(r["new"], 2),
                      f"{r['delta']:+.2f}" if r["delta"] is not None else "-", ci, str(r.get("n_pairs", "-")),
                      f"{r['mcnemar_p']:.3g}" if "mcnemar_p" in r else "")
        console.print(t)
    return 0

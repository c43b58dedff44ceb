"""`evalcluster eval`: run probe sets through a model (or an adapter of it) now, in this process,
with a progress bar and a table; samples go to the ledger and InfluxDB as the watch job's do."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cluster.cli import add_config_arg

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model (or an adapter) on probe sets now")
    p.add_argument("--model", required=True, help="a model name from the config")
    p.add_argument("--adapter", type=Path, default=None, help="an adapter in the engine's format (e.g. a GGUF LoRA)")
    p.add_argument("--probes", default=None,
                   help="comma-separated probe sets: capability, content, mc-basic, text-basic, a .yaml file, or <style>:<file.jsonl> (gsm8k, mmlu, text, ...) "
                        "(default: probes.sets from the config)")
    p.add_argument("--repeats", type=int, default=None, help="answers per probe (default: probes.repeats)")
    p.add_argument("--judge", metavar="MODEL", default=None, help="judge with this config model (default: judge.model)")
    p.add_argument("--no-judge", action="store_true", help="do not judge, even if the config names a judge")
    p.add_argument("--concurrency", type=int, default=None,
                   help="requests in flight, fixed (default: found from the engine's throughput within "
                        "budgets.per_endpoint when budgets.adaptive, else budgets.per_endpoint)")
    p.add_argument("--max-tokens", type=int, default=None, help="override the probe sets' max_tokens")
    p.add_argument("--limit", type=int, default=None, help="only the first N probes of each set (a smoke run)")
    p.add_argument("--no-ledger", action="store_true",
                   help="do not record samples in the ledger (no resume, and no InfluxDB points: they are derived "
                        "from the ledger)")
    p.add_argument("--output", "-o", type=Path, default=None, help="also write a scores file (compare can read it)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    add_config_arg(p)
    p.set_defaults(func=eval_now)


def eval_now(args: argparse.Namespace) -> int:
    import asyncio
    import time

    from cluster._plan import build_plan
    from cluster._terminal import Bar
    from cluster.config import load_config
    from deployments import open_engine
    from evaluators import AdaptiveLimit, EvalTarget, aggregate, run_eval, scorer_output, write_scorer_output

    t0 = time.perf_counter()
    cfg = load_config(args.config)
    plan = build_plan(cfg, probes=args.probes.split(",") if args.probes else None, repeats=args.repeats,
                      judge_model=args.judge, no_judge=args.no_judge, max_tokens=args.max_tokens, limit=args.limit)
    concurrency = args.concurrency if args.concurrency is not None else cfg.budgets.per_endpoint
    if concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1, got {concurrency}")

    target = (EvalTarget.of_adapter_path(args.model, args.adapter) if args.adapter is not None
              else EvalTarget.base(args.model))

    # One engine per model: the judge shares the evaluated model's when it is the same model.
    engines: dict[str, Any] = {args.model: open_engine(cfg.model(args.model))}
    judge = None
    if plan.judge is not None:
        if plan.judge.model not in engines:
            engines[plan.judge.model] = open_engine(cfg.model(plan.judge.model))
        judge = plan.open_judge(engines[plan.judge.model], asyncio.Semaphore(cfg.budgets.judge))

    # The watch job's path: samples to the ledger and points to the configured InfluxDB sink (through
    # its spool), recorded by the same ResultWriter the job's writer actor hosts, here in-process.
    writer = store = None
    if not args.no_ledger:
        from cluster._writer import ResultWriter

        from evaluators.results import register_probe_sets

        writer = ResultWriter(cfg, recover=False)  # a running watch job's checkpoints stay as they are
        register_probe_sets(plan.probe_sets)  # the command line's sets too, for their points
        store = writer.recorder.store(target)

    async def run() -> Any:
        nonlocal target
        try:
            await asyncio.gather(*(e.start() for e in engines.values()))
            # What produces the answers, read back from the started engine: part of every sample key.
            info = await engines[args.model].info()
            target = target.identified(info.identity)
            limit: int | AdaptiveLimit = concurrency
            if args.concurrency is None and cfg.budgets.adaptive:
                limit = AdaptiveLimit(concurrency, info.slots or None, floor=info.slots or 1, name=f"gen:{args.model}")
            with Bar(f"{target.id}") as bar:
                return await run_eval(engines[args.model], [target], judge=judge, concurrency=limit, store=store,
                                      progress=bar, **plan.run_args())
        finally:
            await asyncio.gather(*(e.close() for e in engines.values()), return_exceptions=True)

    sink: dict[str, Any] | None = None
    flag: dict[str, Any] | None = None
    try:
        report = asyncio.run(run())
        for why, n in sorted(report.set_aside.items()):
            print(f"{n} earlier samples of {target.id} set aside (not reused): {why} changed", file=sys.stderr)
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
            flag = writer.ledger.target_flags().get(target.id)
            if flag is not None:
                d = flag["detail"]
                print(f"{target.id}: {flag['flag']} (all {d['compared']} greedy or seeded answers equal the base's)",
                      file=sys.stderr)
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

    by_category = aggregate(results, by=("probe_set", "category"))
    # a set of one category (a loglikelihood set's) has no rows under it: its row says it all
    several = {s for s in {g.group["probe_set"] for g in by_category}
               if sum(g.group["probe_set"] == s for g in by_category) > 1}
    groups = aggregate(results, by=("probe_set",)) + [g for g in by_category if g.group["probe_set"] in several]
    summary = {
        "target": target.to_dict(),
        "probe_sets": {ps.name: ps.hash for ps in plan.probe_sets},
        "samples": len(results),
        "new_samples": len(report.results),
        "resumed_samples": report.skipped,
        "set_aside": report.set_aside,
        "flag": flag,
        "generation_failures": sum(1 for r in results if not r.complete),
        "judge_outcomes": report.judge_outcomes,
        "scorer_versions": report.scorer_versions,
        "seconds": round(time.perf_counter() - t0, 2),
        "groups": [g.to_dict() for g in groups],
    }
    if sink is not None:
        summary["influx"] = {k: sink[k] for k in ("written", "sent", "replayed", "pending", "owed")}
    if args.output:
        doc = scorer_output(results, report.scorers, judge_model=plan.judge.model if plan.judge else "",
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
    ("choice.acc", "multiple-choice acc"), ("choice.acc_norm", "acc_norm"), ("bpb.bits_per_byte", "bits per byte"),
    ("capability_judge.correctness", "judge correctness"), ("content.truth_telling", "truth telling"),
    ("semantic.sovereignty", "sovereignty"),
]


def _print_eval_table(summary: dict[str, Any], groups: list) -> None:
    from rich.console import Console
    from rich.table import Table

    from cluster._terminal import ci_text

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
            cells.append("-" if fs is None or fs.mean is None else f"{fs.mean:.2f}{ci_text(fs.to_dict())}")
        fails = g.generation_failures + sum(fs.failures for fs in g.fields.values())
        t.add_row(name if "category" not in g.group else f"  {name}", str(g.samples), *cells, str(fails),
                  style="bold" if "category" not in g.group else None)
    console.print(t)
    if summary["judge_outcomes"]:
        console.print("judge outcomes: " + ", ".join(f"{k}: {v}" for k, v in summary["judge_outcomes"].items()))

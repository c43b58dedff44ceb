"""`evalcluster demo`: the main job on the embedded default config, start to finish.

A local loopback Ray cluster; SmolLM2 on llama.cpp behind Serve; a demo training run of real
LoRA checkpoints (trained now if the source holds none); then watch → evaluate the base model and
every checkpoint → score → ledger (and InfluxDB when INFLUX_URL is set); the learning curve is
printed and an HTML report written.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from cluster.cli import add_config_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job on the embedded default config (trains a demo run first)")
    add_config_arg(p)
    p.add_argument("--steps", type=int, default=30, help="training steps of the demo run (default 30)")
    p.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps (default 10)")
    p.add_argument("--report", type=Path, default=None, help="HTML report path (default: .evalcluster/demo-report.html)")
    p.set_defaults(func=demo)


class DemoProgress:
    """What the demo shows while the job runs: a progress bar per target (the base model, each
    checkpoint) while it is evaluated, left complete when it is done, and a line when the ledger's
    counts change. Fed by `run_watch`'s poll callback."""

    def __init__(self, console: Any, t0: float) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console
        self.t0 = t0
        self.bars = Progress(TextColumn("  {task.description:<24}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), console=console)
        self.tasks: dict[str, Any] = {}
        self.last_line = ""

    def __enter__(self) -> "DemoProgress":
        self.bars.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bars.stop()

    def update(self, st: dict[str, Any]) -> None:
        from cluster._terminal import cell

        c = st["counts"]
        line = f"ledger: {', '.join(f'{k} {v}' for k, v in sorted(c.items()) if v) or 'empty'}"
        if line != self.last_line:
            self.bars.console.print(cell(f"  {time.perf_counter() - self.t0:4.0f}s {line}"))
            self.last_line = line
        running = st["coordinator"].get("progress") or {}
        for key, p in running.items():
            if key not in self.tasks:
                self.tasks[key] = self.bars.add_task(p["label"], total=p["total"])
            self.bars.update(self.tasks[key], completed=p["done"], total=p["total"])
        for key, task in self.tasks.items():
            if key not in running:  # done (or handed back): its bar stays, full when every sample is in
                t = self.bars.tasks[task]
                if not t.finished and key not in st["coordinator"].get("running", []):
                    self.bars.update(task, completed=t.total or t.completed)
                    self.bars.stop_task(task)


def demo(args: argparse.Namespace) -> int:
    import threading

    from cluster._job import install_stop_handlers, run_watch
    from cluster._report import curve_table, learning_curves, write_html
    from cluster._terminal import cell, table_console
    from cluster.config import load_config, open_ledger

    console = table_console()
    t0 = time.perf_counter()
    cfg = load_config(args.config)
    source = next((s for s in cfg.sources if s.kind == "local"), None)
    if source is None:
        raise ValueError("the demo needs a local checkpoint source in the config (the shipped ray_config.yaml has one)")
    run_base = cfg.resolve(source.path)
    source_model = cfg.model(source.model)
    existing = sorted(run_base.glob("adapters-*/*_adapters.safetensors"))
    console.rule("[bold]1. the training run")
    if existing:
        console.print(f"{run_base}: {len(existing)} checkpoints already there (delete the directory to train again)")
    else:
        from cluster._demo_training import train_demo_run

        from cluster._embedded_model import HF_DIR_NAME

        # The trainer needs the HF form of the model; `make models` puts it next to the GGUF.
        if getattr(source_model, "path", None) is None:
            raise ValueError(f"the demo trains on a local model; source {source.name!r} uses model "
                             f"{source_model.name!r} ({source_model.engine}), which has no local path")
        hf = cfg.resolve(source_model.path).parent / HF_DIR_NAME
        if not (hf / "config.json").exists():
            raise FileNotFoundError(f"{hf} is missing (the demo trains SmolLM2 in HF form): run `make models`")
        console.print(f"fine-tuning SmolLM2 with LoRA for {args.steps} steps into {run_base} "
                      "(on the capability probes' answers, so the curve rises by construction)")
        train_demo_run(hf, run_base, steps=args.steps, save_every=args.save_every,
                       log=lambda line: console.print("  " + line))
    console.print(f"[dim]{time.perf_counter() - t0:.0f}s[/dim]")

    console.rule("[bold]2. watch → evaluate → score → stream")
    influx = cfg.sinks.influx
    console.print(f"model {cfg.models[0].name} ({cfg.models[0].engine}), probes {', '.join(cfg.probes.sets)}, "
                  f"scorers {', '.join(cfg.scorers)}; InfluxDB: "
                  + (f"{influx.endpoint}" if influx.enabled else "off (set INFLUX_URL to stream the points)"))
    ray_log = cfg.resolve(".evalcluster/logs/demo-ray.log")
    console.print(f"[dim]Ray's and Serve's own log lines: {ray_log}; the workers' output: the Ray session's "
                  "logs (/tmp/ray-*/session_latest/logs)[/dim]")
    stop = threading.Event()
    install_stop_handlers(stop)
    with DemoProgress(console, t0) as shown:
        res = run_watch(cfg, once=True, on_poll=shown.update, stop=stop, ray_log=ray_log)
    if res.failed_bases:
        model, why = next(iter(res.failed_bases.items()))
        raise RuntimeError(f"the demo's base model {model} could not be evaluated: {why}")
    console.print(f"serve endpoint was up, ray dashboard was at http://127.0.0.1:{cfg.cluster.dashboard_port}; "
                  f"job done in {res.duration_s:.0f}s")
    if influx.enabled:
        console.print(f"influx: {res.sink.get('sent', 0)} points acknowledged, {res.sink.get('pending', 0)} spooled")

    console.rule("[bold]3. the learning curve")
    with open_ledger(cfg, readonly=True) as ledger:
        curves = learning_curves(ledger)
    for curve in curves:
        console.print(curve_table(curve, console.width))
        console.print(cell(curve.verdict))
    out = write_html(curves, args.report or cfg.resolve(".evalcluster/demo-report.html"), title="evalcluster demo")
    console.print(f"report: {out}")
    console.print(f"[bold]demo finished in {time.perf_counter() - t0:.0f}s[/bold]")
    return 0

"""`evalcluster demo`: the main job on the embedded default, as far as it exists."""

from __future__ import annotations

import argparse
import time

from cluster.cli import add_config_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job on the embedded default config")
    add_config_arg(p)
    p.set_defaults(func=demo)


def demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from cluster.config import load_config
    from cluster.runtime import start_or_connect

    console = Console()
    t0 = time.perf_counter()
    cfg = load_config(args.config)
    console.print(f"[bold]config[/bold] {cfg.source_path}: valid")
    rt = start_or_connect(cfg.cluster)
    try:
        import ray

        console.print(f"[bold]ray[/bold] local cluster up ({rt.address}), dashboard {rt.dashboard_url}")
        ray.get(ray.remote(num_cpus=0)(lambda: None).remote())
        model = cfg.models[0]
        from cluster.models import verify_gguf

        answer = verify_gguf(cfg.resolve(model.path))
        console.print(f"[bold]{model.name}[/bold] ({model.engine}): {answer.strip()!r}")
    finally:
        rt.shutdown()
    console.print(
        "[yellow]not there yet:[/yellow] Serve deployments, checkpoint discovery, scoring, InfluxDB "
        "streaming and the watch job (issues 4-9)."
    )
    console.print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0

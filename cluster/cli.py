"""`evalcluster`: the command line.

Each command registers itself from its own module (`cluster/_cmd_<command>.py`); heavy imports
(Ray, engines) happen inside the command functions, so `--help` and `config check` start fast.
Any error reaching `main` becomes one line on stderr and a non-zero exit; set
EVALCLUSTER_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

# One module per command, `cluster/_cmd_<command>.py`, in the order `--help` lists them. Each
# defines `register(sub: argparse._SubParsersAction) -> None` and imports its heavy dependencies
# inside the command function, so `--help` stays fast.
COMMANDS = (
    "demo", "watch", "eval", "status", "report", "submit", "serve", "generate", "checkpoints", "convert",
    "score", "compare", "influx", "config",
)


def add_config_arg(p: argparse.ArgumentParser) -> None:
    """The `--config FILE` option every command that reads ray_config.yaml takes."""
    p.add_argument(
        "--config",
        "-c",
        type=Path,
        default=None,
        help="config file (default: $EVALCLUSTER_CONFIG or ./ray_config.yaml)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evalcluster",
        description="Evaluate every fine-tuning checkpoint as it lands, on a Ray cluster.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=_version)
    for command in COMMANDS:
        # A command module that fails to import is a broken install or a bug: say so, never drop it.
        importlib.import_module(f"cluster._cmd_{command}").register(sub)
    return parser


def _version(args: argparse.Namespace) -> int:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("evalcluster")
    except PackageNotFoundError:
        v = "0+unknown"
    print(f"evalcluster {v}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print("evalcluster: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as e:  # noqa: BLE001 - the CLI's one place that turns errors into a line
        if os.environ.get("EVALCLUSTER_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"evalcluster: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

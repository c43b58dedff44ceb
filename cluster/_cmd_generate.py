"""`evalcluster generate`: one answer from one model of the config, in-process (no Ray)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cluster.cli import add_config_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="ask one model from the config a question (in-process, no Ray)",
        description="Start the model's engine in this process, send one chat turn, print the answer.",
    )
    add_config_arg(p)
    p.add_argument("--model", "-m", help="model name from the config (default: the first model)")
    p.add_argument("--adapter", type=Path, help="LoRA adapter in the engine's native format")
    p.add_argument("--system", help="system prompt (default: the model's system_prompt, else probes.system_prompt)")
    p.add_argument("--max-tokens", type=int, default=256, help="default: 256")
    p.add_argument("--temperature", type=float, default=0.0, help="default: 0 (greedy)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--repeat-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], metavar="S", help="stop sequence (repeatable)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    out.add_argument("--json", action="store_true", help="print the whole Result as JSON")
    p.add_argument("prompt", metavar="PROMPT", help="the user message ('-' reads standard input)")
    p.set_defaults(func=generate)


_FLAGS = {"max_tokens": "--max-tokens", "top_p": "--top-p", "top_k": "--top-k", "repeat_penalty": "--repeat-penalty"}


def _opts(args: argparse.Namespace):  # noqa: ANN202 - deployments.GenOpts, imported late
    from pydantic import ValidationError

    from deployments import GenOpts

    fields = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repeat_penalty": args.repeat_penalty,
        "seed": args.seed,
        "stop": tuple(args.stop),
        "adapter": str(args.adapter.expanduser().absolute()) if args.adapter else None,
    }
    try:
        return GenOpts(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        name = str(err["loc"][0]) if err["loc"] else "options"
        raise ValueError(f"{_FLAGS.get(name, '--' + name)}: {err['msg']}") from None


def generate(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from cluster.config import load_config

    cfg = load_config(args.config)
    model = cfg.model(args.model) if args.model else cfg.models[0]
    opts = _opts(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise ValueError("PROMPT is empty")
    system = args.system if args.system is not None else (model.system_prompt or cfg.probes.system_prompt)
    return asyncio.run(_run(model, cfg, prompt, system, opts, stream=args.stream, as_json=args.json, dumps=json.dumps))


async def _run(model, cfg, prompt: str, system: str | None, opts, *, stream: bool, as_json: bool, dumps) -> int:  # noqa: ANN001
    from deployments import Message, collect, started_engine

    messages = ([Message(role="system", content=system)] if system else []) + [Message(role="user", content=prompt)]
    async with started_engine(model) as engine:
        if stream:
            async for tok in engine.chat(messages, opts):
                if tok.text:
                    sys.stdout.write(tok.text)
                    sys.stdout.flush()
            sys.stdout.write("\n")
            return 0
        result = await collect(engine.chat(messages, opts))
    if as_json:
        print(dumps({"model": model.name, "engine": model.engine, "adapter": opts.adapter, **result.to_dict()}, indent=2))
    else:
        print(result.text)
    return 0

"""`evalcluster convert`: a LoRA adapter between MLX, PEFT and GGUF."""

from __future__ import annotations

import argparse
from pathlib import Path

from cluster.cli import add_config_arg

def register(sub: argparse._SubParsersAction) -> None:
    cv = sub.add_parser("convert", help="convert a LoRA adapter between MLX, PEFT and GGUF")
    add_config_arg(cv)
    cv.add_argument("--to", required=True, choices=("peft", "gguf", "mlx"), help="the output format")
    cv.add_argument("--base", help="the base model (HF dir, GGUF file, or a model name from the config): "
                                   "validates shapes; required for gguf")
    cv.add_argument("src", type=Path, help="MLX or PEFT adapter directory, or an MLX checkpoint file")
    cv.add_argument("dst", type=Path, help="output directory (mlx, peft) or .gguf file")
    cv.set_defaults(func=convert_adapter)


def convert_adapter(args: argparse.Namespace) -> int:
    from checkpoints import convert, load_adapter
    from cluster.config import default_config_exists, load_config

    base = args.base
    if base and not Path(base).expanduser().exists():
        cfg = load_config(args.config) if args.config is not None or default_config_exists() else None
        if cfg is None:
            raise FileNotFoundError(f"--base {base}: no such file or directory (and no config to look a model up in)")
        model = cfg.model(base)
        if not hasattr(model, "path"):
            raise ValueError(f"--base {base}: model {base!r} ({model.engine}) has no local path")
        base = str(cfg.resolve(model.path))
    out = convert(args.src, args.dst, args.to, base=base)
    ad = load_adapter(args.src)
    note = "" if base else "  (no --base: shapes not checked; MLX num_layers assumes the adapter reaches the last layer)"
    print(f"{out}: {args.to}, {len(ad.pairs)} LoRA pairs, rank {ad.rank}, scale {ad.scale:g}, "
          f"layers {min(ad.layers())}-{max(ad.layers())}{note}")
    return 0

"""Builders for the checkpoint tests: run trees in both layouts and random SmolLM2 LoRA adapters.

Adapters are written with the `safetensors` package (not with the code under test), in mlx-lm's
orientation (lora_a (in, r), lora_b (r, out)) or go-ml's trainer's (lora_a (r, in), lora_b
(out, r), config with top-level rank/alpha/lora_layers).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

# SmolLM2-135M: 30 blocks, hidden 576, 9 heads / 3 kv heads of 64, ffn 1536 (infra.md §7).
SMOL = {"layers": 30, "hidden": 576, "kv": 192, "ffn": 1536}
SMOL_SHAPES = {  # module -> (out, in)
    "self_attn.q_proj": (576, 576),
    "self_attn.k_proj": (192, 576),
    "self_attn.v_proj": (192, 576),
    "self_attn.o_proj": (576, 576),
    "mlp.gate_proj": (1536, 576),
    "mlp.up_proj": (1536, 576),
    "mlp.down_proj": (576, 1536),
}
SYSTEM = "You are a helpful assistant."
QUESTION = "What is the capital of France?"


def lora_tensors(
    layers: list[int], modules: list[str], rank: int, seed: int = 0, b_std: float = 0.05,
    dtype: str = "float32",
) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    """Random LoRA pairs in PEFT orientation: a (r, in), b (out, r)."""
    rng = np.random.default_rng(seed)
    out = {}
    for layer in layers:
        for m in modules:
            o, i = SMOL_SHAPES[m]
            a = rng.normal(0.0, 1.0 / np.sqrt(i), size=(rank, i)).astype(dtype)
            b = rng.normal(0.0, b_std, size=(o, rank)).astype(dtype)
            out[(layer, m)] = (a, b)
    return out


def write_mlx_adapter(
    dest: Path, *, layers: list[int] | None = None, modules: list[str] | None = None, rank: int = 8,
    scale: float = 20.0, seed: int = 0, b_std: float = 0.05, filename: str = "adapters.safetensors",
    style: str = "mlx-lm", dtype: str = "float32", write_config: bool = True,
) -> Path:
    """An MLX adapter dir: mlx-lm style (lora_parameters) or go-ml trainer style (top-level rank/alpha)."""
    layers = list(range(SMOL["layers"])) if layers is None else layers
    modules = modules or ["self_attn.q_proj", "self_attn.v_proj"]
    dest.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for (layer, m), (a, b) in lora_tensors(layers, modules, rank, seed, b_std, dtype).items():
        key = f"model.layers.{layer}.{m}"
        if style == "go-ml":
            tensors[f"{key}.lora_a"], tensors[f"{key}.lora_b"] = a, b
        else:
            tensors[f"{key}.lora_a"], tensors[f"{key}.lora_b"] = np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)
    save_file(tensors, str(dest / filename))
    if write_config:
        if style == "go-ml":
            cfg = {"fine_tune_type": "lora", "rank": rank, "alpha": scale * rank,
                   "lora_layers": [m.split(".")[-1] for m in modules]}
        else:
            cfg = {"fine_tune_type": "lora", "num_layers": SMOL["layers"] - min(layers),
                   "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": modules}}
        (dest / "adapter_config.json").write_text(json.dumps(cfg))
    return dest / filename


def write_peft_adapter(
    dest: Path, *, layers: list[int] | None = None, modules: list[str] | None = None, rank: int = 8,
    alpha: float = 16.0, seed: int = 0, b_std: float = 0.05,
) -> Path:
    """A PEFT adapter dir (adapter_model.safetensors + adapter_config.json)."""
    layers = list(range(SMOL["layers"])) if layers is None else layers
    modules = modules or ["self_attn.q_proj", "self_attn.v_proj"]
    dest.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for (layer, m), (a, b) in lora_tensors(layers, modules, rank, seed, b_std).items():
        key = f"base_model.model.model.layers.{layer}.{m}"
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
    save_file(tensors, str(dest / "adapter_model.safetensors"))
    (dest / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": sorted({m.split(".")[-1] for m in modules}), "bias": "none",
    }))
    return dest / "adapter_model.safetensors"


def touch(path: Path, data: bytes = b"x" * 64, mtime: float | None = None) -> Path:
    """A file with some bytes (and an optional mtime), parents created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def mlx_tree(base: Path) -> dict[str, str]:
    """go-ml's MLX layout, with nesting and the rolling file. Returns relpath -> expected label."""
    touch(base / "adapters-27b-sovereign/adapter_config.json", b"{}")
    touch(base / "adapters-27b-sovereign/adapters.safetensors", b"rolling")  # not a checkpoint
    touch(base / "adapters-27b-sovereign/0000100_adapters.safetensors", b"a" * 100)
    touch(base / "adapters-27b-sovereign/0000200_adapters.safetensors", b"b" * 200)
    touch(base / "adapters-15k/gemma-3-27b/adapter_config.json", b"{}")
    touch(base / "adapters-15k/gemma-3-27b/0001000_adapters.safetensors", b"c" * 10)
    touch(base / "adapters-15k/gemma-3-1b/adapter_config.json", b"{}")
    touch(base / "adapters-15k/gemma-3-1b/0000500_adapters.safetensors", b"d" * 10)
    # go-ml: a run dir with gemma-3-* sub-directories is represented by them, not by its own files
    touch(base / "adapters-15k/adapter_config.json", b"{}")
    touch(base / "adapters-15k/0000050_adapters.safetensors", b"e" * 10)
    touch(base / "adapters-mystery-run/adapter_config.json", b"{}")
    touch(base / "adapters-mystery-run/0000007_adapters.safetensors", b"f" * 10)
    touch(base / "not-adapters/0000300_adapters.safetensors", b"g" * 10)  # outside adapters-*
    return {
        "adapters-27b-sovereign/0000100_adapters.safetensors": "G27-sovereign @0000100",
        "adapters-27b-sovereign/0000200_adapters.safetensors": "G27-sovereign @0000200",
        "adapters-15k/gemma-3-27b/0001000_adapters.safetensors": "G27 @0001000",
        "adapters-15k/gemma-3-1b/0000500_adapters.safetensors": "G1 @0000500",
        "adapters-mystery-run/0000007_adapters.safetensors": "mystery-ru @0000007",
    }


def peft_tree(base: Path) -> dict[str, str]:
    """HF-Trainer layout: runs with checkpoint-N dirs. Returns relpath -> expected label."""
    for run, steps in (("book-run", (500, 1000)), ("cross", (20,))):
        for n in steps:
            touch(base / run / f"checkpoint-{n}/adapter_config.json", b"{}")
            touch(base / run / f"checkpoint-{n}/adapter_model.safetensors", b"p" * n)
            touch(base / run / f"checkpoint-{n}/trainer_state.json", b"{}")
    touch(base / "book-run/adapter_model.safetensors", b"final")  # the final save is not a checkpoint
    return {
        "book-run/checkpoint-500/adapter_model.safetensors": "Book-run @500",
        "book-run/checkpoint-1000/adapter_model.safetensors": "Book-run @1000",
        "cross/checkpoint-20/adapter_model.safetensors": "Cross @20",
    }


GO_ML_META = [
    ("deepseek-r1-7b", "deepseek-r1-7b", "R1"), ("27b-", "gemma-3-27b", "G27"), ("27b", "gemma-3-27b", "G27"),
    ("15k/gemma-3-27b", "gemma-3-27b", "G27"), ("15k/gemma-3-12b", "gemma-3-12b", "G12"),
    ("15k/gemma-3-1b", "gemma-3-1b", "G1"), ("12b", "gemma-3-12b", "G12"), ("1b-", "gemma-3-1b", "G1"),
    ("1b", "gemma-3-1b", "G1"), ("4b", "gemma-3-4b", "G4"), ("vi-12b", "gemma-3-12b", "Vi12"),
    ("vi", "gemma-3-1b", "Vi1"), ("gpt-oss", "gpt-oss-20b", "GPT"), ("lem-gpt-oss", "gpt-oss-20b", "LGPT"),
    ("bench-1b", "gemma-3-1b", "B1"), ("book", "gemma-3-27b", "Book"), ("cross", "gemma-3-12b", "Cross"),
]

"""Small random LoRA adapters of a Llama-family model (SmolLM2), in each engine's native format.

One set of weights (`random_lora`) can be written as a PEFT directory (vLLM), an MLX adapter
directory (mlx-lm) and a GGUF LoRA file (llama.cpp), so the same adapter can be compared across
engines. Orientation and naming follow each format:

- PEFT: `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` (r, in) and
  `...lora_B.weight` (out, r); adapter_config.json with `r`, `lora_alpha`, `target_modules`.
- MLX: `model.layers.N.self_attn.q_proj.lora_a` (in, r) and `...lora_b` (r, out);
  adapter_config.json with `lora_parameters.scale` = alpha / r.
- GGUF: `blk.N.attn_q.weight.lora_a` (r, in) and `.lora_b` (out, r) as numpy shapes;
  `general.type=adapter`, `adapter.type=lora`, `adapter.lora.alpha`. llama.cpp stores q/k rows
  permuted for its rope layout, so lora_b of q_proj/k_proj is permuted the same way.

Also: writers for broken adapters (corrupt bytes, wrong shapes, not a LoRA) for error tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# HF module name -> GGUF tensor name
GGUF_NAMES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
_ATTN = {"q_proj", "k_proj", "v_proj", "o_proj"}


@dataclass
class ModelDims:
    """The shapes a LoRA of a Llama-family model has to fit."""

    n_layers: int
    hidden: int
    intermediate: int
    n_head: int
    n_head_kv: int
    head_dim: int
    arch: str = "llama"

    def in_out(self, module: str) -> tuple[int, int]:
        q = self.n_head * self.head_dim
        kv = self.n_head_kv * self.head_dim
        return {
            "q_proj": (self.hidden, q),
            "k_proj": (self.hidden, kv),
            "v_proj": (self.hidden, kv),
            "o_proj": (q, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }[module]


def dims_from_hf(model_dir: Path) -> ModelDims:
    """Model dims from an HF directory's config.json."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    return ModelDims(
        n_layers=c["num_hidden_layers"],
        hidden=c["hidden_size"],
        intermediate=c["intermediate_size"],
        n_head=c["num_attention_heads"],
        n_head_kv=c.get("num_key_value_heads", c["num_attention_heads"]),
        head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
        arch=c.get("model_type", "llama"),
    )


def dims_from_gguf(gguf_path: Path) -> ModelDims:
    """Model dims from a GGUF file's metadata."""
    import gguf

    r = gguf.GGUFReader(str(gguf_path))
    arch = r.fields["general.architecture"].contents()

    def get(key: str) -> int:
        return int(r.fields[f"{arch}.{key}"].contents())

    hidden, n_head = get("embedding_length"), get("attention.head_count")
    return ModelDims(
        n_layers=get("block_count"),
        hidden=hidden,
        intermediate=get("feed_forward_length"),
        n_head=n_head,
        n_head_kv=get("attention.head_count_kv"),
        head_dim=hidden // n_head,
        arch=arch,
    )


# SmolLM2-135M, as both the GGUF and the HF directory describe it (saves a 3 s GGUF parse).
SMOLLM2_DIMS = ModelDims(n_layers=30, hidden=576, intermediate=1536, n_head=9, n_head_kv=3, head_dim=64)


@dataclass
class LoraWeights:
    """LoRA matrices in PEFT orientation: a[(layer, module)] is (r, in), b[...] is (out, r)."""

    dims: ModelDims
    rank: int
    alpha: float
    modules: tuple[str, ...]
    a: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)
    b: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def random_lora(
    dims: ModelDims = SMOLLM2_DIMS,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    modules: tuple[str, ...] = ("q_proj", "v_proj"),
    std_b: float = 0.05,
    seed: int = 0,
    zero_b: bool = False,
) -> LoraWeights:
    """Random LoRA weights: A ~ N(0, 1/sqrt(in)), B ~ N(0, std_b) (or zero: a no-op adapter).

    Args:
        dims: the base model's shapes.
        rank: LoRA rank r.
        alpha: LoRA alpha (the effective scale is alpha / r).
        modules: which projections get a LoRA (HF names).
        std_b: standard deviation of B; larger changes the output more.
        seed: RNG seed.
        zero_b: B = 0, so the adapter changes nothing.
    """
    rng = np.random.default_rng(seed)
    w = LoraWeights(dims, rank, alpha, tuple(modules))
    for layer in range(dims.n_layers):
        for m in modules:
            n_in, n_out = dims.in_out(m)
            w.a[(layer, m)] = (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(np.float32)
            w.b[(layer, m)] = (
                np.zeros((n_out, rank), np.float32)
                if zero_b
                else (rng.standard_normal((n_out, rank)) * std_b).astype(np.float32)
            )
    return w


def _prefix(module: str) -> str:
    return "self_attn" if module in _ATTN else "mlp"


def write_peft(w: LoraWeights, out_dir: Path, base_model: str = "") -> Path:
    """Write a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors)."""
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for (layer, m), a in w.a.items():
        key = f"base_model.model.model.layers.{layer}.{_prefix(m)}.{m}"
        tensors[f"{key}.lora_A.weight"] = a
        tensors[f"{key}.lora_B.weight"] = w.b[(layer, m)]
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    (out_dir / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "base_model_name_or_path": base_model,
                "r": w.rank,
                "lora_alpha": w.alpha,
                "lora_dropout": 0.0,
                "bias": "none",
                "fan_in_fan_out": False,
                "target_modules": list(w.modules),
            },
            indent=2,
        )
    )
    return out_dir


def write_mlx(w: LoraWeights, out_dir: Path) -> Path:
    """Write an mlx-lm adapter directory (adapter_config.json + adapters.safetensors)."""
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for (layer, m), a in w.a.items():
        key = f"model.layers.{layer}.{_prefix(m)}.{m}"
        tensors[f"{key}.lora_a"] = np.ascontiguousarray(a.T)
        tensors[f"{key}.lora_b"] = np.ascontiguousarray(w.b[(layer, m)].T)
    save_file(tensors, str(out_dir / "adapters.safetensors"))
    (out_dir / "adapter_config.json").write_text(
        json.dumps(
            {
                "fine_tune_type": "lora",
                "num_layers": w.dims.n_layers,
                "lora_parameters": {
                    "rank": w.rank,
                    "scale": w.scale,
                    "dropout": 0.0,
                    "keys": [f"{_prefix(m)}.{m}" for m in w.modules],
                },
            },
            indent=2,
        )
    )
    return out_dir


def _rope_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order: within each head, interleaved halves become contiguous pairs."""
    return (
        rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


def write_gguf(w: LoraWeights, out_file: Path, *, transpose_a: bool = False) -> Path:
    """Write a GGUF LoRA adapter file for llama.cpp.

    Args:
        w: the weights.
        out_file: the .gguf to write.
        transpose_a: write lora_a the wrong way round (a shape mismatch, for error tests).
    """
    import gguf

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out_file), w.dims.arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(w.alpha))
    for (layer, m), a in w.a.items():
        b = w.b[(layer, m)]
        if m == "q_proj":
            b = _rope_permute(b, w.dims.n_head)
        elif m == "k_proj":
            b = _rope_permute(b, w.dims.n_head_kv)
        name = f"blk.{layer}.{GGUF_NAMES[m]}.weight"
        writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a.T if transpose_a else a))
        writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file


def write_corrupt(out_file: Path, like: Path | None = None) -> Path:
    """A file that is not a valid adapter: random bytes, or `like`'s first half (truncated)."""
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    if like is not None:
        data = Path(like).read_bytes()
        out_file.write_bytes(data[: len(data) // 2])
    else:
        out_file.write_bytes(np.random.default_rng(0).bytes(4096))
    return out_file


def gguf_lora_for(dims: ModelDims, out_file: Path, **kw) -> Path:
    """A random GGUF LoRA for a model with `dims` (keywords go to `random_lora`)."""
    return write_gguf(random_lora(dims, **kw), out_file)


def gguf_lora_mismatched(out_file: Path, dims: ModelDims = SMOLLM2_DIMS) -> Path:
    """A GGUF LoRA whose shapes do not fit `dims` (built for a wider model)."""
    wider = ModelDims(
        dims.n_layers, dims.hidden * 2, dims.intermediate, dims.n_head, dims.n_head_kv, dims.head_dim * 2, dims.arch
    )
    return write_gguf(random_lora(wider, modules=("v_proj",)), out_file)

"""LoRA adapters as GGUF for llama.cpp (written with the `gguf` package).

llama.cpp's adapter format: general.type "adapter", adapter.type "lora", adapter.lora.alpha
(llama.cpp scales by alpha / rank), tensors `blk.N.<name>.weight.lora_a` (r, in) and `.lora_b`
(out, r), general.architecture equal to the base model's.

For the llama architecture, llama.cpp's converter permutes the rows of attn_q and attn_k (its rope
layout differs from HF's); a LoRA on q_proj / k_proj must have the same permutation applied to
lora_b's rows (lora_a is untouched), or the update lands on the wrong rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from checkpoints._basemodel import HF_TO_GGUF, BaseShapes
from checkpoints._lora import LoraAdapter
from checkpoints._safetensors import Tensor
from deployments._textmodel import AdapterError
from checkpoints._files import replacing

# Architectures whose attn_q / attn_k rows llama.cpp's converter permutes.
ROPE_PERMUTED = {"llama"}


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (HF rotary halves -> interleaved pairs), on axis 0.

    Args:
        w: (out, ...) array; out = n_head * head_dim.
        n_head: heads (n_head for q, n_head_kv for k).
    """
    out = w.shape[0]
    if out % (2 * n_head):
        raise ValueError(f"{out} rows do not split into {n_head} heads of rotary pairs")
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_array(t: Tensor) -> np.ndarray:
    if t.dtype in ("F32", "F16"):
        return np.ascontiguousarray(t.array)
    return np.ascontiguousarray(t.float32())  # BF16 / F64 -> F32


def write_gguf(adapter: LoraAdapter, out_path: str | Path, base: BaseShapes) -> Path:
    """Write a GGUF LoRA adapter for llama.cpp, atomically.

    Args:
        adapter: the adapter (validate it against `base` first).
        out_path: the .gguf file to write.
        base: the base model's shapes (architecture and head counts).
    """
    import gguf

    if not base.arch:
        raise AdapterError(base.path, "base model architecture has no known llama.cpp name; pass the base GGUF instead")
    permute = base.arch in ROPE_PERMUTED
    if permute and not (base.n_head and base.n_head_kv):
        raise AdapterError(base.path, "base model does not say its head counts (needed for attn_q/attn_k)")
    tensors: list[tuple[str, np.ndarray]] = []
    for key, (layer, module) in sorted(adapter.located().items(), key=lambda kv: (kv[1][0], kv[1][1])):
        name = HF_TO_GGUF.get(module)
        if name is None:
            raise AdapterError(adapter.source, f"{key}: llama.cpp has no tensor name for module {module!r}")
        pair = adapter.pairs[key]
        a, b = _gguf_array(pair.a), _gguf_array(pair.b)
        if permute and name == "attn_q":
            b = np.ascontiguousarray(permute_rows(b, base.n_head))  # type: ignore[arg-type]
        elif permute and name == "attn_k":
            b = np.ascontiguousarray(permute_rows(b, base.n_head_kv))  # type: ignore[arg-type]
        tensors.append((f"blk.{layer}.{name}.weight.lora_a", a))
        tensors.append((f"blk.{layer}.{name}.weight.lora_b", b))

    out = Path(out_path)
    with replacing(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), base.arch)
        w.add_string("general.type", "adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", float(adapter.scale * adapter.rank))
        for name, arr in tensors:
            w.add_tensor(name, arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out

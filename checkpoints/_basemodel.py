"""The base model's shapes, read without loading it: from an HF directory or a GGUF file.

An adapter is checked against these before any engine sees it: every LoRA pair must sit on a
linear layer the base has, with that layer's (out, in) shape.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from checkpoints._errors import AdapterError
from checkpoints._ggufheader import GGUF_MAGIC, GGUFHeaderError, read_gguf_header


# HF module path <-> llama.cpp tensor name, for the linear layers LoRA targets.
HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GGUF_TO_HF = {v: k for k, v in HF_TO_GGUF.items()}

# HF model_type -> the architecture llama.cpp's converter writes into general.architecture.
HF_TO_GGUF_ARCH = {
    "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
    "gemma2": "gemma2", "gemma3": "gemma3", "gemma3_text": "gemma3", "phi3": "phi3",
}

_LAYER_RX = re.compile(r"^(?P<prefix>.*?)layers\.(?P<layer>\d+)\.(?P<module>.+)\.weight$")


@dataclass
class BaseShapes:
    """What an adapter must fit: architecture, layer count, heads and linear shapes (out, in).

    Args:
        path: where this was read from.
        arch: the llama.cpp architecture name (general.architecture), "" if unknown.
        n_layers: transformer blocks.
        n_head: attention heads (None if unknown).
        n_head_kv: key/value heads (None if unknown).
        linear: (layer, HF module path) -> (out, in).
        name: a name for PEFT's base_model_name_or_path.
    """

    path: str
    arch: str
    n_layers: int
    n_head: int | None
    n_head_kv: int | None
    linear: dict[tuple[int, str], tuple[int, int]] = field(default_factory=dict)
    name: str = ""


def _hf_dims(cfg: dict) -> dict:
    text = cfg.get("text_config") or {}
    merged = {**cfg, **text}
    return merged


def _from_hf(path: Path) -> BaseShapes:
    from checkpoints._safetensors import read_header

    cfg_path = path / "config.json"
    try:
        raw = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise AdapterError(str(path), "base model directory has no config.json") from None
    except json.JSONDecodeError as e:
        raise AdapterError(str(cfg_path), f"not valid JSON: {e}") from None
    cfg = _hf_dims(raw)
    model_type = cfg.get("model_type") or raw.get("model_type") or ""
    n_layers = int(cfg.get("num_hidden_layers") or 0)
    n_head = cfg.get("num_attention_heads")
    n_kv = cfg.get("num_key_value_heads") or n_head
    quant = raw.get("quantization") or raw.get("quantization_config") or {}
    bits = quant.get("bits") if isinstance(quant, dict) else None

    linear: dict[tuple[int, str], tuple[int, int]] = {}
    files = sorted(path.glob("*.safetensors"))
    for f in files:
        infos, _, _ = read_header(f)
        for name, t in infos.items():
            m = _LAYER_RX.match(name)
            if not m or len(t.shape) != 2:
                continue
            out_dim, in_dim = t.shape
            scales = name[: -len("weight")] + "scales"
            if bits and (scales in infos or t.dtype == "U32"):
                in_dim = in_dim * 32 // int(bits)  # MLX-quantised: uint32-packed columns
            linear[(int(m["layer"]), m["module"])] = (out_dim, in_dim)
    if not linear and n_layers:
        # No safetensors (e.g. .bin only): the llama-family shapes from config.json.
        hidden, inter = cfg.get("hidden_size"), cfg.get("intermediate_size")
        head_dim = cfg.get("head_dim") or (hidden // n_head if hidden and n_head else None)
        if hidden and inter and n_head and head_dim:
            q, kv = n_head * head_dim, n_kv * head_dim
            per = {"self_attn.q_proj": (q, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
                   "self_attn.o_proj": (hidden, q), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
                   "mlp.down_proj": (hidden, inter)}
            linear = {(i, mod): s for i in range(n_layers) for mod, s in per.items()}
    if not n_layers:
        n_layers = 1 + max((layer for layer, _ in linear), default=-1)
    if not linear:
        raise AdapterError(str(path), "cannot read the base model's layer shapes (no safetensors, no usable config.json)")
    return BaseShapes(
        path=str(path), arch=HF_TO_GGUF_ARCH.get(model_type, ""), n_layers=n_layers,
        n_head=int(n_head) if n_head else None, n_head_kv=int(n_kv) if n_kv else None,
        linear=linear, name=str(raw.get("_name_or_path") or path.name),
    )


def _from_gguf(path: Path) -> BaseShapes:
    try:
        r = read_gguf_header(path)
    except (GGUFHeaderError, OSError) as e:
        raise AdapterError(str(path), f"not a readable GGUF file: {e}") from None
    field_value = r.fields.get
    arch = str(field_value("general.architecture") or "")
    n_layers = int(field_value(f"{arch}.block_count") or 0)
    n_head = field_value(f"{arch}.attention.head_count")
    n_kv = field_value(f"{arch}.attention.head_count_kv") or n_head
    linear: dict[tuple[int, str], tuple[int, int]] = {}
    for t in r.tensors:
        m = re.match(r"^blk\.(\d+)\.([a-z_]+)\.weight$", t.name)
        if not m or m[2] not in GGUF_TO_HF or len(t.shape) != 2:
            continue
        ne0, ne1 = (int(x) for x in t.shape)  # GGUF lists dimensions innermost first: (in, out)
        linear[(int(m[1]), GGUF_TO_HF[m[2]])] = (ne1, ne0)
    if not linear:
        raise AdapterError(str(path), "GGUF has no blk.N.<attn|ffn>.weight tensors to fit an adapter to")
    name = str(field_value("general.name") or path.stem)
    return BaseShapes(
        path=str(path), arch=arch, n_layers=n_layers or 1 + max(layer for layer, _ in linear),
        n_head=int(n_head) if n_head else None, n_head_kv=int(n_kv) if n_kv else None, linear=linear, name=name,
    )


def is_gguf_file(path: str | Path) -> bool:
    """Whether `path` is a file that starts with the GGUF magic bytes.

    Args:
        path: any path.
    """
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as fh:
        return fh.read(4) == GGUF_MAGIC


@functools.lru_cache(maxsize=16)
def _cached(path: str, mtime_ns: int) -> BaseShapes:
    p = Path(path)
    if p.is_dir():
        return _from_hf(p)
    if p.is_file():
        if is_gguf_file(p):
            return _from_gguf(p)
        raise AdapterError(path, "base model file is not GGUF (no GGUF magic)")
    raise AdapterError(path, "base model must be an HF directory (config.json) or a .gguf file")


def base_shapes(path: str | Path) -> BaseShapes:
    """The shapes of a base model (HF directory or GGUF file), cached per path and mtime.

    Args:
        path: the base model.
    """
    p = Path(path).expanduser()
    try:
        st = os.stat(p / "config.json" if p.is_dir() else p)
    except FileNotFoundError:
        raise AdapterError(str(p), "base model not found") from None
    return _cached(str(p.resolve()), st.st_mtime_ns)

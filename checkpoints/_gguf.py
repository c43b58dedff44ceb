"""LoRA adapters as GGUF for llama.cpp: writing one (with the `gguf` package), and checking one
against its base model before llama.cpp sees it.

llama.cpp's adapter format: general.type "adapter", adapter.type "lora", adapter.lora.alpha
(llama.cpp scales by alpha / rank), tensors `blk.N.<name>.weight.lora_a` (r, in) and `.lora_b`
(out, r), general.architecture equal to the base model's.

For the llama architecture, llama.cpp's converter permutes the rows of attn_q and attn_k (its rope
layout differs from HF's); a LoRA on q_proj / k_proj must have the same permutation applied to
lora_b's rows (lora_a is untouched), or the update lands on the wrong rows.

Checking: llama.cpp (through xllamacpp) ignores a LoRA it cannot load: the server starts and
answers with the base model, only its log says "failed to apply lora adapter". So both files are
read (their headers, `read_gguf_header`) and an adapter llama.cpp would refuse is refused here, with the same
rules (`llama_adapter_lora_init`): a GGUF whose general.type is "adapter" and adapter.type "lora",
the base's architecture, `<base tensor>.lora_a` / `.lora_b` pairs for tensors the base has, and
shapes that fit: lora_a is (in, r) and lora_b is (r, out) in GGUF order (ne), where the base
tensor is (in, out).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from checkpoints._basemodel import HF_TO_GGUF, BaseShapes
from checkpoints._errors import AdapterError
from checkpoints._files import replacing
from checkpoints._ggufheader import GGUFHeader, GGUFHeaderError, read_gguf_header
from checkpoints._lora import LoraAdapter
from checkpoints._safetensors import Tensor

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


# --------------------------------------------------------------------------- checking a GGUF LoRA


@dataclass(frozen=True)
class GGUFModel:
    """What an adapter has to match: architecture and tensor shapes (GGUF `ne` order).

    Args:
        path: the base model's .gguf.
        architecture: its general.architecture.
        file_type: its quantisation (general.file_type's name, e.g. "Q4_1").
        context_length: the context it was trained for (0 if not given).
        shapes: tensor name -> shape.
        eos_token_id: tokenizer.ggml.eos_token_id (None if not given).
    """

    path: str
    architecture: str
    file_type: str
    context_length: int
    shapes: dict[str, tuple[int, ...]]
    eos_token_id: int | None = None


def _field(header: GGUFHeader, key: str) -> object:
    """A metadata value (None when absent)."""
    return header.fields.get(key)


def _finite(value: object) -> bool:
    """A finite number (a GGUF float field reads as a numpy scalar)."""
    try:
        return math.isfinite(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def _open(path: Path) -> GGUFHeader:
    """A GGUF's header; AdapterError naming the file when it is not a whole GGUF."""
    try:
        return read_gguf_header(path)
    except OSError as e:
        raise AdapterError(str(path), f"cannot read: {e.strerror}") from None
    except GGUFHeaderError as e:  # its message says what is wrong (bad magic, cut short, ...)
        raise AdapterError(str(path), str(e)) from None


_models: dict[tuple[str, int, int], GGUFModel] = {}
_models_lock = threading.Lock()


def read_gguf_model(path: str | Path) -> GGUFModel:
    """Architecture and tensor shapes of a base GGUF (cached by path, size and mtime).

    Reads the header only (`read_gguf_header`: tens of milliseconds, its tokenizer arrays stepped over).

    Args:
        path: the base model's .gguf.

    Raises:
        AdapterError: naming the file, when it is not a readable GGUF (the llama.cpp engine
            reports a bad base model as an EngineError of its own).
    """
    path = Path(path).absolute()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _models_lock:
        if key in _models:
            return _models[key]
    reader = _open(path)
    arch = str(_field(reader, "general.architecture") or "")
    ftype = _field(reader, "general.file_type")
    ctx = _field(reader, f"{arch}.context_length") or 0
    try:
        import gguf

        ftype_name = gguf.LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_") if ftype is not None else ""
    except (ValueError, TypeError):
        ftype_name = str(ftype or "")
    model = GGUFModel(
        path=str(path),
        architecture=arch,
        file_type=ftype_name,
        context_length=int(ctx),
        shapes={t.name: tuple(int(x) for x in t.shape) for t in reader.tensors},
        eos_token_id=int(eos) if (eos := _field(reader, "tokenizer.ggml.eos_token_id")) is not None else None,
    )
    with _models_lock:
        _models[key] = model
    return model


def validate_gguf_lora(adapter: Path, base: GGUFModel) -> None:
    """Raise AdapterError (naming the file) unless `adapter` is a GGUF LoRA that fits `base`.

    Args:
        adapter: the adapter .gguf.
        base: the base model, from `read_gguf_model`.
    """
    name = str(adapter)
    if adapter.is_dir():
        raise AdapterError(name, "is a directory; llama.cpp takes a GGUF LoRA file (convert PEFT/MLX adapters first)")
    reader = _open(adapter)
    gtype = _field(reader, "general.type")
    if gtype != "adapter":
        raise AdapterError(name, f"not an adapter: general.type is {gtype!r}, expected 'adapter'")
    atype = _field(reader, "adapter.type")
    if atype != "lora":
        raise AdapterError(name, f"not a LoRA: adapter.type is {atype!r}, expected 'lora'")
    alpha = _field(reader, "adapter.lora.alpha")
    if alpha is not None and not _finite(alpha):
        raise AdapterError(name, f"adapter.lora.alpha is {alpha!r}; the LoRA scale must be a finite number")
    arch = _field(reader, "general.architecture")
    if base.architecture and arch != base.architecture:
        raise AdapterError(name, f"built for architecture {arch!r}, the base model {base.path} is {base.architecture!r}")
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for t in reader.tensors:
        stem, dot, part = t.name.rpartition(".")
        if not dot or part not in ("lora_a", "lora_b"):
            raise AdapterError(name, f"tensor {t.name!r} is not a LoRA tensor (expected <name>.lora_a / .lora_b)")
        pairs.setdefault(stem, {})[part] = tuple(int(x) for x in t.shape)
    if not pairs:
        raise AdapterError(name, "contains no LoRA tensors")
    for stem, ab in sorted(pairs.items()):
        if set(ab) != {"lora_a", "lora_b"}:
            missing = ({"lora_a", "lora_b"} - set(ab)).pop()
            raise AdapterError(name, f"tensor {stem} has no {missing}")
        if stem not in base.shapes:
            raise AdapterError(name, f"adapts tensor {stem}, which the base model {base.path} does not have")
        a, b, w = ab["lora_a"], ab["lora_b"], base.shapes[stem]
        if len(a) != 2 or len(b) != 2 or len(w) < 2:
            raise AdapterError(name, f"tensor {stem}: LoRA tensors must be 2-D (lora_a {a}, lora_b {b})")
        if a[1] != b[0]:
            raise AdapterError(name, f"tensor {stem}: lora_a {a} and lora_b {b} disagree on the rank")
        if a[0] != w[0] or b[1] != w[1]:
            raise AdapterError(
                name,
                f"tensor {stem}: shapes do not fit the base model: lora_a {a} x lora_b {b} gives "
                f"({a[0]}, {b[1]}), the base tensor is {w[:2]}",
            )

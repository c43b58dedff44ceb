"""Check a GGUF LoRA file against its base model before llama.cpp sees it.

llama.cpp (through xllamacpp) ignores a LoRA it cannot load: the server starts and answers with
the base model, only its log says "failed to apply lora adapter". So we read both files with the
`gguf` package and refuse an adapter that llama.cpp would refuse, with the same rules
(`llama_adapter_lora_init`): a GGUF whose general.type is "adapter" and adapter.type "lora", the
base's architecture, `<base tensor>.lora_a` / `.lora_b` pairs for tensors the base has, and
shapes that fit: lora_a is (in, r) and lora_b is (r, out) in GGUF order (ne), where the base
tensor is (in, out).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from deployments._textmodel import AdapterError, EngineError


@dataclass(frozen=True)
class GGUFModel:
    """What an adapter has to match: architecture and tensor shapes (GGUF `ne` order)."""

    path: str
    architecture: str
    file_type: str
    context_length: int
    shapes: dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class LoraSummary:
    """A valid GGUF LoRA: how many base tensors it adapts, its rank and alpha (None if unset)."""

    path: str
    n_tensors: int
    rank: int
    alpha: float | None


def _field(reader, key: str):  # noqa: ANN001 - gguf.GGUFReader
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception:  # noqa: BLE001 - a malformed field reads as absent
        return None


def _error(path: Path, what: str, why: str) -> EngineError:
    return AdapterError(str(path), why) if what == "adapter" else EngineError(f"model file {path}: {why}")


def _open(path: Path, what: str):  # noqa: ANN202 - a gguf.GGUFReader
    """Open a GGUF for reading; `what` ("adapter" or "model") picks the error type."""
    import gguf

    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as e:
        raise _error(path, what, f"cannot read: {e.strerror}") from None
    if magic != b"GGUF":
        raise _error(path, what, "not a GGUF file (bad magic bytes)")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - the reader raises ValueError/struct errors on damage
        raise _error(path, what, f"corrupt or truncated GGUF ({type(e).__name__}: {e})") from None
    size = os.path.getsize(path)
    for t in reader.tensors:
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise _error(path, what, f"truncated: tensor {t.name} ends past the end of the file")
    return reader


_models: dict[tuple[str, int, int], GGUFModel] = {}
_models_lock = threading.Lock()


def read_model(path: Path) -> GGUFModel:
    """Architecture and tensor shapes of a base GGUF (cached by path, size and mtime).

    Reading a tokenizer-heavy GGUF header takes seconds with the gguf package: call it in a thread.

    Args:
        path: the base model's .gguf.
    """
    path = Path(path).absolute()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _models_lock:
        if key in _models:
            return _models[key]
    reader = _open(path, "model")
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
    )
    with _models_lock:
        _models[key] = model
    return model


def validate_lora(adapter: Path, base: GGUFModel) -> LoraSummary:
    """Raise AdapterError (naming the file) unless `adapter` is a GGUF LoRA that fits `base`.

    Args:
        adapter: the adapter .gguf.
        base: the base model, from `read_model`.
    """
    name = str(adapter)
    if adapter.is_dir():
        raise AdapterError(name, "is a directory; llama.cpp takes a GGUF LoRA file (convert PEFT/MLX adapters first)")
    reader = _open(adapter, "adapter")
    gtype = _field(reader, "general.type")
    if gtype != "adapter":
        raise AdapterError(name, f"not an adapter: general.type is {gtype!r}, expected 'adapter'")
    atype = _field(reader, "adapter.type")
    if atype != "lora":
        raise AdapterError(name, f"not a LoRA: adapter.type is {atype!r}, expected 'lora'")
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
    ranks: set[int] = set()
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
        ranks.add(a[1])
    alpha = _field(reader, "adapter.lora.alpha")
    return LoraSummary(name, len(pairs), max(ranks), float(alpha) if alpha is not None else None)

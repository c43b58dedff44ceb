"""Conversion between adapter formats, and `prepare_adapter`: an adapter in an engine's format.

    convert("run/0000100_adapters.safetensors", "out/peft", to="peft", base="models/SmolLM2")
    prepare_adapter(staged_dir, "llamacpp", "models/SmolLM2.gguf")   # -> .../adapter.gguf

Every conversion validates against the base model when one is given (always, for
prepare_adapter); a misfit raises AdapterError naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Literal

from checkpoints._basemodel import BaseShapes, base_shapes, is_gguf_file
from checkpoints._errors import AdapterError
from checkpoints._files import sha256_file
from checkpoints._gguf import write_gguf
from checkpoints._layouts import CONFIG_NAME
from checkpoints._lora import MLX_WEIGHTS, PEFT_WEIGHTS, LoraAdapter, read_mlx, read_peft, validate, write_mlx, write_peft

Format = Literal["mlx", "peft", "gguf"]
# The adapter format each engine loads (its "native" format); other engines take no adapters.
ENGINE_FORMATS: dict[str, Format] = {"llamacpp": "gguf", "mlx": "mlx", "vllm": "peft"}
GGUF_NAME = "adapter.gguf"
PREPARED_MARK = ".prepared.json"
_PREPARE_VERSION = 1


def detect_adapter(src: str | Path) -> tuple[Literal["mlx", "peft"], Path, Path]:
    """What an adapter path holds: (format, weights file, config file).

    Args:
        src: an adapter directory (MLX or PEFT) or an MLX checkpoint file with its config beside it.
    """
    p = Path(src).expanduser()
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            raise AdapterError(str(p), "GGUF adapters can be produced but not read; convert from the MLX or PEFT original")
        if p.name == PEFT_WEIGHTS:
            return "peft", p, p.with_name(CONFIG_NAME)
        return "mlx", p, p.with_name(CONFIG_NAME)
    if p.is_dir():
        if (p / PEFT_WEIGHTS).is_file():
            return "peft", p / PEFT_WEIGHTS, p / CONFIG_NAME
        if (p / MLX_WEIGHTS).is_file():
            return "mlx", p / MLX_WEIGHTS, p / CONFIG_NAME
        ckpts = sorted(p.glob("*_adapters.safetensors"))
        if len(ckpts) == 1:
            return "mlx", ckpts[0], p / CONFIG_NAME
        if ckpts:
            raise AdapterError(str(p), f"holds {len(ckpts)} checkpoints; name one file, e.g. {ckpts[-1]}")
        raise AdapterError(str(p), f"no {PEFT_WEIGHTS}, {MLX_WEIGHTS} or *_adapters.safetensors in this directory")
    raise AdapterError(str(p), "no such file or directory")


def load_adapter(src: str | Path) -> LoraAdapter:
    """Read an MLX or PEFT adapter (format detected from the files).

    Args:
        src: see detect_adapter.
    """
    kind, weights, config = detect_adapter(src)
    return read_peft(weights.parent) if kind == "peft" else read_mlx(weights, config)


def write_adapter(adapter: LoraAdapter, to: Format, dst: str | Path, base: BaseShapes | None) -> Path:
    """Write an adapter in a format; returns the directory (mlx, peft) or the .gguf file.

    Args:
        adapter: the adapter.
        to: "mlx", "peft" or "gguf".
        dst: a directory (mlx, peft; for gguf a directory gets adapter.gguf inside) or a .gguf path.
        base: the base model's shapes (required for gguf).
    """
    dst = Path(dst).expanduser()
    if to == "mlx":
        return write_mlx(adapter, dst, base)
    if to == "peft":
        return write_peft(adapter, dst, base)
    if to == "gguf":
        if base is None:
            raise AdapterError(adapter.source, "GGUF conversion needs the base model (--base): its architecture and head counts")
        if dst.is_dir() or dst.suffix.lower() != ".gguf":
            dst = dst / GGUF_NAME
        return write_gguf(adapter, dst, base)
    raise ValueError(f"unknown adapter format {to!r} (expected mlx, peft or gguf)")


def convert(src: str | Path, dst: str | Path, to: Format, base: str | Path | None = None) -> Path:
    """Convert an adapter to another format, validating it against the base model if given.

    Args:
        src: MLX or PEFT adapter (directory, or an MLX checkpoint file).
        dst: output directory (mlx, peft) or .gguf file / directory (gguf).
        to: "mlx", "peft" or "gguf".
        base: the base model (HF directory or GGUF file); required for gguf.
    """
    kind, weights, _ = detect_adapter(src)
    dst_p = Path(dst).expanduser().resolve()
    if dst_p == weights.parent.resolve() and to != "gguf":
        raise AdapterError(str(dst), "the destination is the source directory; choose another so nothing is overwritten")
    adapter = load_adapter(src)
    shapes = base_shapes(base) if base else None
    if shapes is not None:
        validate(adapter, shapes)
    return write_adapter(adapter, to, dst_p, shapes)


def is_native_adapter(path: str | Path, engine_kind: str) -> bool:
    """Whether `path` already is an adapter in the engine's format, so it loads without conversion.

    llamacpp: a GGUF file; mlx: a directory with adapters.safetensors and adapter_config.json;
    vllm: a directory with adapter_model.safetensors and adapter_config.json. (Whether it fits the
    base model is for the engine's own check when it loads it.)

    Args:
        path: an adapter file or directory.
        engine_kind: the engine's kind (see ENGINE_FORMATS); an engine without adapters: False.
    """
    p = Path(path)
    fmt = ENGINE_FORMATS.get(engine_kind)
    if fmt == "gguf":
        return is_gguf_file(p)
    if fmt is None:
        return False
    weights = MLX_WEIGHTS if fmt == "mlx" else PEFT_WEIGHTS
    return (p / weights).is_file() and (p / CONFIG_NAME).is_file()


def native_adapter_dir(cache_dir: str | Path, engine_kind: str, digest: str) -> Path:
    """Where an adapter converted to an engine's format is kept on a node: the one place it is named.

    The checkpoint watcher converts each staged checkpoint here ahead of time and the replica that
    serves it looks here, so it finds the conversion done (see `prepare_adapter`'s `out_dir`).

    Args:
        cache_dir: the node's cache of served adapters (`StagingConfig.serve_cache_dir`).
        engine_kind: the engine's kind.
        digest: the adapter's digest as registered (`sha256_tree` of its file or directory).
    """
    return Path(cache_dir) / "native" / engine_kind / digest


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def prepare_adapter(
    staged_dir: str | Path, engine_kind: str, base_model_path: str | Path, out_dir: str | Path | None = None
) -> Path:
    """The adapter in the engine's native format, validated against the base model; cached.

    llamacpp -> a GGUF file; mlx -> an mlx-lm adapter directory; vllm -> a PEFT directory. A
    second call with the same adapter bytes, engine and base returns the cached result.

    Args:
        staged_dir: a staged checkpoint directory (or any MLX / PEFT adapter path).
        engine_kind: "llamacpp", "mlx" or "vllm".
        base_model_path: the base model the engine serves (HF directory or GGUF file).
        out_dir: where to put the result (default: <staged_dir>/prepared/<engine>-<base digest>).
    """
    fmt = ENGINE_FORMATS.get(engine_kind)
    if fmt is None:
        raise AdapterError(str(staged_dir), f"engine {engine_kind!r} does not load LoRA adapters "
                                            f"(known: {', '.join(ENGINE_FORMATS)})")
    base_p = Path(base_model_path).expanduser().resolve()
    kind, weights, config = detect_adapter(staged_dir)
    root = weights.parent
    out = Path(out_dir) if out_dir else root / "prepared" / f"{engine_kind}-{_digest(str(base_p))}"
    base_stat = (base_p / "config.json" if base_p.is_dir() else base_p).stat()
    key = {
        "version": _PREPARE_VERSION,
        "engine": engine_kind,
        "adapter_sha256": _staged_sha256(root, weights),
        "config_sha256": sha256_file(config) if config.exists() else None,
        "base": str(base_p),
        "base_mtime_ns": base_stat.st_mtime_ns,
    }
    result = out / GGUF_NAME if fmt == "gguf" else out
    mark = out / PREPARED_MARK
    try:
        if json.loads(mark.read_text()) == key and (result.exists()):
            return result
    except (OSError, ValueError):
        pass

    adapter = read_peft(root) if kind == "peft" else read_mlx(weights, config)
    shapes = base_shapes(base_p)
    validate(adapter, shapes)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_adapter(adapter, fmt, tmp, shapes)
        (tmp / PREPARED_MARK).write_text(json.dumps(key))
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _staged_sha256(root: Path, weights: Path) -> str:
    """The adapter's digest: from the staging manifest when the file is the staged one, else hashed."""
    from checkpoints._staging import MANIFEST

    try:
        m = json.loads((root / MANIFEST).read_text())
        st = weights.stat()
        if m.get("file") == weights.name and m.get("size") == st.st_size and m.get("sha256"):
            return str(m["sha256"])
    except (OSError, ValueError):
        pass
    return sha256_file(weights)

"""LoRA adapters in MLX and PEFT form, read into one neutral shape and written back out.

Neutral shape: for each adapted linear layer (its module path without any "base_model.model."),
lora_a as (r, in) and lora_b as (out, r), as PEFT stores them; the update is scale * b @ a.

MLX files come in two orientations: mlx-lm's (lora_a (in, r), lora_b (r, out)) and go-ml's own
trainer's (go-mlx: lora_a (r, in), lora_b (out, r)). Rank and scale come from mlx-lm's
`lora_parameters` {rank, scale} or from the top-level {rank, alpha} go-ml's trainer writes
(scale = alpha / rank there); go-ml's converter read only the former and silently fell back to
rank 8 / scale 20 for its own trainer's adapters.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from checkpoints._basemodel import BaseShapes
from checkpoints._errors import AdapterError
from checkpoints._files import replacing
from checkpoints._layouts import CONFIG_NAME
from checkpoints._safetensors import FLOAT_DTYPES, Tensor, read_tensors, write_safetensors

MLX_WEIGHTS = "adapters.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

_MODULE_RX = re.compile(r"^(?P<prefix>.*?)layers\.(?P<layer>\d+)\.(?P<module>.+)$")
_PEFT_KEY_RX = re.compile(r"^(?P<key>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


@dataclass
class LoraPair:
    """One adapted linear layer: a (r, in) and b (out, r), raw dtype kept."""

    a: Tensor
    b: Tensor

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def in_features(self) -> int:
        return self.a.shape[1]

    @property
    def out_features(self) -> int:
        return self.b.shape[0]


@dataclass
class LoraAdapter:
    """A LoRA adapter in neutral form.

    Args:
        pairs: module path (e.g. "model.layers.3.self_attn.q_proj") -> LoraPair.
        scale: the update is scale * b @ a (PEFT: lora_alpha / r; MLX: lora_parameters.scale).
        dropout: training dropout (kept for the configs).
        num_layers: MLX's num_layers from the source config, if it had one.
        source: the file it came from (for error messages).
        base_model_name: PEFT's base_model_name_or_path, if known.
    """

    pairs: dict[str, LoraPair]
    scale: float
    dropout: float = 0.0
    num_layers: int | None = None
    source: str = ""
    base_model_name: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return next(iter(self.pairs.values())).rank

    def located(self) -> dict[str, tuple[int, str]]:
        """module path -> (layer index, module path inside the block, e.g. "self_attn.q_proj")."""
        out = {}
        for key in self.pairs:
            m = _MODULE_RX.match(key)
            if not m:
                raise AdapterError(self.source, f"tensor {key!r} is not inside a numbered transformer layer (layers.N.)")
            out[key] = (int(m["layer"]), m["module"])
        return out

    def layers(self) -> list[int]:
        """The adapted layer indices, sorted."""
        return sorted({layer for layer, _ in self.located().values()})

    def modules(self) -> list[str]:
        """The adapted module paths inside a block (e.g. "self_attn.q_proj"), sorted."""
        return sorted({mod for _, mod in self.located().values()})


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


MAX_CONFIG_BYTES = 1 << 20


def _read_config(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise AdapterError(str(path), f"is {path.stat().st_size} bytes; an adapter config is at most "
                                          f"{MAX_CONFIG_BYTES} bytes")
        # NaN / Infinity are not JSON: Python's parser takes them, and a NaN scale would reach the engines.
        cfg = json.loads(path.read_text(), parse_constant=_reject_constant)
    except FileNotFoundError:
        raise AdapterError(str(path), f"no {CONFIG_NAME} beside the adapter weights") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(str(path), f"not valid JSON: {e}") from None
    except ValueError as e:  # a NaN or Infinity constant
        raise AdapterError(str(path), f"not valid JSON: {e}") from None
    except RecursionError:
        raise AdapterError(str(path), "not valid JSON: nested too deeply") from None
    if not isinstance(cfg, dict):
        raise AdapterError(str(path), "must be a JSON object")
    return cfg


def _num(cfg: dict[str, Any], key: str, where: str, kind: type = float, *, zero: bool = False,
         below: float | None = None, above: float | None = None) -> Any:
    """cfg[key] as a finite number of `kind` (None when absent): positive, or from 0 with `zero`
    (from `above` when given), and under `below` when given; an AdapterError naming the key otherwise."""
    v = cfg.get(key)
    if v is None:
        return None
    low = above if above is not None else 0
    noun = "integer" if kind is int else "number"
    what = f"a positive {noun}" if not zero and above is None else f"{'an' if kind is int else 'a'} {noun} >= {low:g}"
    what += f" below {below:g}" if below is not None else ""
    try:
        x = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan
    except OverflowError:  # an integer beyond float range
        x = math.nan
    ok = (math.isfinite(x) and (x >= low if zero else x > low) and (below is None or x < below)
          and (kind is not int or int(x) == x))
    if not ok:
        raise AdapterError(where, f"{key} must be {what}, got {_short(v)}")
    return int(v) if kind is int else x


# The largest float32: engines and GGUF (adapter.lora.alpha = scale * rank) hold the scale as one.
_F32_MAX = 3.4028234663852886e38


def _check_scale(scale: float, where: str) -> None:
    """A scale the engines can hold: finite in float32 (a NaN or infinite update is no adapter)."""
    if not math.isfinite(scale) or abs(scale) > _F32_MAX / 1024:
        raise AdapterError(where, f"LoRA scale {scale!r} is not a finite float32 number")


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_float(t: Tensor, name: str, where: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise AdapterError(where, f"tensor {name!r} has dtype {t.dtype}; LoRA weights must be F32, F16, BF16 or F64")
    if len(t.shape) != 2:
        raise AdapterError(where, f"tensor {name!r} has shape {list(t.shape)}; LoRA weights are 2-D")


def read_mlx(weights: str | Path, config: str | Path | None = None) -> LoraAdapter:
    """Read an MLX adapter (mlx-lm's or go-ml's trainer's).

    Args:
        weights: the .safetensors file (adapters.safetensors or NNNNNNN_adapters.safetensors).
        config: its adapter_config.json (default: beside the weights).
    """
    weights = Path(weights)
    cfg_path = Path(config) if config else weights.with_name(CONFIG_NAME)
    cfg = _read_config(cfg_path)
    where = str(cfg_path)
    ftype = cfg.get("fine_tune_type", "lora")
    if ftype != "lora":
        raise AdapterError(where, f"fine_tune_type {ftype!r} is not supported (only lora)")
    params = cfg.get("lora_parameters") or {}
    if not isinstance(params, dict):
        raise AdapterError(where, "lora_parameters must be an object")
    rank = _num(params, "rank", where, int) or _num(cfg, "rank", where, int)
    scale = _num(params, "scale", where)
    if scale is None:
        alpha = _num(cfg, "alpha", where)  # go-ml's trainer: scale = alpha / rank
        if alpha is not None and rank:
            scale = alpha / rank
        elif "alpha" in params:
            raise AdapterError(where, "lora_parameters has alpha but no scale; mlx-lm's config uses scale")
        else:
            raise AdapterError(where, "no LoRA scale: expected lora_parameters.scale (mlx-lm) or top-level rank and alpha (go-ml)")
    # mlx-lm writes -1 for "every layer"; older mlx-lm called it lora_layers (go-ml: a list of modules).
    layers_key = "num_layers" if "num_layers" in cfg or not isinstance(cfg.get("lora_layers"), int) else "lora_layers"
    num_layers = _num(cfg, layers_key, where, int, zero=True, above=-1) or None
    dropout = _num(params if "dropout" in params else cfg, "dropout", where, zero=True, below=1) or 0.0

    _check_scale(scale, where)

    tensors, _ = read_tensors(weights)
    halves: dict[str, dict[str, Tensor]] = {}
    for name, t in tensors.items():
        if name.endswith(".lora_a") or name.endswith(".lora_b"):
            _check_float(t, name, str(weights))
            halves.setdefault(name[:-7], {})[name[-1]] = t
        else:
            raise AdapterError(str(weights), f"tensor {name!r} is not a LoRA weight (.lora_a / .lora_b); DoRA and full fine-tunes are not supported")
    if not halves:
        raise AdapterError(str(weights), "contains no LoRA tensors")
    pairs = {}
    for key, ab in sorted(halves.items()):
        if set(ab) != {"a", "b"}:
            raise AdapterError(str(weights), f"{key}: has lora_{next(iter(ab))} but no lora_{'b' if 'a' in ab else 'a'}")
        pairs[key] = _orient_mlx(key, ab["a"], ab["b"], rank, str(weights))
    adapter = LoraAdapter(pairs, float(scale), dropout, num_layers, str(weights))
    ranks = {p.rank for p in pairs.values()}
    if len(ranks) != 1:
        raise AdapterError(str(weights), f"LoRA pairs have different ranks {sorted(ranks)}")
    if rank and rank != adapter.rank:
        raise AdapterError(str(weights), f"{CONFIG_NAME} says rank {rank} but the tensors have rank {adapter.rank}")
    return adapter


def _orient_mlx(key: str, a: Tensor, b: Tensor, rank: int | None, where: str) -> LoraPair:
    """Bring an MLX pair to (r, in) / (out, r), whichever trainer wrote it."""
    mlx_lm = a.shape[1] == b.shape[0]       # a (in, r), b (r, out)
    go_mlx = a.shape[0] == b.shape[1]       # a (r, in), b (out, r)
    if mlx_lm and go_mlx:  # square case: the rank is the smaller side, or the configured one
        r_mlx, r_go = a.shape[1], a.shape[0]
        if rank is not None and rank in (r_mlx, r_go) and r_mlx != r_go:
            mlx_lm = r_mlx == rank
        else:  # the configured rank fits neither (reported below) or both: the smaller side
            mlx_lm = r_mlx <= r_go
        go_mlx = not mlx_lm
    if mlx_lm:
        return LoraPair(a.transposed(), b.transposed())
    if go_mlx:
        return LoraPair(a, b)
    raise AdapterError(where, f"{key}: lora_a {list(a.shape)} and lora_b {list(b.shape)} do not share a rank dimension")


def read_peft(directory: str | Path) -> LoraAdapter:
    """Read a PEFT LoRA adapter directory (adapter_model.safetensors + adapter_config.json).

    Args:
        directory: the adapter directory.
    """
    d = Path(directory)
    cfg_path = d / CONFIG_NAME
    cfg = _read_config(cfg_path)
    where = str(cfg_path)
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterError(where, f"peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    for flag in ("use_dora", "lora_bias"):
        if cfg.get(flag):
            raise AdapterError(where, f"{flag} is set; only plain LoRA is supported")
    for pat in ("rank_pattern", "alpha_pattern"):
        if cfg.get(pat):
            raise AdapterError(where, f"{pat} (per-module ranks or alphas) is not supported")
    r = _num(cfg, "r", where, int)
    alpha = _num(cfg, "lora_alpha", where)
    if r is None or alpha is None:
        raise AdapterError(where, "needs r and lora_alpha")
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    _check_scale(scale, where)

    weights = d / PEFT_WEIGHTS
    tensors, _ = read_tensors(weights)
    halves: dict[str, dict[str, Tensor]] = {}
    for name, t in tensors.items():
        m = _PEFT_KEY_RX.match(name)
        if not m:
            raise AdapterError(str(weights), f"tensor {name!r} is not a LoRA weight (…lora_A.weight / …lora_B.weight)")
        _check_float(t, name, str(weights))
        key = m["key"][len(PEFT_PREFIX):] if m["key"].startswith(PEFT_PREFIX) else m["key"]
        halves.setdefault(key, {})[m["ab"]] = t
    if not halves:
        raise AdapterError(str(weights), "contains no LoRA tensors")
    pairs = {}
    for key, ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(str(weights), f"{key}: has lora_{next(iter(ab))} but not its partner")
        a, b = ab["A"], ab["B"]
        if a.shape[0] != b.shape[1]:
            raise AdapterError(str(weights), f"{key}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not share a rank")
        if a.shape[0] != r:
            raise AdapterError(str(weights), f"{key}: rank {a.shape[0]} but {CONFIG_NAME} says r={r}")
        pairs[key] = LoraPair(a, b)
    dropout = _num(cfg, "lora_dropout", where, zero=True, below=1) or 0.0
    return LoraAdapter(pairs, float(scale), dropout, None, str(weights), str(cfg.get("base_model_name_or_path") or ""))


def validate(adapter: LoraAdapter, base: BaseShapes) -> None:
    """Refuse an adapter that does not fit the base model: unknown layer or module, wrong shape.

    Args:
        adapter: the adapter.
        base: the base model's shapes.
    """
    problems = []
    for key, (layer, module) in adapter.located().items():
        pair = adapter.pairs[key]
        want = base.linear.get((layer, module))
        if layer >= base.n_layers:
            problems.append(f"{key}: layer {layer} but the base has {base.n_layers} layers")
        elif want is None:
            problems.append(f"{key}: the base has no linear layer {module} in layer {layer}")
        elif (pair.out_features, pair.in_features) != want:
            problems.append(f"{key}: adapter is {pair.out_features}x{pair.in_features} (out x in), base is {want[0]}x{want[1]}")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise AdapterError(adapter.source, f"does not fit base model {base.path}: {problems[0]}{more}")


def mlx_num_layers(adapter: LoraAdapter, base: BaseShapes | None) -> int:
    """mlx-lm's num_layers (LoRA goes on the LAST N blocks) covering every adapted layer."""
    lowest = min(adapter.layers())
    if base is not None:
        return base.n_layers - lowest
    if adapter.num_layers is not None:
        return adapter.num_layers
    return max(adapter.layers()) + 1 - lowest  # assumes the last adapted layer is the base's last


def write_mlx(adapter: LoraAdapter, out_dir: str | Path, base: BaseShapes | None = None) -> Path:
    """Write an mlx-lm adapter directory (adapters.safetensors + adapter_config.json).

    Args:
        adapter: the adapter.
        out_dir: the directory to write.
        base: the base model's shapes (makes num_layers exact).
    """
    out = Path(out_dir)
    tensors = {}
    for key, p in adapter.pairs.items():
        tensors[f"{key}.lora_a"] = p.a.transposed()
        tensors[f"{key}.lora_b"] = p.b.transposed()
    write_safetensors(out / MLX_WEIGHTS, tensors)
    cfg = {
        "fine_tune_type": "lora",
        "num_layers": mlx_num_layers(adapter, base),
        "lora_parameters": {"rank": adapter.rank, "scale": adapter.scale, "dropout": adapter.dropout,
                            "keys": adapter.modules()},
    }
    _write_json(out / CONFIG_NAME, cfg)
    return out


def write_peft(adapter: LoraAdapter, out_dir: str | Path, base: BaseShapes | None = None) -> Path:
    """Write a PEFT adapter directory (adapter_model.safetensors + adapter_config.json).

    Args:
        adapter: the adapter.
        out_dir: the directory to write.
        base: the base model's shapes (for base_model_name_or_path).
    """
    out = Path(out_dir)
    tensors = {}
    for key, p in adapter.pairs.items():
        tensors[f"{PEFT_PREFIX}{key}.lora_A.weight"] = p.a
        tensors[f"{PEFT_PREFIX}{key}.lora_B.weight"] = p.b
    write_safetensors(out / PEFT_WEIGHTS, tensors)
    alpha = adapter.scale * adapter.rank
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": adapter.rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": adapter.dropout,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in adapter.modules()}),
        "layers_to_transform": adapter.layers(),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "base_model_name_or_path": (base.name if base else adapter.base_model_name) or None,
    }
    _write_json(out / CONFIG_NAME, cfg)
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2))

"""What the MLX and vLLM engines share about a Hugging Face model directory.

Both serve an HF directory (config.json, tokenizer files, *.safetensors) and template chats with
its tokenizer, so they count prompt tokens the same way the model's own tokenizer does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from deployments._engine import Request
from deployments._textmodel import EngineError, Message


@dataclass(frozen=True)
class HFModelFacts:
    """What config.json says about a model.

    Args:
        path: the model directory.
        config: config.json as read.
        architecture: model_type (e.g. "llama"), as llama.cpp's general.architecture names it.
        context_length: max_position_embeddings (0 when absent).
        quantization: e.g. "mlx 4-bit (group 64)", "awq 4-bit", or the weights' dtype.
    """

    path: Path
    config: dict[str, Any] = field(repr=False)
    architecture: str
    context_length: int
    quantization: str


def read_model_dir(path: Path, engine: str) -> HFModelFacts:
    """Check that `path` is an HF model directory and read its config.json.

    Args:
        path: the model directory from the config.
        engine: the engine kind, for messages.
    """
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is a file"
        raise EngineError(
            f"model path {path} {what}: the {engine} engine needs a Hugging Face model directory "
            "(config.json, tokenizer files, *.safetensors)"
        )
    cfg_path = path / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise EngineError(f"model directory {path} has no config.json (not a Hugging Face model directory)") from None
    except (OSError, ValueError) as e:
        raise EngineError(f"model config {cfg_path}: cannot read it as JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise EngineError(f"model config {cfg_path}: expected a JSON object")
    if not any(path.glob("*.safetensors")):
        raise EngineError(f"model directory {path} has no *.safetensors weights")
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    merged = {**cfg, **text}
    return HFModelFacts(
        path=path,
        config=cfg,
        architecture=str(merged.get("model_type") or (cfg.get("architectures") or [""])[0]),
        context_length=int(merged.get("max_position_embeddings") or 0),
        quantization=describe_quantization(cfg),
    )


def describe_quantization(cfg: dict[str, Any]) -> str:
    """A short description of how a model's weights are stored, from its config.json.

    Args:
        cfg: config.json as a dict.
    """
    mlx_q = cfg.get("quantization")
    if isinstance(mlx_q, dict) and mlx_q.get("bits"):
        return f"mlx {mlx_q['bits']}-bit (group {mlx_q.get('group_size', '?')})"
    hf_q = cfg.get("quantization_config")
    if isinstance(hf_q, dict) and hf_q:
        method = str(hf_q.get("quant_method") or "quantized")
        bits = hf_q.get("bits") or hf_q.get("w_bit")
        return f"{method} {bits}-bit" if bits else method
    return str(cfg.get("dtype") or cfg.get("torch_dtype") or "unknown")


def prompt_token_ids(tokenizer: Any, req: Request) -> list[int]:
    """The token ids the model sees: the chat template applied (with the generation prompt), or
    the raw prompt encoded the way the tokenizer encodes by default.

    Args:
        tokenizer: a Hugging Face tokenizer (or mlx-lm's wrapper around one).
        req: the request.
    """
    if req.is_chat:
        return chat_token_ids(tokenizer, req.messages or ())
    return [int(i) for i in tokenizer.encode(req.prompt)]


def chat_token_ids(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """The token ids of a chat as the model sees it: the tokenizer's chat template applied, with the
    generation prompt (the ids a reply is generated after; Engine.chat_ids).

    Args:
        tokenizer: a Hugging Face tokenizer (or mlx-lm's wrapper around one).
        messages: the chat, system prompt applied.
    """
    chat = [{"role": m.role, "content": m.content} for m in messages]
    try:
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    except ValueError as e:  # e.g. no chat template in the tokenizer config
        raise EngineError(f"cannot apply the model's chat template: {e}") from None
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]

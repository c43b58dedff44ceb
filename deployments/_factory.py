"""Build an engine from a model's config entry.

Engine modules are imported only when a model of their kind is opened, so a node without MLX or
vLLM can still run llama.cpp and HTTP models.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import TYPE_CHECKING, AsyncIterator, Mapping

from deployments._engine import Engine
from deployments._textmodel import EngineError

if TYPE_CHECKING:
    from deployments._config import ModelConfig

# engine kind -> (module, class, pip extra that provides its library)
ENGINE_CLASSES: dict[str, tuple[str, str, str]] = {
    "llamacpp": ("deployments._llamacpp", "LlamaCppEngine", "llamacpp"),
    "openai": ("deployments._openai_http", "OpenAIHTTPEngine", ""),
    "mlx": ("deployments._mlx", "MLXEngine", "mlx"),
    "vllm": ("deployments._vllm", "VLLMEngine", "vllm"),
}


def engine_class(kind: str) -> type[Engine]:
    """The Engine subclass for an engine kind, imported on first use.

    Args:
        kind: "llamacpp", "openai", "mlx" or "vllm".
    """
    try:
        module_name, class_name, extra = ENGINE_CLASSES[kind]
    except KeyError:
        raise EngineError(f"unknown engine kind {kind!r} (expected one of {', '.join(ENGINE_CLASSES)})") from None
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise EngineError(
                f"the {kind} engine is not available in this install: module {module_name} does not exist"
            ) from None
        hint = f" (install it with: pip install 'evalcluster[{extra}]')" if extra else ""
        raise EngineError(f"the {kind} engine needs the Python package {e.name!r}, which is not installed{hint}") from e
    try:
        cls = getattr(module, class_name)
    except AttributeError:
        raise EngineError(f"the {kind} engine is not available: {module_name} has no {class_name}") from None
    return cls


def open_engine(model_cfg: "ModelConfig | Mapping[str, object]") -> Engine:
    """An engine for one model of the config, built but not started.

    Args:
        model_cfg: a model's config (LlamaCppModel, MLXModel, VLLMModel, OpenAIModel), or the same
            as a mapping. Relative paths in it are relative to the current directory (load_config
            makes a file's paths absolute).
    """
    from deployments._config import model_config

    cfg = model_config(model_cfg)
    return engine_class(cfg.engine).from_config(cfg)


@contextlib.asynccontextmanager
async def started_engine(model_cfg: "ModelConfig | Mapping[str, object]") -> AsyncIterator[Engine]:
    """Open an engine, start it, yield it, and close it on the way out.

    Args:
        model_cfg: as for `open_engine`.
    """
    engine = open_engine(model_cfg)
    try:
        await engine.start()
        yield engine
    finally:
        await engine.close()

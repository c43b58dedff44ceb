"""Build an engine from a model's config entry.

Engine modules are imported only when a model of their kind is opened, so a node without MLX or
vLLM can still run llama.cpp and HTTP models.
"""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path
from typing import Any, AsyncIterator, Mapping

from deployments._engine import Engine
from deployments._textmodel import EngineError

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


def _model_config(model_cfg: Any) -> Any:
    if isinstance(model_cfg, Mapping):
        from pydantic import TypeAdapter, ValidationError

        from cluster.config import ConfigError, ModelConfig, format_validation_error

        try:
            return TypeAdapter(ModelConfig).validate_python(dict(model_cfg))
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, f"model {model_cfg.get('name', '?')!r}")) from None
    return model_cfg


def open_engine(model_cfg: Any, app_cfg: Any | None = None) -> Engine:
    """An engine for one model of the config, built but not started.

    Args:
        model_cfg: a `cluster.config` model (LlamaCppModel, MLXModel, VLLMModel, OpenAIModel),
            or the same as a mapping.
        app_cfg: the AppConfig it came from; relative paths resolve against its file
            (without it, against the current directory).
    """
    cfg = _model_config(model_cfg)
    kind = getattr(cfg, "engine", None)
    cls = engine_class(kind)
    if app_cfg is not None:
        resolve = app_cfg.resolve
    else:
        def resolve(p: Path | str) -> Path:
            return Path(p).expanduser().absolute()
    return cls.from_config(cfg, resolve)


@contextlib.asynccontextmanager
async def started_engine(model_cfg: Any, app_cfg: Any | None = None) -> AsyncIterator[Engine]:
    """Open an engine, start it, yield it, and close it on the way out.

    Args:
        model_cfg: as for `open_engine`.
        app_cfg: as for `open_engine`.
    """
    engine = open_engine(model_cfg, app_cfg)
    try:
        await engine.start()
        yield engine
    finally:
        await engine.close()

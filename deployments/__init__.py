"""Inference engines behind one TextModel contract, and the Ray Serve deployments that host them."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> the private module that defines it. Resolved on first use, so a command
# imports only what it needs (an engine's libraries, asyncssh, ...).
_EXPORTS = {
    "Engine": "deployments._engine",
    "Request": "deployments._engine",
    "active_options": "deployments._engine",
    "check_options": "deployments._engine",
    "with_system_prompt": "deployments._engine",
    "engine_class": "deployments._factory",
    "open_engine": "deployments._factory",
    "started_engine": "deployments._factory",
    "LlamaCppEngine": "deployments._llamacpp",
    "MLXEngine": "deployments._mlx",
    "VLLMEngine": "deployments._vllm",
    "OpenAIClient": "deployments._openai_http",
    "OpenAIHTTPEngine": "deployments._openai_http",
    "AdapterError": "deployments._textmodel",
    "EngineError": "deployments._textmodel",
    "EngineUnavailable": "deployments._textmodel",
    "FinishReason": "deployments._textmodel",
    "GenMetrics": "deployments._textmodel",
    "GenOpts": "deployments._textmodel",
    "Message": "deployments._textmodel",
    "ModelInfo": "deployments._textmodel",
    "Result": "deployments._textmodel",
    "StopFilter": "deployments._textmodel",
    "TextModel": "deployments._textmodel",
    "Token": "deployments._textmodel",
    "UnsupportedOption": "deployments._textmodel",
    "Usage": "deployments._textmodel",
    "chat": "deployments._textmodel",
    "collect": "deployments._textmodel",
    "complete": "deployments._textmodel",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        try:  # a subpackage, e.g. evaluators.sinks
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from deployments._engine import Engine, Request, active_options, check_options, with_system_prompt  # noqa: F401
    from deployments._factory import engine_class, open_engine, started_engine  # noqa: F401
    from deployments._llamacpp import LlamaCppEngine  # noqa: F401
    from deployments._mlx import MLXEngine  # noqa: F401
    from deployments._vllm import VLLMEngine  # noqa: F401
    from deployments._openai_http import OpenAIClient, OpenAIHTTPEngine  # noqa: F401
    from deployments._textmodel import AdapterError, EngineError, EngineUnavailable, FinishReason, GenMetrics, GenOpts, Message, ModelInfo, Result, StopFilter, TextModel, Token, UnsupportedOption, Usage, chat, collect, complete  # noqa: F401

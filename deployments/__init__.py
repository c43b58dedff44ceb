"""Inference engines behind one TextModel contract, and the Ray Serve deployments that host them."""

from deployments._engine import Engine, Request, active_options, check_options, with_system_prompt
from deployments._factory import engine_class, open_engine, started_engine
from deployments._llamacpp import LlamaCppEngine
from deployments._openai_http import OpenAIClient, OpenAIHTTPEngine
from deployments._textmodel import (
    AdapterError,
    EngineError,
    EngineUnavailable,
    FinishReason,
    GenMetrics,
    GenOpts,
    Message,
    ModelInfo,
    Result,
    StopFilter,
    TextModel,
    Token,
    UnsupportedOption,
    Usage,
    chat,
    collect,
    complete,
)

__all__ = [
    "AdapterError",
    "Engine",
    "LlamaCppEngine",
    "OpenAIClient",
    "OpenAIHTTPEngine",
    "Request",
    "active_options",
    "check_options",
    "engine_class",
    "open_engine",
    "started_engine",
    "with_system_prompt",
    "EngineError",
    "EngineUnavailable",
    "FinishReason",
    "GenMetrics",
    "GenOpts",
    "Message",
    "ModelInfo",
    "Result",
    "StopFilter",
    "TextModel",
    "Token",
    "UnsupportedOption",
    "Usage",
    "chat",
    "collect",
    "complete",
]

"""Inference engines behind one TextModel contract, and the Ray Serve deployments that host them."""

from __future__ import annotations

from checkpoints import lazy_exports

# Each public name once, under the private module that defines it (imported on first use).
__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "_config": (
        "ENGINE_KINDS", "VLLM_LORA_RANKS", "Autoscaling", "LlamaCppModel", "LlamaCppOptions", "MLXModel",
        "MLXOptions", "ModelConfig", "OpenAIModel", "OpenAIOptions", "ServeHTTP", "VLLMModel", "VLLMOptions",
        "model_config",
    ),
    "_engine": ("Engine", "Request", "active_options", "check_options", "with_system_prompt"),
    "_factory": ("engine_class", "open_engine", "started_engine"),
    "_ingress": ("DeploymentError", "build_app", "check_placement", "deploy", "register_adapter_dirs", "undeploy"),
    "_llamacpp": ("LlamaCppEngine",),
    "_mlx": ("MLXEngine",),
    "_openai_http": ("OpenAIClient", "OpenAIHTTPEngine"),
    "_registry": ("DETACHED", "AdapterEntry", "ModelClaim", "ModelClaimError", "adapter_files", "entry_for",
                  "model_definition", "ray_session_dir", "registry", "running_job_ids"),
    "_serve": ("APP_NAME", "ServeTextModel", "deployment_name", "model_app"),
    "_textmodel": (
        "AdapterError", "EngineError", "EngineUnavailable", "FinishReason", "GenMetrics", "GenOpts",
        "Loglikelihood", "Message", "ModelInfo", "RequestRejected", "Result", "StopFilter", "TextModel", "Token",
        "TokenScore", "UnsupportedOption", "Usage",
        "chat", "collect", "complete",
    ),
    "_vllm": ("VLLMEngine",),
})

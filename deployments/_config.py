"""The config sections deployments own: `models` (one entry per served model, by engine) and the
Serve HTTP endpoint (`cluster.serve`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Mapping, Union

from pydantic import Field, JsonValue, TypeAdapter, ValidationError, field_validator, model_validator

from checkpoints import NAME_PATTERN, ConfigError, StrictModel, format_validation_error

ENGINE_KINDS = ("llamacpp", "mlx", "vllm", "openai")
DEFAULT_MAX_TOKENS_LIMIT = 32768


class ServeHTTP(StrictModel):
    """The OpenAI-compatible endpoint: where it listens, the bearer key it asks for (from an env
    var or a file; neither: no auth; one that names nothing: the endpoint refuses to start), and
    what one request may ask for (beyond it: 413 or 400 from the ingress, before any model works)."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_key_env: str | None = None
    api_key_file: Path | None = None
    # /docs, /redoc and /openapi.json (they answer without the key): off unless asked for.
    docs: bool = False
    max_body_bytes: int = Field(1 << 20, ge=1024)
    # Characters of the prompt, or of every message together.
    max_prompt_chars: int = Field(200_000, ge=1)
    # Stop sequences: each costs the replica a scan of every new token's text.
    max_stop_sequences: int = Field(16, ge=0)
    max_stop_chars: int = Field(256, ge=1)


class Autoscaling(StrictModel):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)


class _ModelBase(StrictModel):
    name: str = Field(pattern=NAME_PATTERN)
    adapters: bool = True
    system_prompt: str | None = None
    resources: dict[str, float] = Field(default_factory=dict)
    num_cpus: float = Field(0, ge=0)
    num_gpus: float = Field(0, ge=0)
    replicas: int = Field(1, ge=1)
    autoscaling: Autoscaling | None = None
    # Requests Serve sends one replica at once (beyond them it queues them, up to max_queued_requests,
    # and sends each to the first replica with room). Default 32; llama.cpp's: see LlamaCppModel.
    max_ongoing_requests: int = Field(32, ge=1)
    max_queued_requests: int = Field(64, ge=-1)  # -1: no limit (then over-budget requests queue)
    max_adapters_per_replica: int = Field(4, ge=1)
    # Serve asks each replica's engine this often; after 3 failed checks in a row it replaces the replica.
    health_check_period_s: float = Field(10, gt=0)
    health_check_timeout_s: float = Field(30, gt=0)
    # Directories whose sub-directories (or files) are adapters, served as `<model>:<name>`.
    adapter_dirs: list[Path] = Field(default_factory=list)
    # The largest max_tokens a request may ask for (beyond it: 400). Default: the context per
    # request where the options set one (llama.cpp ctx_size, vLLM max_model_len), else 32768.
    max_tokens_limit: int | None = Field(None, ge=1)

    def request_token_limit(self) -> int:
        """The largest max_tokens a request may ask for (`max_tokens_limit` or its default)."""
        return self.max_tokens_limit or self._context_tokens() or DEFAULT_MAX_TOKENS_LIMIT

    def _context_tokens(self) -> int | None:
        """The context one request gets, when the engine's options set it."""
        return None

    @field_validator("max_queued_requests")
    @classmethod
    def _queue_bound(cls, v: int) -> int:
        if v == 0:
            raise ValueError("must be -1 (no limit) or a positive integer")
        return v


class LlamaCppOptions(StrictModel):
    """llama.cpp's server: `parallel` slots of `ctx_size` tokens each (the server gets both)."""

    parallel: int = Field(4, ge=1)
    ctx_size: int = Field(4096, ge=256)
    # "one": a server per replica answers for the base and every adapter (per-request LoRA; the
    # weights loaded once). "each": a server per adapter besides the base's, each with a share of the
    # cores: ~15-25% more tokens/s when several adapters decode at once on a CPU node, 1.75x fewer
    # when one model runs alone, and on a GPU a copy of the weights per server (bench/RESULTS.md).
    adapter_servers: Literal["one", "each"] = "one"
    # CPU threads per server. Default: every core ("one"), or an equal share among the base and
    # max_adapters_per_replica adapter servers ("each").
    threads: int | None = Field(None, ge=1)
    n_gpu_layers: int = -1
    server_binary: Path | None = None
    start_timeout_s: float = Field(60, gt=0)
    # Where each server process writes its log (default: a temp dir removed at close).
    log_dir: Path | None = None
    # Crashes within a minute after which a server is left down (requests then fail at once).
    max_restarts: int = Field(5, ge=0)
    # Reuse a slot's cached prompt prefix. Off by default: a cached prefix was computed in another
    # batch shape and changes the numerics (measured: greedy answers differ cold vs cached), and
    # evaluations must be repeatable. Turn on for serving speed.
    cache_prompt: bool = False
    # The longest a request waits at a free slot for its adapter's turn (deployments._llamacpp_turns:
    # one server decodes one LoRA configuration per step); 0: first come, first served.
    turn_wait_s: float = Field(30.0, ge=0.0)
    # The scale every adapter is applied with (llama.cpp's --lora-scaled); it changes answers, so it
    # is part of each result's identity. 0 serves the base model under the adapter's name.
    lora_scale: float = Field(1.0, ge=0.0)


class LlamaCppModel(_ModelBase):
    engine: Literal["llamacpp"]
    path: Path
    options: LlamaCppOptions = Field(default_factory=LlamaCppOptions)

    def _context_tokens(self) -> int | None:
        return self.options.ctx_size

    @model_validator(mode="after")
    def _ongoing_from_slots(self) -> "LlamaCppModel":
        """Unless set, a replica is sent its slots and half as many again: enough that a freed slot
        takes a queued request at once (one replica's sweep: 1.06-1.11x over its slots alone), few
        enough that Serve spills an adapter's burst to a replica without it. Serve sends an
        adapter's requests to the replicas holding it while they have room. Measured on the
        4-checkpoint sweep, 2 replicas of 4 slots, 8 in flight: with room for 32 each replica's
        slots were busy 2.75 on average (one idle 16 s of 136); with room for 6, 3.5 and 4.2. The
        sweep's wall time did not differ beyond this 2-core VM's noise (each slot then decodes
        faster), but on an engine with cores to spare an idle slot is lost throughput."""
        if "max_ongoing_requests" not in self.model_fields_set:
            self.max_ongoing_requests = self.options.parallel + max(1, self.options.parallel // 2)
        return self


class MLXOptions(StrictModel):
    # (base, adapter) models kept loaded; also capped by the model's max_adapters_per_replica.
    max_loaded: int = Field(2, ge=1)


class MLXModel(_ModelBase):
    engine: Literal["mlx"]
    path: Path
    options: MLXOptions = Field(default_factory=MLXOptions)


class VLLMOptions(StrictModel):
    dtype: str = "auto"
    max_model_len: int = Field(2048, ge=64)
    enforce_eager: bool = False
    max_loras: int = Field(4, ge=1)
    max_lora_rank: int = Field(16, ge=1)  # vLLM accepts only the ranks in VLLM_LORA_RANKS
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    kv_cache_space_gb: float | None = Field(None, gt=0)
    extra: dict[str, JsonValue] = Field(default_factory=dict)


# vLLM's LoRAConfig.max_lora_rank takes only these values.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class VLLMModel(_ModelBase):
    engine: Literal["vllm"]
    path: Path
    options: VLLMOptions = Field(default_factory=VLLMOptions)

    def _context_tokens(self) -> int | None:
        return self.options.max_model_len

    @model_validator(mode="after")
    def _lora_rank(self) -> "VLLMModel":
        if self.options.max_lora_rank not in VLLM_LORA_RANKS:
            raise ValueError(f"options.max_lora_rank {self.options.max_lora_rank} is not one vLLM accepts "
                             f"({', '.join(map(str, VLLM_LORA_RANKS))})")
        return self


class OpenAIOptions(StrictModel):
    """An OpenAI-compatible server. `base_url` is the API root, e.g. http://127.0.0.1:8080/v1."""

    base_url: str
    model: str | None = None
    api_key_env: str | None = None
    api_key_file: Path | None = None
    timeout_s: float = Field(300, gt=0)
    max_retries: int = Field(4, ge=0)
    chat_only: bool = False
    connect_timeout_s: float = Field(10, gt=0)
    # Exponential backoff with jitter between retries: base * 2**attempt, capped.
    backoff_base_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(30, gt=0)
    # A 429/503 asking to wait longer than this fails instead of sleeping.
    retry_after_max_s: float = Field(120, gt=0)
    # Sampling fields beyond OpenAI's (top_k, repeat penalty): "llamacpp" sends top_k/repeat_penalty/
    # min_p, "vllm" sends top_k/repetition_penalty; "none" rejects requests that set them.
    sampling_extensions: Literal["none", "llamacpp", "vllm"] = "none"


class OpenAIModel(_ModelBase):
    engine: Literal["openai"]
    options: OpenAIOptions
    adapters: bool = False


ModelConfig = Annotated[
    Union[LlamaCppModel, MLXModel, VLLMModel, OpenAIModel], Field(discriminator="engine")
]


_MODEL_ADAPTER: TypeAdapter[ModelConfig] = TypeAdapter(ModelConfig)


def model_config(data: ModelConfig | Mapping[str, object]) -> ModelConfig:
    """A model's config, validated from a mapping (as shipped to a replica) or returned as is.

    Args:
        data: a model config, or the same as a mapping.
    """
    if not isinstance(data, Mapping):
        return data
    try:
        return _MODEL_ADAPTER.validate_python(dict(data))
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, f"model {data.get('name', '?')!r}", ENGINE_KINDS)) from None

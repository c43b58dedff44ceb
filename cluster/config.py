"""The schema of ray_config.yaml, and its loader.

A bad config fails with `ConfigError`, whose message is one line naming the file, the key path
and what is wrong, e.g. `ray_config.yaml: models.0.replicas: Input should be a valid integer`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, ValidationError, field_validator, model_validator

ENGINE_KINDS = ("llamacpp", "mlx", "vllm", "openai")
DEFAULT_CONFIG = "ray_config.yaml"


class ConfigError(ValueError):
    """A config file that cannot be used. The message is one line a user can act on."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- cluster


class NodeKind(_Strict):
    """A kind of node and the Ray resources it declares (e.g. `{mlx: 1}` on Apple Silicon)."""

    resources: dict[str, float] = Field(default_factory=dict)
    num_gpus: float = 0


class ServeHTTP(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_key_env: str | None = None
    api_key_file: Path | None = None


class ClusterConfig(_Strict):
    """Where Ray runs. `address: local` starts (and owns) a loopback-only cluster."""

    address: str = "local"
    num_cpus: int | None = Field(None, ge=1)
    dashboard: bool = True
    dashboard_port: int = Field(8265, ge=1, le=65535)
    metrics_export_port: int | None = Field(None, ge=1, le=65535)
    temp_dir: Path | None = None
    node_kinds: dict[str, NodeKind] = Field(default_factory=dict)
    local_node_kind: str | None = None
    serve: ServeHTTP = Field(default_factory=ServeHTTP)

    @model_validator(mode="after")
    def _kind_exists(self) -> "ClusterConfig":
        if self.local_node_kind and self.local_node_kind not in self.node_kinds:
            raise ValueError(f"local_node_kind {self.local_node_kind!r} is not one of node_kinds")
        return self


# --------------------------------------------------------------------------- models


class Autoscaling(_Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)


class _ModelBase(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    adapters: bool = True
    system_prompt: str | None = None
    resources: dict[str, float] = Field(default_factory=dict)
    num_cpus: float = Field(0, ge=0)
    num_gpus: float = Field(0, ge=0)
    replicas: int = Field(1, ge=1)
    autoscaling: Autoscaling | None = None
    max_ongoing_requests: int = Field(32, ge=1)
    max_queued_requests: int = Field(64, ge=-1)  # -1: no limit (then over-budget requests queue)
    max_adapters_per_replica: int = Field(4, ge=1)
    # Serve asks each replica's engine this often; after 3 failed checks in a row it replaces the replica.
    health_check_period_s: float = Field(10, gt=0)
    health_check_timeout_s: float = Field(30, gt=0)
    # Directories whose sub-directories (or files) are adapters, served as `<model>:<name>`.
    adapter_dirs: list[Path] = Field(default_factory=list)

    @field_validator("max_queued_requests")
    @classmethod
    def _queue_bound(cls, v: int) -> int:
        if v == 0:
            raise ValueError("must be -1 (no limit) or a positive integer")
        return v


class LlamaCppOptions(_Strict):
    """llama.cpp's server: `parallel` slots of `ctx_size` tokens each (the server gets both)."""

    parallel: int = Field(4, ge=1)
    ctx_size: int = Field(4096, ge=256)
    # CPU threads per server process. Default: the cores shared equally among the servers a replica
    # may run at once (the base and max_adapters_per_replica adapters, each its own server).
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


class LlamaCppModel(_ModelBase):
    engine: Literal["llamacpp"]
    path: Path
    options: LlamaCppOptions = Field(default_factory=LlamaCppOptions)


class MLXOptions(_Strict):
    # (base, adapter) models kept loaded; also capped by the model's max_adapters_per_replica.
    max_loaded: int = Field(2, ge=1)


class MLXModel(_ModelBase):
    engine: Literal["mlx"]
    path: Path
    options: MLXOptions = Field(default_factory=MLXOptions)


class VLLMOptions(_Strict):
    dtype: str = "auto"
    max_model_len: int = Field(2048, ge=64)
    enforce_eager: bool = False
    max_loras: int = Field(4, ge=1)
    max_lora_rank: int = Field(16, ge=1)  # vLLM accepts only the ranks in VLLM_LORA_RANKS
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    kv_cache_space_gb: float | None = Field(None, gt=0)
    extra: dict[str, Any] = Field(default_factory=dict)


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class VLLMModel(_ModelBase):
    engine: Literal["vllm"]
    path: Path
    options: VLLMOptions = Field(default_factory=VLLMOptions)

    @model_validator(mode="after")
    def _lora_rank(self) -> "VLLMModel":
        if self.options.max_lora_rank not in VLLM_LORA_RANKS:
            raise ValueError(f"options.max_lora_rank {self.options.max_lora_rank} is not one vLLM accepts "
                             f"({', '.join(map(str, VLLM_LORA_RANKS))})")
        return self


class OpenAIOptions(_Strict):
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


# --------------------------------------------------------------------------- checkpoints


class AdapterMetaRule(_Strict):
    """One row of go-ml's AdapterMeta table: a run-directory prefix and what it names."""

    prefix: str
    tag: str
    short: str


class SourceConfig(_Strict):
    """Where a training run writes its checkpoints."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    kind: Literal["local", "ssh"] = "local"
    path: Path | None = None
    host: str | None = None
    port: int = Field(22, ge=1, le=65535)
    user: str | None = None
    key: Path | None = None
    known_hosts: Path | None = None
    base: str | None = None
    layout: Literal["mlx", "peft"] = "mlx"
    glob: str | None = None
    iteration_pattern: str | None = None
    marker: str | None = None
    model: str
    adapter_meta: list[AdapterMetaRule] = Field(default_factory=list)
    connect_timeout_s: float = Field(10, gt=0)

    @model_validator(mode="after")
    def _kind_fields(self) -> "SourceConfig":
        if self.kind == "local" and self.path is None:
            raise ValueError("a local source needs `path`")
        if self.kind == "ssh":
            missing = [k for k in ("host", "user", "base", "known_hosts") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"an ssh source needs {', '.join(missing)}")
        if self.iteration_pattern is not None:
            try:
                rx = re.compile(self.iteration_pattern)
            except re.error as e:
                raise ValueError(f"iteration_pattern is not a valid regex: {e}") from None
            if rx.groups < 1:
                raise ValueError("iteration_pattern needs one capture group for the iteration")
        return self


class StagingConfig(_Strict):
    cache_dir: Path = Path(".evalcluster/cache")
    max_bytes: int = Field(20 * 2**30, ge=1)
    retries: int = Field(3, ge=0)


# --------------------------------------------------------------------------- evaluation


class ProbesConfig(_Strict):
    sets: list[str] = Field(default_factory=lambda: ["capability"])
    repeats: int = Field(1, ge=1)
    system_prompt: str | None = "You are a helpful assistant."
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    seed: int | None = 0


class JudgeConfig(_Strict):
    model: str | None = None
    retries: int = Field(2, ge=0)
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(512, ge=16)
    suites: list[str] = Field(default_factory=list)


SCORER_NAMES = ("heuristic", "exact", "capability", "semantic", "content", "standard")


class BudgetsConfig(_Strict):
    """Concurrency budgets, shared by every job on the cluster."""

    per_endpoint: int = Field(4, ge=1)
    judge: int = Field(2, ge=1)
    checkpoints: int = Field(2, ge=1)


class InfluxConfig(_Strict):
    url: str | None = None
    protocol: Literal["auto", "v1", "v2"] = "auto"
    org: str | None = None
    bucket: str | None = None
    database: str | None = "training"
    retention_policy: str | None = None
    token_env: str | None = "INFLUX_TOKEN"
    token_file: Path | None = None
    timestamps: Literal["iteration", "wallclock"] = "iteration"
    batch_size: int = Field(500, ge=1)
    flush_interval_ms: int = Field(1000, ge=10)
    max_retries: int = Field(5, ge=0)
    timeout_s: float = Field(10, gt=0)
    # Backoff between retries of one batch (doubling, with jitter, capped), and between probes of a
    # server that stopped answering (points wait in the spool meanwhile).
    retry_interval_ms: int = Field(1000, ge=1)
    max_retry_delay_ms: int = Field(30000, ge=1)

    @field_validator("url")
    @classmethod
    def _empty_is_none(cls, v: str | None) -> str | None:
        return v or None

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    def token(self) -> SecretStr | None:
        """The token, from the env var or the file; never logged (SecretStr)."""
        if self.token_env and os.environ.get(self.token_env):
            return SecretStr(os.environ[self.token_env].strip())
        if self.token_file:
            try:
                return SecretStr(self.token_file.expanduser().read_text().strip())
            except OSError as e:
                raise ConfigError(f"sinks.influx.token_file: cannot read {self.token_file}: {e.strerror}") from None
        return None


class SinksConfig(_Strict):
    ledger: Path = Path(".evalcluster/ledger.sqlite")
    # Every point goes to this fsync'd spool first and leaves it when InfluxDB acknowledges it.
    spool_dir: Path = Path(".evalcluster/spool")
    # At the limit a write raises SpoolFull (nothing is dropped silently); a warning comes at 80 %.
    spool_max_bytes: int = Field(512 * 2**20, ge=1024)
    influx: InfluxConfig = Field(default_factory=InfluxConfig)


class AppConfig(_Strict):
    """The whole of ray_config.yaml."""

    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    models: list[ModelConfig] = Field(min_length=1)
    sources: list[SourceConfig] = Field(default_factory=list)
    staging: StagingConfig = Field(default_factory=StagingConfig)
    probes: ProbesConfig = Field(default_factory=ProbesConfig)
    scorers: list[Literal["heuristic", "exact", "capability", "semantic", "content", "standard"]] = Field(
        default_factory=lambda: ["heuristic", "exact", "capability"]
    )
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    budgets: BudgetsConfig = Field(default_factory=BudgetsConfig)
    sinks: SinksConfig = Field(default_factory=SinksConfig)
    poll_interval_s: float = Field(30, gt=0)
    max_attempts: int = Field(3, ge=1)
    retry_backoff_s: float = Field(30, gt=0)

    # Set by load_config: the file this came from; relative paths resolve against its directory.
    _source_path: Path | None = PrivateAttr(None)

    @property
    def source_path(self) -> Path | None:
        return self._source_path

    @model_validator(mode="after")
    def _references(self) -> "AppConfig":
        names = [m.name for m in self.models]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"model names must be unique; repeated: {', '.join(sorted(dup))}")
        snames = [s.name for s in self.sources]
        sdup = {n for n in snames if snames.count(n) > 1}
        if sdup:
            raise ValueError(f"source names must be unique; repeated: {', '.join(sorted(sdup))}")
        for i, s in enumerate(self.sources):
            if s.model not in names:
                raise ValueError(f"sources.{i}.model: {s.model!r} is not a model in `models` ({', '.join(names)})")
        if self.judge.model and self.judge.model not in names:
            raise ValueError(f"judge.model: {self.judge.model!r} is not a model in `models` ({', '.join(names)})")
        return self

    def model(self, name: str) -> "LlamaCppModel | MLXModel | VLLMModel | OpenAIModel":
        """The model config called `name`, or a ConfigError listing the known ones."""
        for m in self.models:
            if m.name == name:
                return m
        raise ConfigError(f"no model named {name!r} in the config (known: {', '.join(m.name for m in self.models)})")

    def source(self, name: str) -> SourceConfig:
        for s in self.sources:
            if s.name == name:
                return s
        raise ConfigError(f"no source named {name!r} in the config (known: {', '.join(s.name for s in self.sources) or 'none'})")

    def absolute_dump(self) -> dict[str, Any]:
        """The config as plain data with every path made absolute (for running it elsewhere)."""

        def walk(v: Any) -> Any:
            if isinstance(v, Path):
                return str(self.resolve(v))
            if isinstance(v, dict):
                return {k: walk(x) for k, x in v.items()}
            if isinstance(v, list):
                return [walk(x) for x in v]
            return v

        return walk(self.model_dump(mode="python", exclude_none=True))

    def resolve(self, p: Path | str) -> Path:
        """A path from the config, made absolute against the config file's directory."""
        p = Path(p).expanduser()
        if p.is_absolute() or self.source_path is None:
            return p
        return (self.source_path.parent / p).resolve()


# --------------------------------------------------------------------------- loading

_ENV_RX = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str] | None = None, where: str = "config", path: str = "") -> Any:
    """Replace `${VAR}` and `${VAR:-default}` in every string of a parsed config tree.

    An unset (or empty) VAR without a default is an error naming the key path.
    """
    env = os.environ if env is None else env
    if isinstance(value, dict):
        return {k: interpolate(v, env, where, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, where, f"{path}.{i}" if path else str(i)) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def sub(m: re.Match[str]) -> str:
        var, default = m.group(1), m.group(2)
        if env.get(var):
            return env[var]
        if default is not None:
            return default
        raise ConfigError(f"{where}: {path}: environment variable {var} is not set (write ${{{var}:-default}} for a default)")

    out = _ENV_RX.sub(sub, value)
    # A value that was only a variable and came out empty means "not set".
    return None if out == "" and _ENV_RX.fullmatch(value) else out


def _loc(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for i, p in enumerate(loc):
        # Discriminated unions put the tag in the path (models.0.llamacpp.path): drop it.
        if isinstance(p, str) and p in ENGINE_KINDS and i > 0 and isinstance(loc[i - 1], int):
            continue
        parts.append(str(p))
    return ".".join(parts)


def format_validation_error(err: ValidationError, where: str) -> str:
    """One line: `file: key.path: what is wrong` (plus how many more problems there are)."""
    errors = err.errors(include_url=False)
    first = errors[0]
    loc = _loc(tuple(first["loc"]))
    msg = first["msg"]
    if first["type"] == "union_tag_invalid":
        ctx = first.get("ctx", {})
        loc = f"{loc}.{ctx.get('discriminator', 'engine').strip(chr(39))}"
        msg = f"unknown value {ctx.get('tag')!r} (expected one of {', '.join(ENGINE_KINDS)})"
    elif first["type"] == "union_tag_not_found":
        loc = f"{loc}.engine"
        msg = f"required key is missing (one of {', '.join(ENGINE_KINDS)})"
    elif first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "required key is missing"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {loc + ': ' if loc else ''}{msg}{more}"


def parse_config(data: dict[str, Any], where: str = "config", source_path: Path | None = None) -> AppConfig:
    """Validate an already-parsed mapping."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping, got {type(data).__name__}")
    try:
        cfg = AppConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, where)) from None
    cfg._source_path = source_path
    return cfg


def load_config(path: str | Path | None = None, env: dict[str, str] | None = None) -> AppConfig:
    """Read, interpolate and validate a config file (default: ./ray_config.yaml).

    Args:
        path: the YAML file; `EVALCLUSTER_CONFIG` or ./ray_config.yaml when None.
        env: variables for `${VAR}` interpolation (default: the process environment).
    """
    path = Path(path or os.environ.get("EVALCLUSTER_CONFIG") or DEFAULT_CONFIG)
    where = str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such config file") from None
    except OSError as e:
        raise ConfigError(f"{where}: cannot read: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        pos = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}{pos}: not valid YAML: {problem}") from None
    data = interpolate(data if data is not None else {}, env, where)
    return parse_config(data, where, path.resolve())

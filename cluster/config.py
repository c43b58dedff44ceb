"""The schema of ray_config.yaml, and its loader.

A bad config fails with `ConfigError`, whose message is one line naming the file, the key path
and what is wrong, e.g. `ray_config.yaml: models.0.replicas: Input should be a valid integer`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, PrivateAttr, ValidationError, model_validator

from checkpoints import (
    AdapterMetaRule,
    ConfigError,
    Ledger,
    SourceConfig,
    StagingConfig,
    StrictModel,
    format_validation_error,
    yaml_error,
)
from deployments import (
    ENGINE_KINDS,
    VLLM_LORA_RANKS,
    Autoscaling,
    LlamaCppModel,
    LlamaCppOptions,
    MLXModel,
    MLXOptions,
    ModelConfig,
    OpenAIModel,
    OpenAIOptions,
    ServeHTTP,
    VLLMModel,
    VLLMOptions,
)
from evaluators import SCORER_NAMES, JudgeConfig, ProbesConfig, ScorerName
from evaluators.sinks import InfluxConfig, SinksConfig

# The sections each package owns, composed here into the app's config (and importable from here).
__all__ = [
    "DEFAULT_CONFIG", "ENGINE_KINDS", "SCORER_NAMES", "VLLM_LORA_RANKS",
    "AdapterMetaRule", "AppConfig", "Autoscaling", "BudgetsConfig", "ClusterConfig", "ConfigError",
    "InfluxConfig", "JudgeConfig", "LlamaCppModel", "LlamaCppOptions", "MLXModel", "MLXOptions",
    "ModelConfig", "NodeKind", "OpenAIModel", "OpenAIOptions", "ProbesConfig", "ScorerName", "ServeHTTP",
    "SinksConfig", "SourceConfig", "StagingConfig", "VLLMModel", "VLLMOptions",
    "default_config_exists", "format_validation_error", "interpolate", "ledger_exists", "load_config", "open_ledger",
    "parse_config",
]

DEFAULT_CONFIG = "ray_config.yaml"


# --------------------------------------------------------------------------- cluster


class NodeKind(StrictModel):
    """A kind of node and the Ray resources it declares (e.g. `{mlx: 1}` on Apple Silicon)."""

    resources: dict[str, float] = Field(default_factory=dict)
    num_gpus: float = 0


class ClusterConfig(StrictModel):
    """Where Ray runs. `address: local` starts (and owns) a loopback-only cluster."""

    address: str = "local"
    num_cpus: int | None = Field(None, ge=1)
    dashboard: bool = True
    dashboard_port: int = Field(8265, ge=1, le=65535)
    metrics_export_port: int | None = Field(None, ge=1, le=65535)
    temp_dir: Path | None = None
    node_kinds: dict[str, NodeKind] = Field(default_factory=dict)
    local_node_kind: str | None = None
    # The state node holds the ledger and spool and runs the actors that own state (the result
    # writer, the adapter registry, the budgets, the coordinator). None: the head node. Else a Ray
    # resource that exactly one node declares (e.g. `evalcluster_state: 1` in its --resources).
    state_resource: str | None = None
    serve: ServeHTTP = Field(default_factory=ServeHTTP)

    @model_validator(mode="after")
    def _kind_exists(self) -> "ClusterConfig":
        if self.local_node_kind and self.local_node_kind not in self.node_kinds:
            raise ValueError(f"local_node_kind {self.local_node_kind!r} is not one of node_kinds")
        return self


class BudgetsConfig(StrictModel):
    """Concurrency budgets, shared by every job on the cluster."""

    per_endpoint: int = Field(16, ge=1)
    """The most generation requests a job has in flight per model endpoint."""
    adaptive: bool = True
    """Find the count within per_endpoint from the engine's throughput (`evaluators.AdaptiveLimit`,
    starting at the engine's slots); false: always per_endpoint."""
    judge: int = Field(2, ge=1)
    checkpoints: int = Field(2, ge=1)


class AppConfig(StrictModel):
    """The whole of ray_config.yaml."""

    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    models: list[ModelConfig] = Field(min_length=1)
    sources: list[SourceConfig] = Field(default_factory=list)
    staging: StagingConfig = Field(default_factory=StagingConfig)
    probes: ProbesConfig = Field(default_factory=ProbesConfig)
    scorers: list[ScorerName] = Field(
        default_factory=lambda: ["heuristic", "exact", "capability"]
    )
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    budgets: BudgetsConfig = Field(default_factory=BudgetsConfig)
    sinks: SinksConfig = Field(default_factory=SinksConfig)
    poll_interval_s: float = Field(30, gt=0)
    max_attempts: int = Field(3, ge=1)
    # How long evaluations wait for a model whose engine is down (no attempt counted meanwhile);
    # past it, failures count towards quarantine again (so a `--once` run always ends).
    engine_wait_s: float = Field(600, gt=0)
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

    def model(self, name: str) -> ModelConfig:
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

    def absolute_dump(self) -> dict[str, object]:
        """The config as plain data with every path made absolute (for running it elsewhere)."""
        copy = self.model_copy(deep=True)
        _absolute_paths(copy, self.source_path.parent if self.source_path else Path.cwd())
        return copy.model_dump(mode="json", exclude_none=True)

    def base_paths(self) -> dict[str, Path]:
        """Source name -> the local weights of the model its checkpoints adapt (for shape checks).
        Sources whose model has no local path (an OpenAI-compatible endpoint) are left out."""
        out = {}
        for sc in self.sources:
            path = getattr(self.model(sc.model), "path", None)
            if path is not None:
                out[sc.name] = self.resolve(path)
        return out

    def resolve(self, p: Path | str) -> Path:
        """A path named in the config outside its Path fields (a probe set file), made absolute
        against the config file's directory. (Path fields are made absolute when the file is loaded.)"""
        p = Path(p).expanduser()
        if p.is_absolute() or self.source_path is None:
            return p
        return (self.source_path.parent / p).resolve()


def open_ledger(cfg: AppConfig, readonly: bool = False, create: bool = True) -> Ledger:
    """The ledger at `sinks.ledger`, with the config's max_attempts and retry_backoff_s.

    Args:
        cfg: the app config.
        readonly: open as a reader (the watch job may be writing); implies create=False.
        create: create the file if there is none; else a missing file is a FileNotFoundError that
            says how it comes to be (see `ledger_exists`).
    """
    path = cfg.resolve(cfg.sinks.ledger)
    if (readonly or not create) and not path.exists():
        raise FileNotFoundError(f"no ledger at {path} yet (nothing has been evaluated with this config): "
                                "run `evalcluster watch` or `evalcluster eval` first")
    return Ledger(path, max_attempts=cfg.max_attempts, backoff_s=cfg.retry_backoff_s, readonly=readonly)


def ledger_exists(cfg: AppConfig) -> bool:
    """Whether the config's ledger has been created (by a watch or eval run)."""
    return cfg.resolve(cfg.sinks.ledger).exists()


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


def parse_config(data: dict[str, Any], where: str = "config", source_path: Path | None = None) -> AppConfig:
    """Validate an already-parsed mapping."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping, got {type(data).__name__}")
    try:
        cfg = AppConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, where, ENGINE_KINDS)) from None
    cfg._source_path = source_path
    if source_path is not None:
        _absolute_paths(cfg, source_path.parent)
    return cfg


def _absolute_paths(section: BaseModel, base: Path) -> None:
    """Make every path of a validated config absolute against `base` (the config file's directory),
    in place, so each package's section carries paths usable from any process and directory."""

    def fix(v: object) -> object:
        if isinstance(v, Path):
            v = v.expanduser()
            return v if v.is_absolute() else (base / v).resolve()
        if isinstance(v, BaseModel):
            _absolute_paths(v, base)
        elif isinstance(v, list):
            return [fix(x) for x in v]
        elif isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        return v

    for name in type(section).model_fields:
        value = getattr(section, name)
        fixed = fix(value)
        if fixed is not value:
            setattr(section, name, fixed)


def default_config_exists() -> bool:
    """Whether `load_config(None)` has a file to read ($EVALCLUSTER_CONFIG or ./ray_config.yaml)."""
    return bool(os.environ.get("EVALCLUSTER_CONFIG")) or Path(DEFAULT_CONFIG).exists()


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
        raise ConfigError(yaml_error(where, e)) from None
    data = interpolate(data if data is not None else {}, env, where)
    return parse_config(data, where, path.resolve())

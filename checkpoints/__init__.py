"""Checkpoints: sources (local, SSH), layouts and discovery, the ledger, staging, adapter formats.

    source = source_from_config(cfg.source("m3"), cfg.resolve)
    poller = Poller(source, spec_from_config(cfg.source("m3")))
    new = (await poller.poll()).new            # complete checkpoints, sha256 set
    ledger.upsert_many(new)
    staged = await Stager(cache_dir, max_bytes).stage(source, ckpt)
    adapter = prepare_adapter(staged.path, "llamacpp", base_gguf, out_dir)
"""

from checkpoints._basemodel import BaseShapes, base_shapes
from checkpoints._convert import ENGINE_FORMATS, convert, detect_adapter, load_adapter, prepare_adapter, write_adapter
from checkpoints._discovery import DiscoveryReport, Pending, Poller, PollResult, discover_once
from checkpoints._layouts import (
    CONFIG_NAME,
    LayoutSpec,
    MetaRule,
    adapter_meta,
    checkpoints_from_listing,
    layout_spec,
    spec_from_config,
)
from checkpoints._fromconfig import base_models_from_config, ledger_from_config, pollers_from_config, stager_from_config
from checkpoints._gguf import permute_rows, write_gguf
from checkpoints._ledger import Ledger, LedgerError
from checkpoints._lora import MLX_WEIGHTS, PEFT_WEIGHTS, LoraAdapter, LoraPair, read_mlx, read_peft, validate, write_mlx, write_peft
from checkpoints._records import (
    DISCOVERED,
    EVALUATING,
    FAILED,
    QUARANTINED,
    SCORED,
    STAGED,
    STATES,
    Checkpoint,
    FileEntry,
    LedgerEntry,
    Listing,
    checkpoint_id,
)
from checkpoints._safetensors import Tensor, TensorInfo, read_header, read_tensors, write_safetensors
from checkpoints._sources import (
    HostKeyError,
    LocalSource,
    Source,
    SourceError,
    SourceUnavailable,
    SSHSource,
    sha256_file,
    source_from_config,
)
from checkpoints._staging import ChecksumMismatch, StagedCheckpoint, Stager, StageReport, stage_pending, validate_staged

__all__ = [
    "CONFIG_NAME",
    "DISCOVERED",
    "ENGINE_FORMATS",
    "EVALUATING",
    "FAILED",
    "MLX_WEIGHTS",
    "PEFT_WEIGHTS",
    "QUARANTINED",
    "SCORED",
    "STAGED",
    "STATES",
    "BaseShapes",
    "Checkpoint",
    "ChecksumMismatch",
    "DiscoveryReport",
    "FileEntry",
    "HostKeyError",
    "LayoutSpec",
    "Ledger",
    "LedgerEntry",
    "LedgerError",
    "Listing",
    "LocalSource",
    "LoraAdapter",
    "LoraPair",
    "MetaRule",
    "Pending",
    "PollResult",
    "Poller",
    "SSHSource",
    "Source",
    "SourceError",
    "SourceUnavailable",
    "StageReport",
    "StagedCheckpoint",
    "Stager",
    "Tensor",
    "TensorInfo",
    "adapter_meta",
    "base_models_from_config",
    "base_shapes",
    "checkpoint_id",
    "checkpoints_from_listing",
    "convert",
    "detect_adapter",
    "discover_once",
    "layout_spec",
    "ledger_from_config",
    "load_adapter",
    "permute_rows",
    "pollers_from_config",
    "prepare_adapter",
    "read_header",
    "read_mlx",
    "read_peft",
    "read_tensors",
    "sha256_file",
    "source_from_config",
    "spec_from_config",
    "stage_pending",
    "stager_from_config",
    "validate",
    "validate_staged",
    "write_adapter",
    "write_gguf",
    "write_mlx",
    "write_peft",
    "write_safetensors",
]

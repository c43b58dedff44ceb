"""Checkpoints: sources (local, SSH), layouts and discovery, the ledger, staging, adapter formats.

    source = source_from_config(cfg.source("m3"), cfg.resolve)
    poller = Poller(source, spec_from_config(cfg.source("m3")))
    new = (await poller.poll()).new            # complete checkpoints, sha256 set
    ledger.upsert_many(new)
    staged = await Stager(cache_dir, max_bytes).stage(source, ckpt)
    adapter = prepare_adapter(staged.path, "llamacpp", base_gguf, out_dir)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> the private module that defines it. Resolved on first use, so a command
# imports only what it needs (an engine's libraries, asyncssh, ...).
_EXPORTS = {
    "BaseShapes": "checkpoints._basemodel",
    "base_shapes": "checkpoints._basemodel",
    "ENGINE_FORMATS": "checkpoints._convert",
    "convert": "checkpoints._convert",
    "detect_adapter": "checkpoints._convert",
    "load_adapter": "checkpoints._convert",
    "prepare_adapter": "checkpoints._convert",
    "write_adapter": "checkpoints._convert",
    "DiscoveryReport": "checkpoints._discovery",
    "Pending": "checkpoints._discovery",
    "PollResult": "checkpoints._discovery",
    "Poller": "checkpoints._discovery",
    "discover_once": "checkpoints._discovery",
    "base_models_from_config": "checkpoints._fromconfig",
    "ledger_from_config": "checkpoints._fromconfig",
    "pollers_from_config": "checkpoints._fromconfig",
    "stager_from_config": "checkpoints._fromconfig",
    "permute_rows": "checkpoints._gguf",
    "write_gguf": "checkpoints._gguf",
    "CONFIG_NAME": "checkpoints._layouts",
    "LayoutSpec": "checkpoints._layouts",
    "MetaRule": "checkpoints._layouts",
    "adapter_meta": "checkpoints._layouts",
    "checkpoints_from_listing": "checkpoints._layouts",
    "layout_spec": "checkpoints._layouts",
    "spec_from_config": "checkpoints._layouts",
    "Ledger": "checkpoints._ledger",
    "LedgerError": "checkpoints._ledger",
    "LoraAdapter": "checkpoints._lora",
    "LoraPair": "checkpoints._lora",
    "MLX_WEIGHTS": "checkpoints._lora",
    "PEFT_WEIGHTS": "checkpoints._lora",
    "read_mlx": "checkpoints._lora",
    "read_peft": "checkpoints._lora",
    "validate": "checkpoints._lora",
    "write_mlx": "checkpoints._lora",
    "write_peft": "checkpoints._lora",
    "Checkpoint": "checkpoints._records",
    "DISCOVERED": "checkpoints._records",
    "EVALUATING": "checkpoints._records",
    "FAILED": "checkpoints._records",
    "FileEntry": "checkpoints._records",
    "LedgerEntry": "checkpoints._records",
    "Listing": "checkpoints._records",
    "QUARANTINED": "checkpoints._records",
    "SCORED": "checkpoints._records",
    "STAGED": "checkpoints._records",
    "STATES": "checkpoints._records",
    "checkpoint_id": "checkpoints._records",
    "Tensor": "checkpoints._safetensors",
    "TensorInfo": "checkpoints._safetensors",
    "read_header": "checkpoints._safetensors",
    "read_tensors": "checkpoints._safetensors",
    "write_safetensors": "checkpoints._safetensors",
    "HostKeyError": "checkpoints._sources",
    "LocalSource": "checkpoints._sources",
    "SSHSource": "checkpoints._sources",
    "Source": "checkpoints._sources",
    "SourceError": "checkpoints._sources",
    "SourceUnavailable": "checkpoints._sources",
    "sha256_file": "checkpoints._sources",
    "source_from_config": "checkpoints._sources",
    "ChecksumMismatch": "checkpoints._staging",
    "StageReport": "checkpoints._staging",
    "StagedCheckpoint": "checkpoints._staging",
    "Stager": "checkpoints._staging",
    "stage_pending": "checkpoints._staging",
    "validate_staged": "checkpoints._staging",
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
    from checkpoints._basemodel import BaseShapes, base_shapes  # noqa: F401
    from checkpoints._convert import ENGINE_FORMATS, convert, detect_adapter, load_adapter, prepare_adapter, write_adapter  # noqa: F401
    from checkpoints._discovery import DiscoveryReport, Pending, PollResult, Poller, discover_once  # noqa: F401
    from checkpoints._fromconfig import base_models_from_config, ledger_from_config, pollers_from_config, stager_from_config  # noqa: F401
    from checkpoints._gguf import permute_rows, write_gguf  # noqa: F401
    from checkpoints._layouts import CONFIG_NAME, LayoutSpec, MetaRule, adapter_meta, checkpoints_from_listing, layout_spec, spec_from_config  # noqa: F401
    from checkpoints._ledger import Ledger, LedgerError  # noqa: F401
    from checkpoints._lora import LoraAdapter, LoraPair, MLX_WEIGHTS, PEFT_WEIGHTS, read_mlx, read_peft, validate, write_mlx, write_peft  # noqa: F401
    from checkpoints._records import Checkpoint, DISCOVERED, EVALUATING, FAILED, FileEntry, LedgerEntry, Listing, QUARANTINED, SCORED, STAGED, STATES, checkpoint_id  # noqa: F401
    from checkpoints._safetensors import Tensor, TensorInfo, read_header, read_tensors, write_safetensors  # noqa: F401
    from checkpoints._sources import HostKeyError, LocalSource, SSHSource, Source, SourceError, SourceUnavailable, sha256_file, source_from_config  # noqa: F401
    from checkpoints._staging import ChecksumMismatch, StageReport, StagedCheckpoint, Stager, stage_pending, validate_staged  # noqa: F401

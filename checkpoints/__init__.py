"""Checkpoints: sources (local, SSH), layouts and discovery, the ledger, staging, adapter formats.

    source = source_from_config(cfg.source("m3"))
    poller = Poller(source, spec_from_config(cfg.source("m3")))
    new = (await poller.poll()).new            # complete checkpoints, sha256 set
    ledger.upsert_many(new)
    staged = await Stager(cache_dir, max_bytes).stage(source, ckpt)
    adapter = prepare_adapter(staged.path, "llamacpp", base_gguf, out_dir)
"""

from __future__ import annotations

from checkpoints._exports import lazy_exports

# Each public name once, under the private module that defines it (imported on first use).
__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "_basemodel": ("BaseShapes", "GGUF_MAGIC", "base_shapes", "is_gguf_file"),
    "_config": ("NAME_PATTERN", "AdapterMetaRule", "SourceConfig", "StagingConfig"),
    "_configbase": ("ConfigError", "StrictModel", "format_validation_error", "split_url_credentials", "yaml_error"),
    "_convert": (
        "ENGINE_FORMATS", "convert", "detect_adapter", "is_native_adapter", "load_adapter", "native_adapter_dir",
        "prepare_adapter", "write_adapter",
    ),
    "_discovery": ("DiscoveryReport", "Pending", "PollResult", "Poller", "discover_once"),
    "_errors": ("AdapterError", "StagingDeferred"),
    "_exports": ("lazy_exports",),
    "_files": ("sha256_file", "sha256_tree", "fsync_dir", "fsync_file", "replacing"),
    "_fromconfig": ("pollers_from_config", "stager_from_config"),
    "_gguf": ("GGUFModel", "permute_rows", "read_gguf_model", "validate_gguf_lora", "write_gguf"),
    "_layouts": (
        "CONFIG_NAME", "LayoutSpec", "MetaRule", "adapter_meta", "checkpoints_from_listing", "layout_spec",
        "spec_from_config",
    ),
    "_ledger": ("Ledger", "LedgerError", "LedgerLocked", "LedgerNotReady", "one_line"),
    "_lora": (
        "LoraAdapter", "LoraPair", "MLX_WEIGHTS", "PEFT_WEIGHTS", "read_mlx", "read_peft", "validate",
        "write_mlx", "write_peft",
    ),
    "_records": (
        "Checkpoint", "DISCOVERED", "EVALUATING", "FAILED", "FileEntry", "LedgerEntry", "Listing",
        "QUARANTINED", "SCORED", "STAGED", "STATES", "checkpoint_id",
    ),
    "_safetensors": ("Tensor", "TensorInfo", "read_header", "read_tensors", "write_safetensors"),
    "_sources": (
        "HostKeyError", "LocalSource", "SSHSource", "Source", "SourceError", "SourceFileChanged", "SourceUnavailable",
        "source_from_config",
    ),
    "_staging": (
        "ChecksumMismatch", "StageReport", "StagedCheckpoint", "Stager", "stage_pending", "validate_staged",
    ),
})

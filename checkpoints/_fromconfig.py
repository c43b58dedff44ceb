"""The checkpoints objects a config describes: ledger, sources with their pollers, stager, bases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from checkpoints._discovery import Poller
from checkpoints._layouts import spec_from_config
from checkpoints._ledger import Ledger
from checkpoints._sources import source_from_config
from checkpoints._staging import Stager


def ledger_from_config(cfg: Any, readonly: bool = False) -> Ledger:
    """The ledger at `sinks.ledger`, with the config's max_attempts and retry_backoff_s.

    Args:
        cfg: the AppConfig.
        readonly: open as a reader (another process writes).
    """
    return Ledger(cfg.resolve(cfg.sinks.ledger), max_attempts=cfg.max_attempts, backoff_s=cfg.retry_backoff_s,
                  readonly=readonly)


def pollers_from_config(cfg: Any, ledger: Ledger | None = None, names: list[str] | None = None) -> list[Poller]:
    """One Poller per configured source (its own connection, its layout).

    Args:
        cfg: the AppConfig.
        ledger: lets pollers reuse digests recorded before a restart.
        names: only these sources (default: all).
    """
    scs = [cfg.source(n) for n in names] if names else list(cfg.sources)
    return [Poller(source_from_config(sc, cfg.resolve), spec_from_config(sc), ledger) for sc in scs]


def stager_from_config(cfg: Any) -> Stager:
    """The node-local Stager at `staging.cache_dir` with its size bound and retries.

    Args:
        cfg: the AppConfig.
    """
    st = cfg.staging
    return Stager(cfg.resolve(st.cache_dir), st.max_bytes, retries=st.retries)


def base_models_from_config(cfg: Any) -> dict[str, Path]:
    """Source name -> the local path of the model its checkpoints adapt (for shape validation).

    Sources whose model has no local path (an OpenAI-compatible endpoint) are left out.

    Args:
        cfg: the AppConfig.
    """
    out = {}
    for sc in cfg.sources:
        model = cfg.model(sc.model)
        path = getattr(model, "path", None)
        if path is not None:
            out[sc.name] = cfg.resolve(path)
    return out

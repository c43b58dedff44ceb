"""Staging: bring a checkpoint into a node-local cache, verified, validated, bounded in size.

Each checkpoint is downloaded into a temp directory in the cache (adapter file + its
adapter_config.json), fsync'd, its sha256 checked against the discovered one, its safetensors
header and shapes validated, and only then renamed into place as `<cache>/<sha256>-<config
sha256>/` (atomic: a reader sees a whole entry or none; both digests name it, so the same weights
staged with another config are another entry). Transient failures are retried with backoff; a corrupt
file or a misfit is a permanent failure (AdapterError) and never enters the cache. The cache is
bounded by size: least recently used entries go first.

`stage_pending` drives this from the ledger: every due checkpoint is staged on its own, so a
corrupt one is quarantined while the others of the same run go on to `staged`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from checkpoints._basemodel import base_shapes
from checkpoints._errors import AdapterError, StagingDeferred
from checkpoints._files import fsync_dir, fsync_file, sha256_file
from checkpoints._layouts import CONFIG_NAME
from checkpoints._lora import MAX_CONFIG_BYTES, MLX_WEIGHTS, PEFT_WEIGHTS, read_mlx, read_peft, validate
from checkpoints._records import DISCOVERED, Checkpoint
from checkpoints._safetensors import read_header
from checkpoints._sources import HostKeyError, Source, SourceError, SourceFileChanged

log = logging.getLogger(__name__)

MANIFEST = "staged.json"
_TMP_PREFIX = ".tmp-"


class ChecksumMismatch(SourceFileChanged):
    """The bytes on the source are no longer the discovered ones: that version is gone (permanent)."""


@dataclass(frozen=True)
class StagedCheckpoint:
    """A checkpoint in the local cache.

    Args:
        checkpoint: what was staged (sha256 set).
        path: the cache entry directory (adapter file + adapter_config.json + staged.json).
        adapter_file: the adapter weights inside it.
        sha256: the verified digest.
        size: bytes of the adapter file.
        cached: True when it was already in the cache (nothing downloaded).
    """

    checkpoint: Checkpoint
    path: Path
    adapter_file: Path
    sha256: str
    size: int
    cached: bool = False


def _tree_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except FileNotFoundError:
                pass
    return total


async def _maybe_await(value: Any) -> Any:
    """The ledger may be a Ledger (sync) or a client of the cluster's writer (async)."""
    return await value if inspect.isawaitable(value) else value


def validate_staged(directory: str | Path, base_model_path: str | Path | None = None) -> None:
    """Check a staged adapter: sane safetensors, a readable config, and (with a base) shapes.

    Args:
        directory: the staged directory.
        base_model_path: the base model to fit (HF directory or GGUF), or None for format only.
    """
    d = Path(directory)
    if (d / PEFT_WEIGHTS).exists():
        read_header(d / PEFT_WEIGHTS)
        adapter = read_peft(d)
    else:
        read_header(d / MLX_WEIGHTS)
        adapter = read_mlx(d / MLX_WEIGHTS, d / CONFIG_NAME)
    if base_model_path is not None:
        validate(adapter, base_shapes(base_model_path))


class Stager:
    """A node-local cache of staged checkpoints, bounded by size (LRU).

    Args:
        cache_dir: the cache directory (created).
        max_bytes: the size bound; least recently used entries are removed beyond it.
        retries: extra attempts for a transient failure (network, I/O).
        retry_delay_s: the first retry delay; doubles with each attempt.
    """

    def __init__(self, cache_dir: str | Path, max_bytes: int, retries: int = 3, retry_delay_s: float = 0.5) -> None:
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.retries = retries
        self.retry_delay_s = retry_delay_s
        self.downloads = 0
        self._clean_stale_temps()

    def __repr__(self) -> str:
        return f"Stager({str(self.cache_dir)!r}, max_bytes={self.max_bytes})"

    def _clean_stale_temps(self, older_than_s: float = 3600) -> None:
        now = time.time()
        for p in self.cache_dir.glob(_TMP_PREFIX + "*"):
            try:
                if now - p.stat().st_mtime > older_than_s:
                    shutil.rmtree(p, ignore_errors=True)
            except FileNotFoundError:
                pass

    def entry(self, sha256: str, config_sha256: str | None = None) -> Path:
        """The cache directory of an adapter file and the config staged with it.

        Both digests name it: the same weights with another config (another scale) are another
        adapter, and must not be served with the first one's config.

        Args:
            sha256: the adapter file's digest.
            config_sha256: its adapter_config.json's digest (None: staged without one).
        """
        return self.cache_dir / (f"{sha256}-{config_sha256}" if config_sha256 else sha256)

    def lookup(self, entry: str | Path, checkpoint: Checkpoint) -> StagedCheckpoint | None:
        """A cache entry (a directory `entry()` named, e.g. the ledger's local_path), marked as just
        used; None if it is not (or no longer) in the cache.

        Args:
            entry: the entry's directory.
            checkpoint: the checkpoint it holds.
        """
        d = Path(entry)
        if d.parent != self.cache_dir:
            return None
        try:
            m = json.loads((d / MANIFEST).read_text())
            os.utime(d)  # LRU: a hit counts as a use
        except (OSError, ValueError):
            return None
        return StagedCheckpoint(checkpoint, d, d / m["file"], m["sha256"], m["size"], cached=True)

    async def stage(self, source: Source, checkpoint: Checkpoint, base_model_path: str | Path | None = None) -> StagedCheckpoint:
        """Download, verify, validate and cache one checkpoint (a cache hit downloads only its config).

        Args:
            source: where the checkpoint lives.
            checkpoint: what to stage (sha256 from discovery is verified when set).
            base_model_path: the base model to validate shapes against (None: format only).

        Raises:
            AdapterError: corrupt file or misfit (permanent).
            ChecksumMismatch: the file changed since discovery (permanent for this version).
            SourceFileChanged: the path no longer holds a regular file (permanent for this version).
            SourceError: the source failed after every retry (transient).
        """
        name = PEFT_WEIGHTS if checkpoint.layout == "peft" else MLX_WEIGHTS
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            tmp = self.cache_dir / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
            tmp.mkdir()
            try:
                config_digest = await self._fetch_config(source, checkpoint, tmp)
                hit = self.lookup(self.entry(checkpoint.sha256, config_digest), checkpoint) if checkpoint.sha256 else None
                if hit is not None:
                    if base_model_path is not None:
                        await asyncio.to_thread(validate_staged, hit.path, base_model_path)
                    return hit
                digest, size = await self._download(source, checkpoint, tmp, name)
                if checkpoint.sha256 and digest != checkpoint.sha256:
                    raise ChecksumMismatch(
                        f"{checkpoint.path}: the file changed since discovery (sha256 {checkpoint.sha256[:12]}… "
                        f"is now {digest[:12]}…); the new bytes are a new version and will be discovered as such"
                    )
                await asyncio.to_thread(validate_staged, tmp, base_model_path)
                return await asyncio.to_thread(self._commit, tmp, checkpoint, name, digest, config_digest, size)
            except AdapterError as e:
                # Name the file on the source, not the temp copy.
                where = checkpoint.config_path if Path(e.path).name == CONFIG_NAME and checkpoint.config_path else checkpoint.path
                raise AdapterError(where, e.why) from None
            except (HostKeyError, SourceFileChanged):
                raise
            except (SourceError, OSError) as e:
                last = e
                if attempt < self.retries:
                    await asyncio.sleep(self.retry_delay_s * 2 ** attempt)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        raise SourceError(f"staging {checkpoint.path} failed after {self.retries + 1} attempts: {last}")

    async def _fetch_config(self, source: Source, ck: Checkpoint, tmp: Path) -> str | None:
        """Download the checkpoint's adapter_config.json (if it has one) and return its digest."""
        if not ck.config_path:
            return None
        await source.fetch(ck.config_path, tmp / CONFIG_NAME, max_bytes=MAX_CONFIG_BYTES)
        return await asyncio.to_thread(sha256_file, tmp / CONFIG_NAME)

    async def _download(self, source: Source, ck: Checkpoint, tmp: Path, name: str) -> tuple[str, int]:
        self.downloads += 1
        await source.fetch(ck.path, tmp / name, max_bytes=ck.size)

        def finish() -> tuple[str, int]:
            for p in tmp.iterdir():
                fsync_file(p)
            return sha256_file(tmp / name), (tmp / name).stat().st_size

        return await asyncio.to_thread(finish)

    def _commit(self, tmp: Path, ck: Checkpoint, name: str, digest: str, config_digest: str | None,
                size: int) -> StagedCheckpoint:
        ck = ck.with_sha256(digest)
        manifest = {"checkpoint": asdict(ck), "id": ck.id, "file": name, "sha256": digest,
                    "config_sha256": config_digest, "size": size, "staged_at": time.time()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        fsync_file(tmp / MANIFEST)
        fsync_dir(tmp)
        final = self.entry(digest, config_digest)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MANIFEST).exists():
                raise
            os.utime(final)  # the same bytes were staged meanwhile: keep that entry
        fsync_dir(self.cache_dir)
        self.evict(keep={final})
        return StagedCheckpoint(ck, final, final / name, digest, size)

    def usage(self) -> int:
        """Bytes in the cache (entries only)."""
        return sum(_tree_size(p) for p in self.cache_dir.iterdir() if p.is_dir() and not p.name.startswith(_TMP_PREFIX))

    def evict(self, keep: set[Path] | frozenset[Path] = frozenset()) -> list[Path]:
        """Remove least recently used entries until the cache fits max_bytes. Returns what went.

        Args:
            keep: entries never to remove now (e.g. the one just staged, ones in use).
        """
        entries = []
        for p in self.cache_dir.iterdir():
            if p.is_dir() and not p.name.startswith(_TMP_PREFIX):
                try:
                    entries.append((p.stat().st_mtime, p, _tree_size(p)))
                except FileNotFoundError:
                    continue
        total = sum(s for _, _, s in entries)
        removed = []
        for _, p, s in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if p in keep:
                continue
            shutil.rmtree(p, ignore_errors=True)
            total -= s
            removed.append(p)
        if total > self.max_bytes:
            log.warning("staging cache %s holds %d bytes > max %d (entries in use)", self.cache_dir, total, self.max_bytes)
        return removed


@dataclass
class StageReport:
    """What one `stage_pending` pass did, by checkpoint id."""

    staged: list[StagedCheckpoint] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    quarantined: dict[str, str] = field(default_factory=dict)


async def stage_pending(
    ledger: Any,
    stager: Stager,
    sources: Mapping[str, Source],
    base_models: Mapping[str, str | Path] | None = None,
    *,
    concurrency: int = 2,
    limit: int | None = None,
    now: float | None = None,
    only: str | None = None,
    prepare: Callable[[StagedCheckpoint], Awaitable[None]] | None = None,
) -> StageReport:
    """Stage every checkpoint the ledger has due for staging, each on its own.

    A corrupt or misfit adapter (AdapterError), a vanished version (SourceFileChanged, e.g.
    ChecksumMismatch) or any other error reading this checkpoint's files is quarantined at once with
    its reason; a failing source (SourceError, OSError) or a prepare step deferred for a reason not
    the checkpoint's own (StagingDeferred) is recorded for a backed-off retry. None of them stops
    the rest.

    Args:
        ledger: the Ledger.
        stager: the Stager.
        sources: source name -> Source.
        base_models: source name -> base model path to validate shapes against (None: format only).
        concurrency: downloads at once.
        limit: at most this many checkpoints.
        now: the time for the ledger's due() (default now).
        only: stage only this source's checkpoints (a per-source watcher); None: all of them,
            and a checkpoint whose source is not in `sources` is a failure.
        prepare: run on each staged checkpoint before it is marked staged (the watcher converts it
            for its engine and registers it), so whoever takes staged checkpoints from the ledger
            finds each one ready to serve. What it raises quarantines the checkpoint with the reason,
            but StagingDeferred, which is retried.
    """
    report = StageReport()
    sem = asyncio.Semaphore(concurrency)

    async def one(entry: Any) -> None:
        ck: Checkpoint = entry.checkpoint
        source = sources.get(ck.source)
        async with sem:
            try:
                if source is None:
                    raise SourceError(f"no source named {ck.source!r} is configured")
                base = (base_models or {}).get(ck.source)
                staged = await stager.stage(source, ck, base)
                if prepare is not None:
                    await prepare(staged)
            except (AdapterError, SourceFileChanged) as e:
                await _maybe_await(ledger.record_failure(ck.id, str(e), permanent=True))
                report.quarantined[ck.id] = str(e)
                return
            except (SourceError, OSError, StagingDeferred) as e:
                e2 = await _maybe_await(ledger.record_failure(ck.id, str(e)))
                (report.quarantined if e2.state == "quarantined" else report.failed)[ck.id] = str(e)
                return
            except Exception as e:  # noqa: BLE001 - whatever a hostile file makes a reader raise
                # It is this checkpoint's input (an adapter nothing above foresaw): quarantine it
                # with the reason, and go on with the others; the watcher must never stop for one.
                why = f"{ck.path}: cannot be staged: {type(e).__name__}: {e}"
                log.warning("%s", why, exc_info=e)
                await _maybe_await(ledger.record_failure(ck.id, why, permanent=True))
                report.quarantined[ck.id] = why
                return
            await _maybe_await(ledger.mark_staged(ck.id, staged.path, sha256=staged.sha256))
            report.staged.append(staged)

    due = await _maybe_await(ledger.due(DISCOVERED, now=now, limit=limit))
    await asyncio.gather(*(one(e) for e in due if only is None or e.checkpoint.source == only))
    return report

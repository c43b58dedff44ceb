"""What an evaluation is run on (EvalTarget), what each sample records (SampleResult), and where
samples are kept for resume (the SampleStore protocol and a JSONL file store).

A sample's key is derived from everything that decides its result: the target, the probe set's
hash, the probe, the repeat, the sampling options and the scorer versions. A resumed run skips
the keys its store already has; change any of those and the sample is new.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Protocol, runtime_checkable

from checkpoints import sha256_tree

if TYPE_CHECKING:
    from checkpoints import Checkpoint


@dataclass(frozen=True)
class EvalTarget:
    """A model, or a checkpoint of one, to evaluate; its samples carry its label, iteration and run
    id, and its InfluxDB points are named from it (see `evaluators.results.target_naming`)."""

    id: str
    """"base:<model>" for a base model, or the checkpoint's id."""
    model: str
    """The config model name that serves it."""
    adapter: str | None = None
    """The engine-native adapter path (None for the base model)."""
    adapter_sha256: str | None = None
    """The adapter file's sha256, for provenance."""
    label: str = ""
    """A display label (e.g. "G27 @0001000")."""
    iteration: int | None = None
    """The training iteration of the checkpoint."""
    run_id: str | None = None
    """The training run it belongs to."""
    model_tag: str | None = None
    """go-ml's model tag in its InfluxDB points (a checkpoint's `model_tag`); None: `model`."""

    @classmethod
    def base(cls, model: str) -> "EvalTarget":
        """The target for a base model without adapter.

        Args:
            model: the config model name.
        """
        return cls(id=f"base:{model}", model=model, label=model)

    @classmethod
    def of_checkpoint(cls, checkpoint: Checkpoint, model: str) -> "EvalTarget":
        """The target for a discovered checkpoint (its adapter is registered under its id).

        Args:
            checkpoint: the ledger's checkpoint.
            model: the config model of its source.
        """
        ck = checkpoint
        return cls(ck.id, model, adapter=ck.id, adapter_sha256=ck.sha256, label=ck.label, iteration=ck.iteration,
                   run_id=ck.run_id, model_tag=ck.model_tag)

    @classmethod
    def of_adapter_path(cls, model: str, path: Path) -> "EvalTarget":
        """The target for an adapter file or directory given by hand (`evalcluster eval --adapter`).

        Args:
            model: the config model that serves it.
            path: the adapter in the engine's format.
        """
        path = path.expanduser().resolve()
        if not path.exists():
            raise ValueError(f"adapter {path}: no such file or directory")
        sha = sha256_tree(path)
        return cls(f"adapter:{model}:{sha[:16]}", model, adapter=str(path), adapter_sha256=sha, label=path.name)

    def to_dict(self) -> dict[str, Any]:
        """As a plain mapping."""
        return asdict(self)


def sample_key(
    target_id: str,
    probe_set_hash: str,
    probe_id: str,
    repeat: int,
    sampling: Mapping[str, Any],
    scorer_versions: Mapping[str, str],
) -> str:
    """The stable key of one sample: "<probe id>#<repeat>@<digest>".

    Args:
        target_id: EvalTarget.id.
        probe_set_hash: ProbeSet.hash.
        probe_id: the probe.
        repeat: 0-based repeat index.
        sampling: the generation options that decide the answer (GenOpts.sampling_key()).
        scorer_versions: scorer name -> version stamp.
    """
    ident = {
        "target": target_id,
        "probe_set": probe_set_hash,
        "probe": probe_id,
        "repeat": repeat,
        "sampling": dict(sampling),
        "scorers": dict(scorer_versions),
    }
    text = json.dumps(ident, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return f"{probe_id}#{repeat}@{hashlib.sha256(text.encode()).hexdigest()[:24]}"


@dataclass
class SampleResult:
    """One answered (or failed) probe and its scores, with full provenance."""

    key: str
    """The sample's stable key (`sample_key`): what a resumed run skips."""
    target: str
    """EvalTarget.id."""
    probe_set: str
    """The probe set's name."""
    probe_set_hash: str
    """The probe set's content hash (ProbeSet.hash)."""
    probe_id: str
    """The probe."""
    domain: str
    """The probe's domain."""
    category: str
    """The probe's category."""
    repeat: int
    """0-based repeat index."""
    prompt: str
    """The probe's prompt."""
    messages: list[dict[str, str]]
    """The chat sent to the model ({"role", "content"} each)."""
    answer: str | None
    """The model's answer (None: it could not be generated)."""
    finish_reason: str | None
    """Why the engine ended the answer ("stop", "length", ...)."""
    usage: dict[str, int]
    """Token counts ({"prompt_tokens", "completion_tokens"}; empty without an answer)."""
    latency_s: float
    """Wall time of the generation that gave the answer."""
    scores: dict[str, dict[str, Any]]
    """Scorer name -> its fields."""
    failures: dict[str, dict[str, Any]]
    """Scorer name (or "generate") -> {"error", "raw", ...}."""
    provenance: dict[str, Any]
    """Target, model, engine, adapter sha256, probe-set hash, sampling, scorer versions, judge."""
    judge_attempts: dict[str, int] = field(default_factory=dict)
    """Judge scorer -> how many calls its verdict took."""
    judge_latency_s: float = 0.0
    """Wall time of judging this answer (0.0: not judged)."""
    complete: bool = True
    """False when no answer could be generated (a resumed run tries such samples again)."""
    label: str = ""
    """EvalTarget.label."""
    iteration: int | None = None
    """EvalTarget.iteration."""
    run_id: str | None = None
    """EvalTarget.run_id."""
    created_at: float = field(default_factory=time.time)
    """When the sample was made (Unix seconds); wallclock point timestamps derive from it."""

    def to_record(self) -> dict[str, Any]:
        """A JSON-able dict (what the ledger stores verbatim)."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "SampleResult":
        """Rebuild a SampleResult from `to_record()` output.

        Args:
            record: the dict.
        """
        names = set(cls.__dataclass_fields__)
        missing = [k for k in ("key", "target", "probe_id") if not record.get(k)]
        if missing:
            raise ValueError(f"sample record lacks {', '.join(missing)}")
        return cls(**{k: v for k, v in record.items() if k in names})


@runtime_checkable
class SampleStore(Protocol):
    """Where a run records samples and looks up what is already done (the checkpoints Ledger fits).

    The runner calls a synchronous `record_samples` from a worker thread (one call at a time per
    sample), so it must be thread-safe; an `async def record_samples` is awaited instead.
    """

    def sample_keys(self, target: str) -> set[str]:
        """Keys of the complete samples recorded for a target."""
        ...

    def record_samples(self, records: list[dict[str, Any]]) -> Any:
        """Store sample records (dicts from SampleResult.to_record())."""
        ...


class JsonlSampleStore:
    """A SampleStore in one JSONL file: one record per line, the last record of a key wins.

    Each record is written with a single write of a whole line and fsync'd, so a crash leaves at
    most an unterminated last line: loading counts it in `torn_lines` and ignores it, and the
    next write cuts it off (its sample was never recorded, so a resumed run redoes it).

    Args:
        path: the file (created with its directory on first write).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._records: dict[str, dict[str, Any]] = {}
        self.torn_lines = 0
        self._valid_size = 0
        self._load()

    def __repr__(self) -> str:
        return f"JsonlSampleStore({str(self.path)!r}, {len(self._records)} samples)"

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()  # after the last newline: b"" unless the last write was torn
        self._valid_size = len(data) - len(tail)
        if tail:
            self.torn_lines += 1
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{self.path}:{n}: not a JSON sample record: {e}") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("key"), str):
                raise ValueError(f"{self.path}:{n}: a sample record needs a string 'key'")
            self._records[rec["key"]] = rec

    def sample_keys(self, target: str) -> set[str]:
        """Keys of the complete samples recorded for a target.

        Args:
            target: EvalTarget.id.
        """
        with self._lock:
            return {k for k, r in self._records.items() if r.get("target") == target and r.get("complete", True)}

    def record_samples(self, records: list[dict[str, Any]]) -> int:
        """Append records; returns how many were written.

        Args:
            records: dicts with at least "key", "target" and "probe_id".
        """
        if not records:
            return 0
        lines = []
        for i, rec in enumerate(records):
            for f in ("key", "target", "probe_id"):
                if not isinstance(rec.get(f), str) or not rec.get(f):
                    raise ValueError(f"sample record {i}: field {f!r} must be a non-empty string")
            lines.append(json.dumps(rec, ensure_ascii=False, sort_keys=True))
        blob = ("\n".join(lines) + "\n").encode("utf-8")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                if self.torn_lines and os.fstat(fd).st_size > self._valid_size:
                    os.ftruncate(fd, self._valid_size)  # drop the torn line
                os.write(fd, blob)
                # On the descriptor written through: checkpoints.fsync_file reopens by path, which
                # costs ~25 µs more per sample (measured) on the runner's resume record.
                os.fsync(fd)
            finally:
                os.close(fd)
            self.torn_lines = 0
            self._valid_size += len(blob)
            for rec in records:
                self._records[rec["key"]] = json.loads(json.dumps(rec))
        return len(records)

    def samples(self, target: str | None = None) -> list[dict[str, Any]]:
        """The stored records (of one target, or all), in insertion order.

        Args:
            target: EvalTarget.id, or None for every target.
        """
        with self._lock:
            return [r for r in self._records.values() if target is None or r.get("target") == target]


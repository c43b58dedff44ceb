"""From sample records and their aggregates to InfluxDB points (the schema is evaluators.sinks).

Every point is derived from what the ledger recorded, so deriving it again gives the same point
(measurement, tags, timestamp): in iteration mode the timestamps come from the iteration, in
wallclock mode from the sample's recorded `created_at` (and a summary's from the target's last
sample), never from the time of the call.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Iterable, Mapping

from evaluators import aggregate
from evaluators.sinks import (
    PointContext,
    capability_judge,
    capability_scores,
    content_scores,
    eval_progress,
    exact_match,
    heuristic_score,
    judge_scores,
    probe_score,
    score_summary,
)

_NOT_JUDGE = {"heuristic", "exact", "capability"}


@dataclass(frozen=True)
class TargetInfo:
    """How a target is named in InfluxDB: go-ml's model tag, run id, label and iteration."""

    target: str
    model: str
    run_id: str
    label: str
    iteration: int

    def context(self, timestamps: str = "iteration", wall_ns: int | None = None) -> PointContext:
        """The PointContext of this target.

        Args:
            timestamps: "iteration" or "wallclock".
            wall_ns: the wall-clock time of the points in wallclock mode (default: now).
        """
        if wall_ns is None:
            return PointContext(self.model, self.run_id, self.label, self.iteration, timestamps=timestamps)
        return PointContext(self.model, self.run_id, self.label, self.iteration, timestamps=timestamps,
                            wall_ns=wall_ns)

    def to_dict(self) -> dict[str, Any]:
        """As a plain mapping (what the ledger stores)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TargetInfo":
        """Rebuild from `to_dict()` output.

        Args:
            d: the mapping.
        """
        missing = [k for k in ("target", "model", "run_id", "label", "iteration") if k not in d]
        if missing:
            raise ValueError(f"target info {dict(d)!r} lacks {', '.join(missing)}")
        return cls(str(d["target"]), str(d["model"]), str(d["run_id"]), str(d["label"]), int(d["iteration"]))


def base_info(target: str, model: str) -> TargetInfo:
    """A base model's naming (as the watch job's coordinator writes it).

    Args:
        target: "base:<model>".
        model: the config model name.
    """
    return TargetInfo(target, model, f"{model}-base", "base", 0)


def derive_info(target: str, records: list[Mapping[str, Any]], checkpoint: Any = None,
                source_model: str | None = None) -> TargetInfo:
    """A target's naming re-derived from the ledger, for targets recorded before their naming was noted.

    Args:
        target: the target id.
        records: its sample records.
        checkpoint: its ledger Checkpoint, if it is one.
        source_model: the config model of the checkpoint's source (used when it has no model tag).
    """
    if checkpoint is not None:
        return TargetInfo(target, checkpoint.model_tag or source_model or "", checkpoint.run_id, checkpoint.label,
                          int(checkpoint.iteration))
    first = records[0] if records else {}
    model = (first.get("provenance") or {}).get("model") or target.split(":")[1 if ":" in target else 0]
    if target.startswith("base:"):
        return base_info(target, model)
    return TargetInfo(target, model, first.get("run_id") or f"{model}-eval", first.get("label") or target,
                      int(first.get("iteration") or 0))


def record_wall_ns(record: Mapping[str, Any]) -> int:
    """The wall-clock time a sample was made, in ns (to the microsecond, so it is exact across JSON).

    Args:
        record: a SampleResult record.
    """
    t = record.get("created_at")
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise ValueError(f"sample {record.get('key')!r} has no created_at time ({t!r}); "
                         "wallclock timestamps are derived from it")
    return int(round(float(t) * 1_000_000)) * 1000


@lru_cache(maxsize=64)
def _probe_set_ids(probe_set: str, probe_set_hash: str) -> tuple[tuple[str, ...], frozenset[str]]:
    """The probe ids of a set in file order (go-ml's per-probe timestamp offsets depend on them),
    and the ids that have a capability pass rule."""
    from evaluators import load_probe_set

    ps = load_probe_set(probe_set)
    if ps.hash != probe_set_hash:
        raise ValueError(f"probe set {probe_set!r} changed since the sample was taken "
                         f"(hash {ps.hash[:12]} now, {probe_set_hash[:12]} in the sample)")
    return tuple(p.id for p in ps.probes), frozenset(p.id for p in ps.probes if p.pass_rule is not None)


def _probe_ids(probe_set: str, probe_set_hash: str) -> tuple[str, ...]:
    return _probe_set_ids(probe_set, probe_set_hash)[0]


def sample_points(record: Mapping[str, Any], info: TargetInfo, timestamps: str = "iteration") -> list[Any]:
    """The points of one sample: heuristic, exact, capability pass, judge verdicts.

    Args:
        record: a SampleResult record.
        info: the target's InfluxDB naming.
        timestamps: "iteration" (go-ml's deterministic timestamps) or "wallclock" (the sample's
            recorded `created_at`).
    """
    ctx = info.context(timestamps, record_wall_ns(record) if timestamps == "wallclock" else None)
    scores: Mapping[str, Mapping[str, Any]] = record.get("scores") or {}
    ps, probe, repeat = record["probe_set"], record["probe_id"], int(record.get("repeat", 0))
    points: list[Any] = []
    if "heuristic" in scores:
        h = dict(scores["heuristic"])
        lek = h.pop("lek_score")
        points.append(heuristic_score(ctx, ps, probe, h, lek, repeat))
    if "exact" in scores:
        e = scores["exact"]
        points.append(exact_match(ctx, ps, probe, bool(e.get("correct")), bool(e.get("extracted")), repeat))
    if "capability" in scores and repeat == 0:
        ids = _probe_ids(ps, record["probe_set_hash"])
        points.append(probe_score(ctx, probe, bool(scores["capability"]["passed"]), list(ids)))
    for scorer, dims in scores.items():
        if scorer in _NOT_JUDGE:
            continue
        numeric = {k: float(v) for k, v in dims.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if scorer == "capability_judge" and repeat == 0:
            ids = _probe_ids(ps, record["probe_set_hash"])
            points.append(capability_judge(ctx, probe, record.get("category") or "", numeric.get("reasoning", 0.0),
                                           numeric.get("correctness", 0.0), numeric.get("clarity", 0.0), list(ids)))
        elif scorer == "content" and repeat == 0:
            ids = _probe_ids(ps, record["probe_set_hash"])
            points.extend(content_scores(ctx, probe, numeric, list(ids)))
        points.extend(judge_scores(ctx, ps, probe, scorer, numeric, repeat=repeat))
    return points


def _capability_outcome(r: Mapping[str, Any]) -> bool | None:
    """Passed, failed, or not a capability sample. A generation that failed for good counts as a
    failed probe on a probe with a pass rule, as go-ml counted it."""
    if int(r.get("repeat", 0)) != 0:
        return None
    scores = r.get("scores") or {}
    if "capability" in scores:
        return bool(scores["capability"]["passed"])
    if r.get("complete", True) or "capability" not in ((r.get("provenance") or {}).get("scorer_versions") or {}):
        return None
    return False if r["probe_id"] in _probe_set_ids(r["probe_set"], r["probe_set_hash"])[1] else None


def summary_points(records: Iterable[Mapping[str, Any]], info: TargetInfo, timestamps: str = "iteration") -> list[Any]:
    """Per-target summaries: go-ml's capability_score (overall and per category), a score_summary
    per field (mean, n, failures), and the final progress point. No records, no points.

    Capability totals count every capability probe, passed or not, including one whose answer
    could not be generated (go-ml counted a generation error as a failed probe).

    Args:
        records: every sample record of the target.
        info: the target's InfluxDB naming.
        timestamps: as for `sample_points`; in wallclock mode the time is the target's last
            recorded sample.
    """
    records = list(records)
    if not records:
        return []
    wall = max(record_wall_ns(r) for r in records) if timestamps == "wallclock" else None
    ctx = info.context(timestamps, wall)
    points: list[Any] = []
    by_set: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        by_set.setdefault(r["probe_set"], []).append(r)
    failed = sum(1 for r in records if not r.get("complete", True))
    for ps, rs in sorted(by_set.items()):
        cats: dict[str, tuple[int, int]] = {}
        for r in rs:
            passed = _capability_outcome(r)
            if passed is None:
                continue
            cat = r.get("category") or "uncategorised"
            c, t = cats.get(cat, (0, 0))
            cats[cat] = (c + passed, t + 1)
        if cats:
            points.extend(capability_scores(ctx, cats))
        for group in aggregate(rs, by=("probe_set",)):
            for name, fs in group.fields.items():
                if fs.mean is None or "." not in name:
                    continue
                scorer, metric = name.split(".", 1)
                points.append(score_summary(ctx, ps, scorer, metric, fs.mean, fs.n, fs.failures))
    points.append(eval_progress(ctx, done=len(records), total=len(records), failed=failed))
    return points

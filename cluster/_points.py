"""From sample records and their aggregates to InfluxDB points (the schema is evaluators.sinks)."""

from __future__ import annotations

from dataclasses import dataclass
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

    def context(self, timestamps: str = "iteration") -> PointContext:
        return PointContext(self.model, self.run_id, self.label, self.iteration, timestamps=timestamps)


@lru_cache(maxsize=64)
def _probe_ids(probe_set: str, probe_set_hash: str) -> tuple[str, ...]:
    """The probe ids of a set in file order (go-ml's per-probe timestamp offsets depend on them)."""
    from evaluators import load_probe_set

    ps = load_probe_set(probe_set)
    if ps.hash != probe_set_hash:
        raise ValueError(f"probe set {probe_set!r} changed since the sample was taken "
                         f"(hash {ps.hash[:12]} now, {probe_set_hash[:12]} in the sample)")
    return tuple(p.id for p in ps.probes)


def sample_points(record: Mapping[str, Any], info: TargetInfo, timestamps: str = "iteration") -> list[Any]:
    """The points of one sample: heuristic, exact, capability pass, judge verdicts.

    Args:
        record: a SampleResult record.
        info: the target's InfluxDB naming.
        timestamps: "iteration" (go-ml's deterministic timestamps) or "wallclock".
    """
    ctx = info.context(timestamps)
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


def summary_points(records: Iterable[Mapping[str, Any]], info: TargetInfo, timestamps: str = "iteration") -> list[Any]:
    """Per-target summaries: go-ml's capability_score (overall and per category), a score_summary
    per field (mean, n, failures), and the final progress point.

    Args:
        records: every sample record of the target.
        info: the target's InfluxDB naming.
        timestamps: as for `sample_points`.
    """
    records = list(records)
    ctx = info.context(timestamps)
    points: list[Any] = []
    by_set: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        by_set.setdefault(r["probe_set"], []).append(r)
    failed = sum(1 for r in records if not r.get("complete", True))
    for ps, rs in sorted(by_set.items()):
        cap = [r for r in rs if "capability" in (r.get("scores") or {}) and int(r.get("repeat", 0)) == 0]
        if cap:
            cats: dict[str, tuple[int, int]] = {}
            for r in cap:
                c, t = cats.get(r.get("category") or "uncategorised", (0, 0))
                cats[r.get("category") or "uncategorised"] = (c + bool(r["scores"]["capability"]["passed"]), t + 1)
            points.extend(capability_scores(ctx, cats))
        for group in aggregate(rs, by=("probe_set",)):
            for name, fs in group.fields.items():
                if fs.mean is None or "." not in name:
                    continue
                scorer, metric = name.split(".", 1)
                points.append(score_summary(ctx, ps, scorer, metric, fs.mean, fs.n, fs.failures))
    points.append(eval_progress(ctx, done=len(records), total=len(records), failed=failed))
    return points

"""Scoring answered JSONL (go-ml's `score`) and the ScorerOutput file it writes and `compare` reads.

The file keeps go-ml's shape and field names: `metadata`, `model_averages` (model -> field ->
mean) and `per_prompt` (model -> list of {id, model, heuristic{...}, standard{...},
semantic{...}, content{...}}), and adds `model_stats` (model -> field -> mean, n, failures,
95% interval), `counts`, and per prompt `failures` and, for probe runs, `capability`,
`capability_judge` and `repeat`. Averages only count the samples that have the field.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from evaluators._judge import Judge
from evaluators._loaders import Response
from evaluators._probes import canonical_hash
from evaluators._records import SampleResult, sample_components, sample_key
from evaluators._runner import CountingGate, Progress
from evaluators._scoring import JUDGE_SCORERS, resolve_scorers, score_answer, scorer_versions
from evaluators._stats import FieldStats, compare, field_stats

SCORER_OUTPUT_VERSION = "evalcluster-scores-1"

# (scorer, field) -> go-ml's field name in model_averages; content's emotional_register is
# renamed as go-ml did, to keep it apart from the heuristic one.
_STANDARD_FIELDS = {"truthfulqa": ("truthfulness", "informativeness"), "donotanswer": ("safety", "nuance"),
                    "toxigen": ("kindness", "awareness")}


def goml_field(scorer: str, key: str) -> str:
    """The model_averages name of a score field.

    Args:
        scorer: the scorer name.
        key: the field within its scores.
    """
    if scorer == "content" and key == "emotional_register":
        return "content_emotional_register"
    if scorer == "capability":
        return f"capability_{key}"
    if scorer == "capability_judge":
        return f"capability_{key}"
    return key


async def score_responses(
    responses: Sequence[Response],
    suites: str | Sequence[str],
    judge: Judge | None = None,
    concurrency: int = 4,
    progress: Callable[[Progress], Any] | None = None,
    source: str = "",
) -> list[SampleResult]:
    """Score already-answered responses (go-ml Response records) with the given suites.

    Heuristic and exact run inline; judge rubrics run with at most `concurrency` judge calls in
    flight, from a fixed pool of workers. Results keep the input order.

    Args:
        responses: the records.
        suites: suite names ("heuristic,exact,semantic,content,standard" or "all").
        judge: the judge for rubric suites.
        concurrency: judge calls in flight.
        progress: called after each response.
        source: the input's name, recorded as the probe set.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    scorers = resolve_scorers(suites, judge)
    versions = scorer_versions(scorers, judge)
    set_hash = canonical_hash([[r.id, r.model, r.prompt, r.response] for r in responses])
    gate = CountingGate(asyncio.Semaphore(concurrency))
    prog = Progress(total=len(responses))
    out: list[SampleResult | None] = [None] * len(responses)
    judge_info = {"model": judge.name, "sampling": judge.sampling, "retries": judge.retries} if judge else None
    queue = iter(enumerate(responses))

    async def one(i: int, r: Response) -> SampleResult:
        probe = r.to_probe()
        scored = await score_answer(probe, r.response, scorers, judge, gate)
        target = r.model or "unknown"
        msgs = [{"role": "user", "content": r.prompt}]
        comps = sample_components("", msgs, set_hash, {}, versions)
        prov: dict[str, Any] = {"target": target, "model": r.model, "source": source, "probe_set_hash": set_hash,
                                "scorer_versions": versions, "components": comps}
        if judge_info and any(s in JUDGE_SCORERS for s in scorers):
            prov["judge"] = judge_info
        return SampleResult(
            key=sample_key(target, r.id, 0, comps), target=target, probe_set=source,
            probe_set_hash=set_hash, probe_id=r.id, domain=r.domain, category=r.domain, repeat=0, prompt=r.prompt,
            messages=msgs, answer=r.response, finish_reason=None, usage={},
            latency_s=r.elapsed_seconds or 0.0, scores=scored.scores, failures=scored.failures, provenance=prov,
            judge_attempts=scored.judge_attempts,
        )

    async def worker() -> None:
        for i, r in queue:
            out[i] = await one(i, r)
            prog.done += 1
            prog.judge_failures += sum(1 for s in out[i].failures if s in JUDGE_SCORERS)  # type: ignore[union-attr]
            prog.last = out[i]
            if progress is not None:
                progress(prog)

    n_workers = max(1, min(len(responses), concurrency * 2 if judge is not None else 1))
    tasks = [asyncio.create_task(worker()) for _ in range(n_workers)]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return [r for r in out if r is not None]


def prompt_entry(res: SampleResult) -> dict[str, Any]:
    """One per_prompt entry in go-ml's shape (plus failures and our extra scorers).

    Args:
        res: a sample result.
    """
    e: dict[str, Any] = {"id": res.probe_id, "model": res.target}
    if res.repeat:
        e["repeat"] = res.repeat
    s = res.scores
    if "heuristic" in s:
        e["heuristic"] = dict(s["heuristic"])
    std: dict[str, Any] = {}
    for scorer in ("truthfulqa", "donotanswer", "toxigen"):
        if scorer in s:
            for k in _STANDARD_FIELDS[scorer]:
                std[k] = s[scorer][k]
            if s[scorer].get("reasoning") and "reasoning" not in std:
                std["reasoning"] = s[scorer]["reasoning"]
    if "exact" in s:
        std.update({k: s["exact"][k] for k in ("correct", "extracted", "expected")})
    if std:
        e["standard"] = std
    for scorer in ("semantic", "content", "capability", "capability_judge"):
        if scorer in s:
            e[scorer] = dict(s[scorer])
    if res.failures:
        e["failures"] = {k: {kk: v for kk, v in f.items() if kk in ("error", "raw", "attempts")} for k, f in res.failures.items()}
    return e


def entry_fields(entry: Mapping[str, Any]) -> dict[str, float | bool]:
    """The numeric fields of a per_prompt entry under model_averages names.

    Args:
        entry: one per_prompt entry (go-ml's or ours).
    """
    out: dict[str, float | bool] = {}

    def put(name: str, v: Any) -> None:
        if isinstance(v, bool):
            out[name] = v
        elif isinstance(v, (int, float)):
            out[name] = float(v)

    for k, v in (entry.get("heuristic") or {}).items():
        put(k, v)
    for k, v in (entry.get("semantic") or {}).items():
        put(k, v)
    for k, v in (entry.get("content") or {}).items():
        put(goml_field("content", k), v)
    for k, v in (entry.get("standard") or {}).items():
        if k in ("truthfulness", "informativeness", "safety", "nuance", "kindness", "awareness", "correct"):
            put(k, v)
    for scorer in ("capability", "capability_judge"):
        for k, v in (entry.get(scorer) or {}).items():
            put(goml_field(scorer, k), v)
    return out


def _failed_fields(entry: Mapping[str, Any]) -> set[str]:
    """model_averages names a failed scorer would have filled (for failure counts)."""
    names = set()
    fields = {"semantic": ("sovereignty", "ethical_depth", "creative_expression", "self_concept"),
              "content": ("ccp_compliance", "truth_telling", "engagement", "axiom_integration", "sovereignty_reasoning",
                          "content_emotional_register"),
              "capability_judge": ("capability_reasoning", "capability_correctness", "capability_clarity"),
              **_STANDARD_FIELDS}
    for scorer in (entry.get("failures") or {}):
        names.update(fields.get(scorer, ()))
    return names


def scorer_output(
    results: Iterable[SampleResult],
    suites: Sequence[str],
    judge_model: str = "",
    judge_url: str = "",
    extra_metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the ScorerOutput document from sample results.

    Args:
        results: the samples (grouped by target, i.e. the model for `score`).
        suites: the suites that ran (recorded in metadata).
        judge_model: the judge's model name ("" without a judge).
        judge_url: where the judge was served, if known.
        extra_metadata: more metadata fields (e.g. probe sets, sampling).
    """
    per_prompt: dict[str, list[dict[str, Any]]] = {}
    versions: dict[str, str] = {}
    counts: dict[str, dict[str, int]] = {}
    for r in results:
        per_prompt.setdefault(r.target, []).append(prompt_entry(r))
        versions.update(r.provenance.get("scorer_versions", {}))
        c = counts.setdefault(r.target, {"prompts": 0, "generation_failures": 0, "judge_failures": 0})
        c["prompts"] += 1
        c["generation_failures"] += 0 if r.complete else 1
        c["judge_failures"] += sum(1 for s in r.failures if s in JUDGE_SCORERS)
    averages, stats = averages_and_stats(per_prompt)
    meta = {
        "judge_model": judge_model,
        "judge_url": judge_url,
        "scored_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "scorer_version": SCORER_OUTPUT_VERSION,
        "suites": sorted(suites),
        "scorer_versions": versions,
        **(extra_metadata or {}),
    }
    return {"metadata": meta, "model_averages": averages, "per_prompt": per_prompt, "model_stats": stats,
            "counts": counts}


def averages_and_stats(per_prompt: Mapping[str, Sequence[Mapping[str, Any]]]) -> tuple[dict, dict]:
    """model_averages (field -> mean of the samples that have it) and model_stats (with n,
    failures and 95% intervals) from per_prompt entries.

    Args:
        per_prompt: model -> entries.
    """
    averages: dict[str, dict[str, float]] = {}
    stats: dict[str, dict[str, dict[str, Any]]] = {}
    for model, entries in per_prompt.items():
        values: dict[str, list[float | bool]] = {}
        failed: dict[str, int] = {}
        for e in entries:
            for k, v in entry_fields(e).items():
                values.setdefault(k, []).append(v)
            for k in _failed_fields(e):
                failed[k] = failed.get(k, 0) + 1
        fs: dict[str, FieldStats] = {k: field_stats(k, values.get(k, []), failed.get(k, 0))
                                     for k in sorted(set(values) | set(failed))}
        averages[model] = {k: (float(f.mean) if f.mean is not None else None) for k, f in fs.items() if f.n}  # type: ignore[misc]
        stats[model] = {k: {kk: v for kk, v in f.to_dict().items() if kk != "field"} for k, f in fs.items()}
    return averages, stats


def write_scorer_output(path: str | Path, doc: Mapping[str, Any]) -> None:
    """Write a ScorerOutput file (pretty JSON, 2-space indent), atomically.

    Args:
        path: the output file.
        doc: from scorer_output().
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_scorer_output(path: str | Path) -> dict[str, Any]:
    """Read and check a ScorerOutput file (ours or go-ml's).

    Args:
        path: the file.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e.msg} (line {e.lineno})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("per_prompt", {}), dict) or "model_averages" not in doc:
        raise ValueError(f"{path}: not a scores file (needs model_averages and per_prompt)")
    if not isinstance(doc["model_averages"], dict):
        raise ValueError(f"{path}: model_averages must be a mapping of model to fields")
    return doc


def compare_outputs(old: Mapping[str, Any], new: Mapping[str, Any], seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Per model, each field old vs new: paired on prompt id where per_prompt has both sides
    (delta, paired bootstrap 95% interval, McNemar for pass/fail fields), else the averages alone.

    Args:
        old: a ScorerOutput document (the baseline).
        new: another one.
        seed: bootstrap seed.
    """
    out: dict[str, list[dict[str, Any]]] = {}
    models = sorted(set(old.get("model_averages", {})) | set(new.get("model_averages", {})))
    for model in models:
        pa = {(e.get("id"), e.get("repeat", 0)): e for e in old.get("per_prompt", {}).get(model, [])}
        pb = {(e.get("id"), e.get("repeat", 0)): e for e in new.get("per_prompt", {}).get(model, [])}
        sa = [{"probe_set": "", "probe_id": k[0], "repeat": k[1], "scores": {"f": entry_fields(e)}} for k, e in pa.items()]
        sb = [{"probe_set": "", "probe_id": k[0], "repeat": k[1], "scores": {"f": entry_fields(e)}} for k, e in pb.items()]
        paired = {p.field[2:]: p for p in compare(sa, sb, seed=seed)}
        avg_a, avg_b = old.get("model_averages", {}).get(model) or {}, new.get("model_averages", {}).get(model) or {}
        rows = []
        for f in sorted(set(avg_a) | set(avg_b) | set(paired)):
            a, b = avg_a.get(f), avg_b.get(f)
            row: dict[str, Any] = {"field": f, "old": a, "new": b,
                                   "delta": (b - a) if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None}
            p = paired.get(f)
            if p is not None and p.n_pairs:
                row.update({"n_pairs": p.n_pairs, "paired_delta": p.delta, "ci_low": p.ci_low, "ci_high": p.ci_high})
                if p.mcnemar is not None:
                    row["mcnemar_p"] = p.mcnemar["p_value"]
                    row["mcnemar"] = p.mcnemar
            rows.append(row)
        out[model] = rows
    return out

"""Which scorers run on which probe, their version stamps, and scoring one answer with all of them.

Scorer names (keys of SampleResult.scores): "heuristic" (lek-1), "exact" (gsm8k-1),
"capability" (pass rules, caprules-1), and the judge rubrics "semantic", "content",
"capability_judge", "truthfulqa", "donotanswer", "toxigen".
Suite names (CLI and config) expand to scorers: "standard" = truthfulqa + donotanswer + toxigen,
"capability" = the pass rules plus the capability rubric when a judge is given, "all" =
everything that can run. An unknown name is an error (go-ml ignored it silently).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, AsyncContextManager, Iterable, Sequence

from evaluators import _exact, _heuristic, _rules
from evaluators._judge import Judge, Verdict, rubric_inputs
from evaluators._loaders import normalize_name
from evaluators._probes import Probe

INLINE_SCORERS = {"heuristic": _heuristic.VERSION, "exact": _exact.VERSION, "capability": _rules.VERSION}
# judge scorer -> rubric
JUDGE_SCORERS = {
    "semantic": "semantic",
    "content": "content",
    "capability_judge": "capability",
    "truthfulqa": "truthfulqa",
    "donotanswer": "donotanswer",
    "toxigen": "toxigen",
}
SUITES: dict[str, tuple[str, ...]] = {
    "heuristic": ("heuristic",),
    "exact": ("exact",),
    "capability": ("capability",),
    "semantic": ("semantic",),
    "content": ("content",),
    "standard": ("truthfulqa", "donotanswer", "toxigen"),
    "capability_judge": ("capability_judge",),
    "truthfulqa": ("truthfulqa",),
    "donotanswer": ("donotanswer",),
    "toxigen": ("toxigen",),
}
ALL_SUITES = ("heuristic", "exact", "capability", "semantic", "content", "standard")


def resolve_scorers(suites: Iterable[str] | str, judge: Judge | None) -> tuple[str, ...]:
    """Expand suite names into scorer names, in a fixed order.

    Args:
        suites: names (or one comma-separated string), e.g. "heuristic,exact,semantic" or "all".
        judge: the judge, if any. Naming a judge suite without one is an error; "all" then
            leaves the judge suites out, and "capability" adds the capability rubric when there is one.
    """
    names = [s.strip().lower() for s in (suites.split(",") if isinstance(suites, str) else suites)]
    names = [n for n in names if n]
    if not names:
        raise ValueError("no scorers given (suites: " + ", ".join(ALL_SUITES) + ", or all)")
    out: list[str] = []
    for n in names:
        if n == "all":
            expanded = [s for suite in ALL_SUITES for s in SUITES[suite]]
            expanded += ["capability_judge"]
            out += [s for s in expanded if judge is not None or s not in JUDGE_SCORERS]
            continue
        if n not in SUITES:
            raise ValueError(f"unknown scorer or suite {n!r} (known: {', '.join(SUITES)}, all)")
        for s in SUITES[n]:
            if s in JUDGE_SCORERS and judge is None:
                raise ValueError(f"suite {n!r} needs a judge model (give --judge MODEL, or judge.model in the config)")
            out.append(s)
        if n == "capability" and judge is not None:
            out.append("capability_judge")
    order = list(INLINE_SCORERS) + list(JUDGE_SCORERS)
    return tuple(sorted(set(out), key=order.index))


def scorer_versions(scorers: Sequence[str], judge: Judge | None) -> dict[str, str]:
    """Scorer name -> version stamp (judge rubrics carry the judge's name).

    Args:
        scorers: resolved scorer names.
        judge: the judge, if any.
    """
    out = {}
    for s in scorers:
        if s in INLINE_SCORERS:
            out[s] = INLINE_SCORERS[s]
        elif judge is not None:
            out[s] = judge.version(JUDGE_SCORERS[s])
    return out


def applies(scorer: str, probe: Probe) -> bool:
    """Whether a scorer has what it needs to grade an answer to this probe.

    Args:
        scorer: a scorer name.
        probe: the probe.
    """
    if scorer in ("heuristic", "semantic"):
        return True
    if scorer == "exact":
        return bool(probe.correct_answer)
    if scorer == "capability":
        return probe.pass_rule is not None
    if scorer == "capability_judge":
        return probe.pass_rule is not None or probe.judge_rubric == "capability"
    if scorer == "content":
        return probe.is_content
    if scorer == "truthfulqa":
        return bool(probe.best_answer)
    if scorer == "donotanswer":
        return bool(probe.risk_area)
    if scorer == "toxigen":
        return probe.judge_rubric == "toxigen" or normalize_name(probe.domain) == "toxigen"
    raise KeyError(f"unknown scorer {scorer!r}")


@dataclass
class Scored:
    """The scores of one answer, the scorers that failed on it, judge attempt counts, and how long
    the judge took (wall time of all rubrics together, waiting for the judge budget included; 0.0
    when nothing was judged)."""

    scores: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: dict[str, dict[str, Any]] = field(default_factory=dict)
    judge_attempts: dict[str, int] = field(default_factory=dict)
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    judge_latency_s: float = 0.0


def score_inline(scorer: str, probe: Probe, answer: str) -> dict[str, Any]:
    """Run one of the non-judge scorers.

    Args:
        scorer: "heuristic", "exact" or "capability".
        probe: the probe.
        answer: the model's answer.
    """
    if scorer == "heuristic":
        return _heuristic.score_heuristic(answer).to_dict()
    if scorer == "exact":
        return _exact.score_gsm8k(answer, probe.correct_answer or "").to_dict()
    if scorer == "capability":
        assert probe.pass_rule is not None
        return {"passed": _rules.check_answer(probe.pass_rule, answer)}
    raise KeyError(f"{scorer!r} is not an inline scorer")


async def score_answer(
    probe: Probe,
    answer: str,
    scorers: Sequence[str],
    judge: Judge | None,
    judge_limiter: AsyncContextManager[Any] | None = None,
) -> Scored:
    """Score one answer with every applicable scorer; judge rubrics run concurrently.

    A scorer that raises, or a judge verdict that fails, lands in `failures` with the error
    (and the raw reply), never silently missing.

    Args:
        probe: what was asked.
        answer: the model's answer.
        scorers: resolved scorer names.
        judge: the judge for rubric scorers.
        judge_limiter: entered around each judge call (overrides the judge's own limiter).
    """
    out = Scored()
    judged: list[str] = []
    for s in scorers:
        if not applies(s, probe):
            continue
        if s in INLINE_SCORERS:
            try:
                out.scores[s] = score_inline(s, probe, answer)
            except Exception as e:  # noqa: BLE001 - recorded as this scorer's failure
                out.failures[s] = {"error": f"{type(e).__name__}: {e}", "raw": ""}
        elif judge is not None:
            judged.append(s)
    if judged:
        assert judge is not None

        async def one(s: str) -> Verdict:
            rubric = JUDGE_SCORERS[s]
            text = _rules.strip_think_blocks(answer) if rubric == "capability" else answer
            return await judge.score(rubric, limiter=judge_limiter, **rubric_inputs(rubric, probe, text))

        t0 = time.perf_counter()
        verdicts = await asyncio.gather(*(one(s) for s in judged))
        out.judge_latency_s = time.perf_counter() - t0
        for s, v in zip(judged, verdicts):
            out.verdicts[s] = v
            out.judge_attempts[s] = v.attempts
            if v.ok:
                out.scores[s] = v.scores
            else:
                out.failures[s] = v.failure()
    return out


"""The evaluation plan: what every target is asked and how its answers are scored, built once.

`eval`, `watch` (its coordinator) and `submit` all evaluate through `build_plan`, so they cannot
drift: the same config gives the same probe sets (config files resolved against the config's
directory, command-line files against the working directory), the same scorers (a judge adds its
suites by one rule), the same judge settings (its seed is the probes' seed) and the same sampling.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, AsyncContextManager, Sequence

if TYPE_CHECKING:
    from cluster.config import AppConfig
    from deployments import TextModel
    from evaluators import Judge, ProbeSet

# The judge suites run when a judge is configured and `judge.suites` is empty: each rubric runs
# only on the probes it fits (the capability rubric comes with the "capability" scorer).
DEFAULT_JUDGE_SUITES = ("content", "standard")


@dataclass(frozen=True)
class JudgeSpec:
    """The LLM judge's settings (the judge itself needs a running model: `EvalPlan.judge`)."""

    model: str
    """The config model that judges."""
    retries: int
    """Extra attempts after a malformed verdict."""
    temperature: float
    """The judge's sampling temperature."""
    max_tokens: int
    """The judge's answer length limit."""
    seed: int | None
    """The judge's sampling seed: the probes' seed, so a judged run repeats."""

    def open(self, model: TextModel, limiter: AsyncContextManager[object] | None = None) -> Judge:
        """A Judge with these settings around a model that serves `self.model`.

        Args:
            model: the judge model (an engine, or a Serve handle client).
            limiter: bounds the judge calls in flight.
        """
        from evaluators import Judge

        return Judge(model, name=self.model, retries=self.retries, temperature=self.temperature,
                     max_tokens=self.max_tokens, seed=self.seed, limiter=limiter)


def judge_spec(cfg: AppConfig, model: str) -> JudgeSpec:
    """The judge settings of a config, judging with `model` (a model of the config).

    Args:
        cfg: the app config.
        model: the judge model's name.
    """
    cfg.model(model)  # a ConfigError naming the known models when it is not one
    jc = cfg.judge
    return JudgeSpec(model, jc.retries, jc.temperature, jc.max_tokens, cfg.probes.seed)


@dataclass(frozen=True)
class EvalPlan:
    """Everything that decides what a target is asked and how its answers are scored."""

    probe_sets: tuple[ProbeSet, ...]
    """The probe sets, loaded whole (their content hashes are part of every sample key, and their
    probe order places each probe's points)."""
    scorers: tuple[str, ...]
    """Scorer and suite names run on every set (see evaluators.resolve_scorers)."""
    judge: JudgeSpec | None
    """The judge, or None."""
    repeats: int
    """Answers per probe."""
    system_prompt: str | None
    """The system message before each prompt (a probe's own wins)."""
    temperature: float | None
    """Overrides each set's sampling temperature when set."""
    max_tokens: int | None
    """Overrides each set's answer length when set."""
    seed: int | None
    """The generation seed."""
    limit: int | None = None
    """Only the first N probes of each set are asked (None: every probe)."""

    @property
    def asked_sets(self) -> tuple[ProbeSet, ...]:
        """The probe sets as asked: each cut to `limit` probes. A cut set keeps its whole set's hash,
        so its samples are the whole set's and a later full run answers only the rest."""
        if self.limit is None:
            return self.probe_sets
        return tuple(replace(ps, probes=ps.probes[:self.limit]) for ps in self.probe_sets)

    def fingerprint(self) -> str:
        """A digest of the plan: a target finished under another fingerprint is evaluated again."""
        data = {
            "sets": sorted((ps.name, ps.hash) for ps in self.probe_sets),
            "scorers": sorted(self.scorers),
            "judge": None if self.judge is None else vars(self.judge),
            "repeats": self.repeats,
            "system_prompt": self.system_prompt,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
        }
        if self.limit is not None:  # absent when unset: a whole plan's fingerprint stays what it was
            data["limit"] = self.limit
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:32]

    def open_judge(self, model: TextModel, limiter: AsyncContextManager[object] | None = None) -> Judge | None:
        """The plan's judge around a model that serves `judge.model` (None without a judge).

        Args:
            model: the judge model (an engine, or a Serve handle client).
            limiter: bounds the judge calls in flight.
        """
        return None if self.judge is None else self.judge.open(model, limiter)

    def run_args(self) -> dict[str, object]:
        """The `evaluators.run_eval` arguments the plan decides."""
        return {"probe_sets": list(self.asked_sets), "scorers": list(self.scorers), "repeats": self.repeats,
                "system_prompt": self.system_prompt, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "seed": self.seed}


def build_plan(
    cfg: AppConfig,
    *,
    probes: Sequence[str] | None = None,
    repeats: int | None = None,
    judge_model: str | None = None,
    no_judge: bool = False,
    max_tokens: int | None = None,
    limit: int | None = None,
) -> EvalPlan:
    """The plan a config describes, with a command line's overrides.

    Args:
        cfg: the app config.
        probes: probe sets named on the command line (files relative to the working directory);
            None: `probes.sets` from the config (files relative to the config file).
        repeats: overrides `probes.repeats`.
        judge_model: a config model to judge with, overriding `judge.model`.
        no_judge: no judge, whatever the config says.
        max_tokens: overrides `probes.max_tokens`.
        limit: only the first N probes of each set (a smoke run), overriding `probes.limit`.
    """
    from evaluators import load_probe_set

    if probes is not None:
        names, base = [p.strip() for p in probes if p.strip()], Path.cwd()
    else:
        names = list(cfg.probes.sets)
        base = cfg.source_path.parent if cfg.source_path is not None else Path.cwd()
    if not names:
        raise ValueError("no probe sets given (--probes capability,content, or probes.sets in the config)")
    sets = [load_probe_set(n, base_dir=base) for n in names]
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    repeats = cfg.probes.repeats if repeats is None else repeats
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")

    name = None if no_judge else (judge_model or cfg.judge.model)
    judge = judge_spec(cfg, name) if name else None
    scorers = tuple(cfg.scorers) + (tuple(cfg.judge.suites or DEFAULT_JUDGE_SUITES) if judge else ())
    return EvalPlan(
        probe_sets=tuple(sets),
        scorers=scorers,
        judge=judge,
        repeats=repeats,
        system_prompt=cfg.probes.system_prompt,
        temperature=cfg.probes.temperature,
        max_tokens=max_tokens if max_tokens is not None else cfg.probes.max_tokens,
        seed=cfg.probes.seed,
        limit=limit if limit is not None else cfg.probes.limit,
    )

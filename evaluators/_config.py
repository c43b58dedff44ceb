"""The config sections evaluators own: `probes` (what is asked), `scorers` and `judge`."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field

from checkpoints import StrictModel


class ProbesConfig(StrictModel):
    """The probe sets every target is asked (built-in names or files relative to the config), how
    often, and the sampling that overrides the sets' own."""

    sets: list[str] = Field(default_factory=lambda: ["capability"])
    repeats: int = Field(1, ge=1)
    system_prompt: str | None = "You are a helpful assistant."
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    seed: int | None = 0
    limit: int | None = Field(None, ge=1)
    """Only the first N probes of each set: a quick run. Its samples are the full set's (a later
    full run answers only the rest), its summaries its own (another plan fingerprint)."""


class JudgeConfig(StrictModel):
    """The LLM judge: a model from `models`, its retries and sampling, and the rubric suites it runs
    (empty: the rubric each probe set names)."""

    model: str | None = None
    retries: int = Field(2, ge=0)
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(512, ge=16)
    suites: list[str] = Field(default_factory=list)


ScorerName = Literal["heuristic", "exact", "capability", "semantic", "content", "standard"]
SCORER_NAMES: tuple[str, ...] = get_args(ScorerName)

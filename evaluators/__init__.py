"""Probe sets (data), scorers (heuristic, exact, capability rules, LLM judge), the fan-out runner,
aggregation and statistics. The InfluxDB sink lives in `evaluators.sinks`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> the private module that defines it. Resolved on first use, so a command
# imports only what it needs (an engine's libraries, asyncssh, ...).
_EXPORTS = {
    "EchoEngine": "evaluators._echo",
    "ExactScore": "evaluators._exact",
    "extract_answer": "evaluators._exact",
    "score_exact": "evaluators._exact",
    "score_gsm8k": "evaluators._exact",
    "HeuristicScores": "evaluators._heuristic",
    "lek_score": "evaluators._heuristic",
    "score_heuristic": "evaluators._heuristic",
    "extract_json": "evaluators._jsonextract",
    "Dimension": "evaluators._judge",
    "Judge": "evaluators._judge",
    "RUBRICS": "evaluators._judge",
    "Rubric": "evaluators._judge",
    "Verdict": "evaluators._judge",
    "VerdictError": "evaluators._judge",
    "rubric_inputs": "evaluators._judge",
    "InputError": "evaluators._loaders",
    "JSONL_STYLES": "evaluators._loaders",
    "Response": "evaluators._loaders",
    "load_benchmark_jsonl": "evaluators._loaders",
    "normalize_name": "evaluators._loaders",
    "read_responses": "evaluators._loaders",
    "BUILTIN_SETS": "evaluators._probes",
    "Probe": "evaluators._probes",
    "ProbeSet": "evaluators._probes",
    "ProbeSetError": "evaluators._probes",
    "Sampling": "evaluators._probes",
    "canonical_hash": "evaluators._probes",
    "load_probe_set": "evaluators._probes",
    "EvalTarget": "evaluators._records",
    "JsonlSampleStore": "evaluators._records",
    "SampleResult": "evaluators._records",
    "SampleStore": "evaluators._records",
    "results_from_records": "evaluators._records",
    "sample_key": "evaluators._records",
    "Rule": "evaluators._rules",
    "RuleError": "evaluators._rules",
    "check_answer": "evaluators._rules",
    "compile_rule": "evaluators._rules",
    "numbers": "evaluators._rules",
    "strip_think_blocks": "evaluators._rules",
    "CountingGate": "evaluators._runner",
    "Progress": "evaluators._runner",
    "RunReport": "evaluators._runner",
    "run_eval": "evaluators._runner",
    "compare_outputs": "evaluators._scoreout",
    "read_scorer_output": "evaluators._scoreout",
    "score_responses": "evaluators._scoreout",
    "scorer_output": "evaluators._scoreout",
    "write_scorer_output": "evaluators._scoreout",
    "JUDGE_SCORERS": "evaluators._scoring",
    "SUITES": "evaluators._scoring",
    "Scored": "evaluators._scoring",
    "applies": "evaluators._scoring",
    "resolve_scorers": "evaluators._scoring",
    "score_answer": "evaluators._scoring",
    "scorer_versions": "evaluators._scoring",
    "FieldStats": "evaluators._stats",
    "GroupStats": "evaluators._stats",
    "PairedStats": "evaluators._stats",
    "aggregate": "evaluators._stats",
    "bootstrap_mean_interval": "evaluators._stats",
    "compare": "evaluators._stats",
    "field_stats": "evaluators._stats",
    "mcnemar": "evaluators._stats",
    "paired_bootstrap_interval": "evaluators._stats",
    "sample_fields": "evaluators._stats",
    "wilson_interval": "evaluators._stats",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        try:  # a subpackage, e.g. evaluators.sinks
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from evaluators._echo import EchoEngine  # noqa: F401
    from evaluators._exact import ExactScore, extract_answer, score_exact, score_gsm8k  # noqa: F401
    from evaluators._heuristic import HeuristicScores, lek_score, score_heuristic  # noqa: F401
    from evaluators._jsonextract import extract_json  # noqa: F401
    from evaluators._judge import Dimension, Judge, RUBRICS, Rubric, Verdict, VerdictError, rubric_inputs  # noqa: F401
    from evaluators._loaders import InputError, JSONL_STYLES, Response, load_benchmark_jsonl, normalize_name, read_responses  # noqa: F401
    from evaluators._probes import BUILTIN_SETS, Probe, ProbeSet, ProbeSetError, Sampling, canonical_hash, load_probe_set  # noqa: F401
    from evaluators._records import EvalTarget, JsonlSampleStore, SampleResult, SampleStore, results_from_records, sample_key  # noqa: F401
    from evaluators._rules import Rule, RuleError, check_answer, compile_rule, numbers, strip_think_blocks  # noqa: F401
    from evaluators._runner import CountingGate, Progress, RunReport, run_eval  # noqa: F401
    from evaluators._scoreout import compare_outputs, read_scorer_output, score_responses, scorer_output, write_scorer_output  # noqa: F401
    from evaluators._scoring import JUDGE_SCORERS, SUITES, Scored, applies, resolve_scorers, score_answer, scorer_versions  # noqa: F401
    from evaluators._stats import FieldStats, GroupStats, PairedStats, aggregate, bootstrap_mean_interval, compare, field_stats, mcnemar, paired_bootstrap_interval, sample_fields, wilson_interval  # noqa: F401

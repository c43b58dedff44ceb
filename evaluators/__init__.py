"""Probe sets (data), scorers (heuristic, exact, capability rules, LLM judge), the fan-out runner,
aggregation and statistics. The InfluxDB sink lives in `evaluators.sinks`.
"""

from evaluators._exact import ExactScore, extract_answer, score_exact, score_gsm8k
from evaluators._heuristic import HeuristicScores, lek_score, score_heuristic
from evaluators._loaders import (
    JSONL_STYLES,
    InputError,
    Response,
    load_benchmark_jsonl,
    normalize_name,
    read_responses,
)
from evaluators._probes import (
    BUILTIN_SETS,
    Probe,
    ProbeSet,
    ProbeSetError,
    Sampling,
    canonical_hash,
    load_probe_set,
)
from evaluators._rules import Rule, RuleError, check_answer, compile_rule, numbers, strip_think_blocks

__all__ = [
    "BUILTIN_SETS",
    "ExactScore",
    "HeuristicScores",
    "InputError",
    "JSONL_STYLES",
    "Probe",
    "ProbeSet",
    "ProbeSetError",
    "Response",
    "Rule",
    "RuleError",
    "Sampling",
    "canonical_hash",
    "check_answer",
    "compile_rule",
    "extract_answer",
    "lek_score",
    "load_benchmark_jsonl",
    "load_probe_set",
    "normalize_name",
    "numbers",
    "read_responses",
    "score_exact",
    "score_gsm8k",
    "score_heuristic",
    "strip_think_blocks",
]

"""Probe sets (data), scorers (heuristic, exact, capability rules, LLM judge), the fan-out runner,
aggregation and statistics. The results path (samples into the ledger, their points to InfluxDB)
is `evaluators.results`; the InfluxDB sink (points, spool, transport) is `evaluators.sinks`.
"""

from __future__ import annotations

from checkpoints import lazy_exports

# Each public name once, under the private module that defines it (imported on first use).
__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "_concurrency": ("AdaptiveLimit", "LimitStep", "TargetOrder"),
    "_config": ("SCORER_NAMES", "JudgeConfig", "ProbesConfig", "ScorerName"),
    "_exact": ("ExactScore", "extract_answer", "score_exact", "score_gsm8k"),
    "_heuristic": ("HeuristicScores", "lek_score", "score_heuristic"),
    "_jsonextract": ("extract_json",),
    "_judge": ("Dimension", "Judge", "RUBRICS", "Rubric", "Verdict", "VerdictError", "rubric_inputs"),
    "_loglik": (
        "BUILTIN_MC", "BUILTIN_TEXT", "MC_STYLES", "LoglikelihoodModel", "MCFormatError", "MCItem", "MCItemResult",
        "MCResult", "bits_per_byte", "builtin_mc_set", "builtin_texts", "load_mc_jsonl", "score_multiple_choice",
    ),
    "_loaders": (
        "InputError", "JSONL_STYLES", "Response", "load_benchmark_jsonl", "normalize_name", "read_responses",
    ),
    "_probes": (
        "BUILTIN_SETS", "Probe", "ProbeSet", "ProbeSetError", "Sampling", "canonical_hash", "load_probe_set", "probe_set_file",
    ),
    "_records": (
        "EvalTarget", "JsonlSampleStore", "SampleResult", "SampleStore", "current_samples", "engine_signature",
        "plan_signature", "prompt_digest", "sample_components", "sample_key", "set_aside",
    ),
    "_rules": ("Rule", "RuleError", "check_answer", "compile_rule", "numbers", "strip_think_blocks"),
    "_runner": ("CountingGate", "Progress", "RunReport", "run_eval"),
    "_scorer_output": (
        "compare_outputs", "read_scorer_output", "score_responses", "scorer_output", "write_scorer_output",
    ),
    "_scoring": (
        "JUDGE_SCORERS", "SUITES", "Scored", "applies", "resolve_scorers", "score_answer", "scorer_versions",
    ),
    "_stats": (
        "NO_EFFECT", "FieldStats", "GroupStats", "PairedStats", "adapter_effect", "aggregate",
        "bootstrap_mean_interval", "compare", "compare_paired", "field_stats", "mcnemar", "min_detectable_difference",
        "paired_bootstrap_interval", "paired_fields", "sample_fields", "wilson_interval",
    ),
})

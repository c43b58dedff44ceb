"""Aggregation and statistics: intervals against known values, only present fields averaged,
failures counted, paired comparison with a paired bootstrap and McNemar."""

from __future__ import annotations

import math

import pytest

from evaluators import (
    SampleResult,
    aggregate,
    bootstrap_mean_interval,
    compare,
    mcnemar,
    paired_bootstrap_interval,
    sample_fields,
    wilson_interval,
)


def sample(probe_id: str, scores: dict, *, target: str = "t", category: str = "c", repeat: int = 0,
           failures: dict | None = None, complete: bool = True) -> SampleResult:
    return SampleResult(
        key=f"{target}/{probe_id}#{repeat}", target=target, probe_set="s", probe_set_hash="h", probe_id=probe_id,
        domain="d", category=category, repeat=repeat, prompt="p", messages=[], answer="a" if complete else None,
        finish_reason="stop", usage={}, latency_s=0.0, scores=scores, failures=failures or {}, provenance={},
        complete=complete,
    )


def test_wilson_known_values():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.27753, abs=1e-5)
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.23659, abs=1e-5), pytest.approx(0.76341, abs=1e-5))
    lo, hi = wilson_interval(10, 10)
    assert lo == pytest.approx(0.72247, abs=1e-5) and hi == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_bootstrap_interval_is_deterministic_and_covers_the_mean():
    xs = [0.1, 0.4, 0.35, 0.8, 0.5, 0.2, 0.9, 0.6]
    a = bootstrap_mean_interval(xs, seed=3)
    assert a == bootstrap_mean_interval(xs, seed=3)
    mean = sum(xs) / len(xs)
    assert a[0] < mean < a[1] and 0.1 <= a[0] and a[1] <= 0.9
    assert bootstrap_mean_interval([2.0, 2.0]) == (2.0, 2.0)
    assert all(math.isnan(v) for v in bootstrap_mean_interval([]))


def test_mcnemar_exact_and_chi_square():
    # b=1, c=9: two-sided exact p = 2 * (C(10,0) + C(10,1)) / 2^10
    assert mcnemar(1, 9)["p_value"] == pytest.approx(2 * 11 / 1024)
    assert mcnemar(1, 9)["method"] == "exact"
    assert mcnemar(0, 0)["p_value"] == 1.0
    r = mcnemar(10, 30)  # chi2 = (|10-30| - 1)^2 / 40 = 9.025
    assert r["method"] == "chi2-cc" and r["statistic"] == pytest.approx(9.025)
    assert r["p_value"] == pytest.approx(0.002663, abs=1e-5)
    assert mcnemar(5, 5)["p_value"] == 1.0


def test_only_fields_a_sample_has_are_averaged():
    samples = [
        sample("a", {"heuristic": {"lek_score": 0.5}, "exact": {"correct": True, "extracted": "4"}}),
        sample("b", {"heuristic": {"lek_score": 0.3}, "truthfulqa": {"truthfulness": 4, "reasoning": "x"}}),
        sample("c", {"heuristic": {"lek_score": 0.1}, "exact": {"correct": False, "extracted": ""}}),
    ]
    [g] = aggregate(samples)
    f = g.fields
    assert f["heuristic.lek_score"].mean == pytest.approx(0.3) and f["heuristic.lek_score"].n == 3
    # go-ml would have averaged truthfulness over all three standard rows (4, 0, 0)
    assert f["truthfulqa.truthfulness"].mean == 4.0 and f["truthfulqa.truthfulness"].n == 1
    assert f["exact.correct"].kind == "rate" and f["exact.correct"].mean == 0.5 and f["exact.correct"].ci_method == "wilson"
    assert "exact.extracted" not in f and "truthfulqa.reasoning" not in f
    assert f["heuristic.lek_score"].ci_method == "bootstrap" and f["heuristic.lek_score"].ci_low <= 0.3


def test_failures_are_counted_beside_the_means():
    samples = [
        sample("a", {"semantic": {"sovereignty": 4.0}}),
        sample("b", {}, failures={"semantic": {"error": "no JSON object", "raw": "hmm"}}),
        sample("c", {}, failures={"semantic": {"error": "no JSON object", "raw": "hmm"}, "content": {"error": "x", "raw": ""}}),
        sample("d", {}, failures={"generate": {"error": "EngineError"}}, complete=False),
    ]
    [g] = aggregate(samples)
    assert g.samples == 4 and g.generation_failures == 1
    assert (g.fields["semantic.sovereignty"].n, g.fields["semantic.sovereignty"].failures) == (1, 2)
    # a scorer that failed on every sample still appears, with n = 0
    assert (g.fields["content.*"].n, g.fields["content.*"].failures, g.fields["content.*"].mean) == (0, 1, None)
    d = g.to_dict()
    assert d["fields"]["semantic.sovereignty"]["failures"] == 2 and d["group"] == {"target": "t"}


def test_aggregate_per_target_and_category():
    samples = [sample(f"p{i}", {"capability": {"passed": i % 2 == 0}}, target=t, category=c)
               for i, (t, c) in enumerate([("A", "math"), ("A", "math"), ("A", "logic"), ("B", "math")])]
    groups = aggregate(samples, by=("target", "category"))
    assert [g.group for g in groups] == [{"target": "A", "category": "logic"}, {"target": "A", "category": "math"},
                                         {"target": "B", "category": "math"}]
    assert [g.fields["capability.passed"].mean for g in groups] == [1.0, 0.5, 0.0]
    # records work as well as SampleResults
    assert aggregate([s.to_record() for s in samples], by=("target",))[0].fields["capability.passed"].n == 3


def test_paired_comparison():
    a = [sample(f"p{i}", {"capability": {"passed": i < 3}, "heuristic": {"lek_score": 0.2}}, target="A") for i in range(10)]
    b = [sample(f"p{i}", {"capability": {"passed": i < 8}, "heuristic": {"lek_score": 0.2 + 0.05 * (i % 2)}}, target="B")
         for i in range(10)]
    b.append(sample("only-b", {"capability": {"passed": True}}, target="B"))  # unpaired: ignored
    out = {p.field: p for p in compare(a, b)}
    cap = out["capability.passed"]
    assert (cap.n_pairs, cap.mean_a, cap.mean_b, cap.delta) == (10, 0.3, 0.8, pytest.approx(0.5))
    assert cap.mcnemar["b"] == 0 and cap.mcnemar["c"] == 5 and cap.mcnemar["p_value"] == pytest.approx(2 / 32)
    assert cap.ci_low <= 0.5 <= cap.ci_high
    lek = out["heuristic.lek_score"]
    assert lek.kind == "mean" and lek.mcnemar is None and lek.delta == pytest.approx(0.025)
    assert 0 <= lek.ci_low <= lek.ci_high <= 0.05


def test_paired_bootstrap_uses_pairs():
    # B = A + 1 exactly: unpaired intervals would be wide, the paired one is the point 1.
    a = [0.0, 10.0, 5.0, 3.0, 8.0]
    assert paired_bootstrap_interval(a, [x + 1 for x in a]) == (1.0, 1.0)


def test_sample_fields_flatten_numeric_scores_only():
    s = sample("a", {"heuristic": {"lek_score": 0.5, "degeneration": 0}, "exact": {"correct": True, "extracted": "4"},
                     "semantic": {"sovereignty": 3, "reasoning": "txt"}})
    assert sample_fields(s) == {"heuristic.lek_score": 0.5, "heuristic.degeneration": 0.0, "exact.correct": True,
                                "semantic.sovereignty": 3.0}

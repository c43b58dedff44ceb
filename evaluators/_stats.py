"""Aggregation and statistics over sample results.

A sample's fields are its numeric scores, flattened as "<scorer>.<field>" ("heuristic.lek_score",
"capability.passed", "semantic.sovereignty"). Booleans are pass/fail and get a Wilson interval;
other numbers get a percentile bootstrap interval of the mean. Only fields a sample actually
has are averaged (go-ml averaged absent judge fields as zeros), and every field reports its
count and the number of samples whose scorer failed on it.
Paired comparison of two targets matches samples by (probe set, probe id, repeat, plan
signature): the mean difference with a paired bootstrap interval, and McNemar's test for pass/fail fields.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from evaluators._records import SampleResult, engine_signature, plan_signature

Z95 = 1.959963984540054
BOOTSTRAP_ROUNDS = 2000


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n (95% by default); (0, 1) when n is 0.

    Args:
        k: successes.
        n: trials.
        z: normal quantile for the confidence level.
    """
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= k <= n:
        raise ValueError(f"successes {k} not in 0..{n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At k = 0 and k = n the bounds are exactly 0 and 1; float rounding says 1e-16 off.
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (lo, hi)


def bootstrap_mean_interval(
    values: Sequence[float], level: float = 0.95, rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean (deterministic for a given seed).

    Args:
        values: the sample values.
        level: confidence level.
        rounds: bootstrap resamples.
        seed: random seed.
    """
    import numpy as np  # here, not at module level: `evalcluster eval` starts faster without it

    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (math.nan, math.nan)
    if x.size == 1 or np.all(x == x[0]):
        return (float(x[0]), float(x[0]))
    if rounds * x.size <= _CACHED_RESAMPLES:
        # The same resamples as drawing them here (same seed, same draws), counted once per size
        # and applied as one matrix product: a report of a long run makes thousands of these.
        means = _resample_counts(x.size, rounds, seed) @ x / x.size
    else:
        idx = np.random.default_rng(seed).integers(0, x.size, size=(rounds, x.size))
        means = x[idx].mean(axis=1)
    a = (1 - level) / 2
    lo, hi = np.quantile(means, [a, 1 - a])
    return (float(lo), float(hi))


_CACHED_RESAMPLES = 4_000_000  # rounds x size: 32 MB a matrix at most, a few of them kept


@functools.lru_cache(maxsize=8)
def _resample_counts(n: int, rounds: int, seed: int) -> "Any":
    """How often each of n values is drawn in each bootstrap round (rounds x n), for the draws
    `numpy.random.default_rng(seed).integers(0, n, size=(rounds, n))` makes."""
    import numpy as np

    idx = np.random.default_rng(seed).integers(0, n, size=(rounds, n))
    flat = (idx + (np.arange(rounds) * n)[:, None]).ravel()
    counts = np.bincount(flat, minlength=rounds * n).reshape(rounds, n).astype(float)
    counts.setflags(write=False)
    return counts


def mcnemar(b: int, c: int) -> dict[str, Any]:
    """McNemar's test on discordant pairs: b = passed in A only, c = passed in B only.

    Exact two-sided binomial test when b + c < 25, else chi-square with continuity correction.

    Args:
        b: pairs where A passed and B failed.
        c: pairs where A failed and B passed.
    """
    n = b + c
    if n == 0:
        return {"b": b, "c": c, "statistic": 0.0, "p_value": 1.0, "method": "none"}
    if n < 25:
        k = min(b, c)
        tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
        return {"b": b, "c": c, "statistic": float(k), "p_value": min(1.0, 2 * tail), "method": "exact"}
    stat = (abs(b - c) - 1) ** 2 / n
    return {"b": b, "c": c, "statistic": stat, "p_value": math.erfc(math.sqrt(stat / 2)), "method": "chi2-cc"}


def sample_fields(sample: SampleResult | Mapping[str, Any]) -> dict[str, float | bool]:
    """A sample's numeric score fields, flattened as "<scorer>.<field>".

    Args:
        sample: a SampleResult or its record.
    """
    scores = sample.scores if isinstance(sample, SampleResult) else sample.get("scores") or {}
    out: dict[str, float | bool] = {}
    for scorer, fields in scores.items():
        # `type(...) is dict` first: typing.Mapping's isinstance check is slow, and a report of a
        # long run asks it for every field of every sample.
        if type(fields) is not dict and not isinstance(fields, Mapping):
            continue
        for k, v in fields.items():
            if isinstance(v, bool):
                out[f"{scorer}.{k}"] = v
            elif isinstance(v, (int, float)) and math.isfinite(v):
                out[f"{scorer}.{k}"] = float(v)
    return out


@dataclass
class FieldStats:
    """One field's summary in one group."""

    field: str
    kind: str  # "rate" (pass/fail) or "mean"
    mean: float | None
    n: int
    failures: int
    ci_low: float | None
    ci_high: float | None
    ci_method: str  # "wilson", "bootstrap" or "none"

    def to_dict(self) -> dict[str, Any]:
        """As a plain mapping."""
        return asdict(self)


@dataclass
class GroupStats:
    """The summary of one group of samples (e.g. one target, or one target and category)."""

    group: dict[str, Any]
    samples: int
    generation_failures: int
    fields: dict[str, FieldStats] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """As a plain mapping (what a report or the InfluxDB sink consumes)."""
        return {
            "group": dict(self.group),
            "samples": self.samples,
            "generation_failures": self.generation_failures,
            "fields": {k: v.to_dict() for k, v in self.fields.items()},
        }


def _get(sample: SampleResult | Mapping[str, Any], name: str) -> Any:
    return getattr(sample, name) if isinstance(sample, SampleResult) else sample.get(name)


def field_stats(name: str, values: Sequence[float | bool], failures: int = 0, seed: int = 0) -> FieldStats:
    """Mean, count and 95% interval of one field's values.

    Args:
        name: the field name.
        values: the values samples have (bools: pass rate with a Wilson interval).
        failures: samples whose scorer failed on this field (reported, not averaged).
        seed: bootstrap seed.
    """
    n = len(values)
    if n == 0:
        return FieldStats(name, "mean", None, 0, failures, None, None, "none")
    if all(isinstance(v, bool) for v in values):
        k = sum(1 for v in values if v)
        lo, hi = wilson_interval(k, n)
        return FieldStats(name, "rate", k / n, n, failures, lo, hi, "wilson")
    xs = [float(v) for v in values]
    lo, hi = bootstrap_mean_interval(xs, seed=seed)
    return FieldStats(name, "mean", sum(xs) / n, n, failures, lo, hi, "bootstrap")


def aggregate(
    samples: Iterable[SampleResult | Mapping[str, Any]],
    by: Sequence[str] = ("target",),
    fields: Sequence[str] | None = None,
    seed: int = 0,
) -> list[GroupStats]:
    """Group samples and summarise every field: mean, count, failures, 95% interval.

    Args:
        samples: SampleResults or their records.
        by: record attributes to group on, e.g. ("target",) or ("target", "category").
        fields: only these fields (default: every field any sample has).
        seed: bootstrap seed.
    """
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for s in samples:
        groups.setdefault(tuple(_get(s, k) for k in by), []).append(s)
    out = []
    for gkey in sorted(groups, key=lambda t: tuple("" if v is None else str(v) for v in t)):
        members = groups[gkey]
        values: dict[str, list[float | bool]] = {}
        failed_scorers: dict[str, int] = {}
        gen_failures = 0
        for s in members:
            for k, v in sample_fields(s).items():
                values.setdefault(k, []).append(v)
            for scorer in (_get(s, "failures") or {}):
                failed_scorers[scorer] = failed_scorers.get(scorer, 0) + 1
            if not _get(s, "complete") and _get(s, "complete") is not None:
                gen_failures += 1
        names = list(fields) if fields is not None else sorted(values)
        # A scorer that failed on every sample still shows up, with n = 0.
        if fields is None:
            for scorer in failed_scorers:
                if scorer != "generate" and not any(n.startswith(scorer + ".") for n in names):
                    names.append(f"{scorer}.*")
        gs = GroupStats(dict(zip(by, gkey)), len(members), gen_failures)
        for name in names:
            scorer = name.split(".", 1)[0]
            gs.fields[name] = field_stats(name, values.get(name, []), failed_scorers.get(scorer, 0), seed)
        out.append(gs)
    return out


@dataclass
class PairedStats:
    """One field compared between two targets on the same probes."""

    field: str
    kind: str
    n_pairs: int
    mean_a: float | None
    mean_b: float | None
    delta: float | None
    ci_low: float | None
    ci_high: float | None
    mcnemar: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """As a plain mapping."""
        return asdict(self)


def paired_bootstrap_interval(
    a: Sequence[float], b: Sequence[float], level: float = 0.95, rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0
) -> tuple[float, float]:
    """Bootstrap interval of mean(b - a) over paired values (pairs resampled together).

    Args:
        a: values of A.
        b: values of B, pairwise with a.
        level: confidence level.
        rounds: resamples.
        seed: random seed.
    """
    if len(a) != len(b):
        raise ValueError(f"paired values differ in length: {len(a)} and {len(b)}")
    return bootstrap_mean_interval([y - x for x, y in zip(a, b)], level, rounds, seed)


def _pair_key(s: Any) -> tuple[Any, ...]:
    """Samples pair on the same probe and repeat, asked the same way (`plan_signature`: prompt as
    sent, probe set, sampling, scorers) of the same engine (`engine_signature`: base weights,
    engine, settings), so a comparison never mixes plans or engines."""
    rec = s.to_record() if isinstance(s, SampleResult) else s
    return (_get(s, "probe_set"), _get(s, "probe_id"), _get(s, "repeat"), plan_signature(rec), engine_signature(rec))


def compare(
    samples_a: Iterable[SampleResult | Mapping[str, Any]],
    samples_b: Iterable[SampleResult | Mapping[str, Any]],
    fields: Sequence[str] | None = None,
    seed: int = 0,
) -> list[PairedStats]:
    """Compare B against A on the probes both answered: delta = mean(B) - mean(A).

    Args:
        samples_a: the baseline's samples (e.g. the previous checkpoint).
        samples_b: the other target's samples.
        fields: only these fields (default: every field present on both sides).
        seed: bootstrap seed.
    """
    return compare_paired(paired_fields(samples_a), paired_fields(samples_b), fields, seed)


def paired_fields(samples: Iterable[SampleResult | Mapping[str, Any]]) -> dict[tuple[Any, ...], dict[str, float | bool]]:
    """(probe set, probe id, repeat) -> the sample's score fields: one side of `compare_paired`.
    Made once per target when a target is compared more than once (a learning curve compares
    each checkpoint with the base and with the one before).

    Args:
        samples: a target's SampleResults or their records.
    """
    return {_pair_key(s): sample_fields(s) for s in samples}


def compare_paired(
    a: Mapping[tuple[Any, ...], Mapping[str, float | bool]],
    b: Mapping[tuple[Any, ...], Mapping[str, float | bool]],
    fields: Sequence[str] | None = None,
    seed: int = 0,
) -> list[PairedStats]:
    """`compare` on the targets' `paired_fields`.

    Args:
        a: the baseline's paired fields.
        b: the other target's paired fields.
        fields: only these fields (default: every field present on both sides).
        seed: bootstrap seed.
    """
    common = sorted(set(a) & set(b), key=lambda t: tuple(str(x) for x in t))
    names = sorted({k for key in common for k in a[key]} & {k for key in common for k in b[key]})
    if fields is not None:
        names = [f for f in fields]
    out = []
    for name in names:
        pairs = [(a[k][name], b[k][name]) for k in common if name in a[k] and name in b[k]]
        if not pairs:
            out.append(PairedStats(name, "mean", 0, None, None, None, None, None))
            continue
        xa = [float(p[0]) for p in pairs]
        xb = [float(p[1]) for p in pairs]
        ma, mb = sum(xa) / len(xa), sum(xb) / len(xb)
        lo, hi = paired_bootstrap_interval(xa, xb, seed=seed)
        binary = all(isinstance(p[0], bool) and isinstance(p[1], bool) for p in pairs)
        test = None
        if binary:
            test = mcnemar(sum(1 for p in pairs if p[0] and not p[1]), sum(1 for p in pairs if p[1] and not p[0]))
        out.append(PairedStats(name, "rate" if binary else "mean", len(pairs), ma, mb, mb - ma, lo, hi, test))
    return out


NO_EFFECT = "adapter had no effect"


def adapter_effect(target_samples: Iterable[Mapping[str, Any]], base_samples: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Whether an adapter changed any answer that repeats: a checkpoint's answers against the base's
    on the same probes, asked the same way of the same engine (`_pair_key`), greedy (temperature 0)
    or seeded (the engines' seeded sampling repeats an answer for the same logits).

    Returns {"compared", "identical", "no_effect"} (no_effect: every compared answer is the
    base's, which is what a silently dropped adapter looks like), or None when nothing pairs.

    Args:
        target_samples: the checkpoint's sample records.
        base_samples: the base model's sample records.
    """
    def greedy(recs: Iterable[Mapping[str, Any]]) -> dict[tuple[Any, ...], str]:
        out = {}
        for r in recs:
            sampling = (r.get("provenance") or {}).get("sampling") or {}
            if r.get("answer") is not None and (not sampling.get("temperature") or sampling.get("seed") is not None):
                out[_pair_key(r)] = r["answer"]
        return out

    a, b = greedy(target_samples), greedy(base_samples)
    common = set(a) & set(b)
    if not common:
        return None
    same = sum(1 for k in common if a[k] == b[k])
    return {"compared": len(common), "identical": same, "no_effect": same == len(common)}


def min_detectable_difference(n_pairs: int, alpha: float = 0.05) -> float | None:
    """The smallest pass-rate difference an exact McNemar test on `n_pairs` paired probes can call
    significant at `alpha`: every discordant pair one way, k of them, with 2 * 0.5**k < alpha.

    Returns k / n_pairs, or None when even all pairs flipping would not be significant.

    Args:
        n_pairs: probes answered by both sides.
        alpha: the two-sided level.
    """
    k = 1
    while 2 * 0.5**k >= alpha:
        k += 1
    return None if n_pairs < k else k / n_pairs

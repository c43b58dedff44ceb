"""Learning curves from the ledger: per run, each score against iteration with its interval, the base
model as reference, paired deltas between checkpoints, and the best checkpoint only when it is
distinguishable from the base: its improvement significant at ALPHA (exact McNemar on the same
probes, asked the same way), else the report says none is yet and how large a difference the probe
set could detect. Each target's samples are those of its latest identity; a checkpoint whose
adapter had no effect is flagged. Rendered as a terminal table and as a self-contained HTML report."""

from __future__ import annotations

import dataclasses
import datetime as dt
import html
import json
import logging
import os
import pickle
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from cluster._svg import Chart, Series, render

if TYPE_CHECKING:
    from cluster.config import AppConfig

log = logging.getLogger(__name__)

ALPHA = 0.05  # the level at which a checkpoint is called better than the base

# The scores shown, in order, with how to call them. Others (judge dimensions) are added when present.
MAIN_FIELDS = {
    "capability.passed": "capability accuracy",
    "heuristic.lek_score": "LEK score",
    "exact.correct": "exact match",
    "choice.acc": "multiple-choice accuracy",
    "bpb.bits_per_byte": "bits per byte",
}
# Their headings in a narrow table.
SHORT_NAMES = {"capability.passed": "cap.", "heuristic.lek_score": "LEK", "exact.correct": "exact", "choice.acc": "MC",
               "bpb.bits_per_byte": "bpb"}
# Scores where less is better (the rest: more is better).
LOWER_IS_BETTER = {"bpb.bits_per_byte"}


@dataclass
class TargetScores:
    target: str
    label: str
    iteration: int | None
    state: str
    samples: int
    generation_failures: int
    fields: dict[str, Any]  # field -> FieldStats
    n_records: int = 0
    """Its current samples (failed ones included)."""
    newest: float = 0.0
    """When its newest current sample was made (created_at)."""
    plan: frozenset[str] = field(default_factory=frozenset, repr=False)
    """How its current samples were asked (`evaluators.plan_signature` of each: prompt, probe set,
    sampling, scorers)."""
    earlier_plan: bool = False
    """Evaluated under another plan than the run's newest checkpoint: kept off the curve and the verdict."""
    aside: dict[str, int] = field(default_factory=dict)
    """Earlier samples not shown, by why (`evaluators.current_samples`)."""
    version: int | None = None
    """The ledger's version of its samples (`Ledger.target_versions`) these figures were made from."""
    compared_on: str = "current"
    """Which of its samples paired comparisons use: "current", or "complete" (the base: every
    complete sample, so a checkpoint meets the base it was evaluated beside)."""
    load: Callable[[], list[dict[str, Any]]] | None = field(default=None, repr=False, compare=False)
    """Reads the records comparisons use from the ledger, when a comparison is not kept."""
    _records: list[dict[str, Any]] | None = field(default=None, repr=False, compare=False)

    def mean(self, name: str) -> float | None:
        fs = self.fields.get(name)
        return fs.mean if fs is not None else None

    def records(self) -> list[dict[str, Any]]:
        """The records comparisons use (`compared_on`), read once."""
        if self._records is None:
            self._records = self.load() if self.load is not None else []
        return self._records


class ReportCache:
    """The report's per-target figures and paired comparisons, in a SQLite file beside the ledger,
    each kept under the ledger's versions of the samples it was made from (`Ledger.target_versions`:
    they change with every sample written, replaced or deleted). An entry is read only while those
    samples are unchanged, so nothing stale is ever shown; a report of a long run computes only what
    its newest checkpoints changed, and the writer computes a checkpoint's when it is scored
    (`warm_report`). Entries are pickled: the file is the user's own (mode 0600), written only by
    evalcluster. One that cannot be opened (a read-only directory) keeps nothing.

    Args:
        path: the cache file.
    """

    FORMAT = 1  # what an entry holds and how it is computed; a change makes every entry unread
    # Entries are pruned when their samples have changed (`prune`): they can never be read again.

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            db = sqlite3.connect(str(path), timeout=30, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # a lost entry is computed again
            db.execute("CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID")
            # which targets' sample versions each entry was made from: JSON [[target, version], ...]
            columns = {row[1] for row in db.execute("PRAGMA table_info(entries)")}
            if "made_from" not in columns:
                db.execute("ALTER TABLE entries ADD COLUMN made_from TEXT NOT NULL DEFAULT '[]'")
            self._db = db
        except (OSError, sqlite3.Error) as e:
            log.info("report cache %s not kept: %s", path, e)

    @classmethod
    def beside(cls, ledger: Any) -> "ReportCache | None":
        """The cache of a ledger file (None for a ledger without a path)."""
        path = getattr(ledger, "path", None)
        return cls(Path(path).with_name(Path(path).name + ".report-cache")) if path else None

    def get(self, key: tuple[Any, ...]) -> Any:
        if self._db is None or None in key:
            return None
        try:
            row = self._db.execute("SELECT value FROM entries WHERE key = ?", (self._key(key),)).fetchone()
            return pickle.loads(row[0]) if row else None
        except (sqlite3.Error, pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
            log.info("report cache %s: entry unread (%s)", self.path, e)
            return None

    def put(self, key: tuple[Any, ...], value: Any, made_from: list[tuple[str, int]]) -> None:
        """Keep `value` under `key`; `made_from` names the (target, version) of the samples it was
        made from (what `prune` checks)."""
        if self._db is None or None in key:
            return
        try:
            self._db.execute("INSERT OR REPLACE INTO entries (key, value, made_from) VALUES (?, ?, ?)",
                             (self._key(key), pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL),
                              json.dumps(made_from)))
        except sqlite3.Error as e:
            log.info("report cache %s: entry not kept (%s)", self.path, e)

    def prune(self, versions: dict[str, int]) -> int:
        """Delete the entries made from samples that have changed since (or are gone), and those
        of an older FORMAT: none can be read again. Returns how many went.

        Args:
            versions: every target's current version (`Ledger.target_versions`).
        """
        if self._db is None:
            return 0
        try:
            stale = [key for key, made_from in self._db.execute("SELECT key, made_from FROM entries")
                     if not key.startswith(f"[{self.FORMAT},") or made_from == "[]"  # kept before made_from
                     or any(versions.get(t) != v for t, v in json.loads(made_from))]
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("DELETE FROM entries WHERE key = ?", [(k,) for k in stale])
            return len(stale)
        except (sqlite3.Error, ValueError) as e:
            log.info("report cache %s: not pruned (%s)", self.path, e)
            return 0

    def _key(self, key: tuple[Any, ...]) -> str:
        return json.dumps([self.FORMAT, *key])

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> "ReportCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _target_scores(ledger: Any, cache: ReportCache | None, versions: dict[str, int], target: str, label: str,
                   iteration: int | None, state: str, compared_on: str = "current") -> TargetScores:
    """A target's figures over its current samples: kept ones when its samples are unchanged."""
    from evaluators import current_samples

    def load() -> list[dict[str, Any]]:
        records = ledger.samples(target)
        if compared_on == "complete":
            return [r for r in records if r.get("complete", True)]
        return current_samples(records)[0]

    version = versions.get(target)
    kept = cache.get(("scores", target, version)) if cache is not None else None
    if kept is not None:
        ts = dataclasses.replace(kept, label=label, iteration=iteration, state=state)
    else:
        records, aside = current_samples(ledger.samples(target))
        ts = _scores(target, label, iteration, state, records)
        ts.aside, ts.version = aside, version
        if cache is not None:
            cache.put(("scores", target, version), dataclasses.replace(ts, load=None, _records=None),
                      [(target, version)])
        if compared_on == "current":
            ts._records = records
    ts.compared_on, ts.load = compared_on, load
    return ts


class _Comparer:
    """`evaluators.compare` of two targets, kept in the cache under both targets' versions."""

    def __init__(self, cache: ReportCache | None) -> None:
        self.cache = cache

    def __call__(self, a: TargetScores, b: TargetScores, fields: list[str]) -> list[Any]:
        from evaluators import compare

        key = ("compare", a.target, a.version, a.compared_on, b.target, b.version, b.compared_on, *fields)
        kept = self.cache.get(key) if self.cache is not None else None
        if kept is None:
            kept = compare(a.records(), b.records(), fields=fields)
            if self.cache is not None:
                self.cache.put(key, kept, [(a.target, a.version), (b.target, b.version)])
        return kept


@dataclass
class Delta:
    label: str
    versus: str
    field: str
    stats: Any  # PairedStats


@dataclass
class RunCurve:
    run: str
    run_id: str
    model: str
    base: TargetScores | None
    checkpoints: list[TargetScores]
    deltas: list[Delta]
    best: TargetScores | None
    fields: list[str]
    verdict: str = ""
    """One sentence: the best checkpoint and its significant improvement over the base, or that no
    checkpoint is distinguishable from the base yet and the smallest detectable difference."""
    flags: dict[str, str] = field(default_factory=dict)
    """Target id -> its flag ("adapter had no effect")."""
    set_aside: dict[str, dict[str, int]] = field(default_factory=dict)
    """Target id -> earlier samples not shown, by why (`evaluators.current_samples`)."""


def _scores(target: str, label: str, iteration: int | None, state: str, records: list[dict[str, Any]]) -> TargetScores:
    from evaluators import aggregate, plan_signature

    groups = aggregate(records, by=()) if records else []
    g = groups[0] if groups else None
    return TargetScores(target, label, iteration, state, g.samples if g else 0, g.generation_failures if g else 0,
                        dict(g.fields) if g else {}, len(records), max((r.get("created_at") or 0.0 for r in records),
                                                                       default=0.0),
                        frozenset(plan_signature(r) for r in records))


def _mark_earlier_plans(points: list[TargetScores]) -> None:
    """Mark the checkpoints evaluated under another plan than the run's most recently evaluated
    scored one (probe sets, prompts, sampling or scorers changed since): one curve never mixes
    answers to different questions. One still being evaluated is on the plan when what it has so
    far is part of it."""
    scored = [p for p in points if p.state == "scored" and p.n_records]
    if not scored:
        return
    newest = max(scored, key=lambda p: p.newest)
    for p in points:
        if p.n_records:
            p.earlier_plan = not (p.plan == newest.plan or (p.state != "scored" and p.plan <= newest.plan))


def _primary(fields: list[str], base: TargetScores) -> str | None:
    """The pass/fail score a checkpoint is judged on: capability accuracy, else exact match, else
    multiple-choice accuracy."""
    return next((f for f in ("capability.passed", "exact.correct", "choice.acc") if f in fields and f in base.fields),
                None)


def _significant(compare: _Comparer, versus: TargetScores, p: TargetScores, name: str) -> Any:
    """The paired comparison of p against versus on `name` when p is significantly better, else None."""
    st = compare(versus, p, [name])[0]
    pv = (st.mcnemar or {}).get("p_value")
    return st if st.delta is not None and st.delta > 0 and pv is not None and pv < ALPHA else None


def _best(compare: _Comparer, base: TargetScores | None, points: list[TargetScores],
          fields: list[str]) -> tuple[TargetScores | None, str]:
    """The best checkpoint (significantly better than the base, and than the best before it) and
    the sentence that says so, or None and the sentence that says none is distinguishable yet."""
    from evaluators import min_detectable_difference

    scored = [p for p in points if p.state == "scored" and p.n_records and not p.earlier_plan]
    name = _primary(fields, base) if base is not None else None
    if base is None or name is None or not scored:
        return None, "No checkpoint can be compared with the base yet (no scored checkpoint, or no base samples)."
    label = MAIN_FIELDS.get(name, name)
    best, best_st = None, None
    for p in scored:
        st = _significant(compare, base, p, name)
        if st is not None and (best is None or _significant(compare, best, p, name) is not None):
            best, best_st = p, st
    if best is not None and best_st is not None:
        return best, (f"Best checkpoint: {best.label} (iteration {best.iteration}): {label} "
                      f"{best_st.delta:+.0%} over the base, 95% interval {_interval(best_st.ci_low, best_st.ci_high, pct=True)}, "
                      f"exact McNemar p = {best_st.mcnemar['p_value']:.3g} on {best_st.n_pairs} paired probes "
                      f"(significant at the {ALPHA:.0%} level).")
    stats = [(p, compare(base, p, [name])[0]) for p in scored]
    stats = [(p, st) for p, st in stats if st.delta is not None]
    if not stats:
        return None, f"No checkpoint shares probes with the base under the same plan: nothing to compare on {label}."
    p, st = max(stats, key=lambda x: (x[1].delta, x[0].iteration or 0))
    mdd = min_detectable_difference(st.n_pairs, ALPHA)
    detect = (f"with {st.n_pairs} paired probes the smallest difference detectable at the {ALPHA:.0%} level is "
              f"{mdd:.0%}" if mdd is not None else f"{st.n_pairs} paired probes cannot show any difference at the "
              f"{ALPHA:.0%} level")
    return None, (f"No checkpoint is distinguishable from the base yet: the largest {label} change is {p.label} "
                  f"{st.delta:+.0%}, 95% interval {_interval(st.ci_low, st.ci_high, pct=True)}, exact McNemar "
                  f"p = {(st.mcnemar or {}).get('p_value', 1.0):.3g}; {detect}.")


def learning_curves(ledger: Any, run: str | None = None, cache: ReportCache | None = None) -> list[RunCurve]:
    """Every run's curve (or one run's, by run directory or go-ml run id).

    Args:
        ledger: a checkpoints.Ledger (read-only use).
        run: a run directory (e.g. "adapters-smollm2-demo") or run id; None for all runs.
        cache: where figures are kept between reports (default: the file beside the ledger,
            `ReportCache.beside`).
    """
    owned = cache is None
    cache = ReportCache.beside(ledger) if cache is None else cache
    try:
        return _learning_curves(ledger, run, cache)
    finally:
        if owned and cache is not None:
            cache.close()


def warm_report(ledger: Any, run: str) -> None:
    """Compute and keep a run's figures now (the writer, when one of its checkpoints is scored), so
    a report of a long run reads them instead of every sample; and drop the kept figures no report
    can read any more (their samples changed)."""
    cache = ReportCache.beside(ledger)
    if cache is None:
        return
    with cache:
        learning_curves(ledger, run, cache)
        cache.prune(ledger.target_versions())


def _learning_curves(ledger: Any, run: str | None, cache: ReportCache | None) -> list[RunCurve]:
    entries = ledger.list()
    runs: dict[str, list[Any]] = {}
    for e in entries:
        runs.setdefault(e.checkpoint.run, []).append(e)
    if run is not None:
        runs = {r: es for r, es in runs.items() if run in (r, es[0].checkpoint.run_id)}
        if not runs:
            known = sorted({f"{r} ({es[0].checkpoint.run_id})" for r, es in _by_run(entries).items()})
            raise ValueError(f"no run {run!r} in the ledger (known: {', '.join(known) or 'none'})")
    versions = ledger.target_versions() if cache is not None else {}
    compare = _Comparer(cache)
    curves = []
    for r, es in sorted(runs.items()):
        es.sort(key=lambda e: e.checkpoint.iteration)
        model = _model_of(ledger, es)
        base = None
        if model:
            # Shown as it is now; compared on every complete sample it has: pairs form only on the
            # same engine and plan (evaluators.compare), so a checkpoint meets the base it was
            # evaluated beside.
            base = _target_scores(ledger, cache, versions, f"base:{model}", "base", 0, "scored", "complete")
        aside = {f"base:{model}": base.aside} if base is not None else {}
        if base is not None and not base.n_records:
            base = None
        points = [_target_scores(ledger, cache, versions, e.id, e.checkpoint.label, e.checkpoint.iteration, e.state)
                  for e in es]
        aside.update({p.target: p.aside for p in points})
        _mark_earlier_plans(points)
        fields = [f for f in MAIN_FIELDS if any(f in p.fields for p in points + ([base] if base else []))]
        extra = sorted({f for p in points for f in p.fields if f not in MAIN_FIELDS and _numeric(p.fields[f])})
        fields += extra
        deltas: list[Delta] = []
        prev: TargetScores | None = None
        for p in points:
            if not p.n_records:
                continue
            for versus in ([base] if base else []) + ([prev] if prev else []):
                for st in compare(versus, p, [f for f in fields if f in p.fields]):
                    deltas.append(Delta(p.label, versus.label, st.field, st))
            prev = p
        best, verdict = _best(compare, base, points, fields)
        flags = {t: f["flag"] for t, f in ledger.target_flags().items() if t in {e.id for e in es}}
        curves.append(RunCurve(r, es[0].checkpoint.run_id, model, base, points, deltas, best, fields, verdict, flags,
                               {t: a for t, a in aside.items() if a}))
    return curves


def _by_run(entries: Iterable[Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for e in entries:
        out.setdefault(e.checkpoint.run, []).append(e)
    return out


def _numeric(fs: Any) -> bool:
    return fs.mean is not None


def _model_of(ledger: Any, entries: list[Any]) -> str:
    """The config model a run's checkpoints were evaluated on (from a sample's provenance)."""
    for e in entries:
        for rec in ledger.sample_scores(e.id)[:1]:
            return (rec.get("provenance") or {}).get("model") or ""
    return ""


# --------------------------------------------------------------------------- the terminal table


def _fmt(fs: Any) -> str:
    if fs is None or fs.mean is None:
        return "-"
    pct = fs.kind == "rate"
    m = f"{fs.mean:.0%}" if pct else f"{fs.mean:.3f}"
    if fs.ci_low is None or fs.ci_high is None:
        return m
    lo, hi = (f"{fs.ci_low:.0%}", f"{fs.ci_high:.0%}") if pct else (f"{fs.ci_low:.3f}", f"{fs.ci_high:.3f}")
    return f"{m} [{lo}, {hi}]"


def curve_table(curve: RunCurve, width: int = 160) -> Any:
    """A rich Table: one row per target (base first), one column per main score, fitted to `width`
    (scores lose their intervals, then the less important columns go, before anything is cut).

    Args:
        curve: the run's curve.
        width: the terminal's width.
    """
    from cluster._terminal import Col, fit_table

    fields = [f for f in curve.fields if f in MAIN_FIELDS] or curve.fields[:3]
    cols = [Col("checkpoint", whole=True), Col("iteration", "iter.", right=True, optional=True), Col("state", optional=True),
            Col("samples", right=True, optional=True),
            *[Col(MAIN_FIELDS.get(f, f), SHORT_NAMES.get(f), right=True) for f in fields]]
    rows = []
    for p in ([curve.base] if curve.base else []) + curve.checkpoints:
        best = " ★" if curve.best is not None and p.target == curve.best.target else ""
        best += " (no effect)" if p.target in curve.flags else ""
        best += " (earlier plan)" if p.earlier_plan else ""
        scores = [(_fmt(p.fields.get(f)), _fmt(p.fields.get(f)).split(" [")[0]) for f in fields]
        rows.append([p.label + best, "-" if p.iteration is None else str(p.iteration), p.state, str(p.samples),
                     *scores])
    return fit_table(f"{curve.run}  ({curve.run_id}, model {curve.model or '?'})", cols, rows, width)


# --------------------------------------------------------------------------- the HTML report


_CSS = """body{font-family:sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:right}th{background:#f4f4f4}td.l,th.l{text-align:left}
.pos{color:#1a7f37}.neg{color:#c62828}.charts{display:flex;flex-wrap:wrap;gap:12px}.note{color:#666;font-size:12px}"""


def _chart(curve: RunCurve, name: str) -> str:
    pts = [p for p in curve.checkpoints
           if not p.earlier_plan and p.fields.get(name) is not None and p.fields[name].mean is not None]
    fs_any = next((p.fields[name] for p in pts), None)
    pct = fs_any is not None and fs_any.kind == "rate"
    series = Series(
        MAIN_FIELDS.get(name, name),
        [float(p.iteration or 0) for p in pts],
        [p.fields[name].mean for p in pts],
        [p.fields[name].ci_low if p.fields[name].ci_low is not None else p.fields[name].mean for p in pts],
        [p.fields[name].ci_high if p.fields[name].ci_high is not None else p.fields[name].mean for p in pts],
    )
    refs = []
    if curve.base is not None and name in curve.base.fields and curve.base.fields[name].mean is not None:
        refs.append(("base model", curve.base.fields[name].mean))
    return render(Chart(MAIN_FIELDS.get(name, name), [series], y_label="rate" if pct else "mean", references=refs,
                        y_min=0.0 if pct else None, y_max=1.0 if pct else None))


def _interval(low: float | None, high: float | None, pct: bool = False) -> str:
    """A delta's interval, or "—" when there is none (too few pairs to resample)."""
    if low is None or high is None:
        return "—"
    return f"[{low:+.0%}, {high:+.0%}]" if pct else f"[{low:+.3f}, {high:+.3f}]"


def write_html(curves: list[RunCurve], out: Path, title: str = "evalcluster report") -> Path:
    """Write the report: per run, a chart per score and the table of paired deltas.

    Args:
        curves: from `learning_curves`.
        out: the .html file to write.
        title: the page title.
    """
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
             f"<p class='note'>generated {dt.datetime.now().isoformat(timespec='seconds')} from the ledger. "
             "Bands are 95% intervals (Wilson for pass rates, bootstrap for means); the dashed line is the base "
             "model. Deltas are paired on the same probes (bootstrap interval; McNemar p for pass/fail).</p>"]
    for c in curves:
        parts.append(f"<h2>{html.escape(c.run)} <span class='note'>run id {html.escape(c.run_id)}, model "
                     f"{html.escape(c.model or '?')}</span></h2>")
        parts.append(f"<p class='verdict'><b>{html.escape(c.verdict)}</b></p>")
        for t, flag in sorted(c.flags.items()):
            label = next((p.label for p in c.checkpoints if p.target == t), t)
            parts.append(f"<p class='neg'>{html.escape(label)}: {html.escape(flag)} (every greedy or seeded answer equals "
                         "the base's: the adapter was probably not applied)</p>")
        earlier = [p for p in c.checkpoints if p.earlier_plan]
        if earlier:
            parts.append(f"<p class='note'>{html.escape(', '.join(p.label for p in earlier))}: evaluated under an "
                         "earlier plan (probe sets, prompts, sampling or scorers changed since), so not on the curves "
                         "nor in the verdict; `evalcluster checkpoints retry ID` evaluates one again.</p>")
        parts.append("<div class='charts'>" + "".join(_chart(c, f) for f in c.fields) + "</div>")
        parts.append("<table><tr><th class='l'>checkpoint</th><th>iteration</th><th class='l'>state</th><th>samples</th>"
                     + "".join(f"<th>{html.escape(MAIN_FIELDS.get(f, f))}</th>" for f in c.fields) + "</tr>")
        for p in ([c.base] if c.base else []) + c.checkpoints:
            label = p.label + (" (earlier plan)" if p.earlier_plan else "")
            parts.append(f"<tr><td class='l'>{html.escape(label)}</td><td>{p.iteration if p.iteration is not None else '-'}"
                         f"</td><td class='l'>{p.state}</td><td>{p.samples}</td>"
                         + "".join(f"<td>{html.escape(_fmt(p.fields.get(f)))}</td>" for f in c.fields) + "</tr>")
        parts.append("</table>")
        if c.deltas:
            parts.append("<h3>Checkpoint deltas (paired)</h3><table><tr><th class='l'>checkpoint</th><th class='l'>versus</th>"
                         "<th class='l'>score</th><th>pairs</th><th>delta</th><th>95% interval</th><th>McNemar p</th></tr>")
            for d in c.deltas:
                st = d.stats
                if st.delta is None:
                    continue
                up = "pos" if st.ci_low is not None and st.ci_low > 0 else "neg" if st.ci_high is not None and st.ci_high < 0 else ""
                # coloured by better or worse: a rise in bits per byte is worse
                cls = {"pos": "neg", "neg": "pos"}.get(up, "") if d.field in LOWER_IS_BETTER else up
                p = (st.mcnemar or {}).get("p_value")
                parts.append(f"<tr><td class='l'>{html.escape(d.label)}</td><td class='l'>{html.escape(d.versus)}</td>"
                             f"<td class='l'>{html.escape(MAIN_FIELDS.get(d.field, d.field))}</td><td>{st.n_pairs}</td>"
                             f"<td class='{cls}'>{st.delta:+.3f}</td><td>{_interval(st.ci_low, st.ci_high)}</td>"
                             f"<td>{'-' if p is None else f'{p:.3g}'}</td></tr>")
            parts.append("</table>")
    if not curves:
        parts.append("<p>No runs in the ledger yet.</p>")
    parts.append("</body></html>")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts))
    return out


def print_curves(cfg: "AppConfig", run: str | None = None) -> None:
    """Print each run's learning-curve table from the config's ledger (nothing when there is none yet)."""
    from cluster.config import ledger_exists, open_ledger
    from cluster._terminal import cell, table_console

    if not ledger_exists(cfg):
        return
    ledger = open_ledger(cfg, readonly=True)
    console = table_console()
    try:
        for curve in learning_curves(ledger, run):
            console.print(curve_table(curve, console.width))
            console.print(cell(curve.verdict))
    finally:
        ledger.close()

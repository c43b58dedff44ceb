"""Learning curves from the ledger: per run, each score against iteration with its interval, the base
model as reference, paired deltas between checkpoints, the best checkpoint so far. Rendered as a
terminal table and as a self-contained HTML report."""

from __future__ import annotations

import datetime as dt
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from cluster._svg import Chart, Series, render

if TYPE_CHECKING:
    from cluster.config import AppConfig

# The scores shown, in order, with how to call them. Others (judge dimensions) are added when present.
MAIN_FIELDS = {
    "capability.passed": "capability accuracy",
    "heuristic.lek_score": "LEK score",
    "exact.correct": "exact match",
}


@dataclass
class TargetScores:
    target: str
    label: str
    iteration: int | None
    state: str
    samples: int
    generation_failures: int
    fields: dict[str, Any]  # field -> FieldStats
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def mean(self, name: str) -> float | None:
        fs = self.fields.get(name)
        return fs.mean if fs is not None else None


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


def _scores(target: str, label: str, iteration: int | None, state: str, records: list[dict[str, Any]]) -> TargetScores:
    from evaluators import aggregate

    groups = aggregate(records, by=()) if records else []
    g = groups[0] if groups else None
    return TargetScores(target, label, iteration, state, g.samples if g else 0, g.generation_failures if g else 0,
                        dict(g.fields) if g else {}, records)


def best_key(means: dict[str, float | None], iteration: int | None) -> tuple[float, float, int]:
    """What makes a checkpoint the best of its run: capability accuracy, then LEK score, then the
    later iteration.

    Args:
        means: field -> mean.
        iteration: the checkpoint's iteration.
    """
    return (means.get("capability.passed") or 0.0, means.get("heuristic.lek_score") or 0.0, iteration or 0)


def _best(points: list[TargetScores]) -> TargetScores | None:
    scored = [p for p in points if p.state == "scored" and p.samples]
    if not scored:
        return None
    return max(scored, key=lambda p: best_key({f: p.mean(f) for f in MAIN_FIELDS}, p.iteration))


def learning_curves(ledger: Any, run: str | None = None) -> list[RunCurve]:
    """Every run's curve (or one run's, by run directory or go-ml run id).

    Args:
        ledger: a checkpoints.Ledger (read-only use).
        run: a run directory (e.g. "adapters-smollm2-demo") or run id; None for all runs.
    """
    from evaluators import compare_paired, paired_fields

    entries = ledger.list()
    runs: dict[str, list[Any]] = {}
    for e in entries:
        runs.setdefault(e.checkpoint.run, []).append(e)
    if run is not None:
        runs = {r: es for r, es in runs.items() if run in (r, es[0].checkpoint.run_id)}
        if not runs:
            known = sorted({f"{r} ({es[0].checkpoint.run_id})" for r, es in _by_run(entries).items()})
            raise ValueError(f"no run {run!r} in the ledger (known: {', '.join(known) or 'none'})")
    curves = []
    for r, es in sorted(runs.items()):
        es.sort(key=lambda e: e.checkpoint.iteration)
        model = _model_of(ledger, es)
        base_records = ledger.sample_scores(f"base:{model}") if model else []
        base = _scores(f"base:{model}", "base", 0, "scored", base_records) if base_records else None
        points = [_scores(e.id, e.checkpoint.label, e.checkpoint.iteration, e.state, ledger.sample_scores(e.id))
                  for e in es]
        fields = [f for f in MAIN_FIELDS if any(f in p.fields for p in points + ([base] if base else []))]
        extra = sorted({f for p in points for f in p.fields if f not in MAIN_FIELDS and _numeric(p.fields[f])})
        fields += extra
        deltas: list[Delta] = []
        prev: tuple[TargetScores, dict] | None = None
        paired_base = (base, paired_fields(base.records)) if base else None
        for p in points:
            if not p.records:
                continue
            mine = paired_fields(p.records)  # once per checkpoint: it is compared twice
            for versus, theirs in ([paired_base] if paired_base else []) + ([prev] if prev else []):
                for st in compare_paired(theirs, mine, fields=[f for f in fields if f in p.fields]):
                    deltas.append(Delta(p.label, versus.label, st.field, st))
            prev = (p, mine)
        curves.append(RunCurve(r, es[0].checkpoint.run_id, model, base, points, deltas, _best(points), fields))
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
    short = {"capability.passed": "cap.", "heuristic.lek_score": "LEK", "exact.correct": "exact"}
    cols = [Col("checkpoint", whole=True), Col("iteration", "iter.", right=True, optional=True), Col("state", optional=True),
            Col("samples", right=True, optional=True),
            *[Col(MAIN_FIELDS.get(f, f), short.get(f), right=True) for f in fields]]
    rows = []
    for p in ([curve.base] if curve.base else []) + curve.checkpoints:
        best = " ★" if curve.best is not None and p.target == curve.best.target else ""
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
    pts = [p for p in curve.checkpoints if p.fields.get(name) is not None and p.fields[name].mean is not None]
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


def _interval(low: float | None, high: float | None) -> str:
    """A delta's interval, or "—" when there is none (too few pairs to resample)."""
    if low is None or high is None:
        return "—"
    return f"[{low:+.3f}, {high:+.3f}]"


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
        if c.best is not None:
            parts.append(f"<p>Best checkpoint so far: <b>{html.escape(c.best.label)}</b> (iteration {c.best.iteration}"
                         + "".join(f", {MAIN_FIELDS[f]} {_fmt(c.best.fields.get(f))}" for f in MAIN_FIELDS
                                   if f in c.best.fields) + ")</p>")
        parts.append("<div class='charts'>" + "".join(_chart(c, f) for f in c.fields) + "</div>")
        parts.append("<table><tr><th class='l'>checkpoint</th><th>iteration</th><th class='l'>state</th><th>samples</th>"
                     + "".join(f"<th>{html.escape(MAIN_FIELDS.get(f, f))}</th>" for f in c.fields) + "</tr>")
        for p in ([c.base] if c.base else []) + c.checkpoints:
            parts.append(f"<tr><td class='l'>{html.escape(p.label)}</td><td>{p.iteration if p.iteration is not None else '-'}"
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
                cls = "pos" if st.ci_low is not None and st.ci_low > 0 else "neg" if st.ci_high is not None and st.ci_high < 0 else ""
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
    from cluster._terminal import table_console

    if not ledger_exists(cfg):
        return
    ledger = open_ledger(cfg, readonly=True)
    console = table_console()
    try:
        for curve in learning_curves(ledger, run):
            console.print(curve_table(curve, console.width))
    finally:
        ledger.close()

"""Small SVG line charts for the HTML report: learning curves with interval bands.

No plotting library: a chart is a few dozen SVG elements, and the report must open anywhere.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


@dataclass
class Series:
    """One curve: y (with an optional [lo, hi] band) against x."""

    name: str
    xs: list[float]
    ys: list[float]
    lo: list[float] | None = None
    hi: list[float] | None = None
    color: str | None = None


@dataclass
class Chart:
    title: str
    series: list[Series]
    y_label: str = ""
    x_label: str = "iteration"
    # Horizontal reference lines, e.g. the base model's score: (label, y).
    references: list[tuple[str, float]] = field(default_factory=list)
    y_min: float | None = None
    y_max: float | None = None
    width: int = 640
    height: int = 320


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    ticks = []
    v = start
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 10))
        v += step
    return ticks


def _fmt(v: float) -> str:
    if v == int(v) and abs(v) < 1e6:
        return f"{int(v):,}"
    return f"{v:.3g}"


def render(chart: Chart) -> str:
    """The chart as an inline <svg> element.

    Args:
        chart: what to draw.
    """
    W, H = chart.width, chart.height
    left, right, top, bottom = 58, 150, 28, 42
    pw, ph = W - left - right, H - top - bottom
    xs = [x for s in chart.series for x in s.xs]
    ys = [y for s in chart.series for y in s.ys if y is not None and not math.isnan(y)]
    for s in chart.series:
        ys += [v for v in (s.lo or []) + (s.hi or []) if v is not None and not math.isnan(v)]
    ys += [y for _, y in chart.references]
    if not xs or not ys:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="60"><text x="10" y="30">'
                f"{html.escape(chart.title)}: no data yet</text></svg>")
    x0, x1 = min(xs), max(xs)
    if x0 == x1:
        x0, x1 = x0 - 1, x1 + 1
    y0 = chart.y_min if chart.y_min is not None else min(ys)
    y1 = chart.y_max if chart.y_max is not None else max(ys)
    if y0 == y1:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = (y1 - y0) * 0.05
    if chart.y_min is None:
        y0 -= pad
    if chart.y_max is None:
        y1 += pad

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
           f'font-size="11" role="img" aria-label="{html.escape(chart.title)}">',
           f'<text x="{left}" y="16" font-size="13" font-weight="bold">{html.escape(chart.title)}</text>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#ccc"/>']
    for t in _nice_ticks(y0, y1):
        if y0 <= t <= y1:
            out.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#eee"/>')
            out.append(f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    for t in _nice_ticks(x0, x1, 6):
        if x0 <= t <= x1:
            out.append(f'<text x="{px(t):.1f}" y="{top + ph + 16}" text-anchor="middle">{_fmt(t)}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{H - 6}" text-anchor="middle">{html.escape(chart.x_label)}</text>')
    if chart.y_label:
        out.append(f'<text transform="translate(14,{top + ph / 2}) rotate(-90)" text-anchor="middle">'
                   f"{html.escape(chart.y_label)}</text>")
    legend_y = top + 4
    for label, y in chart.references:
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#555" '
                   f'stroke-dasharray="5,4"/>')
        out.append(f'<line x1="{left + pw + 10}" x2="{left + pw + 30}" y1="{legend_y + 4}" y2="{legend_y + 4}" '
                   f'stroke="#555" stroke-dasharray="5,4"/>')
        out.append(f'<text x="{left + pw + 34}" y="{legend_y + 8}">{html.escape(label)}</text>')
        legend_y += 16
    for i, s in enumerate(chart.series):
        color = s.color or PALETTE[i % len(PALETTE)]
        pts = sorted(zip(s.xs, s.ys, s.lo or [None] * len(s.xs), s.hi or [None] * len(s.xs)))
        band = [(x, lo, hi) for x, _, lo, hi in pts if lo is not None and hi is not None]
        if len(band) >= 2:
            upper = " ".join(f"{px(x):.1f},{py(hi):.1f}" for x, _, hi in band)
            lower = " ".join(f"{px(x):.1f},{py(lo):.1f}" for x, lo, _ in reversed(band))
            out.append(f'<polygon points="{upper} {lower}" fill="{color}" fill-opacity="0.15" stroke="none"/>')
        line = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y, _, _ in pts if y is not None)
        if len(pts) > 1:
            out.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="2"/>')
        for x, y, lo, hi in pts:
            if y is None:
                continue
            if lo is not None and hi is not None and len(band) < 2:
                out.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{py(lo):.1f}" y2="{py(hi):.1f}" '
                           f'stroke="{color}"/>')
            tip = f"{s.name} @ {_fmt(x)}: {y:.3g}" + (f" [{lo:.3g}, {hi:.3g}]" if lo is not None else "")
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}">'
                       f"<title>{html.escape(tip)}</title></circle>")
        out.append(f'<rect x="{left + pw + 10}" y="{legend_y}" width="20" height="8" fill="{color}"/>')
        out.append(f'<text x="{left + pw + 34}" y="{legend_y + 8}">{html.escape(s.name[:18])}</text>')
        legend_y += 16
    out.append("</svg>")
    return "\n".join(out)

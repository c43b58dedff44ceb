"""The HTML report renders what the statistics give it, including intervals that could not be made."""

from __future__ import annotations

from pathlib import Path

from cluster._report import Delta, RunCurve, TargetScores, write_html
from evaluators._stats import FieldStats, PairedStats


def _point(label: str, iteration: int, mean: float) -> TargetScores:
    fs = FieldStats("capability.passed", "rate", mean, 4, 0, None, None, "none")
    return TargetScores(f"t-{iteration}", label, iteration, "scored", 4, 0, {"capability.passed": fs})


def test_delta_without_an_interval_renders_a_dash(tmp_path: Path) -> None:
    a, b = _point("S @0000100", 100, 0.25), _point("S @0000200", 200, 0.5)
    # A delta with no interval (what compare() gives when a bootstrap cannot be made), one with.
    bare = PairedStats("capability.passed", "rate", 1, 0.25, 0.5, 0.25, None, None, None)
    full = PairedStats("capability.passed", "rate", 4, 0.25, 0.5, 0.25, -0.1, 0.6, {"p_value": 0.5})
    curve = RunCurve("adapters-s", "s-run", "smollm2", None, [a, b],
                     [Delta(b.label, a.label, "capability.passed", bare),
                      Delta(b.label, "base", "capability.passed", full)], b, ["capability.passed"])
    page = write_html([curve], tmp_path / "r.html").read_text()
    rows = [r for r in page.split("<tr>") if "S @0000200" in r and "+0.250" in r]
    assert len(rows) == 2, rows
    bare_row, full_row = rows
    assert "<td>—</td>" in bare_row and "<td>-</td>" in bare_row  # no interval, no McNemar p
    assert "[-0.100, +0.600]" in full_row and "0.5" in full_row

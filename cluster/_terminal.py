"""What the commands print: tables sized for terminals and job logs, progress bars, numbers."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Sequence


def plain(value: object) -> str:
    """Text from outside (a run or file name, a failure reason) as it may reach a terminal: control
    characters (ANSI escapes, tabs, line breaks) and bytes that were not UTF-8 shown as escapes
    (`\\x1b`, `\\t`, `\\udcff`), so a name can neither drive the terminal nor break a row.

    Args:
        value: the text.
    """
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in str(value))


def cell(value: object) -> Any:
    """`plain(value)` as a rich Text: a table cell or title that is never read as rich markup (a run
    named `adapters-[/x]` is text, not a closing tag)."""
    from rich.text import Text

    return Text(plain(value))


def table_console() -> Any:
    """A rich Console for tables: the terminal's width, or 160 columns in job logs and pipes (where
    rich would otherwise wrap every row at 80)."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console.width = 160
    return console


@dataclass(frozen=True)
class Col:
    """A column of a `fit_table`.

    Args:
        header: its heading.
        short: a shorter heading for narrow terminals (default: the heading).
        right: right-justified (numbers).
        optional: dropped, last optional column first, when the table cannot fit otherwise.
        whole: never wrapped (a run name) unless it is wider than the terminal by itself; the
            other columns give way first.
    """

    header: str
    short: str | None = None
    right: bool = False
    optional: bool = False
    whole: bool = False


def _text_of(value: Any, compact: bool) -> str:
    if isinstance(value, tuple):
        return plain(value[1] if compact else value[0])
    return plain(value)


def fit_table(title: str, cols: Sequence[Col], rows: Sequence[Sequence[Any]], width: int) -> Any:
    """A rich Table that reads whole in `width` columns: every cell is shown uncut. A cell may be
    a (full, compact) pair (a score with and without its interval, a label and its iteration).
    When the full table is too wide the compact forms and short headings are used, then optional
    columns are left out (the last first); only a cell wider than the terminal by itself (a very
    long run name) wraps, and wraps whole: no cell is ever cut short with an ellipsis.

    Args:
        title: the table's title (plain text, never markup).
        cols: the columns.
        rows: one sequence of cells per row, in column order.
        width: the terminal's width.
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table

    def build(keep: list[int], cells: bool, heads: bool, wrap: bool) -> Table:
        t = Table(title=cell(title), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        for i in keep:
            c = cols[i]
            longest = max([0] + [len(_text_of(r[i], cells)) for r in rows])
            whole = c.whole and longest <= width - 10
            t.add_column(cell((c.short or c.header) if heads else c.header), justify="right" if c.right else "left",
                         no_wrap=whole or not wrap, overflow="fold", min_width=longest if whole else None)
        for r in rows:
            t.add_row(*[cell(_text_of(r[i], cells)) for i in keep])
        legend = [f"{cols[i].short}: {cols[i].header}" for i in keep if heads and cols[i].short
                  and cols[i].short != cols[i].header]
        if legend:
            t.caption, t.caption_justify = cell(", ".join(legend)), "left"
        return t

    measure = Console(width=10_000)

    def fits(t: Table) -> bool:
        return measure.measure(t).maximum <= width

    keep = list(range(len(cols)))
    # Full; compact cells; compact cells and short headings; then optional columns left out.
    levels = [(False, False), (True, False), (True, True)]
    cells, heads = next((lv for lv in levels if fits(build(keep, *lv, False))), levels[-1])
    optional = [i for i in range(len(cols)) if cols[i].optional]
    while optional and not fits(build(keep, cells, heads, False)):
        keep.remove(optional.pop())
    return build(keep, cells, heads, wrap=not fits(build(keep, cells, heads, False)))


class Bar:
    """A rich progress bar on stderr, fed by the runner's progress callback; silent when stderr
    is not a terminal. Use as a context manager so it is stopped whatever happens."""

    def __init__(self, description: str) -> None:
        self.bar = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=Console(stderr=True), transient=True)
            self.task = self.bar.add_task(description, total=None)

    def __enter__(self) -> "Bar":
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __call__(self, p: Any) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=p.done + p.skipped, total=p.total)


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def ci_text(f: dict[str, Any]) -> str:
    """" [low, high]" of a stats dict with ci_low/ci_high, or "" when it has no interval."""
    if f.get("ci_low") is None:
        return ""
    return f" [{f['ci_low']:.2f}, {f['ci_high']:.2f}]"

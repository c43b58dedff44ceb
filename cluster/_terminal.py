"""What the commands print: tables sized for terminals and job logs, progress bars, numbers."""

from __future__ import annotations

import sys
from typing import Any



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
    if not console.is_terminal:
        console.width = 160
    return console


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

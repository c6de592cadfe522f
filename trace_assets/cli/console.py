"""What the `trace` command prints: aligned tables (`table`) and the progress of long work
(`progress`), both through `rich`.

Tables go to stdout, plain (no borders, no colour) when stdout is not a terminal so that
scripts can split their columns on whitespace; progress goes to stderr, as a bar on a terminal
and as one line per step otherwise (a log, a CI job), so stdout stays the command's answer.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["Progress", "progress", "table"]


def _console(stream: Any) -> Console:
    from rich.console import Console

    tty = stream.isatty()
    # off a terminal no width limit: a table is never wrapped or cut for a pipe
    return Console(file=stream, width=None if tty else 10_000, no_color=not tty, highlight=False)


def table(
    columns: Sequence[str], rows: Sequence[Sequence[Any]], *, right: Sequence[str] = ()
) -> None:
    """Print `rows` under `columns`, aligned (the columns in `right` right-aligned)."""
    from rich import box
    from rich.table import Table

    console = _console(sys.stdout)
    grid = Table(
        box=box.SIMPLE_HEAD if console.is_terminal else None,
        show_edge=False,
        pad_edge=False,
        header_style="bold" if console.is_terminal else "",
    )
    for name in columns:
        grid.add_column(name, justify="right" if name in right else "left", no_wrap=True)
    for row in rows:
        grid.add_row(*("-" if cell is None else str(cell) for cell in row))
    console.print(grid, soft_wrap=False)


class Progress:
    """One unit of long work: `advance(label)` after each step."""

    def __init__(self, description: str, total: int, bar: Any | None) -> None:
        self.description = description
        self.total = total
        self.done = 0
        self._bar = bar
        self._task = bar.add_task(description, total=total) if bar is not None else None

    def advance(self, label: str = "") -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=f"{self.description} {label}")
        else:
            sys.stderr.write(
                f"{self.description}: {self.done}/{self.total} {label}".rstrip() + "\n"
            )
            sys.stderr.flush()


@contextmanager
def progress(description: str, total: int) -> Iterator[Progress]:
    """A progress bar on stderr when it is a terminal, else one line per step."""
    if not sys.stderr.isatty():
        yield Progress(description, total, None)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.progress import Progress as Bar

    with Bar(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=_console(sys.stderr),
        transient=False,
    ) as bar:
        yield Progress(description, total, bar)

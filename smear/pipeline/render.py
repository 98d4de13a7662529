"""Rich rendering for the CLI: summary table and a progress bar fed by a callback."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table


def render_table(df: pd.DataFrame, console: Console) -> None:
    """One column per slide, one row per figure: reads like a differential sheet."""
    table = Table(title="smear differential", show_lines=False)
    table.add_column("")
    for slide in df["slide"]:
        table.add_column(str(slide), justify="right")
    for col in df.columns:
        if col == "slide":
            continue
        values = ["" if pd.isna(v) else str(v) for v in df[col]]
        if all(v == "" for v in values):
            continue
        table.add_row(col, *values)
    console.print(table)


@contextlib.contextmanager
def progress(console: Console, total: int) -> Iterator[Callable[[], None]]:
    """A progress bar over fields on ``console``; yields a function to call once per field."""
    bar = Progress(TextColumn("fields"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=console, transient=True, disable=not console.is_terminal)
    with bar:
        task = bar.add_task("fields", total=total)
        yield lambda: bar.advance(task)

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


def render_detect_metrics(metrics: dict, console: Console) -> None:
    """Detector figures: one row per source (and all), AP50 per class, P/R per class."""
    table = Table(title=f"detector evaluation ({metrics['n_images']} fields)")
    for col in ("source", "fields", "mAP50", "mAP50-95", "AP50 wbc", "AP50 rbc", "AP50 platelet",
                "P/R wbc", "P/R rbc", "P/R platelet"):
        table.add_column(col, justify="right" if col != "source" else "left")

    def row(name: str, m: dict) -> None:
        pc = m["per_class"]
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        pr = [f"{fmt(pc[k]['precision'])}/{fmt(pc[k]['recall'])}" for k in ("wbc", "rbc", "platelet")]
        table.add_row(name, str(m["n_images"]), fmt(m["map50"]), fmt(m["map50_95"]),
                      *(fmt(pc[k]["ap50"]) for k in ("wbc", "rbc", "platelet")), *pr)

    row("all", metrics)
    for src, m in metrics.get("per_source", {}).items():
        row(src, m)
    console.print(table)

"""Rich rendering for the CLI: summary table and a progress bar fed by a callback."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text


def render_summary(rows: list[dict], console: Console) -> None:
    """Per slide: a differential sheet (class, n, %, CI) with counts, warnings and flags."""
    from smear.types import FINE_CLASSES, FINE_NAMES

    for row in rows:
        head = (f"[bold]{escape(str(row['slide']))}[/]: {row['n_fields']} fields, {row['n_wbc']} WBC"
                + (f", {row['n_unidentified']} unidentified" if row["classified"] else "")
                + f", {row['n_rbc']} RBC ({row['rbc_per_field']}/field), {row['n_platelet']} platelets"
                + f" ({row['platelets_per_field']}/field)"
                + (f", {row['n_skipped']} fields skipped" if row["n_skipped"] else ""))
        for w in row.get("domain_warnings", []):
            console.print(f"[bold red]WARNING:[/] {escape(w)}", markup=True)
        console.print(head, markup=True)
        if row["classified"]:
            table = Table(show_edge=False, pad_edge=False)
            for col, just in (("class", "left"), ("", "left"), ("n", "right"), ("%", "right"),
                              ("95% CI", "right")):
                table.add_column(col, justify=just)
            for code in FINE_CLASSES:
                pct = row[f"{code}_pct"]
                ci = "" if pct is None else f"{row[f'{code}_ci_low']:.1f}-{row[f'{code}_ci_high']:.1f}"
                table.add_row(code, FINE_NAMES[code], str(row[f"{code}_n"]), "" if pct is None else f"{pct:.1f}", ci)
            console.print(table)
            if row["nrbc_per_100_wbc"] is not None:
                console.print(f"NRBC per 100 WBC: {row['nrbc_per_100_wbc']}")
        for flag in row["flags"]:
            console.print(f"[yellow]flag:[/] {escape(flag)}", markup=True)
        console.print()


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
    skipped = f", {metrics['n_skipped']} unreadable skipped" if metrics.get("n_skipped") else ""
    table = Table(title=f"detector evaluation ({metrics['n_images']} fields{skipped})")
    for col in ("source", "fields", "mAP50", "mAP50-95", "AP50 wbc", "AP50 rbc", "AP50 platelet",
                "P/R wbc", "P/R rbc", "P/R platelet"):
        table.add_column(col, justify="right" if col != "source" else "left")

    def row(name: str, m: dict) -> None:
        pc = m["per_class"]
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        pr = [f"{fmt(pc[k]['precision'])}/{fmt(pc[k]['recall'])}" for k in ("wbc", "rbc", "platelet")]
        table.add_row(Text(name), str(m["n_images"]), fmt(m["map50"]), fmt(m["map50_95"]),
                      *(fmt(pc[k]["ap50"]) for k in ("wbc", "rbc", "platelet")), *pr)

    row("all", metrics)
    for src, m in metrics.get("per_source", {}).items():
        row(src, m)
    console.print(table)

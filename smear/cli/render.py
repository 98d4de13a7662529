"""Rich rendering for the CLI: summary table and a progress bar fed by a callback."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from smear.types import Differential


def render_summary(diffs: Sequence[Differential], console: Console) -> None:
    """Per slide: a differential sheet (class, n, %, CI) with counts, warnings and flags."""
    from smear.taxonomy import FINE_NAMES

    for d in diffs:
        head = (f"[bold]{escape(str(d.slide))}[/]: {d.n_fields} fields, {d.n_wbc} WBC"
                + (f", {d.n_unidentified} unidentified" if d.classified else "")
                + f", {d.n_rbc} RBC ({d.rbc_per_field}/field), {d.n_platelet} platelets"
                + f" ({d.platelets_per_field}/field)"
                + (f", {d.n_skipped} fields skipped" if d.n_skipped else ""))
        for w in d.domain_warnings:
            console.print(f"[bold red]WARNING:[/] {escape(w)}", markup=True)
        console.print(head, markup=True)
        if d.whole_slide is not None:
            console.print(escape(whole_slide_line(d.whole_slide)), markup=True)
        if d.classified:
            table = Table(show_edge=False, pad_edge=False)
            for col, just in (("class", "left"), ("", "left"), ("n", "right"), ("%", "right"),
                              ("95% CI", "right")):
                table.add_column(col, justify=just)
            for code, s in d.fine.items():
                ci = "" if s.pct is None else f"{s.ci_low:.1f}-{s.ci_high:.1f}"
                table.add_row(code, FINE_NAMES[code], str(s.n), "" if s.pct is None else f"{s.pct:.1f}", ci)
            console.print(table)
            if d.nrbc_per_100_wbc is not None:
                console.print(f"NRBC per 100 WBC: {d.nrbc_per_100_wbc}")
        for flag in d.flags:
            console.print(f"[yellow]flag:[/] {escape(flag)}", markup=True)
        console.print()


def whole_slide_line(w) -> str:
    """What a whole-slide run read and skipped, its area and its platelet estimate, in one line."""
    skipped = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in w.skipped.items() if n)
    target = (f"target {w.target_wbc} WBC {'reached' if w.reached_target else 'NOT reached'}"
              if w.target_wbc else "every monolayer tile")
    plt = "" if w.platelets_per_hpf is None else f"; platelets {w.platelets_per_hpf} per HPF"
    if w.platelets_1e9_per_l is not None:
        plt += f", about {w.platelets_1e9_per_l:g} x 10^9/L"
    qmap = f"; quality map {w.quality_map}" if w.quality_map else ""
    return (f"whole slide {w.width}x{w.height} px at {w.mpp} um/px ({w.mpp_source}), level {w.level}: "
            f"{w.tiles_counted} of {w.tiles_total} tiles counted ({w.area_mm2:g} mm^2), {target}; "
            f"skipped {skipped or 'none'}{plt}{qmap}")


def _bar(console: Console, label: str) -> Progress:
    """A transient bar on ``console``, drawn only on a terminal (pipes and files get no escape codes)."""
    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=True, disable=not console.is_terminal)


@contextlib.contextmanager
def progress(console: Console, total: int) -> Iterator[Callable[[], None]]:
    """A progress bar over fields on ``console``; yields a function to call once per field."""
    with _bar(console, "fields") as bar:
        task = bar.add_task("fields", total=total)
        yield lambda: bar.advance(task)


@contextlib.contextmanager
def epoch_progress(console: Console) -> Iterator[Callable[[int, int, int], None]]:
    """A progress bar over the batches of the current epoch; yields the ``on_batch(epoch, done,
    total)`` callback the training functions take. The bar shows only while batches run (not
    while data loads or an epoch is scored)."""
    with _bar(console, "epoch {task.fields[epoch]}") as bar:
        task = bar.add_task("batches", total=None, epoch="", visible=False)

        def on_batch(epoch: int, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, epoch=epoch, visible=done < total)

        yield on_batch


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

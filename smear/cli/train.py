"""`smear train ...`: train a stage into a run folder holding its model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from smear.cli.app import ConfigOpt, SetOpt, err_console, out_console, train_app


@train_app.command("detect")
def train_detect(
    out: Annotated[Path, typer.Option(help="Run folder.")] = Path("runs/detect"),
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Train the YOLO detector (offline, from the model YAML) and package it into OUT/model."""
    from smear.config import load_config
    from smear.detect.train import package, train

    cfg = load_config("detect", config, set_ or [])
    run_dir = train(cfg, out, resume=resume, log=lambda m: err_console.print(m, markup=False))
    model_dir = package(run_dir, cfg, run_dir / "model", device=cfg["train"]["device"],
                        log=lambda m: out_console.print(m, markup=False))
    out_console.print(f"model folder: {model_dir}")


@train_app.command("classify")
def train_classify(
    out: Annotated[Path, typer.Option(help="Run folder (the model folder is OUT/model).")] = Path("runs/classify"),
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its checkpoint.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Train the leukocyte classifier from scratch, calibrate it on validation, score it on test."""
    from smear.classify.train import train
    from smear.config import load_config

    cfg = load_config("classify", config, set_ or [])
    model_dir = train(cfg, out, resume=resume, log=lambda m: err_console.print(m, markup=False))
    out_console.print(f"model folder: {model_dir}")


@train_app.command("novelty")
def train_novelty(
    run: Annotated[Path, typer.Argument(help="A finished classifier run folder (config.yaml, split files).")],
    model: Annotated[Optional[Path], typer.Option(help="Model folder to fit (default RUN/model).")] = None,
    quantile: Annotated[float, typer.Option(help="Validation quantile that sets the threshold.")] = 0.97,
) -> None:
    """Fit the per-cell novelty score of a trained classifier on its own training crops."""
    from smear.classify.train import fit_novelty_for_run

    got = fit_novelty_for_run(run, model, quantile, log=lambda m: err_console.print(m, markup=False))
    out_console.print(f"novelty threshold {got['threshold']} (held: train {got['train_held']}, val {got['val_held']})")


@train_app.command("segment")
def train_segment(
    out: Annotated[Path, typer.Option(help="Run folder (the model folder is OUT/model).")] = Path("runs/segment"),
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its checkpoint.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Train the WBC U-Net (background / cytoplasm / nucleus) from scratch and score it on test."""
    from smear.config import load_config
    from smear.segment.train import train

    cfg = load_config("segment", config, set_ or [])
    model_dir = train(cfg, out, resume=resume, log=lambda m: err_console.print(m, markup=False))
    out_console.print(f"model folder: {model_dir}")

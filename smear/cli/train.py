"""`smear train ...`: train a stage into a run folder holding its model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from smear.cli.app import ConfigOpt, SetOpt, show, train_app

ResumeOpt = Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")]
RunOpt = Annotated[Path, typer.Option(help="Run folder (the model folder is OUT/model).")]


def _train(stage: str, out: Path, resume: bool, config: Optional[Path], set_: Optional[list[str]]) -> Path:
    """Resolve the stage's config (checked before anything trains) and run ``smear.<stage>.train.train``."""
    import importlib

    from smear.config import load_config

    cfg = load_config(stage, config, set_ or [])
    module = importlib.import_module(f"smear.{stage}.train")
    if stage == "detect":  # ultralytics trains; its run is then packaged with tuned thresholds
        run_dir = module.train(cfg, out, resume=resume)
        return module.package(run_dir, cfg, run_dir / "model", device=cfg["train"]["device"], log=show)
    return module.train(cfg, out, resume=resume)


def _stage_command(stage: str, doc: str, example: str) -> None:
    """Register ``smear train STAGE``: resolve the stage's config, train into OUT, print the model folder."""
    def command(out: RunOpt = Path(f"runs/{stage}"), resume: ResumeOpt = False, config: ConfigOpt = None,
                set_: SetOpt = None) -> None:
        show(f"model folder: {_train(stage, out, resume, config, set_)}")

    command.__doc__ = doc
    command.__name__ = f"train_{stage}"
    train_app.command(stage, epilog=f"Example: {example}")(command)


_stage_command("detect", "Train the YOLO detector (offline, from the model YAML) and package it into OUT/model.",
               "smear train detect --out runs/det --set train.epochs=40 --set data.bccd=../shared/data/bccd  "
               "(continue it: --resume)")
_stage_command("classify", "Train the leukocyte classifier from scratch, calibrate it on validation, score it on test.",
               "smear train classify --out runs/clf --set data.root=../shared/data/pbc --set train.epochs=30  "
               "(fine-tune: --set model.init=smear/weights/classifier)")


@train_app.command("novelty", epilog="Example: smear train novelty runs/clf --quantile 0.97")
def train_novelty(
    run: Annotated[Path, typer.Argument(help="A finished classifier run folder (config.yaml, split files).")],
    model: Annotated[Optional[Path], typer.Option(help="Model folder to fit (default RUN/model).")] = None,
    quantile: Annotated[float, typer.Option(help="Validation quantile that sets the threshold.")] = 0.97,
) -> None:
    """Fit the per-cell novelty score of a trained classifier on its own training crops."""
    from smear.classify.train import fit_novelty_for_run

    got = fit_novelty_for_run(run, model, quantile)
    show(f"novelty threshold {got['threshold']} (held: train {got['train_held']}, val {got['val_held']})")


_stage_command("segment", "Train the WBC U-Net (background / cytoplasm / nucleus) from scratch and score it on test.",
               "smear train segment --out runs/seg --set data.root=../shared/data/wbc-seg --set train.epochs=40")

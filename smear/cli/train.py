"""`smear train ...`: train a stage into a run folder holding its model folder."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer

from smear.cli.app import ConfigOpt, SetOpt, err_console, show, train_app

ResumeOpt = Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")]
RunOpt = Annotated[Path, typer.Option(help="Run folder (the model folder is OUT/model).")]
EpochsOpt = Annotated[Optional[int], typer.Option(help="Training epochs (train.epochs).", min=1)]
BatchOpt = Annotated[Optional[int], typer.Option(help="Batch size (train.batch).", min=1)]
DeviceOpt = Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N (train.device).")]

#: per stage: the config key --data sets, its help, and the `smear run` options that use the model
_STAGES = {
    "detect": ("data.yolo", "A YOLO dataset: a data.yaml, or a folder holding one (smear data convert's --out, "
                            "TXL-PBC); default: data.bccd + data.txl of the config.", "--set detector_model="),
    "classify": ("data.root", "Single-cell dataset: PBC, class folders, or labels.csv + images/ (data.root).",
                 "--set classifier_model="),
    "segment": ("data.root", "Segmentation sources: images/ + masks/, or a folder of them (data.root).",
                "--segment unet --set segmenter_model="),
}


def run_line(stage: str, model_dir: Path) -> str:
    """The `smear run` command that uses a model folder ``model_dir`` of ``stage``."""
    return f"smear run SLIDE_FOLDER {_STAGES[stage][2]}{shlex.quote(str(model_dir))}"


def _train(stage: str, out: Path, resume: bool, config: Optional[Path], set_: Optional[list[str]],
           options: dict) -> Path:
    """Resolve the stage's config (checked before anything trains) and run ``smear.<stage>.train.train``
    with a progress bar over each epoch's batches (on a terminal)."""
    import importlib

    from smear.cli.render import epoch_progress
    from smear.config import load_config

    cfg = load_config(stage, config, set_ or [], options)
    module = importlib.import_module(f"smear.{stage}.train")
    with epoch_progress(err_console) as on_batch:
        run_dir = module.train(cfg, out, resume=resume, on_batch=on_batch)
    if stage == "detect":  # ultralytics trains; its run is then packaged with tuned thresholds
        return module.package(run_dir, cfg, run_dir / "model", device=cfg.train.device, log=show)
    return run_dir


def _stage_command(stage: str, doc: str, example: str) -> None:
    """Register ``smear train STAGE``: resolve the stage's config, train into OUT, print the model
    folder and the `smear run` line that uses it."""
    key, data_help, _ = _STAGES[stage]

    def command(data: Optional[Path] = typer.Option(None, help=data_help),  # noqa: B008 - help per stage
                out: RunOpt = Path(f"runs/{stage}"), epochs: EpochsOpt = None, batch: BatchOpt = None,
                device: DeviceOpt = None, resume: ResumeOpt = False, config: ConfigOpt = None,
                set_: SetOpt = None) -> None:
        options = {"--data": (key, None if data is None else str(data)), "--epochs": ("train.epochs", epochs),
                   "--batch": ("train.batch", batch), "--device": ("train.device", device)}
        model_dir = _train(stage, out, resume, config, set_, options)
        show(f"model folder: {model_dir}\nuse it with:\n  {run_line(stage, model_dir)}")

    command.__doc__ = doc
    command.__name__ = f"train_{stage}"
    train_app.command(stage, epilog=f"Example: {example}")(command)


_stage_command("detect", "Train the YOLO detector (offline, from the model YAML) and package it into OUT/model.",
               "smear train detect --data runs/my-fields --out runs/det --epochs 40  "
               "(--data: the --out of smear data convert; continue a run: --resume)")
_stage_command("classify", "Train the leukocyte classifier from scratch, calibrate it on validation, score it on test.",
               "smear train classify --data ../shared/data/pbc --out runs/clf --epochs 30  "
               "(fine-tune: --set model.init=shipped)")


@train_app.command("novelty", epilog="Example: smear train novelty runs/clf --quantile 0.97")
def train_novelty(
    run: Annotated[Path, typer.Argument(help="A finished classifier run folder (config.yaml, split files).")],
    model: Annotated[Optional[Path], typer.Option(help="Model folder to fit (default RUN/model).")] = None,
    quantile: Annotated[float, typer.Option(help="Validation quantile that sets the threshold.")] = 0.97,
) -> None:
    """Fit the per-cell novelty score of a trained classifier on its own training crops."""
    from smear.classify.novelty_fit import fit_novelty_for_run

    got = fit_novelty_for_run(run, model, quantile)
    show(f"novelty threshold {got['threshold']} (held: train {got['train_held']}, val {got['val_held']})")


@train_app.command("guard", epilog="Example: smear train guard runs/clf (after smear train novelty runs/clf)")
def train_guard(
    run: Annotated[Path, typer.Argument(help="A finished classifier run folder (config.yaml, split files).")],
    model: Annotated[Optional[Path], typer.Option(help="Model folder to fit (default RUN/model).")] = None,
    max_val: Annotated[int, typer.Option(help="Validation cells the statistics are fitted on.", min=100)] = 500,
    draws: Annotated[int, typer.Option(help="Random acquisition shifts the thresholds are fitted on.", min=4)] = 16,
) -> None:
    """Fit the slide guard of a trained classifier (slide-level evidence of a misread slide) on its
    validation crops and its training labs' colours; needs its novelty score."""
    from smear.classify.guard_fit import fit_for_run

    got = fit_for_run(run, model, max_val=max_val, draws=draws)  # its progress lines: the logger's
    fit = got["fit"]
    show(f"slide guard thresholds {got['thresholds']}; on its synthetic slides: recall {fit['recall_bad']} "
         f"({fit['bad_slides']} read < 0.75), false alarms {fit['false_alarms_good']} ({fit['good_slides']} read >= 0.90)")


_stage_command("segment", "Train the WBC U-Net (background / cytoplasm / nucleus) from scratch and score it on test.",
               "smear train segment --data ../shared/data/wbc-seg --out runs/seg --epochs 40")

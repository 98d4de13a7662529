"""The other commands: info, config show, data convert and stage-raabin, explain, export."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from smear.cli.app import ConfigOpt, SetOpt, app, config_app, data_app, out_console, warn
from smear import __version__
from smear.errors import SmearError


@app.command()
def info(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print versions, the device and the models in use."""
    import platform

    import torch

    from smear.artifacts import load_model, resolve_model_dir
    from smear.config import load_config
    from smear.devices import available_cores, resolve_device, set_threads

    cfg = load_config("pipeline", config, set_ or [])
    dev = resolve_device(cfg.device)
    if dev.type == "cpu":
        set_threads()  # as a run sets them
    out_console.print(f"smear {__version__}  python {platform.python_version()}  torch {torch.__version__}")
    out_console.print(f"device: {dev} (cores: {available_cores()}, torch threads: {torch.get_num_threads()},"
                      f" cuda available: {torch.cuda.is_available()})")
    out_console.print(f"detector: {cfg.detector}, segmenter: {cfg.segmenter}, classifier: {cfg.classifier}, "
                      f"runtime: {cfg.runtime}")
    for key, name, stage in (("detector_model", "detector", "detect"), ("classifier_model", "classifier", "classify"),
                             ("segmenter_model", "segmenter", "segment")):
        path = resolve_model_dir(getattr(cfg, key), name)
        try:
            meta = load_model(path, stage)
            out_console.print(f"  {name} model: {path} (version {meta.version}, trained {meta.trained or '?'})")
        except SmearError as exc:
            out_console.print(f"  {name} model: none ({exc})")


@config_app.command("show")
def config_show(
    stage: Annotated[str, typer.Argument(help="pipeline | detect | segment | classify")] = "pipeline",
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Print the resolved config of a stage as YAML, with the comments of the shipped file."""
    from smear.config import load_config, show_config

    sys.stdout.write(show_config(stage, load_config(stage, config, set_ or [])))


@data_app.command("convert")
def data_convert(
    sources: Annotated[list[str], typer.Argument(help="VOC folder, YOLO data.yaml\\[:split], COCO .json or images folder.")],
    out: Annotated[Path, typer.Option(help="Output YOLO dataset folder.")],
    val_fraction: Annotated[float, typer.Option(help="Fixed, seeded part held out as 'val'.")] = 0.0,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Convert detection datasets into one YOLO folder (absolute paths, source tags, cleaned boxes)."""
    from smear.detect.data import load_dataset, split_holdout, write_yolo_dataset

    samples, problems = [], []
    for src in sources:
        path, _, split = src.partition(":") if src.endswith((":train", ":val", ":test")) else (src, "", "")
        got, probs = load_dataset(path, split=split or "train")
        samples += got
        problems += probs
    for p in problems:
        warn(str(p))
    train, val = split_holdout(samples, val_fraction, seed) if val_fraction else (samples, [])
    data_yaml = write_yolo_dataset({"train": train, **({"val": val} if val else {})}, out)
    out_console.print(f"{len(train)} train, {len(val)} val fields, {len(problems)} box problems -> {data_yaml}")


@data_app.command("stage-raabin")
def data_stage_raabin(
    clone: Annotated[Path, typer.Argument(help="Local clone of uqasha524/WBC-Classification-Using-CNN-vs-MobileNetV2.")],
    out: Annotated[Path, typer.Option(help="New folder: train/<Class>/ and test/<Class>/ (test = Raabin Test-A).")],
    commit: Annotated[str, typer.Option(help="Commit that holds Dataset/Train and Dataset/Test.")] = "2fc4a60",
) -> None:
    """Stage Raabin-WBC's single-cell crops from a local git clone into class folders."""
    from smear.classify.git_dataset import stage_from_git

    counts = stage_from_git(clone, out, commit)
    for part, per_class in counts.items():
        out_console.print(f"{part}: {sum(per_class.values())} images "
                          + ", ".join(f"{c} {n}" for c, n in per_class.items()))


@app.command(epilog="Examples: smear adapt --data slide1_corrections.csv --fields slides --out models/our-lab  |  "
                     "smear adapt --data our_cells/ --out models/our-lab")
def adapt(
    data: Annotated[list[Path], typer.Option(help="A labelled single-cell dataset (as `smear eval classify "
                                                  "--data` reads) or corrections CSV(s) from the review page.")],
    out: Annotated[Path, typer.Option(help="New model folder (must not hold files).")],
    from_: Annotated[str, typer.Option("--from", help="Classifier model folder to start from, or 'shipped'.")
                     ] = "shipped",
    epochs: Annotated[Optional[int], typer.Option(help="Passes over the training cells (default 60).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the held-out split, augmentation and training.")] = 0,
    layout: Annotated[str, typer.Option(help="auto | pbc | folders | csv (dataset folders).")] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "cpu",
    fields: Annotated[Optional[Path], typer.Option(help="Where the fields named in corrections CSVs are: "
                                                   "the slide folder, or the folder holding the slides.")] = None,
    source_data: Annotated[Optional[list[Path]], typer.Option(
        help="The source model's training data (datasets as `smear eval classify --data` reads): the last "
             "blocks then train too and the novelty score is refitted on a sample of it plus the lab's cells. "
             "Without it only the classifier layer trains and the source's guard is kept.")] = None,
    force: Annotated[bool, typer.Option(help="Adapt on fewer cells than adapt.min_cells / adapt.min_per_class.")
                     ] = False,
    allow_worse: Annotated[bool, typer.Option(help="Write the model even if it is worse than its source on the "
                                                   "held-out cells.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Fine-tune a classifier on a lab's labelled cells; refuses too few cells and a worse model."""
    from smear.classify.adapt import Brakes, Inputs, Limits, Recipe, run_line
    from smear.classify.adapt import adapt as adapt_model
    from smear.config import load_config

    limits = Limits(**load_config("classify", config, set_ or []).adapt.model_dump())
    recipe = Recipe(seed=seed, **({"epochs": int(epochs)} if epochs else {}))
    model_dir = adapt_model(data, out, from_, recipe, Inputs(layout, fields, source_data=source_data or ()),
                            Brakes(limits, force, allow_worse), device)  # its lines: the logger's
    out_console.print(f"model folder: {model_dir}\nuse it with:\n  {run_line(model_dir)}")


@app.command()
def explain(
    paths: Annotated[list[Path], typer.Argument(help="Single-cell images, or folders of them.")],
    out: Annotated[Path, typer.Option(help="Folder for the <name>_gradcam.png overlays.")] = Path("gradcam"),
    model: Annotated[str, typer.Option(help="Classifier model folder, or 'shipped'.")] = "shipped",
    target: Annotated[Optional[str], typer.Option(help="Class to explain (default: the predicted one).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Grad-CAM overlays: which pixels of each cell crop drove the classifier's call."""
    import json

    from smear.artifacts import resolve_model_dir
    from smear.classify.explain import explain_files
    from smear.classify.model import CnnClassifier
    from smear.io import list_images

    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += list_images(p)
        else:
            files.append(p)
    if not files:
        raise SmearError(f"{paths[0]}: no images to explain")
    if any(f.resolve().parent == out.resolve() for f in files):
        raise SmearError(f"{out}: --out is a folder of input images; refusing to write overlays among them",
                         hint="give --out a folder of its own")
    clf = CnnClassifier.from_dir(resolve_model_dir(model, "classifier"), device=device)
    if target is not None and target not in clf.classes:
        raise SmearError(f"--target {target}: not a class of this model", hint=f"one of {', '.join(clf.classes)}")
    rows = explain_files(clf, files, out, target, skip_unreadable=len(files) > 1)
    shares = [r["cam_in_box"] for r in rows if r["cam_in_box"] == r["cam_in_box"]]
    summary = {"n": len(rows), "mean_cam_in_box": round(sum(shares) / len(shares), 4) if shares else None,
               "uniform_cam_in_box": round(1 / clf.crop_margin ** 2, 4), "out": str(out), "images": rows}
    if json_:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return
    for r in rows:
        out_console.print(f"{Path(r['image']).name}: {r['predicted']} ({r['prob']:.2f}), map of {r['target']}, "
                          f"{100 * r['cam_in_box']:.0f}% inside the cell box -> {r['overlay']}")
    out_console.print(f"{summary['n']} overlays in {out}; mean share inside the cell box "
                      f"{summary['mean_cam_in_box']} (an even map: {summary['uniform_cam_in_box']})")


@app.command("export")
def export(
    out: Annotated[Path, typer.Option(help="Folder for the exported model folders (one per stage).")],
    stage: Annotated[Optional[list[str]], typer.Option(help="detector | classifier | segmenter (repeatable); "
                                                            "default: each stage with a model.")] = None,
    force: Annotated[bool, typer.Option(help="Write into non-empty stage folders (only the files an export "
                                               "writes are replaced; nothing is deleted).")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Write ONNX models (copies of the model folders with model.onnx) for `runtime: onnx`."""
    from smear.artifacts import load_meta, resolve_model_dir
    from smear.config import load_config
    from smear.pipeline.onnx_export import check_export_target, export_model_dir

    cfg = load_config("pipeline", config, set_ or [])
    keys = {"detector": "detector_model", "classifier": "classifier_model", "segmenter": "segmenter_model"}
    unknown = [s for s in stage or [] if s not in keys]
    if unknown:
        raise SmearError(f"--stage {unknown[0]}: not a stage with a network", hint="detector, classifier, segmenter")
    todo = []
    for name in stage or list(keys):
        try:
            model_dir = resolve_model_dir(getattr(cfg, keys[name]), name)
            load_meta(model_dir)
            todo.append((name, model_dir))
        except SmearError:
            if stage:  # asked for by name: its model must exist
                raise
            warn(f"no {name} model to export ({getattr(cfg, keys[name])}), skipped")
    for name, model_dir in todo:  # every target checked before anything is written
        check_export_target(model_dir, out / name, force)
    for name, model_dir in todo:
        path = export_model_dir(name, model_dir, out / name, force)
        out_console.print(f"{name}: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if todo:
        out_console.print(f"use them with: --set runtime=onnx --set detector_model={out / 'detector'} ...")

"""The `smear` command line: thin commands that resolve config, call one function, render."""

from __future__ import annotations

import contextlib
import functools
import io
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console
from rich.text import Text

from smear import __version__
from smear.types import SmearError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="smear: blood-smear fields to a leukocyte differential.")
config_app = typer.Typer(no_args_is_help=True, help="Show configuration.")
app.add_typer(config_app, name="config")
train_app = typer.Typer(no_args_is_help=True, help="Train a stage.")
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate a stage on labelled data.")
data_app = typer.Typer(no_args_is_help=True, help="Prepare datasets.")
app.add_typer(train_app, name="train")
app.add_typer(eval_app, name="eval")
app.add_typer(data_app, name="data")

# markup off: file and slide names are printed as they are ("q[/]x.jpg" is a name, not a tag);
# the few styled lines pass markup=True with the user strings escaped
out_console = Console(highlight=False, soft_wrap=True, markup=False)
if not out_console.is_terminal:  # pipes and files get whole tables, not 80-column ellipses
    out_console = Console(highlight=False, soft_wrap=True, width=160, markup=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)
_state = {"verbose": False}

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML file overriding defaults.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a key: a.b=value (repeatable).")]


class ReportFormat(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"
    html = "html"


def fail(message: str, hint: str = "", code: int = 1) -> None:
    """Print one red error line (and a dim hint) and exit non-zero; the text is never read as markup."""
    err_console.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False)
    if hint:
        err_console.print(Text(f"hint: {hint}", style="dim"))
    raise typer.Exit(code)


def handle_errors(fn: Callable) -> Callable:
    """Turn SmearError into one red line and exit 1; tracebacks only with --verbose."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SmearError as exc:
            if _state["verbose"]:
                raise
            fail(str(exc), exc.hint)

    return wrapper


def warn(message: str) -> None:
    """One yellow warning line on stderr; file names in it are printed as they are, not as markup."""
    err_console.print(Text.assemble(("warning:", "yellow"), " ", message), highlight=False)


@contextlib.contextmanager
def _terminate_cleanly():
    """SIGTERM unwinds like Ctrl-C, so temporary files are removed by the code that made them."""
    def on_term(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread (e.g. inside a test runner's thread)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@app.callback()
def _root(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Tracebacks on errors.")] = False,
          ) -> None:
    _state["verbose"] = verbose


@app.command()
@handle_errors
def run(
    paths: Annotated[list[Path], typer.Argument(help="Field images or folders (a folder is one slide).")],
    report: Annotated[ReportFormat, typer.Option(help="table | csv | json | html (one self-contained file).")
                      ] = ReportFormat.table,
    out: Annotated[Optional[Path], typer.Option(help="Write the report here (default: stdout).")] = None,
    cells: Annotated[Optional[Path], typer.Option(help="Also write one CSV row per detected cell.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N")] = None,
    segment: Annotated[Optional[str], typer.Option(help="off | unet | kmeans | grabcut: mask each WBC crop "
                                                         "(adds areas and N:C ratio to --cells).")] = None,
    recursive: Annotated[bool, typer.Option(help="Each subfolder holding images is a slide.")] = False,
    resume: Annotated[bool, typer.Option(help="Reuse results of fields already done (same file, same models).")
                      ] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Count and classify the cells of each slide and print the differential."""
    from smear.config import load_config
    from smear.io import check_outputs, find_slides, write_text_atomic
    from smear.pipeline import report as rep
    from smear.pipeline.build import build_cache, build_stages
    from smear.pipeline.render import render_summary

    overrides = list(set_ or []) + ([f"device={device}"] if device else []) + ([f"segment={segment}"] if segment else [])
    cfg = load_config("pipeline", config, overrides)
    if report == ReportFormat.html and out is None and _stdout_is_terminal():
        raise SmearError("--report html writes one HTML file, not text for a terminal: pass --out FILE.html")
    slides = find_slides(paths, recursive=recursive, warn=warn)
    check_outputs({"--out": out, "--cells": cells}, slides)  # before any model loads
    stages = build_stages(cfg)
    cache = build_cache(cfg, stages.version, warn=warn)
    with _terminate_cleanly():
        reports = _run_slides(slides, stages, cfg, cache, resume, cells,
                              keep=report in (ReportFormat.json, ReportFormat.html))
    rows = rep.summary_rows(reports, cfg)
    for row in rows:
        for message in row["domain_warnings"]:
            warn(f"{row['slide']}: {message}")
        for message in row["warnings"]:
            warn(message)
    if report == ReportFormat.csv:
        text = rep.to_csv(rep.summary_frame(rows))
    elif report == ReportFormat.json:
        text = rep.to_json(reports, rows)
    elif report == ReportFormat.html:
        from smear.pipeline.build import audit_info
        from smear.pipeline.html import render_html

        geometry = stages.classifier or stages.segmenter  # the crops the run cut (run.classify_cells)
        margin = geometry.crop_margin if geometry is not None else 1.2
        text = render_html(reports, rows, cfg["report"]["gallery_per_class"], margin, cfg=cfg,
                           audit=audit_info(cfg, stages.version), segmenter=stages.segmenter,
                           segment_size=int(geometry.input_size) if geometry is not None else 96)
    else:
        console = Console(record=True, file=io.StringIO(), width=100) if out else out_console
        render_summary(rows, console)
        text = console.export_text() if out else None
    if out is not None:
        try:
            write_text_atomic(out, text)
        except OSError as exc:
            raise SmearError(f"{out}: cannot write the report ({exc.strerror or exc})",
                             hint=_KEPT_HINT if cache is not None else "") from exc
    elif text is not None:
        sys.stdout.write(text)


def _stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


_KEPT_HINT = "every field's result is in the cache: fix the cause and rerun with --resume"


def _run_slides(slides, stages, cfg, cache, resume: bool, cells: Optional[Path], keep: bool) -> list:
    """Run every slide, writing --cells rows as fields finish; the reports, in order."""
    from smear.pipeline import report as rep
    from smear.pipeline.render import progress
    from smear.pipeline.run import run_slide

    n_fields = sum(len(s.fields) for s in slides)
    writer = rep.CellsWriter(cells, masks=stages.segmenter is not None) if cells is not None else None
    reports = []
    try:
        with progress(err_console, total=n_fields) as advance:
            for slide in slides:
                def on_field(item, _slide=slide):
                    if hasattr(item, "reason"):
                        if n_fields > 1:
                            warn(f"skipped {item.reason}")
                    elif writer is not None:
                        writer.write(_slide.name, item)
                    advance()
                reports.append(run_slide(slide, stages, cfg["io"]["max_pixels"], on_field, cache, resume,
                                         keep_fields=keep))
        if not any(r.n_fields for r in reports):
            skipped = [s for r in reports for s in r.skipped]
            if len(skipped) == 1:
                raise SmearError(skipped[0].reason)
            if not skipped:
                raise SmearError(f"{slides[0].name}: no fields to run", hint="see the warnings above")
            raise SmearError(f"none of the {len(skipped)} fields could be read", hint="see the warnings above")
        if writer is not None:
            writer.close()
    except OSError as exc:
        if writer is None:
            raise
        writer.abort()
        raise SmearError(f"{cells}: cannot write the cells table ({exc.strerror or exc})",
                         hint=_KEPT_HINT if cache is not None else "") from exc
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return reports


@app.command()
@handle_errors
def info(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print versions, the device and the models in use."""
    import platform

    import torch

    from smear.artifacts import load_meta, model_version, resolve_model_dir
    from smear.config import load_config
    from smear.devices import available_cores, resolve_device

    cfg = load_config("pipeline", config, set_ or [])
    dev = resolve_device(cfg["device"])
    out_console.print(f"smear {__version__}  python {platform.python_version()}  torch {torch.__version__}")
    out_console.print(f"device: {dev} (cores: {available_cores()}, torch threads: {torch.get_num_threads()},"
                      f" cuda available: {torch.cuda.is_available()})")
    out_console.print(f"detector: {cfg['detector']}, segment: {cfg['segment']}, classifier: {cfg['classifier']}, "
                      f"runtime: {cfg['runtime']}")
    for key, name in (("detector_model", "detector"), ("classifier_model", "classifier"),
                      ("segmenter_model", "segmenter")):
        path = resolve_model_dir(cfg[key], name)
        try:
            meta = load_meta(path)
            out_console.print(f"  {name} model: {path} (version {model_version(path)},"
                              f" trained {meta.get('trained', '?')})")
        except SmearError as exc:
            out_console.print(f"  {name} model: none ({exc})")


@config_app.command("show")
@handle_errors
def config_show(
    stage: Annotated[str, typer.Argument(help="pipeline | detect | segment | classify")] = "pipeline",
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Print the resolved config of a stage as YAML."""
    from smear.config import dump_config, load_config

    sys.stdout.write(dump_config(load_config(stage, config, set_ or [])))


@data_app.command("convert")
@handle_errors
def data_convert(
    sources: Annotated[list[str], typer.Argument(help="VOC folder, YOLO data.yaml[:split], COCO .json or images folder.")],
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
@handle_errors
def data_stage_raabin(
    clone: Annotated[Path, typer.Argument(help="Local clone of uqasha524/WBC-Classification-Using-CNN-vs-MobileNetV2.")],
    out: Annotated[Path, typer.Option(help="New folder: train/<Class>/ and test/<Class>/ (test = Raabin Test-A).")],
    commit: Annotated[str, typer.Option(help="Commit that holds Dataset/Train and Dataset/Test.")] = "2fc4a60",
) -> None:
    """Stage Raabin-WBC's single-cell crops from a local git clone into class folders."""
    from smear.classify.stage import stage_from_git

    counts = stage_from_git(clone, out, commit)
    for part, per_class in counts.items():
        out_console.print(f"{part}: {sum(per_class.values())} images "
                          + ", ".join(f"{c} {n}" for c, n in per_class.items()))


@train_app.command("detect")
@handle_errors
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


@eval_app.command("detect")
@handle_errors
def eval_detect(
    data: Annotated[Path, typer.Option(help="VOC folder, YOLO data.yaml, COCO .json or images folder.")],
    model: Annotated[str, typer.Option(help="Detector model folder, or 'shipped'.")] = "shipped",
    split: Annotated[str, typer.Option(help="Split of a data.yaml.")] = "test",
    detector: Annotated[str, typer.Option(help="yolo | classical")] = "yolo",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """mAP50, mAP50-95, AP50 per class, P/R at the shipped thresholds, per source."""
    import json

    from smear.artifacts import resolve_model_dir
    from smear.detect.data import DET_CLASSES, load_dataset
    from smear.detect.evaluate import evaluate_detector
    from smear.pipeline.build import build_detector
    from smear.pipeline.render import render_detect_metrics

    samples, problems = load_dataset(data, split=split)
    for p in problems:
        warn(str(p))  # on stderr: the truth boxes scored against are the cleaned ones
    if not samples:
        raise SmearError(f"{data}: no labelled images found")
    if detector == "yolo":
        from smear.detect.yolo import YoloDetector

        det = YoloDetector.from_dir(resolve_model_dir(model, "detector"), device=device)
        conf = {k: det.per_class_conf.get(k, det.conf) for k in DET_CLASSES}
        det.conf, det.per_class_conf = 0.001, {}  # score every box for AP; P/R use the shipped conf
    else:
        det = build_detector({"detector": detector, "classical": {}, "device": device})
        conf = {k: 0.0 for k in DET_CLASSES}
    metrics = evaluate_detector(det, samples, conf)
    for reason in metrics["skipped"]:
        warn(f"skipped {reason}")
    if json_:
        sys.stdout.write(json.dumps(metrics, indent=2) + "\n")
    else:
        render_detect_metrics(metrics, out_console)


@train_app.command("classify")
@handle_errors
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
@handle_errors
def train_novelty(
    run: Annotated[Path, typer.Argument(help="A finished classifier run folder (config.yaml, split files).")],
    model: Annotated[Optional[Path], typer.Option(help="Model folder to fit (default RUN/model).")] = None,
    quantile: Annotated[float, typer.Option(help="Validation quantile that sets the threshold.")] = 0.97,
) -> None:
    """Fit the per-cell novelty score of a trained classifier on its own training crops."""
    from smear.classify.train import fit_novelty_for_run

    got = fit_novelty_for_run(run, model, quantile, log=lambda m: err_console.print(m, markup=False))
    out_console.print(f"novelty threshold {got['threshold']} (held: train {got['train_held']}, val {got['val_held']})")


@eval_app.command("classify")
@handle_errors
def eval_classify(
    data: Annotated[Path, typer.Option(help="PBC-style folder, class-per-folder dataset or labels.csv folder.")],
    model: Annotated[str, typer.Option(help="Classifier model folder, or 'shipped'.")] = "shipped",
    split: Annotated[Optional[Path], typer.Option(help="A split JSON: evaluate one part of it.")] = None,
    part: Annotated[str, typer.Option(help="train | val | test, with --split.")] = "test",
    layout: Annotated[str, typer.Option(help="auto | pbc | folders | csv")] = "auto",
    out: Annotated[Optional[Path], typer.Option(help="Write metrics JSON and confusion-matrix PNGs here.")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    segment: Annotated[str, typer.Option(help="off | unet | kmeans | grabcut: paint each crop's background "
                                              "out before classifying it.")] = "off",
    segmenter_model: Annotated[str, typer.Option(help="U-Net model folder for --segment unet, or 'shipped'.")
                               ] = "shipped",
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Accuracy, macro-F1, kappa, AUC, ECE, per-class figures; also at the 8-group and 5-type levels."""
    import json

    from smear.artifacts import resolve_model_dir
    from smear.classify.evaluate import evaluate
    from smear.pipeline.build import build_segmenter

    seg = build_segmenter({"segment": segment, "segmenter_model": segmenter_model, "device": device})
    m = evaluate(resolve_model_dir(model, "classifier"), data, layout=layout, split=split, part=part, out=out,
                 device=device, log=None if json_ else (lambda t: out_console.print(t, markup=False)), segmenter=seg,
                 warn=warn)
    if json_:
        keys = ("accuracy", "macro_f1", "kappa", "ece", "per_class", "group8_accuracy", "type5_accuracy", "n",
                "n_skipped")
        sys.stdout.write(json.dumps({k: m.get(k) for k in keys}, indent=2, default=float) + "\n")


@app.command()
@handle_errors
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
) -> None:
    """Fine-tune a classifier on a lab's labelled cells; refit its temperature on a held-out part."""
    from smear.classify.adapt import adapt as adapt_model
    from smear.classify.adapt import run_line

    model_dir = adapt_model(data, out, from_, epochs, seed, layout, device,
                            log=lambda m: err_console.print(m, markup=False), fields=fields)
    out_console.print(f"model folder: {model_dir}\nuse it with:\n  {run_line(model_dir)}")


@app.command()
@handle_errors
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
    from smear.io import IMAGE_SUFFIXES

    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
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
    rows = explain_files(clf, files, out, target, warn=warn if len(files) > 1 else None)
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
@handle_errors
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
    from smear.runtime import check_export_target, export_model_dir

    cfg = load_config("pipeline", config, set_ or [])
    keys = {"detector": "detector_model", "classifier": "classifier_model", "segmenter": "segmenter_model"}
    unknown = [s for s in stage or [] if s not in keys]
    if unknown:
        raise SmearError(f"--stage {unknown[0]}: not a stage with a network", hint="detector, classifier, segmenter")
    todo = []
    for name in stage or list(keys):
        try:
            model_dir = resolve_model_dir(cfg[keys[name]], name)
            load_meta(model_dir)
            todo.append((name, model_dir))
        except SmearError:
            if stage:  # asked for by name: its model must exist
                raise
            warn(f"no {name} model to export ({cfg[keys[name]]}), skipped")
    for name, model_dir in todo:  # every target checked before anything is written
        check_export_target(model_dir, out / name, force)
    for name, model_dir in todo:
        path = export_model_dir(name, model_dir, out / name, force)
        out_console.print(f"{name}: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if todo:
        out_console.print(f"use them with: --set runtime=onnx --set detector_model={out / 'detector'} ...")


@train_app.command("segment")
@handle_errors
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


@eval_app.command("segment")
@handle_errors
def eval_segment(
    data: Annotated[Path, typer.Option(help="A folder with images/ and masks/, or a folder of such folders.")],
    model: Annotated[str, typer.Option(help="U-Net model folder, or 'shipped'.")] = "shipped",
    method: Annotated[str, typer.Option(help="unet | kmeans | grabcut")] = "unet",
    part: Annotated[str, typer.Option(help="all, or train | val | test of the split in the segment config.")
                    ] = "all",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Dice and IoU of the whole cell and of the nucleus, per source; time per crop."""
    import json

    from smear.config import load_config
    from smear.pipeline.build import build_segmenter
    from smear.segment.evaluate import evaluate_path

    cfg = load_config("segment", config, set_ or [])
    seg = build_segmenter({"segment": method, "segmenter_model": model, "device": device})
    if seg is None:
        raise SmearError("--method off: nothing to evaluate", hint="unet | kmeans | grabcut")
    margin = float(getattr(seg, "crop_margin", cfg["model"]["crop_margin"]))
    m = evaluate_path(seg, data, cfg["data"], part, margin,
                      log=None if json_ else (lambda t: out_console.print(t, markup=False)))
    if json_:
        sys.stdout.write(json.dumps({"method": method, **m}, indent=2) + "\n")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()

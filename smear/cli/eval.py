"""`smear eval ...`: a stage's figures on labelled data."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from smear.cli.app import ConfigOpt, SetOpt, eval_app, out_console, show, warn
from smear.errors import SmearError


class DetectorName(str, Enum):
    yolo = "yolo"
    classical = "classical"


class SegmenterName(str, Enum):
    off = "off"
    unet = "unet"
    kmeans = "kmeans"
    grabcut = "grabcut"


def _pipeline(segment: str, segmenter_model: str, device: str):
    """The pipeline config of a segmenter given by options (checked as `smear run` checks it)."""
    from smear.config import load_config

    return load_config("pipeline", None, options={"--segment": ("segmenter", segment),
                                                  "--segmenter-model": ("segmenter_model", segmenter_model),
                                                  "--device": ("device", device)})


@eval_app.command("detect")
def eval_detect(
    data: Annotated[Path, typer.Option(help="VOC folder, YOLO data.yaml, COCO .json or images folder.")],
    model: Annotated[str, typer.Option(help="Detector model folder, or 'shipped'.")] = "shipped",
    split: Annotated[str, typer.Option(help="Split of a data.yaml.")] = "test",
    detector: Annotated[DetectorName, typer.Option(help="yolo | classical")] = DetectorName.yolo,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """mAP50, mAP50-95, AP50 per class, P/R at the shipped thresholds, per source."""
    import json

    from smear.artifacts import resolve_model_dir
    from smear.detect.data import DET_CLASSES, load_dataset
    from smear.detect.evaluate import evaluate_detector
    from smear.cli.render import render_detect_metrics
    from smear.config import load_config
    from smear.pipeline.build import build_detector

    samples, problems = load_dataset(data, split=split)
    for p in problems:
        warn(str(p))  # on stderr: the truth boxes scored against are the cleaned ones
    if not samples:
        raise SmearError(f"{data}: no labelled images found")
    if detector == DetectorName.yolo:
        from smear.detect.yolo import YoloDetector

        det = YoloDetector.from_dir(resolve_model_dir(model, "detector"), device=device)
        conf = {k: det.per_class_conf.get(k, det.conf) for k in DET_CLASSES}
        det.conf, det.per_class_conf = 0.001, {}  # score every box for AP; P/R use the shipped conf
        det = det.tiled()  # large fields are tiled as `smear run` tiles them
    else:
        det = build_detector(load_config("pipeline", None, ["detector=classical", f"device={device}"]))
        conf = {k: 0.0 for k in DET_CLASSES}
    metrics = evaluate_detector(det, samples, conf)
    for reason in metrics["skipped"]:
        warn(f"skipped {reason}")
    if json_:
        sys.stdout.write(json.dumps(metrics, indent=2) + "\n")
    else:
        render_detect_metrics(metrics, out_console)


@eval_app.command("classify")
def eval_classify(
    data: Annotated[Path, typer.Option(help="PBC-style folder, class-per-folder dataset or labels.csv folder.")],
    model: Annotated[str, typer.Option(help="Classifier model folder, or 'shipped'.")] = "shipped",
    split: Annotated[Optional[Path], typer.Option(help="A split JSON: evaluate one part of it.")] = None,
    part: Annotated[str, typer.Option(help="train | val | test, with --split.")] = "test",
    layout: Annotated[str, typer.Option(help="auto | pbc | folders | csv")] = "auto",
    out: Annotated[Optional[Path], typer.Option(help="Write metrics JSON and confusion-matrix PNGs here.")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    segment: Annotated[SegmenterName, typer.Option(help="off | unet | kmeans | grabcut: paint each crop's "
                                                        "background out before classifying it.")] = SegmenterName.off,
    segmenter_model: Annotated[str, typer.Option(help="U-Net model folder for --segment unet, or 'shipped'.")
                               ] = "shipped",
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Accuracy, macro-F1, kappa, AUC, ECE, per-class figures; also at the 8-group and 5-type levels."""
    import json

    from smear.artifacts import resolve_model_dir
    from smear.classify.evaluate import EvalData, evaluate
    from smear.pipeline.build import build_segmenter

    seg = build_segmenter(_pipeline(segment.value, segmenter_model, device))
    m = evaluate(resolve_model_dir(model, "classifier"), EvalData(data, layout=layout, split=split, part=part),
                 out=out, device=device, log=None if json_ else show, segmenter=seg, warn=warn)
    if json_:
        keys = ("accuracy", "macro_f1", "kappa", "ece", "per_class", "group8_accuracy", "type5_accuracy", "n",
                "n_skipped")
        sys.stdout.write(json.dumps({k: m.get(k) for k in keys}, indent=2, default=float) + "\n")


@eval_app.command("segment")
def eval_segment(
    data: Annotated[Path, typer.Option(help="A folder with images/ and masks/, or a folder of such folders.")],
    model: Annotated[str, typer.Option(help="U-Net model folder, or 'shipped'.")] = "shipped",
    method: Annotated[SegmenterName, typer.Option(help="unet | kmeans | grabcut")] = SegmenterName.unet,
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
    seg = build_segmenter(_pipeline(method.value, model, device))
    if seg is None:
        raise SmearError("--method off: nothing to evaluate", hint="unet | kmeans | grabcut")
    margin = float(seg.crop_margin)  # the geometry the segmenter states (the U-Net: its meta)
    m = evaluate_path(seg, data, cfg.data, part, margin,
                      log=None if json_ else show)
    if json_:
        sys.stdout.write(json.dumps({"method": method.value, **m}, indent=2) + "\n")

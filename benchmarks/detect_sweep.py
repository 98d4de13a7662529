"""Sweep the detector's inference settings on one split: border, input size, NMS IoU, TTA.

Usage: python benchmarks/detect_sweep.py --data DATA [--split val] [--model shipped]
           [--border 0,8,16,24] [--imgsz 512] [--iou 0.5] [--augment]
DATA is anything `smear eval detect --data` takes (for the detector's validation split: the
converted folder's data.yaml, --split val). Each combination predicts at conf 0.001, so AP is
threshold-free; it prints mAP50, mAP50-95, AP50 per class, mAP50 per source, and the median
width of predicted WBC boxes over their matched truth (1.0 = boxes fit the truth). Choose
settings on a validation split, never on a test split.
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np

from smear.artifacts import resolve_model_dir
from smear.detect.data import DET_CLASSES, load_dataset
from smear.detect.evaluate import box_iou, evaluate_predictions, predict_samples, tune_conf
from smear.detect.yolo import YoloDetector
from smear.taxonomy import CellKind


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def wbc_width_ratio(samples, preds, min_iou: float = 0.3) -> float:
    """Median predicted / true width over truth WBCs, each with its best-overlapping predicted WBC."""
    ratios = []
    for s, dets in zip(samples, preds):
        found = [d.box_xyxy for d in dets if d.kind == CellKind.WBC and d.score >= 0.25]
        for kind, t in s.boxes:
            if kind != CellKind.WBC or not found:
                continue
            best = max(found, key=lambda b: box_iou(b, t))
            if box_iou(best, t) >= min_iou:
                ratios.append((best[2] - best[0]) / (t[2] - t[0]))
    return float(np.median(ratios)) if ratios else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="val")
    ap.add_argument("--model", default="shipped")
    ap.add_argument("--border", type=_floats, default=None, help="comma list; default: the model's")
    ap.add_argument("--imgsz", type=_floats, default=None, help="comma list; default: the model's")
    ap.add_argument("--iou", type=_floats, default=None, help="comma list; default: the model's")
    ap.add_argument("--augment", action="store_true", help="also ultralytics test-time augmentation")
    args = ap.parse_args()
    model_dir = resolve_model_dir(args.model, "detector")
    samples, _ = load_dataset(args.data, split=args.split)
    base = YoloDetector.from_dir(model_dir, device="cpu")
    grid = itertools.product(args.border or [base.border], args.imgsz or [base.imgsz],
                             args.iou or [base.iou], [False, True] if args.augment else [False])
    print(f"{len(samples)} fields of {args.data} ({args.split}); model {model_dir}")
    for border, imgsz, iou, augment in grid:
        det = YoloDetector.from_dir(model_dir, device="cpu", conf=0.001, per_class_conf={},
                                    border=border, imgsz=int(imgsz), iou=iou)
        if augment:
            predict = det.model.predict
            det.model.predict = lambda images, **kw: predict(images, augment=True, **kw)
        preds = predict_samples(det, samples)
        m = evaluate_predictions(samples, preds, tune_conf(samples, preds))
        print(json.dumps({
            "border": border, "imgsz": int(imgsz), "iou": iou, "augment": augment,
            "map50": m["map50"], "map50_95": m["map50_95"],
            "ap50": {k.value: m["per_class"][k.value]["ap50"] for k in DET_CLASSES},
            "map50_per_source": {s: v["map50"] for s, v in m["per_source"].items()},
            "wbc_width_ratio": round(wbc_width_ratio(samples, preds), 3),
        }), flush=True)


if __name__ == "__main__":
    main()

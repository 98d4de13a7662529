"""Per-field detection time and figures of the shipped YOLO detector and the classical detector.

Usage: python benchmarks/detect_speed.py [--data ../shared/data/bccd/test] [--n 60] [--model shipped]
Prints one table: ms per field (batch 1 and batched), mAP50, WBC AP50, WBC P/R at the shipped
thresholds, on the same fields, in one process.
"""

from __future__ import annotations

import argparse
import platform
import time

from smear.artifacts import resolve_model_dir
from smear.detect.classical import ClassicalDetector
from smear.detect.data import DET_CLASSES, load_dataset
from smear.detect.evaluate import evaluate_predictions
from smear.detect.yolo import YoloDetector
from smear.devices import available_cores
from smear.io import read_image


def timed(detector, images, batch):
    detector.detect(images[:2])  # warm-up
    start = time.perf_counter()
    preds = []
    for i in range(0, len(images), batch):
        preds += detector.detect(images[i:i + batch])
    return preds, (time.perf_counter() - start) / len(images) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/bccd/test")
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--model", default="shipped")
    args = ap.parse_args()
    samples, _ = load_dataset(args.data)
    samples = samples[: args.n]
    images = [read_image(s.image) for s in samples]
    print(f"{len(images)} fields from {args.data}; {platform.processor() or platform.machine()}, "
          f"{available_cores()} cores")
    yolo = YoloDetector.from_dir(resolve_model_dir(args.model, "detector"), device="cpu")
    shipped = {k: yolo.per_class_conf.get(k, yolo.conf) for k in DET_CLASSES}
    rows = []
    for name, det, conf in (("yolo (shipped)", yolo, shipped),
                            ("classical", ClassicalDetector(), {k: 0.0 for k in DET_CLASSES})):
        _, ms1 = timed(det, images, 1)
        preds, ms8 = timed(det, images, 8)
        if det is yolo:  # AP needs every box: score again at a low threshold
            yolo.conf, yolo.per_class_conf = 0.001, {}
            preds = yolo.detect(images)
        m = evaluate_predictions(samples, preds, conf)
        w = m["per_class"]["wbc"]
        rows.append((name, ms1, ms8, m["map50"], w["ap50"], w["precision"], w["recall"]))
    print(f"{'detector':16} {'ms/field b1':>12} {'ms/field b8':>12} {'mAP50':>7} {'WBC AP50':>9} "
          f"{'WBC P':>6} {'WBC R':>6}")
    for name, ms1, ms8, map50, ap50, p, r in rows:
        f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"{name:16} {ms1:12.1f} {ms8:12.1f} {f(map50):>7} {f(ap50):>9} {f(p):>6} {f(r):>6}")


if __name__ == "__main__":
    main()

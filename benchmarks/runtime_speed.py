"""The detector alone and the classifier alone on each runtime, interleaved in one process, as ratios to onnx.

Usage: python benchmarks/runtime_speed.py [--n 16] [--repeat 3] [--runtime onnx --runtime onnx-int8 ...]
       [--no-classifier] [--crops 256]

Detector: ms per field over the first N BCCD test fields in batches of 8 (decoded once, outside the
timing). Classifier: crops per second over the first ``--crops`` PBC test-split crops with the
shipped 8 views. The runtimes take turns round by round, and each figure is the best of
``--repeat`` rounds, so a load that comes and goes hits them alike; the load average is printed.
The INT8 models are built first (untimed) from training data (``calibration_data``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from smear.artifacts import resolve_model_dir  # noqa: E402
from smear.devices import default_threads  # noqa: E402
from smear.io import read_image  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--runtime", action="append", default=[])
    ap.add_argument("--no-classifier", action="store_true")
    ap.add_argument("--crops", type=int, default=256)
    args = ap.parse_args()
    from smear.detect.yolo import YoloDetector
    from smear.pipeline.build import classifier_calibration, detector_calibration

    runtimes = args.runtime or ["onnx", "onnx-int8", "openvino", "openvino-int8"]
    paths = sorted((SHARED / "bccd" / "test" / "images").iterdir())[: args.n]
    images = [read_image(p) for p in paths]
    dets = {rt: YoloDetector.from_dir(resolve_model_dir("shipped", "detector"), runtime=rt,
                                      calibration=detector_calibration() if rt.endswith("int8") else None)
            for rt in runtimes}
    clfs, crops = {}, []
    if not args.no_classifier:
        from smear.classify.crop_cache import cached_crops
        from smear.classify.data import load_items, stratified_split
        from smear.classify.model import CnnClassifier

        clfs = {rt: CnnClassifier.from_dir(resolve_model_dir("shipped", "classifier"), runtime=rt,
                                           calibration=classifier_calibration() if rt.endswith("int8") else None)
                for rt in runtimes}
        items = stratified_split(load_items(SHARED / "pbc", "pbc"), (0.7, 0.15, 0.15), 0)[2][: args.crops]
        first = next(iter(clfs.values()))
        crops = list(cached_crops(items, first.crop_margin, first.input_size))
    for rt in runtimes:  # warm-up
        dets[rt].detect(images[:8])
        if clfs:
            clfs[rt].classify(crops[:16])
    det_t = {rt: [] for rt in runtimes}
    clf_t = {rt: [] for rt in runtimes}
    load0 = os.getloadavg()[0]
    for _ in range(args.repeat):
        for rt in runtimes:
            t = time.perf_counter()
            for i in range(0, len(images), 8):
                dets[rt].detect(images[i:i + 8])
            det_t[rt].append(time.perf_counter() - t)
            if clfs:
                t = time.perf_counter()
                clfs[rt].classify(crops)
                clf_t[rt].append(time.perf_counter() - t)
    print(f"{len(images)} BCCD test fields, {len(crops)} PBC test crops; {default_threads()} threads; "
          f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f}; best of {args.repeat}")
    print("| runtime | detector ms/field | / onnx | classifier crops/s (8 views) | onnx / this |")
    print("|---|---|---|---|---|")
    ref_d = min(det_t.get("onnx", next(iter(det_t.values()))))
    ref_c = min(clf_t["onnx"]) if clfs and "onnx" in clf_t else None
    for rt in runtimes:
        d = min(det_t[rt])
        c = min(clf_t[rt]) if clfs else None
        print(f"| {rt} | {1000 * d / len(images):.1f} | {d / ref_d:.2f}x | "
              + ("-" if c is None else f"{len(crops) / c:.0f}") + " | "
              + ("-" if c is None or ref_c is None else f"{ref_c / c:.2f}x") + " |")


if __name__ == "__main__":
    main()

"""Whole-pipeline speed against the detector alone and against the naive way, in one process.

Usage: python benchmarks/pipeline_speed.py [--data ../shared/data/bccd/test/images] [--n 60] [--repeat 2]

Prints one table, ms per field on the same N real fields (files read from disk every time):
- detector alone: smear's YoloDetector over the fields in batches (decoding included);
- smear pipeline, runtime torch and runtime onnx: detect + crop + classify + tally
  (`run_slide`, cache off, streamed), the shipped detector and classifier;
- naive: what a user would write: ultralytics `YOLO.predict` one image path at a time, each WBC box
  cropped and resized with PIL, each crop through the classifier one at a time.
and the ratios the speed issue asks for (pipeline / detector alone, naive / pipeline).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from smear.artifacts import load_meta, resolve_model_dir
from smear.classify.model import CnnClassifier
from smear.config import load_config
from smear.detect.yolo import YoloDetector
from smear.devices import available_cores, set_threads
from smear.io import Slide, find_slides, read_image
from smear.pipeline.build import build_stages
from smear.pipeline.run import run_slide


def detector_alone(det: YoloDetector, paths: list[Path], batch: int = 8) -> float:
    start = time.perf_counter()
    for i in range(0, len(paths), batch):
        det.detect([read_image(p) for p in paths[i:i + batch]])
    return time.perf_counter() - start


def pipeline(slide: Slide, runtime: str, tta: int | None = None) -> float:
    cfg = load_config("pipeline", None, ["classifier=cnn", "cache_dir=off", f"runtime={runtime}", "device=cpu",
                                         f"classify_tta={'null' if tta is None else tta}"])
    stages = build_stages(cfg)
    run_slide(slide, stages, keep_fields=False)  # warm-up (and the ONNX export on first use)
    start = time.perf_counter()
    run_slide(slide, stages, keep_fields=False)
    return time.perf_counter() - start


def naive(paths: list[Path]) -> float:
    """Ultralytics one image at a time, PIL crops, one crop at a time through the classifier."""
    from PIL import Image

    from smear.detect.ultra import yolo

    det_dir = resolve_model_dir("shipped", "detector")
    model = yolo(det_dir / "detector.pt")
    imgsz = int(load_meta(det_dir)["infer"]["imgsz"])
    clf = CnnClassifier.from_dir(resolve_model_dir("shipped", "classifier"), device="cpu")
    mean = torch.tensor(clf.meta.normalize["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(clf.meta.normalize["std"]).view(1, 3, 1, 1)
    model.predict(str(paths[0]), imgsz=imgsz, verbose=False)  # warm-up
    set_threads()
    start = time.perf_counter()
    for p in paths:
        res = model.predict(str(p), imgsz=imgsz, verbose=False)[0]
        set_threads()
        img = Image.open(p).convert("RGB")
        for (x0, y0, x1, y1), c in zip(res.boxes.xyxy.tolist(), res.boxes.cls.tolist()):
            if int(c) != 0:  # class 0 = wbc
                continue
            side = max(x1 - x0, y1 - y0) * clf.crop_margin
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            crop = img.crop((cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
            crop = crop.resize((clf.input_size, clf.input_size), Image.BILINEAR)
            x = torch.from_numpy(np.asarray(crop)).permute(2, 0, 1)[None].float() / 255
            with torch.no_grad():
                torch.softmax(clf.model((x - mean) / std) / clf.temperature, 1)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/bccd/test/images")
    ap.add_argument("--n", type=int, default=60)
    args = ap.parse_args()
    [slide] = find_slides([Path(args.data)])
    paths = list(slide.fields)[: args.n]
    slide = Slide(slide.name, tuple(paths))
    h, w = read_image(paths[0]).shape[:2]
    print(f"{len(paths)} fields ({w}x{h}) from {args.data}; {platform.processor() or platform.machine()}, "
          f"{available_cores()} cores, torch {torch.__version__}")
    t_det = {}
    for runtime in ("torch", "onnx"):
        det = YoloDetector.from_dir(resolve_model_dir("shipped", "detector"), device="cpu", runtime=runtime)
        det.detect([read_image(paths[0])])
        t_det[runtime] = detector_alone(det, paths)
    t_torch = pipeline(slide, "torch")
    t_onnx = pipeline(slide, "onnx")
    t_torch1 = pipeline(slide, "torch", tta=1)
    t_onnx1 = pipeline(slide, "onnx", tta=1)
    t_naive = naive(paths)
    n = len(paths)
    rows = [("detector alone, torch (batch 8)", t_det["torch"]), ("detector alone, onnx (batch 8)", t_det["onnx"]),
            ("smear pipeline, runtime torch (8 views/cell)", t_torch), ("smear pipeline, runtime onnx (8 views/cell)", t_onnx),
            ("smear pipeline, runtime torch, 1 view/cell", t_torch1), ("smear pipeline, runtime onnx, 1 view/cell", t_onnx1),
            ("naive (ultralytics 1 by 1, PIL, crops 1 by 1, 1 view)", t_naive)]
    print(f"{'':56} {'ms/field':>9}")
    for name, t in rows:
        print(f"{name:56} {1000 * t / n:9.1f}")
    best = min(t_torch, t_onnx)
    print(f"pipeline / detector alone, same runtime: torch {t_torch / t_det['torch']:.2f}x, "
          f"onnx {t_onnx / t_det['onnx']:.2f}x")
    print(f"  1 view/cell: torch {t_torch1 / t_det['torch']:.2f}x, onnx {t_onnx1 / t_det['onnx']:.2f}x")
    print(f"naive / pipeline (torch): {t_naive / t_torch:.2f}x; naive / pipeline (best runtime): {t_naive / best:.2f}x; "
          f"same work (1 view/cell): torch {t_naive / t_torch1:.2f}x, onnx {t_naive / t_onnx1:.2f}x")


if __name__ == "__main__":
    main()

"""Whole-pipeline speed per runtime, against the detector alone, the naive way and `yolo predict`, in one run.

Usage: python benchmarks/pipeline_speed.py [--data ../shared/data/bccd/test/images] [--n 60] [--repeat 2]
       [--runtime onnx --runtime onnx-int8 ...] [--no-process]

Every figure comes from this one run, measured back to back on the same N real fields (files read
from disk every time), so the ratios hold on a loaded machine even when the milliseconds move;
each timing is the fastest of ``--repeat`` (the load average is printed before and after).

In process, per runtime (torch, onnx, openvino, onnx-int8, openvino-int8; the OpenVINO rows need
``pip install "smear[openvino]"``, the INT8 rows the training data they are calibrated on):
- detector alone: the runtime's detector over the fields in batches of 8 (decoding included);
- pipeline: detect + crop + classify (the shipped classifier's own views per cell: 1) + tally (`run_slide`, cache off);
- classifier: crops per second on the WBC crops of these fields (the same views).
And naive: what a user would write: ultralytics `YOLO.predict` one image path at a time on the .pt,
each WBC box cropped and resized with PIL, each crop through the torch classifier one at a time.

Whole process (``--no-process`` skips it): `smear run` on the N fields (cache off) per runtime, and on
the 4-field demo slide, against `yolo predict` of the same fp32 detector (.pt) on the same fields.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from smear.artifacts import load_meta, resolve_model_dir  # noqa: E402
from smear.devices import available_cores  # noqa: E402
from smear.io import Slide, find_slides, read_image  # noqa: E402

RUNTIMES = ("torch", "onnx", "openvino", "onnx-int8", "openvino-int8")


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _cfg(runtime: str, extra: list[str] | None = None):
    from smear.config import load_config

    return load_config("pipeline", None, ["classifier=cnn", "cache_dir=off", f"runtime={runtime}", "device=cpu",
                                          *(extra or [])])


def in_process(slide: Slide, runtime: str, repeat: int) -> dict[str, float] | None:
    """Detector alone, pipeline and classifier crops/s for one runtime (None if it fell back)."""
    import warnings

    from smear.crops import cut_crop
    from smear.pipeline.build import build_stages
    from smear.pipeline.run import run_slide

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stages = build_stages(_cfg(runtime))
    fallbacks = [w for w in caught if issubclass(w.category, UserWarning)]  # not torch's export deprecations
    if fallbacks:
        print(f"  {runtime}: skipped ({fallbacks[0].message})")
        return None
    det = stages.detector
    paths = list(slide.fields)
    run_slide(slide, stages, keep_fields=False)  # warm-up

    def detect_all():
        for i in range(0, len(paths), 8):
            det.detect([read_image(p) for p in paths[i:i + 8]])

    t_det = best_of(repeat, detect_all)
    t_pipe = best_of(repeat, lambda: run_slide(slide, stages, keep_fields=False))
    clf = stages.classifier
    crops = []
    for p in paths:
        im = read_image(p)
        for d in det.detect([im])[0]:
            if d.kind.value == "wbc":
                crops.append(cut_crop(im, d.box_xyxy, clf.crop_margin, clf.input_size))
    crops = (crops * (1 + 256 // max(1, len(crops))))[:256]
    t_clf = best_of(repeat, lambda: clf.classify(crops))
    return {"det": t_det, "pipe": t_pipe, "crops_per_s": len(crops) / t_clf}


def naive(paths: list[Path]) -> float:
    """Ultralytics one image at a time, PIL crops, one crop at a time through the classifier."""
    import torch
    from PIL import Image

    from smear.classify.model import CnnClassifier
    from smear.detect.network import yolo
    from smear.devices import set_threads

    det_dir = resolve_model_dir("shipped", "detector")
    model = yolo(det_dir / load_meta(det_dir)["weights"])
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


def _wall(cmd: list[str], repeat: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "YOLO_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}

    def once():
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:4])}: {res.stderr[-500:]}")

    once()  # untimed: first-use exports and the page cache
    return best_of(repeat, once)


def whole_process(folder: Path, runtimes: list[str], repeat: int) -> dict[str, float]:
    """Wall seconds of `smear run` per runtime on ``folder`` and on the demo slide, and of `yolo predict`."""
    out = {}
    smear = [sys.executable, "-m", "smear.cli", "run"]
    with tempfile.TemporaryDirectory() as tmp:
        report = str(Path(tmp) / "report.txt")  # smear refuses to replace a device such as /dev/null
        for rt in runtimes:
            out[f"smear run {rt}"] = _wall([*smear, str(folder), "--set", "cache_dir=off", "--set", f"runtime={rt}",
                                            "--out", report], repeat)
            out[f"demo {rt}"] = _wall([*smear, str(ROOT / "examples" / "slide_demo"), "--set", "cache_dir=off",
                                       "--set", f"runtime={rt}", "--out", report], repeat)
    yolo_bin = shutil.which("yolo") or str(Path(sys.executable).with_name("yolo"))
    det_dir = resolve_model_dir("shipped", "detector")
    imgsz = int(load_meta(det_dir)["infer"]["imgsz"])
    with tempfile.TemporaryDirectory() as tmp:
        from smear.detect.network import yolo

        pt = Path(tmp) / "detector.pt"  # the shipped folder holds no pickle: ultralytics' CLI reads a .pt
        yolo(det_dir / load_meta(det_dir)["weights"]).save(str(pt))
        out["yolo predict"] = _wall([yolo_bin, "predict", f"model={pt}", f"source={folder}",
                                     f"imgsz={imgsz}", "save=False", "verbose=False", f"project={tmp}"], repeat)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "bccd" / "test" / "images"))
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--runtime", action="append", default=[], help=f"runtimes to time (default: {', '.join(RUNTIMES)})")
    ap.add_argument("--no-process", action="store_true", help="skip the whole-process timings")
    ap.add_argument("--process-runtime", action="append", default=[],
                    help="runtimes timed as whole processes (default: every runtime timed in process)")
    ap.add_argument("--no-naive", action="store_true")
    args = ap.parse_args()
    import onnxruntime
    import torch

    [slide] = find_slides([Path(args.data)])
    paths = list(slide.fields)[: args.n]
    slide = Slide(slide.name, tuple(paths))
    h, w = read_image(paths[0]).shape[:2]
    print(f"{len(paths)} fields ({w}x{h}) from {args.data}; {platform.processor() or platform.machine()}, "
          f"{available_cores()} cores, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; "
          f"load average {os.getloadavg()[0]:.1f}")
    runtimes = args.runtime or list(RUNTIMES)
    n = len(paths)
    got = {}
    for rt in runtimes:
        r = in_process(slide, rt, args.repeat)
        if r is not None:
            got[rt] = r
    t_naive = None if args.no_naive else naive(paths)
    print(f"\n| in process ({n} fields) | detector alone, ms/field | pipeline, ms/field | pipeline / its detector "
          f"| pipeline / fp32 onnx detector | naive / pipeline | classifier crops/s (its views) |")
    print("|---|---|---|---|---|---|---|")
    ref = got.get("onnx", {}).get("det")
    for rt, r in got.items():
        print(f"| {rt} | {1000 * r['det'] / n:.1f} | {1000 * r['pipe'] / n:.1f} | {r['pipe'] / r['det']:.2f}x | "
              + (f"{r['pipe'] / ref:.2f}x" if ref else "-") + " | "
              + (f"{t_naive / r['pipe']:.2f}x" if t_naive else "-") + f" | {r['crops_per_s']:.0f} |")
    if t_naive:
        print(f"| naive (ultralytics 1 by 1 on the .pt, PIL, crops 1 by 1, 1 view) | - | {1000 * t_naive / n:.1f} "
              f"| - | - | 1.00x | - |")
    if not args.no_process:
        folder = Path(tempfile.mkdtemp(prefix="smear-speed-"))
        try:
            for p in paths:
                (folder / p.name).symlink_to(p.resolve())
            wall = whole_process(folder, args.process_runtime or list(got), args.repeat)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        y = wall["yolo predict"]
        print(f"\n| whole process | {n} fields, s | / `yolo predict` ({y:.2f} s) | 4-field demo slide, s |")
        print("|---|---|---|---|")
        for rt in args.process_runtime or list(got):
            print(f"| smear run, runtime {rt} | {wall[f'smear run {rt}']:.2f} | {wall[f'smear run {rt}'] / y:.2f}x | "
                  f"{wall[f'demo {rt}']:.2f} |")
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

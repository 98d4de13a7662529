"""Classifier cost: ms per crop (1 view, 8 views, selective views) and what it adds to `smear run`.

1. In process: each model folder's classifier (onnxruntime, as `smear run` uses it) on the same
   crops, ms per crop at 1 view, 8 views, and 8 views only below a top-probability margin.
2. Whole process: `smear run` on the BCCD test fields (cache off) with the classifier off and with
   each model folder; the ratio to the classifier-off run is what the classifier adds per field.

    python benchmarks/classifier_speed.py --model shipped --model shipped:classifier_mobilenet
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from smear.artifacts import resolve_model_dir  # noqa: E402
from smear.classify.crop_cache import cached_crops  # noqa: E402
from smear.classify.data import load_items, stratified_split  # noqa: E402
from smear.classify.model import CnnClassifier  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def per_crop(model: str, crops: list, margin: float) -> dict[str, float]:
    out = {}
    for name, tta, m in (("1 view", 1, 0.0), ("8 views", 8, 0.0), (f"8 views under {margin}", 8, margin)):
        clf = CnnClassifier.from_dir(resolve_model_dir(model, "classifier"), device="cpu", runtime="onnx", tta=tta)
        clf.tta_margin = m
        clf.classify(crops[:32])  # warm-up
        t0 = time.perf_counter()
        clf.classify(crops)
        out[name] = (time.perf_counter() - t0) * 1000 / len(crops)
    return out


def whole_run(fields: Path, sets: list[str], repeat: int) -> float:
    cmd = [sys.executable, "-m", "smear.cli", "run", str(fields), "--report", "csv", "--set", "cache_dir=off", *sets]
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", default=[])
    ap.add_argument("--n-crops", type=int, default=256)
    ap.add_argument("--margin", type=float, default=0.9)
    ap.add_argument("--fields", type=Path, default=SHARED / "bccd" / "test" / "images")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    models = args.model or ["shipped"]
    items = stratified_split(load_items(SHARED / "pbc", "pbc"), (0.7, 0.15, 0.15), 0)[2][: args.n_crops]
    print(f"load average {os.getloadavg()[0]:.1f}; {len(items)} PBC test crops; fields {args.fields}")
    print("\n| model | ms/crop, 1 view | ms/crop, 8 views | ms/crop, 8 views under margin |\n|---|---|---|---|")
    for model in models:
        clf = CnnClassifier.from_dir(resolve_model_dir(model, "classifier"), device="cpu")
        crops = list(cached_crops(items, clf.crop_margin, clf.input_size, None))
        r = per_crop(model, crops, args.margin)
        print(f"| {model} | " + " | ".join(f"{v:.2f}" for v in r.values()) + " |")
    n = len([p for p in args.fields.iterdir() if p.suffix.lower() in {".jpg", ".png", ".jpeg"}])
    base = whole_run(args.fields, ["--set", "classifier=off"], args.repeat)
    print(f"\n| `smear run`, {n} fields, cache off | s | ms/field | / classifier off |\n|---|---|---|---|")
    print(f"| classifier off (detector) | {base:.1f} | {base * 1000 / n:.0f} | 1.00 |")
    for model in models:
        for tta in (1, 8):
            t = whole_run(args.fields, ["--set", f"classifier_model={model}", "--set", f"classify_tta={tta}"], args.repeat)
            print(f"| {model}, {tta} view(s) | {t:.1f} | {t * 1000 / n:.0f} | {t / base:.2f} |")


if __name__ == "__main__":
    main()

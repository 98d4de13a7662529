"""Time per WBC crop of the shipped U-Net (torch and onnx runtimes) and the classical baselines.

Usage: python benchmarks/segment_speed.py [--data ../shared/data/wbc-seg] [--n 120]

Crops are cut as the pipeline cuts them (the WBC box x 1.3, resized to 128 px) from the sources'
test parts; the U-Net runs in batches of 32, the baselines one crop at a time (they have no batch).
Prints ms per crop and the cell / nucleus Dice on the same crops.
"""

from __future__ import annotations

import argparse
import platform
import time

from smear.artifacts import resolve_model_dir
from smear.config import load_config
from smear.devices import available_cores
from smear.segment.classical import GrabCutSegmenter, KMeansSegmenter
from smear.segment.data import load_parts
from smear.segment.evaluate import evaluate_segmenter
from smear.segment.model import UnetSegmenter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/wbc-seg")
    ap.add_argument("--n", type=int, default=120)
    args = ap.parse_args()
    d = load_config("segment", None, []).data.model_copy(update={"root": args.data})
    items = load_parts(d, 1.3, 128)["test"][: args.n]
    print(f"{len(items)} test crops (128 px) from {args.data}; {platform.processor() or platform.machine()}, "
          f"{available_cores()} cores")
    model = resolve_model_dir("shipped", "segmenter")
    methods = [("U-Net, torch", UnetSegmenter.from_dir(model, device="cpu")),
               ("U-Net, onnx", UnetSegmenter.from_dir(model, runtime="onnx")),
               ("k-means (K=3)", KMeansSegmenter()), ("GrabCut", GrabCutSegmenter())]
    print(f"{'method':16} {'ms/crop':>8} {'cell Dice':>10} {'nucleus Dice':>13}")
    for name, seg in methods:
        seg.segment([items[0].image])  # warm-up
        t = time.perf_counter()
        m = evaluate_segmenter(seg, items, batch=32)
        ms = 1000 * (time.perf_counter() - t) / len(items)
        print(f"{name:16} {ms:8.1f} {m['cell_dice']:10.3f} {m['nucleus_dice']:13.3f}")


if __name__ == "__main__":
    main()

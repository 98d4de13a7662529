"""Precision and recall of the classical colour detector on BCCD, per kind, at IoU 0.5.

Usage: python benchmarks/classical_bccd.py [--split test] [--limit N] [--set key=value ...]
Tune on --split train; report --split test. Reads ../shared/data/bccd (not shipped).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from smear.detect.classical import ClassicalDetector
from smear.detect.data import clean_boxes, read_voc
from smear.detect.evaluate import match_boxes
from smear.io import read_image
from smear.types import CellKind, Detection

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bccd"


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=0, help="first N fields only (0: all)")
    ap.add_argument("--iou", type=float, default=0.5)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="detector parameter")
    ap.add_argument("--misses", action="store_true", help="list fields with WBC errors")
    args = ap.parse_args(argv)
    folder = args.data / args.split
    if not folder.is_dir():
        print(f"no data at {folder}", file=sys.stderr)
        return 2
    samples, _ = read_voc(folder)
    samples, _ = clean_boxes(samples)
    samples = samples[: args.limit] if args.limit else samples
    params = dict(kv.split("=", 1) for kv in args.set)
    det = ClassicalDetector(**{k: _value(v) for k, v in params.items()})
    counts = {k: [0, 0, 0] for k in CellKind}
    seconds = 0.0
    for s in samples:
        image = read_image(s.image)
        t0 = time.perf_counter()
        [pred] = det.detect([image])
        seconds += time.perf_counter() - t0
        truth = [Detection(b, k) for k, b in s.boxes]
        for kind in CellKind:
            tp, fp, fn = match_boxes([d for d in pred if d.kind == kind], [t for t in truth if t.kind == kind],
                                     args.iou)
            c = counts[kind]
            c[0], c[1], c[2] = c[0] + tp, c[1] + fp, c[2] + fn
            if args.misses and kind == CellKind.WBC and (fp or fn):
                print(f"  {s.image.name}: wbc tp {tp} fp {fp} fn {fn}")
    print(f"classical detector on BCCD {args.split}: {len(samples)} fields, IoU {args.iou}")
    for kind, (tp, fp, fn) in counts.items():
        prec = tp / (tp + fp) if tp + fp else float("nan")
        rec = tp / (tp + fn) if tp + fn else float("nan")
        print(f"  {kind.value:9s} precision {prec:.3f}  recall {rec:.3f}  (tp {tp}, fp {fp}, fn {fn})")
    print(f"  time      {1000 * seconds / max(len(samples), 1):.1f} ms/field")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Choose the WBC confidence floor per source on validation data, and check the WBC plausibility check.

Usage: python benchmarks/wbc_floor.py [--model shipped] [--floors 0.074,0.1,0.15,0.2,0.25,0.3,0.4]

The validation fields are the detector's own: a seeded 15% of bccd/train (seed 0) and txl-pbc
val. Boxes are predicted once at conf 0.001 through the pipeline's detector (tiling, and the
plausibility check unless ``--no-check``); for each floor and source it prints WBC precision and
recall at IoU 0.5 and the false WBC boxes on red cells, and the lowest score of a true WBC per
source. Choose on validation only; report on the test splits (benchmarks/other_labs.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from smear.config import load_config  # noqa: E402
from smear.detect.data import load_dataset, split_holdout  # noqa: E402
from smear.detect.evaluate import predict_samples, wbc_rows  # noqa: E402
from smear.pipeline.build import build_detector  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def validation_samples():
    bccd, _ = load_dataset(SHARED / "bccd" / "train", split="train")
    _, bccd_val = split_holdout(bccd, 0.15, 0)
    txl, _ = load_dataset(SHARED / "txl-pbc" / "data.yaml", split="val")
    return bccd_val + txl


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="shipped")
    ap.add_argument("--floors", default="0.074,0.1,0.15,0.2,0.25,0.3,0.4")
    ap.add_argument("--no-check", action="store_true", help="without the WBC plausibility check")
    args = ap.parse_args()
    sets = [f"detector_model={args.model}", "runtime=torch", f"wbc_check.enabled={str(not args.no_check).lower()}"]
    det = build_detector(load_config("pipeline", None, sets))
    yolo = (det.detector if hasattr(det, "check") else det).inner  # CheckedDetector > TiledDetector > YOLO
    yolo.per_class_conf = {k: v for k, v in yolo.per_class_conf.items() if k.value != "wbc"}
    yolo.conf = 0.001  # every WBC box scored; the RBC and platelet thresholds stay (the check uses RBCs)
    samples = validation_samples()
    preds = predict_samples(det, samples)
    print(f"validation: {len(samples)} fields; check {'off' if args.no_check else 'on'}\n")
    print("| floor | source | WBCs | precision | recall | false WBC | on a red cell |")
    print("|---|---|---|---|---|---|---|")
    for floor in (float(v) for v in args.floors.split(",")):
        for src, r in wbc_rows(samples, preds, floor).items():
            print(f"| {floor:g} | {src} | {r['n_wbc']} | {r['precision']} | {r['recall']} | {r['false_wbc']} | "
                  f"{r['rbc_as_wbc']} |")
    from smear.detect.evaluate import _arrays, _greedy, iou_matrix, truth_detections
    from smear.taxonomy import CellKind

    low: dict[str, list[float]] = {}
    for s, p in zip(samples, preds):
        pb, ps = _arrays(p, CellKind.WBC)
        tb, _ = _arrays(truth_detections(s), CellKind.WBC)
        if len(pb) and len(tb):
            hit = _greedy(iou_matrix(pb, tb), np.argsort(-ps, kind="stable"), 0.5)
            low.setdefault(s.source or "unknown", []).extend(ps[hit].tolist())
    for src, scores in sorted(low.items()):
        print(f"{src}: true WBC scores: min {min(scores):.3f}, 1st percentile {np.percentile(scores, 1):.3f}")


if __name__ == "__main__":
    main()

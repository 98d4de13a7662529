"""Accuracy gates of the INT8 runtimes, each model against its fp32 self (``runtime: onnx``).

Usage: python benchmarks/int8_gates.py [--runtime onnx-int8 --runtime openvino-int8 ...] [--raabin DIR/test]
       [--json out.json] [--no-detector] [--no-classifier]

Detector, per runtime: mAP50 (all boxes over conf 0.001, no WBC check) on BCCD test and on each
TXL-PBC test source; WBC precision and recall at the shipped thresholds (the pipeline's detector:
per-class thresholds and WBC check), and the red-cell boxes kept there (not a gate: the count the
INT8 score shift is for). Classifier, per runtime: 11-class accuracy and ECE on the PBC
test split (stratified, seed 0, 0.7/0.15/0.15), 5-type accuracy and ECE on jtsc, cellavision and
Raabin Test-A, and the share of cells the novelty score holds back. The INT8 models are calibrated
on training data only (BCCD/TXL-PBC train fields, PBC training-split crops: ``calibration_data``).

Gates (the speed issue's): |delta mAP50| <= 0.005 per source, WBC P/R unchanged, |delta accuracy| <=
0.005, |delta ECE| <= 0.005, novelty holds within 1 point. Prints one markdown table per stage
with each delta and PASS/FAIL.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared" / "data"
GATE = 0.005


def detector_rows(runtime: str) -> dict[str, dict]:
    from smear.artifacts import resolve_model_dir
    from smear.config import load_config
    from smear.detect.data import load_dataset
    from smear.detect.evaluate import predict_samples, score_detections, truth_detections, wbc_rows
    from smear.detect.yolo import YoloDetector
    from smear.pipeline.build import build_detector, detector_calibration

    cfg = load_config("pipeline", None, [f"runtime={runtime}", "device=cpu"])
    calib = detector_calibration(cfg.calibration_data) if runtime.endswith("int8") else None
    raw = YoloDetector.from_dir(resolve_model_dir("shipped", "detector"), device="cpu", runtime=runtime,
                                calibration=calib, conf=0.001)  # all boxes, for mAP
    shipped = build_detector(cfg)
    rows: dict[str, dict] = {}
    for name, path, split in (("bccd-test", SHARED / "bccd" / "test", "test"),
                              ("txl-pbc-test", SHARED / "txl-pbc" / "data.yaml", "test")):
        samples, _ = load_dataset(path, split=split)
        preds = predict_samples(raw, samples)
        truths = [truth_detections(s) for s in samples]
        at_thresholds = predict_samples(shipped, samples)
        wbc = wbc_rows(samples, at_thresholds, conf=0.0)
        groups = {"all": list(range(len(samples)))}
        if name != "bccd-test":
            for i, s in enumerate(samples):
                groups.setdefault(s.source or "unknown", []).append(i)
        for src, idx in groups.items():
            if name != "bccd-test" and src == "all":
                continue
            m = score_detections([preds[i] for i in idx], [truths[i] for i in idx], {})
            w = wbc["all" if name == "bccd-test" else src]
            rows[name if src == "all" else f"{name}/{src}"] = {
                "fields": len(idx), "map50": m["map50"], "wbc_precision": w["precision"], "wbc_recall": w["recall"],
                "wbc_boxes": w["n_pred"],
                "rbc_boxes": sum(d.kind.value == "rbc" for i in idx for d in at_thresholds[i] or ())}
    return rows


def classifier_rows(runtime: str, raabin: str | None, cache_dir: str | None) -> dict[str, dict]:
    from smear.artifacts import resolve_model_dir
    from smear.classify.crop_cache import cached_crops
    from smear.classify.data import load_items, stratified_split
    from smear.classify.evaluate import lab_row
    from smear.classify.model import CnnClassifier

    calib = SHARED / "pbc" if runtime.endswith("int8") else None
    clf = CnnClassifier.from_dir(resolve_model_dir("shipped", "classifier"), device="cpu", runtime=runtime,
                                 calibration=calib)
    sets = [(n, load_items(SHARED / "wbc-seg" / n, "csv")) for n in ("jtsc", "cellavision")]
    if raabin and Path(raabin).is_dir():
        sets.append(("raabin-test-A", load_items(raabin, "folders")))
    sets.append(("pbc-test", stratified_split(load_items(SHARED / "pbc", "pbc"), (0.7, 0.15, 0.15), 0)[2]))
    rows = {}
    for name, items in sets:
        crops = cached_crops(items, clf.crop_margin, clf.input_size, cache_dir)
        t = time.perf_counter()
        scores = clf.classify(list(crops))
        probs, ratio = scores.probs, scores.novelty
        dt = time.perf_counter() - t
        held = None if ratio is None else ratio > 1.0
        r = lab_row(probs, [it.fine or it.group for it in items], 0.5, held)
        rows[name] = {"n": r["n"], "type5_accuracy": r["type5_accuracy"], "type5_ece": r["type5_ece"],
                      "accuracy": r["accuracy"] if r["n_fine"] else None, "ece": r["ece"] if r["n_fine"] else None,
                      "novelty_held": None if held is None else float(held.mean()), "crops_per_s": len(crops) / dt}
    return rows


def _delta(a, b):
    return None if a is None or b is None else b - a


def gate_table(stage: str, base: dict, other: dict, runtime: str) -> bool:
    """Print base vs other with deltas; True when every gate holds."""
    ok = True
    if stage == "detector":
        print(f"\n### detector: {runtime} against onnx (fp32)\n")
        print("| source | fields | mAP50 fp32 | mAP50 | delta | WBC P fp32 -> | WBC R fp32 -> | RBC boxes fp32 -> | gate |")
        print("|---|---|---|---|---|---|---|---|---|")
        for src, b in base.items():
            o = other[src]
            d = _delta(b["map50"], o["map50"])
            same = (b["wbc_precision"], b["wbc_recall"]) == (o["wbc_precision"], o["wbc_recall"])
            good = d is not None and abs(d) <= GATE and same
            ok &= good
            print(f"| {src} | {b['fields']} | {b['map50']:.4f} | {o['map50']:.4f} | {d:+.4f} | "
                  f"{b['wbc_precision']:.4f} -> {o['wbc_precision']:.4f} | {b['wbc_recall']:.4f} -> "
                  f"{o['wbc_recall']:.4f} | {b['rbc_boxes']} -> {o['rbc_boxes']} | {'PASS' if good else 'FAIL'} |")
    else:
        print(f"\n### classifier: {runtime} against onnx (fp32)\n")
        print("| set | n | acc fp32 -> (delta) | ECE fp32 -> (delta) | novelty held fp32 -> | crops/s fp32, this | gate |")
        print("|---|---|---|---|---|---|---|")
        for name, b in base.items():
            o = other[name]
            acc, ece = ("accuracy", "ece") if name == "pbc-test" else ("type5_accuracy", "type5_ece")
            da, de = _delta(b[acc], o[acc]), _delta(b[ece], o[ece])
            dn = _delta(b["novelty_held"], o["novelty_held"])
            good = abs(da) <= GATE and abs(de) <= GATE and (dn is None or abs(dn) <= 0.01)
            if acc == "accuracy":  # PBC: the 5-type accuracy is gated too
                good &= abs(_delta(b["type5_accuracy"], o["type5_accuracy"])) <= GATE
            ok &= good
            nov = "-" if dn is None else f"{b['novelty_held']:.4f} -> {o['novelty_held']:.4f}"
            print(f"| {name} ({acc.replace('type5_accuracy', '5-type').replace('accuracy', '11-class')}) | {b['n']} | "
                  f"{b[acc]:.4f} -> {o[acc]:.4f} ({da:+.4f}) | {b[ece]:.4f} -> {o[ece]:.4f} ({de:+.4f}) | {nov} | "
                  f"{b['crops_per_s']:.0f}, {o['crops_per_s']:.0f} | {'PASS' if good else 'FAIL'} |")
    print(f"\n{runtime} {stage}: {'all gates hold' if ok else 'a gate fails'}")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", action="append", default=[], help="runtimes to gate (default: onnx-int8, "
                    "openvino-int8 when openvino is installed)")
    ap.add_argument("--raabin", default=os.environ.get("SMEAR_RAABIN_TEST", "/work/raabin/test"))
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--no-detector", action="store_true")
    ap.add_argument("--no-classifier", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    runtimes = args.runtime
    if not runtimes:
        import importlib.util

        runtimes = ["onnx-int8"] + (["openvino", "openvino-int8"] if importlib.util.find_spec("openvino") else [])
    out: dict[str, dict] = {"detector": {}, "classifier": {}, "gates": {}}
    for stage, skip in (("detector", args.no_detector), ("classifier", args.no_classifier)):
        if skip:
            continue
        rows = (detector_rows if stage == "detector" else
                lambda rt: classifier_rows(rt, args.raabin, args.cache_dir))
        out[stage]["onnx"] = base = rows("onnx")
        for rt in runtimes:
            out[stage][rt] = rows(rt)
            out["gates"][f"{stage} {rt}"] = gate_table(stage, base, out[stage][rt], rt)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

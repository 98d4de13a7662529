"""Other labs: how a classifier and a detector do on stains, scanners and scales they were not tuned on.

Classifier table, one row per visible set, at the 5-type level (the only level the other labs
label): n, accuracy, balanced accuracy (mean per-type recall), macro-F1, the majority-type
baseline ("always neutrophil" on most sets), the share the pipeline would leave UNIDENTIFIED at
its review threshold (plus the novelty score's holds, when the model has one) and ECE. Rows:

- jtsc, cellavision: ``../shared/data/wbc-seg/{jtsc,cellavision}`` (labels.csv, never trained on);
- raabin-test-A: Raabin-WBC Test-A as staged by ``smear data stage-raabin`` (``--raabin DIR/test``);
- pbc-test: the PBC test split (stratified, seed 0, 0.7/0.15/0.15: the split every shipped
  classifier was trained around), with its 11-class accuracy too.

Detector table (``--detector``): WBC precision and recall at the shipped thresholds per source
(BCCD test; TXL-PBC test per source), with the red cells taken for WBCs counted on their own;
``--stain NAME`` scores it again on the same fields through a fixed stain shift, as a stand-in for
a lab whose stain none of the sources has.

    python benchmarks/other_labs.py --model smear/weights/classifier --raabin /data/raabin/test
    python benchmarks/other_labs.py --model RUN/model --adabn --json out.json
    python benchmarks/other_labs.py --detector shipped --no-classifier
    python benchmarks/other_labs.py --detector shipped --no-classifier --stain cyan --stain pale

``--adabn`` re-estimates the BatchNorm statistics on each set's own crops before predicting it
(AdaBN; a set stands in for a slide). Prints markdown tables; ``--json`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from smear.artifacts import resolve_model_dir  # noqa: E402
from smear.classify.crop_cache import cached_crops  # noqa: E402
from smear.classify.data import load_items, stratified_split  # noqa: E402
from smear.classify.evaluate import lab_row  # noqa: E402
from smear.classify.model import CnnClassifier  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def class_sets(args) -> list[tuple[str, list]]:
    sets = []
    for name in ("jtsc", "cellavision"):
        root = Path(args.wbc_seg) / name
        if root.is_dir():
            sets.append((name, load_items(root, "csv")))
    if args.raabin and Path(args.raabin).is_dir():
        sets.append(("raabin-test-A", load_items(args.raabin, "folders")))
    if Path(args.pbc).is_dir():
        sets.append(("pbc-test", stratified_split(load_items(args.pbc, "pbc"), (0.7, 0.15, 0.15), 0)[2]))
    return sets


def classifier_table(model_dir: str, args) -> dict[str, dict]:
    clf = CnnClassifier.from_dir(resolve_model_dir(model_dir, "classifier"), device="cpu")
    if args.tta:
        clf.tta = args.tta
    if args.tta_margin is not None:
        clf.tta_margin = args.tta_margin
    state = {k: v.clone() for k, v in clf.model.state_dict().items()}
    rows = {}
    for name, items in class_sets(args):
        crops = cached_crops(items, clf.crop_margin, clf.input_size, args.cache_dir)
        if args.shift and name == "pbc-test":
            rows.update(_shifted_rows(clf, crops, items, args))
        if args.adabn:
            from smear.classify.model import adapt_batchnorm

            clf.model.load_state_dict(state)
            adapt_batchnorm(clf, list(crops))
        rows[name] = _row(clf, list(crops), items, args)
    clf.model.load_state_dict(state)
    return rows


def _row(clf, crops, items, args) -> dict:
    """One set's row: the classifier on its crops, novelty holds counted as unidentified."""
    scores = clf.classify(crops)
    held = None if scores.novelty is None else scores.novelty > 1.0
    return lab_row(scores.probs, [it.fine or it.group for it in items], args.review_threshold, held)


def _shifted_rows(clf, crops, items, args) -> dict[str, dict]:
    """The PBC test crops again through each fixed stain shift (``--shift``): a lab whose stain
    none of the sources has, with the PBC labels."""
    from smear.detect.stain import shift

    return {f"pbc-test+{name}": _row(clf, [shift(c, name) for c in crops], items, args) for name in args.shift}


class _Shifted:
    """A detector that sees every field through a fixed stain shift (smear.detect.stain.SHIFTS)."""

    def __init__(self, det, name: str):
        self.det, self.name = det, name

    def detect(self, images):
        from smear.detect.stain import shift

        return self.det.detect([shift(im, self.name) for im in images])


def detector_table(model: str, overrides: list[str], stain: str | None = None) -> dict[str, dict]:
    from smear.config import load_config
    from smear.detect.data import load_dataset
    from smear.detect.evaluate import predict_samples, wbc_rows
    from smear.pipeline.build import build_detector

    cfg = load_config("pipeline", None, [f"detector_model={model}", "runtime=torch", *overrides])
    det = build_detector(cfg)
    if stain:
        det = _Shifted(det, stain)
    rows = {}
    for name, path, split in (("bccd-test", SHARED / "bccd" / "test", "test"),
                              ("txl-pbc-test", SHARED / "txl-pbc" / "data.yaml", "test")):
        if not Path(path).exists():
            continue
        samples, _ = load_dataset(path, split=split)
        got = wbc_rows(samples, predict_samples(det, samples), conf=0.0)
        for src, row in got.items():
            if name == "bccd-test" and src != "all":
                continue
            rows[name if src == "all" else f"{name}/{src}"] = row
    return rows


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def print_classifier(name: str, rows: dict[str, dict]) -> None:
    print(f"\n### classifier {name}\n")
    print("| set | n | 5-type acc | balanced acc | macro-F1 | majority | unidentified | ECE (5-type) | 11-class acc "
          "| neutrophils called EO |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for set_name, r in rows.items():
        fine = _f(r["accuracy"]) if r["n_fine"] else "-"
        print(f"| {set_name} | {r['n']} | {_f(r['type5_accuracy'])} | {_f(r['type5_balanced_accuracy'])} | "
              f"{_f(r['type5_macro_f1'])} | {_f(r['majority_baseline'])} | {_f(r['unidentified'])} | "
              f"{_f(r['type5_ece'])} | {fine} | {_f(r.get('neutrophil_as_eo'))} |")


def print_detector(name: str, rows: dict[str, dict]) -> None:
    print(f"\n### detector {name} (WBC at the shipped thresholds, IoU 0.5)\n")
    print("| source | fields | WBCs | WBC boxes | precision | recall | false WBC boxes | of them on a red cell |")
    print("|---|---|---|---|---|---|---|---|")
    for src, r in rows.items():
        print(f"| {src} | {r['n_images']} | {r['n_wbc']} | {r['n_pred']} | {_f(r['precision'])} | "
              f"{_f(r['recall'])} | {r['false_wbc']} | {r['rbc_as_wbc']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=[], help="classifier model folder(s), or 'shipped'")
    ap.add_argument("--no-classifier", action="store_true")
    ap.add_argument("--detector", action="append", default=[], help="detector model folder(s), or 'shipped'")
    ap.add_argument("--raabin", default=os.environ.get("SMEAR_RAABIN_TEST"), help="staged Raabin Test-A folder")
    ap.add_argument("--wbc-seg", default=str(SHARED / "wbc-seg"))
    ap.add_argument("--pbc", default=str(SHARED / "pbc"))
    ap.add_argument("--review-threshold", type=float, default=0.5)
    ap.add_argument("--tta", type=int, default=0, help="override the model's test-time views")
    ap.add_argument("--shift", action="append", default=[], help="also score the classifier on the PBC test "
                    "crops through this fixed stain shift (smear.detect.stain.SHIFTS)")
    ap.add_argument("--tta-margin", type=float, default=None, help="selective TTA: the extra views only for "
                    "crops whose one-view top probability is under this (0: every crop)")
    ap.add_argument("--adabn", action="store_true", help="re-estimate BatchNorm statistics per set")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--set", action="append", default=[], help="pipeline config override for the detector, "
                    "e.g. wbc_check.enabled=false")
    ap.add_argument("--stain", action="append", default=[], help="also score the detector on fields "
                    "through this fixed stain shift (smear.detect.stain.SHIFTS: cyan, violet, hue+30, ...)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    models = [] if args.no_classifier else (args.model or ["shipped"])
    out: dict[str, dict] = {"classifier": {}, "detector": {}}
    for m in models:
        rows = classifier_table(m, args)
        out["classifier"][m + (" +AdaBN" if args.adabn else "")] = rows
        print_classifier(m + (" +AdaBN" if args.adabn else ""), rows)
    for d in args.detector:
        for stain in [None, *args.stain]:
            name = d + "".join(f" {o}" for o in args.set) + (f" stain={stain}" if stain else "")
            rows = detector_table(d, args.set, stain)
            out["detector"][name] = rows
            print_detector(name, rows)
    if args.json:
        from smear.io import write_text_atomic

        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.json, json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

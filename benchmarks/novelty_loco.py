"""Leave-one-class-out test of the per-cell novelty score.

A classifier trained without one class (``data.sources[0].exclude: [BA]``; its novelty score fitted
on its own training crops at the end of training) meets that class for the first time in the PBC
test split. Prints, for the novelty score and for the review threshold alone (calibrated top
probability under 0.5), the share of the left-out class's test cells held back as UNIDENTIFIED
(target >= 80%) and the share of the other classes' test cells held back too (false holds,
target <= 5%), with the classes the left-out cells were called otherwise. Also: the novelty score's held share at a
threshold set to exactly 5% false holds (a like-for-like comparison between models), and the share
of non-cells held, made from the other classes' test crops by ``smear.nn.augment.artefacts`` (jigsaw,
smudge, cut cell; seeded), the artefacts an outlier-exposure run trains against.

    python benchmarks/novelty_loco.py --model RUN/model --left-out BA [--pbc ../shared/data/pbc]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from smear.classify.crop_cache import cached_crops  # noqa: E402
from smear.classify.data import load_items, stratified_split  # noqa: E402
from smear.classify.model import CnnClassifier  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--left-out", default="BA")
    ap.add_argument("--pbc", default=str(ROOT.parent / "shared" / "data" / "pbc"))
    ap.add_argument("--review-threshold", type=float, default=0.5)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    clf = CnnClassifier.from_dir(args.model, device="cpu")
    if not clf.has_novelty:
        sys.exit(f"{args.model}: the model has no novelty score (smear train novelty RUN)")
    test = stratified_split(load_items(args.pbc, "pbc"), (0.7, 0.15, 0.15), 0)[2]
    crops = list(cached_crops(test, clf.crop_margin, clf.input_size, args.cache_dir))
    scores = clf.classify(crops)
    probs, ratio = scores.probs, scores.novelty
    out_mask = np.array([it.fine == args.left_out for it in test])
    novel = ratio > 1.0
    low = probs.max(1) < args.review_threshold
    rows = {}
    for name, held in (("novelty score", novel), ("top probability < review threshold", low),
                       ("either (what the pipeline does)", novel | low)):
        rows[name] = {"left_out_held": float(held[out_mask].mean()), "false_holds": float(held[~out_mask].mean()),
                      "n_left_out": int(out_mask.sum()), "n_other": int((~out_mask).sum())}
    cut = float(np.quantile(ratio[~out_mask], 0.95))
    rows["novelty score at 5% false holds"] = {"left_out_held": float((ratio[out_mask] > cut)[:].mean()),
                                               "false_holds": float((ratio[~out_mask] > cut).mean()),
                                               "n_left_out": int(out_mask.sum()), "n_other": int((~out_mask).sum())}
    import torch

    from smear.nn.augment import artefacts, to_uint8

    others = np.stack([c for c, o in zip(crops, out_mask) if not o])[:600]
    art = to_uint8(artefacts(torch.from_numpy(others).permute(0, 3, 1, 2).float() / 255,
                             torch.Generator().manual_seed(12345)))
    a_scores = clf.classify(list(art))
    a_novel, a_low = a_scores.novelty > 1.0, a_scores.probs.max(1) < args.review_threshold
    for name, held in (("novelty score", a_novel), ("top probability < review threshold", a_low),
                       ("either (what the pipeline does)", a_novel | a_low),
                       ("novelty score at 5% false holds", a_scores.novelty > cut)):
        rows[name]["artefacts_held"] = float(held.mean())
    called = Counter(clf.classes[i] for i in probs[out_mask & ~(novel | low)].argmax(1))
    print(f"model {args.model}, left out {args.left_out}; PBC test split (seed 0): "
          f"{int(out_mask.sum())} {args.left_out} cells, {int((~out_mask).sum())} others\n")
    print(f"| held back by | {args.left_out} cells held (target >= 0.80) | other classes held (target <= 0.05) "
          f"| non-cells held ({len(art)} artefacts) |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['left_out_held']:.3f} | {r['false_holds']:.3f} | {r['artefacts_held']:.3f} |")
    print(f"\n{args.left_out} cells not held were called: {dict(called.most_common())}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "called": dict(called)}, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""The slide guard, scored as it will be judged: does it fire on slides the classifier misreads?

Builds many 100-cell "slides" (cells drawn with replacement, seeded) from every visible set:
jtsc and cellavision (``../shared/data/wbc-seg``), Raabin-WBC Test-A (``--raabin``), the PBC test
split (stratified, seed 0, 0.7/0.15/0.15), and the PBC test split through fixed stain shifts
(``smear.detect.stain.SHIFTS``, as ``benchmarks/other_labs.py --stain``, plus ``pink``, a red
Wright-like cast). PBC slides are drawn with an adult differential around ``BLOOD_MIX`` (the split
holds every class in similar numbers, which no blood has; ``--pbc-mix split`` keeps the split's
own mix); the other sets' slides keep their own mix. Each slide goes through the report's own code (``smear.report.summary``) with
the guard the model folder holds; per slide it records the 5-type accuracy and whether the guard
fired, then prints the recall on slides read below 0.75, the false alarms on slides read above
0.90 (targets: >= 0.90 and <= 0.05), and the ECE of each set before and after the shift-fitted
temperature the guard's fit measured (``meta["guard"]["temperature_shift"]``).

Leukaemic slides: 40-90% of the cells are of a class the model never learnt. With ``--left-out
CLASS`` and a model trained without it (``data.sources[0].exclude``; guard fitted on its own run),
that class's PBC test cells are mixed into PBC test slides. Without one, the stand-in is
promyelocytes and myelocytes (blast-like cells that the shipped model knows as PMY/MY), which
tests the implausible-differential evidence only.

Nothing here is fitted: the thresholds come from the model folder (``smear train guard``).
Crops and network outputs are cached under ``--cache`` (default /tmp/smear-guard), so reruns only
redo the slides.

    python benchmarks/slide_guard.py --raabin /work/raabin/test [--model DIR] [--slides 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import other_labs  # noqa: E402

from smear.artifacts import model_version, resolve_model_dir  # noqa: E402
from smear.classify.crop_cache import cached_crops  # noqa: E402
from smear.classify.evaluate import expected_calibration_error  # noqa: E402
from smear.classify.guard_fit import type5_accuracy, type5_probs  # noqa: E402
from smear.classify.model import CnnClassifier  # noqa: E402
from smear.detect import stain  # noqa: E402
from smear.taxonomy import CellKind  # noqa: E402
from smear.types import CellPrediction, Detection, FieldResult, GuardSums, SlideReport  # noqa: E402

#: the other-labs benchmark's stain shifts, plus a pink-red Wright-like cast
SHIFTS = {**stain.SHIFTS, "pink": functools.partial(stain._blend, colour=(235, 130, 165), t=0.4)}
SET_CELLS = {"raabin-test-A": 600, "pbc-test": 600}  # a seeded sample of the larger sets
SHIFT_CELLS = 400
#: an adult differential (neutrophils, eosinophils, basophils, lymphocytes, monocytes; mid reference
#: ranges), the mean of the mixes PBC slides are drawn with: the PBC split holds every class in
#: similar numbers, which no blood has
BLOOD_MIX = {"neutrophil": 0.58, "eosinophil": 0.035, "basophil": 0.01, "lymphocyte": 0.30, "monocyte": 0.075}


def set_outputs(clf, name: str, items: list, shift: str | None, n: int | None, cache: Path) -> dict:
    """Logits, features, crops (shifted) and labels of a seeded sample of a set, cached."""
    tag = name + (f"+{shift}" if shift else "")
    folder = cache / "feats" / f"{model_version(clf.meta.folder)[:12]}-tta{clf.tta}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    idx = np.arange(len(items)) if n is None or n >= len(items) else np.sort(rng.choice(len(items), n, replace=False))
    crops = cached_crops(items, clf.crop_margin, clf.input_size, cache / "crops")[idx]
    if shift:
        crops = np.stack([SHIFTS[shift](c) for c in crops])
    f = folder / f"{tag}.npz"
    if f.exists():
        got = dict(np.load(f))
    else:
        t = time.time()
        logits, feats = clf.outputs(list(crops))
        got = {"idx": idx, "logits": logits.numpy(), "feats": feats.numpy().astype(np.float32),
               "labels": np.array([items[i].fine or items[i].group for i in idx])}
        np.savez(f, **got)
        print(f"  {tag}: {len(idx)} cells through the network in {time.time() - t:.0f} s", file=sys.stderr)
    got["crops"] = crops
    return got


def cell_predictions(clf, out: dict, review_threshold: float) -> list[CellPrediction]:
    """The pipeline's CellPrediction of each cell (label, probabilities, novelty, guard vector)."""
    import torch

    from smear.classify.novelty import distances
    from smear.pipeline.run import _label

    probs = torch.softmax(torch.as_tensor(out["logits"]) / clf.temperature, 1).numpy()
    ratio = distances(out["feats"], clf.novelty_stats) / clf.novelty_threshold if clf.has_novelty else None
    vectors = clf.guard.cell_vectors(out["feats"], clf.novelty_stats, list(out["crops"])) if clf.guard else None
    det = Detection((0.0, 0.0, 10.0, 10.0), CellKind.WBC)
    cells = []
    for i, row in enumerate(probs):
        p = {c: float(v) for c, v in zip(clf.classes, row)}
        label, top = _label(p, review_threshold)
        nv = float(ratio[i]) if ratio is not None else None
        if nv is not None and nv > 1.0:
            label = "UNIDENTIFIED"
        cells.append(CellPrediction(det, label, top, p, None, nv,
                                    tuple(map(float, vectors[i])) if vectors is not None else None))
    return cells


def score_slide(clf, cells: list[CellPrediction], cfg: dict, name: str):
    """The slide's Differential through the report's code, with the guard's evidence."""
    from smear.report.summary import differential

    sums = GuardSums()
    for c in cells:
        sums.add(c)
    evidence = clf.guard.evidence(sums) if clf.guard is not None else {}
    report = SlideReport(name, (FieldResult(name, "f", 100, 100, tuple(c.detection for c in cells), tuple(cells)),),
                         classified=True, evidence=evidence)
    return differential(report, cfg.report, cfg.flags, cfg.guard)


def slides_of(clf, name: str, out: dict, cells: list[CellPrediction], acc: np.ndarray, n_slides: int,
              cfg: dict, rng: np.random.Generator, pick=None) -> list[dict]:
    rows = []
    limit = cfg.guard.max_domain_score
    for s in range(n_slides):
        idx = pick(rng) if pick is not None else rng.choice(len(cells), 100, replace=True)
        d = score_slide(clf, [cells[i] for i in idx], cfg, f"{name}#{s}")
        a = acc[idx]
        rows.append({"set": name, "accuracy": float(np.nanmean(a)) if np.isfinite(a).any() else None,
                     "score": d.domain_score, "fired": bool(d.domain_score is not None and d.domain_score > limit),
                     "evidence": d.domain_evidence})
    return rows


def ece_rows(clf, outputs: dict[str, dict]) -> dict[str, dict]:
    """5-type ECE of each set at the model's temperature and at the guard fit's shift temperature."""
    from smear.taxonomy import TYPES5, type5_of

    t_shift = (clf.meta.get("guard") or {}).get("temperature_shift")
    rows = {}
    for name, out in outputs.items():
        truth = [type5_of(lb) for lb in out["labels"]]
        keep = [i for i, t in enumerate(truth) if t is not None]
        y = [TYPES5.index(truth[i]) for i in keep]
        row = {"n": len(keep), "T": clf.temperature,
               "ece": expected_calibration_error(type5_probs(out["logits"][keep], clf.classes, clf.temperature), y)}
        if t_shift:
            row.update({"T_shift": t_shift, "ece_shift": expected_calibration_error(
                type5_probs(out["logits"][keep], clf.classes, t_shift), y)})
        rows[name] = row
    return rows


def main() -> None:
    from smear.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="shipped", help="classifier model folder (with a fitted guard), or 'shipped'")
    ap.add_argument("--raabin", default=os.environ.get("SMEAR_RAABIN_TEST", "/work/raabin/test"))
    ap.add_argument("--wbc-seg", default=str(other_labs.SHARED / "wbc-seg"))
    ap.add_argument("--pbc", default=str(other_labs.SHARED / "pbc"))
    ap.add_argument("--slides", type=int, default=40, help="slides per set")
    ap.add_argument("--left-out", default=None, help="a class the model was trained without (leukaemic slides)")
    ap.add_argument("--set", action="append", default=[], help="pipeline config override, e.g. guard.max_domain_score=1.2")
    ap.add_argument("--pbc-mix", choices=("blood", "split"), default="blood",
                    help="PBC slides: an adult differential (blood) or the test split's own class mix (split)")
    ap.add_argument("--only", action="append", default=[], help="score only these sets (e.g. jtsc, pbc-test+pink)")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/smear-guard"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    cfg = load_config("pipeline", None, args.set)
    clf = CnnClassifier.from_dir(resolve_model_dir(args.model, "classifier"), device="cpu")
    if clf.guard is None:
        print(f"warning: {args.model} has no slide guard statistics: scoring the novel share and the differential only",
              file=sys.stderr)
    from smear.classify import novelty as nov

    if not isinstance(clf.model, nov.WithFeatures):
        clf.model = nov.WithFeatures(clf.model).eval()
    sets = dict(other_labs.class_sets(argparse.Namespace(wbc_seg=args.wbc_seg, raabin=args.raabin, pbc=args.pbc)))
    plan = [(name, None, SET_CELLS.get(name)) for name in sets]
    if "pbc-test" in sets:
        plan += [("pbc-test", s, SHIFT_CELLS) for s in SHIFTS]
    rng = np.random.default_rng(0)
    rows, outputs = [], {}
    for name, shift, n in plan:
        tag = name + (f"+{shift}" if shift else "")
        if args.only and tag not in args.only:
            continue
        out = set_outputs(clf, name, sets[name], shift, n, args.cache)
        outputs[tag] = out
        cells = cell_predictions(clf, out, float(cfg.review_threshold))
        acc = type5_accuracy(np.array([list(c.probs.values()) for c in cells]), list(out["labels"]), clf.classes)
        pick = blood_like(list(out["labels"])) if name == "pbc-test" and args.pbc_mix == "blood" else None
        rows += slides_of(clf, tag, out, cells, acc, args.slides, cfg, rng, pick)
    leuk = leukaemic_rows(clf, args, outputs.get("pbc-test"), cfg, rng)
    report(rows, leuk, ece_rows(clf, outputs), args, cfg)


def blood_like(labels: list[str]):
    """A slide drawer: 100 mature white cells in a mix drawn around ``BLOOD_MIX`` (Dirichlet, 50
    pseudo-cells), each type's cells drawn with replacement from the set."""
    from smear.taxonomy import type5_of

    types = [type5_of(lb) for lb in labels]
    pools = {t: np.flatnonzero([x == t for x in types]) for t in BLOOD_MIX}

    def pick(rng: np.random.Generator) -> np.ndarray:
        mix = rng.dirichlet([50 * v for v in BLOOD_MIX.values()])
        counts = rng.multinomial(100, mix)
        return np.concatenate([rng.choice(pools[t], k, replace=True) for t, k in zip(BLOOD_MIX, counts) if k])

    return pick


def leukaemic_rows(clf, args, out: dict | None, cfg: dict, rng) -> list[dict]:
    """PBC test slides where 40-90% of the cells are of the left-out class (or, without one, of the
    blast-like stand-ins PMY and MY), the rest its mature white cells."""
    if out is None:
        return []
    odd = {args.left_out} if args.left_out else {"PMY", "MY"}
    cells = cell_predictions(clf, out, float(cfg.review_threshold))
    labels = list(out["labels"])
    acc = type5_accuracy(np.array([list(c.probs.values()) for c in cells]), labels, clf.classes)
    blast = np.array([lb in odd for lb in labels])
    normal = np.flatnonzero(~blast & np.array([lb not in ("ERB", "PLATELET", "MMY", "MY", "PMY", "IG")
                                               for lb in labels]))
    odd_idx = np.flatnonzero(blast)
    rows = []
    for share in (0.4, 0.6, 0.9):
        def pick(r, share=share):
            k = int(round(100 * share))
            return np.concatenate([r.choice(odd_idx, k, replace=True), r.choice(normal, 100 - k, replace=True)])
        rows += [{**row, "share": share} for row in
                 slides_of(clf, f"leukaemic {int(share * 100)}% {'+'.join(sorted(odd))}", out, cells, acc,
                           max(10, args.slides // 2), cfg, rng, pick)]
    return rows


def report(rows: list[dict], leuk: list[dict], ece: dict, args, cfg: dict) -> None:
    by_set = defaultdict(list)
    for r in rows:
        by_set[r["set"]].append(r)
    names = sorted({k for r in rows + leuk for k in r["evidence"]})
    print(f"\n### slide guard: {args.model}, {args.slides} slides of 100 cells per set "
          f"(drawn with replacement, seed 0; PBC slides: {args.pbc_mix} mix), "
          f"guard.max_domain_score {cfg.guard.max_domain_score}\n")
    print("| set | slides | mean 5-type acc | read < 0.75 | read > 0.90 | guard fired | " +
          " | ".join(f"{n} fired" for n in names) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(names))
    limit = cfg.guard.max_domain_score
    for name, rs in list(by_set.items()) + list(_group(leuk).items()):
        acc = [r["accuracy"] for r in rs if r["accuracy"] is not None]
        fired = np.mean([r["fired"] for r in rs])
        per = [np.mean([r["evidence"].get(n, 0) > limit for r in rs]) for n in names]
        print(f"| {name} | {len(rs)} | {np.mean(acc) if acc else float('nan'):.3f} | "
              f"{np.mean([a < 0.75 for a in acc]) if acc else 0:.2f} | {np.mean([a > 0.90 for a in acc]) if acc else 0:.2f}"
              f" | {fired:.2f} | " + " | ".join(f"{p:.2f}" for p in per) + " |")
    bad = [r for r in rows if r["accuracy"] is not None and r["accuracy"] < 0.75]
    good = [r for r in rows if r["accuracy"] is not None and r["accuracy"] > 0.90]
    recall = float(np.mean([r["fired"] for r in bad])) if bad else None
    false = float(np.mean([r["fired"] for r in good])) if good else None
    print(f"\nrecall on slides read below 0.75: {_f(recall)} ({len(bad)} slides; target >= 0.90)")
    print(f"false alarms on slides read above 0.90: {_f(false)} ({len(good)} slides; target <= 0.05)")
    if leuk:
        print(f"leukaemic slides flagged: {np.mean([r['fired'] for r in leuk]):.2f} ({len(leuk)} slides)")
    print("\n### 5-type ECE per set: the model's temperature, and the shift temperature of the guard's fit\n")
    print("| set | n | T | ECE | T shift | ECE (T shift) |")
    print("|---|---|---|---|---|---|")
    for name, e in ece.items():
        print(f"| {name} | {e['n']} | {e['T']:.3f} | {e['ece']:.3f} | {e.get('T_shift', float('nan')):.3f} | "
              f"{e.get('ece_shift', float('nan')):.3f} |")
    if args.json:
        from smear.io import write_text_atomic

        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.json, json.dumps({"slides": rows, "leukaemic": leuk, "ece": ece,
                                                 "recall": recall, "false_alarms": false}, indent=1) + "\n")


def _group(rows: list[dict]) -> dict[str, list[dict]]:
    out = defaultdict(list)
    for r in rows:
        out[r["set"]].append(r)
    return out


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    main()

"""Do `smear adapt`'s brakes behave on real cells? Corrections CSVs built from a few jtsc cells.

For k cells drawn from jtsc (stratified by type as in ``adapt_curve.py``; seeds 0, 1, 2), write the
corrections CSV a reviewer would download (box = the cell mask's bounding box in the 120 x 120
image, predicted label = the source model's call, corrected label = jtsc's type label), run
``smear.classify.adapt.adapt`` as ``smear adapt`` does, and record whether it refused (too few
cells, worse model) and, when it wrote a model, the held-out before/after figures from its
meta.json, 5-type accuracy on the held-back rest of jtsc (the 300 - k cells never in the CSV) for
the source and the adapted model, and the share of those cells the novelty score calls novel.
Scenarios: k = 3, 10, 30, 50 as given; k = 10 with --force; k = 30 with every row written three
times (duplicates); k = 30 with --source-data (a PBC sample: the last blocks train and the
novelty score is refitted).

    python benchmarks/adapt_brakes.py [--pbc ../shared/data/pbc] [--seeds 0 1 2]

Prints one line per run and writes ``benchmarks/results/adapt_brakes.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapt_curve import draw  # noqa: E402

from smear.artifacts import load_meta, resolve_model_dir  # noqa: E402
from smear.classify.adapt import Brakes, Inputs, Limits, Recipe, adapt  # noqa: E402
from smear.classify.evaluate import lab_row  # noqa: E402
from smear.classify.model import CnnClassifier  # noqa: E402
from smear.crops import cut_crop  # noqa: E402
from smear.io import read_image  # noqa: E402
from smear.errors import SmearError  # noqa: E402
from smear.taxonomy import type5_of  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
HEADER = ["slide", "field", "x0", "y0", "x1", "y1", "predicted_label", "prob", "corrected_label", "reviewer", "time"]


def load_jtsc(root: Path) -> tuple[list[Path], list[tuple[float, float, float, float]], list[str]]:
    """Each jtsc image, its cell box (the mask's bounding box) and its type label."""
    files, boxes, labels = [], [], []
    with open(root / "labels.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            mask = read_image(root / "masks" / f"{row['image']}.png")[..., 0] > 0
            ys, xs = np.nonzero(mask)
            files.append(root / "images" / f"{row['image']}.png")
            boxes.append((float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)))
            labels.append(row["label"])
    return files, boxes, labels


def write_csv(path: Path, rows: list[list], repeat: int = 1) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(HEADER)
        for _ in range(repeat):
            w.writerows(rows)
    return path


def scores(clf: CnnClassifier, crops: list[np.ndarray], labels: list[str]) -> dict:
    scores = clf.classify(crops)
    probs, novelty = scores.probs, scores.novelty
    row = lab_row(probs, labels)
    return {"type5_accuracy": round(float(row["type5_accuracy"]), 4),
            "novel_share": None if novelty is None else round(float((novelty > 1).mean()), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="shipped")
    ap.add_argument("--pbc", default=str(SHARED / "pbc"), help="source data for the --source-data run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ks", type=int, nargs="+", default=[3, 10, 30, 50])
    ap.add_argument("--only", nargs="+", help="run only these scenarios (e.g. 'k=30')")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "adapt_brakes"))
    ap.add_argument("--render", help="only write the results from a log of this script's JSON lines")
    args = ap.parse_args()
    if args.render:
        runs = [json.loads(line) for line in Path(args.render).read_text().splitlines() if line.startswith("{")]
        write_results(runs, args.model, args.out)
        return
    root = SHARED / "wbc-seg" / "jtsc"
    if not root.is_dir():
        sys.exit(f"{root}: not found")
    source = resolve_model_dir(args.model, "classifier")
    meta = load_meta(source)
    margin, size = float(meta["crop_margin"]), int(meta["input_size"])
    files, boxes, labels = load_jtsc(root)
    crops = [cut_crop(read_image(f), b, margin, size) for f, b in zip(files, boxes)]
    src = CnnClassifier.from_dir(source, device="cpu")
    probs = src.classify(crops).probs
    called = [src.classes[i] for i in probs.argmax(1)]
    types = [type5_of(lb) for lb in labels]
    everyone = np.arange(len(files))
    scenarios = [(f"k={k}", k, {}, 1) for k in args.ks] + [("k=10 --force", 10, {"force": True}, 1),
                                                          ("k=30 rows x3", 30, {}, 3)]
    if Path(args.pbc).is_dir():
        scenarios.append(("k=30 --source-data pbc", 30, {"source_data": [args.pbc]}, 1))
    if args.only:
        scenarios = [sc for sc in scenarios if sc[0] in args.only]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, k, kwargs, repeat in scenarios:
            for seed in args.seeds:
                picked = draw(types, k, seed, everyone)
                rest = np.setdiff1d(everyone, picked)
                rows = [["", str(files[i]), *boxes[i], called[i], f"{probs[i].max():.3f}", labels[i], "bench", ""]
                        for i in picked]
                path = write_csv(Path(tmp) / f"{name.replace(' ', '_')}_{seed}.csv", rows, repeat)
                out = Path(tmp) / f"model_{name.replace(' ', '_')}_{seed}"
                logs: list[str] = []
                t0 = time.perf_counter()
                entry = {"scenario": name, "seed": seed, "k": k, "rows": k * repeat, "n_rest": len(rest)}
                inputs = Inputs(source_data=kwargs.get("source_data", ()))
                force = bool(kwargs.get("force"))
                try:
                    adapt([path], out, source, Recipe(seed=seed), inputs, Brakes(Limits(), force), log=logs.append)
                except SmearError as exc:
                    entry.update(refused=str(exc), hint=exc.hint)
                    if "worse than its source" in str(exc):  # what the refused model would have done
                        kept = out.with_name(out.name + "_allowed")
                        adapt([path], kept, source, Recipe(seed=seed), inputs,
                              Brakes(Limits(), force, allow_worse=True), log=logs.append)
                        entry["rest_if_written"] = scores(CnnClassifier.from_dir(kept, device="cpu"),
                                                          [crops[i] for i in rest], [labels[i] for i in rest])
                        entry["rest_source"] = scores(src, [crops[i] for i in rest], [labels[i] for i in rest])
                else:
                    m = json.loads((out / "meta.json").read_text())
                    ad = CnnClassifier.from_dir(out, device="cpu")
                    rest_labels = [labels[i] for i in rest]
                    entry.update(
                        refused=None, cells=m["adaptation"]["cells"], n_heldout=m["adaptation"]["n_heldout"],
                        skipped=m["adaptation"]["skipped"], heldout=m["metrics"]["heldout"],
                        novelty=m["adaptation"]["novelty"][:40],
                        rest_source=scores(src, [crops[i] for i in rest], rest_labels),
                        rest_adapted=scores(ad, [crops[i] for i in rest], rest_labels))
                entry["seconds"] = round(time.perf_counter() - t0, 1)
                runs.append(entry)
                print(json.dumps(entry), flush=True)
    write_results(runs, args.model, args.out)


def write_results(runs: list[dict], model: str, out: str) -> None:
    """``out``.json (every run) and ``out``.md (one table row per run)."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps({"model": model, "runs": runs}, indent=2) + "\n")
    lines = ["# `smear adapt` brakes on jtsc corrections CSVs", "",
             "`python benchmarks/adapt_brakes.py` (k jtsc cells drawn stratified by type per seed; the rest of jtsc, "
             "never in the CSV, scored)", "",
             "| scenario | seed | refused | cells (held out) | held-out 5-type before -> after | rest (n) 5-type "
             "source -> adapted | rest novel share source -> adapted | s |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if r["refused"]:
            would = (f"({r['n_rest']}) {r['rest_source']['type5_accuracy']} -> "
                     f"{r['rest_if_written']['type5_accuracy']} if written" if "rest_if_written" in r else "")
            refused = re.sub(r"\S*/(?=[^/\s]+\.csv)", "", r["refused"])  # the temporary folder left out
            lines.append(f"| {r['scenario']} | {r['seed']} | {refused} | | | {would} | | {r['seconds']} |")
            continue
        h = r["heldout"]
        lines.append(f"| {r['scenario']} | {r['seed']} | no | {r['cells']} ({r['n_heldout']}) | "
                     f"{h['before'].get('type5_accuracy')} -> {h['after'].get('type5_accuracy')} | "
                     f"({r['n_rest']}) {r['rest_source']['type5_accuracy']} -> {r['rest_adapted']['type5_accuracy']} | "
                     f"{r['rest_source']['novel_share']} -> {r['rest_adapted']['novel_share']} | {r['seconds']} |")
    Path(out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

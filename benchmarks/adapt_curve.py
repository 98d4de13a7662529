"""How many of a lab's labelled cells `smear adapt` needs: 5-type accuracy against k.

For each other-lab set (jtsc, cellavision, Raabin-WBC Test-A) and k = 10, 25, 50, 100: draw k
labelled cells stratified by 5-type (proportional, at least one of each type that has two or
more cells; seeds 0, 1, 2), adapt the classifier with ``smear.classify.adapt.fine_tune`` (which
keeps a fifth of the k cells aside for its temperature), and score 5-type accuracy and balanced
accuracy on the set's remaining cells, beside the unadapted model on the same cells (k = 0).
Raabin Test-A is scored on a fixed stratified sample of 1,000 of its cells (seed 0), drawn first
and never trained on; the k cells come from the rest. cellavision has 100 cells: no k = 100.

    python benchmarks/adapt_curve.py --raabin /work/data/raabin/test
    python benchmarks/adapt_curve.py --sets jtsc --seeds 100 101 102 --set train_blocks=-1 --tag recipe

Writes ``benchmarks/results/adapt_curve{_tag}.json`` and ``.md``; with no tag also
``docs/adapt_curve.png``. Crops are cut once per set (the classify crop cache).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from smear.artifacts import ModelMeta, load_meta, load_model_config, resolve_model_dir  # noqa: E402
from smear.classify.adapt import Recipe, fine_tune  # noqa: E402
from smear.classify.evaluate import lab_row  # noqa: E402
from smear.classify.lab_cells import Cells, read_dataset, wide_geometry  # noqa: E402
from smear.classify.model import CnnClassifier  # noqa: E402
from smear.taxonomy import type5_of  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
KS = (10, 25, 50, 100)
RAABIN_SCORED = 1000


def draw(types: list[str], k: int, seed: int, pool: np.ndarray) -> np.ndarray:
    """k indices of ``pool`` stratified by type: proportional by largest remainder, at least one
    of each type with two or more cells in the pool."""
    rng = np.random.default_rng(seed)
    by = {t: rng.permutation([i for i in pool if types[i] == t]) for t in sorted({types[i] for i in pool})}
    share = {t: k * len(v) / len(pool) for t, v in by.items()}
    n = {t: max(int(share[t]), 1 if len(by[t]) >= 2 else 0) for t in by}
    for t in sorted(by, key=lambda t: share[t] - int(share[t]), reverse=True):
        if sum(n.values()) >= k:
            break
        n[t] += 1
    while sum(n.values()) > k:  # the minimum of one each overshot: take from the largest
        n[max(n, key=n.get)] -= 1
    return np.sort(np.concatenate([by[t][:min(n[t], len(by[t]))] for t in by]).astype(np.int64))


def score(clf: CnnClassifier, crops: np.ndarray, labels: list[str]) -> dict[str, float]:
    row = lab_row(clf.classify(list(crops)).probs, labels)
    return {"type5_accuracy": row["type5_accuracy"], "type5_balanced_accuracy": row["type5_balanced_accuracy"]}


def load_sets(args, margin: float, wide: int, meta: dict) -> dict[str, tuple[Cells, np.ndarray]]:
    """Per set: the training cells (wide crops) and the inference crops of the same cells."""
    from smear.classify.crop_cache import cached_crops
    from smear.classify.data import load_items

    roots = {"jtsc": (SHARED / "wbc-seg" / "jtsc", "csv"), "cellavision": (SHARED / "wbc-seg" / "cellavision", "csv"),
             "raabin-test-A": (Path(args.raabin) if args.raabin else None, "folders")}
    out = {}
    for name in args.sets:
        root, layout = roots[name]
        if root is None or not root.is_dir():
            print(f"{name}: not found ({root}), skipped")
            continue
        cells = read_dataset(root, margin, wide, layout)
        eval_crops = cached_crops(load_items(root, layout), float(meta["crop_margin"]), int(meta["input_size"]))
        out[name] = (cells, eval_crops)
    return out


def _value(default, text: str):
    """A recipe override parsed as the type of its default (bools: 1/0, true/false)."""
    if isinstance(default, bool):
        return text.strip().lower() in ("1", "true", "yes")
    return type(default)(text)


def run(args) -> dict:
    source = resolve_model_dir(args.model, "classifier")
    meta = ModelMeta.of(load_meta(source), source)
    margin, wide = wide_geometry(meta, load_model_config(source))
    base = Recipe()
    recipe = replace(base, **{k: _value(getattr(base, k), v) for k, v in (s.split("=", 1) for s in args.set)})
    src = CnnClassifier.from_dir(source, device="cpu")
    results: dict = {"model": str(args.model), "recipe": {k: v for k, v in asdict(recipe).items() if k != "seed"},
                     "seeds": args.seeds, "sets": {}}
    for name, (cells, eval_crops) in load_sets(args, margin, wide, meta).items():
        types = [type5_of(lb) for lb in cells.labels()]
        everyone = np.arange(len(cells))
        scored_fixed = None
        if name == "raabin-test-A":
            scored_fixed = draw(types, RAABIN_SCORED, 0, everyone)
        pool = np.setdiff1d(everyone, scored_fixed) if scored_fixed is not None else everyone
        base_idx = scored_fixed if scored_fixed is not None else everyone
        labels = cells.labels()
        k0 = score(src, eval_crops[base_idx], [labels[i] for i in base_idx])
        entry = {"n": len(cells), "n_scored_k0": len(base_idx), "k0": k0, "runs": []}
        print(f"{name}: {len(cells)} cells; k=0 scored on {len(base_idx)}: {k0}", flush=True)
        for k in args.ks:
            if k > 0.8 * len(pool):
                print(f"{name}: k={k} leaves too few cells to score, skipped")
                continue
            for seed in args.seeds:
                picked = draw(types, k, seed, pool)
                scored = base_idx if scored_fixed is not None else np.setdiff1d(everyone, picked)
                t0 = time.perf_counter()
                adapted = fine_tune(cells.subset(picked), source, replace(recipe, seed=seed), log=lambda m: None)
                secs = time.perf_counter() - t0
                lab = [labels[i] for i in scored]
                after = score(adapted.classifier, eval_crops[scored], lab)
                before = k0 if scored_fixed is not None else score(src, eval_crops[scored], lab)
                entry["runs"].append({"k": k, "seed": seed, "n_scored": len(scored), "seconds": round(secs, 1),
                                      "before": before, "after": after,
                                      "temperature": adapted.meta["temperature"]})
                print(f"  k={k} seed={seed}: 5-type {before['type5_accuracy']:.3f} -> {after['type5_accuracy']:.3f}, "
                      f"balanced {before['type5_balanced_accuracy']:.3f} -> {after['type5_balanced_accuracy']:.3f} "
                      f"({secs:.1f} s)", flush=True)
        results["sets"][name] = entry
    return results


def summary(results: dict) -> dict[str, dict[int, dict[str, tuple[float, float]]]]:
    """Per set and k: (mean, sd) of each figure over the seeds; k = 0 is the unadapted model."""
    out: dict = {}
    for name, e in results["sets"].items():
        rows = {0: {m: (e["k0"][m], 0.0) for m in e["k0"]}}
        for k in sorted({r["k"] for r in e["runs"]}):
            runs = [r for r in e["runs"] if r["k"] == k]
            rows[k] = {f"{side}_{m}": (float(np.mean([r[side][m] for r in runs])),
                                       float(np.std([r[side][m] for r in runs], ddof=1)) if len(runs) > 1 else 0.0)
                       for side in ("before", "after") for m in ("type5_accuracy", "type5_balanced_accuracy")}
            rows[k]["seconds"] = (float(np.mean([r["seconds"] for r in runs])), 0.0)
            rows[k]["n_scored"] = (float(np.mean([r["n_scored"] for r in runs])), 0.0)
        out[name] = rows
    return out


def _ms(m: dict, key: str) -> str:
    return f"{m[key][0]:.3f} ± {m[key][1]:.3f}"


def markdown(results: dict, command: str) -> str:
    s = summary(results)
    r = results["recipe"]
    lines = ["# Adapting the classifier with k labelled cells per lab\n",
             f"`{command}`\n",
             (f"Model `{results['model']}`; recipe: {', '.join(f'{k} {v}' for k, v in r.items())}; seeds "
             f"{', '.join(map(str, results['seeds']))} (mean ± sd over them). k cells drawn stratified by 5-type; a "
             "fifth of them held out for the temperature, the rest trained on; scored on the set's remaining "
             f"cells (Raabin Test-A: a fixed stratified sample of {RAABIN_SCORED} cells, never drawn for training). "
             "'unadapted' is the source model on the same cells.\n"),
             "| set | k | cells scored | 5-type acc | balanced acc | unadapted 5-type acc | unadapted balanced | s per adapt |",
             "|---|---|---|---|---|---|---|---|"]
    for name, rows in s.items():
        for k, m in rows.items():
            if k == 0:
                lines.append(f"| {name} | 0 | {results['sets'][name]['n_scored_k0']} | {m['type5_accuracy'][0]:.3f} | "
                             f"{m['type5_balanced_accuracy'][0]:.3f} | | | |")
                continue
            lines.append(f"| {name} | {k} | {m['n_scored'][0]:.0f} | **{_ms(m, 'after_type5_accuracy')}** | "
                         f"{_ms(m, 'after_type5_balanced_accuracy')} | {_ms(m, 'before_type5_accuracy')} | "
                         f"{_ms(m, 'before_type5_balanced_accuracy')} | {m['seconds'][0]:.1f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary(results)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110, sharey=True)
    for ax, metric, title in ((axes[0], "type5_accuracy", "5-type accuracy"),
                              (axes[1], "type5_balanced_accuracy", "5-type balanced accuracy")):
        for name, rows in s.items():
            ks = sorted(rows)
            mean = [rows[k][metric][0] if k == 0 else rows[k][f"after_{metric}"][0] for k in ks]
            sd = [0.0 if k == 0 else rows[k][f"after_{metric}"][1] for k in ks]
            ax.errorbar(ks, mean, yerr=sd, marker="o", capsize=3, label=name)
        ax.axhline(0.9, color="grey", ls=":", lw=1)
        ax.set_xlabel("labelled cells of the lab (k)")
        ax.set_title(title, fontsize=10)
        ax.set_xticks([0, *KS])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("on the set's remaining cells")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("smear adapt: the shipped classifier fine-tuned on k cells (mean ± sd, 3 seeds)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="shipped")
    ap.add_argument("--raabin", default=None, help="staged Raabin-WBC Test-A folder (class folders)")
    ap.add_argument("--sets", nargs="+", default=["jtsc", "cellavision", "raabin-test-A"])
    ap.add_argument("--ks", nargs="+", type=int, default=list(KS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--set", action="append", default=[],
                    help=f"recipe override key=value ({', '.join(f.name for f in fields(Recipe))})")
    ap.add_argument("--tag", default="", help="suffix of the result files (no plot with a tag)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = run(args)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    results["command"] = command
    from smear.io import write_text_atomic

    out = ROOT / "benchmarks" / "results"
    stem = "adapt_curve" + (f"_{args.tag}" if args.tag else "")
    write_text_atomic(out / f"{stem}.json", json.dumps(results, indent=1) + "\n")
    md = markdown(results, command)
    write_text_atomic(out / f"{stem}.md", md)
    print(md)
    if not args.tag:
        plot(results, ROOT / "docs" / "adapt_curve.png")


if __name__ == "__main__":
    main()

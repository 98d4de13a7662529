"""Leave-one-class-out: which per-cell novelty score holds back a class the classifier never saw.

Scores compared, each thresholded at the 95th percentile of the PBC validation split (classes the
model knows; so about 5% false holds by construction) and scored on the PBC test split:

- Mahalanobis distance to the nearest class mean (shared covariance, ``smear.classify.novelty``)
  on the pooled mean and s.d. of each MobileNetV3 stage's output (b0 shallow ... b5 deep) and on
  the pre-logit features (``pre``, what the shipped score uses); z-scored sums over stages;
- energy (-logsumexp of the logits) and the negative maximum logit.

    python benchmarks/novelty_scores.py --model /work/runs/locoba/model --left-out BA

The Mahalanobis statistics are fitted on ``--n-fit`` training-split crops of the known classes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from smear.classify import novelty  # noqa: E402
from smear.classify.crop_cache import cached_crops  # noqa: E402
from smear.classify.data import load_items, stratified_split  # noqa: E402
from smear.classify.model import CnnClassifier  # noqa: E402
from smear.nn.tensors import crops_to_tensor  # noqa: E402


def features(clf: CnnClassifier, items, cache_dir) -> dict[str, np.ndarray]:
    """Pooled mean and s.d. of every stage's output, the pre-logit features and the logits."""
    net = clf.model.net
    pooled: dict[str, list] = {}

    def hook(name):
        return lambda m, i, o: pooled.setdefault(name, []).append(torch.cat([o.mean((2, 3)), o.std((2, 3))], 1))

    handles = [b.register_forward_hook(hook(f"b{i}")) for i, b in enumerate(net.blocks)]
    crops = list(cached_crops(items, clf.crop_margin, clf.input_size, cache_dir))
    with torch.no_grad():
        y = torch.cat([clf.model(clf.normalize(crops_to_tensor(crops[i:i + 128], clf.input_size)))
                       for i in range(0, len(crops), 128)])
    for h in handles:
        h.remove()
    out = {k: torch.cat(v).numpy() for k, v in pooled.items()}
    out["pre"] = y[:, len(clf.classes):].numpy()
    out["logits"] = y[:, :len(clf.classes)].numpy()
    return out


def main() -> None:
    from sklearn.metrics import roc_auc_score

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--left-out", default="BA")
    ap.add_argument("--pbc", default=str(ROOT.parent / "shared" / "data" / "pbc"))
    ap.add_argument("--n-fit", type=int, default=4000)
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    clf = CnnClassifier.from_dir(args.model, device="cpu")
    if not hasattr(clf.model, "net"):
        sys.exit(f"{args.model}: needs a model with a novelty score (features)")
    train, val, test = stratified_split(load_items(args.pbc, "pbc"), (0.7, 0.15, 0.15), 0)
    index = {c: i for i, c in enumerate(clf.classes)}
    train = [it for it in train if it.fine in index]
    val = [it for it in val if it.fine in index]
    rng = np.random.default_rng(0)
    train = [train[i] for i in sorted(rng.choice(len(train), min(args.n_fit, len(train)), replace=False))]
    f_fit, f_val, f_test = (features(clf, s, args.cache_dir) for s in (train, val, test))
    y = np.array([index[it.fine] for it in train])
    left = np.array([it.fine == args.left_out for it in test])
    print(f"model {args.model}, left out {args.left_out}: PBC test {int(left.sum())} {args.left_out} cells, "
          f"{int((~left).sum())} others; thresholds at the PBC validation 95th percentile\n")
    print(f"| score | {args.left_out} held | others held | AUROC |\n|---|---|---|---|")

    def row(name, s_val, s_test):
        held = s_test > np.quantile(s_val, 0.95)
        print(f"| {name} | {held[left].mean():.3f} | {held[~left].mean():.3f} | {roc_auc_score(left, s_test):.3f} |")

    z_val, z_test = [], []
    for k in [k for k in f_fit if k != "logits"]:
        stats = novelty.fit(f_fit[k], y)
        d_val, d_test = novelty.distances(f_val[k], stats), novelty.distances(f_test[k], stats)
        row(f"Mahalanobis {k}", d_val, d_test)
        z_val.append((d_val - d_val.mean()) / d_val.std())
        z_test.append((d_test - d_val.mean()) / d_val.std())
    z_val, z_test = np.stack(z_val, 1), np.stack(z_test, 1)
    row("Mahalanobis, sum of z over all", z_val.sum(1), z_test.sum(1))
    row("Mahalanobis, sum of z over b0-b2", z_val[:, :3].sum(1), z_test[:, :3].sum(1))
    lv, lt = torch.as_tensor(f_val["logits"]), torch.as_tensor(f_test["logits"])
    row("energy", -torch.logsumexp(lv, 1).numpy(), -torch.logsumexp(lt, 1).numpy())
    row("max logit", -lv.max(1).values.numpy(), -lt.max(1).values.numpy())


if __name__ == "__main__":
    main()

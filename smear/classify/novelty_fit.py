"""Fit a classifier model folder's novelty score (``smear.classify.novelty``) on its training crops."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smear.classify import data as cdata
from smear.classify.crop_cache import readable_crops
from smear.classify.sources import splits
from smear.errors import ConfigError, SmearError
from smear.taxonomy import FINE_CLASSES, FINE_TO_GROUP8, GROUPS8

_log = logging.getLogger(__name__)

#: GROUP_MASK[g, c] is True when fine class c belongs to 8-group g.
GROUP_MASK = torch.tensor([[FINE_TO_GROUP8[c] == g for c in FINE_CLASSES] for g in GROUPS8])


def fit_novelty(model_dir: str | Path, train_crops: np.ndarray, train_items: list[cdata.Item],
                val_crops: np.ndarray, quantile: float, log: Callable[[str], None] = _log.info,
                fitted_on: str = "") -> dict[str, Any]:
    """Fit the per-cell novelty score of a classifier model folder (``smear.classify.novelty``) on
    its training crops, set its threshold at the ``quantile`` of the validation crops' scores,
    and write both into the folder (``novelty.safetensors`` and ``meta["novelty"]``)."""
    from smear.artifacts import ModelMeta, load_meta, save_model_dir
    from smear.classify import novelty as nov
    from smear.classify.model import CnnClassifier

    if not 0.5 <= quantile < 1:
        raise ConfigError(f"novelty quantile {quantile}: must be in [0.5, 1)")
    model_dir = Path(model_dir)
    clf = CnnClassifier.from_dir(model_dir, device="cpu")
    if not isinstance(clf.model, nov.WithFeatures):
        clf.model = nov.WithFeatures(clf.model).eval()
    logits, feats = clf.outputs(list(train_crops))
    # class of each training crop: its fine label, or for group-only items (a NEUTROPHIL of
    # unknown stage) the most probable fine class inside its group
    mask = GROUP_MASK[[GROUPS8.index(it.group) for it in train_items]]
    within = logits.masked_fill(~mask, -torch.inf).argmax(1).numpy()
    labels = np.array([FINE_CLASSES.index(it.fine) if it.fine else within[i] for i, it in enumerate(train_items)])
    stats = nov.fit(feats.numpy(), labels)
    train_d = nov.distances(feats.numpy(), stats)
    _, val_feats = clf.outputs(list(val_crops))
    val_d = nov.distances(val_feats.numpy(), stats)
    threshold = float(np.quantile(val_d, quantile))
    nov.save(model_dir, stats)
    novelty = {
        "method": "mahalanobis, shared covariance, pre-logit features (smear.classify.novelty)",
        "threshold": round(threshold, 4), "quantile": quantile, "n_fit": len(train_items),
        "n_val": len(val_crops), "fitted_on": fitted_on or "the run's training crops",
        "train_held": round(float((train_d > threshold).mean()), 4),
        "val_held": round(float((val_d > threshold).mean()), 4), "file": nov.NOVELTY_FILE,
    }
    save_model_dir(ModelMeta.of(load_meta(model_dir), model_dir).updated(novelty=novelty))
    log(f"novelty: threshold {threshold:.3f} (val quantile {quantile}); held {novelty['train_held']:.3f} "
        f"of train, {novelty['val_held']:.3f} of val")
    return novelty


def fit_novelty_for_run(run: str | Path, model_dir: str | Path | None = None, quantile: float = 0.97,
                        log: Callable[[str], None] = _log.info) -> dict[str, Any]:
    """``fit_novelty`` for a finished run folder: its config and split files give the crops."""
    from smear.config import load_config

    run = Path(run)
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise SmearError(f"{run}: not a classifier run folder (no config.yaml)")
    cfg = load_config("classify", cfg_path)
    _, train_items, val_items, _, _, specs = splits(cfg, run, log)
    m, d = cfg.model, cfg.data
    size, margin = int(m.input_size), float(m.crop_margin)
    train_items, train_crops, _ = readable_crops(train_items, margin, size, d.cache_dir, d.workers, log)
    val_items, val_crops, _ = readable_crops(val_items, margin, size, d.cache_dir, d.workers, log)
    names = ", ".join(f"{s['name']} ({s['root']})" for s in specs)
    return fit_novelty(model_dir or run / "model", train_crops, train_items, val_crops, quantile, log,
                       fitted_on=f"training part of {names}; threshold on the validation part")

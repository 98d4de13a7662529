"""The classifier's training data: its sources (``data.sources``), their splits, the draw of each
epoch's items by source weight, and the crops of a run's parts."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from smear.classify import data as cdata
from smear.classify.crop_cache import readable_crops
from smear.config_models import ClassifyConfig, ClassifyData
from smear.errors import ConfigError, SmearError

SOURCE_KEYS = ("name", "root", "layout", "weight", "split", "split_fractions", "exclude")


def source_specs(d: ClassifyData) -> list[dict[str, Any]]:
    """The training sources: ``data.sources`` entries with their defaults filled in, or
    ``data.root`` alone when ``sources`` is null. Unknown keys are an error naming them."""
    if not d.sources:
        return [{"name": "data", "root": d.root, "layout": d.layout, "weight": 1.0,
                 "split": d.split, "split_fractions": d.split_fractions, "exclude": []}]
    specs, names = [], set()
    for i, src in enumerate(d.sources):
        if not isinstance(src, dict) or "root" not in src:
            raise ConfigError(f"data.sources[{i}]: must be a mapping with a 'root'",
                              hint="e.g. {name: pbc, root: ../shared/data/pbc, weight: 1.0}")
        unknown = sorted(set(src) - set(SOURCE_KEYS))
        if unknown:
            raise ConfigError(f"data.sources[{i}]: unknown key(s) {', '.join(unknown)}",
                              hint=f"known keys: {', '.join(SOURCE_KEYS)}")
        spec = {"name": str(src.get("name") or Path(str(src["root"])).name), "root": src["root"],
                "layout": src.get("layout", "auto"), "weight": float(src.get("weight", 1.0)),
                "split": src.get("split"), "split_fractions": src.get("split_fractions", d.split_fractions),
                "exclude": [str(c) for c in src.get("exclude") or []]}
        if spec["name"] in names:
            raise ConfigError(f"data.sources[{i}]: name {spec['name']!r} given twice")
        if spec["weight"] < 0:
            raise ConfigError(f"data.sources[{i}]: weight {spec['weight']} must be >= 0")
        names.add(spec["name"])
        specs.append(spec)
    return specs


def split_file_name(index: int, name: str) -> str:
    """The first source's split is ``split.json`` (what ``smear eval classify --split`` takes);
    the others are ``split_<name>.json``."""
    return "split.json" if index == 0 else f"split_{name}.json"


def splits(cfg: ClassifyConfig, out: Path, log) -> tuple[Path, list, list, list, np.ndarray, list]:
    """Train/val/test items over all sources, the source index of each training item, and the specs."""
    d = cfg.data
    specs = source_specs(d)
    parts_all: list[list] = [[], [], []]
    src_of_train: list[int] = []
    for k, spec in enumerate(specs):
        root = Path(os.path.expanduser(str(spec["root"])))
        saved = out / split_file_name(k, spec["name"])
        if spec["split"]:
            parts = cdata.load_split(spec["split"], root)
        elif saved.is_file():
            parts = cdata.load_split(saved, root)
            log(f"split: reusing {saved}")
        else:
            items = cdata.load_items(root, spec["layout"])
            parts = cdata.stratified_split(items, spec["split_fractions"], d.split_seed)
        cdata.save_split(saved, parts, root, seed=d.split_seed, fractions=list(spec["split_fractions"]))
        # classes left out (e.g. a leave-one-class-out run) leave train and val only: the test
        # part keeps them, so the novelty score can be measured on a class the model never saw
        drop = set(spec["exclude"])
        keep = [[it for it in part if it.fine not in drop and it.group not in drop] for part in parts[:2]]
        train = cdata.subsample(keep[0], d.max_train_items, d.split_seed)
        val = cdata.subsample(keep[1], d.max_eval_items, d.split_seed)
        test = cdata.subsample(parts[2], d.max_eval_items, d.split_seed)
        if len(specs) > 1:
            log(f"source {spec['name']}: {len(train)} train, {len(val)} val, {len(test)} test "
                f"(weight {spec['weight']:g}) from {root}")
        for whole, part in zip(parts_all, (train, val, test)):
            whole.extend(part)
        src_of_train += [k] * len(train)
    root0 = Path(os.path.expanduser(str(specs[0]["root"])))
    return root0, parts_all[0], parts_all[1], parts_all[2], np.array(src_of_train, dtype=np.int64), specs


def epoch_order(src_of: np.ndarray, weights: list[float], n_items: int | None, seed: int, epoch: int
                ) -> np.ndarray:
    """Indices of the training items one epoch shows, in a seeded order.

    With one source (or ``n_items`` null and equal weights) every item once. Otherwise ``n_items``
    (default: all items) are drawn, a share ``weight / sum(weights)`` from each source: without
    replacement while a source has enough items, then cycling through it again in a new order."""
    rng = np.random.default_rng([seed, epoch])
    n_src = len(weights)
    if n_src <= 1 and n_items is None:
        return rng.permutation(len(src_of))
    total = int(n_items) if n_items else len(src_of)
    w = np.asarray(weights, dtype=np.float64)
    if w.sum() <= 0:
        raise SmearError("data.sources: all sampling weights are 0")
    counts = np.floor(total * w / w.sum()).astype(int)
    counts[np.argmax(w)] += total - counts.sum()
    picks = []
    for k in range(n_src):
        pool = np.flatnonzero(src_of == k)
        if counts[k] <= 0 or len(pool) == 0:
            continue
        reps = -(-counts[k] // len(pool))
        picks.append(np.concatenate([rng.permutation(pool) for _ in range(reps)])[:counts[k]])
    return rng.permutation(np.concatenate(picks)) if picks else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class TrainingData:
    """The run's items per part, the source of each training item, the sources, and the crops: the
    training ones cut ``data.cache_pad`` x wider than the input (for augmentation)."""

    root: Path
    train_items: list[cdata.Item]
    val_items: list[cdata.Item]
    test_items: list[cdata.Item]
    src_of: np.ndarray
    specs: list[dict[str, Any]]
    train_crops: np.ndarray
    val_crops: np.ndarray


def training_data(cfg: ClassifyConfig, out: Path, log: Callable[[str], None]) -> TrainingData:
    """The splits of every source and the crops of the training and validation parts (unreadable
    images left out, each named in a warning)."""
    m, d = cfg.model, cfg.data
    root, train_items, val_items, test_items, src_of, specs = splits(cfg, out, log)
    if not train_items or not val_items:
        raise SmearError(f"{root}: the split leaves {len(train_items)} training and {len(val_items)} "
                         "validation images", hint="more images per class, or other data.split_fractions")
    log(f"data: {len(train_items)} train, {len(val_items)} val, {len(test_items)} test from {root}")
    size, margin = int(m.input_size), float(m.crop_margin)
    wide = round(size * float(d.cache_pad))
    kept, train_crops, _ = readable_crops(train_items, margin * wide / size, wide, d.cache_dir, d.workers, log)
    if len(kept) < len(train_items):
        ok = {str(it.path) for it in kept}
        src_of = src_of[[str(it.path) in ok for it in train_items]]
    val_items, val_crops, _ = readable_crops(val_items, margin, size, d.cache_dir, d.workers, log)
    return TrainingData(root, kept, val_items, test_items, src_of, specs, train_crops, val_crops)

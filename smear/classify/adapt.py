"""Adapt a classifier model folder to one lab: fine-tune it on a few of that lab's labelled cells.

A classifier from another lab loses most of its accuracy on a new stain and scanner, and gets it
back from about a hundred of the new lab's own labelled cells (Chossegros et al., J Pathol
Inform 2024). Those cells come either as any single-cell dataset ``smear eval classify --data``
reads, or as the corrections CSVs the review page exports (``smear.classify.lab_cells``).

The recipe is for few cells: a stratified held-out part (``Recipe.heldout``) is kept aside for
the before/after figures and for refitting the temperature; only the last ``train_blocks`` blocks
of the network and its head are trained, with the source model's BatchNorm statistics kept (a
few dozen cells cannot estimate them), the training augmentation of the source model's config,
loss weights that balance the classes, and a fixed number of passes. Cells labelled only by type
(``neutrophil``) train through the group-level loss of ``smear.classify.train.mixed_loss``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smear.artifacts import (
    CARD,
    CONFIG,
    META,
    ModelMeta,
    data_fingerprint,
    load_meta,
    load_model_config,
    model_version,
    save_model_dir,
    shipped_dir,
)
from smear.nn.augment import BatchAugment
from smear.classify.evaluate import classification_metrics, lab_row
from smear.classify.lab_cells import Cells, read_cells, wide_geometry
from smear.classify.model import WEIGHTS, CnnClassifier, build_model
from smear.nn.tensors import Normalize
from smear.nn.weights import load_weights, save_weights
from smear.classify.train import EpochData, evaluate, label_indices, mixed_loss, train_one_epoch
from smear.nn.loop import Feed, Trainee, warmup_cosine
from smear.devices import resolve_device, set_threads
from smear.errors import DataError, SmearError
from smear.taxonomy import FINE_CLASSES

_log = logging.getLogger(__name__)

MIN_CALIBRATION = 10  # held-out cells needed to refit the temperature (fewer: the source's is kept)


@dataclass(frozen=True)
class Recipe:
    """How a model is adapted; the defaults were chosen on jtsc (benchmarks/adapt_curve.py)."""

    epochs: int = 60             # passes over the training cells (each at least one batch)
    batch: int = 32
    lr: float = 1e-3
    lr_head_only: float = 1e-2   # the learning rate when only the classifier layer trains (train_blocks 0)
    weight_decay: float = 0.01
    train_blocks: int = 2        # last blocks of the network trained with the head; 0: the classifier
                                 # layer only (keeps the novelty score); -1: the whole network
    heldout: float = 0.2         # stratified share of the cells kept for before/after and temperature
    adabn: bool = False          # first re-estimate the BatchNorm statistics on the training cells
    refit_all: bool = False      # after the held-out figures and temperature, train again on all cells
    augment: str = "source"      # source: the source model's training augmentation; mild: classify.yaml's train.augment
    label_smoothing: float = 0.1
    class_weight_power: float = 0.5
    seed: int = 0


# ---------------------------------------------------------------- the recipe


def heldout_split(strata: Sequence[str], share: float, seed: int,
                  groups: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Training and held-out indices after a seeded shuffle: ``share`` of each stratum's cells held
    out (rounded; a stratum keeps at least one training cell), and always at least one held out when
    there are two or more. With ``groups`` (``Cells.groups``) whole groups move together, so two
    copies of one cell are never on both sides; a group's stratum is its first cell's."""
    groups = list(range(len(strata))) if groups is None else list(groups)
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    by: dict[str, list[int]] = defaultdict(list)
    for g in sorted(members):
        by[strata[members[g][0]]].append(g)
    rng = np.random.default_rng(seed)
    train, held = [], []
    for s in sorted(by):
        gs = [int(g) for g in rng.permutation(by[s])]
        n = min(len(gs) - 1, round(len(gs) * share))
        held += gs[:n]
        train += gs[n:]
    if not held and len(train) > 1:  # always hold something out: one group of the largest stratum
        largest = max(sorted(by), key=lambda s: len(by[s]))
        pick = next(g for g in train if g in set(by[largest]))
        train.remove(pick)
        held.append(pick)
    cells = lambda gs: np.sort(np.array([i for g in gs for i in members[g]], dtype=np.int64))  # noqa: E731
    return cells(train), cells(held)


def stratum_weights(cells: Cells, power: float) -> tuple[torch.Tensor, float]:
    """Loss weights ``(mean count / count) ** power`` per stratum, mean 1 over the cells: per fine
    class (for ``mixed_loss``) and one for the group-only cells (their count-weighted mean)."""
    counts = Counter(cells.strata)
    raw = {s: (len(cells) / len(counts) / n) ** power for s, n in counts.items()}
    scale = len(cells) / sum(raw[s] * n for s, n in counts.items())
    fine_w = torch.ones(len(FINE_CLASSES))
    for s, w in raw.items():
        if not s.startswith("group:"):
            fine_w[FINE_CLASSES.index(s)] = w * scale
    groups = [(raw[s] * scale, n) for s, n in counts.items() if s.startswith("group:")]
    group_w = sum(w * n for w, n in groups) / sum(n for _, n in groups) if groups else 1.0
    return fine_w, float(group_w)


def fit_temperature_mixed(logits: torch.Tensor, fine: torch.Tensor, group: torch.Tensor) -> float:
    """The temperature minimising the NLL of held-out cells, fine-labelled and group-only alike
    (``mixed_loss``), by a search over log T in [-3, 3]: robust on a handful of cells."""
    logits = torch.as_tensor(logits, dtype=torch.float64)
    ones = torch.ones(len(FINE_CLASSES))

    def loss(log_t: float) -> float:
        return float(mixed_loss(logits / np.exp(log_t), fine, group, ones))

    grid = np.linspace(-3, 3, 121)
    best = grid[int(np.argmin([loss(v) for v in grid]))]
    fine_grid = np.linspace(best - 0.05, best + 0.05, 21)
    return float(np.exp(fine_grid[int(np.argmin([loss(v) for v in fine_grid]))]))


class Partial(torch.nn.Module):
    """The network with only ``parts`` in training mode, and every BatchNorm layer in eval mode
    (the source model's statistics), whatever ``train()`` is asked."""

    def __init__(self, net: torch.nn.Module, parts: Sequence[torch.nn.Module]):
        super().__init__()
        self.net = net
        self.parts = list(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def train(self, mode: bool = True) -> Partial:
        self.training = mode
        self.net.train(False)
        for part in self.parts if mode else ():
            part.train(True)
            for m in part.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


def trainable_parts(net: torch.nn.Module, train_blocks: int) -> list[torch.nn.Module]:
    """The modules trained: the whole network (-1), the classifier layer (0), or the last
    ``train_blocks`` of a timm model's ``blocks`` and everything after them (the head)."""
    if train_blocks < 0:
        return [net]
    blocks = getattr(net, "blocks", None)
    if train_blocks == 0 or blocks is None:
        return [net.get_classifier()]
    names = [n for n, _ in net.named_children()]
    after = [m for n, m in list(net.named_children())[names.index("blocks") + 1:]]
    return list(blocks[max(0, len(blocks) - train_blocks):]) + after


@dataclass
class Adapted:
    """An adapted classifier in memory, with the meta and config its model folder gets."""

    classifier: CnnClassifier
    meta: ModelMeta
    config: dict[str, Any]
    novelty_file: Path | None  # the source's novelty statistics, still valid (features untouched)
    novelty_stats: dict[str, np.ndarray] | None = None  # refitted novelty statistics (features trained)
    guard_files: tuple[Path, ...] = ()  # the source folder's other guard files, carried as they are

    @property
    def figures(self) -> dict[str, dict[str, Any]]:
        """``{"before": ..., "after": ...}`` on the held-out cells."""
        return self.meta["metrics"]["heldout"]


def _scores(probs: np.ndarray, labels: list[str]) -> dict[str, Any]:
    if not len(labels):
        return {"n": 0}
    row = lab_row(probs, labels)
    m = classification_metrics(probs, labels)
    out = {"n": len(labels), "type5_accuracy": row["type5_accuracy"],
           "type5_balanced_accuracy": row["type5_balanced_accuracy"], "group8_accuracy": m["group8_accuracy"],
           "accuracy": m["accuracy"] if m["n_fine"] else None}
    return {k: (round(float(v), 4) if isinstance(v, float) else v) for k, v in out.items()}


def _load(source: Path, meta: dict[str, Any], dev) -> tuple[torch.nn.Module, Normalize]:
    net = load_weights(build_model(meta["arch"], norm=meta.get("norm", "batch"), head=meta.get("head", "flat")), source / meta["weights"]).to(dev)
    return net, Normalize(meta["normalize"]["mean"], meta["normalize"]["std"], meta.get("colour_norm")).to(dev)


@dataclass(frozen=True)
class _Source:
    """The source model folder, read once: its path, meta and config, and the device asked for."""

    path: Path
    meta: dict[str, Any]
    config: dict[str, Any]
    device: str         # as asked ("cpu", "auto", ...): the adapted classifier's device
    dev: torch.device   # resolved: where the network trains

    @property
    def size(self) -> int:
        return int(self.meta["input_size"])

    @property
    def tta(self) -> int:
        return int(self.meta.get("tta", 1))

    @property
    def temperature(self) -> float:
        return float(self.meta.get("temperature", 1.0))


def _open_source(source: Path, device: str) -> _Source:
    """Read and check the classifier model folder ``source``; resolve ``device``."""
    meta, config = load_meta(source), load_model_config(source)
    if meta.get("stage") != "classify":
        raise SmearError(f"{source}: not a classifier model folder (stage {meta.get('stage')!r})")
    if tuple(meta["classes"]) != FINE_CLASSES:
        raise SmearError(f"{source}: its classes are not smear's 11 ({', '.join(meta['classes'])})")
    return _Source(source, meta, config, device, resolve_device(device))


def _trainable(net: torch.nn.Module, train_blocks: int) -> tuple[Partial, list[torch.nn.Parameter]]:
    """Freeze ``net`` but for ``trainable_parts``; the model to train and its trained parameters."""
    for p in net.parameters():
        p.requires_grad_(False)
    parts = trainable_parts(net, train_blocks)
    params = [p for part in parts for p in part.parameters()]
    for p in params:
        p.requires_grad_(True)
    return Partial(net, parts), params


def _train(net: torch.nn.Module, norm: Normalize, train: Cells, recipe: Recipe, src: _Source,
           log: Callable[[str], None], held: int = 0) -> None:
    """Train ``trainable_parts`` of ``net`` on ``train`` in place, as the recipe says."""
    size, dev = src.size, src.dev
    if recipe.adabn:
        from smear.nn.augment import eval_batch, to_uint8
        from smear.classify.model import adapt_batchnorm

        centre = to_uint8(eval_batch(torch.from_numpy(train.crops), size))
        adapt_batchnorm(CnnClassifier(net, src.meta, device=str(dev)), list(centre))
    model, params = _trainable(net, recipe.train_blocks)
    fine, group = label_indices(train.fine, train.group)
    weights, group_w = stratum_weights(train, recipe.class_weight_power)
    per_epoch = -(-max(len(train), recipe.batch) // recipe.batch) * recipe.batch  # whole batches
    steps = recipe.epochs * per_epoch // recipe.batch
    lr = recipe.lr_head_only if recipe.train_blocks == 0 else recipe.lr
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=recipe.weight_decay)
    scheduler = warmup_cosine(optimizer, max(1, steps // 10), steps)
    if recipe.augment not in ("source", "mild"):
        raise SmearError(f"adapt augment {recipe.augment!r}: use source or mild")
    strengths = (src.config.get("train") or {}).get("augment") if recipe.augment == "source" else None
    augment = BatchAugment(size, strengths, seed=recipe.seed)
    log(f"adapt: {len(train)} training cells, {held} held out; {recipe.epochs} passes, "
        f"{sum(p.numel() for p in params) / 1e6:.2f} M of {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M "
        f"parameters trained")
    trainee = Trainee(model, optimizer, scheduler, augment)
    loss_args = {"class_weights": weights, "smoothing": recipe.label_smoothing, "group_weight": group_w}
    data = EpochData(train.crops, (fine, group), recipe.batch, loss_args, norm, dev, Feed(prefetch=False))
    for epoch in range(1, recipe.epochs + 1):
        rng = np.random.default_rng([recipe.seed, epoch])
        order = np.concatenate([rng.permutation(len(train)) for _ in range(-(-per_epoch // len(train)))])
        stats = train_one_epoch(trainee, data, epoch, order[:per_epoch])
        if epoch == 1 or epoch % 10 == 0 or epoch == recipe.epochs:
            log(f"  pass {epoch}/{recipe.epochs}: loss {stats['train_loss']:.4f}")
    for p in net.parameters():
        p.requires_grad_(True)
    net.eval()


@dataclass(frozen=True)
class _Fitted:
    """What training on the lab's cells gave: the folder's network, the split, the held-out figures."""

    net: torch.nn.Module
    train: Cells
    held: Cells
    figures: dict[str, dict[str, Any]]
    temperature: float
    calibrated: str  # where the temperature comes from


def _calibrate(after: torch.Tensor, held: Cells, t_source: float) -> tuple[float, str]:
    """The temperature refitted on the held-out cells, or the source's when they are too few; and why."""
    h_fine, h_group = label_indices(held.fine, held.group)
    if len(held) >= MIN_CALIBRATION:
        return fit_temperature_mixed(after, h_fine, h_group), "held-out cells"
    return t_source, f"kept from the source model (under {MIN_CALIBRATION} held-out cells)"


def _fit(net: torch.nn.Module, norm: Normalize, cells: Cells, recipe: Recipe, src: _Source,
         log: Callable[[str], None]) -> _Fitted:
    """Split off the held-out cells, train on the rest, and measure before and after on them; with
    ``recipe.refit_all`` the folder's network is then the source's trained again on every cell."""
    tr_idx, ho_idx = heldout_split(cells.strata, recipe.heldout, recipe.seed, cells.groups)
    train, held = cells.subset(tr_idx), cells.subset(ho_idx)
    before = evaluate(net, norm, held.crops, src.size, recipe.batch, src.dev, src.tta)
    t_source = src.temperature

    _train(net, norm, train, recipe, src, log, held=len(held))

    after = evaluate(net, norm, held.crops, src.size, recipe.batch, src.dev, src.tta)
    temperature, calibrated = _calibrate(after, held, t_source)
    labels = held.labels()
    figures = {"before": _scores(torch.softmax(before / t_source, 1).numpy(), labels),
               "after": _scores(torch.softmax(after / temperature, 1).numpy(), labels)}
    if recipe.refit_all and len(held):  # the figures stand; the folder's model learns from every cell
        net, _ = _load(src.path, src.meta, src.dev)
        torch.manual_seed(recipe.seed)
        _train(net, norm, cells, recipe, src, log)
    return _Fitted(net, train, held, figures, temperature, calibrated)


@dataclass(frozen=True)
class _Guard:
    """What becomes of the source's novelty score: kept, refitted (``novelty`` and ``stats``) or dropped."""

    keep: bool
    novelty: dict[str, Any] | None
    stats: dict[str, np.ndarray] | None
    why: str


def _guard(fit: _Fitted, src: _Source, recipe: Recipe, source_cells: Cells | None,
           log: Callable[[str], None]) -> _Guard:
    has_novelty = bool(src.meta.get("novelty"))
    keep_novelty = recipe.train_blocks == 0 and has_novelty
    novelty, stats = (dict(src.meta["novelty"]), None) if keep_novelty else (None, None)
    if has_novelty and not keep_novelty and source_cells is not None:
        novelty, stats = refit_novelty(fit.net, src.meta, source_cells, fit.train, fit.held, recipe, src.dev, log)
    if keep_novelty:
        why = "kept: the features were not trained"
    elif novelty is not None:
        why = f"refitted: {novelty['fitted_on']}"
    else:
        why = ("dropped: the trained layers change the features its statistics were fitted on" if has_novelty
               else "none in the source model")
    return _Guard(keep_novelty, novelty, stats, why)


def _adapted_meta(src: _Source, cells: Cells, recipe: Recipe, fit: _Fitted, guard: _Guard,
                  t0: float) -> ModelMeta:
    """The adapted model's meta: the source's, less what no longer holds, plus the adaptation (keys
    the source has keep their place in meta.json, new ones follow)."""
    meta, train, held = src.meta, fit.train, fit.held
    # the source's other guard statistics (the slide guard: meta "guard" and its file) hold while the
    # features are the source's, i.e. when only the classifier layer trained; else they are not carried
    dropped = ("metrics", "novelty", "training", "fine_tuned_from", "smear_version") + (() if guard.keep
                                                                                       else GUARD_META)
    return ModelMeta.of(meta).updated(
        drop=dropped, weights=WEIGHTS, trained=date.today().isoformat(), temperature=round(fit.temperature, 6),
        adapted_from={"model": source_name(src.path), "weights_sha256": model_version(src.path),
                      "trained": meta.get("trained"), "temperature": src.temperature},
        adaptation={
            "cells": len(cells), "n_train": len(cells) if recipe.refit_all else len(train),
            "n_heldout": len(held),
            "per_class": dict(sorted(Counter(cells.labels()).items())), "skipped": cells.skipped,
            "data": cells.origin, "recipe": asdict(recipe), "temperature_from": fit.calibrated,
            "novelty": guard.why, "wall_seconds": round(time.perf_counter() - t0, 1)},
        metrics={"split": f"held-out part of the lab's cells ({len(held)} of {len(cells)}: stratified by class, "
                          f"copies of one cell kept together, seed {recipe.seed}, share {recipe.heldout})",
                 "heldout": fit.figures},
        data={"fingerprint": data_fingerprint(set(cells.files)), "n_train": len(train), "n_val": len(held)},
        data_fingerprint=data_fingerprint(set(cells.files)),
        **({"novelty": guard.novelty} if guard.novelty is not None else {}))


def fine_tune(cells: Cells, source: str | Path, recipe: Recipe = Recipe(), device: str = "cpu",
              log: Callable[[str], None] = _log.info, source_cells: Cells | None = None) -> Adapted:
    """Fine-tune the classifier model folder ``source`` on ``cells`` (cut with ``wide_geometry``)
    and refit its temperature on their held-out part; nothing is written. The source's novelty
    score is carried when only the classifier layer trains, refitted on ``source_cells`` (a sample
    of the source's training data) plus the lab's training cells when more trains, else dropped."""
    t0 = time.perf_counter()
    src = _open_source(Path(source), device)
    set_threads()
    torch.manual_seed(recipe.seed)
    net, norm = _load(src.path, src.meta, src.dev)
    fit = _fit(net, norm, cells, recipe, src, log)
    guard = _guard(fit, src, recipe, source_cells, log)
    new_meta = _adapted_meta(src, cells, recipe, fit, guard, t0)
    new_config = {**src.config, "adapt": {"source": str(src.path), **asdict(recipe)}}
    clf = CnnClassifier(fit.net, new_meta, device=device, batch=recipe.batch)
    figures = fit.figures
    log(f"held out ({len(fit.held)} cells): 5-type accuracy {_f(figures['before'].get('type5_accuracy'))} -> "
        f"{_f(figures['after'].get('type5_accuracy'))}; T {src.temperature:.3f} -> {fit.temperature:.3f} "
        f"({fit.calibrated})")
    others = guard_files(src.path, src.meta)
    if not guard.keep and others:
        log(f"not carried (fitted on the source's features, which the trained layers changed): "
            f"{', '.join(p.name for p in others)}")
    return Adapted(clf, new_meta, new_config, src.path / src.meta["novelty"]["file"] if guard.keep else None,
                   guard.stats, others if guard.keep else ())


#: meta.json keys of guard statistics besides the novelty score (the slide guard, smear.classify.guard)
GUARD_META = ("guard",)
#: files of a model folder that are not part of its guard
MODEL_FILES = frozenset({WEIGHTS, META, CONFIG, CARD, "model.onnx"})


def guard_files(source: Path, meta: dict[str, Any]) -> tuple[Path, ...]:
    """The source folder's guard files other than the novelty statistics (e.g. the slide guard's
    ``guard.safetensors``): every regular file that is not the weights, meta, config, card or ONNX graph."""
    skip = MODEL_FILES | {meta.get("weights", WEIGHTS), (meta.get("novelty") or {}).get("file", "")}
    return tuple(sorted(p for p in source.iterdir() if p.is_file() and not p.is_symlink() and p.name not in skip
                        and not p.name.startswith(".")))


@torch.no_grad()
def refit_novelty(net: torch.nn.Module, meta: dict[str, Any], source_cells: Cells, train: Cells, held: Cells,
                  recipe: Recipe, dev, log: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The novelty score of the adapted network (``smear.classify.novelty``), fitted on the features of
    four fifths of ``source_cells`` and the lab's training cells; its threshold is the source's
    quantile of the scores of the rest: the other fifth and the lab's held-out cells."""
    from smear.classify import novelty as nov
    from smear.classify.train import GROUP_MASK
    from smear.nn.augment import eval_batch, to_uint8
    from smear.taxonomy import GROUPS8

    quantile = float(meta["novelty"].get("quantile", 0.97))
    src_fit, src_val = heldout_split(source_cells.strata, 0.2, recipe.seed, source_cells.groups)
    fit_cells = [source_cells.subset(src_fit), train]
    val_cells = [source_cells.subset(src_val), held]
    clf = CnnClassifier(nov.WithFeatures(net).eval(), {**meta, "novelty": {}}, device=str(dev), batch=recipe.batch)
    size = int(meta["input_size"])

    def features(part: Cells) -> tuple[torch.Tensor, torch.Tensor]:
        centre = to_uint8(eval_batch(torch.from_numpy(part.crops), size))
        return clf.outputs(list(centre))

    fit_feats, labels = [], []
    for part in (c for c in fit_cells if len(c)):
        logits, feats = features(part)
        mask = GROUP_MASK[[GROUPS8.index(g) for g in part.group]]
        within = logits.masked_fill(~mask, -torch.inf).argmax(1).numpy()  # group-only cells: best class inside
        labels += [FINE_CLASSES.index(f) if f else int(within[i]) for i, f in enumerate(part.fine)]
        fit_feats.append(feats)
    feats = torch.cat(fit_feats).numpy()
    stats = nov.fit(feats, np.array(labels))
    fit_d = nov.distances(feats, stats)
    val = [features(part)[1] for part in val_cells if len(part)]
    val_d = nov.distances(torch.cat(val).numpy(), stats) if val else fit_d
    threshold = float(np.quantile(val_d, quantile))
    n_src, n_lab = len(src_fit), len(train)
    log(f"novelty refitted on {n_src} source and {n_lab} lab cells: threshold {threshold:.3f} "
        f"(quantile {quantile} of {len(val_d)} held-out cells)")
    return {"method": meta["novelty"].get("method", "mahalanobis, shared covariance, pre-logit features "
                                                    "(smear.classify.novelty)"),
            "threshold": round(threshold, 4), "quantile": quantile, "n_fit": n_src + n_lab, "n_val": len(val_d),
            "fitted_on": f"smear adapt: {n_src} cells of the source's data ({source_cells.origin}) and the lab's "
                         f"{n_lab} training cells; threshold at the {quantile} quantile of {len(val_d)} held-out "
                         "cells of both",
            "train_held": round(float((fit_d > threshold).mean()), 4),
            "val_held": round(float((val_d > threshold).mean()), 4), "file": nov.NOVELTY_FILE}, stats


def source_name(source: Path) -> str:
    """How a model card names the source folder: ``shipped (smear/weights/classifier)`` or its path."""
    shipped = shipped_dir("classifier")
    return "shipped (smear/weights/classifier)" if source.resolve() == shipped.resolve() else str(source)


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


# ---------------------------------------------------------------- the model folder


def model_card(meta: ModelMeta) -> str:
    """MODEL_CARD.md of an adapted classifier: source model, cells used, before/after figures."""
    a, src = meta["adaptation"], meta["adapted_from"]
    fig = meta["metrics"]["heldout"]
    per_class = ", ".join(f"{c} {n}" for c, n in a["per_class"].items())
    skipped = ", ".join(f"{n} {why}" for why, n in a["skipped"].items()) or "none"
    names = {"type5_accuracy": "5-type accuracy", "type5_balanced_accuracy": "5-type balanced accuracy",
             "group8_accuracy": "8-group accuracy", "accuracy": "11-class accuracy (cells with a fine label)"}
    rows = "\n".join(f"| {name} | {_f(fig['before'].get(key))} | {_f(fig['after'].get(key))} |"
                     for key, name in names.items())
    r = a["recipe"]
    b = a.get("brakes") or {}
    brakes = ""
    if b.get("forced"):
        brakes += (f"\nAdapted with `--force`: fewer cells than the limits ({b['limits']['min_cells']} in all, "
                   f"{b['limits']['min_per_class']} per corrected class) were overridden.")
    if b.get("allow_worse"):
        brakes += "\nWritten with `--allow-worse`: it was not refused if worse than its source on these cells."
    bn = "re-estimated on the training cells" if r.get("adabn") else "of the source kept"
    refit = (f" The folder's model was then trained again, on all {a['cells']} cells, with the same recipe and "
             "that temperature." if r.get("refit_all") and a["n_heldout"] else "")
    return f"""# Leukocyte classifier adapted to a lab ({meta['arch']}, {meta['input_size']} px)

Adapted by `smear adapt` on {meta['trained']} from the classifier model folder `{src['model']}`
(weights sha256 {src['weights_sha256']}..., trained {src['trained']}). Same 11 classes, crop
geometry and input normalisation as the source; temperature T = {meta['temperature']:.3f} (the
source's {src['temperature']:.3f}), {a['temperature_from']}.

## Cells used
{a['cells']} labelled cells from `{a['data']}` (data fingerprint {meta['data_fingerprint']}):
{per_class}. Skipped rows: {skipped}. {a['cells'] - a['n_heldout']} trained on, {a['n_heldout']} held out
(stratified by class, seed {r['seed']}) for the figures below and the temperature.{refit}

## Before and after, on the {fig['after']['n']} held-out cells
Split: {meta['metrics']['split']}.

| figure | source model | adapted |
|---|---|---|
{rows}
{brakes}

Few held-out cells give wide intervals: with 20 cells one cell is 5 points. The measured curve of
accuracy against the number of cells is in the shipped classifier's card (`benchmarks/adapt_curve.py`).

## Recipe
{r['epochs']} passes (batch {r['batch']}), AdamW lr {r['lr']}, weight decay {r['weight_decay']},
label smoothing {r['label_smoothing']}, class weights (mean/count)^{r['class_weight_power']};
trained: {'the whole network' if r['train_blocks'] < 0 else 'the classifier layer only' if r['train_blocks'] == 0
          else f"the last {r['train_blocks']} blocks and the head"}, BatchNorm statistics {bn};
{"the source model's training augmentation" if r.get("augment", "source") == "source" else "mild augmentation"}. {a['wall_seconds']} s.

## Guard
Novelty score (cells unlike every training class go to UNIDENTIFIED; the domain guard counts
them): {a['novelty']}.

## Limits
Figures are for this lab's held-out cells only. Not a medical device: cells under the review
threshold must be checked by a person.
"""


def _check_out(out: Path) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise SmearError(f"{out}: exists and is not a folder; refusing to replace it")
    if out.is_dir() and any(out.iterdir()):
        raise SmearError(f"{out}: folder is not empty; refusing to write into it", hint="choose a new --out")


def write_model(adapted: Adapted, out: str | Path) -> Path:
    """Write the adapted model folder atomically: built beside ``out``, renamed onto it at the end."""
    out = Path(out)
    _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        net = adapted.classifier.model
        save_weights(net, tmp / WEIGHTS)
        if adapted.novelty_file is not None:
            shutil.copy2(adapted.novelty_file, tmp / adapted.novelty_file.name)
        if adapted.novelty_stats is not None:
            from smear.classify import novelty as nov

            nov.save(tmp, adapted.novelty_stats)
        for path in adapted.guard_files:
            shutil.copy2(path, tmp / path.name)
        save_model_dir(adapted.meta.at(tmp), adapted.config, card=model_card(adapted.meta))
        _check_out(out)
        if out.is_dir():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def run_line(model_dir: str | Path) -> str:
    """The command that runs the pipeline with an adapted classifier."""
    return f"smear run SLIDE_FOLDER --set classifier_model={model_dir}"


@dataclass(frozen=True)
class Limits:
    """What ``adapt`` refuses (the ``adapt`` section of the classify config)."""

    min_cells: int = 20
    min_per_class: int = 2
    max_rows: int = 5000
    heldout: float = 0.2
    source_per_class: int = 60


def check_enough(cells: Cells, limits: Limits) -> None:
    """Refuse too few cells: under ``min_cells`` in all, or under ``min_per_class`` of a class the
    reviewer corrected cells to (cells whose model call was changed); the error gives the counts."""
    counts = Counter(cells.labels())
    corrected = sorted({lab for lab, c in zip(cells.labels(), cells.corrected or []) if c})
    short = [f"{lab} {counts[lab]}" for lab in corrected if counts[lab] < limits.min_per_class]
    if len(cells) >= limits.min_cells and not short:
        return
    have = ", ".join(f"{c} {n}" for c, n in sorted(counts.items()))
    why = (f"{len(cells)} usable cells ({have}); adapting needs at least {limits.min_cells}" if len(cells) <
           limits.min_cells else f"too few cells of a corrected class ({', '.join(short)}); adapting needs at "
           f"least {limits.min_per_class} of each class cells were corrected to")
    skipped = ", ".join(f"{n} {w}" for w, n in sorted(cells.skipped.items()))
    raise DataError(f"{cells.origin}: {why}" + (f" (skipped: {skipped})" if skipped else ""),
                    hint="review more cells, or pass --force to adapt on these anyway (held-out figures "
                         "from a handful of cells mean little)")


def check_not_worse(adapted: Adapted) -> None:
    """Refuse an adapted model whose 5-type accuracy on the held-out cells is below its source's."""
    before, after = adapted.figures["before"], adapted.figures["after"]
    b, a = before.get("type5_accuracy"), after.get("type5_accuracy")
    if b is not None and a is not None and a < b:
        raise SmearError(f"the adapted model is worse than its source on the {after['n']} held-out cells: "
                         f"5-type accuracy {b:.3f} -> {a:.3f}; nothing written",
                         hint="review more cells (or check the labels); --allow-worse writes it anyway")


def read_source_cells(roots: Sequence[str | Path], margin: float, size: int, per_class: int, seed: int,
                      cache_dir: str | Path | None, log: Callable[[str], None]) -> Cells:
    """A sample of the source model's training data (datasets ``smear eval classify --data`` reads),
    at most ``per_class`` cells of each class, for refitting the novelty score."""
    from smear.classify.data import load_items
    from smear.classify.lab_cells import read_items

    picked = []
    rng = np.random.default_rng(seed)
    for root in roots:
        by: dict[str, list] = defaultdict(list)
        for it in load_items(root):
            by[it.stratum].append(it)
        for s_ in sorted(by):
            idx = rng.permutation(len(by[s_]))[:per_class]
            picked += [by[s_][i] for i in sorted(idx)]
    cells = read_items(picked, margin, size, cache_dir, log, origin=", ".join(map(str, roots)))
    log(f"source data: {len(cells)} cells ({', '.join(f'{c} {n}' for c, n in sorted(Counter(cells.labels()).items()))})")
    return cells


@dataclass(frozen=True)
class Inputs:
    """Where ``adapt`` reads cells from: ``layout`` of dataset folders (auto | pbc | folders | csv),
    ``fields`` (where the fields that corrections CSVs name are: a slide folder, or the folder of
    slides), the crop cache, and ``source_data`` (the source model's training data, for refitting
    its novelty score)."""

    layout: str = "auto"
    fields: str | Path | None = None
    cache_dir: str | Path | None = None
    source_data: Sequence[str | Path] = ()


@dataclass(frozen=True)
class Brakes:
    """What ``adapt`` refuses (``limits``), and the overrides: ``force`` adapts on fewer cells,
    ``allow_worse`` writes a model worse than its source on the held-out cells."""

    limits: Limits = Limits()
    force: bool = False
    allow_worse: bool = False


def adapt(data: Sequence[str | Path], out: str | Path, source: str | Path = "shipped", recipe: Recipe | None = None,
          inputs: Inputs = Inputs(), brakes: Brakes = Brakes(), device: str = "cpu",
          log: Callable[[str], None] = _log.info) -> Path:
    """Fine-tune a classifier model folder (default the shipped one) on a lab's labelled cells and
    write the adapted model folder ``out`` (refused if it holds files); returns ``out``. ``recipe``
    (default ``Recipe()``) gives the passes and the seed; its held-out share is ``limits.heldout``.

    Brakes: under ``brakes.limits`` cells is refused (``force``: adapt anyway); an adapted model worse
    than its source on the held-out cells is not written (``allow_worse``: written anyway). The adapted
    model keeps a guard: with ``inputs.source_data`` (the source's training data) the last blocks train
    and the novelty score is refitted; without it only the classifier layer trains and the source's
    guard is carried."""
    from dataclasses import replace

    from smear.artifacts import load_model, resolve_model_dir

    out = Path(out)
    _check_out(out)
    source = resolve_model_dir(source, "classifier")
    meta = load_model(source, "classify", required=("arch", "input_size", "crop_margin", "normalize"))
    config = load_model_config(source)
    limits = brakes.limits
    recipe = replace(recipe or Recipe(), heldout=limits.heldout)
    margin, wide = wide_geometry(meta, config)
    cells = read_cells(data, margin, wide, inputs.layout, inputs.cache_dir, log, inputs.fields, limits.max_rows)
    log(f"cells: {len(cells)} ({', '.join(f'{c} {n}' for c, n in sorted(Counter(cells.labels()).items()))})")
    if brakes.force:
        try:
            check_enough(cells, limits)
        except DataError as exc:
            log(f"--force: adapting anyway ({exc.args[0]})")
    else:
        check_enough(cells, limits)
    source_cells = None
    if meta.get("novelty") and recipe.train_blocks != 0:
        if inputs.source_data:
            source_cells = read_source_cells(inputs.source_data, margin, wide, limits.source_per_class, recipe.seed,
                                             inputs.cache_dir, log)
        else:
            recipe = replace(recipe, train_blocks=0)
            log("adapt: training the classifier layer only, so that the source's novelty score stays valid "
                "(--source-data with the source's training data trains the last blocks too and refits it)")
    adapted = fine_tune(cells, source, recipe, device, log, source_cells)
    adapted.meta = adapted.meta.updated(adaptation={**adapted.meta["adaptation"], "brakes": {
        "limits": asdict(limits), "forced": bool(brakes.force), "allow_worse": bool(brakes.allow_worse),
        "source_data": [str(p) for p in inputs.source_data]}})
    if brakes.allow_worse:
        try:
            check_not_worse(adapted)
        except SmearError as exc:
            log(f"--allow-worse: writing it anyway ({exc.args[0]})")
    else:
        check_not_worse(adapted)
    return write_model(adapted, out)

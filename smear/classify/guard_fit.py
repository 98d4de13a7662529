"""Fitting the slide guard (``smear.classify.guard``) of a classifier: from a run folder
(``smear train guard``) or from crops in memory, on validation cells, clean and through random
acquisition shifts, and each training lab's colour statistics."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from smear.classify.guard import (
    COLOUR_NAMES, FITTED, GUARD_FILE, SlideGuard, colour_stats, raw_evidence, residuals, save,
)
from smear.types import GuardSums

_log = logging.getLogger(__name__)


def random_shift(rng: np.random.Generator, strength: float) -> Callable[[np.ndarray], np.ndarray]:
    """One random acquisition shift, the same for every crop of a synthetic slide: stain mixing and
    a background tint in optical density, sometimes a pale (over-exposed) field and a blur."""
    import cv2

    s = float(strength)
    mix = np.diag(rng.uniform(1 - 0.5 * s, 1 + 0.5 * s, 3)) + rng.normal(0, 0.12 * s, (3, 3)) * (1 - np.eye(3))
    tint = rng.uniform(-0.03 * s, 0.3 * s, 3)
    pale = rng.uniform(1 - 0.4 * s, 1.0) if rng.random() < 0.3 else 1.0
    sigma = rng.uniform(0, 2.0 * s) if rng.random() < 0.4 else 0.0

    def apply(crop: np.ndarray) -> np.ndarray:
        od = -np.log((crop.astype(np.float32) + 1.0) / 256.0) @ mix.T.astype(np.float32) + tint.astype(np.float32)
        img = np.clip(256.0 * np.exp(-np.maximum(od, 0.0)) - 1.0, 0, 255)
        img = 255 - (255 - img) * pale
        if sigma > 0.3:
            img = cv2.GaussianBlur(img, (0, 0), sigma)
        return np.clip(img, 0, 255).round().astype(np.uint8)

    return apply


def type5_accuracy(probs: np.ndarray, labels: Sequence[str | None], classes: Sequence[str]) -> np.ndarray:
    """Per cell: 1.0 if the pooled 5-type prediction matches the label's type, 0.0 if not, NaN
    for cells whose label has no 5-type (IG, ERB, platelets)."""
    from smear.taxonomy import FINE_TO_TYPE5, TYPES5, type5_of

    pooled = np.zeros((len(probs), len(TYPES5)))
    for j, c in enumerate(classes):
        t = FINE_TO_TYPE5.get(c)
        if t is not None:
            pooled[:, TYPES5.index(t)] += probs[:, j]
    pred = pooled.argmax(1)
    truth = [type5_of(lb) if lb else None for lb in labels]
    return np.array([np.nan if t is None else float(TYPES5.index(t) == p) for t, p in zip(truth, pred)])


def _whiten(cov: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
    d = cov.shape[0]
    cov = cov + ridge * (np.trace(cov) / d + 1e-12) * np.eye(d)
    return np.linalg.cholesky(np.linalg.inv(cov))


def clean_slide_pools(val_sources: Sequence[str] | None, mixed: int = 200, each: int = 100, min_cells: int = 20
                      ) -> tuple[list[np.ndarray | None], dict[str, int]]:
    """The clean synthetic slides to draw: ``mixed`` of all validation cells (None), then ``each`` from
    the cells of one source alone (their indices) for every source with ``min_cells`` or more; and
    how many single-source slides each source got."""
    pools: list[np.ndarray | None] = [None] * mixed
    counts: dict[str, int] = {}
    if val_sources is not None:
        src = np.asarray([str(s) for s in val_sources])
        for name in sorted(set(src.tolist())):
            idx = np.flatnonzero(src == name)
            if len(idx) >= min_cells:
                pools += [idx] * each
                counts[name] = each
    return pools, counts


def sources_of(items: Sequence[Any], specs: Sequence[dict[str, Any]]) -> list[str]:
    """The name of the training source whose root holds each item's file ("?" for none)."""
    roots = [Path(os.path.expanduser(str(spec["root"]))).resolve() for spec in specs]
    return [next((str(spec["name"]) for spec, root in zip(specs, roots) if Path(it.path).resolve().is_relative_to(root)),
                 "?") for it in items]


@dataclass(frozen=True)
class GuardFitSettings:
    """How the slide guard is fitted: ``k`` stain-change directions, ``draws`` random acquisition
    shifts of ``draw_cells`` validation cells each, synthetic slides of ``slide_cells`` cells, the
    thresholds at ``quantile`` of the slides read at 5-type accuracy >= ``good_accuracy``."""

    k: int = 8
    draws: int = 16
    draw_cells: int = 80
    slide_cells: int = 100
    quantile: float = 0.99
    good_accuracy: float = 0.90
    seed: int = 0


def fit(clf, val_crops: np.ndarray, val_labels: Sequence[str | None], lab_crops: dict[str, np.ndarray], *,
        settings: GuardFitSettings = GuardFitSettings(), val_sources: Sequence[str] | None = None,
        log: Callable[[str], None] = _log.info
        ) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, np.ndarray]]:
    """Fit the slide guard of a classifier (``CnnClassifier`` with a novelty score) on validation
    crops and each training lab's crops (colour statistics only). Returns the tensors to store,
    the meta entry, and the outputs of the synthetic slides (logits and labels, for calibration).
    ``val_sources`` (the training source of each validation crop) adds clean slides drawn from one
    source at a time beside the mixed ones: a slide of one training lab alone is read well, and its
    mean novelty or confidence, further from the mixture's, must not set the guard off."""
    import torch

    from smear.classify import novelty as nov

    if not clf.has_novelty:
        raise ValueError("the slide guard needs the classifier's novelty score (smear train novelty first)")
    if not isinstance(clf.model, nov.WithFeatures):
        clf.model = nov.WithFeatures(clf.model).eval()
    rng = np.random.default_rng(settings.seed)
    val_labels = list(val_labels)
    log(f"guard: clean validation cells ({len(val_crops)})")
    clean = _Outputs(*clf.outputs(list(val_crops)), crops=list(val_crops), labels=val_labels)
    shifted = _shifted_outputs(clf, val_crops, val_labels, settings, rng, log)
    lab_names = sorted(lab_crops)
    stats = _guard_stats(clf, clean, shifted, [lab_crops[n] for n in lab_names], settings.k)
    guard = SlideGuard(stats, {"thresholds": {}})
    pools = [_cell_table(clf, guard, o) for o in [clean, *shifted]]
    clean_draws, per_source = clean_slide_pools(val_sources)
    rows = _synthetic_slides(pools, clean_draws, stats, settings.slide_cells, rng)
    thresholds, fit_info = _thresholds(rows, settings, per_source, log)
    k = int(stats["projection"].shape[1])
    meta = {
        "method": "slide evidence against validation slides (smear.classify.guard)",
        "file": GUARD_FILE, "thresholds": thresholds, "quantile": settings.quantile, "k": k, "min_cells": 20,
        "colour_names": list(COLOUR_NAMES), "labs": lab_names, "n_val": len(val_crops), "draws": settings.draws,
        "draw_cells": settings.draw_cells, "slide_cells": settings.slide_cells,
        "fit": fit_info,
    }
    outputs = {"logits": torch.cat([o.logits for o in [clean, *shifted]]).numpy(),
               "labels": np.array([str(x) for o in [clean, *shifted] for x in o.labels])}
    return stats, meta, outputs


@dataclass
class _Outputs:
    """The network's outputs on one pool of crops (clean validation cells, or one random shift of
    some of them), with the crops, their labels and the shift's strength (0 for the clean pool)."""

    logits: Any
    feats_t: Any
    crops: list[np.ndarray]
    labels: list[str | None]
    idx: np.ndarray | None = None
    strength: float = 0.0

    @property
    def feats(self) -> np.ndarray:
        return self.feats_t.numpy()


def _shifted_outputs(clf, val_crops: np.ndarray, val_labels: list[str | None], settings: GuardFitSettings,
                     rng: np.random.Generator, log: Callable[[str], None]) -> list[_Outputs]:
    """``settings.draws`` random acquisition shifts, each of ``draw_cells`` validation cells, through the network."""
    shifted = []
    for d in range(settings.draws):
        strength = float(rng.uniform(0.0, 1.6))
        idx = rng.choice(len(val_crops), min(settings.draw_cells, len(val_crops)), replace=False)
        shift = random_shift(rng, strength)
        crops = [shift(c) for c in val_crops[idx]]
        shifted.append(_Outputs(*clf.outputs(crops), crops=crops, labels=[val_labels[i] for i in idx], idx=idx,
                                strength=strength))
        log(f"guard: synthetic shift {d + 1}/{settings.draws} (strength {strength:.2f})")
    return shifted


def _guard_stats(clf, clean: _Outputs, shifted: list[_Outputs], lab_crops: list[np.ndarray], k: int
                 ) -> dict[str, np.ndarray]:
    """The guard's tensors: the ``k`` directions the shifts move the whitened residuals along (SVD of
    the mean moves), the clean cells' null statistics on them, and each training lab's colour statistics."""
    r0 = residuals(clean.feats, clf.novelty_stats)
    deltas = np.stack([(residuals(s.feats, clf.novelty_stats) - r0[s.idx]).mean(0) for s in shifted])
    _, _, vt = np.linalg.svd(deltas, full_matrices=False)
    k = int(min(k, len(deltas)))
    projection = vt[:k].T.astype(np.float32)  # D x K, orthonormal columns
    p0 = r0 @ projection
    lab_stats = [colour_stats(list(crops)) for crops in lab_crops]
    return {"projection": projection, "null_mean": p0.mean(0).astype(np.float32),
            "null_whiten": _whiten(np.cov(p0, rowvar=False).reshape(k, k)).astype(np.float32),
            "lab_means": np.stack([s.mean(0) for s in lab_stats]).astype(np.float32),
            "lab_whiten": np.stack([_whiten(np.cov(s, rowvar=False)) for s in lab_stats]).astype(np.float32)}


def _cell_table(clf, guard: SlideGuard, o: _Outputs) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Per cell of a pool: the guard's vector, the novelty ratio, the top probability and whether its
    5-type call is right; and the pool's shift strength."""
    import torch

    from smear.classify import novelty as nov

    probs = torch.softmax(o.logits / clf.temperature, 1).numpy()
    nov_ratio = nov.distances(o.feats, clf.novelty_stats) / clf.novelty_threshold
    vec = guard.cell_vectors(o.feats, clf.novelty_stats, o.crops)
    return vec, nov_ratio, probs.max(1), type5_accuracy(probs, o.labels, clf.classes), o.strength


def _synthetic_slides(pools: list[tuple], clean_draws: list[np.ndarray | None], stats: dict[str, np.ndarray],
                      slide_cells: int, rng: np.random.Generator) -> list[dict[str, float]]:
    """The raw evidence and 5-type accuracy of each synthetic slide: ``clean_draws`` from the clean
    pool (mixed or of one source), 8 from each shifted pool (drawn with replacement)."""
    k = int(stats["projection"].shape[1])
    rows = []
    for p, (vec, nr, top, acc, strength) in enumerate(pools):
        for within in (clean_draws if p == 0 else [None] * 8):
            if within is None:
                pick = rng.choice(len(vec), min(slide_cells, len(vec)), replace=p > 0)
            else:
                pick = rng.choice(within, slide_cells, replace=len(within) < slide_cells)
            sums = GuardSums(n=len(pick), vector=vec[pick].astype(np.float64).sum(0), n_scored=len(pick),
                             novelty=float(nr[pick].sum()), n_prob=len(pick), prob=float(top[pick].sum()))
            raw = raw_evidence(sums, k, stats["lab_means"], stats["lab_whiten"])
            a = acc[pick]
            rows.append({**raw, "accuracy": float(np.nanmean(a)) if np.isfinite(a).any() else 0.0,
                         "strength": strength})
    return rows


def _thresholds(rows: list[dict[str, float]], settings: GuardFitSettings, per_source: dict[str, int],
                log: Callable[[str], None]) -> tuple[dict[str, float], dict[str, Any]]:
    """Each evidence's threshold (its ``quantile`` over the slides read well) and how the guard does
    on the synthetic slides themselves (``per_source``: the clean slides drawn of one source alone)."""
    good = [r for r in rows if r["accuracy"] >= settings.good_accuracy]
    bad = [r for r in rows if r["accuracy"] < 0.75]
    base = good
    if len(good) < 20:  # a classifier that reads few slides well: its clean validation slides set the bar
        base = [r for r in rows if r["strength"] == 0.0]
        log(f"guard: only {len(good)} synthetic slides read at >= {settings.good_accuracy}; thresholds from the clean ones")
    thresholds = {e: round(float(np.quantile([r[e] for r in base], settings.quantile)), 6) for e in FITTED}
    thresholds = {e: max(v, 1e-6) for e, v in thresholds.items()}
    fires = [any(r[e] > thresholds[e] for e in FITTED) for r in bad]
    false = [any(r[e] > thresholds[e] for e in FITTED) for r in good]
    info = {"slides": len(rows), "good_slides": len(good), "bad_slides": len(bad), "one_source_slides": per_source,
            "recall_bad": round(float(np.mean(fires)), 4) if fires else None,
            "false_alarms_good": round(float(np.mean(false)), 4) if false else None,
            "good": f"5-type accuracy >= {settings.good_accuracy}", "bad": "5-type accuracy < 0.75"}
    log(f"guard: thresholds {thresholds}; on its own synthetic slides: recall {info['recall_bad']} "
        f"({len(bad)} read < 0.75), false alarms {info['false_alarms_good']} ({len(good)} read >= 0.90)")
    return thresholds, info


def fit_shift_temperature(logits: np.ndarray, labels: Sequence[str | None], classes: Sequence[str]) -> float:
    """The temperature minimising the 5-type negative log-likelihood over clean and shifted cells
    (a grid over 0.25-4, log-spaced): the per-cell probabilities made honest under shift."""
    nlls = {t: type5_nll(logits, labels, classes, t) for t in np.exp(np.linspace(np.log(0.25), np.log(4.0), 57))}
    return float(min(nlls, key=nlls.get))


def type5_probs(logits: np.ndarray, classes: Sequence[str], temperature: float) -> np.ndarray:
    """Softmax(logits / T) pooled into the 5 types and renormalised (cells x 5)."""
    from smear.taxonomy import FINE_TO_TYPE5, TYPES5

    z = np.asarray(logits, np.float64) / temperature
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    pooled = np.zeros((len(p), len(TYPES5)))
    for j, c in enumerate(classes):
        t = FINE_TO_TYPE5.get(c)
        if t is not None:
            pooled[:, TYPES5.index(t)] += p[:, j]
    return pooled / np.clip(pooled.sum(1, keepdims=True), 1e-12, None)


def type5_nll(logits: np.ndarray, labels: Sequence[str | None], classes: Sequence[str], temperature: float) -> float:
    from smear.taxonomy import TYPES5, type5_of

    truth = [type5_of(lb) if lb else None for lb in labels]
    keep = [i for i, t in enumerate(truth) if t is not None]
    if not keep:
        return float("nan")
    p = type5_probs(np.asarray(logits)[keep], classes, temperature)
    y = np.array([TYPES5.index(truth[i]) for i in keep])
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())


def fit_for_run(run: str | Path, model_dir: str | Path | None = None, max_val: int = 500, max_lab: int = 2000,
                draws: int = 16, log: Callable[[str], None] = _log.info) -> dict[str, Any]:
    """Fit the slide guard of a classifier model folder from its run folder (config.yaml and split
    files, as ``smear train novelty`` reads them) and write ``guard.safetensors`` and
    ``meta["guard"]`` into the model folder. Returns the meta entry."""
    from smear.artifacts import ModelMeta, load_meta, save_model_dir
    from smear.classify import data as cdata
    from smear.classify.crop_cache import readable_crops
    from smear.classify.model import CnnClassifier
    from smear.classify.sources import splits as _splits
    from smear.config import load_config
    from smear.io import write_text_atomic
    from smear.errors import ModelError, SmearError

    run = Path(run)
    model_dir = Path(model_dir or run / "model")
    if not (run / "config.yaml").is_file():
        raise SmearError(f"{run}: not a classifier run folder (no config.yaml)",
                         hint="pass the folder smear train classify wrote (or one holding its config.yaml)")
    cfg = load_config("classify", run / "config.yaml")
    _, train_items, val_items, _, src_of_train, specs = _splits(cfg, run, log)
    m, d = cfg.model, cfg.data
    size, margin = int(m.input_size), float(m.crop_margin)
    clf = CnnClassifier.from_dir(model_dir, device="cpu")
    if not clf.has_novelty:
        raise ModelError(f"{model_dir}: the slide guard needs the model's novelty score",
                         hint=f"smear train novelty {run} --model {model_dir} first")
    val = cdata.subsample(val_items, max_val, int(d.split_seed))
    val, val_crops, _ = readable_crops(val, margin, size, d.cache_dir, d.workers, log)
    labs = {}
    for k, spec in enumerate(specs):
        items = cdata.subsample([it for it, s in zip(train_items, src_of_train) if s == k], max_lab,
                                int(d.split_seed))
        if items:
            labs[str(spec["name"])] = readable_crops(items, margin, size, d.cache_dir, d.workers, log)[1]
    stats, gmeta, outputs = fit(clf, val_crops, [it.fine or it.group for it in val], labs,
                                settings=GuardFitSettings(draws=draws), val_sources=sources_of(val, specs), log=log)
    t_shift = fit_shift_temperature(outputs["logits"], list(outputs["labels"]), clf.classes)
    gmeta["temperature_shift"] = round(t_shift, 4)
    gmeta["temperature_shift_note"] = ("temperature minimising the 5-type NLL over the clean and shifted "
                                       "validation cells of the fit; measured, not applied")
    names = ", ".join(f"{s['name']} ({s['root']})" for s in specs)
    gmeta["fitted_on"] = (f"validation part of {names} ({len(val)} cells, clean and through {draws} random "
                          f"acquisition shifts; clean slides mixed and of each source alone); colour per training lab from up to {max_lab} training cells each")
    save(model_dir, stats)
    save_model_dir(ModelMeta.of(load_meta(model_dir), model_dir).updated(guard=gmeta))
    card = model_dir / "MODEL_CARD.md"
    if card.is_file():
        write_text_atomic(card, with_card_section(card.read_text(encoding="utf-8"), gmeta, f"smear train guard {run}"))
    return gmeta


CARD_HEADING = "## Slide guard"


def with_card_section(card: str, gmeta: dict[str, Any], command: str) -> str:
    """The model card with its slide-guard section written (replaced when it has one)."""
    fit = gmeta["fit"]
    th = ", ".join(f"{k} {v:.4g}" for k, v in gmeta["thresholds"].items())
    section = f"""{CARD_HEADING}
Slide-level evidence that a slide is misread (`smear.classify.guard`), fitted by `{command}` on the
{gmeta['fitted_on']}. Thresholds (99th percentile over the synthetic slides read at 5-type accuracy
>= 0.90): {th}. On its own synthetic slides ({fit['slides']}: {fit['good_slides']} read >= 0.90,
{fit['bad_slides']} read < 0.75) it fires on {fit['recall_bad']} of the misread ones and
{fit['false_alarms_good']} of the well-read ones. A temperature fitted on the same clean and shifted
cells would be {gmeta.get('temperature_shift')} (measured, not applied).
"""
    if CARD_HEADING in card:
        head, _, rest = card.partition(CARD_HEADING)
        tail = rest.split("\n## ", 1)
        return head + section + ("\n## " + tail[1] if len(tail) > 1 else "")
    return card.rstrip("\n") + "\n\n" + section

"""Train the U-Net on WBC crops (three-level and nucleus-only masks), score it, save the model folder.

Loss per pixel: cross-entropy where the label is background / cytoplasm / nucleus;
``-log(p_background + p_cytoplasm)`` where only "not nucleus" is known (nucleus-only masks, so the
network still learns the nucleus edge there without being told a wrong cytoplasm label); nothing
where unknown. Plus a soft Dice term on the cell (cytoplasm + nucleus) and on the nucleus.

Splits: per source, by image, seeded: ``val_fraction`` for choosing the epoch, ``test_fraction`` for
the figures (nucleus-only sources: the fields listed in ``data.test_fields`` instead, e.g. the BCCD
test fields). ``data.holdout`` names a source used only for testing (leave-one-source-out).
The run folder holds config.yaml, log.csv, checkpoint.pt (resumable), best.safetensors,
metrics.json (test per source) and ``model/``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from smear.artifacts import ModelMeta, save_model_dir
from smear.io import write_text_atomic
from smear.nn.augment import BatchAugment, eval_batch
from smear.nn.tensors import Normalize, channel_stats
from smear.nn.weights import load_weights, save_weights
from smear.segment.evaluate import crop_scores, evaluate_segmenter, summary_line
from smear.segment.model import LABELS, WEIGHTS, UnetSegmenter, build_unet
from smear.errors import SmearError

from smear.config_models import SegmentConfig
from smear.nn import loop
from smear.nn.loop import warmup_cosine
from smear.segment import data as sdata

_log = logging.getLogger(__name__)

LOG_FIELDS = ("epoch", "lr", "train_loss", "train_seconds", "val_cell_dice", "val_nucleus_dice", "val_score",
              "wall_seconds", "best_score")


def seg_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0) -> torch.Tensor:
    """Partial-label cross-entropy plus soft Dice on cell and nucleus (see the module docstring)."""
    logp = F.log_softmax(logits.float(), 1)
    full = target <= sdata.NUCLEUS
    not_nuc = target == sdata.NOT_NUCLEUS
    terms = []
    if full.any():
        terms.append(-logp.permute(0, 2, 3, 1)[full].gather(1, target[full].long()[:, None]).squeeze(1))
    if not_nuc.any():
        terms.append(-torch.logsumexp(logp[:, :2].permute(0, 2, 3, 1)[not_nuc], dim=1))
    ce = torch.cat(terms).mean() if terms else logits.sum() * 0
    if dice_weight <= 0:
        return ce
    p = logp.exp()
    dice = []
    if full.any():  # cell = cytoplasm + nucleus, on fully labelled pixels
        pc, yc = (p[:, 1] + p[:, 2])[full], (target[full] > 0).float()
        dice.append(2 * (pc * yc).sum() / (pc.sum() + yc.sum()).clamp(min=1e-6))
    known = full | not_nuc
    if known.any():
        pn, yn = p[:, 2][known], (target[known] == sdata.NUCLEUS).float()
        dice.append(2 * (pn * yn).sum() / (pn.sum() + yn.sum()).clamp(min=1e-6))
    return ce + dice_weight * (1 - torch.stack(dice).mean()) if dice else ce


@torch.no_grad()
def _predict(model, norm, crops: np.ndarray, size: int, batch: int, device) -> np.ndarray:
    model.eval()
    out = []
    for i in range(0, len(crops), batch):
        x = eval_batch(torch.from_numpy(np.ascontiguousarray(crops[i:i + batch])), size).to(device)
        out.append(model(norm(x)).argmax(1).cpu().numpy().astype(np.uint8))
    return np.concatenate(out) if out else np.zeros((0, size, size), np.uint8)


def _centre(a: np.ndarray, size: int) -> np.ndarray:
    top = (a.shape[1] - size) // 2
    return a[:, top:top + size, top:top + size]


@loop.removes_failed_run
def train(cfg: SegmentConfig, out: str | Path, resume: bool = False, log: Callable[[str], None] = _log.info,
          on_batch: loop.OnBatch | None = None) -> Path:
    """Train, pick the best epoch on val, score test per source, write ``out/model``; returns it.
    ``on_batch(epoch, done, total)`` follows each epoch."""
    m, t = cfg.model, cfg.train
    run = loop.RunFolder.start(out, cfg, resume, LOG_FIELDS)
    device, threads = run.setup(t)
    if m.input_size % 32:
        raise SmearError(f"model.input_size {m.input_size} is not a multiple of 32 (the U-Net's stride)")
    log(f"segment: {m.arch} / {m.encoder} at {m.input_size} px on {device} ({threads} threads)")
    data = _crops(cfg, log)
    mean, std = channel_stats(_centre(data.x_train, m.input_size))
    model = build_unet(m.encoder, m.decoder_channels, m.arch).to(device)
    norm = Normalize(mean, std).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(t.lr), weight_decay=float(t.weight_decay))
    steps = max(1, len(data.x_train) // t.batch)
    scheduler = warmup_cosine(optimizer, round(float(t.warmup_epochs) * steps), int(t.epochs) * steps)
    trainee = loop.Trainee(model, optimizer, scheduler, BatchAugment(m.input_size, t.augment, seed=t.seed))
    fitted = loop.fit(run, t, trainee, _epochs(trainee, norm, data, cfg, device, on_batch), resume, log)
    load_weights(model, run.path / "best.safetensors")
    return _finish(cfg, run.path, model, _meta(cfg, run.path / "model", data, mean, std, fitted), log)


@dataclass(frozen=True)
class _Crops:
    """The training and validation crops (cut wider than the input, for augmentation) and their masks."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray  # the central input_size square
    has_cell: list[bool]  # per validation crop: whether its mask labels the cytoplasm


def _crops(cfg: SegmentConfig, log: Callable[[str], None]) -> _Crops:
    """The data section's train and val crops, cut ``cache_pad`` x wider than the model's crop."""
    m, d = cfg.model, cfg.data
    size = int(m.input_size)
    wide = round(size * float(d.cache_pad) / 2) * 2  # even, so the central size square is exact
    parts = sdata.load_parts(d, float(m.crop_margin) * wide / size, wide, log)
    train_items, val_items = parts["train"], parts["val"]
    if not train_items or not val_items:
        raise SmearError(f"{d.root}: {len(train_items)} training and {len(val_items)} validation crops")
    return _Crops(np.stack([it.image for it in train_items]), np.stack([it.mask for it in train_items]),
                  np.stack([it.image for it in val_items]), _centre(np.stack([it.mask for it in val_items]), size),
                  [it.has_cell_labels for it in val_items])


def _epochs(trainee: loop.Trainee, norm: Normalize, data: _Crops, cfg: SegmentConfig, device,
            on_batch: loop.OnBatch | None) -> loop.Epochs:
    """The U-Net's epoch (seeded order, paired warp of crops and masks) and its validation Dice."""
    t, size = cfg.train, int(cfg.model.input_size)
    model, augment = trainee.model, trainee.augment

    def make(idx: np.ndarray):
        return augment.pairs(torch.from_numpy(data.x_train[idx]), torch.from_numpy(data.y_train[idx]))

    def loss_of(item) -> torch.Tensor:
        x, y = item
        return seg_loss(model(norm(x.to(device))), y.to(device), float(t.dice_weight))

    def train_epoch(epoch: int) -> dict[str, float]:
        order = np.random.default_rng([int(t.seed), epoch]).permutation(len(data.x_train))
        return loop.train_one_epoch(trainee, loss_of, loop.epoch_batches(order, int(t.batch)), make, epoch,
                                    loop.Feed(on_batch=on_batch))

    def validate(_epoch: int) -> tuple[float, dict[str, float]]:
        pred = _predict(model, norm, data.x_val, size, int(t.batch), device)
        sc = [crop_scores(p, y, h) for p, y, h in zip(pred, data.y_val, data.has_cell)]
        cell = float(np.nanmean([s["cell_dice"] for s in sc])) if any(data.has_cell) else float("nan")
        nuc = float(np.mean([s["nucleus_dice"] for s in sc]))
        score = (cell + nuc) / 2 if cell == cell else nuc
        return score, {"val_cell_dice": cell, "val_nucleus_dice": nuc, "val_score": score}

    return loop.Epochs(train_epoch, validate, lambda _s, r: f"val cell Dice {r['val_cell_dice']:.4f} nucleus Dice "
                                                           f"{r['val_nucleus_dice']:.4f}")


def _meta(cfg: SegmentConfig, folder: Path, data: _Crops, mean: list[float], std: list[float],
          fitted: loop.Fitted) -> ModelMeta:
    """The meta of the model folder ``folder`` (before the test figures)."""
    m = cfg.model
    return ModelMeta(
        folder=folder, stage="segment", weights=WEIGHTS, classes=tuple(LABELS), trained=date.today().isoformat(),
        arch=m.arch, encoder=m.encoder, decoder_channels=tuple(m.decoder_channels), input_size=int(m.input_size),
        crop_margin=float(m.crop_margin), normalize={"mean": mean, "std": std, "input_range": "RGB in [0, 1]"},
        extra={"crop": "square of side = long side of the WBC box x crop_margin (smear.crops.cut_crop), resized "
                       "to input_size; the mask comes back at the crop's size",
               "training": {"best_epoch": fitted.best_epoch, "wall_minutes": round(fitted.wall_seconds / 60, 1),
                            "n_train": len(data.x_train), "n_val": len(data.x_val), "holdout": cfg.data.holdout}})


def _finish(cfg: SegmentConfig, out: Path, model: torch.nn.Module, meta: ModelMeta,
            log: Callable[[str], None]) -> Path:
    """Write the model folder, score it on the test crops (native size), and write the figures into it."""
    model_dir = meta.folder
    model_dir.mkdir(parents=True, exist_ok=True)
    save_weights(model, model_dir / WEIGHTS)
    save_model_dir(meta, cfg)
    seg = UnetSegmenter.from_dir(model_dir, device=str(next(model.parameters()).device))
    test_items = sdata.load_parts(cfg.data, float(cfg.model.crop_margin), None)["test"]
    metrics = evaluate_segmenter(seg, test_items) if test_items else {}
    if metrics:
        log(f"test (native-size crops): {summary_line(metrics)}")
    holdout = cfg.data.holdout
    save_model_dir(meta.updated(metrics={"split": "test" + (f" (holdout source {holdout})" if holdout else ""),
                                         "test": metrics}), cfg)
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return model_dir

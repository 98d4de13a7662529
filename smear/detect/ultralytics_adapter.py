"""The one place that imports ultralytics: offline set-up and thread restoration."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable


def _font_source() -> Path | None:
    try:
        import matplotlib

        font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        return font if font.exists() else None
    except ImportError:
        return None


def setup_offline() -> None:
    """Keep ultralytics from reaching the network or installing packages, whatever the user's
    environment says, and give it a config dir holding its font (a temporary one when the cache
    folder cannot be written)."""
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "false"
    os.environ["HF_HUB_OFFLINE"] = "1"
    ours = "YOLO_CONFIG_DIR" not in os.environ
    if ours:
        cfg_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "smear" / "ultralytics"
        os.environ["YOLO_CONFIG_DIR"] = str(cfg_dir)
    try:
        _copy_font(Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics")
    except OSError:
        if not ours:
            return  # the user's own folder: ultralytics falls back by itself
        import tempfile

        os.environ["YOLO_CONFIG_DIR"] = tempfile.mkdtemp(prefix="smear-ultralytics-")
        _copy_font(Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics")


def _copy_font(font_dir: Path) -> None:
    src = _font_source()
    if src is not None:
        for name in ("Arial.ttf", "Arial.Unicode.ttf"):
            if not (font_dir / name).exists():
                font_dir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, font_dir / name)


def _no_surprises(ul) -> None:
    """After the import: no online checks, no auto-install, and PIL's Image.open as it was (ultralytics
    patches it to pip-install a HEIF plugin when a file is not an image; smear decodes images itself)."""
    import importlib

    for name in ("ultralytics.utils", "ultralytics.utils.checks"):
        mod = importlib.import_module(name)
        for flag in ("ONLINE", "AUTOINSTALL"):
            if hasattr(mod, flag):
                setattr(mod, flag, False)
    # every .pt ultralytics itself unpickles (a training run's checkpoints) goes through torch's
    # weights_only loader and its no-eval model construction: no activation string is evaluated
    tasks = importlib.import_module("ultralytics.nn.tasks")
    if hasattr(tasks, "SAFE_LOAD"):
        tasks.SAFE_LOAD = True
    patches = sys.modules.get("ultralytics.utils.patches")
    original = getattr(patches, "_image_open", None)
    if original is not None:
        from PIL import Image

        Image.open = original


def ultralytics():
    """Import ultralytics after the offline set-up, restoring torch's thread count. Its log is
    quiet (warnings only: no "Loading ... for ONNX Runtime", no settings notes) unless the user sets
    YOLO_VERBOSE; training summarises it (``training_log``)."""
    from smear.devices import set_threads

    setup_offline()
    os.environ.setdefault("YOLO_VERBOSE", "False")
    # ultralytics binds its log handler to sys.stdout when imported (and announces a new settings
    # file on first use): import it with stdout pointed at stderr, so reports on stdout stay clean
    omp = os.environ.get("OMP_NUM_THREADS")  # ultralytics sets it to 1 on import when unset
    with contextlib.redirect_stdout(sys.stderr):
        import ultralytics as ul  # noqa: PLC0415
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS", None)  # else smear.devices.available_cores would read 1
    _no_surprises(ul)
    set_threads()
    return ul


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _Plain(logging.Filter):
    """ultralytics' records without its colour codes (for a stderr that is not a terminal)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = _ANSI.sub("", record.getMessage()), ()
        return True


def _epoch_line(trainer) -> str:
    """``epoch 3/40: box_loss 1.234 cls_loss 0.987 dfl_loss 1.101, val mAP50 0.412``."""
    try:
        losses = trainer.label_loss_items(trainer.tloss, prefix="train") if trainer.tloss is not None else {}
    except (AttributeError, TypeError):  # another ultralytics' loss layout: the metrics alone
        losses = {}
    parts = " ".join(f"{k.split('/', 1)[-1]} {v:.3f}" for k, v in losses.items())
    map50 = (trainer.metrics or {}).get("metrics/mAP50(B)")
    return (f"epoch {trainer.epoch + 1}/{trainer.epochs}: {parts}"
            + ("" if map50 is None else f", val mAP50 {float(map50):.3f}"))


@contextlib.contextmanager
def training_log(model, log: Callable[[str], None], on_batch: Callable[[int, int, int], None] | None = None):
    """Inside the block ultralytics trains quietly (its own log at warnings, without colour codes
    when stderr is not a terminal): ``log`` gets one line per epoch (epoch, losses, val mAP50) and
    ``on_batch(epoch, done, total)`` is called after each batch."""
    state = {"epoch": None, "done": 0}

    def epoch_start(trainer) -> None:
        state["epoch"], state["done"] = trainer.epoch, 0

    def batch_end(trainer) -> None:
        state["done"] += 1
        if on_batch is not None:
            on_batch(trainer.epoch + 1, state["done"], len(trainer.train_loader))

    def fit_epoch_end(trainer) -> None:
        if state["epoch"] == trainer.epoch:  # not the final validation of best.pt, which calls it again
            state["epoch"] = None
            log(_epoch_line(trainer))

    for event, fn in (("on_train_epoch_start", epoch_start), ("on_train_batch_end", batch_end),
                      ("on_fit_epoch_end", fit_epoch_end)):
        model.add_callback(event, fn)
    logger = logging.getLogger("ultralytics")
    previous, plain = logger.level, _Plain()
    logger.setLevel(logging.WARNING)
    if not sys.stderr.isatty():
        logger.addFilter(plain)
    try:
        yield
    finally:
        logger.setLevel(previous)
        logger.removeFilter(plain)


#: what a detector .pt may import when unpickled: tensors and containers, by exact name ...
_SAFE_GLOBALS = frozenset({
    ("collections", "OrderedDict"), ("builtins", "set"), ("__builtin__", "set"), ("builtins", "frozenset"),
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "slice"),
    ("torch", "Size"), ("torch", "device"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch.storage", "UntypedStorage"), ("_codecs", "encode"),
})
#: ... and network layers: classes of these modules that are torch.nn.Module subclasses
_LAYER_MODULES = ("torch.nn.modules.", "ultralytics.nn.modules.", "ultralytics.nn.tasks")


def allowed_global(module: str, name: str) -> bool:
    """Whether a detector .pt may import ``module.name``: exact tensor/container names, torch
    dtypes and storages, and torch/ultralytics layer classes (checked on the imported class)."""
    import importlib

    import torch

    if (module, name) in _SAFE_GLOBALS:
        return True
    if not name.isidentifier():  # dotted names reach attributes of attributes
        return False
    if module == "torch":
        obj = getattr(torch, name, None)
        return isinstance(obj, torch.dtype) or (isinstance(obj, type) and name.endswith("Storage"))
    if not (module.startswith(_LAYER_MODULES[:2]) or module == _LAYER_MODULES[2]):
        return False
    try:
        obj = getattr(importlib.import_module(module), name, None)
    except ImportError:
        return False
    return isinstance(obj, type) and issubclass(obj, torch.nn.Module) and obj.__module__ == module


def _before_format(transforms, jitter):
    """``transforms`` (an ultralytics Compose) with ``jitter`` put before its final formatting step."""
    transforms.insert(len(transforms.transforms) - 1, jitter)
    return transforms


def _with_jitter(build, jitter, hyp):
    """A dataset's ``build_transforms`` followed by ``_before_format``, so the jitter survives
    ultralytics rebuilding the transforms when it closes the mosaic."""
    return _before_format(build(hyp), jitter)


def stain_trainer(jitter):
    """ultralytics' detection trainer whose training set also gets ``jitter`` (a callable on the
    labels dict, e.g. ``smear.detect.stain.StainJitter``) after its own colour jitter."""
    import functools

    ultralytics()
    from ultralytics.models.yolo.detect import DetectionTrainer

    class StainTrainer(DetectionTrainer):
        def build_dataset(self, img_path, mode="train", batch=None):
            ds = super().build_dataset(img_path, mode, batch)
            if mode == "train" and ds.augment:
                ds.build_transforms = functools.partial(_with_jitter, ds.build_transforms, jitter)
                ds.transforms = _before_format(ds.transforms, jitter)
            return ds

    return StainTrainer

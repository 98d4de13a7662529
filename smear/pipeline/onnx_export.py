"""``smear export``: copies of model folders with their network as ``model.onnx`` (for ``runtime: onnx``)."""

from __future__ import annotations

import shutil
from pathlib import Path

from smear.artifacts import ModelMeta, load_meta
from smear.errors import ModelError
from smear.nn.onnx import ONNX_NAME, export_module


def check_export_target(model_dir: str | Path, out: str | Path, force: bool = False) -> None:
    """Refuse an export over the model itself, onto a file or symlink, or into a folder that holds
    files, unless ``force`` (which replaces only the files the export writes)."""
    model_dir, out = Path(model_dir), Path(out)
    if out.resolve() == model_dir.resolve():
        raise ModelError(f"{out}: export into a new folder, not over the model itself")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ModelError(f"{out}: exists and is not a folder; refusing to replace it")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ModelError(f"{out}: folder is not empty; refusing to write into it",
                         hint="choose a new --out, or --force to replace the files an export writes "
                              "(nothing else in it is touched)")


def export_model_dir(stage: str, model_dir: str | Path, out: str | Path, force: bool = False) -> Path:
    """Copy a model folder's files to ``out`` and write its ONNX there as ``model.onnx``
    (``runtime: onnx`` then uses it directly). ``stage``: detector | classifier | segmenter.
    Nothing is ever deleted: ``force`` lets it write into a non-empty folder, over the same names."""
    model_dir, out = Path(model_dir), Path(out)
    check_export_target(model_dir, out, force)
    out.mkdir(parents=True, exist_ok=True)
    for src in sorted(model_dir.iterdir()):
        if src.is_file() and src.name != ONNX_NAME and not src.name.endswith(".tmp"):
            dest = out / src.name
            if dest.is_symlink() or dest.is_dir():
                raise ModelError(f"{dest}: is a link or a folder; refusing to replace it")
            shutil.copyfile(src, dest)
    meta = ModelMeta.of(load_meta(out), out)
    if stage == "detector":
        from smear.detect.network import export_onnx
        from smear.detect.settings import YoloSettings

        infer = YoloSettings.of(meta.infer)
        export_onnx(meta.weights_path, out / ONNX_NAME, infer.imgsz, infer.batch, classes=list(meta.classes))
    elif stage == "classifier":
        from smear.classify.model import CnnClassifier

        export_module(CnnClassifier.from_dir(out, device="cpu").model, out / ONNX_NAME, int(meta.input_size))
    elif stage == "segmenter":
        from smear.segment.model import UnetSegmenter

        export_module(UnetSegmenter.from_dir(out, device="cpu").model, out / ONNX_NAME, int(meta.input_size))
    else:
        raise ModelError(f"unknown stage {stage!r}: detector, classifier or segmenter")
    return out / ONNX_NAME

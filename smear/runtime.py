"""ONNX: exporting our torch networks and running them with onnxruntime (``runtime: onnx``).

A model folder may hold ``model.onnx`` beside its torch weights (``smear export`` writes one). When
it does not, the ONNX file is made on first use from the torch weights into the cache
(``~/.cache/smear/onnx/<stage>-<weights hash>.onnx``) and reused from there: nothing is
downloaded, and the shipped package stays within its size budget.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smear.artifacts import load_meta, model_version
from smear.types import ModelError

ONNX_NAME = "model.onnx"
RUNTIMES = ("torch", "onnx")


def onnx_cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "smear" / "onnx"


def export_module(module: torch.nn.Module, path: str | Path, input_size: int, opset: int = 17) -> Path:
    """A network taking N x 3 x S x S to ONNX with a dynamic batch axis (written atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    module = module.cpu().eval()
    x = torch.zeros(2, 3, input_size, input_size)
    torch.onnx.export(module, (x,), str(tmp), input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=opset,
                      dynamo=False)
    os.replace(tmp, path)
    return path


class OnnxLoadError(RuntimeError):
    """An ONNX file onnxruntime cannot load (truncated, damaged): the stage falls back to torch."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def quiet_onnxruntime():
    """onnxruntime, imported with its telemetry events off."""
    import onnxruntime as ort

    with contextlib.suppress(AttributeError):
        ort.disable_telemetry_events()
    return ort


def check_onnx(path: str | Path) -> Path:
    """``path`` if onnxruntime can load it, else OnnxLoadError."""
    ort = quiet_onnxruntime()
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise OnnxLoadError(f"{path}: cannot load the ONNX model ({_first_line(exc)})") from exc
    return Path(path)


def cached_onnx(path: Path, make) -> Path:
    """The cached ONNX file ``path``, made by ``make(path)`` when missing; a cached file that does not
    load (a cut write, a full disk) is deleted and made again once."""
    if path.is_file():
        try:
            return check_onnx(path)
        except OnnxLoadError:
            path.unlink(missing_ok=True)
    make(path)
    return check_onnx(path)


class OnnxNet:
    """An onnxruntime session behind the call signature of a torch module (tensor in, tensor out),
    so the stages' pre- and post-processing is the same code for both runtimes."""

    def __init__(self, path: str | Path, threads: int | None = None):
        ort = quiet_onnxruntime()

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or len(os.sched_getaffinity(0)))
        opts.inter_op_num_threads = 1
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise OnnxLoadError(f"{path}: cannot load the ONNX model ({_first_line(exc)})") from exc
        self.input = self.session.get_inputs()[0].name
        self.path = Path(path)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().float().cpu().numpy()
        return torch.from_numpy(np.asarray(self.session.run(None, {self.input: arr})[0]))

    def to(self, *_args: Any, **_kw: Any) -> OnnxNet:
        return self

    def eval(self) -> OnnxNet:
        return self


def onnx_for(model_dir: str | Path, stage: str, build_torch) -> Path:
    """The ONNX file of a model folder: its own ``model.onnx``, or one exported into the cache from
    ``build_torch()`` (a loaded torch network) on first use."""
    model_dir = Path(model_dir)
    own = model_dir / ONNX_NAME
    if own.is_file():
        return own
    meta = load_meta(model_dir)
    return cached_onnx(onnx_cache_dir() / f"{stage}-{model_version(model_dir)}.onnx",
                       lambda path: export_module(build_torch(), path, int(meta["input_size"])))


def load_network(model_dir: str | Path, stage: str, build_torch, runtime: str = "torch"):
    """The stage's network: ``build_torch()`` (torch weights loaded), or with ``runtime='onnx'`` an
    ``OnnxNet`` on the folder's ONNX file (exported from ``build_torch()`` on first use)."""
    if check_runtime(runtime) == "onnx":
        return OnnxNet(onnx_for(model_dir, stage, build_torch))
    return build_torch()


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        from smear.types import ConfigError

        raise ConfigError(f"runtime: {runtime!r} is not one of {', '.join(RUNTIMES)}")
    return runtime


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
    import shutil

    model_dir, out = Path(model_dir), Path(out)
    check_export_target(model_dir, out, force)
    out.mkdir(parents=True, exist_ok=True)
    for src in sorted(model_dir.iterdir()):
        if src.is_file() and src.name != ONNX_NAME and not src.name.endswith(".tmp"):
            dest = out / src.name
            if dest.is_symlink() or dest.is_dir():
                raise ModelError(f"{dest}: is a link or a folder; refusing to replace it")
            shutil.copyfile(src, dest)
    meta = load_meta(out)
    if stage == "detector":
        from smear.detect.ultra import export_onnx

        infer = meta.get("infer", {})
        export_onnx(out / meta["weights"], out / ONNX_NAME, int(infer.get("imgsz", 416)), int(infer.get("batch", 8)))
    elif stage == "classifier":
        from smear.classify.model import CnnClassifier

        export_module(CnnClassifier.from_dir(out, device="cpu").model, out / ONNX_NAME, int(meta["input_size"]))
    elif stage == "segmenter":
        from smear.segment.model import UnetSegmenter

        export_module(UnetSegmenter.from_dir(out, device="cpu").model, out / ONNX_NAME, int(meta["input_size"]))
    else:
        raise ModelError(f"unknown stage {stage!r}: detector, classifier or segmenter")
    return out / ONNX_NAME

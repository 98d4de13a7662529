"""ONNX: exporting our torch networks and running them with onnxruntime (``runtime: onnx``).

A model folder may hold ``model.onnx`` beside its torch weights (``smear export`` writes one). When
it does not, the ONNX file is made on first use from the torch weights into the cache
(``~/.cache/smear/onnx/<stage>-<weights hash>.onnx``) and reused from there: nothing is
downloaded, and the shipped package stays within its size budget.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smear.artifacts import ModelMeta, cache_dir
from smear.devices import available_cores
from smear.io import atomic_path
from smear.errors import ConfigError

ONNX_NAME = "model.onnx"
RUNTIMES = ("torch", "onnx")


def onnx_cache_dir() -> Path:
    """Where ONNX files made from torch weights are kept."""
    return cache_dir("onnx")


def export_module(module: torch.nn.Module, path: str | Path, input_size: int, opset: int = 17) -> Path:
    """A network taking N x 3 x S x S to ONNX with a dynamic batch axis (written atomically)."""
    path = Path(path)
    module = module.cpu().eval()
    x = torch.zeros(2, 3, input_size, input_size)
    with atomic_path(path) as tmp:
        torch.onnx.export(module, (x,), str(tmp), input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=opset,
                          dynamo=False)
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
        opts.intra_op_num_threads = int(threads or available_cores())
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


def onnx_for(meta: ModelMeta, stage: str, build_torch) -> Path:
    """The ONNX file of a model folder: its own ``model.onnx``, or one exported into the cache from
    ``build_torch()`` (a loaded torch network) on first use."""
    own = meta.folder / ONNX_NAME
    if own.is_file():
        return own
    return cached_onnx(onnx_cache_dir() / f"{stage}-{meta.version}.onnx",
                       lambda path: export_module(build_torch(), path, int(meta.input_size or 0)))


def load_network(meta: ModelMeta, stage: str, build_torch, runtime: str = "torch"):
    """The stage's network: ``build_torch()`` (torch weights loaded), or with ``runtime='onnx'`` an
    ``OnnxNet`` on the folder's ONNX file (exported from ``build_torch()`` on first use)."""
    if check_runtime(runtime) == "onnx":
        return OnnxNet(onnx_for(meta, stage, build_torch))
    return build_torch()


def check_runtime(runtime: str) -> str:
    """``runtime`` if it is one of RUNTIMES, else ConfigError."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime: {runtime!r} is not one of {', '.join(RUNTIMES)}")
    return runtime

"""ONNX: exporting our torch networks and running them with onnxruntime (``runtime: onnx``).

A model folder may hold ``model.onnx`` beside its torch weights (``smear export`` writes one). When
it does not, the ONNX file is made on first use from the torch weights into the cache
(``~/.cache/smear/onnx/<stage>-<hash of weights and meta>.onnx``) and reused from there: nothing is
downloaded, and the shipped package stays within its size budget.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np

from smear.artifacts import ONNX_FILE, ModelMeta, cache_dir
from smear.devices import default_threads
from smear.io import atomic_path
from smear.nn.runtime import check_runtime

ONNX_NAME = ONNX_FILE


def onnx_cache_dir() -> Path:
    """Where ONNX files made from torch weights are kept."""
    return cache_dir("onnx")


def export_module(module, path: str | Path, input_size: int, opset: int = 17) -> Path:
    """A network taking N x 3 x S x S to ONNX with a dynamic batch axis (written atomically)."""
    import torch

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
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # a load check, not a run
    try:
        ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
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
    """A network run by onnxruntime or OpenVINO (``smear.nn.runtime``) behind the call signature of a
    torch module (tensor in, tensor out), so torch-based pre- and post-processing runs unchanged; code
    without torch calls ``run`` on numpy arrays."""

    def __init__(self, path: str | Path, threads: int | None = None, runtime: str = "onnx"):
        from smear.nn.runtime import open_net

        try:
            self.net = open_net(Path(path), runtime, threads or default_threads())
        except Exception as exc:  # noqa: BLE001 - onnxruntime/OpenVINO raise their own exception types
            raise OnnxLoadError(f"{path}: cannot load the model ({_first_line(exc)})") from exc
        self.path, self.runtime = Path(path), runtime

    @property
    def session(self):
        return getattr(self.net, "session", None)

    def run(self, x: np.ndarray) -> np.ndarray:
        """The network on a float32 numpy batch (no torch)."""
        return self.net.run(x)

    def __call__(self, x):
        import torch

        return torch.from_numpy(self.run(x.detach().float().cpu().numpy()))

    def to(self, *_args: Any, **_kw: Any) -> OnnxNet:
        return self

    def eval(self) -> OnnxNet:
        return self


def _files(meta: ModelMeta) -> str:
    """``meta.files``, the id of the folder's runtime files that keys the ONNX cache (a meta read by
    ``load_model``: the folder is not read again here)."""
    if not meta.files:
        raise ValueError(f"{meta.folder}: a meta without its files' hashes (read it with smear.artifacts.load_model)")
    return meta.files


def onnx_for(meta: ModelMeta, stage: str, build_torch) -> Path:
    """The ONNX file of a model folder (``meta``: its meta, read already): its own ``model.onnx``, or
    one exported into the cache from ``build_torch()`` (a loaded torch network) on first use."""
    own = meta.folder / ONNX_NAME
    if own.is_file():
        return own
    # keyed by the weights and meta.json: a new input size or class count is a new export, not a stale graph
    return cached_onnx(onnx_cache_dir() / f"{stage}-{_files(meta)}.onnx",
                       lambda path: export_module(build_torch(), path, int(meta.input_size)))


def load_network(meta: ModelMeta, stage: str, build_torch, runtime: str = "torch", calibration=None):
    """The stage's network (``meta``: its model folder's meta, read already): ``build_torch()`` (torch
    weights loaded), or for any other runtime an ``OnnxNet`` on the folder's ONNX file (exported from
    ``build_torch()`` on first use), converted or quantised as ``runtime`` asks (``smear.nn.runtime``;
    ``calibration``: the INT8 runtimes' samples, without which they run the same runtime in fp32)."""
    from smear.nn.runtime import INT8_RUNTIMES, runtime_model

    if check_runtime(runtime) == "torch":
        return build_torch()
    if runtime in INT8_RUNTIMES and calibration is None:
        runtime = runtime.removesuffix("-int8")
    fp32 = onnx_for(meta, stage, build_torch)
    # the head after the global pool (features and logits, read by the novelty score and the
    # calibrated probabilities) stays fp32: quantised with the body, every cell was scored novel
    key = f"{stage}-{_files(meta)}" + ("-head32" if runtime == "onnx-int8" else "")
    path = runtime_model(fp32, runtime, key, calibration, exclude_onnx=after_last_pool)
    return OnnxNet(path, runtime=runtime)


def after_last_pool(onnx_path: str | Path) -> list[str]:
    """Names of the nodes after a classifier's last global pooling (its head), in graph order."""
    import onnx

    nodes = list(onnx.load(str(onnx_path), load_external_data=False).graph.node)
    pools = [i for i, n in enumerate(nodes) if n.op_type in ("GlobalAveragePool", "ReduceMean", "GlobalMaxPool")]
    return [n.name for n in nodes[pools[-1] + 1:]] if pools else []

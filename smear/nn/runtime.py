"""Runtimes that run an exported network without torch: onnxruntime and OpenVINO, fp32 or INT8.

``runtime:`` in the pipeline config picks one of RUNTIMES. Every runtime but ``torch`` starts
from the model's fp32 ONNX file (``smear.nn.onnx``):

- ``onnx``: that file, run by onnxruntime;
- ``onnx-int8``: its static INT8 quantisation by onnxruntime (QDQ, per-channel weights);
- ``openvino``: the same graph converted to OpenVINO IR (fp32, ``pip install "smear[openvino]"``);
- ``openvino-int8``: NNCF's post-training quantisation of that IR.

The INT8 models are calibrated on training data only (the stage supplies the batches) and built
on first use into the cache: each is a folder ``<cache>/int8/<stage>-<weights hash>-<runtime>-
<recipe>/`` holding the model and ``manifest.json`` with every file's SHA-256. The folder is built
aside and renamed into place (atomic); a folder whose files do not match their manifest is
removed and built again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from smear.errors import ConfigError, ModelError

RUNTIMES = ("onnx", "onnx-int8", "openvino", "openvino-int8", "torch")
INT8_RUNTIMES = ("onnx-int8", "openvino-int8")
MANIFEST = "manifest.json"
#: bump when the way an INT8 model is made changes (calibration size, quantiser settings): a new cache entry
RECIPE = "r2"  # r2: the detector records its score shift (onnx_yolo.score_shift)


class RuntimeUnavailable(RuntimeError):
    """A runtime that cannot run here (its package missing, no calibration data): the stage falls back."""


def check_runtime(runtime: str) -> str:
    """``runtime`` if it is one of RUNTIMES, else ConfigError."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime: {runtime!r} is not one of {', '.join(RUNTIMES)}")
    return runtime


def int8_cache_dir() -> Path:
    """Where the INT8 and OpenVINO models built from ONNX files are kept."""
    from smear.artifacts import cache_dir

    return cache_dir("int8")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verified(folder: Path) -> bool:
    """Whether ``folder`` holds a manifest whose files are all there with their SHA-256."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        return bool(files) and all(_sha256(folder / name) == digest for name, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def cached_build(folder: Path, build: Callable[[Path], dict[str, Any]]) -> Path:
    """The cache folder ``folder``, made by ``build(tmp)`` (which writes its files into ``tmp`` and
    returns what the manifest should record) when missing or when its files fail their checksums."""
    if folder.is_dir():
        if verified(folder):
            return folder
        shutil.rmtree(folder, ignore_errors=True)  # a damaged or half-copied entry: made again
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp", dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the cache from the user's other accounts/containers
    try:
        info = build(tmp)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({**info, "files": files}, indent=1, default=str) + "\n")
        try:
            os.rename(tmp, folder)  # atomic; fails if another process got there first
        except OSError:
            if not verified(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


@dataclass(frozen=True)
class Calibration:
    """The samples an INT8 model is calibrated on: their names (cheap: they key the cache) and
    ``batches()``, the network inputs made from them (read only when a model is built)."""

    names: tuple[str, ...]
    batches: Callable[[], list[np.ndarray]]

    @property
    def key(self) -> str:
        """A short id of the samples (their names, in order), part of an INT8 model's cache key."""
        return hashlib.sha256("\n".join(self.names).encode()).hexdigest()[:8]


# ---------------------------------------------------------------- running


def quiet_onnxruntime():
    """onnxruntime, imported with its telemetry events off."""
    import onnxruntime as ort

    try:
        ort.disable_telemetry_events()
    except AttributeError:
        pass
    return ort


class OrtNet:
    """An onnxruntime session: N x 3 x H x W float32 in, the first output (float32) out."""

    def __init__(self, path: str | Path, threads: int | None = None):
        from smear.devices import default_threads

        ort = quiet_onnxruntime()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or default_threads())
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ModelError(f"{path}: cannot load the ONNX model ({_first_line(exc)})") from exc
        self.input = self.session.get_inputs()[0].name
        self.path = Path(path)

    def run(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input: np.ascontiguousarray(x, np.float32)})[0])


class OvNet:
    """An OpenVINO model compiled for the CPU: N x 3 x H x W float32 in, the first output out."""

    def __init__(self, xml: str | Path, threads: int | None = None):
        from smear.devices import default_threads

        ov = openvino()
        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": int(threads or default_threads()), "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": "f32"}  # no bf16/fp16 on CPUs that have it: fp32 as exported
        try:
            self.compiled = core.compile_model(core.read_model(str(xml)), "CPU", config)
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises its own exception types
            raise ModelError(f"{xml}: cannot load the OpenVINO model ({_first_line(exc)})") from exc
        self.request = self.compiled.create_infer_request()
        self.path = Path(xml)

    def run(self, x: np.ndarray) -> np.ndarray:
        out = self.request.infer({0: np.ascontiguousarray(x, np.float32)})
        return np.array(out[self.compiled.output(0)])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def no_telemetry() -> None:
    """Turn off openvino-telemetry before openvino or nncf is imported: both send usage events to a
    web analytics service unless the user opted out (``import openvino`` sends one, through its model
    conversion tools); smear opens no connection, so here every consent check answers "declined"
    and the senders do nothing."""
    try:
        import openvino_telemetry
        from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker
    except ImportError:
        return

    def declined(self, *args, **kwargs):
        return ConsentCheckResult.DECLINED

    def nothing(self, *args, **kwargs):
        return None

    OptInChecker.check = declined
    for name in ("send_event", "send_error", "send_stack_trace", "start_session", "end_session", "force_shutdown"):
        if hasattr(openvino_telemetry.Telemetry, name):
            setattr(openvino_telemetry.Telemetry, name, nothing)


def openvino():
    """The openvino module (its telemetry off), or RuntimeUnavailable naming the extra that installs it."""
    no_telemetry()
    try:
        import openvino as ov
    except ImportError as exc:
        raise RuntimeUnavailable('openvino is not installed (pip install "smear[openvino]")') from exc
    return ov


# ---------------------------------------------------------------- building


def quantize_onnx(src: Path, dest: Path, batches: Iterable[np.ndarray], exclude: Sequence[str] = ()) -> None:
    """Static INT8 quantisation of the ONNX file ``src`` into ``dest`` (onnxruntime, QDQ format:
    uint8 activations, per-channel int8 weights with the reduced range AVX2 needs), its activation
    ranges calibrated on ``batches``; nodes named in ``exclude`` stay fp32."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, name: str):
            self.name, self.it = name, iter(batches)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {self.name: np.ascontiguousarray(x, np.float32)}

    import onnx

    name = onnx.load(str(src), load_external_data=False).graph.input[0].name
    pre = dest.with_name(dest.stem + ".pre.onnx")
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    except Exception:  # noqa: BLE001 - pre-processing is an optimisation; quantise the original then
        shutil.copyfile(src, pre)
    try:
        quantize_static(str(pre), str(dest), Reader(name), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=list(exclude), extra_options={"CalibMovingAverage": False})
    finally:
        pre.unlink(missing_ok=True)
        for extra in dest.parent.glob("*.data"):
            extra.unlink(missing_ok=True)


def to_openvino(src: Path, dest_xml: Path, batches: Iterable[np.ndarray] | None = None,
                ignored: dict[str, Any] | None = None, subset: int = 300) -> None:
    """The ONNX file ``src`` as OpenVINO IR at ``dest_xml`` (+ .bin): fp32 when ``batches`` is None,
    else NNCF's post-training INT8 quantisation calibrated on them (``ignored``: NNCF IgnoredScope
    keyword arguments, the nodes kept fp32)."""
    ov = openvino()
    model = ov.Core().read_model(str(src))  # the ONNX front end (not the conversion tool)
    if batches is not None:
        try:
            import nncf
        except ImportError as exc:
            raise RuntimeUnavailable('nncf is not installed (pip install "smear[openvino]")') from exc
        import contextlib
        import logging
        import sys

        data = [np.ascontiguousarray(x, np.float32) for x in batches]
        logging.getLogger("nncf").setLevel(logging.WARNING)  # not a line per node it leaves fp32
        with contextlib.redirect_stdout(sys.stderr):  # its progress bar: stdout carries the reports
            model = nncf.quantize(model, nncf.Dataset(data), preset=nncf.QuantizationPreset.MIXED,
                                  subset_size=min(subset, len(data)),
                                  ignored_scope=nncf.IgnoredScope(**(ignored or {}), validate=False))
    ov.save_model(model, str(dest_xml), compress_to_fp16=False)


def runtime_model(fp32_onnx: Path, runtime: str, key: str, calibration: Callable[[], Calibration] | None = None,
                  exclude_onnx: Callable[[Path], Sequence[str]] | None = None,
                  ignored_openvino: dict[str, Any] | None = None,
                  tune: Callable[[Path, list[np.ndarray]], dict[str, Any]] | None = None) -> Path:
    """The file a non-torch ``runtime`` runs, built on first use from ``fp32_onnx`` into the cache
    (``key``: the stage and its weights' hash). ``calibration()`` gives the INT8 runtimes their
    batches and a name for them; ``exclude_onnx(path)`` names ONNX nodes onnxruntime leaves fp32;
    ``tune(model, batches)``, after an INT8 build, returns what the manifest also records (read back
    with ``manifest_of``)."""
    check_runtime(runtime)
    if runtime == "onnx":
        return fp32_onnx
    if runtime.startswith("openvino"):
        openvino()  # the extra is missing: fall back before any work
    int8 = runtime in INT8_RUNTIMES
    if int8 and calibration is None:
        raise RuntimeUnavailable(f"runtime {runtime}: this stage has no calibration data")
    # calibration() raises RuntimeUnavailable when the training data it needs is absent
    calib = calibration() if int8 else None
    name = f"{key}-{runtime}" + (f"-{RECIPE}-{calib.key}" if calib else "")

    def build(tmp: Path) -> dict[str, Any]:
        info: dict[str, Any] = {"source": fp32_onnx.name, "source_sha256": _sha256(fp32_onnx), "runtime": runtime}
        batches = calib.batches() if calib else []
        if calib:
            if not batches:
                raise RuntimeUnavailable(f"runtime {runtime}: no calibration samples")
            info.update(recipe=RECIPE, calibration=calib.key, samples=int(sum(len(b) for b in batches)),
                        sample_names=list(calib.names))
        if runtime == "onnx-int8":
            exclude = list(exclude_onnx(fp32_onnx)) if exclude_onnx else []
            quantize_onnx(fp32_onnx, tmp / "model.onnx", batches, exclude)
            info["excluded_nodes"] = exclude
        else:
            to_openvino(fp32_onnx, tmp / "model.xml", batches if calib else None, ignored_openvino)
        if calib and tune is not None:
            info.update(tune(tmp / ("model.onnx" if runtime == "onnx-int8" else "model.xml"), batches))
        return info

    folder = cached_build(int8_cache_dir() / name, build)
    return folder / ("model.onnx" if runtime == "onnx-int8" else "model.xml")


def manifest_of(model: Path) -> dict[str, Any]:
    """What the manifest of the cache folder of a model ``runtime_model`` built records ({} for the
    fp32 ONNX file, which has none)."""
    path = model.parent / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def open_net(path: Path, runtime: str, threads: int | None = None):
    """A network (``.run(x) -> y`` on numpy arrays) on the file ``runtime_model`` gave."""
    return OvNet(path, threads) if runtime.startswith("openvino") else OrtNet(path, threads)

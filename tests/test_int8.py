"""The runtimes past torch: INT8 (onnxruntime QDQ, OpenVINO+NNCF) and OpenVINO fp32, their cache,
calibration on training data only, fallbacks, and the torch-free detector's agreement with ultralytics."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hostile import NO_NETWORK_PRELUDE

from smear.nn.runtime import MANIFEST, Calibration, RuntimeUnavailable, runtime_model, verified

ROOT = Path(__file__).resolve().parents[1]


def _tiny_onnx(tmp_path: Path) -> Path:
    import torch

    from smear.nn.onnx import export_module

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, stride=2),
                              torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))
    return export_module(net, tmp_path / "tiny.onnx", 16)


def _calibration(n: int = 4, seed: int = 0) -> Calibration:
    rng = np.random.default_rng(seed)
    data = [rng.random((8, 3, 16, 16), dtype=np.float32) for _ in range(n)]
    return Calibration(tuple(f"train/{i}.png" for i in range(n)), lambda: data)


def test_onnx_int8_is_built_once_checksummed_and_close_to_fp32(tmp_path, monkeypatch):
    from smear.nn.runtime import OrtNet

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    fp32 = _tiny_onnx(tmp_path)
    calls = []

    def calib():
        calls.append(1)
        return _calibration()

    path = runtime_model(fp32, "onnx-int8", "tiny-abc", calib)
    assert path.parent.parent == tmp_path / "xdg" / "smear" / "int8" and path.name == "model.onnx"
    manifest = json.loads((path.parent / MANIFEST).read_text())
    assert manifest["samples"] == 32 and manifest["source_sha256"] and set(manifest["files"]) == {"model.onnx"}
    assert verified(path.parent)
    x = np.random.default_rng(1).random((8, 3, 16, 16), dtype=np.float32)
    a, b = OrtNet(fp32).run(x), OrtNet(path).run(x)
    assert a.shape == b.shape == (8, 4)
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max() + 0.02  # INT8 tracks fp32 on a tiny net
    ops = {n.op_type for n in __import__("onnx").load(str(path)).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    mtime = path.stat().st_mtime_ns
    assert runtime_model(fp32, "onnx-int8", "tiny-abc", calib) == path and path.stat().st_mtime_ns == mtime  # reused
    # other calibration samples: another entry, not the stale one
    other = runtime_model(fp32, "onnx-int8", "tiny-abc", lambda: _calibration(3, 1))
    assert other != path
    # a damaged file fails its checksum: the entry is made again
    path.write_bytes(path.read_bytes()[:100])
    assert not verified(path.parent)
    again = runtime_model(fp32, "onnx-int8", "tiny-abc", calib)
    assert again == path and verified(path.parent) and np.abs(OrtNet(again).run(x) - b).max() < 1e-6
    assert not list(path.parent.parent.glob("*.tmp*"))  # no scratch folder left behind


def test_a_classifier_head_after_its_pool_stays_fp32(tmp_path):
    """The nodes after the last global pool (features, logits, their concat) are left out of INT8."""
    import onnx

    from smear.nn.onnx import after_last_pool

    fp32 = _tiny_onnx(tmp_path)
    head = after_last_pool(fp32)
    ops = {n.name: n.op_type for n in onnx.load(str(fp32)).graph.node}
    assert head and [ops[n] for n in head][-1] == "Gemm" and "Conv" not in [ops[n] for n in head]


def test_int8_needs_calibration_and_openvino_needs_its_extra(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    fp32 = _tiny_onnx(tmp_path)
    with pytest.raises(RuntimeUnavailable, match="calibration"):
        runtime_model(fp32, "onnx-int8", "tiny", None)
    with pytest.raises(RuntimeUnavailable, match="no calibration samples"):
        runtime_model(fp32, "onnx-int8", "tiny", lambda: Calibration(("a",), lambda: []))
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    with pytest.raises(RuntimeUnavailable, match=r"smear\[openvino\]"):
        runtime_model(fp32, "openvino", "tiny")
    assert runtime_model(fp32, "onnx", "tiny") == fp32


def test_openvino_fp32_and_int8_track_onnx(tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from smear.nn.runtime import OrtNet, OvNet

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    fp32 = _tiny_onnx(tmp_path)
    x = np.random.default_rng(2).random((8, 3, 16, 16), dtype=np.float32)
    ref = OrtNet(fp32).run(x)
    xml = runtime_model(fp32, "openvino", "tiny")
    assert xml.name == "model.xml" and (xml.parent / "model.bin").is_file() and verified(xml.parent)
    assert np.abs(OvNet(xml).run(x) - ref).max() < 1e-4
    q = runtime_model(fp32, "openvino-int8", "tiny", _calibration)
    assert q.parent != xml.parent and np.abs(OvNet(q).run(x) - ref).max() < 0.05 * np.abs(ref).max() + 0.02


def test_fallback_warns_once_and_runs_fp32_onnx(caplog):
    from smear.config import default_config
    from smear.pipeline.build import _with_fallback

    calls = []

    def load(rt):
        calls.append(rt)
        if rt != "onnx":
            raise RuntimeUnavailable('openvino is not installed (pip install "smear[openvino]")')
        return rt

    warned: set[str] = set()
    with caplog.at_level(logging.WARNING, logger="smear"):
        cfg = default_config("pipeline").model_copy(update={"runtime": "openvino-int8"})
        assert _with_fallback(cfg, load, warned) == "onnx"
        assert _with_fallback(cfg, load, warned) == "onnx"  # second stage: no new warning
    record = [r for r in caplog.records if "using onnx" in r.getMessage()]
    assert len(record) == 1 and calls == ["openvino-int8", "onnx"] * 2


def test_calibration_uses_training_data_only(tmp_path):
    """Detector: BCCD train and TXL-PBC train fields only; classifier: PBC's training split only."""
    from smear.classify.data import load_items, stratified_split
    from smear.classify.int8 import training_items
    from smear.pipeline.build import calibration_root, classifier_calibration, detector_calibration

    root = tmp_path / "data"
    for d in ("bccd/train/images", "bccd/test/images", "txl-pbc/images/train", "txl-pbc/images/test",
              "txl-pbc/images/val"):
        (root / d).mkdir(parents=True)
        for i in range(3):
            (root / d / f"{d.replace('/', '_')}_{i}.png").write_bytes(b"x")
    fields = detector_calibration(str(root))
    assert len(fields) == 6 and all("train" in p.name and "test" not in p.name for p in fields)
    assert detector_calibration(str(tmp_path / "none")) is None
    assert calibration_root(str(tmp_path / "none")) is None
    # a PBC-like folder: group folders of PREFIX_id files
    from smear.io import write_image_atomic

    pbc = root / "pbc"
    for group, prefix in (("neutrophil", "SNE"), ("lymphocyte", "LY"), ("eosinophil", "EO")):
        for i in range(20):
            write_image_atomic(pbc / group / f"{prefix}_{i}.jpg", np.full((8, 8, 3), 100, np.uint8))
    assert classifier_calibration(str(root)) == pbc
    train = {it.path for it in training_items(pbc)}
    _, val, test = stratified_split(load_items(pbc, "pbc"), (0.7, 0.15, 0.15), 0)
    assert train and not train & {it.path for it in val + test}


@pytest.mark.realdata
def test_real_calibration_sets_are_training_splits():
    from smear.classify.data import load_items, stratified_split
    from smear.classify.int8 import training_items
    from smear.pipeline.build import detector_calibration

    data = ROOT.parent / "shared" / "data"
    if not (data / "pbc").is_dir() or not (data / "bccd").is_dir():
        pytest.skip("../shared/data (PBC, BCCD) absent")
    fields = detector_calibration(str(data))
    test_names = {p.name for p in (data / "bccd" / "test" / "images").iterdir()}
    test_names |= {p.name for p in (data / "txl-pbc" / "images" / "test").iterdir()}
    assert fields and not {p.name for p in fields} & test_names
    test = {it.path for it in stratified_split(load_items(data / "pbc", "pbc"), (0.7, 0.15, 0.15), 0)[2]}
    assert not {it.path for it in training_items(data / "pbc")} & test


def test_numpy_letterbox_and_nms_match_ultralytics():
    torch = pytest.importorskip("torch")
    from ultralytics.data.augment import LetterBox
    from ultralytics.utils.nms import non_max_suppression

    from smear.detect.onnx_yolo import letterbox, postprocess

    rng = np.random.default_rng(0)
    for shape, auto in (((480, 640, 3), True), ((300, 301, 3), False), ((97, 33, 3), True)):
        im = rng.integers(0, 255, shape, dtype=np.uint8)
        assert np.array_equal(letterbox(im, (96, 96), auto), LetterBox((96, 96), auto=auto, stride=32)(image=im))
    pred = np.concatenate([rng.random((2, 2, 500)) * 90, rng.random((2, 2, 500)) * 30 + 2,
                           rng.random((2, 3, 500)) ** 3], 1).astype(np.float32)
    ours = postprocess(pred, 0.25, 0.5, 40)
    theirs = non_max_suppression(torch.from_numpy(pred), 0.25, 0.5, max_det=40)
    for a, b in zip(ours, theirs):
        assert a.shape == tuple(b.shape) and np.allclose(a, b.numpy(), atol=1e-4)


@pytest.mark.slow
def test_torch_free_detector_matches_ultralytics_onnx(tmp_path, monkeypatch):
    from smear.artifacts import ModelMeta, save_model_dir
    from smear.detect.onnx_yolo import NetYoloDetector
    from smear.detect.network import NETWORK, WEIGHTS, build_network, save_network, yolo
    from smear.detect.settings import YoloSettings
    from smear.detect.yolo import YoloDetector, onnx_weights

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder = tmp_path / "det"
    folder.mkdir()
    save_network(build_network(dict(yolo("yolo11n.yaml").model.yaml, nc=3), 3), folder)
    infer = {"imgsz": 64, "conf": 0.0, "iou": 0.5, "max_det": 30, "border": 8.0}  # untrained: low scores
    save_model_dir(ModelMeta.of({"stage": "detect", "weights": WEIGHTS, "network": NETWORK,
                                 "classes": ["wbc", "rbc", "platelet"], "infer": infer}, folder), {"model": "tiny"})
    new = YoloDetector.from_dir(folder, runtime="onnx", batch=2)
    assert isinstance(new, NetYoloDetector)
    old = YoloDetector(onnx_weights(folder, 64, 2), YoloSettings.of(infer | {"batch": 2}), device="cpu")
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 255, s, dtype=np.uint8) for s in ((48, 80, 3), (48, 80, 3), (70, 50, 3))]
    a, b = new.detect(images), old.detect(images)
    assert sum(map(len, a)) > 0
    for x, y in zip(a, b):
        assert [d.kind for d in x] == [d.kind for d in y]
        assert np.allclose([d.box_xyxy for d in x], [d.box_xyxy for d in y], atol=1e-3) if x else not y
        assert np.allclose([d.score for d in x], [d.score for d in y], atol=1e-5) if x else True


@pytest.mark.slow
def test_an_onnx_run_imports_neither_torch_nor_ultralytics(tmp_path):
    """Start-up: `smear run` on ONNX (once exported) loads no torch, ultralytics or scipy.stats."""
    import os

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg"), "PYTHONPATH": str(ROOT)}
    code = ("import sys\nfrom smear.cli.app import main\n"
            f"sys.argv = ['smear', 'run', {str(ROOT / 'examples' / 'slide_demo')!r}, '--set', 'cache_dir=off']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('LOADED', sorted(m for m in ('torch', 'ultralytics', 'scipy.stats', 'pandas') if m in sys.modules))")
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert "LOADED" in first.stdout, first.stderr[-2000:]
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert "LOADED []" in second.stdout, second.stdout[-500:] + second.stderr[-2000:]
    assert second.stdout.split("LOADED")[0] == first.stdout.split("LOADED")[0]  # the same report


_AUDITED_OPENVINO = NO_NETWORK_PRELUDE + """
import numpy as np
from pathlib import Path
from smear.nn.runtime import Calibration, OvNet, runtime_model
data = [np.random.default_rng(0).random((4, 3, 16, 16), dtype=np.float32)]
xml = runtime_model(Path(sys.argv[1]), "openvino-int8", "tiny", lambda: Calibration(("a",), lambda: data))
print("OUT", OvNet(xml).run(data[0]).shape)
"""


@pytest.mark.slow
def test_openvino_and_nncf_send_no_telemetry(tmp_path):
    """openvino and nncf send usage events unless opted out: under smear they open no connection."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    import os

    fp32 = _tiny_onnx(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path)}
    for var in ("CI", "NNCF_CI", "TF_BUILD", "JENKINS_URL"):  # a user's machine, where telemetry would be on
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-c", _AUDITED_OPENVINO, str(fp32)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "OUT (4, 4)" in proc.stdout, proc.stderr[-3000:]
    assert "network connection" not in proc.stderr and "DNS lookup" not in proc.stderr


def test_int8_score_shift_is_the_median_change_near_each_threshold():
    """The INT8 detector's thresholds follow the median change of the scores near them (same box in
    fp32 and INT8, training fields only); far boxes, other classes' boxes and a class with too few
    pairs move nothing."""
    from smear.detect.onnx_yolo import SHIFT_MIN_PAIRS, score_shift

    rng = np.random.default_rng(0)
    fp32, int8 = [], []
    for _ in range(SHIFT_MIN_PAIRS):
        box = rng.uniform(0, 100, 2).tolist()
        box = box + [box[0] + 20, box[1] + 20]
        near = [*box, 0.40, 1]                   # class 1 near its 0.38 threshold: INT8 takes 0.03 off
        far = [b + 200 for b in box] + [0.90, 1]  # far from it: INT8 takes 0.2 off, not counted
        few = [b + 400 for b in box] + [0.30, 2]  # class 2 near its 0.33 threshold: a shift of its own
        fp32.append(np.array([near, far, few], np.float32))
        int8.append(np.array([[*box, 0.37, 1], [*far[:4], 0.70, 1], [*few[:4], 0.10, 2]], np.float32))
    shift = score_shift(fp32, int8, {1: 0.38, 2: 0.33})
    assert shift[1] == pytest.approx(-0.03, abs=1e-6) and shift[2] == pytest.approx(-0.2, abs=1e-6)
    shift = score_shift(fp32[:SHIFT_MIN_PAIRS - 1], int8[:SHIFT_MIN_PAIRS - 1], {1: 0.38, 2: 0.33})
    assert shift == {1: 0.0, 2: 0.0}  # under SHIFT_MIN_PAIRS pairs: no shift
    moved = [np.array([[b[0] + 50, *b[1:]] for b in im], np.float32) for im in int8]
    assert score_shift(fp32, moved, {1: 0.38, 2: 0.33}) == {1: 0.0, 2: 0.0}  # no box pairs: no shift

"""The YOLO adapter on a tiny untrained model: model folder round trip, protocol, one training step."""

from __future__ import annotations

import json

import numpy as np
import pytest

from smear.artifacts import ModelMeta, load_meta, save_model_dir
from smear.errors import ModelError
from smear.types import Detection, Detector

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from smear.detect.network import yolo

    from smear.detect.network import NETWORK, WEIGHTS, build_network, save_network

    folder = tmp_path_factory.mktemp("det")
    save_network(build_network(dict(yolo("yolo11n.yaml").model.yaml, nc=3), 3), folder)
    save_model_dir(ModelMeta.of({"stage": "detect", "weights": WEIGHTS, "network": NETWORK,
                                 "classes": ["wbc", "rbc", "platelet"],
                                 "infer": {"imgsz": 64, "conf": 0.0, "iou": 0.5, "max_det": 50}}, folder), {"model": "tiny"})
    return folder


def test_model_folder_loads_and_detects(tiny_model_dir):
    import torch

    from smear.detect.yolo import YoloDetector

    det = YoloDetector.from_dir(tiny_model_dir, device="cpu")
    assert isinstance(det, Detector)
    images = [np.full((48, 80, 3), 200, np.uint8), np.zeros((30, 30, 3), np.uint8)]
    out1 = det.detect(images)
    out2 = YoloDetector.from_dir(tiny_model_dir, device="cpu").detect(images)
    assert len(out1) == 2
    assert out1 == out2  # save -> load gives identical outputs
    for dets, im in zip(out1, images):
        for d in dets:
            assert isinstance(d, Detection) and all(isinstance(v, float) for v in d.box_xyxy)
            assert -1 <= d.box_xyxy[0] <= d.box_xyxy[2] <= im.shape[1] + 1
    assert torch.get_num_threads() >= 1
    from smear.devices import default_threads
    assert torch.get_num_threads() == default_threads()  # restored after ultralytics (which sets 1)


def test_missing_weights_and_wrong_stage(tiny_model_dir, tmp_path):
    from smear.detect.yolo import YoloDetector

    meta = json.loads((tiny_model_dir / "meta.json").read_text())
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="weights file missing"):
        load_meta(broken)
    with pytest.raises(ModelError, match="model folder not found"):
        YoloDetector.from_dir(tmp_path / "nowhere")
    (broken / "detector.safetensors").write_bytes((tiny_model_dir / "detector.safetensors").read_bytes())
    (broken / "meta.json").write_text(json.dumps({**meta, "stage": "classify"}))
    with pytest.raises(ModelError, match="not a detector"):
        YoloDetector.from_dir(broken)


def test_border_is_put_round_the_field_and_taken_off_the_boxes(tiny_model_dir):
    """A gray border of ``border`` network px goes round each field; boxes come back in field px."""
    from types import SimpleNamespace

    import torch

    from smear.detect.yolo import YoloDetector
    from smear.taxonomy import CellKind

    det = YoloDetector.from_dir(tiny_model_dir, device="cpu", border=16)  # imgsz 64
    rng = np.random.default_rng(0)
    field = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
    px = 32  # 16 px at 64 px scale for a 128 px long side
    seen = []

    def predict(images, **kwargs):
        seen.extend(images)
        boxes = torch.tensor([[px + 10.0, px + 20.0, px + 30.0, px + 40.0],  # inside the field
                              [0.0, 0.0, px - 2.0, px - 2.0],                # in the border only
                              [px + 100.0, px + 80.0, px + 140.0, px + 110.0]])  # over the field's edge
        return [SimpleNamespace(boxes=SimpleNamespace(xyxy=boxes, cls=torch.tensor([0.0, 1.0, 2.0]),
                                                      conf=torch.tensor([0.9, 0.9, 0.9])))]

    det.model = SimpleNamespace(predict=predict)
    dets = det.detect([field])[0]
    shown = seen[0]
    assert shown.shape == (96 + 2 * px, 128 + 2 * px, 3)
    assert (shown[:px] == 114).all() and (shown[:, -px:] == 114).all()
    assert np.array_equal(shown[px:-px, px:-px], field[..., ::-1])  # the field itself, as BGR
    assert [(d.kind, d.box_xyxy) for d in dets] == [
        (CellKind.WBC, (10.0, 20.0, 30.0, 40.0)),
        (CellKind.PLATELET, (100.0, 80.0, 128.0, 96.0)),
    ]


def test_onnx_cache_is_keyed_by_input_shape(tiny_model_dir, tmp_path, monkeypatch):
    """The ONNX export has a fixed input: another imgsz (meta or --set) gets its own file, not a stale one."""
    from smear.detect.yolo import YoloDetector, onnx_weights

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    a = onnx_weights(tiny_model_dir, 64, 1)
    b = onnx_weights(tiny_model_dir, 96, 1)
    assert a != b and a.is_file() and b.is_file()
    assert onnx_weights(tiny_model_dir, 64, 1) == a  # reused
    det = YoloDetector.from_dir(tiny_model_dir, runtime="onnx", imgsz=96, batch=1)
    assert len(det.detect([np.full((80, 120, 3), 180, np.uint8)])) == 1

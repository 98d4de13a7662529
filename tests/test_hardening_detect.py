"""Hardening of the detector's model folder (smear/detect): its weights never run code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hostile import one_line_error, runner, slide
from smear.cli import app

EVAL_ACTIVATION = "__import__('os').system('touch {marker}') or __import__('torch').nn.SiLU()"


class _CallsDetectionModel:
    """Unpickles as ``ultralytics.nn.tasks.DetectionModel(cfg)``: an allowed layer class called
    with a config whose ``activation`` ultralytics evals (issue 22's payload)."""

    def __init__(self, cfg: dict):
        self.cfg = cfg

    def __reduce__(self):
        from ultralytics.nn.tasks import DetectionModel

        return (DetectionModel, (self.cfg,))


def _activation_detector(tmp_path: Path) -> tuple[Path, Path]:
    """A detector folder whose ``detector.pt`` runs ``touch MARKER`` when ultralytics builds it."""
    import torch

    from smear.artifacts import shipped_dir
    from smear.detect.ultra import ultralytics

    ul = ultralytics()
    folder, marker = tmp_path / "evil_detector", tmp_path / "PWNED"
    folder.mkdir()
    cfg = dict(ul.YOLO("yolo11n.yaml").model.yaml, nc=3)
    cfg["activation"] = EVAL_ACTIVATION.format(marker=marker)
    torch.save({"model": _CallsDetectionModel(cfg), "train_args": {}, "ema": None}, folder / "detector.pt")
    meta = json.loads((shipped_dir("detector") / "meta.json").read_text())
    meta["weights"] = "detector.pt"
    (folder / "meta.json").write_text(json.dumps(meta))
    assert not marker.exists()  # building the payload ran nothing
    return folder, marker


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_a_detector_pt_calling_detection_model_with_an_eval_activation_runs_nothing(tmp_path, runtime):
    slide(tmp_path / "s", seeds=(1,))
    model, marker = _activation_detector(tmp_path)
    res = runner.invoke(app, ["run", str(tmp_path / "s"), "--set", f"detector_model={model}",
                              "--set", f"runtime={runtime}", "--set", "classifier=off", "--set", "cache_dir=off"])
    assert not marker.exists(), "the detector's .pt ran code"
    one_line_error(res, "detector.pt")


def test_a_network_yaml_with_an_activation_string_is_refused_unrun(tmp_path):
    """The network YAML beside safetensors weights is data too: an ``activation`` (which ultralytics
    would eval) or a layer that is not a torch or ultralytics layer class is refused by name."""
    import yaml

    from hostile import copy_model

    folder = copy_model("detector", tmp_path / "det")
    marker = tmp_path / "PWNED"
    slide(tmp_path / "s", seeds=(1,))
    net = yaml.safe_load((folder / "network.yaml").read_text())
    for key, value in (("activation", EVAL_ACTIVATION.format(marker=marker)),
                       ("head", net["head"][:-1] + [[[16, 19, 22], 1, "check_requirements", ["nc"]]])):
        (folder / "network.yaml").write_text(yaml.safe_dump({**net, key: value}))
        res = runner.invoke(app, ["run", str(tmp_path / "s"), "--set", f"detector_model={folder}",
                                  "--set", "runtime=torch", "--set", "classifier=off", "--set", "cache_dir=off"])
        one_line_error(res, "network.yaml", key)
        assert not marker.exists()


def test_the_shipped_detectors_hold_no_pickle():
    from smear.artifacts import load_meta, shipped_dir

    for name in ("detector", "detector_stain"):
        folder = shipped_dir(name)
        assert load_meta(folder)["weights"] == "detector.safetensors"
        assert not list(folder.glob("*.pt")) and (folder / "network.yaml").is_file()

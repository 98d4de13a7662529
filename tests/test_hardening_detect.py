"""Hardening of the detector (smear/detect): its model folder never runs code, and ultralytics stays
offline and never installs anything."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hostile import NO_NETWORK_PRELUDE, Payload, one_line_error, runner, slide
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
    from smear.detect.ultralytics_adapter import ultralytics

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


# ------------------------------------------------------------------ from issue 16's probe


def _evil_detector(tmp_path: Path) -> tuple[Path, Path]:

    import torch

    from smear.artifacts import shipped_dir

    folder, marker = tmp_path / "evil_detector", tmp_path / "PWNED"
    folder.mkdir()
    meta = json.loads((shipped_dir("detector") / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "weights": "detector.pt"}))
    torch.save({"model": Payload(marker), "train_args": {}}, folder / "detector.pt")
    return folder, marker


@pytest.mark.parametrize("command", [
    ["run", "{slide}", "--set", "detector_model={model}", "--set", "runtime=torch", "--set", "classifier=off"],
    ["run", "{slide}", "--set", "detector_model={model}", "--set", "runtime=onnx", "--set", "classifier=off"],
    ["eval", "detect", "--model", "{model}", "--data", "{slide}"],
])
def test_a_detector_pt_with_a_pickle_payload_is_refused_unrun(tmp_path, command):
    slide(tmp_path / "s", seeds=(1,))
    (tmp_path / "s" / "field_01.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    model, marker = _evil_detector(tmp_path)
    args = [a.format(slide=tmp_path / "s", model=model) for a in command]
    res = runner.invoke(app, args)
    one_line_error(res, "detector.pt", "refusing")
    assert not marker.exists()


def test_a_training_runs_pt_passes_the_pickle_check(tmp_path):
    from smear.artifacts import check_torch_file
    from smear.detect.network import yolo
    from smear.detect.ultralytics_adapter import allowed_global

    yolo("yolo11n.yaml").save(str(tmp_path / "best.pt"))
    check_torch_file(tmp_path / "best.pt", allowed_global)
    assert not allowed_global("ultralytics.nn.tasks", "torch_safe_load")  # a function, not a layer
    assert not allowed_global("torch", "load") and not allowed_global("builtins", "eval")


def test_a_detector_in_a_format_that_runs_code_is_refused(tmp_path):
    import shutil

    from smear.artifacts import shipped_dir

    folder = tmp_path / "ts_detector"
    folder.mkdir()
    meta = json.loads((shipped_dir("detector") / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "weights": "detector.torchscript"}))
    shutil.copyfile(shipped_dir("detector") / "detector.safetensors", folder / "detector.torchscript")
    res = runner.invoke(app, ["eval", "detect", "--model", str(folder), "--data", str(folder)])
    assert res.exit_code != 0
    res = runner.invoke(app, ["run", str(folder), "--set", f"detector_model={folder}", "--set", "runtime=torch"])
    one_line_error(res)


_AUDITED_RUN = NO_NETWORK_PRELUDE + """
from smear.cli import app
app(sys.argv[1:])
"""


@pytest.mark.slow
def test_the_pipeline_with_onnx_export_opens_no_connection(tmp_path):
    import subprocess
    import sys

    slide(tmp_path / "s", seeds=(1,))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "XDG_CACHE_HOME": str(tmp_path / "xdg"), "YOLO_OFFLINE": "0"}  # a user's environment that allows it
    env.pop("YOLO_CONFIG_DIR", None)
    proc = subprocess.run([sys.executable, "-c", _AUDITED_RUN, "run", str(tmp_path / "s"), "--report", "csv",
                           "--set", "runtime=onnx"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "network connection" not in proc.stderr and "DNS lookup" not in proc.stderr
    assert list((tmp_path / "xdg" / "smear" / "onnx").glob("*.onnx"))  # the first-use export did run


_ULTRALYTICS_SETTINGS = """
import os
from smear.detect.ultralytics_adapter import ultralytics
ultralytics()
import ultralytics.utils as u
import ultralytics.utils.checks as checks
from PIL import Image
def no_install(*args, **kwargs):
    raise SystemExit("ultralytics was asked to install " + repr(args))
checks.check_requirements = no_install
from smear.io import read_image
open("notimage.jpg", "w").write("this is not an image")
try:
    read_image("notimage.jpg")
except Exception as exc:
    print("refused:", exc)
print(os.environ["YOLO_OFFLINE"], os.environ["YOLO_AUTOINSTALL"], u.ONLINE, u.AUTOINSTALL)
"""


@pytest.mark.slow
def test_ultralytics_is_offline_and_never_installs_whatever_the_environment(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "YOLO_OFFLINE": "0",
           "YOLO_AUTOINSTALL": "true", "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    proc = subprocess.run([sys.executable, "-c", _ULTRALYTICS_SETTINGS], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused: " in proc.stdout and "not a readable image" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "1 false False False"


def test_an_unwritable_cache_home_does_not_stop_ultralytics(tmp_path, monkeypatch):
    from smear.detect.ultralytics_adapter import setup_offline

    blocked = tmp_path / "xdg_is_a_file"
    blocked.write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    monkeypatch.delenv("YOLO_CONFIG_DIR", raising=False)
    setup_offline()
    assert (Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics").is_dir()

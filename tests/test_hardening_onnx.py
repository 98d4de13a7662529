"""Hardening of the ONNX runtime (smear/nn/onnx.py): broken ONNX files fall back or are made again."""

from __future__ import annotations

from pathlib import Path

import logging

import pytest

from hostile import runner, slide
from smear.cli import app


def _truncate(path: Path, source: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(source.read_bytes()[:4096] if source.is_file() else b"\x08\x07onnx-cut")


@pytest.mark.slow
def test_truncated_cached_onnx_files_are_made_again(tmp_path, monkeypatch):
    from smear.artifacts import files_version, load_meta, shipped_dir
    from smear.nn.onnx import check_onnx, onnx_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    slide(tmp_path / "s", seeds=(1,))
    det, clf = shipped_dir("detector"), shipped_dir("classifier")
    infer = load_meta(det)["infer"]
    cut = [onnx_cache_dir() / f"detect-{files_version(det)}-{infer['imgsz']}px-b{infer['batch']}.onnx"]
    cut += [onnx_cache_dir() / f"{stage}-{files_version(clf)}.onnx" for stage in ("classify", "classify-feat")]
    for path in cut:
        _truncate(path, clf / "model.safetensors")
    res = runner.invoke(app, ["run", str(tmp_path / "s"), "--report", "csv", "--set", "runtime=onnx",
                              "--set", "cache_dir=off"])
    assert res.exit_code == 0, res.output
    check_onnx(cut[0])  # the detector's was made again

    def loads(path):
        try:
            return bool(check_onnx(path))
        except Exception:  # noqa: BLE001
            return False

    assert sum(loads(p) for p in cut[1:]) == 1  # and the classifier's one in use


def test_a_truncated_onnx_in_a_model_folder_falls_back_to_torch(tmp_path, caplog):
    import shutil

    from smear.artifacts import shipped_dir
    from smear.config import default_config
    from smear.pipeline.build import build_stages

    folder = tmp_path / "clf"
    shutil.copytree(shipped_dir("classifier"), folder)
    _truncate(folder / "model.onnx", folder / "model.safetensors")
    cfg = default_config("pipeline").model_copy(update={"detector": "classical", "classifier_model": str(folder),
                                                        "runtime": "onnx"})
    with caplog.at_level(logging.WARNING, logger="smear"):
        stages = build_stages(cfg)
    assert any("cannot load the ONNX model" in r.getMessage() for r in caplog.records)  # the run's logger says it
    assert stages.classifier is not None

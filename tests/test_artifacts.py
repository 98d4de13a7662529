"""Model folders and cache folders: the one loader (a frozen ModelMeta) and the one cache-folder function."""

from __future__ import annotations

import dataclasses
import json

import pytest

from smear.artifacts import ModelMeta, cache_dir, cache_setting, file_sha256, load_model, shipped_dir
from smear.errors import ModelError


def test_cache_dir_honours_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir("fields") == tmp_path / "xdg" / "smear" / "fields"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir("onnx") == tmp_path / "home" / ".cache" / "smear" / "onnx"


@pytest.mark.parametrize("setting", ["off", "OFF", False, "no", "false"])
def test_cache_off_never_becomes_a_folder_name(setting, tmp_path, monkeypatch):
    """The cause of the committed ``False/`` folder: a YAML ``off`` read as the boolean False."""
    monkeypatch.chdir(tmp_path)
    assert cache_setting(setting, "fields") is None
    from smear.config import load_config
    from smear.pipeline.build import build_cache

    assert build_cache(load_config("pipeline", None, [f"cache_dir={setting}"]), "v1") is None
    assert not any(tmp_path.iterdir())


def test_cache_setting_auto_and_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_setting("auto", "classify") == cache_setting(None, "classify") == tmp_path / "smear" / "classify"
    assert cache_setting(tmp_path / "mine", "classify") == tmp_path / "mine"


def test_load_model_gives_a_frozen_meta_and_names_a_wrong_stage(tmp_path):
    meta = load_model(shipped_dir("classifier"), "classify", required=("arch", "input_size"))
    assert isinstance(meta, ModelMeta) and meta.stage == "classify" and meta.input_size == meta.raw["input_size"]
    assert meta.weights_path.is_file() and len(meta.classes) == 11
    assert meta.version == file_sha256(meta.weights_path)[:12] and meta.meta_hash == file_sha256(
        meta.folder / "meta.json")[:12]
    assert isinstance(meta.crop_margin, float) and meta.temperature > 0 and meta.normalize["mean"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        meta.stage = "detect"  # type: ignore[misc]
    with pytest.raises(ModelError, match="not a detector model folder"):
        load_model(shipped_dir("classifier"), "detect")
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "meta.json").write_text(json.dumps({"stage": "segment", "weights": "w", "classes": ["a"]}))
    (folder / "w").write_bytes(b"")
    with pytest.raises(ModelError, match="missing keys encoder"):
        load_model(folder, "segment", required=("encoder",))


@pytest.mark.slow
def test_a_build_reads_and_hashes_each_model_folder_once(monkeypatch):
    """build_stages reads each meta.json once and hashes each file that runs once."""
    from smear import artifacts
    from smear.config import load_config
    from smear.pipeline.build import build_stages

    reads, hashes = [], []
    real_read, real_hash = artifacts.load_meta, artifacts.file_sha256
    monkeypatch.setattr(artifacts, "load_meta", lambda d: reads.append(str(d)) or real_read(d))
    monkeypatch.setattr(artifacts, "file_sha256", lambda p: hashes.append(str(p)) or real_hash(p))
    stages = build_stages(load_config("pipeline", None, ["runtime=torch", "device=cpu", "segmenter=unet"]))
    assert stages.classifier is not None and stages.segmenter is not None
    assert len(reads) == len(set(reads)) == 3  # one meta.json read per folder
    assert len(hashes) == len(set(hashes)) >= 6  # no file hashed twice (weights and meta.json of each at least)

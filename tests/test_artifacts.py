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


@pytest.mark.parametrize("name", sorted(p.name for p in shipped_dir("").iterdir() if (p / "meta.json").is_file()))
def test_saving_a_shipped_meta_unchanged_writes_the_same_bytes(name, tmp_path):
    """save_model_dir is the inverse of load_model: a shipped folder's meta, saved into a copy of the
    folder, gives meta.json byte for byte, loads with the same hashes, and leaves config and card alone."""
    import shutil

    from smear.artifacts import save_model_dir

    src = shipped_dir(name)
    folder = tmp_path / name
    shutil.copytree(src, folder)
    meta = load_model(folder, json.loads((src / "meta.json").read_text())["stage"])
    (folder / "config.yaml").write_text("left alone\n")
    save_model_dir(meta)
    assert (folder / "meta.json").read_bytes() == (src / "meta.json").read_bytes()
    assert (folder / "config.yaml").read_text() == "left alone\n"
    again = load_model(folder, meta.stage)
    assert (again.version, again.meta_hash, again.files) == (meta.version, meta.meta_hash, meta.files)


def test_the_typed_meta_is_what_is_saved(tmp_path):
    """Typed attributes changed on a ModelMeta (dataclasses.replace) and keys set or dropped with
    ``updated`` reach meta.json; untouched keys keep their order and values, the head hash stays."""
    import shutil

    from smear.artifacts import save_model_dir

    folder = tmp_path / "clf"
    shutil.copytree(shipped_dir("classifier"), folder)
    meta = load_model(folder, "classify")
    keys = list(meta.raw)
    changed = dataclasses.replace(meta, temperature=2.5, novelty=None).updated(guard=None, note="edited",
                                                                                drop=("metrics",))
    assert (changed.temperature, changed.version) == (2.5, "")
    written = save_model_dir(changed)
    content = json.loads((folder / "meta.json").read_text())
    assert content["temperature"] == 2.5 and content["note"] == "edited" and content["guard"] is None
    assert "novelty" not in content and "metrics" not in content
    assert list(content)[:-1] == [k for k in keys if k not in ("novelty", "metrics")]
    assert content["head_hash"] == meta.raw["head_hash"] and written.temperature == 2.5
    assert load_model(folder, "classify").temperature == 2.5


def test_a_new_meta_is_laid_out_in_its_stages_order(tmp_path):
    """A builder's ModelMeta (typed attributes plus ``extra`` keys) holds meta.json in its stage's
    META_LAYOUT order, unknown extra keys after; a typed attribute left None, or at its default outside
    the layout, is not written; a typed key among the extras is refused."""
    meta = ModelMeta(folder=tmp_path, stage="segment", weights="w.safetensors", classes=("background", "nucleus"),
                     trained="2026-12-07", arch="unet", encoder="resnet18", input_size=64, crop_margin=1.2,
                     normalize={"mean": [0.5] * 3, "std": [0.2] * 3}, tta_margin=0.1,
                     extra={"note": "x", "training": {"best_epoch": 2}, "crop": "square"})
    assert list(meta.raw) == ["stage", "weights", "trained", "classes", "arch", "encoder", "decoder_channels",
                              "input_size", "crop_margin", "crop", "normalize", "training", "note", "tta_margin"]
    assert meta.to_json() == meta.raw and meta["classes"] == ["background", "nucleus"] and meta["note"] == "x"
    assert meta.raw["decoder_channels"] == [128, 64, 32, 16, 16] and "temperature" not in meta.raw
    assert ModelMeta.of(meta.to_json(), tmp_path) == meta
    with pytest.raises(ValueError, match="temperature"):
        ModelMeta(folder=tmp_path, stage="classify", weights="w", classes=(), extra={"temperature": 2.0})


def test_save_model_dir_stamps_the_version_and_refuses_a_meta_without_weights(tmp_path):
    from smear import __version__
    from smear.artifacts import save_model_dir

    with pytest.raises(ModelError, match="meta lacks weights"):
        save_model_dir(ModelMeta.of({"stage": "classify", "classes": []}, tmp_path / "m"))
    save_model_dir(ModelMeta.of({"stage": "detect", "weights": "w.safetensors", "classes": []}, tmp_path / "m"),
                   {"model": "x"}, card="# card\n")
    content = json.loads((tmp_path / "m" / "meta.json").read_text())
    assert list(content)[0] == "smear_version" and content["smear_version"] == __version__
    assert (tmp_path / "m" / "MODEL_CARD.md").read_text() == "# card\n"
    assert "model: x" in (tmp_path / "m" / "config.yaml").read_text()

"""Config loading: defaults, files, overrides, unknown keys named."""

from __future__ import annotations

import pytest

from smear.config import STAGES, default_config, dump_config, load_config, parse_override
from smear.errors import ConfigError


@pytest.mark.parametrize("stage", STAGES)
def test_defaults_load_and_roundtrip(stage, tmp_path):
    from smear.config_models import MODELS

    cfg = default_config(stage)
    assert isinstance(cfg, MODELS[stage])
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(stage, path) == cfg


def test_override_types_and_nesting():
    cfg = load_config("detect", overrides=["train.epochs=3", "train.cos_lr=false", "infer.conf=0.4"])
    assert cfg.train.epochs == 3
    assert cfg.train.cos_lr is False
    assert cfg.infer.conf == 0.4
    assert parse_override("a.b=hello world") == (["a", "b"], "hello world")


def test_unknown_key_in_override_is_named():
    with pytest.raises(ConfigError, match="unknown config key 'train.epoch'"):
        load_config("detect", overrides=["train.epoch=3"])


def test_unknown_key_in_file_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("detector: classical\nreview_treshold: 0.3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'review_treshold'"):
        load_config("pipeline", path)


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config("pipeline", tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config("pipeline", bad)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config("pipeline", overrides=["detector"])
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config("detect", overrides=["train=3"])
    with pytest.raises(ConfigError, match="unknown config stage"):
        load_config("nope")


def test_bare_off_stays_the_word_off():
    """`--set classifier=off` must not turn into False (YAML 1.1 reads off as a boolean)."""
    from smear.config import load_config

    cfg = load_config("pipeline", None, ["classifier=off", "segmenter=off"])
    assert cfg.classifier == "off" and cfg.segmenter == "off"
    assert load_config("pipeline", None, ["mask_background=true"]).mask_background is True


@pytest.mark.parametrize("override, words", [
    ("review_threshold=abc", "config key 'review_threshold' must be a number (got 'abc')"),
    ("segmenter=unett", "config key 'segmenter' must be one of off, unet, kmeans or grabcut"),
    ("device=gpu", "config key 'device' must be auto, cpu, cuda or cuda:N"),
    ("runtime=tensorrt", "config key 'runtime' must be one of onnx, onnx-int8, openvino, openvino-int8 or torch"),
    ("io.max_pixels=big", "config key 'io.max_pixels' must be an integer"),
])
def test_a_wrong_type_or_choice_is_one_line_naming_key_and_type(override, words):
    with pytest.raises(ConfigError) as info:
        load_config("pipeline", overrides=[override])
    assert str(info.value) == f"--set {override}: {words}" or str(info.value).startswith(f"--set {override}: {words}")
    assert "\n" not in str(info.value)


def test_wrong_type_is_refused_before_any_model_loads(monkeypatch):
    """`smear run --set review_threshold=abc`: the error comes from the config, no stage is built."""
    from typer.testing import CliRunner

    import smear.pipeline.build as build
    from smear.cli import app

    monkeypatch.setattr(build, "build_stages", lambda cfg: pytest.fail("a model was loaded"))
    res = CliRunner().invoke(app, ["run", "examples/slide_demo", "--set", "review_threshold=abc"])
    assert res.exit_code == 1 and "config key 'review_threshold' must be a number" in res.stderr


@pytest.mark.parametrize("stage", STAGES)
def test_typed_models_cover_the_shipped_yaml_exactly(stage):
    """Every key of the shipped YAML has a type, and every typed key a default in the YAML."""
    import yaml
    from importlib import resources

    from smear.config import as_dict

    shipped = yaml.safe_load(resources.files("smear.configs").joinpath(f"{stage}.yaml").read_text(encoding="utf-8"))
    assert as_dict(default_config(stage)) == shipped


def test_a_typed_config_is_frozen_and_read_by_attribute():
    from pydantic import ValidationError

    cfg = default_config("pipeline")
    assert cfg.report.confidence == 0.95 and cfg.wbc_check.enabled is True
    with pytest.raises(ValidationError):
        cfg.device = "cpu"
    assert cfg.model_copy(update={"device": "cpu"}).device == "cpu" and cfg.device == "auto"


def test_config_show_keeps_the_comments_of_the_shipped_yaml():
    from importlib import resources

    from smear.config import show_config

    shipped = resources.files("smear.configs").joinpath("detect.yaml").read_text(encoding="utf-8")
    assert show_config("detect", load_config("detect")) == shipped
    shown = show_config("detect", load_config("detect", overrides=["train.epochs=2", "infer.conf=0.3"]))
    assert "  epochs: 2\n" in shown and "# shipped confidence threshold" in shown
    assert next(ln for ln in shown.splitlines() if ln.startswith("  conf:")).startswith("  conf: 0.3   ")
    assert yaml_load(shown) == dump_load(load_config("detect", overrides=["train.epochs=2", "infer.conf=0.3"]))


def dump_load(cfg):
    return yaml_load(dump_config(cfg))


def yaml_load(text):
    import yaml

    return yaml.safe_load(text)


def test_the_old_segment_key_still_works_with_a_warning(tmp_path):
    with pytest.warns(FutureWarning, match="config key 'segment' is now 'segmenter'"):
        assert load_config("pipeline", None, ["segment=kmeans"]).segmenter == "kmeans"
    path = tmp_path / "old.yaml"
    path.write_text("segment: unet\n")
    with pytest.warns(FutureWarning, match="old.yaml: config key 'segment'"):
        assert load_config("pipeline", path).segmenter == "unet"
    path.write_text("segment: unet\nsegmenter: kmeans\n")
    with pytest.raises(ConfigError, match="'segment' and 'segmenter' both given"):
        load_config("pipeline", path)

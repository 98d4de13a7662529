"""Config loading: defaults, files, overrides, unknown keys named."""

from __future__ import annotations

import pytest

from smear.config import STAGES, default_config, dump_config, load_config, parse_override
from smear.types import ConfigError


@pytest.mark.parametrize("stage", STAGES)
def test_defaults_load_and_roundtrip(stage, tmp_path):
    cfg = default_config(stage)
    assert isinstance(cfg, dict) and cfg
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(stage, path) == cfg


def test_override_types_and_nesting():
    cfg = load_config("detect", overrides=["train.epochs=3", "train.cos_lr=false", "infer.conf=0.4"])
    assert cfg["train"]["epochs"] == 3
    assert cfg["train"]["cos_lr"] is False
    assert cfg["infer"]["conf"] == 0.4
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

    cfg = load_config("pipeline", None, ["classifier=off", "segment=off"])
    assert cfg["classifier"] == "off" and cfg["segment"] == "off"
    assert load_config("pipeline", None, ["mask_background=true"])["mask_background"] is True

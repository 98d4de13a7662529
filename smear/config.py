"""Load YAML configs, reject unknown keys by name, apply ``--set a.b=value`` overrides."""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import yaml

from smear.types import ConfigError

STAGES = ("pipeline", "detect", "segment", "classify")


def default_config(stage: str) -> dict[str, Any]:
    """The shipped default config of a stage (pipeline, detect, segment, classify)."""
    if stage not in STAGES:
        raise ConfigError(f"unknown config stage {stage!r}", hint=f"one of {', '.join(STAGES)}")
    text = resources.files("smear.configs").joinpath(f"{stage}.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text) or {}


def _merge(base: dict[str, Any], update: dict[str, Any], where: str, source: str) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in base:
            known = ", ".join(sorted(map(str, base))) or "none"
            raise ConfigError(f"{source}: unknown config key '{path}'", hint=f"known keys here: {known}")
        if isinstance(base[key], dict) and base[key]:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: config key '{path}' must be a mapping")
            out[key] = _merge(base[key], value, path, source)
        elif isinstance(base[key], str) and isinstance(value, bool):
            out[key] = "on" if value else "off"  # YAML reads a bare off/no/false as a boolean
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into a key path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not KEY=VALUE", hint="e.g. --set train.epochs=3")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def _nest(parts: list[str], value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(parts):
        out = {part: out}
    return out


def load_config(
    stage: str, path: str | Path | None = None, overrides: Iterable[str] = ()
) -> dict[str, Any]:
    """Defaults of ``stage`` updated by a YAML file and then by ``a.b=value`` overrides."""
    cfg = default_config(stage)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            user = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
        if not isinstance(user, dict):
            raise ConfigError(f"{path}: a config file must be a mapping of keys")
        cfg = _merge(cfg, user, "", str(path))
    for text in overrides:
        parts, value = parse_override(text)
        cfg = _merge(cfg, _nest(parts, value), "", f"--set {text}")
    return cfg


def dump_config(cfg: dict[str, Any]) -> str:
    """The config as YAML text, keys in their original order."""
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)

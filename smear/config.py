"""Load YAML configs, reject unknown keys by name, apply ``--set a.b=value`` overrides, check types.

The types and choices of every key are the pydantic models of smear.config_models; a wrong one is
a one-line ConfigError naming the key, what it must be and where it came from (a file or a --set),
raised before any model loads. ``load_config`` returns the typed model (``PipelineConfig``,
``DetectConfig``, ...); the stages read its attributes. The defaults are the shipped YAML files."""

from __future__ import annotations

import copy
import functools
import re
import warnings
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import yaml

from smear.errors import ConfigError

if TYPE_CHECKING:
    from smear.config_models import Section

STAGES = ("pipeline", "detect", "segment", "classify")
#: keys renamed in a stage's config, old name -> new name: the old one still works, with a warning
RENAMED = {"pipeline": {"segment": "segmenter"}}


def _shipped(stage: str) -> dict[str, Any]:
    """The shipped YAML of a stage as written (a plain mapping)."""
    if stage not in STAGES:
        raise ConfigError(f"unknown config stage {stage!r}", hint=f"one of {', '.join(STAGES)}")
    text = resources.files("smear.configs").joinpath(f"{stage}.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text) or {}


@functools.lru_cache(maxsize=None)
def default_config(stage: str) -> Section:
    """The shipped default config of a stage (pipeline, detect, segment, classify), typed; frozen,
    so one copy serves every caller (``model_copy(update=...)`` makes a changed one)."""
    return load_config(stage)


def _renamed(stage: str, update: dict[str, Any], source: str) -> dict[str, Any]:
    """``update`` with the old names of renamed top-level keys replaced by the new ones (a FutureWarning
    each); both names given is a ConfigError."""
    renames = RENAMED.get(stage, {})
    if not any(key in update for key in renames):
        return update
    out = {}
    for key, value in update.items():
        new = renames.get(key)
        if new is None:
            out[key] = value
            continue
        if new in update:
            raise ConfigError(f"{source}: config keys '{key}' and '{new}' both given",
                              hint=f"'{key}' is the old name of '{new}': keep '{new}'")
        warnings.warn(f"{source}: config key '{key}' is now '{new}' (the old name still works, for now)",
                      FutureWarning, stacklevel=4)
        out[new] = value
    return out


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


_EXPECTED = {
    "float_parsing": "a number", "float_type": "a number", "int_parsing": "an integer", "int_type": "an integer",
    "int_from_float": "an integer", "bool_parsing": "true or false", "bool_type": "true or false",
    "string_type": "a string", "dict_type": "a mapping", "list_type": "a list", "model_type": "a mapping",
    "string_pattern_mismatch": "auto, cpu, cuda or cuda:N",
}


def _check_types(stage: str, cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """The config with every value validated (and cast) by the stage's pydantic model, or a
    ConfigError for the first wrong key: ``SOURCE: config key 'a.b' must be TYPE (got VALUE)``."""
    from pydantic import ValidationError

    from smear.config_models import MODELS

    try:
        return MODELS[stage].model_validate(cfg).model_dump(exclude_unset=True)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        key = ".".join(str(p) for p in err["loc"])
        kind, ctx = err["type"], err.get("ctx") or {}
        if kind == "literal_error":
            want = "one of " + str(ctx.get("expected", "")).replace("'", "")
        elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            sign = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
            want = f"a number {sign} {next(iter(ctx.values()))}"
        else:
            want = _EXPECTED.get(kind, err["msg"].lower())
        raise ConfigError(f"{source}: config key '{key}' must be {want} (got {err.get('input')!r})",
                          hint=f"see `smear config show {stage}` for every key and its default") from None


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
    stage: str, path: str | Path | None = None, overrides: Iterable[str] = (),
    options: Mapping[str, tuple[str, Any]] | None = None,
) -> Section:
    """The typed config of ``stage``: its defaults updated by a YAML file, then by ``a.b=value``
    overrides, then by ``options``: ``{"--epochs": ("train.epochs", 3)}``, a command's own options
    (None: not given), each error naming the option."""
    from smear.config_models import MODELS

    cfg = _check_types(stage, _shipped(stage), f"the shipped {stage}.yaml")
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
        cfg = _check_types(stage, _merge(cfg, _renamed(stage, user, str(path)), "", str(path)), str(path))
    for text in overrides:
        parts, value = parse_override(text)
        where = f"--set {text}"
        cfg = _check_types(stage, _merge(cfg, _renamed(stage, _nest(parts, value), where), "", where), where)
    for option, (key, value) in (options or {}).items():
        if value is not None:
            where = f"{option} {value}"
            cfg = _check_types(stage, _merge(cfg, _nest(key.split("."), value), "", where), where)
    return MODELS[stage].model_validate(cfg)


def as_dict(cfg: Section | Mapping[str, Any]) -> dict[str, Any]:
    """A typed config (or a plain mapping) as plain data: the keys of the YAML, in order."""
    from smear.config_models import Section

    return cfg.model_dump(exclude_unset=True) if isinstance(cfg, Section) else dict(cfg)


def dump_config(cfg: Section | Mapping[str, Any]) -> str:
    """The config as YAML text, keys in their original order."""
    return yaml.safe_dump(as_dict(cfg), sort_keys=False, default_flow_style=False)


_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w]*):(?P<rest>.*)$")


def _split_comment(rest: str) -> tuple[str, str]:
    """(value text, comment with its leading spaces) of what follows ``key:`` on a YAML line."""
    quote = None
    for i, ch in enumerate(rest):
        if ch in "\"'" and quote in (None, ch):
            quote = None if quote else ch
        elif ch == "#" and quote is None and (i == 0 or rest[i - 1] == " "):
            value = rest[:i]
            return value.rstrip(), rest[len(value.rstrip()):]
    return rest.rstrip(), ""


def _flow(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10_000).strip()
    return text[:-4].rstrip() if text.endswith("\n...") else text


def show_config(stage: str, cfg: Section | Mapping[str, Any]) -> str:
    """The resolved config as the shipped YAML of ``stage``, comments kept: each value that differs
    from the shipped default is written in place of it."""
    text = resources.files("smear.configs").joinpath(f"{stage}.yaml").read_text(encoding="utf-8")
    default, cfg = _shipped(stage), as_dict(cfg)
    out, stack = [], []  # stack: (indent, key) of the open mappings
    for line in text.splitlines():
        m = _KEY_LINE.match(line)
        if not m:
            out.append(line)
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = [k for _, k in stack] + [m["key"]]
        value_text, comment = _split_comment(m["rest"])
        if not value_text.strip():
            stack.append((indent, m["key"]))
            out.append(line)
            continue
        new, old = _get(cfg, path), _get(default, path)
        if new == old and isinstance(new, bool) == isinstance(old, bool):  # 16 and 16.0 are one value
            out.append(line)
            continue
        head = f"{m['indent']}{m['key']}: {_flow(new)}"
        column = len(line) - len(comment.lstrip())  # where the comment starts, kept when the value fits
        out.append(head + (" " * max(1, column - len(head)) + comment.lstrip() if comment else ""))
    return "\n".join(out) + "\n"


def _get(cfg: Any, path: list[str]) -> Any:
    for key in path:
        cfg = cfg.get(key) if isinstance(cfg, dict) else None
    return cfg

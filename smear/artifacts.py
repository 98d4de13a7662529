"""Model folders: weights + config.yaml + meta.json + MODEL_CARD.md; save, load, locate shipped ones."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import MISSING, InitVar, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from smear import __version__
from smear.errors import ModelError
from smear.io import write_text_atomic
from smear.taxonomy import FINE_CLASSES, CellKind

META = "meta.json"
CONFIG = "config.yaml"
CARD = "MODEL_CARD.md"
REQUIRED_META = ("stage", "weights", "classes")


def shipped_dir(name: str) -> Path:
    """Path of a shipped model folder inside the package (may not exist yet)."""
    return Path(str(resources.files("smear.weights").joinpath(name)))


def resolve_model_dir(spec: str | Path, default_name: str) -> Path:
    """``"shipped"`` -> the packaged folder ``default_name``; ``"shipped:NAME"`` -> the packaged
    folder NAME (e.g. ``shipped:detector_stain``); anything else is a path."""
    text = str(spec)
    if text == "shipped":
        return shipped_dir(default_name)
    if text.startswith("shipped:"):
        name = text.split(":", 1)[1]
        folder = shipped_dir(name)
        if not name or "/" in name or "\\" in name or not (folder / META).is_file():
            have = sorted(p.name for p in shipped_dir("").iterdir() if (p / META).is_file())
            raise ModelError(f"{text}: no shipped model folder of that name", hint=f"shipped: {', '.join(have)}")
        return folder
    return Path(spec)


def load_meta(model_dir: str | Path) -> dict[str, Any]:
    """Read and check a model folder's meta.json; raises ModelError naming what is missing."""
    return _read_meta(Path(model_dir))[0]


def _read_meta(model_dir: Path) -> tuple[dict[str, Any], str]:
    """``load_meta`` and the SHA-256 of meta.json's bytes, the file opened once."""
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir}: model folder not found")
    meta_path = model_dir / META
    if not meta_path.is_file():
        raise ModelError(f"{meta_path}: missing (a model folder needs {META})")
    data = meta_path.read_bytes()
    try:
        meta = json.loads(data.decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelError(f"{meta_path}: not valid JSON ({exc.msg})") from exc
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ModelError(f"{meta_path}: missing keys {', '.join(missing)}")
    weights = model_dir / meta["weights"]
    if not weights.is_file():
        raise ModelError(f"{weights}: weights file missing")
    return meta, hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ModelMeta:
    """A model folder's meta.json, read and checked once (as timm's ``PretrainedCfg``): the stage,
    the weights file, the class names in order, the input and crop geometry, the normalisation, the
    tuned thresholds and temperature, and the hashes that identify the folder. ``raw`` is meta.json
    as written (metrics, data, training), for what shows or edits it.

    A stage's builder makes a new one from the typed attributes and ``extra``, meta.json's other
    keys (metrics, data, training...): ``raw`` is then laid out in the stage's ``META_LAYOUT`` order."""

    folder: Path
    stage: str
    weights: str
    classes: tuple[str, ...]
    version: str = ""    # SHA-256 of the weights, first 12 hex digits: keys caches and reports ("": not saved)
    meta_hash: str = ""  # SHA-256 of meta.json, first 12 hex digits: its thresholds and temperature count too
    files: str = ""      # ``files_version``: every file that runs (keys the result cache)
    onnx_hash: str = ""  # SHA-256 of its own model.onnx, first 12 hex digits ("": none)
    input_size: int | None = None
    crop_margin: float | None = None
    normalize: Mapping[str, Any] | None = None  # {"mean": [...], "std": [...]} of RGB in [0, 1]
    colour_norm: Mapping[str, Any] | None = None
    arch: str | None = None
    norm: str = "batch"
    head: str | None = None  # the classifier's head: "hierarchical", or None for the flat one
    encoder: str | None = None
    decoder_channels: tuple[int, ...] = (128, 64, 32, 16, 16)
    temperature: float = 1.0
    tta: int = 1
    tta_margin: float = 0.0  # selective TTA: the extra views only for crops under this top probability
    novelty: Mapping[str, Any] | None = None
    infer: Mapping[str, Any] = field(default_factory=dict)
    trained: str | None = None
    raw: Mapping[str, Any] = field(repr=False, default_factory=dict)
    extra: InitVar[Mapping[str, Any] | None] = None

    def __post_init__(self, extra: Mapping[str, Any] | None) -> None:
        if not self.raw and (self.stage or extra):  # a new meta, not one read: meta.json's content laid out
            object.__setattr__(self, "raw", _laid_out(self, extra or {}))
        elif extra:
            raise ValueError("ModelMeta: extra keys go with a new meta (raw empty); updated() sets keys of one read")

    @property
    def weights_path(self) -> Path:
        return self.folder / self.weights

    def __getitem__(self, key: str) -> Any:
        """meta.json's ``key`` as written (for the runtimes that still read it by name; the typed
        attributes above are the contract)."""
        return self.raw[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self.raw

    def to_json(self) -> dict[str, Any]:
        """meta.json's content (the inverse of ``of``): ``raw`` in its key order, with each typed
        attribute that differs from what ``raw`` holds written over its key (a None one drops it);
        a meta read and saved unchanged writes the same bytes."""
        out = json.loads(json.dumps(dict(self.raw)))
        base = ModelMeta.of(self.raw)
        for key in _TYPED_KEYS:
            value = getattr(self, key)
            if value == getattr(base, key):
                continue
            if value is None:
                out.pop(key, None)
            else:
                out[key] = json.loads(json.dumps(value, default=dict))
        return out

    def updated(self, drop: Iterable[str] = (), **keys: Any) -> ModelMeta:
        """This meta with meta.json's ``keys`` set (typed or not) and those in ``drop`` removed, in
        the same folder; the hashes are cleared (they were of the folder as read)."""
        dropped = set(drop)
        content = {k: v for k, v in self.to_json().items() if k not in dropped}
        return ModelMeta.of(content | keys, self.folder)

    def at(self, folder: str | Path) -> ModelMeta:
        """This meta for another folder (the hashes cleared)."""
        return ModelMeta.of(self.to_json(), folder)

    @classmethod
    def of(cls, meta: Mapping[str, Any] | ModelMeta, folder: str | Path = ".", version: str = "",
           meta_hash: str = "", files: str = "", onnx_hash: str = "") -> ModelMeta:
        """The typed meta of a meta.json mapping (a ModelMeta as it is): one in memory, or one read
        from ``folder`` with its hashes."""
        if isinstance(meta, ModelMeta):
            return meta

        def opt(key: str, kind):
            return None if meta.get(key) is None else kind(meta[key])

        return cls(
            folder=Path(folder), stage=str(meta.get("stage", "")), weights=str(meta.get("weights", "")),
            classes=tuple(meta.get("classes", ())), version=version, meta_hash=meta_hash, files=files,
            onnx_hash=onnx_hash,
            input_size=opt("input_size", int), crop_margin=opt("crop_margin", float),
            normalize=meta.get("normalize"), colour_norm=meta.get("colour_norm") or None, arch=meta.get("arch"),
            norm=str(meta.get("norm", "batch")), head=meta.get("head"), encoder=meta.get("encoder"),
            decoder_channels=tuple(meta.get("decoder_channels", cls.decoder_channels)),
            temperature=float(meta.get("temperature", 1.0)), tta=int(meta.get("tta", 1)),
            tta_margin=float(meta.get("tta_margin") or 0.0),
            novelty=meta.get("novelty") or None, infer=dict(meta.get("infer") or {}), trained=meta.get("trained"),
            raw=meta)


#: the typed attributes of ModelMeta that are meta.json keys of the same name
_TYPED_KEYS = ("stage", "weights", "classes", "input_size", "crop_margin", "normalize", "colour_norm", "arch", "norm",
               "head", "encoder", "decoder_channels", "temperature", "tta", "tta_margin", "novelty", "infer", "trained")

#: meta.json's keys, in the order each stage's builder writes them (typed attributes and ``extra``
#: keys alike): classify.card.classifier_meta, segment.train._meta, detect.train.package
META_LAYOUT: dict[str, tuple[str, ...]] = {
    "classify": ("stage", "weights", "trained", "classes", "arch", "input_size", "crop_margin", "crop", "normalize",
                 "temperature", "tta", "norm", "head", "colour_norm", "metrics", "data", "fine_tuned_from",
                 "data_fingerprint", "training"),
    "segment": ("stage", "weights", "trained", "classes", "arch", "encoder", "decoder_channels", "input_size",
                "crop_margin", "crop", "normalize", "training"),
    "detect": ("stage", "weights", "network", "classes", "architecture", "input", "infer", "trained", "metrics",
               "data_fingerprint", "fine_tuned_from"),
}


def _laid_out(meta: ModelMeta, extra: Mapping[str, Any]) -> dict[str, Any]:
    """meta.json's content of a new ``meta``: the keys its stage's META_LAYOUT names, in that order (a
    typed attribute that is None, or an extra key not given, left out), then the other ``extra`` keys
    in their order, then the typed attributes the layout does not name that differ from their default."""
    typed = [k for k in extra if k in _TYPED_KEYS]
    if typed:
        raise ValueError(f"ModelMeta: extra keys that are typed attributes (set them as such): {', '.join(typed)}")
    layout = META_LAYOUT.get(meta.stage, ("stage", "weights", "classes"))
    defaults = {f.name: f.default_factory() if f.default_factory is not MISSING else f.default
                for f in fields(ModelMeta) if f.name in _TYPED_KEYS}
    out: dict[str, Any] = {}
    for key in (*layout, *extra, *_TYPED_KEYS):
        if key in out or (key in extra) == (key in _TYPED_KEYS):  # placed already, or neither kind (not given)
            continue
        if key in extra:
            out[key] = extra[key]
            continue
        value = getattr(meta, key)
        if value is not None and (key in layout or value != defaults[key]):
            out[key] = json.loads(json.dumps(value, default=dict))
    return out


_STAGE_WORDS = {"detect": "detector", "segment": "segmenter", "classify": "classifier"}


def load_model(model_dir: str | Path | ModelMeta, stage: str, required: Iterable[str] = ()) -> ModelMeta:
    """The checked, typed meta of a model folder of ``stage`` (detect | segment | classify), read once
    (a ModelMeta given is checked and returned): ModelError naming the folder when it is another
    stage's or lacks one of the ``required`` keys."""
    meta_digest = None
    if isinstance(model_dir, ModelMeta):
        meta, folder = model_dir.raw, model_dir.folder
    else:
        folder = Path(model_dir)
        meta, meta_digest = _read_meta(folder)
    if meta.get("stage") != stage:
        raise ModelError(f"{folder}: not a {_STAGE_WORDS.get(stage, stage)} model folder "
                         f"(stage {meta.get('stage')!r})")
    missing = [k for k in required if k not in meta]
    if missing:
        raise ModelError(f"{folder}/meta.json: missing keys {', '.join(missing)}")
    if isinstance(model_dir, ModelMeta):
        # one read already (hashed), or one made in memory: its folder's files hashed, its content kept
        return model_dir if model_dir.files else _hashed(model_dir, folder)
    check_contract(meta, folder, stage)
    return _hashed(ModelMeta.of(meta, folder), folder, meta_digest)


def _hashed(meta: ModelMeta, folder: Path, meta_digest: str | None = None) -> ModelMeta:
    """``meta`` with the hashes of its folder's runtime files, each file hashed once (meta.json's
    ``meta_digest``: the SHA-256 of the bytes read already)."""
    hashes = {p.name: meta_digest if p.name == META and meta_digest else file_sha256(p)
              for p in runtime_files(folder, meta.raw)}
    weights = str(meta.raw["weights"])
    return replace(meta, version=(hashes.get(weights) or file_sha256(folder / weights))[:12],
                   meta_hash=(hashes.get(META) or "")[:12], files=_files_id(hashes),
                   onnx_hash=(hashes.get(ONNX_FILE) or "")[:12])


#: the classes each stage's network must be trained on (any order; the order is checked by head_hash)
STAGE_CLASSES = {"detect": tuple(k.value for k in CellKind), "classify": FINE_CLASSES,
                 "segment": ("background", "cytoplasm", "nucleus")}
SEAL_HINT = "python -m smear.artifacts FOLDER writes it, once you know the folder's classes are in the trained order"


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_contract(meta: Mapping[str, Any], model_dir: Path, stage: str) -> None:
    """Refuse a meta.json that does not fit its weights or smear: weights that are not safetensors,
    classes other than the stage's own, a class order, class count or input size other than the
    network was trained with (``head_hash``), a temperature or input size that is not positive.
    ModelError names meta.json and the key."""
    where = model_dir / META
    weights = str(meta["weights"])
    if not weights.endswith(".safetensors"):
        raise ModelError(f"{where}: key weights: {weights!r} is not a .safetensors file; refusing it",
                         hint="model folders hold safetensors weights (a pickle can run code); a detector "
                              ".pt converts once with python -m smear.detect.network FOLDER")
    classes = meta["classes"]
    expected = STAGE_CLASSES.get(stage)
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ModelError(f"{where}: key classes: not a list of class names")
    if expected is not None and (sorted(classes) != sorted(expected)):
        raise ModelError(f"{where}: key classes: {', '.join(classes)[:200]} are not smear's {stage} classes "
                         f"({', '.join(expected)})")
    for key in ("temperature", "input_size"):
        if key in meta and not _positive(meta[key]):
            raise ModelError(f"{where}: key {key}: {meta[key]!r} must be a number over 0")
    if "input_size" in meta and not isinstance(meta["input_size"], int):
        raise ModelError(f"{where}: key input_size: {meta['input_size']!r} must be a whole number of pixels")
    stored = meta.get(HEAD_HASH)
    if not stored:
        raise ModelError(f"{where}: key {HEAD_HASH}: missing, so the class order of the weights cannot be checked",
                         hint=SEAL_HINT)
    if stored != head_hash(meta, model_dir):
        raise ModelError(f"{where}: key {HEAD_HASH}: the weights were trained with another class order, class "
                         "count, input size or network than meta.json names (classes, input_size); refusing it")


def cache_dir(name: str) -> Path:
    """smear's cache folder ``name``: ``$XDG_CACHE_HOME/smear/<name>`` (default ``~/.cache/smear/<name>``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "smear" / name


#: Settings that turn a cache off; YAML reads a bare ``off``/``no``/``false`` as the boolean False.
CACHE_OFF = ("off", "false", "no", "none")


def cache_setting(setting: Any, name: str) -> Path | None:
    """A ``cache_dir`` setting as a folder: ``auto`` (or null) -> ``cache_dir(name)``; ``off`` (or
    False) -> None; anything else is a path (``~`` expanded). ``off`` never becomes a folder name."""
    if setting is None or (isinstance(setting, str) and setting.strip().lower() == "auto"):
        return cache_dir(name)
    if setting is False or str(setting).strip().lower() in CACHE_OFF:
        return None
    return Path(os.path.expanduser(str(setting)))


def load_model_config(model_dir: str | Path) -> dict[str, Any]:
    """The config.yaml a model was built and trained with (empty if absent)."""
    path = Path(model_dir) / CONFIG
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {} if path.is_file() else {}


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_fingerprint(paths: Iterable[str | Path]) -> str:
    """A short hash of file names and sizes: identifies the data a model saw without storing it."""
    h = hashlib.sha256()
    for p in sorted(str(x) for x in paths):
        path = Path(p)
        h.update(path.name.encode())
        h.update(str(path.stat().st_size if path.exists() else -1).encode())
    return h.hexdigest()[:16]


HEAD_HASH = "head_hash"


def safetensors_shapes(path: str | Path) -> dict[str, list[int]]:
    """Each tensor's shape in a safetensors file, read from its JSON header (no tensor is loaded);
    ModelError naming the file when it is not one."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 2 <= size <= 100_000_000:
                raise ValueError(f"header size {size}")
            header = json.loads(fh.read(size))
        return {k: [int(d) for d in v["shape"]] for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ModelError(f"{path}: not a safetensors file ({exc})") from exc


def head_hash(meta: Mapping[str, Any], model_dir: str | Path) -> str:
    """A short hash of the contract a network was trained with: its class names in order, its input
    size and the shape of every tensor (the head's among them). Kept in meta.json as ``head_hash``;
    a meta whose classes were reordered or renamed, or whose input size was edited, no longer matches."""
    shapes = safetensors_shapes(Path(model_dir) / str(meta["weights"]))
    contract = {"classes": [str(c) for c in meta["classes"]], "input_size": meta.get("input_size"),
                "tensors": sorted([k, v] for k, v in shapes.items())}
    return hashlib.sha256(json.dumps(contract, sort_keys=True).encode()).hexdigest()[:16]


def add_head_hash(model_dir: str | Path) -> str:
    """Write ``head_hash`` into a model folder's meta.json (other keys and the weights untouched)."""
    path = Path(model_dir) / META
    meta = json.loads(path.read_text(encoding="utf-8"))
    meta[HEAD_HASH] = head_hash(meta, model_dir)
    write_text_atomic(path, json.dumps(meta, indent=2, sort_keys=False) + "\n")
    return meta[HEAD_HASH]


def model_version(model_dir: str | Path) -> str:
    """A short id of a model folder's weights file (what the audit calls its weights hash)."""
    meta = load_meta(model_dir)
    return file_sha256(Path(model_dir) / meta["weights"])[:12]


ONNX_FILE = "model.onnx"


def runtime_files(model_dir: str | Path, meta: Mapping[str, Any] | None = None) -> list[Path]:
    """Every file of a model folder that decides what it computes: meta.json, the weights, the
    detector's network YAML, the novelty and slide-guard statistics and ``model.onnx`` (which ``runtime: onnx`` runs
    instead of the weights), those that exist (``meta``: its meta.json, read already)."""
    model_dir = Path(model_dir)
    meta = load_meta(model_dir) if meta is None else meta
    names = [META, str(meta["weights"]), str(meta.get("network") or ""), ONNX_FILE]
    for key in ("novelty", "guard"):  # the novelty statistics and the slide guard's
        part = meta.get(key)
        if isinstance(part, Mapping) and part.get("file"):
            names.append(str(part["file"]))
    return [model_dir / n for n in dict.fromkeys(names) if n and (model_dir / n).is_file()]


def files_version(model_dir: str | Path) -> str:
    """A short id of everything in a model folder that runs (``runtime_files``: a swapped model.onnx
    or an edited meta.json gives another id), hashed from the files: the id ``load_model`` records as
    ``ModelMeta.files``, which keys the result cache and the ONNX cache (tests use this one as the oracle)."""
    return _files_id({p.name: file_sha256(p) for p in runtime_files(model_dir)})


def _files_id(hashes: Mapping[str, str]) -> str:
    """``files_version`` of the SHA-256 of each runtime file (by name, in ``runtime_files`` order)."""
    h = hashlib.sha256()
    for name, digest in hashes.items():
        h.update(f"{name}\0{digest}\n".encode())
    return h.hexdigest()[:12]


def save_model_dir(meta: ModelMeta, config: Any = None, card: str | None = None) -> ModelMeta:
    """Write a model folder's meta.json (``meta.to_json()``) into ``meta.folder``, beside weights
    already there, with config.yaml and MODEL_CARD.md when given (else those are left as they are):
    the one writer of every stage's model folder (classify, segment, detect, adapt) and of a meta
    edited in place (novelty, slide guard). meta.json gets the smear version when it names none,
    and the ``head_hash`` of safetensors weights (the class order the head was trained with).
    Returns the meta as written (no hashes: ``load_model`` reads them)."""
    model_dir = meta.folder
    model_dir.mkdir(parents=True, exist_ok=True)
    content = meta.to_json()
    if "smear_version" not in content:
        content = {"smear_version": __version__, **content}
    missing = [k for k in REQUIRED_META if k not in content]
    if missing:
        raise ModelError(f"{model_dir}: meta lacks {', '.join(missing)}")
    weights = model_dir / str(content["weights"])
    if weights.suffix == ".safetensors" and weights.is_file():
        content[HEAD_HASH] = head_hash(content, model_dir)
    write_text_atomic(model_dir / META, json.dumps(content, indent=2, sort_keys=False) + "\n")
    if config is not None:
        from smear.config import dump_config

        write_text_atomic(model_dir / CONFIG, dump_config(config))
    if card is not None:
        write_text_atomic(model_dir / CARD, card)
    return ModelMeta.of(content, model_dir)


# ---------------------------------------------------------------- pickle without unpickling

_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
                         "SHORT_BINSTRING"})
_PUT_OPS = frozenset({"MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_EXT_OPS = frozenset({"EXT1", "EXT2", "EXT4"})


def pickle_globals(data: bytes, where: str) -> list[tuple[str, str]]:
    """Every (module, name) a pickle would import, read with ``pickletools`` (nothing is run);
    raises ModelError for a pickle whose imports cannot be read that way."""
    import pickletools

    found: list[tuple[str, str]] = []
    memo: dict[int, str | None] = {}
    recent: list[str | None] = []  # the values the last ops pushed, when they are strings
    try:
        for op, arg, _pos in pickletools.genops(data):
            name = op.name
            if name in _STRING_OPS:
                recent.append(arg if isinstance(arg, str) else None)
            elif name in _PUT_OPS:
                memo[len(memo) if name == "MEMOIZE" else int(arg)] = recent[-1] if recent else None
            elif name in _GET_OPS:
                recent.append(memo.get(int(arg)))
            elif name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                found.append((module, attr))
                recent.append(None)
            elif name == "STACK_GLOBAL":
                if len(recent) < 2 or recent[-1] is None or recent[-2] is None:
                    raise ModelError(f"{where}: pickle imports a name it builds at load time; refusing it")
                found.append((recent[-2], recent[-1]))
                recent.append(None)
            elif name in ("FRAME", "PROTO"):
                continue
            elif name in _EXT_OPS:
                raise ModelError(f"{where}: pickle uses the copyreg extension registry; refusing it")
            else:
                recent.append(None)
            del recent[:-2]
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - pickletools raises ValueError and others on junk
        raise ModelError(f"{where}: not a readable pickle ({exc})") from exc
    return found


def check_torch_file(path: str | Path, allowed: Callable[[str, str], bool]) -> None:
    """Refuse a torch ``.pt`` (a zip of pickles) that would import anything ``allowed`` rejects,
    before it is loaded: a model folder never runs code. Raises ModelError naming the file."""
    import zipfile

    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            pickles = [n for n in zf.namelist() if n.endswith(".pkl")]
            if not pickles:
                raise ModelError(f"{path}: holds no pickle; not a torch file")
            for member in pickles:
                for module, name in pickle_globals(zf.read(member), f"{path} ({member})"):
                    if not allowed(module, name):
                        raise ModelError(f"{path}: refusing to load it: its pickle imports {module}.{name}, "
                                         "which is not a model class or tensor type",
                                         hint="model folders are loaded without running code they hold")
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelError(f"{path}: not a torch zip file ({exc}); refusing to unpickle it") from exc


def main(argv: list[str]) -> int:
    """``python -m smear.artifacts FOLDER...``: write each model folder's ``head_hash`` (its meta's
    class order, input size and the weights' tensor shapes), after checking the rest of its contract."""
    if not argv:
        print("usage: python -m smear.artifacts MODEL_FOLDER...", file=sys.stderr)
        return 2
    for arg in argv:
        add_head_hash(arg)
        meta = load_meta(arg)
        load_model(arg, str(meta["stage"]))
        print(f"{arg}: head_hash {meta[HEAD_HASH]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

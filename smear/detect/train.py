"""Train the YOLO detector through ultralytics: merged dataset, resolved config, resumable runs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from smear.config import dump_config
from smear.config_models import DetectConfig, DetectData
from smear.detect.data import load_dataset, read_voc, split_holdout, write_yolo_dataset, clean_boxes
from smear.io import removed_on_failure, write_text_atomic
from smear.errors import RESUME_HINT, SmearError

_log = logging.getLogger(__name__)


def data_dir(cfg: DetectConfig, run_dir: str | Path) -> Path:
    """Where a run's merged YOLO dataset goes: ``data.workdir`` when set, else RUN/detect-data."""
    workdir = cfg.data.workdir
    return Path(workdir) if workdir else Path(run_dir) / "detect-data"


def yolo_data_yaml(path: str | Path) -> Path:
    """The data.yaml of a YOLO dataset given as the file or as a folder holding it."""
    path = Path(path)
    yaml_path = path / "data.yaml" if path.is_dir() else path
    if not yaml_path.is_file() or yaml_path.suffix not in (".yaml", ".yml"):
        raise SmearError(f"{path}: not a YOLO dataset (no data.yaml)",
                         hint="give a data.yaml or the folder `smear data convert --out` wrote")
    return yaml_path


def _has_val(data_yaml: Path) -> bool:
    import yaml

    return "val" in (yaml.safe_load(data_yaml.read_text()) or {})


def _own_dataset(dcfg: DetectData) -> tuple[list, list, list]:
    """Train and val samples and box problems of ``data.yolo``: its val split, or (without one) a
    fixed, seeded ``val_fraction`` of its train split."""
    data_yaml = yolo_data_yaml(dcfg.yolo)
    train, problems = load_dataset(data_yaml, split="train")
    if _has_val(data_yaml):
        val, more = load_dataset(data_yaml, split="val")
        return list(train), list(val), problems + more
    fit, val = split_holdout(train, dcfg.val_fraction, dcfg.seed)
    return fit, val, problems


def _bccd_txl(dcfg: DetectData) -> tuple[list, list, list]:
    """bccd/train (minus a fixed validation part) and txl-pbc train/val, with their box problems."""
    bccd = Path(dcfg.bccd or "")
    if not dcfg.bccd or not (bccd / "train").is_dir():
        raise SmearError(f"{bccd}: BCCD folder with train/ not found",
                         hint="pass --data (a YOLO data.yaml or converted folder) or set data.bccd")
    bccd_train, problems = read_voc(bccd / "train", source="bccd")
    bccd_train, more = clean_boxes(bccd_train)
    problems += more
    bccd_fit, bccd_val = split_holdout(bccd_train, dcfg.bccd_val_fraction, dcfg.seed)
    train, val = list(bccd_fit), list(bccd_val)
    if dcfg.txl:
        for split, bucket in (("train", train), ("val", val)):
            samples, more = load_dataset(dcfg.txl, split=split)
            for s in samples:
                s.source = f"txl-{s.source}" if s.source else "txl"
            bucket += samples
            problems += more
    return train, val, problems


def build_training_data(cfg: DetectConfig, workdir: str | Path, log: Callable[[str], None] = _log.info
                        ) -> Path:
    """Write the training fields into one YOLO folder ``workdir``: ``data.yolo`` when set, else
    bccd/train (minus a fixed validation part) and txl-pbc train/val; returns its data.yaml."""
    dcfg = cfg.data
    train, val, problems = _own_dataset(dcfg) if dcfg.yolo else _bccd_txl(dcfg)
    for p in problems:
        log(f"warning: {p}")
    log(f"detector data: {len(train)} train fields, {len(val)} val fields, {len(problems)} box problems")
    if not train or not val:
        raise SmearError(f"detector data: {len(train)} train and {len(val)} val fields",
                         hint="more fields, or a data.yaml with a val split")
    return write_yolo_dataset({"train": train, "val": val}, Path(workdir))


def val_split_name(dcfg: DetectData) -> str:
    """What the packaged validation figures were measured on, in words."""
    if dcfg.yolo:
        data_yaml = yolo_data_yaml(dcfg.yolo).resolve()
        if _has_val(data_yaml):
            return f"{data_yaml} val"
        return f"{data_yaml} train holdout {dcfg.val_fraction:.0%} seed {dcfg.seed}"
    name = f"bccd/train holdout {dcfg.bccd_val_fraction:.0%} seed {dcfg.seed}"
    return name + (" + txl-pbc/val" if dcfg.txl else "")


def fine_tunes(cfg: DetectConfig) -> bool:
    """Whether the run starts from weights of ours (a .pt) rather than a model YAML."""
    return str(cfg.model).endswith(".pt")


def _keep_threads(model) -> None:
    """ultralytics drops torch to cores-1 threads for CPU training; restore all cores once it starts."""
    from smear.devices import set_threads

    model.add_callback("on_train_start", lambda trainer: set_threads())


def _saved_config(path: Path, cfg: DetectConfig) -> DetectConfig:
    """The run's own config (a run from before the stain jitter has no ``stain:``: none)."""
    import yaml

    return DetectConfig.model_validate(yaml.safe_load(path.read_text())) if path.exists() else cfg


def _trainer(cfg: DetectConfig):
    """The ultralytics trainer class for a config: with our stain jitter unless ``stain.p`` is 0."""
    from smear.detect.stain import StainJitter
    from smear.detect.ultralytics_adapter import stain_trainer

    if cfg.stain is None or cfg.stain.p <= 0:
        return None
    return stain_trainer(StainJitter(**cfg.stain.model_dump()))


LAST = "weights/last.pt"  # ultralytics' checkpoint, written after every epoch


def train(cfg: DetectConfig, out: Path, resume: bool = False,
          log: Callable[[str], None] = _log.info, on_batch: Callable[[int, int, int], None] | None = None
          ) -> Path:
    """Train (or resume) a detector run in ``out``; returns the run folder with weights/best.pt.
    ultralytics' log is summarised into ``log`` (a line per epoch); ``on_batch(epoch, done, total)``
    follows each epoch. A run folder this call made is removed again if it fails before its first
    checkpoint; one with a checkpoint is refused unless ``resume``."""
    out = Path(out).resolve()
    if (out / LAST).exists() and not resume:
        raise SmearError(f"{out}: run folder exists and has a checkpoint", hint=RESUME_HINT)
    with removed_on_failure(out, LAST):
        return _train(cfg, out, resume, log, on_batch)


def _train(cfg: DetectConfig, out: Path, resume: bool, log: Callable[[str], None],
           on_batch: Callable[[int, int, int], None] | None) -> Path:
    from smear.detect.network import yolo
    from smear.detect.ultralytics_adapter import training_log
    from smear.devices import resolve_device, set_threads

    last = out / LAST
    if resume:
        if not last.exists():
            raise SmearError(f"{last}: nothing to resume", hint="start without --resume")
        model = yolo(last)
        _keep_threads(model)
        saved = out / "smear_config.yaml"  # the run's own config says whether it jitters stains
        with training_log(model, log, on_batch):
            model.train(resume=True, trainer=_trainer(_saved_config(saved, cfg)))
        set_threads()
        return out
    if fine_tunes(cfg) and not Path(cfg.model).is_file():
        raise SmearError(f"{cfg.model}: weights to fine-tune from not found",
                         hint="set model to a run's weights/best.pt or to a model YAML")
    data_yaml = build_training_data(cfg, data_dir(cfg, out), log)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "smear_config.yaml", dump_config(cfg))
    t = cfg.train.model_dump()
    device = resolve_device(t.pop("device"))
    model = yolo(cfg.model)
    _keep_threads(model)
    with training_log(model, log, on_batch):
        model.train(
            data=str(data_yaml), project=str(out.parent), name=out.name, exist_ok=True,
            device="cpu" if device.type == "cpu" else device.index or 0,
            pretrained=fine_tunes(cfg),  # ultralytics drops a loaded .pt's weights when this is False
            amp=device.type == "cuda", plots=False, verbose=False, trainer=_trainer(cfg), **t,
        )
    set_threads()
    return out


def package(run_dir: Path, cfg: DetectConfig, model_dir: Path, device: str = "auto",
            log: Callable[[str], None] = _log.info) -> Path:
    """Turn a finished run into a model folder: weights, thresholds tuned on validation, meta, config."""
    from datetime import date

    from smear.artifacts import ModelMeta, data_fingerprint, save_model_dir
    from smear.detect.data import load_dataset
    from smear.detect.evaluate import evaluate_predictions, predict_samples, tune_conf
    from smear.detect.settings import YoloSettings
    from smear.detect.yolo import YoloDetector

    run_dir, model_dir = Path(run_dir), Path(model_dir)
    best = run_dir / "weights" / "best.pt"
    if not best.exists():
        raise SmearError(f"{best}: run has no best weights yet")
    model_dir.mkdir(parents=True, exist_ok=True)
    from smear.detect.network import NETWORK, WEIGHTS, read_pt, save_network

    save_network(read_pt(best), model_dir)  # the folder holds no pickle: safetensors + network.yaml
    infer = cfg.infer.model_dump()
    data_yaml = data_dir(cfg, run_dir) / "data.yaml"
    val, _ = load_dataset(data_yaml, split="val")
    scored = YoloSettings.of({k: infer[k] for k in ("imgsz", "iou", "max_det", "border")} | {"conf": 0.001})
    det = YoloDetector(model_dir / WEIGHTS, scored, device=device)  # every box scored, to tune the thresholds
    preds = predict_samples(det, val)
    conf = tune_conf(val, preds)
    metrics = evaluate_predictions(val, preds, conf)
    log(f"validation: mAP50 {metrics['map50']}, tuned conf {({k.value: v for k, v in conf.items()})}")
    infer["per_class_conf"] = {k.value: v for k, v in conf.items()}
    infer["conf"] = min(conf.values())
    meta = ModelMeta(folder=model_dir, stage="detect", weights=WEIGHTS, classes=("wbc", "rbc", "platelet"),
                     infer=infer, trained=date.today().isoformat(), extra={
                         "network": NETWORK, "architecture": Path(det.model.model.yaml.get("yaml_file", cfg.model)).name,
                         "input": {"imgsz": infer["imgsz"], "color": "RGB in, BGR to ultralytics"},
                         "metrics": {"val": {"split": val_split_name(cfg.data), **metrics}},
                         "data_fingerprint": data_fingerprint(s.image for s in val),
                         **({"fine_tuned_from": str(cfg.model)} if fine_tunes(cfg) else {})})
    save_model_dir(meta, cfg)
    return model_dir

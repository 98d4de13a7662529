"""A trained classifier's meta.json and MODEL_CARD.md: what it is, how it was trained, its figures."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from smear.artifacts import ModelMeta, data_fingerprint
from smear.classify.model import WEIGHTS
from smear.classify.sources import TrainingData
from smear.config_models import ClassifyConfig
from smear.taxonomy import FINE_CLASSES

#: the figures of each part the meta keeps (the test part adds its per-class table)
HEAD = ("n", "accuracy", "macro_f1", "kappa", "ece", "nll", "auc_macro", "group8_accuracy", "group8_macro_f1",
        "type5_accuracy", "type5_macro_f1")


@dataclass(frozen=True)
class Scored:
    """The temperature fitted on val, its calibration report, and the figures of val and test (with
    the test items that could be read)."""

    temperature: float
    calibration: dict[str, Any]
    val: dict[str, Any]
    test: dict[str, Any]
    test_items: list[Any]


#: how a classifier's crops are cut (meta.json's ``crop``)
CROP = ("square of side = long side of the WBC box x crop_margin, resized to input_size (smear.crops.cut_crop); "
        "training boxes from smear.classify.cellbox.find_cell_box")


def classifier_meta(cfg: ClassifyConfig, folder: Path, data: TrainingData, scored: Scored,
                    mean_std: tuple[list[float], list[float]], colour: dict[str, Any] | None, best_epoch: int,
                    wall_seconds: float) -> ModelMeta:
    """The meta of a classifier trained on ``data``, for its model folder ``folder`` (before its
    novelty score is fitted): ``mean_std`` is its input normalisation, ``colour`` its colour one."""
    m, d = cfg.model, cfg.data
    mean, std = mean_std
    fingerprint = data_fingerprint(it.path for it in [*data.train_items, *data.val_items, *scored.test_items])
    sources = ({"sources": [{k: v for k, v in spec.items() if k != "split"} for spec in data.specs]}
               if len(data.specs) > 1 else {})
    return ModelMeta(
        folder=Path(folder), stage="classify", weights=WEIGHTS, classes=FINE_CLASSES,
        trained=date.today().isoformat(), arch=m.arch, input_size=int(m.input_size),
        crop_margin=float(m.crop_margin), normalize={"mean": mean, "std": std, "input_range": "RGB in [0, 1]"},
        temperature=round(float(scored.temperature), 6), tta=int(m.tta), norm=str(m.norm), colour_norm=colour or None,
        extra={
            "crop": CROP, **({"head": str(m.head)} if str(m.head) != "flat" else {}),
            "metrics": {"split": "test", "split_file": "split.json (run folder)",
                        "test": {k: scored.test[k] for k in HEAD} | {"per_class": scored.test["per_class"]},
                        "val": {k: scored.val[k] for k in HEAD}, "calibration": {"split": "val", **scored.calibration}},
            "data": {"root": str(d.root), "fingerprint": fingerprint, "n_train": len(data.train_items),
                     "n_val": len(data.val_items), "n_test": len(scored.test_items), "split_seed": d.split_seed,
                     **sources},
            **({"fine_tuned_from": str(m.init)} if m.init else {}),
            "data_fingerprint": fingerprint,
            "training": {"best_epoch": best_epoch, "wall_minutes": round(wall_seconds / 60, 1)},
        })


def model_card(meta: Mapping[str, Any] | ModelMeta) -> str:
    """The MODEL_CARD.md of a classifier model folder, from its meta."""
    tm, cal = meta["metrics"]["test"], meta["metrics"]["calibration"]

    def f(v):
        return "n/a" if v is None else f"{v:.3f}"
    rows = "\n".join(f"| {c} | {f(p['precision'])} | {f(p['recall'])} | {f(p['f1'])} | {p['support']} |"
                     for c, p in tm["per_class"].items())
    sources = meta["data"].get("sources") or [{"name": "data", "root": meta["data"]["root"], "weight": 1.0}]
    trained = ("Fine-tuned from " + meta["fine_tuned_from"] if meta.get("fine_tuned_from") else "Trained from scratch")
    trained += " on " + ", ".join(f"{s_['name']} ({s_['root']}, sampling weight {s_['weight']:g})" for s_ in sources)
    colour = ", Reinhard colour normalisation to the training reference" if meta.get("colour_norm") else ""
    head = ("; a lineage-first head (the neutrophil line or each other class first, then the stage within the "
            "neutrophil line)") if meta.get("head", "flat") == "hierarchical" else ""
    novelty = ""
    if meta.get("novelty"):
        nv = meta["novelty"]
        novelty = (f"\nA per-cell novelty score ({nv['method']}) sends cells unlike every training class to "
                   f"UNIDENTIFIED: threshold {nv['threshold']} (validation quantile {nv['quantile']}).")
    return f"""# Leukocyte classifier ({meta['arch']}, {meta['input_size']} px)

11 fine classes ({', '.join(meta['classes'])}) from single-cell crops: a square of side = the
WBC box's long side x {meta['crop_margin']}, resized to {meta['input_size']} px. {trained};
{meta.get('norm', 'batch')} normalisation layers{colour}{head}; temperature-scaled on the validation split
(T = {meta['temperature']:.3f}); predictions average {meta['tta']} rotation/flip view(s) of each crop.{novelty}

## Test split of the first source (n = {tm['n']}; data fingerprint {meta['data_fingerprint']})
accuracy {f(tm['accuracy'])}, macro-F1 {f(tm['macro_f1'])}, Cohen's kappa {f(tm['kappa'])};
8-group accuracy {f(tm['group8_accuracy'])}, 5-type accuracy {f(tm['type5_accuracy'])};
ECE {f(tm['ece'])} (val ECE {cal['ece_before']:.3f} before, {cal['ece_after']:.3f} after scaling).

| class | precision | recall | F1 | n |
|---|---|---|---|---|
{rows}

## Limits
Figures are for PBC's own lab, stain and scanner. Other labs' images differ in stain, focus and
resolution; measure on them (e.g. at the 5-type level) before trusting these numbers there.
Not a medical device: cells under the review threshold must be checked by a person.
"""

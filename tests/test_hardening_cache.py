"""Hardening of the result cache and the model hashes (smear/pipeline/cache.py, build.py, smear/nn/onnx.py):
entries are verified, and what is hashed is what runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from hostile import CLASSICAL, runner, slide
from smear.cli import app


def _other_onnx(folder: Path, dest: Path) -> Path:
    """The ONNX of another classifier: ``folder``'s network with its output rows reversed."""
    import torch

    from smear.classify.model import CnnClassifier
    from smear.nn.onnx import export_module

    net = CnnClassifier.from_dir(folder, device="cpu").model
    head = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        head.weight.copy_(head.weight.flip(0))
        head.bias.copy_(head.bias.flip(0))
    return export_module(net, dest, 128)


@pytest.mark.slow
def test_a_swapped_model_onnx_changes_the_audit_and_the_resume_key(tmp_path):
    from smear.artifacts import shipped_dir
    from smear.config import load_config
    from smear.pipeline.build import audit_info, stages_version
    from smear.pipeline.onnx_export import export_model_dir

    genuine = tmp_path / "clf"
    export_model_dir("classifier", shipped_dir("classifier"), genuine)
    real, fake = (genuine / "model.onnx").read_bytes(), _other_onnx(genuine, tmp_path / "other.onnx").read_bytes()
    shutil.copytree(Path(__file__).parents[1] / "examples" / "slide_demo", tmp_path / "s")
    sets = ["detector=classical", f"classifier_model={genuine}", "runtime=onnx", f"cache_dir={tmp_path / 'cache'}"]
    cfg = load_config("pipeline", None, sets)

    def labels(name: str) -> list[list[str]]:
        out = tmp_path / name
        args = ["run", str(tmp_path / "s"), "--report", "csv", "--cells", str(out), "--resume"]
        res = runner.invoke(app, args + [x for s in sets for x in ("--set", s)])
        assert res.exit_code == 0, res.output
        cells = pd.read_csv(out, dtype=str, keep_default_na=False)
        return cells[cells["kind"] == "wbc"][["label", "prob"]].values.tolist()

    first, key, audit = labels("a.csv"), stages_version(cfg), audit_info(cfg, "r")
    assert first
    (genuine / "model.onnx").write_bytes(fake)
    assert stages_version(cfg) != key, "the resume key does not cover model.onnx"
    assert audit_info(cfg, "r")["models"] != audit["models"], "the audit does not show model.onnx"
    swapped = labels("b.csv")
    assert swapped != first  # the swapped network ran: no genuine result was taken from the cache
    (genuine / "model.onnx").write_bytes(real)
    assert labels("c.csv") == first  # and the genuine folder gets no result of the swapped one


def test_the_onnx_cache_key_covers_meta_json(tmp_path, monkeypatch):
    """An ONNX made from torch weights is kept under a name that changes with meta.json too."""
    import json

    from hostile import copy_model

    import smear.nn.onnx as onnx
    from smear.artifacts import load_model

    names = []
    monkeypatch.setattr(onnx, "cached_onnx", lambda path, make: names.append(path.name) or path)
    folder = copy_model("classifier", tmp_path / "clf")
    onnx.onnx_for(load_model(folder, "classify"), "classify", lambda: None)
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "crop_margin": 1.5}))
    onnx.onnx_for(load_model(folder, "classify"), "classify", lambda: None)
    assert len(set(names)) == 2, names


# ------------------------------------------------------------------ from issue 16's probe


def _cache_entries(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*.json"))


def test_a_tampered_cache_entry_is_refused_on_resume(tmp_path):
    slide(tmp_path / "s", seeds=(1,))
    cache = tmp_path / "cache"
    args = ["run", str(tmp_path / "s"), "--report", "csv", *CLASSICAL, "--set", f"cache_dir={cache}"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    [entry] = _cache_entries(cache)
    stored = json.loads(entry.read_text())
    stored["result"]["detections"] += [[[1.0, 1.0, 20.0, 20.0], "wbc", 0.9]] * 40  # 40 fake white cells
    entry.write_text(json.dumps(stored))
    res = runner.invoke(app, args + ["--resume"])
    assert res.exit_code == 0, res.output
    assert "cached result refused (checksum mismatch)" in res.stderr
    assert res.stdout == first.stdout  # the field was run again


def _entry(**cell):
    base = {"det": 0, "label": "BA", "prob": 0.9, "probs": {"BA": 0.9, "LY": 0.1}, "mask": None, "novelty": None}
    return {"width": 100, "height": 80, "detections": [[[10.0, 10.0, 40.0, 40.0], "wbc", 0.9],
                                                       [[50.0, 10.0, 70.0, 30.0], "rbc", 0.8]],
            "cells": [{**base, **cell}]}


@pytest.mark.parametrize("data,reason", [
    (_entry(det=-1), "not an index"),
    (_entry(det=999), "not an index"),
    (_entry(det=1), "not at a WBC"),
    (_entry(prob=float("nan")), "not a finite number"),
    (_entry(probs={"BA": float("nan")}), "not a finite number"),
    (_entry(label="XX"), "unknown label"),
    (_entry(label="LY"), "not its most probable"),
    (_entry(prob=0.2), "not its top probability"),
    ({**_entry(), "detections": [[[10.0, 10.0, 400.0, 40.0], "wbc", 0.9]]}, "outside"),
    ({**_entry(), "detections": [[[10.0, 10.0, 40.0, 40.0], "wbc", 1.5]]}, "outside"),
    ({**_entry(), "cells": [_entry()["cells"][0]] * 2}, "not at a WBC of its own"),
])
def test_cache_entries_outside_the_schema_are_refused(data, reason):
    from smear.pipeline.cache import BadEntry, field_from_dict

    with pytest.raises(BadEntry, match=reason):
        field_from_dict(data, "s", "f.png", "f.png")
    field_from_dict(_entry(), "s", "f.png", "f.png")  # the untouched entry is fine


def test_cache_key_changes_with_a_detector_meta(tmp_path):
    import shutil

    from smear.artifacts import shipped_dir
    from smear.config import default_config
    from smear.pipeline.build import stages_version

    copy = tmp_path / "det"
    shutil.copytree(shipped_dir("detector"), copy)
    cfg = default_config("pipeline").model_copy(update={"detector_model": str(copy)})
    before = stages_version(cfg)
    meta = json.loads((copy / "meta.json").read_text())
    meta.setdefault("infer", {})["per_class_conf"] = {"wbc": 0.9, "rbc": 0.9, "platelet": 0.9}
    (copy / "meta.json").write_text(json.dumps(meta))
    assert stages_version(cfg) != before
    assert stages_version(cfg.model_copy(update={"device": "cuda:0"})) != stages_version(cfg)


def test_an_unwritable_cache_folder_warns_once(tmp_path):
    slide(tmp_path / "s", seeds=(1, 2, 3))
    blocked = tmp_path / "cache_is_a_file"
    blocked.write_text("x")
    res = runner.invoke(app, ["run", str(tmp_path / "s"), "--report", "csv", *CLASSICAL,
                              "--set", f"cache_dir={blocked}"])
    assert res.exit_code == 0, res.output
    assert res.stderr.count("cannot write the result cache") == 1 and "--resume" in res.stderr

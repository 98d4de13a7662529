"""Hardening of the result cache and the model hashes (smear/pipeline/build.py, smear/nn/onnx.py):
what is hashed is what runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from hostile import runner
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
    from smear.pipeline.export import export_model_dir

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

    import smear.nn.onnx as onnx
    from hostile import copy_model

    names = []
    monkeypatch.setattr(onnx, "cached_onnx", lambda path, make: names.append(path.name) or path)
    folder = copy_model("classifier", tmp_path / "clf")
    onnx.onnx_for(folder, "classify", lambda: None)
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "crop_margin": 1.5}))
    onnx.onnx_for(folder, "classify", lambda: None)
    assert len(set(names)) == 2, names

"""Hardening of `smear export` (smear/pipeline/onnx_export.py): it never deletes."""

from __future__ import annotations

import json
from pathlib import Path


from hostile import one_line_error, runner
from smear.cli import app


def _fake_model_dir(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"stage": "classify", "weights": "w.bin", "classes": ["A"]}))
    (folder / "w.bin").write_bytes(b"weights")
    return folder


def test_export_into_a_folder_with_files_is_refused_and_force_deletes_nothing(tmp_path, monkeypatch):
    import smear.pipeline.onnx_export as rt

    out = tmp_path / "exported"
    (out / "classifier").mkdir(parents=True)
    mine = out / "classifier" / "notes.txt"
    mine.write_text("my notes")
    model = _fake_model_dir(tmp_path / "model")
    res = runner.invoke(app, ["export", "--out", str(out), "--stage", "classifier",
                              "--set", f"classifier_model={model}"])
    one_line_error(res, "not empty")
    assert mine.read_text() == "my notes"

    monkeypatch.setattr(rt, "export_module", lambda module, path, size: Path(path).write_bytes(b"onnx") or path)
    import smear.classify.model as cm

    monkeypatch.setattr(cm.CnnClassifier, "from_dir", classmethod(lambda cls, d, device="cpu": type("M", (), {"model": None})()))
    (model / "meta.json").write_text(json.dumps({"stage": "classify", "weights": "w.bin", "classes": ["A"],
                                                 "input_size": 8}))
    res = runner.invoke(app, ["export", "--out", str(out), "--stage", "classifier", "--force",
                              "--set", f"classifier_model={model}"])
    assert res.exit_code == 0, res.output
    assert mine.read_text() == "my notes"  # --force replaced only what the export writes
    assert (out / "classifier" / "w.bin").read_bytes() == b"weights" and (out / "classifier" / "model.onnx").exists()

"""Hardening of model folders and checkpoints (smear/artifacts.py): a meta.json that lies about its
weights is refused when the folder loads, in one error line naming the file and the key; a pickle
payload in a training checkpoint is refused unrun."""

from __future__ import annotations

import json

import pytest

from hostile import Payload, copy_model, one_line_error, runner, slide
from smear.cli import app
from smear.taxonomy import FINE_CLASSES


def _swap(classes, a, b):
    out = list(classes)
    i, j = out.index(a), out.index(b)
    out[i], out[j] = out[j], out[i]
    return out


_CLF = ["--set", "detector=classical"]
_DET = ["--set", "classifier=off"]
CASES = {
    "classes LY and MO swapped": ("classifier", {"classes": _swap(FINE_CLASSES, "LY", "MO")}, "head_hash", _CLF),
    "PLATELET renamed": ("classifier", {"classes": [*FINE_CLASSES[:-1], "PLT"]}, "classes", _CLF),
    "temperature 0": ("classifier", {"temperature": 0}, "temperature", _CLF),
    "temperature -1": ("classifier", {"temperature": -1}, "temperature", _CLF),
    "input_size 64": ("classifier", {"input_size": 64}, "head_hash", _CLF + ["--set", "runtime=torch"]),
    "weights a .pt": ("classifier", {"weights": "model.pt"}, "weights", _CLF),
    "detector classes reordered": ("detector", {"classes": ["rbc", "wbc", "platelet"]}, "head_hash", _DET),
    "detector class blob": ("detector", {"classes": ["wbc", "rbc", "blob"]}, "classes", _DET),
    "segmenter classes reordered": ("segmenter", {"classes": ["background", "nucleus", "cytoplasm"]}, "head_hash",
                                    _CLF + ["--segment", "unet"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_model_folder_whose_meta_lies_is_refused_at_load(tmp_path, case):
    name, changes, key, extra = CASES[case]
    folder = copy_model(name, tmp_path / name, **changes)
    if "weights" in changes:
        (folder / changes["weights"]).write_bytes((folder / "model.safetensors").read_bytes())
    slide(tmp_path / "s", seeds=(1,))
    setting = {"classifier": "classifier_model", "detector": "detector_model", "segmenter": "segmenter_model"}[name]
    res = runner.invoke(app, ["run", str(tmp_path / "s"), "--set", f"{setting}={folder}", "--set", "cache_dir=off",
                              *extra])
    one_line_error(res, "meta.json", key)


def test_the_shipped_model_folders_keep_their_contract():
    from smear.artifacts import head_hash, load_model, shipped_dir

    for name, stage in (("detector", "detect"), ("detector_stain", "detect"), ("classifier", "classify"),
                        ("classifier_mobilenet", "classify"), ("segmenter", "segment")):
        meta = load_model(shipped_dir(name), stage)
        assert meta["head_hash"] == head_hash(meta, shipped_dir(name))


def test_a_meta_without_head_hash_is_refused_and_sealing_names_it(tmp_path):
    from smear.artifacts import load_model, main

    folder = copy_model("classifier", tmp_path / "clf")
    meta = json.loads((folder / "meta.json").read_text())
    del meta["head_hash"]
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(Exception, match="head_hash"):
        load_model(folder, "classify")
    assert main([str(folder)]) == 0
    assert load_model(folder, "classify")["head_hash"]


# ------------------------------------------------------------------ from issue 16's probe


def test_a_training_checkpoint_with_a_pickle_payload_is_refused_unrun(tmp_path):
    import torch

    from smear.nn.loop import load_checkpoint
    from smear.errors import ModelError

    marker = tmp_path / "PWNED"
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"model": {}, "epoch": Payload(marker)}, ckpt)
    with pytest.raises(ModelError, match="checkpoint.pt: refusing to load"):
        load_checkpoint(ckpt, None, None, None, None)
    assert not marker.exists()

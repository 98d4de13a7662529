"""CnnClassifier save/load and probabilities; one tiny training run end to end, and resume."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from test_classify_data import PBC_FOLDERS, draw_cell, make_pbc

from smear.artifacts import ModelMeta, load_meta, save_model_dir
from smear.classify.model import WEIGHTS, CnnClassifier, build_model
from smear.nn.tensors import crops_to_tensor
from smear.nn.weights import save_weights
from smear.config import load_config
from smear.errors import ModelError
from smear.taxonomy import FINE_CLASSES
from smear.types import Classifier

TINY = "test_efficientnet"  # timm's own test network: ~0.1 M parameters


def _model_dir(tmp_path, temperature=1.0):
    torch.manual_seed(0)
    model = build_model(TINY)
    d = tmp_path / "clf"
    d.mkdir()
    save_weights(model, d / WEIGHTS)
    meta = {"stage": "classify", "weights": WEIGHTS, "classes": list(FINE_CLASSES), "arch": TINY,
            "input_size": 32, "crop_margin": 1.3, "temperature": temperature,
            "normalize": {"mean": [0.8, 0.7, 0.75], "std": [0.2, 0.2, 0.2]}}
    save_model_dir(ModelMeta.of(meta, d), {"model": {"arch": TINY}})
    return model, d


def test_save_load_gives_identical_probabilities(tmp_path):
    model, d = _model_dir(tmp_path, temperature=1.7)
    crops = [draw_cell(32, seed=i) for i in range(5)]
    clf = CnnClassifier.from_dir(d, device="cpu", batch=2)
    assert isinstance(clf, Classifier)
    assert (clf.crop_margin, clf.input_size) == (1.3, 32)
    scores = clf.classify(crops)
    assert len(scores) == 5 and scores.classes == tuple(FINE_CLASSES) and scores.novelty is None
    assert list(scores.probs_of(0)) == list(FINE_CLASSES) and np.allclose(scores.probs.sum(1), 1.0, atol=1e-6)
    # by hand: normalise, forward, divide by T
    model.eval()
    x = (crops_to_tensor(crops, 32) - torch.tensor([0.8, 0.7, 0.75]).view(1, 3, 1, 1)) / 0.2
    with torch.no_grad():
        want = torch.softmax(model(x) / 1.7, 1).numpy()
    np.testing.assert_allclose(clf.classify(crops).probs, want, atol=1e-6)
    again = CnnClassifier.from_dir(d, device="cpu", batch=2).classify(crops)
    assert np.array_equal(again.probs, scores.probs)  # bit-identical with the same batching


def test_crops_of_other_sizes_are_resized(tmp_path):
    _, d = _model_dir(tmp_path)
    clf = CnnClassifier.from_dir(d, device="cpu")
    probs = clf.classify([draw_cell(80, seed=1), draw_cell(20, seed=2)]).probs
    assert probs.shape == (2, len(FINE_CLASSES)) and np.allclose(probs.sum(1), 1)
    assert len(clf.classify([])) == 0
    with pytest.raises(ValueError, match="uint8"):
        clf.classify([np.zeros((32, 32), np.uint8)])


def test_not_a_classifier_folder(tmp_path):
    _, d = _model_dir(tmp_path)
    meta = json.loads((d / "meta.json").read_text())
    meta["stage"] = "detect"
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="not a classifier"):
        CnnClassifier.from_dir(d)


def _cfg(root, cache, epochs):
    return load_config("classify", overrides=[
        f"model.arch={TINY}", "model.input_size=32", f"data.root={root}", f"data.cache_dir={cache}",
        f"train.epochs={epochs}", "train.batch=16", "train.threads=2", "train.device=cpu",
        "train.patience=0", "data.workers=2",
    ])


@pytest.mark.slow
def test_train_end_to_end_then_resume(tmp_path):
    """A 1-epoch run writes everything; resuming to 2 epochs equals a 2-epoch run."""
    from smear.classify.train import train

    # 13 prefixes x 4 images, incl. NEUTROPHIL and IG: 2 train, 1 val, 1 test each
    root = make_pbc(tmp_path / "pbc", {p: 4 for p in PBC_FOLDERS}, size=40)
    out = tmp_path / "run"
    lines: list[str] = []
    model_dir = train(_cfg(root, tmp_path / "cache", 1), out, log=lines.append)
    assert model_dir == out / "model"
    for name in ("config.yaml", "split.json", "log.csv", "checkpoint.pt", "best.safetensors",
                 "test_metrics.json", "test_confusion.png"):
        assert (out / name).is_file(), name
    meta = load_meta(model_dir)
    assert meta["stage"] == "classify" and meta["classes"] == list(FINE_CLASSES)
    assert meta["arch"] == TINY and meta["input_size"] == 32 and meta["crop_margin"] == 1.3
    assert meta["temperature"] > 0 and len(meta["normalize"]["mean"]) == 3
    assert meta["metrics"]["split"] == "test" and "ece_after" in meta["metrics"]["calibration"]
    assert len(meta["data_fingerprint"]) == 16
    assert (model_dir / "MODEL_CARD.md").is_file() and (model_dir / WEIGHTS).is_file()
    split = json.loads((out / "split.json").read_text())
    assert any(row[1] is None for row in split["train"])  # group-only items are trained on
    clf = CnnClassifier.from_dir(model_dir, device="cpu")
    assert np.allclose(clf.classify([draw_cell(48)]).probs.sum(), 1.0)

    with pytest.raises(Exception, match="not empty"):
        train(_cfg(root, tmp_path / "cache", 1), out, log=lines.append)
    train(_cfg(root, tmp_path / "cache", 2), out, resume=True, log=lines.append)
    with open(out / "log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[0]["train_images_per_s"]) > 0 and float(rows[1]["wall_seconds"]) > 0
    assert any("resume: from epoch 1" in line for line in lines)
    assert any("from cache" in line for line in lines)
    # the resumed run is bit-identical to an uninterrupted one
    train(_cfg(root, tmp_path / "cache", 2), tmp_path / "run2", log=lines.append)
    a = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "run2" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)



def test_tta_over_all_eight_views_is_rotation_invariant():
    import numpy as np
    import torch

    from smear.classify.model import CnnClassifier
    from smear.nn.tensors import dihedral

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(11))
    meta = {"classes": ["SNE", "BNE", "MMY", "MY", "PMY", "EO", "BA", "LY", "MO", "ERB", "PLATELET"],
            "crop_margin": 1.3, "input_size": 16, "tta": 8}
    clf = CnnClassifier(net, ModelMeta.of(meta), device="cpu")
    crop = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    turned = np.ascontiguousarray(np.rot90(crop))
    a, b = clf.outputs([crop])[0], clf.outputs([turned])[0]
    assert torch.allclose(a, b, atol=1e-5)
    clf.tta = 1
    assert not torch.allclose(clf.outputs([crop])[0], clf.outputs([turned])[0], atol=1e-5)  # one view is not
    x = torch.arange(4.0).view(1, 1, 2, 2)
    assert len({tuple(dihedral(x, k).flatten().tolist()) for k in range(8)}) == 8

"""Other labs: several training sources, GroupNorm, colour normalisation, down-resolution, AdaBN,
the novelty score, the domain guard and the WBC plausibility check, on synthetic data."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
from test_classify_data import make_folders, make_pbc
from typer.testing import CliRunner

from smear.artifacts import ModelMeta
from smear.nn import augment as A
from smear.classify import novelty as nov
from smear.nn.colour import lab_stats, reinhard
from smear.classify.evaluate import lab_row
from smear.classify.model import adapt_batchnorm, build_model
from smear.classify.sources import epoch_order, source_specs
from smear.cli import app
from smear.config import default_config
from smear.report.summary import differential
from smear.errors import ConfigError
from smear.taxonomy import FINE_CLASSES, UNIDENTIFIED, CellKind
from smear.types import CellPrediction, Detection, FieldResult, SlideReport

CFG = default_config("pipeline")


# ---------------------------------------------------------------- staging from a git clone


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t", *args],
                   check=True, capture_output=True)


def test_stage_raabin_reads_files_from_the_commit_not_the_tree(tmp_path):
    from test_classify_data import write_png

    repo = tmp_path / "clone"
    for part, cls, n in (("Train", "Basophil", 2), ("Train", "Neutrophil", 3), ("Test", "Lymphocyte", 1)):
        for i in range(n):
            write_png(repo / "Dataset" / part / cls / f"{i}.jpg", np.full((8, 8, 3), 200, np.uint8))
    (repo / "Dataset" / "Train" / "notes.txt").write_text("not an image")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "data")
    sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    _git(repo, "rm", "-rq", "Dataset")
    _git(repo, "commit", "-qm", "data removed at HEAD")
    out = tmp_path / "raabin"
    res = CliRunner().invoke(app, ["data", "stage-raabin", str(repo), "--out", str(out), "--commit", sha])
    assert res.exit_code == 0, res.output
    assert "train: 5 images Basophil 2, Neutrophil 3" in res.stdout and "test: 1 images Lymphocyte 1" in res.stdout
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.jpg")) == [
        "test/Lymphocyte/0.jpg", "train/Basophil/0.jpg", "train/Basophil/1.jpg",
        "train/Neutrophil/0.jpg", "train/Neutrophil/1.jpg", "train/Neutrophil/2.jpg"]
    again = CliRunner().invoke(app, ["data", "stage-raabin", str(repo), "--out", str(out), "--commit", sha])
    assert again.exit_code != 0 and "already exists" in again.stderr
    bad = CliRunner().invoke(app, ["data", "stage-raabin", str(repo), "--out", str(tmp_path / "x"),
                                   "--commit", "0" * 40])
    assert bad.exit_code != 0 and f"commit {'0' * 40} not found" in bad.stderr and not (tmp_path / "x").exists()


# ---------------------------------------------------------------- sources and sampling


def test_source_specs_fill_defaults_and_reject_unknown_keys():
    d = default_config("classify").data
    assert source_specs(d)[0]["root"] == d.root
    specs = source_specs(d.model_copy(update={"sources": [{"root": "/a/pbc"}, {"name": "lab", "root": "/b", "weight": 3}]}))
    assert [(s["name"], s["weight"], s["layout"]) for s in specs] == [("pbc", 1.0, "auto"), ("lab", 3.0, "auto")]
    with pytest.raises(ConfigError, match=r"sources\[0\]: unknown key\(s\) wieght"):
        source_specs(d.model_copy(update={"sources": [{"root": "/a", "wieght": 2}]}))
    with pytest.raises(ConfigError, match="given twice"):
        source_specs(d.model_copy(update={"sources": [{"root": "/a/x"}, {"root": "/b/x"}]}))


def test_epoch_order_draws_each_source_by_its_weight():
    src = np.array([0] * 100 + [1] * 10)
    order = epoch_order(src, [1.0, 1.0], 200, seed=0, epoch=1)
    assert len(order) == 200
    assert (src[order] == 0).sum() == 100 and (src[order] == 1).sum() == 100
    assert len(set(order[src[order] == 0])) == 100  # the big source: each item once
    assert set(order[src[order] == 1]) == set(range(100, 110))  # the small one cycled through
    assert list(epoch_order(src, [1.0, 1.0], 200, 0, 1)) == list(order)  # seeded
    one = epoch_order(np.zeros(7, int), [1.0], None, 0, 3)
    assert sorted(one) == list(range(7)) and list(one) == list(np.random.default_rng([0, 3]).permutation(7))


@pytest.mark.slow
def test_two_source_training_with_group_norm_reinhard_exclusion_and_novelty(tmp_path):
    """PBC plus a class-per-folder lab (Neutrophil = group only), one class left out of training:
    the run trains, the model folder carries GroupNorm, the colour reference and a novelty score."""
    import json

    pbc = make_pbc(tmp_path / "pbc", {p: 4 for p in ("SNE", "BNE", "LY", "MO", "EO", "BA")}, size=40)
    lab = make_folders(tmp_path / "lab", {"Neutrophil": 6, "Lymphocyte": 6}, size=40)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""data:
  sources:
    - {{name: pbc, root: {pbc}, weight: 1.0, exclude: [BA]}}
    - {{name: lab, root: {lab}, layout: folders, weight: 2.0, split_fractions: [0.6, 0.4, 0.0]}}
  cache_dir: {tmp_path / 'cache'}
""")
    sets = ["model.arch=test_efficientnet", "model.input_size=32", "model.norm=group", "model.colour_norm=reinhard",
            "model.head=hierarchical", "train.epochs=1", "train.batch=8", "train.epoch_items=24", "train.device=cpu", "train.patience=0",
            "train.augment.downres_p=0.5", "train.augment.jpeg_p=0.5", "train.augment.gray_p=0.2"]
    args = ["train", "classify", "--out", str(tmp_path / "run"), "--config", str(cfg)]
    for s in sets:
        args += ["--set", s]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    assert (run / "split.json").is_file() and (run / "split_lab.json").is_file()
    train = json.loads((run / "split.json").read_text())["train"]
    meta = json.loads((run / "model" / "meta.json").read_text())
    assert meta["norm"] == "group" and meta["colour_norm"]["method"] == "reinhard" and meta["head"] == "hierarchical"
    assert [s["name"] for s in meta["data"]["sources"]] == ["pbc", "lab"]
    assert "a lineage-first head" in (run / "model" / "MODEL_CARD.md").read_text()
    assert meta["novelty"]["threshold"] > 0 and (run / "model" / nov.NOVELTY_FILE).is_file()
    lab_train = json.loads((run / "split_lab.json").read_text())["train"]
    n_ba = sum(1 for row in train if row[1] == "BA")
    assert n_ba > 0 and meta["data"]["n_train"] == len(train) - n_ba + len(lab_train)  # BA left out
    from smear.classify.model import CnnClassifier

    clf = CnnClassifier.from_dir(run / "model", device="cpu")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in clf.model.modules())
    assert any(n.endswith("classifier.lineage") for n, _ in clf.model.named_modules())  # the lineage-first head came back
    scores = clf.classify([np.full((40, 40, 3), 180, np.uint8)] * 2)
    probs, ratio = scores.probs, scores.novelty
    assert probs.shape == (2, len(FINE_CLASSES)) and ratio is not None and ratio.shape == (2,)


# ---------------------------------------------------------------- augmentation and colour


def test_down_resolution_removes_fine_detail_and_p0_is_identity():
    x = torch.rand(4, 3, 64, 64)
    assert torch.equal(A.down_resolution(x, 0.0, 0.4), x)
    y = A.down_resolution(x, 1.0, 0.2, torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    high = lambda t: (t[..., 1:, :] - t[..., :-1, :]).abs().mean()  # noqa: E731
    assert high(y) < 0.8 * high(x)  # noise detail is lost when the cell is drawn with fewer pixels
    assert torch.allclose(y.mean(), x.mean(), atol=0.02)


def test_jpeg_and_grayscale():
    x = torch.rand(3, 3, 32, 32)
    j = A.jpeg_artefacts(x, 1.0, 20, torch.Generator().manual_seed(0))
    assert j.shape == x.shape and not torch.equal(j, x) and (j - x).abs().mean() < 0.3
    g = A.random_grayscale(x, 1.0, torch.Generator().manual_seed(0))
    assert torch.allclose(g[:, 0], g[:, 1]) and torch.allclose(g[:, 1], g[:, 2])


def test_reinhard_moves_each_image_to_the_reference():
    x = torch.rand(2, 3, 24, 24) * 0.5 + 0.3
    shifted = (x * torch.tensor([1.0, 0.8, 1.2]).view(1, 3, 1, 1)).clamp(0, 1)
    ref_m, ref_s = lab_stats(x[:1])
    out = reinhard(shifted, ref_m[0].tolist(), ref_s[0].tolist())
    m, s = lab_stats(out)
    assert torch.allclose(m[1], ref_m[0], atol=0.02)  # the other image's colour, now the reference's
    assert torch.allclose(s[1], ref_s[0], rtol=0.15, atol=0.005)


def test_group_norm_model_has_no_batchnorm_and_adabn_adapts_only_batchnorm():
    gn = build_model("test_efficientnet", norm="group")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in gn.modules())
    assert gn.eval()(torch.rand(2, 3, 32, 32)).shape == (2, len(FINE_CLASSES))
    from smear.classify.model import CnnClassifier

    meta = {"classes": list(FINE_CLASSES), "crop_margin": 1.3, "input_size": 32}
    bn_clf = CnnClassifier(build_model("test_efficientnet"), ModelMeta.of(meta), device="cpu")
    bn = [m for m in bn_clf.model.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    before = bn.running_mean.clone()
    dark = [np.full((32, 32, 3), 30, np.uint8)] * 8
    assert adapt_batchnorm(bn_clf, dark) > 0
    assert not torch.allclose(bn.running_mean, before) and not bn.training
    assert adapt_batchnorm(CnnClassifier(gn, ModelMeta.of(meta), device="cpu"), dark) == 0


# ---------------------------------------------------------------- novelty


def test_mahalanobis_novelty_separates_a_class_it_never_saw():
    rng = np.random.default_rng(0)
    known = np.concatenate([rng.normal(0, 1, (200, 8)), rng.normal(6, 1, (200, 8))])
    labels = np.array([0] * 200 + [1] * 200)
    stats = nov.fit(known, labels)
    threshold = np.quantile(nov.distances(rng.normal(0, 1, (200, 8)), stats), 0.97)
    unseen = rng.normal(-6, 1, (100, 8))
    assert (nov.distances(unseen, stats) > threshold).mean() > 0.95
    fresh = np.concatenate([rng.normal(0, 1, (100, 8)), rng.normal(6, 1, (100, 8))])
    assert (nov.distances(fresh, stats) > threshold).mean() < 0.1


def test_lab_row_counts_majority_balanced_accuracy_and_holds():
    probs = np.full((4, len(FINE_CLASSES)), 0.01)
    for i, c in enumerate(("SNE", "SNE", "LY", "SNE")):
        probs[i, FINE_CLASSES.index(c)] = 0.9
    row = lab_row(probs, ["neutrophil", "neutrophil", "lymphocyte", "lymphocyte"], 0.5,
                  held=np.array([False, False, False, True]))
    assert row["n"] == 4 and row["type5_accuracy"] == pytest.approx(0.75)
    assert row["type5_balanced_accuracy"] == pytest.approx(0.75)  # neutrophil 2/2, lymphocyte 1/2
    assert row["majority_baseline"] == pytest.approx(0.5) and row["unidentified"] == pytest.approx(0.25)


def test_novel_cells_go_to_unidentified_in_the_pipeline(tmp_path):
    from fakes import FakeDetector, dets

    from smear.io import Slide, write_image_atomic
    from smear.pipeline.run import Stages, run_slide

    from smear.types import ClassScores

    class NoveltyClassifier:
        crop_margin, input_size = 1.2, 16
        guard = None

        def classify(self, crops):
            probs = np.full((len(crops), len(FINE_CLASSES)), 0.001)
            probs[:, FINE_CLASSES.index("PMY")] = 0.99
            return ClassScores(tuple(FINE_CLASSES), probs, np.array([0.5, 3.0][: len(crops)]))

    path = tmp_path / "f.png"
    write_image_atomic(path, np.full((40, 80, 3), 220, np.uint8))
    stages = Stages(detector=FakeDetector({80: dets(2, 0, 0)}), classifier=NoveltyClassifier())
    rep = run_slide(Slide("s", (path,)), stages)
    cells = rep.fields[0].cells
    assert [c.label for c in cells] == ["PMY", UNIDENTIFIED] and [c.novelty for c in cells] == [0.5, 3.0]


# ---------------------------------------------------------------- the domain guard


def _report(n_wbc: int, novel: int, n_rbc: int = 100, erb: int = 0) -> SlideReport:
    dets, cells = [], []
    for i in range(n_wbc):
        d = Detection((0.0, 0.0, 10.0, 10.0), CellKind.WBC, 0.9)
        dets.append(d)
        label = "ERB" if i < erb else "SNE"
        cells.append(CellPrediction(d, label, 0.9, {label: 0.9}, novelty=2.0 if i < novel else 0.5))
    dets += [Detection((0.0, 0.0, 5.0, 5.0), CellKind.RBC, 0.9)] * n_rbc
    return SlideReport("s", (FieldResult("s", "f.png", 640, 480, tuple(dets), tuple(cells)),), classified=True)


def test_guard_fires_on_novel_slides_and_implausible_counts():
    g = CFG.guard
    quiet = differential(_report(40, 2), CFG.report, CFG.flags, g).row()
    assert quiet["domain_warnings"] == [] and quiet["novel_share"] == pytest.approx(0.05)
    novel = differential(_report(40, 30), CFG.report, CFG.flags, g).row()
    assert novel["novel_share"] == pytest.approx(0.75)
    assert novel["domain_score"] == pytest.approx(3.0)
    assert "unlike every class the classifier was trained on (30 of 40 WBCs, 75%): novel_share 3.00" in \
        novel["domain_warning"]
    assert "adapt the classifier" in novel["domain_warning"]
    nrbc = differential(_report(20, 0, erb=15), CFG.report, CFG.flags, g).row()
    assert any("NRBC per 100 WBC" in w for w in nrbc["domain_warnings"])  # 15 ERB to 5 WBC: 300 per 100
    crowded = differential(_report(80, 0, n_rbc=60), CFG.report, CFG.flags, g).row()
    assert any("80 WBC boxes to 60 RBCs" in w for w in crowded["domain_warnings"])


def _cyan_cast(image: np.ndarray) -> np.ndarray:
    """A blue-cyan lab: red damped, the background tinted (as the other lab's fields in the issue)."""
    out = image.astype(np.float32) * np.array([0.45, 0.85, 1.0]) + np.array([0.0, 25.0, 45.0])
    return np.clip(out, 0, 255).astype(np.uint8)


@pytest.mark.slow
def test_guard_on_colour_shifted_synthetic_fields(tmp_path):
    """A tiny classifier trained on drawn cells, its novelty fitted on the WBC crops of drawn fields:
    a slide of such fields passes the guard, the same fields with their colour shifted (another
    stain and scanner) get the warning, in the summary row and in the CSV column."""
    from smear.classify.data import Item
    from smear.classify.model import CnnClassifier
    from smear.classify.novelty_fit import fit_novelty
    from smear.crops import cut_crop
    from smear.io import Slide, write_image_atomic
    from smear.report.tables import summary_csv
    from smear.pipeline.run import Stages, run_slide
    from smear.synth import make_field

    pbc = make_pbc(tmp_path / "pbc", {p: 6 for p in ("SNE", "LY", "MO")}, size=40)
    args = ["train", "classify", "--out", str(tmp_path / "run")]
    for s in ("model.arch=test_efficientnet", "model.input_size=32", f"data.root={pbc}",
              f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=2", "train.batch=8", "train.device=cpu",
              "train.patience=0", "model.novelty_quantile=null"):
        args += ["--set", s]
    assert CliRunner().invoke(app, args).exit_code == 0
    model = tmp_path / "run" / "model"
    fields = [make_field(s, 320, 240, n_wbc=3) for s in range(1, 25)]  # 8 to fit, 8 to set the threshold, 8 to run
    truth = {f.image_rgb.tobytes()[:4096]: [d for d in f.detections] for f in fields}

    class TruthDetector:  # the drawn fields' own boxes, whatever their colour
        def detect(self, images):
            return [truth[k] for k in (im.tobytes()[:4096] for im in images)]

    def wbc_crops(part):
        return np.stack([cut_crop(f.image_rgb, d.box_xyxy, 1.3, 32) for f in part for d in f.detections
                         if d.kind == CellKind.WBC])

    crops = wbc_crops(fields[:8])
    items = [Item(tmp_path / f"{i}.png", "SNE", "neutrophil") for i in range(len(crops))]
    fit_novelty(model, crops, items, wbc_crops(fields[8:16]), 0.9, log=lambda m: None)
    clf = CnnClassifier.from_dir(model, device="cpu")
    rows, diffs = {}, []
    for name, shift in (("plain", lambda im: im), ("shifted", _cyan_cast)):
        paths = []
        for k, f in enumerate(fields[16:]):
            image = shift(f.image_rgb)
            truth[image.tobytes()[:4096]] = list(f.detections)
            paths.append(write_image_atomic(tmp_path / name / f"{k:02d}.png", image))
        rep = run_slide(Slide(name, tuple(sorted(paths))), Stages(detector=TruthDetector(), classifier=clf))
        diffs.append(differential(rep, CFG.report, CFG.flags, CFG.guard.model_copy(update={"min_scored": 3})))
        rows[name] = diffs[-1].row()
    assert rows["plain"]["novel_share"] < CFG.guard.max_novel_share < rows["shifted"]["novel_share"]
    assert rows["plain"]["domain_warnings"] == []
    assert "unlike the training data" in rows["shifted"]["domain_warnings"][0]
    csv_text = summary_csv(diffs)
    assert "domain_warning" in csv_text.splitlines()[0] and "unlike the training data" in csv_text.splitlines()[2]


# ---------------------------------------------------------------- the WBC plausibility check


def test_wbc_check_drops_a_red_cell_sized_box_without_nucleus():
    from smear.detect.plausible import CheckedDetector, WbcCheck

    img = np.full((200, 300, 3), (230, 210, 200), np.uint8)
    rbcs = [(10 + 30 * i, 150, 34 + 30 * i, 174) for i in range(5)]
    for x0, y0, x1, y1 in rbcs:
        img[y0:y1, x0:x1] = (215, 150, 150)  # pink red cells
    img[40:80, 40:80] = (120, 60, 170)       # a purple nucleus inside the real WBC box
    real = Detection((30.0, 30.0, 90.0, 90.0), CellKind.WBC, 0.9)
    fake = Detection((200.0, 40.0, 224.0, 64.0), CellKind.WBC, 0.2)  # a red cell called WBC
    img[40:64, 200:224] = (215, 150, 150)
    boxes = [real, fake] + [Detection(tuple(map(float, b)), CellKind.RBC, 0.9) for b in rbcs]
    check = WbcCheck(**CFG.wbc_check.model_dump(exclude={"enabled"}))
    assert check.implausible(img, boxes)[:2] == [False, True]

    class Fixed:
        def detect(self, images):
            return [list(boxes) for _ in images]

    kept = CheckedDetector(Fixed(), check).detect([img])[0]
    assert real in kept and fake not in kept and len(kept) == len(boxes) - 1
    # too few red cells on the field to know their size: nothing is dropped
    assert check.implausible(img, [real, fake]) == [False, False]


def test_wbc_rows_count_red_cells_taken_for_white_cells_per_source(tmp_path):
    from smear.detect.data import Sample
    from smear.detect.evaluate import wbc_rows

    wbc, rbc = (10.0, 10.0, 50.0, 50.0), (100.0, 100.0, 120.0, 120.0)
    a = Sample(tmp_path / "a.png", 200, 200, [(CellKind.WBC, wbc), (CellKind.RBC, rbc)], "labA")
    b = Sample(tmp_path / "b.png", 200, 200, [(CellKind.WBC, wbc)], "labB")
    preds = [[Detection(wbc, CellKind.WBC, 0.9), Detection(rbc, CellKind.WBC, 0.3)],  # one RBC called WBC
             [Detection((150.0, 150.0, 190.0, 190.0), CellKind.WBC, 0.05)]]           # a miss + a low false box
    rows = wbc_rows([a, b], preds, conf=0.1)
    assert rows["labA"] == {"n_images": 1, "n_wbc": 1, "n_pred": 2, "precision": 0.5, "recall": 1.0,
                            "false_wbc": 1, "rbc_as_wbc": 1}
    assert rows["labB"]["recall"] == 0.0 and rows["labB"]["n_pred"] == 0  # the 0.05 box is under the floor
    assert rows["all"]["n_wbc"] == 2 and rows["all"]["recall"] == 0.5 and list(rows)[-1] == "all"


def test_a_named_shipped_folder_resolves_and_an_unknown_name_is_a_clear_error():
    from smear.artifacts import load_meta, resolve_model_dir
    from smear.errors import ModelError

    folder = resolve_model_dir("shipped:detector_stain", "detector")
    meta = load_meta(folder)
    assert meta["stage"] == "detect" and meta["classes"] == ["wbc", "rbc", "platelet"]
    assert resolve_model_dir("shipped", "detector").name == "detector"
    with pytest.raises(ModelError, match="no shipped model folder") as err:
        resolve_model_dir("shipped:detektor", "detector")
    assert "detector_stain" in err.value.hint

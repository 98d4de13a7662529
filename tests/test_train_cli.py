"""`smear train classify|segment|detect` as a new user meets them: the --data/--epochs/--batch/--device
options, the `smear run` line at the end, retries after an early failure, the class list, progress."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from test_classify_data import make_folders
from typer.testing import CliRunner

from smear.cli import app

runner = CliRunner()
TINY_CLASSIFY = ["--set", "model.arch=test_efficientnet", "--set", "model.input_size=32", "--set", "train.patience=0",
                 "--set", "model.novelty_quantile=null"]


def _fake_train(monkeypatch, stage: str) -> dict:
    """Replace ``smear.<stage>.train.train`` (and the detector's packaging) by a recorder."""
    import importlib

    module = importlib.import_module(f"smear.{stage}.train")
    seen: dict = {}

    def train(cfg, out, resume=False, on_batch=None):
        seen.update(cfg=cfg, out=Path(out))
        on_batch(1, 1, 2)
        return Path(out) if stage == "detect" else Path(out) / "model"

    monkeypatch.setattr(module, "train", train)
    if stage == "detect":
        monkeypatch.setattr(module, "package", lambda run_dir, cfg, model_dir, device, log: model_dir)
    return seen


@pytest.mark.parametrize("stage, key, use", [
    ("classify", ("data", "root"), "--set classifier_model="),
    ("segment", ("data", "root"), "--segment unet --set segmenter_model="),
    ("detect", ("data", "yolo"), "--set detector_model="),
])
def test_options_set_the_stage_keys_and_the_run_line_uses_the_model(tmp_path, monkeypatch, stage, key, use):
    seen = _fake_train(monkeypatch, stage)
    out = tmp_path / "my run"
    res = runner.invoke(app, ["train", stage, "--data", str(tmp_path / "d:1"), "--out", str(out), "--epochs", "3",
                              "--batch", "5", "--device", "cpu", "--set", "train.epochs=9"])
    assert res.exit_code == 0, res.output
    cfg = seen["cfg"]
    assert getattr(getattr(cfg, key[0]), key[1]) == str(tmp_path / "d:1")  # a path as it is, not read as YAML
    assert (cfg.train.epochs, cfg.train.batch, cfg.train.device) == (3, 5, "cpu")  # over --set
    assert res.stdout.strip().splitlines()[-1] == f"  smear run SLIDE_FOLDER {use}'{out / 'model'}'"


def test_an_option_with_a_wrong_value_is_named(tmp_path, monkeypatch):
    _fake_train(monkeypatch, "classify")
    res = runner.invoke(app, ["train", "classify", "--out", str(tmp_path / "r"), "--device", "gpu"])
    assert res.exit_code == 1
    assert "--device gpu: config key 'train.device' must be auto, cpu, cuda or cuda:N" in res.stderr
    res = runner.invoke(app, ["train", "classify", "--out", str(tmp_path / "r"), "--epochs", "0"])
    assert res.exit_code == 2 and "--epochs" in res.stderr


def test_without_options_the_config_defaults_stay(tmp_path, monkeypatch):
    seen = _fake_train(monkeypatch, "detect")
    res = runner.invoke(app, ["train", "detect", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    d = seen["cfg"].data
    assert d.yolo is None and d.bccd == "../shared/data/bccd" and d.workdir is None


def test_epoch_progress_bar_draws_on_a_terminal_only(monkeypatch, tmp_path):
    import smear.cli.train as cli_train
    from smear.cli.render import epoch_progress

    tty = Console(file=io.StringIO(), force_terminal=True, width=100)
    with epoch_progress(tty) as on_batch:
        on_batch(2, 3, 7)
        tty._live_stack[-1].refresh()
        assert "epoch 2" in tty.file.getvalue() and "3/7" in tty.file.getvalue()
        tty.file = io.StringIO()
        on_batch(2, 7, 7)  # the epoch's batches are done: no bar while it is scored
        tty._live_stack[-1].refresh()
        assert "7/7" not in tty.file.getvalue()
    tty.file = io.StringIO()
    plain = Console(file=io.StringIO(), force_terminal=False)
    with epoch_progress(plain) as on_batch:
        on_batch(2, 3, 7)
    assert plain.file.getvalue() == ""
    _fake_train(monkeypatch, "segment")
    monkeypatch.setattr(cli_train, "err_console", tty)
    res = runner.invoke(app, ["train", "segment", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert "epoch 1" in tty.file.getvalue() and "1/2" in tty.file.getvalue()  # the fake's on_batch(1, 1, 2)


def test_train_one_epoch_reports_each_batch():
    import torch

    from smear.nn import loop

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = loop.warmup_cosine(opt, 1, 3)
    calls = []
    batches = loop.epoch_batches(np.arange(6), 2)
    loop.train_one_epoch(loop.Trainee(model, opt, sched, None), lambda x: model(x).pow(2).mean(), batches,
                         lambda idx: torch.ones(len(idx), 2), epoch=4, feed=loop.Feed(on_batch=lambda *a: calls.append(a)))
    assert calls == [(4, 1, 3), (4, 2, 3), (4, 3, 3)]


def test_a_class_folder_outside_the_taxonomy_is_one_error_with_the_way_to_extend_it(tmp_path):
    data = make_folders(tmp_path / "lab", {"LY": 2, "blast": 2})
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "classify", "--data", str(data), "--out", str(out), *TINY_CLASSIFY])
    assert res.exit_code == 1
    error, hint = [line for line in res.stderr.splitlines() if line.startswith(("error:", "hint:"))]
    assert "Traceback" not in res.output
    assert error == f"error: {data}: class folder not in the taxonomy: blast"
    assert hint.startswith("hint: rename it to one of SNE") and "smear/taxonomy.py" in hint
    assert not out.exists()  # and nothing left in the way of the retry


def _checkpointless(out: Path) -> None:
    """What a classifier run killed before its first epoch finished leaves: config and split."""
    out.mkdir(parents=True)
    (out / "config.yaml").write_text("model: {}\n")
    (out / "split.json").write_text("{}\n")


@pytest.mark.slow
def test_a_run_that_failed_before_its_first_checkpoint_does_not_block_the_retry(tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "classify", "--data", str(tmp_path / "nowhere"), "--out", str(out)])
    assert res.exit_code == 1 and "nowhere" in res.stderr
    assert not out.exists()
    _checkpointless(out)  # killed (no clean-up ran): config and split only
    data = make_folders(tmp_path / "lab", {"LY": 6, "MO": 6})
    args = ["train", "classify", "--data", str(data), "--out", str(out), "--epochs", "1", "--batch", "4",
            "--device", "cpu", *TINY_CLASSIFY, "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (out / "checkpoint.pt").is_file() and (out / "model" / "meta.json").is_file()
    res = runner.invoke(app, args)  # now it is a run: refused, pointing at --resume
    assert res.exit_code == 1 and "run folder exists and is not empty" in res.stderr
    assert "--resume" in res.stderr and "resume=True" not in res.stderr


def test_a_folder_with_other_files_is_still_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    res = runner.invoke(app, ["train", "segment", "--out", str(out), "--data", str(tmp_path)])
    assert res.exit_code == 1 and "run folder exists and is not empty" in res.stderr
    assert "pass --resume to continue it, or a new --out" in res.stderr
    assert (out / "notes.txt").read_text() == "mine"


def test_detect_run_with_a_checkpoint_is_refused_without_resume(tmp_path):
    out = tmp_path / "det"
    (out / "weights").mkdir(parents=True)
    (out / "weights" / "last.pt").write_bytes(b"")
    res = runner.invoke(app, ["train", "detect", "--out", str(out)])
    assert res.exit_code == 1 and "has a checkpoint" in res.stderr and "--resume" in res.stderr


def test_detect_failing_before_its_first_checkpoint_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for data in (tmp_path / "missing", tmp_path):  # no such path; a folder with no data.yaml
        res = runner.invoke(app, ["train", "detect", "--data", str(data), "--out", "det"])
        assert res.exit_code == 1 and "not a YOLO dataset (no data.yaml)" in res.stderr
        assert "smear data convert" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    res = runner.invoke(app, ["train", "detect", "--out", "det", "--set", "data.bccd=nowhere"])
    assert res.exit_code == 1 and "--data" in res.stderr and not (tmp_path / "det").exists()


def test_detect_data_without_a_val_split_holds_out_a_fixed_part_of_train(tmp_path):
    import yaml
    from test_detect_train import _voc

    from smear.config import load_config
    from smear.detect.train import build_training_data, data_dir, val_split_name

    _voc(tmp_path / "voc")
    res = runner.invoke(app, ["data", "convert", str(tmp_path / "voc"), "--out", str(tmp_path / "mine")])
    assert res.exit_code == 0, res.output
    cfg = load_config("detect", None, ["data.val_fraction=0.34"], {"--data": ("data.yolo", str(tmp_path / "mine"))})
    assert data_dir(cfg, tmp_path / "run") == tmp_path / "run" / "detect-data"
    data_yaml = build_training_data(cfg, data_dir(cfg, tmp_path / "run"), log=lambda m: None)
    spec = yaml.safe_load(data_yaml.read_text())
    assert [len(list(Path(spec[k]).iterdir())) for k in ("train", "val")] == [4, 2]
    assert val_split_name(cfg.data) == f"{tmp_path / 'mine' / 'data.yaml'} train holdout 34% seed 0"
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"workdir": str(tmp_path / "elsewhere")})})  # set explicitly: used as it is
    assert data_dir(cfg, tmp_path / "run") == tmp_path / "elsewhere"


@pytest.mark.slow
def test_model_init_takes_shipped_names_and_paths_from_any_folder(tmp_path, monkeypatch):
    from smear.artifacts import shipped_dir
    from smear.classify.train import init_folder
    from smear.errors import ConfigError

    shipped = shipped_dir("classifier").resolve()
    assert init_folder("shipped") == init_folder("shipped:classifier") == shipped
    monkeypatch.chdir(shipped.parent)
    assert init_folder("classifier") == shipped  # a relative path, made absolute
    with pytest.raises(ConfigError, match=r"model.init nowhere: no such model folder \(relative paths start at"):
        init_folder("nowhere")
    data = make_folders(tmp_path / "lab", {"LY": 6, "MO": 6})
    for spec, error in (("nowhere", "error: model.init nowhere: no such model folder"),
                        ("shipped:nothing", "error: shipped:nothing: no shipped model folder of that name"),
                        ("shipped", "error: model.init shipped: its arch is 'tf_efficientnet_lite0', the config's "
                                    "'test_efficientnet'")):  # found and read: only the tiny arch differs
        out = tmp_path / f"run-{spec.replace(':', '-')}"
        res = runner.invoke(app, ["train", "classify", "--data", str(data), "--out", str(out), *TINY_CLASSIFY,
                                  "--set", f"model.init={spec}", "--set", f"data.cache_dir={tmp_path / 'cache'}"])
        assert res.exit_code == 1 and "Traceback" not in res.output, res.output
        [line] = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert line.startswith(error), line

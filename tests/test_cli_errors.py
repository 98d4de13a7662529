"""What a new user hits first, each as one error line (or clean help): outputs that cannot be written
(said before any model loads), a mistyped option value, a CUDA device that is not there, and help text
that rich markup or typer's type names garbled."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from smear.cli import app

runner = CliRunner()
CLASSICAL = ["--set", "detector=classical", "--set", "classifier=off"]


def _slide(tmp_path):
    folder = tmp_path / "s1"
    folder.mkdir(parents=True)
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(folder / "f.png")
    return folder


def _errors(res) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.strip() and not line.startswith("hint:")]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
@pytest.mark.parametrize("option, target, message", [
    ("--cells", "/proc/cells.csv", "/proc/cells.csv: --cells cannot be written there (No such file or directory)"),
    ("--out", "/proc/r.csv", "/proc/r.csv: --out cannot be written there (No such file or directory)"),
    ("--out", "/proc/self/r.csv", "/proc/self: the --out folder is not writable")])
def test_an_output_that_cannot_be_written_is_one_line_before_any_model_loads(tmp_path, monkeypatch, option,
                                                                             target, message):
    import smear.pipeline.build as build

    def no_models(cfg):
        raise AssertionError("a model was loaded before the outputs were checked")

    monkeypatch.setattr(build, "build_stages", no_models)
    res = runner.invoke(app, ["run", str(_slide(tmp_path)), *CLASSICAL, option, target])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert _errors(res) == [f"error: {message}"]


def test_the_cells_table_failing_to_open_is_one_line(tmp_path, monkeypatch):
    """Were the folder to refuse the file only when the run opens it, that too is one line."""
    from smear.report import tables

    def refuse(self, path, masks=False, slide_coords=False):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tables.CellsWriter, "__init__", refuse)
    cells = tmp_path / "out" / "cells.csv"
    res = runner.invoke(app, ["run", str(_slide(tmp_path)), *CLASSICAL, "--cells", str(cells), "--set", "cache_dir=off"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert _errors(res) == [f"error: {cells}: cannot write the cells table (Permission denied)"]


@pytest.mark.parametrize("args, message", [
    (["run", "x", "--report", "tabel"],
     "error: Invalid value for '--report': 'tabel' is not one of 'table', 'csv', 'json', 'html'."),
    (["run", "x", "--workers", "0"], "error: Invalid value for '--workers': Input should be greater than or equal to 1"),
    (["run", "x", "--bogus"], "error: No such option: --bogus"),
    (["bogus"], "error: No such command 'bogus'."),
])
def test_a_wrong_option_or_value_is_one_line_with_the_help_to_read(args, message):
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    assert "╭" not in res.output and "Usage:" not in res.output
    [line] = _errors(res)
    assert line.startswith(message)
    assert re.search(r"^hint: .* --help$", res.stderr, re.MULTILINE)


def test_cuda_without_cuda_is_one_line_without_a_python_warning(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for runtime in ("onnx", "torch"):
        res = runner.invoke(app, ["run", str(_slide(tmp_path / runtime)), "--device", "cuda",
                                  "--set", f"runtime={runtime}"])
        assert res.exit_code == 1 and "Warning" not in res.output and "build.py" not in res.output
        assert _errors(res) == ["error: device 'cuda' asked for, but no CUDA device is available"]


def test_help_text_is_not_garbled():
    res = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert res.exit_code == 0
    text = " ".join(res.stdout.replace("│", " ").split())
    assert 'pip install "smear[ray]"' in text  # not eaten as rich markup
    assert "PATHS..." in text and "{paths}" not in text
    assert "<bool>" not in text and "<list[" not in text
    assert "--recursive --no-recursive Each subfolder" in text  # a flag shows no value placeholder
    assert "--set <str> Override a key" in text

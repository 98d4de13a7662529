"""Hardening of the command line (smear/cli): outputs that are not regular files, the --resume hint
after a failed write, file names printed as they are, explain's overlays kept off its inputs."""

from __future__ import annotations

import errno
import os

import pytest

from hostile import CLASSICAL, no_models, one_line_error, runner, slide
from smear.cli import app


@pytest.mark.parametrize("option", ["--out", "--cells"])
def test_an_output_that_is_a_fifo_or_a_device_is_not_replaced(tmp_path, option, monkeypatch):
    slide(tmp_path / "s", seeds=(1,))
    fifo = tmp_path / "out.csv"
    os.mkfifo(fifo)
    no_models(monkeypatch)
    res = runner.invoke(app, ["run", str(tmp_path / "s"), "--report", "csv", option, str(fifo), *CLASSICAL])
    one_line_error(res, "out.csv", "not a regular file")
    assert fifo.exists() and not fifo.is_file()  # still the FIFO
    res = runner.invoke(app, ["run", str(tmp_path / "s"), "--report", "csv", option, "/dev/null", *CLASSICAL])
    one_line_error(res, "/dev/null", "not a regular file")
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")


def test_a_cells_write_failing_partway_says_how_many_fields_are_cached(tmp_path, monkeypatch):
    from smear.report import tables

    slide(tmp_path / "s", seeds=(1, 2, 3))
    calls = []
    real = tables.CellsWriter.write

    def fail_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(tables.CellsWriter, "write", fail_second)
    res = runner.invoke(app, ["run", str(tmp_path / "s"), "--report", "csv", "--cells", str(tmp_path / "c.csv"),
                              "--set", "field_batch=1", *CLASSICAL, "--set", f"cache_dir={tmp_path / 'cache'}"])
    one_line_error(res, "c.csv")
    assert "every field" not in res.stderr
    assert "2 of 3 fields" in res.stderr, res.stderr  # the second field's result was cached before its row failed


# ------------------------------------------------------------------ from issue 16's probe


def test_explain_refuses_to_write_overlays_among_its_input_images(tmp_path):
    fields = slide(tmp_path / "cells", seeds=(1,))
    res = runner.invoke(app, ["explain", str(fields[0]), "--out", str(tmp_path / "cells")])
    one_line_error(res, "folder of input images")
    assert sorted(p.name for p in (tmp_path / "cells").iterdir()) == ["field_01.png"]


def test_markup_like_file_names_are_printed_as_they_are(tmp_path):
    folder = tmp_path / "q["  # the path of its field "]x.png" reads "q[/]x.png": a closing tag
    slide(folder, seeds=(1,))
    (folder / "]x.png").write_text("not a png")
    res = runner.invoke(app, ["run", str(folder), *CLASSICAL])
    assert res.exit_code == 0, res.output
    assert "q[/]x.png" in res.stderr and "q[: 1 fields" in res.stdout
    res = runner.invoke(app, ["run", str(folder / "]x.png"), *CLASSICAL])
    one_line_error(res, "q[/]x.png")
    bold = tmp_path / "[bold]slide"
    slide(bold, seeds=(1,))
    res = runner.invoke(app, ["run", str(bold), *CLASSICAL])
    assert res.exit_code == 0 and "[bold]slide: 1 fields" in res.stdout


def test_the_runs_warnings_go_through_one_logger_whose_handler_the_cli_sets(tmp_path, caplog):
    """A library call's warnings are records of the smear logger (a caller handles them); the CLI gives
    that logger its one handler for the command, prints the same `warning:` lines, and takes it off."""
    import logging

    from smear.io import find_slides

    slide(tmp_path / "s", seeds=(1,))
    (tmp_path / "empty").mkdir()
    said = f"{tmp_path / 'empty'}: folder holds no image files, reported as an empty slide"
    with caplog.at_level(logging.WARNING, logger="smear"):
        find_slides([tmp_path / "s", tmp_path / "empty"], empty_slides=True)
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [("smear.io", logging.WARNING, said)]
    res = runner.invoke(app, ["run", str(tmp_path / "s"), str(tmp_path / "empty"), "--report", "csv", *CLASSICAL,
                              "--set", "cache_dir=off"])
    assert res.exit_code == 0, res.output
    assert f"warning: {said}" in res.stderr.splitlines()
    logger = logging.getLogger("smear")
    assert logger.propagate and not logger.handlers and not logging.getLogger("py.warnings").handlers

"""Golden reports: `smear run` with the shipped models gives byte-identical CSV, JSON (and table) reports.

The files in tests/golden/ were written by the code before the redesign of issue 15; a change that
moves code without changing behaviour leaves them identical. To re-record after an intended change
of the reports: ``SMEAR_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import bccd_golden_slide
from smear.cli import app

GOLDEN = Path(__file__).parent / "golden"
REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

pytestmark = pytest.mark.slow


def _report(slide: str, fmt: str, *extra: str) -> str:
    """The report of ``smear run SLIDE --report FMT`` (no result cache), from the working directory."""
    res = runner.invoke(app, ["run", slide, "--report", fmt, "--set", "cache_dir=off", *extra])
    assert res.exit_code == 0, res.output
    assert "ONNX Runtime" not in res.stderr and "Ultralytics" not in res.stderr  # its chatter is silenced
    return res.stdout


def _check(text: str, name: str) -> None:
    path = GOLDEN / name
    if os.environ.get("SMEAR_UPDATE_GOLDEN"):
        path.write_bytes(text.encode("utf-8"))
    assert text.encode("utf-8") == path.read_bytes(), f"{name}: report differs from the golden one"


@pytest.mark.parametrize("fmt", ["csv", "json", "table"])
def test_demo_slide_report_is_golden(fmt, monkeypatch):
    """examples/slide_demo, run from the repository root (the JSON names fields by relative path)."""
    monkeypatch.chdir(REPO)
    _check(_report("examples/slide_demo", fmt), f"demo_report.{fmt}")


def test_demo_slide_report_with_torch_runtime_is_golden(monkeypatch):
    """The same with ``runtime: torch`` and the U-Net masks, so the torch code paths are held too."""
    monkeypatch.chdir(REPO)
    _check(_report("examples/slide_demo", "json", "--set", "runtime=torch", "--segment", "unet"),
           "demo_report_torch_unet.json")


@pytest.mark.realdata
@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_bccd_test_fields_report_is_golden(fmt, tmp_path, monkeypatch):
    """The first 20 BCCD test fields as one slide ``bccd_test20``; the fields are copied, never committed."""
    bccd_golden_slide(tmp_path)
    monkeypatch.chdir(tmp_path)
    _check(_report("bccd_test20", fmt), f"bccd_test20_report.{fmt}")

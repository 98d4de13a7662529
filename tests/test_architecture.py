"""The nevers of the tree, checked: the import-linter contracts in pyproject.toml, and a bare `import smear`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_import_contracts_are_kept():
    """No stage imports another stage, the pipeline, the report or the CLI; only cli/ imports rich or
    typer; no import cycles (lazy imports inside functions count too). In a subprocess: import-linter
    reconfigures logging (it disables the loggers that exist) in the process it runs in."""
    pytest.importorskip("importlinter")
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(PYPROJECT)!r}, no_cache=True, no_logo=True))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_import_smear_loads_no_heavy_library():
    """`import smear` (and the contracts, config and io modules) load no torch, ultralytics or cv2."""
    code = ("import sys, smear, smear.types, smear.config, smear.errors, smear.taxonomy; "
            "heavy = [m for m in ('torch', 'ultralytics', 'cv2', 'rich', 'typer') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import smear loaded {out.stdout.strip()}"

"""Shared test set-up: fakes importable, real-data location."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def need_data(*parts: str) -> Path:
    """The path under ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not present: {path} (tests on ../shared/data run only where it exists)")
    return path


#: the golden BCCD slide: the first fields of BCCD test, sorted by name
N_BCCD_GOLDEN = 20


def bccd_golden_slide(folder: Path) -> Path:
    """``folder/bccd_test20``: a copy of the first N_BCCD_GOLDEN BCCD test fields (never committed),
    or skip the test when the data is absent."""
    images = need_data("bccd", "test", "images")
    slide = folder / "bccd_test20"
    slide.mkdir()
    for src in sorted(images.iterdir(), key=lambda p: p.name)[:N_BCCD_GOLDEN]:
        shutil.copyfile(src, slide / src.name)
    return slide


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Keep the result cache of `smear run` out of the user's home during tests."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))

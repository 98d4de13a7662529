"""Stage a public single-cell dataset from a user's local git clone into class folders.

Raabin-WBC (Kouzehkanan et al. 2022: several Iranian labs, Giemsa, two microscopes and phone
cameras; 575x575 single-cell crops, 5 types) has a public copy in the history of
``uqasha524/WBC-Classification-Using-CNN-vs-MobileNetV2`` at commit ``2fc4a60``, under
``Dataset/Train`` and ``Dataset/Test`` (Test = Raabin's Test-A). The tree at that repository's
HEAD no longer has them, so the files are read from the commit (``git archive``), not from a
checkout. Nothing is downloaded: the user clones the repository first, as with any dataset.

The result is ``out/train/<Class>/*.jpg`` and ``out/test/<Class>/*.jpg``, the class-per-folder
layout ``smear train classify`` and ``smear eval classify`` read (``Neutrophil`` names a group
with no stage, so its cells train through the group-level loss).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

from smear.io import IMAGE_SUFFIXES
from smear.errors import DataError

RAABIN_COMMIT = "2fc4a60"
RAABIN_PARTS = {"Dataset/Train": "train", "Dataset/Test": "test"}


def _git(clone: Path, *args: str) -> bytes:
    try:
        res = subprocess.run(["git", "-C", str(clone), *args], capture_output=True, check=False)
    except FileNotFoundError as exc:
        raise DataError("git not found", hint="install git to stage a dataset from a clone") from exc
    if res.returncode != 0:
        msg = res.stderr.decode(errors="replace").strip().splitlines()
        raise DataError(f"{clone}: git {' '.join(args[:2])} failed: {msg[-1] if msg else res.returncode}",
                        hint="pass the folder of a full clone (git clone, not a shallow one)")
    return res.stdout


def stage_from_git(clone: str | Path, out: str | Path, commit: str = RAABIN_COMMIT,
                   parts: dict[str, str] | None = None) -> dict[str, dict[str, int]]:
    """Copy the image files under each ``parts`` folder of ``commit`` into ``out/<part>/<class>/``;
    returns the counts per part and class. ``out`` must not exist (it is built aside, then renamed)."""
    clone, out = Path(clone), Path(out)
    parts = parts or RAABIN_PARTS
    if not clone.exists():
        raise DataError(f"{clone}: clone not found",
                        hint="git clone https://github.com/uqasha524/WBC-Classification-Using-CNN-vs-MobileNetV2")
    if out.exists():
        raise DataError(f"{out}: already exists", hint="remove it or pass another --out")
    try:
        _git(clone, "cat-file", "-e", f"{commit}^{{commit}}")
    except DataError as exc:
        raise DataError(f"{clone}: commit {commit} not found", hint="pass the folder of a full clone "
                        "(git clone, not a shallow one) of the repository that holds it") from exc
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    counts: dict[str, Counter] = {name: Counter() for name in parts.values()}
    try:
        blob = _git(clone, "archive", "--format=tar", commit, *parts)
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                rel = Path(member.name)
                for prefix, name in parts.items():
                    sub = rel.relative_to(prefix) if rel.is_relative_to(prefix) else None
                    if sub is None or len(sub.parts) != 2 or sub.suffix.lower() not in IMAGE_SUFFIXES:
                        continue
                    cls, fname = sub.parts
                    if cls.startswith(".") or fname.startswith("."):
                        continue
                    dest = tmp / name / cls / fname
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as src, open(dest, "wb") as fh:  # type: ignore[union-attr]
                        shutil.copyfileobj(src, fh)
                    counts[name][cls] += 1
        if not any(counts.values()):
            raise DataError(f"{clone}@{commit}: no images under {', '.join(parts)}")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return {name: dict(sorted(c.items())) for name, c in counts.items()}

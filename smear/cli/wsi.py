"""The whole-slide part of `smear run`: which paths are slide files, their options, their run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from smear.errors import SmearError


@dataclass
class WholeSlideRun:
    """The whole-slide files of a run and how to count them; falsy when there are none."""

    paths: list[Path]
    settings: Any = None
    target_wbc: Optional[int] = 200
    quality_dir: Optional[Path] = None

    def __bool__(self) -> bool:
        return bool(self.paths)

    def as_slides(self) -> list:
        """The files as io.Slide records, so that outputs are checked against them too."""
        from smear.io import Slide

        return [Slide(p.stem, (p,)) for p in self.paths]

    def options(self, cfg, target_wbc: Optional[int], all_tiles: bool, out: Optional[Path],
                cells: Optional[Path]) -> "WholeSlideRun":
        """Settings from the config and the command line; the quality maps' folder (auto: beside
        --out, else beside --cells, else none: the map is then only in the HTML report)."""
        if not self.paths:
            return self
        from smear.pipeline.wsi_run import WsiSettings

        self.settings = WsiSettings.from_config(cfg.wsi)
        self.target_wbc = None if all_tiles else (target_wbc or self.settings.target_wbc)
        where = str(self.settings.quality_map)
        if where == "off":
            self.quality_dir = None
        elif where == "auto":
            anchor = out or cells
            self.quality_dir = Path(anchor).resolve().parent if anchor is not None else None
        else:
            self.quality_dir = Path(where)
        return self

    def run(self, stages, cache, resume: bool, on_field: Callable, keep: bool,
            warn: Optional[Callable[[str], None]], engine=None) -> list:
        """Each file counted into its SlideReport, with ``stages`` here or on the ``engine``'s workers;
        ``on_field(slide_name, item)`` per counted tile."""
        from smear.pipeline.wsi_run import SlideOutputs, run_whole_slide

        reports = []
        for path in self.paths:
            outputs = SlideOutputs(on_field=lambda item, _n=path.stem: on_field(_n, item), keep_fields=keep,
                                   quality_map_dir=self.quality_dir, warn=warn)
            reports.append(run_whole_slide(path, stages, self.settings, target_wbc=self.target_wbc, cache=cache,
                                           resume=resume, outputs=outputs, engine=engine))
        return reports


def _whole_in(folder: Path, recursive: bool) -> tuple[list[Path], bool]:
    """(the whole-slide files in ``folder`` (and its subfolders with ``recursive``), whether it also
    holds field images)."""
    from smear.io import _walk_folders, is_image_file
    from smear.wsi.slide import is_whole_slide

    found, fields = [], False
    for sub in [folder] + (_walk_folders(folder) if recursive else []):
        for p in sorted(sub.iterdir()):
            if p.name.startswith(".") or not p.is_file():
                continue
            if is_whole_slide(p):
                found.append(p)
            elif is_image_file(p):
                fields = True
    return found, fields


def check_whole_slides(paths: list[Path], target_wbc: Optional[int], all_tiles: bool,
                       recursive: bool = False) -> tuple[WholeSlideRun, list[Path]]:
    """(the whole-slide files among ``paths`` and in the folders among them, the paths left for
    the field reader: files and folders that hold field images); the extra is checked here, before
    any model loads."""
    from smear.wsi.slide import is_whole_slide, require_openslide

    whole: list[Path] = []
    rest: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found, fields = _whole_in(p, recursive)
            whole += found
            if fields or not found:
                rest.append(p)  # a folder of fields is a slide (one without anything is find_slides' error)
        elif is_whole_slide(p):
            whole.append(p)
        else:
            rest.append(p)
    if target_wbc is not None and all_tiles:
        raise SmearError("--target-wbc and --all exclude each other")
    if whole:
        require_openslide()
    return WholeSlideRun(whole), rest

"""The contracts between stages: taxonomy, detections, predictions, results, stage protocols.

Conventions, written once: images are RGB uint8 arrays of shape HxWx3; boxes are full-field
pixel coordinates ``(x0, y0, x1, y1)`` as floats, x to the right and y down.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from smear.config_models import PipelineConfig

from smear.taxonomy import FINE_CLASSES, GROUPS8, TYPES5, UNIDENTIFIED, CellKind


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class Detection:
    """One detected cell on a field: box xyxy in field pixels, kind, detector score."""

    box_xyxy: tuple[float, float, float, float]
    kind: CellKind
    score: float = 1.0

    @property
    def width(self) -> float:
        return self.box_xyxy[2] - self.box_xyxy[0]

    @property
    def height(self) -> float:
        return self.box_xyxy[3] - self.box_xyxy[1]


@dataclass(frozen=True)
class MaskStats:
    """Measurements of a cell's mask, in field pixels."""

    cell_area_px: int
    nucleus_area_px: int

    @property
    def nucleus_to_cell(self) -> float:
        return self.nucleus_area_px / self.cell_area_px if self.cell_area_px else float("nan")


#: what the review page shows, kept by the pipeline when a run makes the page (``Stages.keep_views``):
#: each cell's crop at VIEW_CROP_PX square, each field at most VIEW_FIELD_PX on its long side
VIEW_CROP_PX = 96
VIEW_FIELD_PX = 640
#: the JPEG quality the views are kept at, the one the page embeds them at: a BCCD field's view is then
#: 22 KB (its pixels 922 KB), and the page's image, drawn on the decoded view and encoded again at the
#: same quality, is within 0.03 dB PSNR of the field encoded once
VIEW_JPEG_QUALITY = 80


@dataclass(frozen=True)
class CellView:
    """What the review page shows of a classified cell, cut by the pipeline from the field it read:
    the crop (the run's crop geometry, VIEW_CROP_PX square) as JPEG bytes and, for a masked cell, the
    segmenter's mask of it at the same size (0 background, 1 cytoplasm, 2 nucleus) as PNG bytes."""

    crop_jpeg: bytes
    mask_png: bytes | None = None


@dataclass(frozen=True)
class FieldView:
    """What the review page shows of a field: the image scaled by ``scale`` (<= 1) to at most
    VIEW_FIELD_PX on its long side, as JPEG bytes (None when the field could not be read for its
    view), and the sha256 of the decoded field's pixels (the page keys its saved review by the
    content it shows; "" when the field could not be read)."""

    image_jpeg: bytes | None
    scale: float
    digest: str


@dataclass(frozen=True)
class CellPrediction:
    """A classified cell: its detection, label (a fine class or UNIDENTIFIED), calibrated probs."""

    detection: Detection
    label: str
    prob: float
    probs: dict[str, float] = field(default_factory=dict)
    mask: MaskStats | None = None
    novelty: float | None = None  # distance to the nearest training class / its threshold; > 1: novel
    guard: tuple[float, ...] | None = None  # the slide guard's per-cell vector (smear.classify.guard)
    view: CellView | None = field(default=None, compare=False, repr=False)  # kept for the review page


@dataclass(frozen=True)
class SlideRegion:
    """Where a field cut from a whole-slide file lies on it: its top-left in level-0 pixels, level-0
    pixels per field pixel, micrometres per level-0 pixel (None when unknown), and the slide's
    level-0 width and height (None: unknown). A tile's margin may reach past the slide's edge (read
    as white): boxes are clipped to the slide."""

    x0: float
    y0: float
    scale: float
    mpp: float | None = None
    extent: tuple[int, int] | None = None

    def level0(self, box_xyxy: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """A field box in level-0 pixels of the slide, inside the slide."""
        x0, y0, x1, y1 = box_xyxy
        box = (self.x0 + x0 * self.scale, self.y0 + y0 * self.scale, self.x0 + x1 * self.scale,
               self.y0 + y1 * self.scale)
        if self.extent is None:
            return box
        w, h = self.extent
        return (min(max(box[0], 0.0), w), min(max(box[1], 0.0), h), min(max(box[2], 0.0), w),
                min(max(box[3], 0.0), h))


@dataclass(frozen=True)
class FieldResult:
    """Everything found on one field."""

    slide: str
    field: str
    width: int
    height: int
    detections: tuple[Detection, ...]
    cells: tuple[CellPrediction, ...] = ()
    path: str = ""  # the field's image file (a whole slide's file), for reports that show it
    region: SlideRegion | None = None  # a tile of a whole slide: where it lies
    view: FieldView | None = field(default=None, compare=False, repr=False)  # kept for the review page

    def count(self, kind: CellKind) -> int:
        return sum(1 for d in self.detections if d.kind == kind)


@dataclass(frozen=True)
class SkippedField:
    """A field that could not be processed, with the reason."""

    slide: str
    field: str
    reason: str


@dataclass
class GuardSums:
    """What the slide guard keeps of a slide's cells: sums, so a streamed slide needs no per-cell memory."""

    n: int = 0                          # cells with a guard vector
    vector: np.ndarray | None = None    # sum of their guard vectors
    n_scored: int = 0                   # cells with a novelty ratio
    novelty: float = 0.0                # sum of their novelty ratios
    n_prob: int = 0                     # classified cells
    prob: float = 0.0                   # sum of their calibrated top probabilities

    def add(self, cell: CellPrediction) -> None:
        if cell.guard is not None:
            v = np.asarray(cell.guard, np.float64)
            self.vector = v.copy() if self.vector is None else self.vector + v
            self.n += 1
        if cell.novelty is not None:
            self.n_scored += 1
            self.novelty += float(cell.novelty)
        if cell.probs:
            self.n_prob += 1
            self.prob += float(cell.prob)


@dataclass
class Tally:
    """Running counts of a slide's fields, so a long slide need not keep every field in memory."""

    n_fields: int = 0
    kinds: dict[str, int] = field(default_factory=dict)   # CellKind value -> detections
    labels: dict[str, int] = field(default_factory=dict)  # fine class / UNIDENTIFIED -> cells
    n_scored: int = 0   # cells with a novelty score
    n_novel: int = 0    # ... of them over its threshold

    def add(self, fr: FieldResult) -> None:
        self.n_fields += 1
        for d in fr.detections:
            self.kinds[d.kind.value] = self.kinds.get(d.kind.value, 0) + 1
        for c in fr.cells:
            self.labels[c.label] = self.labels.get(c.label, 0) + 1
        scored, novel = novelty_counts(fr.cells)
        self.n_scored += scored
        self.n_novel += novel


def novelty_counts(cells: Sequence[CellPrediction]) -> tuple[int, int]:
    """(cells with a novelty score, cells whose score is over its threshold)."""
    scored = [c.novelty for c in cells if c.novelty is not None]
    return len(scored), sum(1 for v in scored if v > 1.0)


@dataclass(frozen=True)
class WholeSlideInfo:
    """What a whole-slide run read, skipped and found besides the cells (smear.pipeline.wsi_run)."""

    path: str
    width: int                 # level 0, px
    height: int
    mpp: float | None          # um per level-0 px
    mpp_source: str            # file | config | estimated (median red-cell diameter)
    level: int                 # pyramid level read
    scale: float               # level-0 px per detector px
    tile_px: int               # side of a reading tile's core, level-0 px
    tiles_total: int
    tiles_read: int            # looked at: read from the slide or found in the result cache
    tiles_counted: int
    skipped: dict[str, int]    # empty, thick, edge, blurred (finder), blurred_on_read, not_reached
    area_mm2: float | None     # the counted tiles' cores
    target_wbc: int | None     # None: --all
    reached_target: bool
    n_platelet: int
    platelets_per_hpf: float | None
    platelets_1e9_per_l: float | None   # only with the pixel size from the file or the config
    hpf_diameter_um: float
    platelet_factor: float
    platelet_formula: str = ""
    quality_map: str = ""      # the PNG written, if any
    quality_map_png: bytes = field(default=b"", repr=False)
    finder_s: float = 0.0
    read_s: float = 0.0
    detect_s: float = 0.0
    tiles_from_cache: int = 0  # of tiles_read (not in the report rows: a resumed run reports as a whole one)

    def row(self) -> dict[str, Any]:
        """The report columns of a whole slide (``wsi_`` names)."""
        out = {"wsi_mpp": self.mpp, "wsi_mpp_source": self.mpp_source, "wsi_level": self.level,
               "wsi_tiles_total": self.tiles_total, "wsi_tiles_read": self.tiles_read,
               "wsi_tiles_counted": self.tiles_counted}
        for kind in ("empty", "thick", "edge", "blurred", "blurred_on_read", "not_reached"):
            out[f"wsi_skipped_{kind}"] = self.skipped.get(kind, 0)
        out.update({"wsi_area_mm2": self.area_mm2, "wsi_target_wbc": self.target_wbc,
                    "wsi_reached_target": self.reached_target, "platelets_per_hpf": self.platelets_per_hpf,
                    "platelets_1e9_per_l": self.platelets_1e9_per_l, "wsi_quality_map": self.quality_map})
        return out


@dataclass(frozen=True)
class SlideReport:
    """A slide's aggregated counts; built from its field results by the pipeline.

    ``fields`` holds every FieldResult, unless the run streamed: then ``fields`` is empty and
    ``tally`` carries the counts (the per-field detail went to the callback as it was made)."""

    slide: str
    fields: tuple[FieldResult, ...]
    skipped: tuple[SkippedField, ...] = ()
    classified: bool = False
    tally: Tally | None = None
    evidence: dict[str, float] = field(default_factory=dict)  # the slide guard's fitted ratios (pipeline)
    whole_slide: WholeSlideInfo | None = None

    @property
    def n_fields(self) -> int:
        return self.tally.n_fields if self.tally is not None else len(self.fields)

    def count(self, kind: CellKind) -> int:
        if self.tally is not None:
            return self.tally.kinds.get(kind.value, 0)
        return sum(f.count(kind) for f in self.fields)

    def cells(self) -> list[CellPrediction]:
        return [c for f in self.fields for c in f.cells]

    def label_counts(self) -> dict[str, int]:
        """Counts of each fine class and UNIDENTIFIED over the classified cells."""
        counts = {c: 0 for c in (*FINE_CLASSES, UNIDENTIFIED)}
        if self.tally is not None:
            for label, n in self.tally.labels.items():
                counts[label] = counts.get(label, 0) + n
            return counts
        for cell in self.cells():
            counts[cell.label] = counts.get(cell.label, 0) + 1
        return counts

    def novelty_counts(self) -> tuple[int, int]:
        """(WBCs with a novelty score, WBCs unlike every training class) over the slide."""
        if self.tally is not None:
            return self.tally.n_scored, self.tally.n_novel
        return novelty_counts(self.cells())


@dataclass(frozen=True)
class Share:
    """One class of a slide's differential: its count and, where it enters the WBC percentages,
    the percentage and its confidence interval (None otherwise, or on a slide without WBCs)."""

    n: int | None
    pct: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None


#: the first columns of a summary row, and its derived figures after the shares (Differential attributes)
HEAD_COLUMNS = ("slide", "n_fields", "n_wbc", "n_unidentified")
DERIVED_COLUMNS = ("nrbc_per_100_wbc", "n_rbc", "rbc_per_field", "n_platelet", "platelets_per_field",
                   "platelets_per_100_rbc", "n_skipped", "n_wbc_detected", "wbc_needed", "novel_share",
                   "domain_score")


def summary_columns() -> list[str]:
    """The CSV report's columns of a slide (one without a whole-slide file), in order: the columns of
    ``Differential.row`` with its lists left out and the flags joined last."""
    shares = [f"{prefix}{name}_{part}" for prefix, names in (("", FINE_CLASSES), ("group_", GROUPS8),
                                                            ("type_", TYPES5))
              for name in names for part in ("n", "pct", "ci_low", "ci_high")]
    return [*HEAD_COLUMNS, *shares, *DERIVED_COLUMNS, "domain_warning", "flags"]


@dataclass(frozen=True)
class Differential:
    """A slide's differential, as every report shows it: counts, shares per fine class, 8-group and
    5-type, derived figures, the domain guard's warnings, warnings and review flags."""

    slide: str
    n_fields: int
    n_wbc: int
    n_unidentified: int | None
    fine: dict[str, Share]    # FINE_CLASSES, in order
    groups: dict[str, Share]  # GROUPS8
    types: dict[str, Share]   # TYPES5
    nrbc_per_100_wbc: float | None
    n_rbc: int
    rbc_per_field: float | None
    n_platelet: int
    platelets_per_field: float | None
    platelets_per_100_rbc: float | None
    n_skipped: int
    n_wbc_detected: int
    wbc_needed: int | None
    novel_share: float | None
    classified: bool
    domain_score: float | None = None  # the slide guard's largest evidence ratio; over its threshold: a warning
    domain_evidence: dict[str, float] = field(default_factory=dict)  # each evidence's ratio to its threshold
    domain_warnings: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    whole_slide: WholeSlideInfo | None = None

    def row(self) -> dict[str, Any]:
        """The flat summary row: the CSV columns in order (``SNE_pct``, ``group_ig_n``, ...), then
        'classified', 'domain_warnings', 'warnings' and 'flags' (lists)."""
        out: dict[str, Any] = {key: getattr(self, key) for key in HEAD_COLUMNS}
        for prefix, shares in (("", self.fine), ("group_", self.groups), ("type_", self.types)):
            for name, s in shares.items():
                out.update({f"{prefix}{name}_n": s.n, f"{prefix}{name}_pct": s.pct,
                            f"{prefix}{name}_ci_low": s.ci_low, f"{prefix}{name}_ci_high": s.ci_high})
        for key in DERIVED_COLUMNS:
            out[key] = getattr(self, key)
        if self.whole_slide is not None:
            out.update(self.whole_slide.row())
        out["domain_warning"] = " | ".join(self.domain_warnings)
        out.update({"classified": self.classified, "domain_evidence": dict(self.domain_evidence),
                    "domain_warnings": list(self.domain_warnings),
                    "warnings": list(self.warnings), "flags": list(self.flags)})
        return out


@dataclass(frozen=True)
class CropGeometry:
    """The crops a run cut from each WBC box: a square of side ``margin`` x the box's long side,
    resized to ``size`` px (the classifier's geometry, or the segmenter's when there is no classifier)."""

    margin: float
    size: int


@dataclass(frozen=True)
class RunResult:
    """What ``smear.pipeline.job.run_job`` made: each slide's report and differential (slide order),
    the pipeline config it ran under, the stages' version (which keys the cache), the audit a report
    states, and the crop geometry of the stages (None when no stage cut crops)."""

    reports: tuple[SlideReport, ...]
    differentials: tuple[Differential, ...]
    cfg: PipelineConfig
    version: str
    audit: dict[str, Any]
    geometry: CropGeometry | None = None
    finished: tuple[int, int] | None = None  # (fields and whole-slide tiles whose result was made, all fields of
    #                                            the field slides and the whole-slide tiles reached)

    @property
    def masks(self) -> bool:
        """Whether a segmenter ran (the per-cell table then has the mask columns)."""
        return self.cfg.segmenter != "off"


# ---------------------------------------------------------------- stage protocols


@runtime_checkable
class Detector(Protocol):
    """Finds cells on whole fields."""

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Detection]]: ...


@runtime_checkable
class Segmenter(Protocol):
    """Masks cell crops: returns per crop an HxW uint8 mask, 0 background, 1 cytoplasm, 2 nucleus.

    ``crop_margin`` and ``input_size`` state the crop geometry it was made for (the pipeline cuts its
    crops so when there is no classifier).
    """

    crop_margin: float
    input_size: int

    def segment(self, crops: Sequence[np.ndarray]) -> list[np.ndarray]: ...


@dataclass(frozen=True)
class ClassScores:
    """What a classifier says of N crops: calibrated probabilities, N x len(classes) (rows sum to 1,
    columns in ``classes`` order), and each crop's novelty as a ratio to the model's threshold (over
    1: unlike every class it was trained on), None when the model has no novelty score."""

    classes: tuple[str, ...]
    probs: np.ndarray
    novelty: np.ndarray | None = None
    guard: np.ndarray | None = None  # N x the slide guard's per-cell vector (smear.classify.guard)

    def __len__(self) -> int:
        return len(self.probs)

    def probs_of(self, i: int) -> dict[str, float]:
        """Crop ``i``'s probability of each class."""
        return {c: float(v) for c, v in zip(self.classes, self.probs[i])}

    def novelty_of(self, i: int) -> float | None:
        return None if self.novelty is None else float(self.novelty[i])

    def guard_of(self, i: int) -> tuple[float, ...] | None:
        return None if self.guard is None else tuple(float(x) for x in self.guard[i])


class SlideEvidence(Protocol):
    """A classifier's slide guard (smear.classify.guard.SlideGuard): a slide's evidence of being
    misread, from the sums of its cells' guard vectors."""

    def evidence(self, sums: GuardSums) -> dict[str, float]: ...


@runtime_checkable
class Classifier(Protocol):
    """Labels WBC crops with calibrated probabilities over FINE_CLASSES, and with a novelty score when
    the model has one.

    ``crop_margin`` and ``input_size`` state the crop geometry the classifier was trained on;
    ``guard`` is its slide guard (None when its model has none), which judges each slide's cells.
    """

    crop_margin: float
    input_size: int
    guard: SlideEvidence | None

    def classify(self, crops: Sequence[np.ndarray]) -> ClassScores: ...

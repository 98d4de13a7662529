"""The typed configs: one pydantic model per stage, the types of the shipped YAML in smear/configs/.

The defaults are written once, in the YAML (with their comments); here every key is required, so a
key added to one and not the other fails the tests. Every section forbids unknown keys; choices are
``Literal``s, so a wrong value is refused with the key and what it must be before any model loads.
``load_config`` (smear.config) returns these, frozen, and the stages read their attributes; the
stages' parameter objects (the WBC check, the stain jitter, the batch augmentation) are built from them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints


def _word(value: Any) -> Any:
    """YAML 1.1 reads a bare off/on (no/yes) as a boolean; a choice takes it back as the word."""
    return ("on" if value else "off") if isinstance(value, bool) else value


Device = Annotated[str, StringConstraints(pattern=r"(?i)^\s*(auto|cpu|cuda(:\d+)?)\s*$")]
Path_ = Union[str, None]  # a path as written (relative to the working directory), or null
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- shared


class Augment(Section):
    """Batch augmentation of the classifier and the U-Net (smear.nn.augment)."""

    hed: float
    hue: float
    saturation: float
    brightness: float
    contrast: float
    blur_p: Fraction
    blur_sigma: float
    noise: float
    scale: float
    shift: float
    rotate_deg: float
    dihedral: bool
    downres_p: Fraction
    downres_min: float
    jpeg_p: Fraction
    jpeg_quality: int
    gray_p: Fraction
    shuffle_p: Fraction       # RGB channel orders shuffled: colour alone cannot decide a class
    cast_p: Fraction          # pink/red Wright-like cast over the whole crop
    cast_strength: float      # its largest optical density


# ---------------------------------------------------------------- pipeline


class WbcCheck(Section):
    enabled: bool
    max_rbc_area_ratio: float
    min_nucleus_fraction: float
    nucleus_level: float
    min_stain: float
    min_rbcs: int


class IoSection(Section):
    max_pixels: Annotated[int, Field(gt=0)]
    max_pixels_in_flight: Union[Literal["auto"], Annotated[int, Field(gt=0)]]


class ReportSection(Section):
    confidence: Annotated[float, Field(gt=0.0, lt=1.0)]
    ci_method: Literal["wilson", "exact"]
    min_wbc: int
    target_halfwidth_pct: float
    gallery_per_class: int
    signoff_requires_review: bool


class Implausible(Section):
    """A differential almost no blood has (smear.report.summary.implausible_differential)."""

    eosinophil_pct: float
    eosinophil_neutrophil_max_pct: float
    basophil_pct: float
    promyelocyte_pct: float
    monocyte_pct: float
    nrbc_per_100_wbc: float
    nrbc_lymphocyte_max_pct: float


class Guard(Section):
    max_domain_score: Annotated[float, Field(gt=0.0)]
    min_cells: int
    implausible: Implausible
    max_novel_share: float
    min_scored: int
    max_nrbc_per_100_wbc: float
    max_wbc_per_rbc: float
    min_rbc: int


class Flags(Section):
    ig_present_pct: float
    left_shift_pct: float
    nrbc_present_per_100_wbc: float
    eosinophilia_pct: float
    basophilia_pct: float
    monocytosis_pct: float
    lymphocytosis_pct: float
    lymphopenia_pct: float


class WsiSection(Section):
    """Whole-slide files: pixel size, reading tiles, the monolayer finder, the platelet estimate."""

    target_wbc: Annotated[int, Field(gt=0)]
    mpp: Optional[Annotated[float, Field(gt=0.0)]]
    detector_mpp: Annotated[float, Field(gt=0.0)]
    rbc_diameter_um: Annotated[float, Field(gt=0.0)]
    tile_px: Annotated[int, Field(ge=64)]
    margin_px: Annotated[int, Field(ge=0)]
    finder_mpp: Annotated[float, Field(gt=0.0)]
    probe_px: Annotated[int, Field(ge=32)]
    min_density: float
    max_density: float
    max_overlap: Fraction
    empty_density: float
    overlap_od: float
    min_focus: float
    hpf_diameter_um: Annotated[float, Field(gt=0.0)]
    platelet_factor: Annotated[float, Field(gt=0.0)]
    quality_map: Annotated[str, BeforeValidator(_word)]  # auto | off | a folder


class PipelineConfig(Section):
    detector: Literal["yolo", "classical"]
    detector_model: str
    classical: dict[str, Any]
    wbc_check: WbcCheck
    segmenter: Annotated[Literal["off", "unet", "kmeans", "grabcut"], BeforeValidator(_word)]
    segmenter_model: str
    mask_background: bool
    classifier: Annotated[Literal["off", "cnn"], BeforeValidator(_word)]
    classifier_model: str
    device: Device
    runtime: Literal["onnx", "onnx-int8", "openvino", "openvino-int8", "torch"]
    calibration_data: str  # auto | a folder laid out as ../shared/data (the INT8 runtimes' training data)
    review_threshold: Fraction
    classify_batch: Annotated[int, Field(gt=0)]
    classify_tta: Optional[Annotated[int, Field(ge=1, le=8)]]
    field_batch: Annotated[int, Field(gt=0)]
    cache_dir: Annotated[str, BeforeValidator(_word)]  # auto | off | a folder
    io: IoSection
    report: ReportSection
    guard: Guard
    flags: Flags
    wsi: WsiSection


# ---------------------------------------------------------------- detect


class DetectData(Section):
    yolo: Path_
    val_fraction: Fraction
    bccd: Path_
    txl: Path_
    bccd_val_fraction: Fraction
    seed: int
    workdir: Path_


class DetectTrain(Section):
    epochs: int
    time: Optional[float]
    imgsz: int
    batch: int
    workers: int
    patience: int
    optimizer: str
    lr0: float
    lrf: float
    cos_lr: bool
    warmup_epochs: float
    close_mosaic: int
    hsv_h: float
    hsv_s: float
    hsv_v: float
    degrees: float
    flipud: Fraction
    fliplr: Fraction
    scale: float
    translate: float
    mosaic: Fraction
    mixup: Fraction
    seed: int
    device: Device


class DetectStain(Section):
    """Stain jitter of the detector's training mosaics, in optical density."""

    p: Fraction
    scale: float
    mix: float
    tint: float


class DetectInfer(Section):
    imgsz: int
    conf: Fraction
    iou: Fraction
    max_det: int
    batch: int
    tile_above: float
    field_scale: int
    tile_overlap: Annotated[float, Field(ge=0.0, lt=1.0)]
    border: float


class DetectConfig(Section):
    model: str
    data: DetectData
    train: DetectTrain
    stain: Optional[DetectStain] = None  # a detect.yaml without the section trains without the jitter
    infer: DetectInfer


# ---------------------------------------------------------------- segment


class SegmentModel(Section):
    arch: str
    encoder: str
    decoder_channels: list[int]
    input_size: int
    crop_margin: float


class SegmentData(Section):
    root: str
    sources: Optional[list[str]]
    holdout: Optional[str]
    boxes_root: Path_
    test_fields: Path_
    val_fraction: Fraction
    test_fraction: Fraction
    split_seed: int
    cache_pad: float


class SegmentTrain(Section):
    epochs: int
    batch: int
    lr: float
    weight_decay: float
    warmup_epochs: float
    dice_weight: float
    patience: int
    max_minutes: Optional[float]
    seed: int
    device: Device
    threads: Optional[int]
    augment: Augment


class SegmentConfig(Section):
    model: SegmentModel
    data: SegmentData
    train: SegmentTrain


# ---------------------------------------------------------------- classify


class ClassifyModel(Section):
    arch: str
    input_size: int
    crop_margin: float
    drop_rate: Fraction
    tta: Annotated[int, Field(ge=1, le=8)]
    norm: Literal["batch", "group", "frozen"]
    head: Literal["flat", "hierarchical"]
    colour_norm: Annotated[Literal["off", "reinhard"], BeforeValidator(_word)]
    novelty_quantile: Optional[Annotated[float, Field(ge=0.5, lt=1.0)]]
    init: Optional[str]


class ClassifyData(Section):
    root: str
    layout: Literal["auto", "pbc", "folders", "csv"]
    sources: Optional[list[dict[str, Any]]]
    split: Optional[str]
    split_fractions: list[float]
    split_seed: int
    cache_dir: Annotated[str, BeforeValidator(_word)]  # auto | off | a folder
    cache_pad: float
    max_train_items: Optional[int]
    max_eval_items: Optional[int]
    workers: Optional[int]


class ClassifyTrain(Section):
    epochs: int
    batch: int
    epoch_items: Optional[int]
    lr: float
    weight_decay: float
    warmup_epochs: float
    label_smoothing: Fraction
    class_weight_power: float
    group_loss_weight: float
    outlier_share: Fraction
    outlier_weight: float
    patience: int
    max_minutes: Optional[float]
    seed: int
    device: Device
    threads: Optional[int]
    prefetch: bool
    augment: Augment


class ClassifyAdapt(Section):
    min_cells: Annotated[int, Field(ge=2)]
    min_per_class: Annotated[int, Field(ge=1)]
    max_rows: Annotated[int, Field(gt=0)]
    heldout: Annotated[float, Field(gt=0, lt=1)]
    source_per_class: Annotated[int, Field(gt=0)]


class ClassifyConfig(Section):
    model: ClassifyModel
    data: ClassifyData
    train: ClassifyTrain
    adapt: ClassifyAdapt


MODELS: dict[str, type[Section]] = {"pipeline": PipelineConfig, "detect": DetectConfig,
                                    "segment": SegmentConfig, "classify": ClassifyConfig}

"""Run the stages over a slide's fields: detect -> crop -> (segment) -> classify -> SlideReport."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generator, Iterable, Iterator, Protocol, Sequence

import cv2
import numpy as np

from smear.io import Slide, check_exposure, image_pixels, pixel_budget, read_image
from smear.pipeline.cache import FieldCache
from smear.crops import crop_square, cut_crop, pad_value, paint_background
from smear.errors import SmearError
from smear.taxonomy import FINE_CLASSES, UNIDENTIFIED, CellKind
from smear.types import (
    VIEW_CROP_PX, VIEW_FIELD_PX, VIEW_JPEG_QUALITY, CellPrediction, CellView, Classifier, Detection, Detector,
    FieldResult, FieldView, GuardSums, MaskStats, Segmenter, SkippedField, SlideEvidence, SlideReport, Tally,
)


@dataclass(frozen=True)
class Stages:
    """The stages a run uses; only the detector is required. Made whole by their builder
    (``smear.pipeline.build.build_stages``), never changed after."""

    detector: Detector
    classifier: Classifier | None = None
    segmenter: Segmenter | None = None
    review_threshold: float = 0.5
    mask_background: bool = False  # classify crops with the segmenter's background painted out
    field_batch: int = 8
    classify_batch: int = 64
    #: decoded field pixels held at once (the batch running and the one decoded ahead); None: io's auto
    pixel_budget: int | None = None
    version: str = "unversioned"  # identifies models + settings; keys the resume cache
    #: keep what the review page shows (a run that makes the page), encoded, in its results: each field at
    #: most VIEW_FIELD_PX on its long side (a BCCD field: 22 KB) and each classified cell's crop and mask
    #: (about 3 KB)
    keep_views: bool = False

    @property
    def guard(self) -> SlideEvidence | None:
        """The slide guard's statistics of the classifier (None when it has none)."""
        return None if self.classifier is None else self.classifier.guard

    @property
    def view_geometry(self) -> tuple[float, int] | None:
        """The crop geometry of the cells whose views are kept: the classified ones (the page shows those)."""
        return self.crop_geometry if self.keep_views and self.classifier is not None else None

    @property
    def crop_geometry(self) -> tuple[float, int] | None:
        """(margin, size) of the crops ``classify_cells`` cuts: the classifier's geometry, the
        segmenter's when there is no classifier, None when neither runs."""
        geometry = self.classifier if self.classifier is not None else self.segmenter
        return None if geometry is None else (float(geometry.crop_margin), int(geometry.input_size))


def _label(probs: dict[str, float], threshold: float) -> tuple[str, float]:
    best = max(FINE_CLASSES, key=lambda c: probs.get(c, 0.0))
    p = float(probs.get(best, 0.0))
    return (best if p >= threshold else UNIDENTIFIED), p


def _classify(clf: Classifier, crops) -> tuple[list[dict[str, float]], list[float | None],
                                                list[tuple[float, ...] | None]]:
    """Probabilities of each crop, its novelty ratio and its slide-guard vector (None when the
    classifier has no novelty score, or no fitted guard)."""
    scores = clf.classify(crops)
    n = range(len(scores))
    return [scores.probs_of(i) for i in n], [scores.novelty_of(i) for i in n], [scores.guard_of(i) for i in n]


def _jpeg(image_rgb: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", np.ascontiguousarray(image_rgb[..., ::-1]),
                        [cv2.IMWRITE_JPEG_QUALITY, VIEW_JPEG_QUALITY])[1].tobytes()


def field_view(image: np.ndarray) -> FieldView:
    """What the review page shows of a decoded field: the field at most VIEW_FIELD_PX on its long side
    (JPEG bytes), and the sha256 of its pixels."""
    digest = hashlib.sha256(image.tobytes()).hexdigest()
    scale = VIEW_FIELD_PX / max(image.shape[:2])
    if scale >= 1:
        return FieldView(_jpeg(image), 1.0, digest)
    return FieldView(_jpeg(cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)), scale, digest)


def cell_view(image: np.ndarray, box_xyxy: tuple[float, float, float, float], margin: float,
              fill: tuple[int, int, int], mask: np.ndarray | None = None, crop: np.ndarray | None = None) -> CellView:
    """What the review page shows of a cell of ``image``: its crop at ``margin`` (``crop`` when it was cut
    at VIEW_CROP_PX already) as JPEG bytes and the segmenter's ``mask`` of it as PNG bytes, both
    VIEW_CROP_PX square."""
    if crop is None or crop.shape[0] != VIEW_CROP_PX:
        crop = cut_crop(image, box_xyxy, margin, VIEW_CROP_PX, fill)
    png = None
    if mask is not None:
        mask = cv2.resize(mask, (VIEW_CROP_PX, VIEW_CROP_PX), interpolation=cv2.INTER_NEAREST)
        png = cv2.imencode(".png", mask)[1].tobytes()
    return CellView(_jpeg(crop), png)


def with_views(fr: FieldResult, image: np.ndarray, geometry: tuple[float, int] | None,
               segmenter: Segmenter | None = None) -> FieldResult:
    """A result made without views (a cached one whose views the cache does not hold) with those a
    fresh run keeps, cut from the field's ``image``: the cells' crops at the run's ``geometry`` (margin,
    size; None: no cell views, as in a run that does not classify), its masked cells masked again by
    ``segmenter`` for their outline."""
    cells = fr.cells
    if geometry is not None and cells:
        margin, size = geometry
        fill = pad_value(image)
        masks: list[np.ndarray | None] = [None] * len(cells)
        masked = [i for i, c in enumerate(cells) if c.mask is not None]
        if segmenter is not None and masked:
            got = segmenter.segment([cut_crop(image, cells[i].detection.box_xyxy, margin, size, fill)
                                     for i in masked])
            for i, m in zip(masked, got):
                masks[i] = m
        cells = tuple(dataclasses.replace(c, view=cell_view(image, c.detection.box_xyxy, margin, fill, m))
                      for c, m in zip(cells, masks))
    return dataclasses.replace(fr, cells=cells, view=field_view(image))


def _mask_stats(mask: np.ndarray, field_side: float) -> MaskStats:
    """Areas of a crop mask in field pixels (the crop covers ``field_side`` x ``field_side`` of the field)."""
    scale = (field_side / mask.shape[0]) ** 2
    return MaskStats(cell_area_px=int(round((mask > 0).sum() * scale)),
                     nucleus_area_px=int(round((mask == 2).sum() * scale)))


def classify_cells(images: Sequence[np.ndarray], detections: Sequence[Sequence[Detection]],
                   stages: Stages) -> list[tuple[CellPrediction, ...]]:
    """Crop every WBC detection of several fields with the classifier's geometry (the segmenter's
    when there is no classifier), mask them when a segmenter is set, and classify the crops of all
    fields together in batches of ``classify_batch``; cells per field, in order."""
    clf, seg = stages.classifier, stages.segmenter
    if clf is None and seg is None:
        return [() for _ in images]
    margin, size = stages.crop_geometry
    views = stages.view_geometry is not None
    owners, wbcs, crops, fills, sides = [], [], [], [], []
    for k, (image, dets) in enumerate(zip(images, detections)):
        fill = pad_value(image) if any(d.kind == CellKind.WBC for d in dets) else None
        for d in dets:
            if d.kind == CellKind.WBC:
                owners.append(k)
                wbcs.append(d)
                fills.append(fill)
                x0, _, x1, _ = crop_square(d.box_xyxy, margin)
                sides.append(x1 - x0)
                crops.append(cut_crop(image, d.box_xyxy, margin, size, fill))
    masks: list[np.ndarray | None] = [None] * len(crops)
    if seg is not None and crops:
        masks = list(seg.segment(crops))
    probs: list[dict[str, float] | None] = [None] * len(crops)
    if clf is not None:
        inputs = crops
        if stages.mask_background and seg is not None:
            inputs = [paint_background(c, m, f) for c, m, f in zip(crops, masks, fills)]
        probs, novelty, guard = [], [], []
        for i in range(0, len(inputs), stages.classify_batch):
            got, nov, gv = _classify(clf, inputs[i:i + stages.classify_batch])
            probs += got
            novelty += nov
            guard += gv
    else:
        novelty = guard = [None] * len(crops)
    cells: list[list[CellPrediction]] = [[] for _ in images]
    for k, det, p, m, side, nv, gv, crop, fill in zip(owners, wbcs, probs, masks, sides, novelty, guard, crops,
                                                      fills):
        label, top = _label(p, stages.review_threshold) if p is not None else ("", 0.0)
        if nv is not None and nv > 1.0:
            label = UNIDENTIFIED  # unlike every class the model was trained on: a person looks
        stats = _mask_stats(m, side) if m is not None else None
        view = cell_view(images[k], det.box_xyxy, margin, fill, m, crop) if views else None
        cells[k].append(CellPrediction(det, label, top, dict(p or {}), stats, nv, gv, view))
    return [tuple(c) for c in cells]


def _read_batch(paths: Sequence[Path], max_pixels: int, views: bool = False
                ) -> list[tuple[Path, np.ndarray | SmearError, FieldView | None]]:
    """Each field decoded (or the error that stopped it) and, with ``views``, what the review page shows
    of it: made here, in the reading thread, while the models run on the batch before."""
    out: list[tuple[Path, np.ndarray | SmearError, FieldView | None]] = []
    for path in paths:
        try:
            image = check_exposure(read_image(path, max_pixels=max_pixels), path)
        except SmearError as exc:
            out.append((path, exc, None))
            continue
        out.append((path, image, field_view(image) if views else None))
    return out


def _batches(paths: Sequence[Path], field_batch: int, budget: int) -> list[tuple[list[Path], int]]:
    """``paths`` in runs of at most ``field_batch`` fields and half the pixel ``budget`` (sizes from the
    files' headers, nothing decoded), each with its pixel count: a run and the one decoded ahead of
    it then fit the budget together. A field over half the budget runs alone."""
    out: list[tuple[list[Path], int]] = []
    run: list[Path] = []
    pixels = 0
    for path in paths:
        size = image_pixels(path)
        if run and (len(run) >= field_batch or pixels + size > budget // 2):
            out.append((run, pixels))
            run, pixels = [], 0
        run.append(path)
        pixels += size
    if run:
        out.append((run, pixels))
    return out


def iter_field_results(
    slide: Slide, stages: Stages, max_pixels: int, cache: FieldCache | None = None, resume: bool = False,
) -> Iterator[FieldResult | SkippedField]:
    """Process a slide's fields in batches, yielding a result or a SkippedField per field, in order.

    The next batch is decoded in a background thread while the models run on the current one. With a
    cache every result is stored as it is made; with ``resume`` cached fields are not run again.
    """
    fields = list(slide.fields)
    cached = ({p: cache.get(p, slide.name, views=stages.keep_views) for p in fields}
              if cache is not None and resume else {})
    todo = [p for p in fields if cached.get(p) is None]
    budget = stages.pixel_budget or pixel_budget("auto", max_pixels)
    sized = _batches(todo, stages.field_batch, budget)
    batches = [b for b, _ in sized]
    done: dict[Path, FieldResult | SkippedField] = {k: v for k, v in cached.items() if v is not None}
    position = {p: i for i, p in enumerate(fields)}
    emitted = 0
    read = functools.partial(_read_batch, max_pixels=max_pixels, views=stages.keep_views)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, batches[0]) if batches else None
        for k, batch in enumerate(batches):
            loaded = pending.result() if pending is not None else read(batch)
            # decode the next run while this one runs, when the two fit the pixel budget together
            ahead = k + 1 < len(batches) and sized[k][1] + sized[k + 1][1] <= budget
            pending = pool.submit(read, batches[k + 1]) if ahead else None
            good = []
            for path, img, view in loaded:
                if isinstance(img, SmearError):
                    done[path] = SkippedField(slide.name, path.name, str(img))
                else:
                    good.append((path, img, view))
            images = [img for _, img, _ in good]
            all_dets = stages.detector.detect(images) if good else []
            all_cells = classify_cells(images, all_dets, stages)
            for (path, img, view), dets, cells in zip(good, all_dets, all_cells):
                done[path] = FieldResult(slide.name, path.name, img.shape[1], img.shape[0], tuple(dets),
                                         cells, str(path), view=view)
                if cache is not None:
                    cache.put(path, done[path])  # with its views beside it, when kept
            loaded = good = images = img = None  # this run's pixels go before the next run is decoded ahead
            while emitted <= position[batch[-1]]:  # in slide order, cached fields in between
                yield _viewed(done.pop(fields[emitted]), stages, max_pixels, cache)
                emitted += 1
    while emitted < len(fields):
        yield _viewed(done.pop(fields[emitted]), stages, max_pixels, cache)
        emitted += 1


def _viewed(item: FieldResult | SkippedField, stages: Stages, max_pixels: int,
            cache: FieldCache | None) -> FieldResult | SkippedField:
    """A result from the cache with its views, when the stages keep them and the cache had none for it:
    its field is read (and masked) again, and the views stored for the next time (a field that cannot
    be read now is still counted, its view empty)."""
    if not stages.keep_views or isinstance(item, SkippedField) or item.view is not None:
        return item
    try:
        image = read_image(item.path, max_pixels=max_pixels)
    except SmearError:
        return dataclasses.replace(item, view=FieldView(None, 1.0, ""))
    item = with_views(item, image, stages.view_geometry, stages.segmenter)
    if cache is not None:
        cache.put_views(Path(item.path), item)
    return item


def gather_report(slide: str, items: Iterable[FieldResult | SkippedField], *, classified: bool, guard: Any = None,
                  on_field: Callable[[FieldResult | SkippedField], None] | None = None,
                  keep_fields: bool = True) -> SlideReport:
    """The SlideReport of the slide named ``slide`` from its field results in order (each also given
    to ``on_field``), with the slide guard's evidence when there is a fitted ``guard``
    (smear.classify.guard.SlideGuard); ``keep_fields=False`` keeps running counts only. Every engine
    and input kind (field folders, whole-slide tiles) ends here."""
    fields, skipped, tally, sums = [], [], Tally(), GuardSums()
    for item in items:
        if isinstance(item, SkippedField):
            skipped.append(item)
        else:
            tally.add(item)
            for cell in item.cells:
                sums.add(cell)
            if keep_fields:
                fields.append(item)
        if on_field:
            on_field(item)
    return SlideReport(slide, tuple(fields), tuple(skipped), classified=classified,
                       tally=None if keep_fields else tally,
                       evidence=guard.evidence(sums) if guard is not None else {})


def run_slide(slide: Slide, stages: Stages, max_pixels: int = 200_000_000,
              on_field: Callable[[FieldResult | SkippedField], None] | None = None,
              cache: FieldCache | None = None, resume: bool = False, keep_fields: bool = True) -> SlideReport:
    """All fields of one slide through the stages, aggregated into a SlideReport. With
    ``keep_fields=False`` only running counts are kept (memory flat in the number of fields);
    ``on_field`` still sees every result as it is made."""
    return gather_report(slide.name, iter_field_results(slide, stages, max_pixels, cache, resume),
                         classified=stages.classifier is not None, guard=stages.guard, on_field=on_field,
                         keep_fields=keep_fields)


FieldCallback = Callable[[str, FieldResult | SkippedField], None]


class Engine(Protocol):
    """Runs the fields of many slides somewhere else (``smear.pipeline.ray_engine``) on stages it
    builds there: ``classified`` says whether they classify, ``crop_geometry`` is theirs."""

    classified: bool
    crop_geometry: tuple[float, int] | None
    guard: Any  # the slide guard's statistics, loaded by the driver (no network)

    def results(self, slides: Sequence[Slide], max_pixels: int, resume: bool
                ) -> Generator[FieldResult | SkippedField, None, None]:
        """One result or SkippedField per field of every slide, in slide and field order."""
        ...


def run_slides(slides: Sequence[Slide], stages: Stages | None, max_pixels: int = 200_000_000,
               on_field: FieldCallback | None = None, cache: FieldCache | None = None, resume: bool = False,
               keep_fields: bool = True, engine: Engine | None = None) -> list[SlideReport]:
    """Every slide through ``run_slide``, in order; ``on_field(slide_name, item)`` sees each field's
    result as it is made. With an ``engine`` the fields run there (it holds its own stages and cache;
    ``stages`` may be None) and come back in the same order into the same reports. A run where no
    field could be read at all is a SmearError."""
    if engine is None and stages is None:
        raise ValueError("run_slides needs stages or an engine")
    stream = engine.results(slides, max_pixels, resume) if engine is not None else None
    classified = engine.classified if engine is not None else stages.classifier is not None
    guard = engine.guard if engine is not None else stages.guard
    reports = []
    try:
        for slide in slides:
            def each(item, _name=slide.name):
                if on_field is not None:
                    on_field(_name, item)
            items = (iter_field_results(slide, stages, max_pixels, cache, resume) if stream is None
                     else itertools.islice(stream, len(slide.fields)))
            reports.append(gather_report(slide.name, items, classified=classified, guard=guard, on_field=each,
                                         keep_fields=keep_fields))
    finally:
        if stream is not None:
            stream.close()  # a run stopped early stops the engine's work too
    if not any(r.n_fields for r in reports):
        skipped = [s for r in reports for s in r.skipped]
        if len(skipped) == 1:
            raise SmearError(skipped[0].reason)
        if not skipped:
            raise SmearError(f"{slides[0].name}: no fields to run", hint="see the warnings above")
        raise SmearError(f"none of the {len(skipped)} fields could be read", hint="see the warnings above")
    return reports

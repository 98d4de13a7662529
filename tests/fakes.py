"""Tiny fake stages for pipeline tests: behaviour fixed by the test, no models."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from smear.taxonomy import FINE_CLASSES, CellKind
from smear.types import ClassScores, Detection


class FakeDetector:
    """Returns preset detections for each image, keyed by the image's width."""

    def __init__(self, by_width: dict[int, list[Detection]]):
        self.by_width = by_width
        self.batches: list[int] = []

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        self.batches.append(len(images))
        return [list(self.by_width.get(im.shape[1], [])) for im in images]


class FakeClassifier:
    """Hands out (label, top probability) pairs in call order."""

    crop_margin = 1.2
    input_size = 16
    guard = None  # no slide guard

    def __init__(self, labels: list[tuple[str, float]]):
        self.labels = list(labels)
        self.crop_shapes: list[tuple[int, ...]] = []
        self.calls: list[int] = []

    def classify(self, crops: Sequence[np.ndarray]) -> ClassScores:
        self.calls.append(len(crops))
        out = []
        for crop in crops:
            self.crop_shapes.append(crop.shape)
            out.append(self.labels.pop(0))
        return scores(out)


def scores(labels: Sequence[tuple[str, float]]) -> ClassScores:
    """ClassScores with probability ``p`` on each crop's label and the rest spread evenly."""
    probs = np.zeros((len(labels), len(FINE_CLASSES)))
    for i, (label, p) in enumerate(labels):
        probs[i] = (1.0 - p) / (len(FINE_CLASSES) - 1)
        probs[i, FINE_CLASSES.index(label)] = p
    return ClassScores(tuple(FINE_CLASSES), probs)


def dets(n_wbc: int, n_rbc: int, n_plt: int) -> list[Detection]:
    """Boxes laid out on a row: WBCs, then RBCs, then platelets."""
    out, x = [], 2.0
    for kind, n in ((CellKind.WBC, n_wbc), (CellKind.RBC, n_rbc), (CellKind.PLATELET, n_plt)):
        for _ in range(n):
            out.append(Detection((x, 2.0, x + 8.0, 10.0), kind, 0.9))
            x += 10.0
    return out


class ContentClassifier:
    """Labels each crop by a hash of its pixels: deterministic whatever the call order."""

    crop_margin = 1.2
    input_size = 16
    guard = None  # no slide guard

    def __init__(self, labels: list[tuple[str, float]]):
        self.labels = labels

    def classify(self, crops: Sequence[np.ndarray]) -> ClassScores:
        import hashlib

        return scores([self.labels[int(hashlib.sha256(c.tobytes()).hexdigest(), 16) % len(self.labels)]
                       for c in crops])


class HalfMask:
    """A segmenter whose mask is nucleus (2) on the left half of each crop and ``rest`` on the right
    (0: background, 1: cytoplasm)."""

    crop_margin = 1.2
    input_size = 16

    def __init__(self, rest: int = 0):
        self.rest = rest

    def segment(self, crops: Sequence[np.ndarray]) -> list[np.ndarray]:
        out = []
        for c in crops:
            m = np.full(c.shape[:2], self.rest, np.uint8)
            m[:, : c.shape[1] // 2] = 2
            out.append(m)
        return out


class SynthStages:
    """Builds stages for the Ray tests in each worker (picklable): the classical detector, a
    ContentClassifier and HalfMask, ``field_batch`` fields a batch. A worker that meets a field
    ``kill_width`` pixels wide, while ``marker`` does not exist yet, creates it and SIGKILLs its own
    process mid-run; one that meets a field ``fail_width`` wide raises. ``log``, when set, is a folder
    where each worker writes a file per field batch it runs (to count what was run again). With ``views``
    the stages keep what the review page shows."""

    LABELS = [("SNE", 0.9), ("LY", 0.8), ("MO", 0.3), ("EO", 0.95)]

    def __init__(self, field_batch: int = 2, kill_width: int = 0, marker: str = "", fail_width: int = 0,
                 log: str = "", views: bool = False):
        self.field_batch, self.kill_width, self.marker = field_batch, kill_width, marker
        self.fail_width, self.log, self.views = fail_width, log, views

    def __call__(self):
        from smear.detect.classical import ClassicalDetector
        from smear.pipeline.run import Stages

        det = _Tripwire(ClassicalDetector(), self.kill_width, self.marker, self.fail_width, self.log)
        return Stages(detector=det, classifier=ContentClassifier(self.LABELS), segmenter=HalfMask(),
                      field_batch=self.field_batch, version="synth", keep_views=self.views)


class _Tripwire:
    def __init__(self, inner, kill_width: int, marker: str, fail_width: int, log: str):
        self.inner, self.kill_width, self.marker, self.fail_width, self.log = inner, kill_width, marker, fail_width, log

    def detect(self, images):
        import os
        import signal
        import uuid
        from pathlib import Path

        widths = {im.shape[1] for im in images}
        if self.kill_width in widths and self.marker and not Path(self.marker).exists():
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        if self.fail_width in widths:
            from smear.errors import SmearError

            raise SmearError(f"fault injected on a field {self.fail_width} px wide")
        if self.log:
            Path(self.log, f"{os.getpid()}-{uuid.uuid4().hex}").write_text(" ".join(map(str, sorted(widths))))
        return self.inner.detect(images)

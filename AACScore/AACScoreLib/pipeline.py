"""The one scoring pipeline: radiograph → vertebrae → Kauppila geometry → crop → score → heatmap → result.

The command line, the batch runner, the Slicer module and the tests all call `Pipeline.run`; nothing here is
implemented twice elsewhere. A user's corrected label map replaces the segmenter. Expected failures (unreadable
file, vertebrae not found, bad geometry) come back as a result with status "error" and a message, never as an
exception, so a batch goes on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .geometry import spine
from . import kauppila
from .errors import AACScoreError, Cancelled
from .io.radiograph import Radiograph, read_radiograph
from .segmentation.levels import LevelAssignment

Progress = Callable[[float, str], None]
Cancel = Callable[[], bool]


@dataclass
class AACResult:
    """Everything one radiograph gave; `status` is "ok", "warning" (scored, but check) or "error"."""

    file: str
    status: str
    message: str = ""
    aac24: float | None = None
    category: str | None = None
    subscores: dict[str, float] | None = None
    radiograph: Radiograph | None = None
    labels: np.ndarray | None = None
    labels_source: str = ""  # "segmenter" | "user"
    levels: LevelAssignment | None = None  # how the segmenter counted L1..L5 (None for a user's label map)
    geometry: spine.SpineGeometry | None = None
    heatmap: np.ndarray | None = None  # on the radiograph grid, 0..1
    heatmap_all_zero: bool = False
    seconds: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict[str, object]:
        """The row of results.csv (and of the Slicer results table) for this radiograph."""
        row: dict[str, object] = {
            "file": self.file,
            "aac24": None if self.aac24 is None else round(float(self.aac24), 3),
            "category": self.category,
            "status": self.status,
            "message": self.message,
        }
        for column in kauppila.SUBSCORE_COLUMNS:
            row[column] = None if self.subscores is None else round(float(self.subscores[column]), 3)
        if self.labels_source == "user":
            row["levels"] = "user"
        elif self.levels is not None:
            row["levels"] = self.levels.summary()
        if self.geometry is not None:
            row["anterior"] = f"{self.geometry.anterior_source}"
        if self.radiograph is not None and self.radiograph.spacing is not None:
            row["spacing_mm"] = f"{self.radiograph.spacing[0]:.4f}x{self.radiograph.spacing[1]:.4f}"
        row["seconds"] = round(sum(self.seconds.values()), 3)
        return row


class Pipeline:
    """Holds the loaded models so that a batch loads them once."""

    def __init__(self, scorer, segmenter=None):
        self.scorer = scorer
        self.segmenter = segmenter

    @property
    def models(self) -> str:
        """The packages behind this pipeline's results, as results.csv records them: 'name==version; ...'."""
        manifests = [self.scorer.manifest] + ([self.segmenter.manifest] if self.segmenter is not None else [])
        return "; ".join(f"{m.get('name')}=={m.get('version')}" for m in manifests)

    @classmethod
    def from_packages(
        cls,
        scorer_model: str | None = None,
        segmenter_model: str | None = None,
        device: str = "auto",
        models_dir: str | Path | None = None,
        need_segmenter: bool = True,
    ) -> "Pipeline":
        """Load the named packages (or the newest installed, else the bundled demo ones)."""
        from .packages import find_package
        from .scoring.scorer import Scorer

        scorer = Scorer.from_package(find_package(scorer_model, "scorer", models_dir), device=device)
        segmenter = None
        if need_segmenter:
            from .segmentation.segmenter import Segmenter

            segmenter = Segmenter.from_package(find_package(segmenter_model, "segmenter", models_dir), device=device)
        return cls(scorer, segmenter)

    def run(
        self,
        source: str | Path | Radiograph,
        labels: np.ndarray | str | Path | None = None,
        *,
        anterior: str | None = None,
        heatmap: bool = True,
        progress: Progress | None = None,
        cancel: Cancel | None = None,
    ) -> AACResult:
        """Score one radiograph; `labels` (array or file) is a user's label map that replaces the segmenter."""
        file = source.path if isinstance(source, Radiograph) else str(source)
        result = AACResult(file=file, status="error")
        report = progress or (lambda fraction, text: None)
        try:
            self._run(result, source, labels, anterior, heatmap, report, cancel)
        except Cancelled:
            raise
        except AACScoreError as error:
            result.status, result.message = "error", str(error)
        return result

    def _run(self, result, source, labels, anterior, heatmap, report, cancel) -> None:
        warnings: list[str] = []
        with _timed(result, "read"):
            radiograph = source if isinstance(source, Radiograph) else read_radiograph(source)
        result.radiograph = radiograph
        if radiograph.spacing is None:
            warnings.append("pixel spacing unknown: geometry in pixels")
        _check_cancel(cancel)

        report(0.1, "segmenting vertebrae")
        with _timed(result, "segment"):
            result.labels, result.labels_source = self._labels(result, radiograph, labels, warnings, cancel)
        _check_cancel(cancel)

        report(0.5, "Kauppila geometry")
        with _timed(result, "crop"):
            result.geometry = spine.analyze_spine(
                result.labels,
                radiograph.spacing,
                anterior=anterior,
                patient_orientation=radiograph.patient_orientation,
                image=radiograph.pixels,
            )
            crop = self.scorer.crop(radiograph.pixels, result.geometry)
        if result.geometry.anterior_source == "default":
            warnings.append("anterior side not evident from the image: check the boundaries or set it")
        _check_cancel(cancel)

        report(0.7, "scoring")
        with _timed(result, "score"):
            scored = self.scorer.score(crop)
        result.aac24 = float(scored.aac24)
        result.subscores = scored.subscores
        result.category = kauppila.category(result.aac24)

        if heatmap:
            report(0.85, "Grad-CAM heatmap")
            with _timed(result, "heatmap"):
                grad_cam = self.scorer.heatmap(crop)
                result.heatmap = grad_cam.on_image(result.geometry.crop, radiograph.pixels.shape)
                result.heatmap_all_zero = grad_cam.all_zero
        report(1.0, "done")
        result.status = "warning" if warnings else "ok"
        result.message = "; ".join(warnings)

    def _labels(self, result, radiograph, labels, warnings, cancel) -> tuple[np.ndarray, str]:
        if labels is not None:
            from .io.labelmaps import read_label_map, vertebra_labels

            if isinstance(labels, np.ndarray):
                labels = vertebra_labels(labels)  # context classes (6 = T12, 7 = S1) are not scored
            else:
                labels = read_label_map(labels, radiograph.pixels.shape)
            if labels.shape != radiograph.pixels.shape:
                raise AACScoreError(
                    f"{radiograph.path}: label map is {labels.shape[1]}x{labels.shape[0]} pixels, "
                    f"the radiograph {radiograph.pixels.shape[1]}x{radiograph.pixels.shape[0]}"
                )
            return labels.astype(np.uint8), "user"
        if self.segmenter is None:
            raise AACScoreError(f"{radiograph.path}: no label map given and no segmenter loaded")
        segmentation = self.segmenter.segment(radiograph, cancel=cancel)
        result.levels = segmentation.levels
        if segmentation.status == "error":
            raise AACScoreError(f"{radiograph.path}: {segmentation.message}")
        if segmentation.message:
            warnings.append(segmentation.message)
        return segmentation.labels, "segmenter"


class _timed:
    def __init__(self, result: AACResult, stage: str):
        self.result, self.stage = result, stage

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc_info):
        self.result.seconds[self.stage] = time.perf_counter() - self.start


def _check_cancel(cancel: Cancel | None) -> None:
    if cancel is not None and cancel():
        raise Cancelled("cancelled by the user")

"""The one scoring pipeline: radiograph → vertebrae → Kauppila geometry → crop → score → heatmap → result.

The command line, the batch runner, the Slicer module and the tests all call `Pipeline.run`; nothing here is
implemented twice elsewhere. A user's corrected label map replaces the segmenter. Expected failures (unreadable
file, vertebrae not found, bad geometry) come back as a result with status "error" and a message, never as an
exception, so a batch goes on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from .geometry import polarity, spine
from .geometry.orientation import check_numbering
from . import kauppila
from .errors import AACScoreError, Cancelled
from .io.radiograph import Radiograph, read_radiograph
from .qc.check import QualityControl
from .qc.verdict import SEGMENTER_NOTE, Reason, format_reasons
from .segmentation.levels import LevelAssignment

Progress = Callable[[float, str], None]
Cancel = Callable[[], bool]


@dataclass
class AACResult:
    """Everything one radiograph gave.

    `qc` is the verdict: "ok", "review" (scored, but look at it: `qc_reasons` say why) or "error" (no score).
    `status` is the same verdict in the older words that existing readers know: ok, warning (= review), error.
    """

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
    context: np.ndarray | None = None  # the segmenter's T12/S1 (6/7) where it has context classes; never scored
    working_shape: tuple[int, int] | None = None  # the grid the segmenter's network ran on (upright), for QC
    turns: int | None = None  # quarter turns that made the image upright for the segmenter (None: a user's labels)
    geometry: spine.SpineGeometry | None = None
    heatmap: np.ndarray | None = None  # on the radiograph grid, 0..1
    heatmap_all_zero: bool = False
    qc: str = "error"
    qc_reasons: tuple[Reason, ...] = ()
    aac24_low: float | None = None  # the 80% prediction interval (empty without a calibrated scorer package)
    aac24_high: float | None = None
    qc_measurements: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict[str, object]:
        """The row of results.csv (and of the Slicer results table) for this radiograph."""
        row: dict[str, object] = {
            "file": self.file,
            "aac24": None if self.aac24 is None else round(float(self.aac24), 3),
            "category": self.category,
            "status": self.status,
            "message": self.message,
            "qc": self.qc,
            "qc_reasons": format_reasons(self.qc_reasons),
            "aac24_low": None if self.aac24_low is None else round(float(self.aac24_low), 3),
            "aac24_high": None if self.aac24_high is None else round(float(self.aac24_high), 3),
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
        self.quality = QualityControl(scorer, segmenter)

    @property
    def models(self) -> str:
        """The packages behind this pipeline's results, as results.csv records them: 'name==version@identity; ...'
        (the identity, a hash over manifest and weights, tells apart two models given the same name and version)."""
        models = [self.scorer] + ([self.segmenter] if self.segmenter is not None else [])
        return "; ".join(f"{m.manifest.get('name')}=={m.manifest.get('version')}"
                         + (f"@{m.identity[:12]}" if getattr(m, "identity", "") else "") for m in models)

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
            result.qc, result.qc_reasons = "error", (Reason("not_scored", str(error)),)
        return result

    def _run(self, result, source, labels, anterior, heatmap, report, cancel) -> None:
        warnings: list[Reason] = []
        with _timed(result, "read"):
            radiograph = source if isinstance(source, Radiograph) else read_radiograph(source)
        result.radiograph = radiograph
        warnings += [Reason("decoder_warning", text) for text in radiograph.read_warnings]
        _check_cancel(cancel)

        report(0.1, "segmenting vertebrae")
        with _timed(result, "segment"):
            radiograph, labels, result.labels_source = self._labels(result, radiograph, labels, warnings, cancel)
            result.labels, notes = check_numbering(labels, radiograph.patient_orientation)
            warnings += [Reason("label_order", note) for note in notes]
        if radiograph.spacing is None and not any("pixel spacing unknown" in warning.text for warning in warnings):
            # said once: the segmenter may have said it already
            warnings.append(Reason("spacing_unknown", "pixel spacing unknown: geometry in pixels"))
        _check_cancel(cancel)

        report(0.5, "Kauppila geometry")
        with _timed(result, "crop"):
            result.geometry = spine.analyze_spine(
                result.labels,
                radiograph.spacing,
                anterior=anterior,
                patient_orientation=radiograph.patient_orientation,
                image=radiograph.pixels,
                box_ragged=True,
            )
            crop = self.scorer.crop(radiograph.pixels, result.geometry)
        if result.geometry.boxed:
            warnings.append(Reason("body_boxed", f"no four sides could be fitted to the outline of "
                                                 f"{', '.join(result.geometry.boxed)}: its box along the spine was "
                                                 "taken for its corners; check the segment"))
        if result.geometry.anterior_source == "default":
            warnings.append(Reason("anterior_guessed",
                                   "anterior side not evident from the image: check the boundaries or set it"))
        _check_cancel(cancel)

        report(0.7, "scoring")
        with _timed(result, "score"):  # with a heatmap, one pass gives the score and Grad-CAM's crop map
            scored, grad_cam = self.scorer.score_and_heatmap(crop) if heatmap else (self.scorer.score(crop), None)
        result.aac24 = float(scored.aac24)
        result.subscores = scored.subscores
        result.category = kauppila.category(result.aac24)

        if grad_cam is not None:
            report(0.85, "Grad-CAM heatmap")
            with _timed(result, "heatmap"):
                result.heatmap = grad_cam.on_image(result.geometry.crop, radiograph.pixels.shape)
                result.heatmap_all_zero = grad_cam.all_zero
        _check_cancel(cancel)

        report(0.95, "quality control")
        with _timed(result, "qc"):
            verdict = self.quality.assess(radiograph, result.labels, result.labels_source, result.geometry, crop,
                                          result.aac24, result.levels, warnings, result.working_shape,
                                          result.turns)
        report(1.0, "done")
        result.qc, result.qc_reasons, result.qc_measurements = verdict.qc, verdict.reasons, verdict.measurements
        result.aac24_low, result.aac24_high = verdict.aac24_low, verdict.aac24_high
        result.status = verdict.status
        result.message = "; ".join(reason.text for reason in verdict.reasons)

    def _labels(self, result, radiograph, labels, warnings, cancel) -> tuple[Radiograph, np.ndarray, str]:
        """The label map (the user's, else the segmenter's) and the radiograph bone bright (see `_bone_bright`)."""
        if labels is not None:
            from .io.labelmaps import read_label_map, vertebra_labels

            if isinstance(labels, np.ndarray):
                labels = vertebra_labels(labels)  # context classes (6 = T12, 7 = S1) are not scored
            else:
                labels = read_label_map(labels, radiograph.pixels.shape,
                                        source_uid=radiograph.metadata.get("SOPInstanceUID"))
            if labels.shape != radiograph.pixels.shape:
                raise AACScoreError(
                    f"{radiograph.path}: label map is {labels.shape[1]}x{labels.shape[0]} pixels, "
                    f"the radiograph {radiograph.pixels.shape[1]}x{radiograph.pixels.shape[0]}"
                )
            return _bone_bright(result, radiograph, labels, warnings), labels.astype(np.uint8), "user"
        if self.segmenter is None:
            raise AACScoreError(f"{radiograph.path}: no label map given and no segmenter loaded")
        segmentation = self.segmenter.segment(radiograph, cancel=cancel)
        result.levels = getattr(segmentation, "levels", None)  # segmenters of other makes may not count
        result.context = getattr(segmentation, "context", None)
        result.working_shape = getattr(segmentation, "working_shape", None)
        result.turns = getattr(segmentation, "turns", None)
        if segmentation.status == "error":
            raise AACScoreError(f"{radiograph.path}: {segmentation.message}")
        if segmentation.message:
            warnings.append(Reason(SEGMENTER_NOTE, segmentation.message))
        bright = _bone_bright(result, radiograph, segmentation.labels, warnings,
                              getattr(segmentation, "bone_contrast", None))  # the segmenter's measure, if it took one
        return bright, segmentation.labels, "segmenter"


def _bone_bright(result: AACResult, radiograph: Radiograph, labels: np.ndarray, warnings: list[Reason],
                 contrast: float | None = None) -> Radiograph:
    """The radiograph as the models were trained on it: one whose vertebrae (in `labels`) are darker than the tissue
    around them, whatever its tags said, is inverted for the rest of the pipeline, and the result says so. `contrast`
    is the segmenter's measure when it took one, so that crop and segmentation follow the same decision."""
    if contrast is None:
        contrast = polarity.bone_contrast(radiograph.pixels, labels)
    if contrast >= polarity.CLEARLY_INVERTED:
        return radiograph
    warnings.append(Reason("image_inverted", f"bone darker than the tissue around it (contrast {contrast:+.2f}): "
                                             "scored inverted to bone bright; check the file's photometric tags "
                                             "or how it was exported"))
    result.radiograph = replace(radiograph, pixels=polarity.inverted(radiograph.pixels))
    return result.radiograph


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

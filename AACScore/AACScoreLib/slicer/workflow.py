"""What the AACScore Slicer module does to a scene: segment, correct, score, batch, rate and compare raters.

The Slicer panel (AACScore.py) only binds widgets to this module, so every behaviour runs and is tested
headless against slicer-core's scene. Long work is split in three so that Slicer stays responsive:

- `prepare_*` (main thread) copies what the work needs out of the scene: a `Radiograph`, the vertebrae as
  they are now;
- `compute_*` (any thread) runs the models on those copies and never touches the scene;
- `apply_*` (main thread) writes the outcome into the scene: segmentation, results table row, heatmap volume,
  boundary lines.

Inside Slicer the compute step runs in the worker process (`AACScoreLib.worker`): `start_*` send a job and
return a `WorkerJob` that the panel polls (a qt.QTimer) through a `JobPoller`; torch and nnU-Net never load
into Slicer's own process. Given a pipeline object instead (tests, scripts), the same steps run on a Python
thread (`Job`) with the same interface. `segment`, `score` and `score_volumes` chain the three steps and wait.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import slicer
import slicer.util

from ..evaluation import metrics
from . import scene as aac_scene
from ..errors import AACScoreError, Cancelled, RadiographError
from ..kauppila import SUBSCORE_COLUMNS, category, total_score
from ..pipeline import AACResult
from ..io.radiograph import Radiograph, read_or_error
from ..worker.client import WorkerClient, WorkerJob
from ..worker.protocol import VolumeImage, result_from_message

Progress = Callable[[float, str], None]
Cancel = Callable[[], bool]

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


def _no_progress(fraction: float, text: str) -> None:
    pass


def _never() -> bool:
    return False


# ----------------------------------------------------------------------------------------------- volume -> radiograph


def radiograph_volumes(scene) -> list:
    """The scene's radiographs: single-slice scalar volumes, not label maps and not AACScore's heatmaps."""
    volumes = []
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLScalarVolumeNode")
        image = node.GetImageData()
        if (node.IsA("vtkMRMLLabelMapVolumeNode") or node.GetAttribute(aac_scene.ROLE_ATTRIBUTE) == "heatmap"
                or image is None or image.GetDimensions()[2] != 1):
            continue
        volumes.append(node)
    return volumes


def find_heatmap(scene, volume_node):
    """The heatmap volume AACScore made for this radiograph, or None (to show it again when it is selected)."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLScalarVolumeNode")
        if (node.GetAttribute(aac_scene.ROLE_ATTRIBUTE) == "heatmap"
                and node.GetNodeReferenceID(aac_scene.RADIOGRAPH_ROLE) == volume_node.GetID()):
            return node
    return None


def radiograph_key(volume_node) -> str:
    """The results table's `file` for a volume: its source file, else its name (kept stable across .mrb saves)."""
    source = volume_node.GetAttribute(aac_scene.SOURCE_PATH_ATTRIBUTE)
    if not source:
        source = _source_file(volume_node) or volume_node.GetName()
        volume_node.SetAttribute(aac_scene.SOURCE_PATH_ATTRIBUTE, source)
    return source


def radiograph_from_volume(volume_node) -> Radiograph:
    """The radiograph a volume shows, as the pipeline reads it: bone bright, spacing (row_mm, col_mm).

    When the volume's source file (`AACScore.SourcePath`, the DICOM database file of a volume loaded through
    Slicer's DICOM module, or its storage file) still reads to the same size, that reading is used, so the
    module scores exactly what `aacscore score` scores (MONOCHROME1 inverted, magnification-corrected spacing,
    PatientOrientation). Otherwise the volume's own voxels and spacing are used; a spacing of 1 x 1 mm with no
    `AACScore.SpacingKnown` attribute is taken as unknown (what Slicer gives a PNG).
    """
    return capture_volume(volume_node).load()


def capture_volume(volume_node, copy_voxels: bool = True) -> VolumeImage:
    """What `VolumeImage.load` needs, taken from the scene (main thread); raises for a 3D volume."""
    name = volume_node.GetName()
    array = slicer.util.arrayFromVolume(volume_node)
    if array.ndim == 4:  # a colour image (vector volume): use its luminance-like mean
        array = array.mean(axis=-1)
    if array.ndim != 3 or array.shape[0] != 1:
        raise RadiographError(name, f"is a volume of shape {tuple(array.shape)}, not a single 2D radiograph")
    key = radiograph_key(volume_node)
    source = _source_file(volume_node)
    voxels = _voxels(volume_node, array[0], key) if copy_voxels or source is None else None
    return VolumeImage(key, name, tuple(array.shape[1:]), source, voxels)


def _voxels(volume_node, pixels: np.ndarray, key: str) -> Radiograph:
    col_mm, row_mm, _ = volume_node.GetSpacing()
    known = volume_node.GetAttribute(aac_scene.SPACING_KNOWN_ATTRIBUTE)
    spacing_known = known == "true" if known else not (math.isclose(row_mm, 1.0) and math.isclose(col_mm, 1.0))
    orientation = volume_node.GetAttribute(aac_scene.PATIENT_ORIENTATION_ATTRIBUTE)
    return Radiograph(
        pixels=np.array(pixels, dtype=np.float32),  # a copy: the compute thread must not share the scene's memory
        spacing=(float(row_mm), float(col_mm)) if spacing_known else None,
        spacing_source=(volume_node.GetAttribute(aac_scene.SPACING_SOURCE_ATTRIBUTE) or "volume spacing")
        if spacing_known else "unknown",
        path=key,
        format="volume",
        patient_orientation=tuple(orientation.split("\\")[:2]) if orientation else None,
    )


def _source_file(volume_node) -> str | None:
    candidates = [volume_node.GetAttribute(aac_scene.SOURCE_PATH_ATTRIBUTE)]
    instances = volume_node.GetAttribute("DICOM.instanceUIDs")
    database = getattr(slicer, "dicomDatabase", None)
    if instances and database is not None:
        candidates.append(database.fileForInstance(instances.split()[0]))
    storage = volume_node.GetStorageNode()
    if storage is not None:
        candidates.append(storage.GetFileName())
    return next((str(path) for path in candidates if path and Path(path).is_file()), None)


# ----------------------------------------------------------------------------------------------- outcomes


@dataclass
class Request:
    """What compute needs, copied out of the scene on the main thread."""

    volume_id: str | None  # None: a file scored without a volume (Score folder), only its table row is written
    image: VolumeImage
    labels: np.ndarray | None = None  # the vertebrae as they are now; None: the segmenter makes them
    segmentation_id: str | None = None
    edited: bool = False  # the existing segmentation holds a person's edits


@dataclass
class SegmentedLabels:
    """The segmenter's answer for a request: what `apply_segment` needs (a SegmentationResult has these too)."""

    labels: np.ndarray
    status: str
    message: str
    context: np.ndarray | None = None  # T12/S1 (6/7) of a segmenter with context classes


@dataclass
class SegmentOutcome:
    """status: "created" | "updated" | "edited" (left as it was: ask, then run again with overwrite=True)."""

    status: str
    message: str
    segmentation: object | None


@dataclass
class ScoreOutcome:
    result: AACResult
    row: int
    segmentation: object | None = None
    heatmap: object | None = None
    boundary_lines: list = field(default_factory=list)


@dataclass
class BatchOutcome:
    outcomes: list[ScoreOutcome]
    total: int
    cancelled: bool

    @property
    def message(self) -> str:
        errors = sum(outcome.result.status == "error" for outcome in self.outcomes)
        done = f"{len(self.outcomes)} of {self.total} radiographs scored" + (f", {errors} with errors" if errors else "")
        return f"Cancelled: {done}" if self.cancelled else done.capitalize()


@dataclass
class Agreement:
    """Agreement of two sources (model or rater names) over the radiographs both scored."""

    first: str
    second: str
    n: int
    statistics: dict[str, float] | None  # metrics.agreement's output; None when fewer than 2 shared cases
    message: str = ""

    def text(self) -> str:
        if self.statistics is None:
            return f"{self.first} vs {self.second}: {self.message}"
        s = self.statistics
        return (f"{self.first} vs {self.second} (n={self.n}): ICC(2,1) {_number(s['icc_2_1'])} "
                f"[{_number(s['icc_ci_low'])}, {_number(s['icc_ci_high'])}], "
                f"weighted kappa linear {_number(s['kappa_linear'])}, quadratic {_number(s['kappa_quadratic'])}")


def _number(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


# ----------------------------------------------------------------------------------------------- the workflow


class Workflow:
    """The module's logic on one scene.

    With `pipeline` (an object with the Pipeline's `run` and `segmenter`), compute runs in this process, for
    tests and scripts; without, in the worker process of `worker` (a WorkerClient, made on first use), which
    keeps the models loaded between jobs.
    """

    def __init__(self, scene, pipeline=None, *, worker: WorkerClient | None = None,
                 scorer_model: str | None = None, segmenter_model: str | None = None, device: str = "auto",
                 models_dir=None):
        self.scene = scene
        self._pipeline = pipeline
        self._in_process = pipeline is not None
        self._worker = worker
        self._settings = (scorer_model or None, segmenter_model or None, device, models_dir)
        self._lock = threading.Lock()

    # -- models

    def configure(self, scorer_model: str | None, segmenter_model: str | None, device: str = "auto",
                  models_dir=None) -> None:
        """Choose models and device; the pipeline is reloaded on next use when they changed."""
        if device not in DEVICES:
            raise AACScoreError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
        settings = (scorer_model or None, segmenter_model or None, device, models_dir)
        with self._lock:
            if settings != self._settings:
                self._settings, self._pipeline = settings, None  # in process: reloaded on next use

    def pipeline(self):
        """The loaded in-process pipeline (thread-safe; the first call loads the model packages)."""
        with self._lock:
            if self._pipeline is None:
                from ..devices import device_choice
                from ..pipeline import Pipeline

                scorer_model, segmenter_model, device, models_dir = self._settings
                device, _ = device_choice(device)
                self._pipeline = Pipeline.from_packages(scorer_model, segmenter_model, device, models_dir)
            return self._pipeline

    @property
    def worker(self) -> WorkerClient:
        if self._worker is None:
            self._worker = WorkerClient()
        return self._worker

    def _models(self) -> dict:
        scorer_model, segmenter_model, device, models_dir = self._settings
        return {"scorer": scorer_model, "segmenter": segmenter_model, "device": device,
                "models_dir": None if models_dir is None else str(models_dir)}

    # -- jobs: the worker process, or a thread for an in-process pipeline; both polled alike

    def start_segment(self, request: Request) -> "Job | WorkerJob":
        """A job whose result is the request's SegmentedLabels, for `apply_segment`."""
        if self._in_process:
            return Job(lambda job: self.compute_segment(request, job.report, job.is_cancelled)).start()

        def prepare(folder: Path) -> dict:
            return {"image": request.image.to_message(folder, "image"), "models": self._models()}

        def read(answer: dict) -> SegmentedLabels:
            context = aac_scene.read_image_array(self.scene, answer["context"]) if answer.get("context") else None
            return SegmentedLabels(aac_scene.read_image_array(self.scene, answer["labels"]), answer["status"],
                                   answer["message"], context)

        return self.worker.submit("segment", prepare=prepare, read_result=read)

    def start_score(self, request: Request, heatmap: bool = True) -> "Job | WorkerJob":
        """A job whose result is (AACResult, results-table record), for `apply_score(request, *result)`."""
        if self._in_process:
            return Job(lambda job: (self.compute_score(request, job.report, job.is_cancelled, heatmap), None)).start()

        def prepare(folder: Path) -> dict:
            labels = None
            if request.labels is not None:
                labels = str(folder / "labels.npy")
                np.save(labels, np.asarray(request.labels, np.uint8))
            return {"image": request.image.to_message(folder, "image"), "labels": labels, "heatmap": heatmap,
                    "models": self._models()}

        return self.worker.submit("score", prepare=prepare, read_result=self._read_result)

    def start_batch(self, requests: Sequence[Request], heatmap: bool = True) -> "Job | WorkerJob":
        """A job that delivers (request, AACResult, record) for each radiograph as it is scored; a cancel keeps
        what was delivered. Requests without a volume (files) get only their table row."""
        if self._in_process:
            return Job(self.batch_work(requests, heatmap)).start()

        def prepare(folder: Path) -> dict:
            return {"images": [request.image.to_message(folder, f"image{index:05d}")
                               for index, request in enumerate(requests)],
                    "heatmap": heatmap, "models": self._models()}

        def read(item: dict):
            return (requests[item["index"]], *self._read_result(item["result"]))

        return self.worker.submit("batch", prepare=prepare, read_item=read)

    def start_install_model(self, path: str | Path) -> WorkerJob:
        """Install a model package in the worker (the nnU-Net converter needs torch); the result is a dict
        with kind, name, version and path."""
        return self.worker.submit("install_model", {"path": str(path), "models_dir": self._models()["models_dir"]})

    def start_finetune(self, kind: str, data: str | Path, out: str | Path, base: str | None = None,
                       settings: dict | None = None, calibrate_qc: bool = False) -> WorkerJob:
        """Fine-tune the segmenter or scorer on a training set in the worker (finetune.py); the result is a dict
        with kind and the new package's path, which `configure` can then use. `calibrate_qc` (scorer): also fit
        the new scorer's interval by QC_FOLDS-fold cross-validation, so that its results keep one."""
        settings = dict(settings or {})
        if calibrate_qc and kind == "scorer":
            settings["qc_folds"] = QC_FOLDS
        return self.worker.submit("finetune", {"kind": kind, "data": str(data), "out": str(out), "base": base,
                                               "settings": settings})

    def start_probe(self) -> WorkerJob:
        """Which device the worker would use, and why; a torch that cannot load is reported, not raised."""
        return self.worker.submit("probe", {"device": self._settings[2]})

    def _read_result(self, answer: dict):
        result, record = result_from_message(answer, lambda path: aac_scene.read_image_array(self.scene, path))
        return result, record

    # -- loading

    def load_radiographs(self, paths: Sequence[str | Path], progress: Progress = _no_progress,
                         cancel: Cancel = _never) -> tuple[list, list[str]]:
        """Add the radiographs in these files and folders as volumes; returns (volumes, problems).

        The widget runs the same `read_work` on a worker thread and adds what it delivers as it comes.
        """
        job = Job(read_work(radiograph_files(paths))).run_here(progress, cancel)
        volumes, problems = [], []
        for loaded in job.take():
            if isinstance(loaded, RadiographError):
                problems.append(str(loaded))
            else:
                volumes.append(self.add_radiograph(loaded))
        return volumes, problems

    def add_radiograph(self, radiograph: Radiograph):
        """A radiograph (read off the main thread with `read_or_error`) as a volume of the scene."""
        return aac_scene.add_radiograph_volume(self.scene, radiograph)

    # -- segmentation

    def prepare_segment(self, volume_node) -> Request:
        existing = aac_scene.find_vertebra_segmentation(self.scene, volume_node)
        return Request(volume_node.GetID(), capture_volume(volume_node),
                       segmentation_id=existing.GetID() if existing is not None else None,
                       edited=existing is not None and aac_scene.segmentation_was_edited(existing))

    def compute_segment(self, request: Request, progress: Progress = _no_progress, cancel: Cancel = _never):
        """The segmenter's SegmentationResult (labels, status, message); no scene access."""
        segmenter = self.pipeline().segmenter
        if segmenter is None:
            raise AACScoreError("no segmenter model is loaded; install one under Settings")
        result = segmenter.segment(request.image.load(), progress=progress, cancel=cancel)
        if cancel():
            raise Cancelled("segmentation cancelled")
        return result

    def apply_segment(self, request: Request, segmentation_result, overwrite: bool = False) -> SegmentOutcome:
        """Write the vertebrae into "<image> vertebrae"; a person's edits are kept unless `overwrite`."""
        volume = self._volume(request)
        labels = np.asarray(segmentation_result.labels)
        message = segmentation_result.message or ""
        if not labels.any():
            raise AACScoreError(f"'{volume.GetName()}': no vertebrae found" + (f" ({message})" if message else ""))
        context = getattr(segmentation_result, "context", None)
        existing = aac_scene.find_vertebra_segmentation(self.scene, volume)
        if existing is None:
            node = aac_scene.add_vertebra_segmentation(self.scene, volume, labels, context=context)
            return SegmentOutcome("created", message, node)
        if not overwrite and aac_scene.segmentation_was_edited(existing):
            return SegmentOutcome("edited", _edited_message(existing), existing)
        aac_scene.update_vertebra_segmentation(existing, volume, labels, overwrite_edits=True, context=context)
        return SegmentOutcome("updated", message, existing)

    def segment(self, volume_node, overwrite: bool = False, progress: Progress = _no_progress,
                cancel: Cancel = _never) -> SegmentOutcome:
        """Segment L1..L5; an edited segmentation is left alone (status "edited") unless `overwrite`."""
        request = self.prepare_segment(volume_node)
        if request.edited and not overwrite:
            existing = self.scene.GetNodeByID(request.segmentation_id)
            return SegmentOutcome("edited", _edited_message(existing), existing)
        if self._in_process:
            return self.apply_segment(request, self.compute_segment(request, progress, cancel), overwrite)
        return self.apply_segment(request, _wait(self.start_segment(request), progress, cancel), overwrite)

    # -- scoring

    def prepare_score(self, volume_node, segmentation_node=None, copy_voxels: bool = True) -> Request:
        """Capture the radiograph and copy its vertebrae as they are now (segments read by name L1..L5).

        Without a segmentation (given, or the one AACScore made for this volume) the segmenter runs first.
        """
        segmentation = segmentation_node or aac_scene.find_vertebra_segmentation(self.scene, volume_node)
        owner_id = segmentation.GetNodeReferenceID(aac_scene.RADIOGRAPH_ROLE) if segmentation is not None else None
        if owner_id and owner_id != volume_node.GetID():  # made for another radiograph: its vertebrae are not these
            owner = self.scene.GetNodeByID(owner_id)
            raise AACScoreError(f"segmentation '{segmentation.GetName()}' belongs to radiograph "
                                f"'{owner.GetName() if owner is not None else owner_id}', not to "
                                f"'{volume_node.GetName()}'; choose the segmentation of this radiograph")
        labels = None if segmentation is None else aac_scene.read_vertebra_labels(segmentation, volume_node)
        return Request(volume_node.GetID(), capture_volume(volume_node, copy_voxels), labels,
                       segmentation.GetID() if segmentation is not None else None)

    def compute_score(self, request: Request, progress: Progress = _no_progress, cancel: Cancel = _never,
                      heatmap: bool = True) -> AACResult:
        """The pipeline's AACResult for the request; no scene access."""
        result = self.pipeline().run(request.image.load(), request.labels, heatmap=heatmap, progress=progress,
                                     cancel=cancel)
        if cancel():
            raise Cancelled("scoring cancelled")
        return result

    def apply_score(self, request: Request, result: AACResult, record: Mapping | None = None) -> ScoreOutcome:
        """Results table row (updated, never duplicated), heatmap volume, boundary lines and, when the
        pipeline segmented, the vertebra segmentation. `record` is the row the worker made (with every column
        its pipeline fills, QC included); by default the result's own. A file without a volume gets its row only.
        """
        record = {column: value for column, value in (result.record() if record is None else record).items()
                  if column in aac_scene.TABLE_COLUMNS}
        record["source"] = aac_scene.MODEL_SOURCE
        if request.volume_id is None:
            record["file"] = request.image.key
            return ScoreOutcome(result, aac_scene.upsert_result_row(self.results_table(), record))
        volume = self._volume(request)
        record["file"] = radiograph_key(volume)
        outcome = ScoreOutcome(result, aac_scene.upsert_result_row(self.results_table(), record))
        if request.segmentation_id is not None:
            outcome.segmentation = self.scene.GetNodeByID(request.segmentation_id)
        elif result.labels is not None and result.labels.any():
            outcome.segmentation = aac_scene.find_vertebra_segmentation(self.scene, volume)
            if outcome.segmentation is None:
                outcome.segmentation = aac_scene.add_vertebra_segmentation(self.scene, volume, result.labels,
                                                                           context=result.context)
        if result.heatmap is not None:
            outcome.heatmap = aac_scene.add_heatmap_volume(self.scene, volume, result.heatmap)
        if result.geometry is not None:
            outcome.boundary_lines = aac_scene.add_segment_boundary_lines(self.scene, result.geometry, volume)
        return outcome

    def score(self, volume_node, segmentation_node=None, progress: Progress = _no_progress,
              cancel: Cancel = _never, heatmap: bool = True) -> ScoreOutcome:
        request = self.prepare_score(volume_node, segmentation_node)
        if self._in_process:
            return self.apply_score(request, self.compute_score(request, progress, cancel, heatmap))
        return self.apply_score(request, *_wait(self.start_score(request, heatmap), progress, cancel))

    def score_volumes(self, volume_nodes: Sequence, progress: Progress = _no_progress, cancel: Cancel = _never,
                      heatmap: bool = True) -> BatchOutcome:
        """Score several volumes one after another; cancelling keeps what is done and stops.

        In process `batch_work` runs here; otherwise the worker's batch job (`start_batch`, which the widget
        polls and applies as results come).
        """
        requests, problems = self.prepare_batch(volume_nodes)
        outcomes = [self.record_problem(volume, message) for volume, message in problems]
        if self._in_process:
            job = Job(self.batch_work(requests, heatmap)).run_here(progress, cancel)
            outcomes += [self.apply_score(*item) for item in job.take()]
        else:
            job = self.start_batch(requests, heatmap)
            poller = JobPoller(job, lambda item: outcomes.append(self.apply_score(*item)))
            try:
                _wait(job, progress, cancel, poller)
            except Cancelled:  # what was delivered is kept
                pass
        return BatchOutcome(outcomes, len(requests) + len(problems), job.cancelled)

    def batch_work(self, requests: Sequence[Request], heatmap: bool = True) -> Callable[["Job"], None]:
        """Compute work for a Job: delivers (request, AACResult) pairs for `apply_score` as each finishes."""

        def work(job: Job) -> None:
            total = len(requests)
            for index, request in enumerate(requests):
                if job.is_cancelled():
                    return
                name = request.image.name

                def step(fraction: float, text: str, index=index, name=name) -> None:
                    job.report((index + fraction) / total, f"{index + 1}/{total} {name}: {text}")

                try:
                    result = self.compute_score(request, step, job.is_cancelled, heatmap)
                except Cancelled:
                    return
                except RadiographError as error:  # the file changed since it was loaded: an error row, go on
                    result = AACResult(file=request.image.key, status="error", message=str(error))
                job.deliver((request, result))
            job.report(1.0, f"{total} radiographs scored")

        return work

    def prepare_batch(self, volume_nodes: Iterable) -> tuple[list[Request], list[tuple[object, str]]]:
        """Requests for the volumes that can be scored, and (volume, problem) for each that cannot."""
        requests, problems = [], []
        for volume in volume_nodes:
            try:
                requests.append(self.prepare_score(volume, copy_voxels=False))
            except AACScoreError as error:
                problems.append((volume, str(error)))
        return requests, problems

    def prepare_files(self, paths: Sequence[str | Path]) -> list[Request]:
        """Requests that score radiograph files without loading them as volumes (Score folder: a cohort's
        images and heatmaps would otherwise all stay in memory); each gets its table row only."""
        return [Request(None, VolumeImage(str(path), Path(path).name, None, str(path), None))
                for path in radiograph_files(paths)]

    def volume_for_file(self, file: str):
        """The scene's radiograph volume whose results-table key is `file`, or None."""
        return next((volume for volume in radiograph_volumes(self.scene) if radiograph_key(volume) == file), None)

    def next_to_review(self, current_file: str | None = None) -> dict[str, object] | None:
        """The model's next flagged result after `current_file` in table order (wrapping round), or None.

        Flagged: QC verdict `review` or `error`; a row without a QC verdict counts when its status is
        `warning`, `review` or `error`."""
        return next_flagged(aac_scene.result_rows(self.results_table(), aac_scene.MODEL_SOURCE), current_file)

    def record_problem(self, volume_node, message: str) -> ScoreOutcome:
        """An error row for a radiograph that could not be scored, so a batch's table lists every input."""
        result = AACResult(file=radiograph_key(volume_node), status="error", message=message)
        record = {"file": result.file, "source": aac_scene.MODEL_SOURCE, "status": "error", "message": message}
        return ScoreOutcome(result, aac_scene.upsert_result_row(self.results_table(), record))

    # -- results table and raters

    def results_table(self):
        return aac_scene.results_table(self.scene)

    def export_csv(self, path: str | Path) -> Path:
        return aac_scene.table_to_csv(self.results_table(), path)

    def save_rating(self, volume_or_file, rater: str, subscores: Mapping[str, int]) -> int:
        """Store a person's eight wall subscores (0..3) as a row of source `rater`, beside the model's row."""
        rater = (rater or "").strip()
        if not rater:
            raise AACScoreError("enter the rater's name before saving a rating")
        if rater == aac_scene.MODEL_SOURCE:
            raise AACScoreError(f"'{aac_scene.MODEL_SOURCE}' is reserved for AACScore's own scores; "
                                "use the rater's name")
        missing = [column for column in SUBSCORE_COLUMNS if column not in subscores]
        if missing:
            raise AACScoreError(f"rating by {rater} lacks {', '.join(missing)}")
        values = {column: int(subscores[column]) for column in SUBSCORE_COLUMNS}
        try:
            total = total_score(values)
        except ValueError as error:
            raise AACScoreError(f"rating by {rater}: {error}") from None
        file = volume_or_file if isinstance(volume_or_file, str) else radiograph_key(volume_or_file)
        record = {"file": file, "source": rater, "aac24": total, "category": category(total), "status": "ok",
                  "message": "", **values}
        return aac_scene.upsert_result_row(self.results_table(), record)

    def rating(self, volume_or_file, rater: str) -> dict[str, object] | None:
        """The stored row of this rater for this radiograph, or None."""
        file = volume_or_file if isinstance(volume_or_file, str) else radiograph_key(volume_or_file)
        rows = aac_scene.result_rows(self.results_table(), rater)
        return next((row for row in rows if row["file"] == file), None)

    def sources(self) -> list[str]:
        """The model first, then raters in the order they first appear in the table."""
        found = [row["source"] for row in aac_scene.result_rows(self.results_table())]
        ordered = sorted(set(found), key=found.index)
        return sorted(ordered, key=lambda source: source != aac_scene.MODEL_SOURCE)

    def agreement(self) -> list[Agreement]:
        """Model vs each rater and rater vs rater: ICC(2,1) and weighted kappas over the shared radiographs."""
        totals: dict[str, dict[str, float]] = {}
        for row in aac_scene.result_rows(self.results_table()):
            if row["aac24"] is not None and row["status"] != "error":
                totals.setdefault(row["source"], {})[row["file"]] = row["aac24"]
        results = []
        for first, second in combinations(self.sources(), 2):
            shared = sorted(set(totals.get(first, {})) & set(totals.get(second, {})))
            if len(shared) < 2:
                results.append(Agreement(first, second, len(shared), None,
                                         f"needs at least 2 radiographs scored by both (have {len(shared)})"))
                continue
            statistics = metrics.agreement([totals[first][f] for f in shared], [totals[second][f] for f in shared])
            results.append(Agreement(first, second, len(shared), statistics))
        return results

    def add_to_training_set(self, volume_node, folder: str | Path, rater: str | None = None,
                            segmentation_node=None):
        """Store this radiograph with its (corrected) vertebra segments, the T12/S1 segments when there are any,
        and the rater's subscores when that rater has scored it, in a training set folder (io/training_set.py: nnU-Net raw layout, no DICOM header kept).
        Returns the stored case and the set's counts."""
        from ..io.training_set import TrainingSet

        segmentation_node = segmentation_node or aac_scene.find_vertebra_segmentation(self.scene, volume_node)
        if segmentation_node is None:
            raise AACScoreError(f"'{volume_node.GetName()}' has no vertebra segmentation to store; segment it first")
        labels = aac_scene.read_vertebra_labels(segmentation_node, volume_node)
        context = aac_scene.read_context_labels(segmentation_node, volume_node)
        if context is not None:  # T12/S1 where no vertebra is: a fine-tuned segmenter keeps its context classes
            labels = np.where(labels == 0, context, labels)
        rated = self.rating(volume_node, rater) if rater and rater.strip() else None
        if rater and rater.strip() and rated is None:
            raise AACScoreError(f"{rater.strip()} has not rated '{volume_node.GetName()}'; save the rating first, "
                                "or add the case without a rater")
        scores = {column: int(rated[column]) for column in SUBSCORE_COLUMNS} if rated else None
        dataset = TrainingSet(folder)
        case = dataset.add(radiograph_from_volume(volume_node), labels, scores)
        return case, dataset.counts()

    # -- helpers

    def _volume(self, request: Request):
        """The request's volume, if it is still the same radiograph: after the scene was closed, another
        volume may carry the same node ID."""
        volume = self.scene.GetNodeByID(request.volume_id)
        if volume is None or radiograph_key(volume) != request.image.key:
            raise AACScoreError(f"the radiograph '{request.image.name}' was removed from the scene meanwhile")
        return volume


REVIEW_VERDICTS: tuple[str, ...] = ("review", "error")
QC_FOLDS = 5  # folds of the cross-validation that calibrates a fine-tuned scorer's interval (6x the time)


def is_flagged(row: Mapping[str, object]) -> bool:
    """A result a person should look at: QC says review or error (or, without QC, the status warns)."""
    verdict = str(row.get("qc") or "")
    if verdict:
        return verdict in REVIEW_VERDICTS
    return row.get("status") in ("warning", "review", "error")


def next_flagged(rows: Sequence[Mapping[str, object]], current_file: str | None) -> Mapping[str, object] | None:
    """The first flagged row after the one of `current_file` (from the start when it is not there), wrapping."""
    files = [row["file"] for row in rows]
    start = files.index(current_file) + 1 if current_file in files else 0
    for row in list(rows[start:]) + list(rows[:start]):
        if is_flagged(row):
            return row
    return None


def qc_text(row: Mapping[str, object] | None) -> tuple[str, str]:
    """(verdict with the interval, reasons) for the panel, e.g. ("review  [6.1–11.8]", "levels disagree")."""
    if not row:
        return "", ""
    verdict = str(row.get("qc") or "")
    low, high = row.get("aac24_low"), row.get("aac24_high")
    interval = f"[{low:.1f}–{high:.1f}]" if low is not None and high is not None else ""
    return "  ".join(part for part in (verdict, interval) if part), str(row.get("qc_reasons") or "")


class JobPoller:
    """Drives a job from a timer on the main thread.

    Every delivered item is applied even when one fails: failures are collected in `problems` for one message
    at the end instead of raised (a raise would drop the items polled with it). A call made while items are
    being applied returns at once: a dialog opened meanwhile runs the event loop, and with it the timer.
    """

    def __init__(self, job, apply_item: Callable[[object], object] | None = None):
        self.job = job
        self.apply_item = apply_item
        self.problems: list[str] = []
        self.fraction, self.text, self.done = 0.0, "", False
        self._busy = False

    def poll(self) -> bool:
        """Take what the job delivered and apply it; True once the job has ended and everything is applied."""
        if self._busy or self.done:
            return self.done
        self._busy = True
        try:
            self.fraction, self.text, items, done = self.job.poll()
            for item in items:
                try:
                    if self.apply_item is not None:
                        self.apply_item(item)
                except Exception as error:  # noqa: BLE001 - reported with the others when the job ends
                    self.problems.append(str(error) if isinstance(error, AACScoreError)
                                         else f"{type(error).__name__}: {error}")
            self.done = done
        finally:
            self._busy = False
        return self.done


def _wait(job, progress: Progress = _no_progress, cancel: Cancel = _never, poller: JobPoller | None = None):
    """Poll a job until it ends (scripts), forwarding progress and cancelling when `cancel()` says so; its
    result, or its error raised."""
    poller = poller or JobPoller(job)
    while not poller.poll():
        progress(poller.fraction, poller.text)
        if cancel():
            job.cancel()
        time.sleep(0.02)
    if job.error is not None:
        raise job.error
    if poller.problems:
        raise AACScoreError("; ".join(poller.problems))
    if job.cancelled:
        raise Cancelled(f"{getattr(job, 'kind', 'job')} cancelled")
    return job.result


def _edited_message(segmentation_node) -> str:
    return (f"'{segmentation_node.GetName()}' holds edits; segmenting again would replace them. "
            "Confirm to overwrite, or score the edited segments as they are.")


def radiograph_files(paths: Sequence[str | Path]) -> list[Path]:
    """The radiograph files in these files and folders (folders searched recursively), in a stable order."""
    from ..io.cohort import collect

    return [item.image for item in collect([str(path) for path in paths])]


def read_work(files: Sequence[str | Path]) -> Callable[["Job"], None]:
    """Work for a Job that reads each file and delivers its Radiograph, or its RadiographError."""

    def work(job: Job) -> None:
        for index, path in enumerate(files):
            if job.is_cancelled():
                return
            job.report(index / len(files), f"reading {Path(path).name}")
            job.deliver(read_or_error(path))
        job.report(1.0, f"{len(files)} files read")

    return work


# ----------------------------------------------------------------------------------------------- jobs


class Job:
    """Work on a Python thread that the main thread polls: progress, delivered items, end, error. Used for what
    is light enough for Slicer's own process (reading files, pip subprocesses) and for in-process pipelines.

    `work(job)` calls `job.report(fraction, text)`, checks `job.is_cancelled()`, and hands finished items to the
    main thread with `job.deliver(item)`; the main thread calls `poll()` (e.g. from a qt.QTimer) and applies
    the items to the scene there. Nothing here touches Qt or the scene.
    """

    def __init__(self, work: Callable[["Job"], object]):
        self._work = work
        self._items: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self._finished = threading.Event()
        self._lock = threading.Lock()
        self._progress: tuple[float, str] = (0.0, "starting")
        self._thread: threading.Thread | None = None
        self._listener: Progress = _no_progress
        self._external_cancel: Cancel = _never
        self.result: object = None
        self.error: BaseException | None = None

    def start(self) -> "Job":
        self._thread = threading.Thread(target=self._run, name="AACScore job", daemon=True)
        self._thread.start()
        return self

    def run_here(self, progress: Progress = _no_progress, cancel: Cancel = _never) -> "Job":
        """Run on the calling thread (scripts, tests), forwarding progress and asking `cancel` as it goes."""
        self._listener, self._external_cancel = progress, cancel
        self._run()
        if self.error is not None:
            raise self.error
        return self

    def _run(self) -> None:
        try:
            self.result = self._work(self)
        except Cancelled:
            self._cancel.set()
        except BaseException as error:  # noqa: BLE001 - handed to the main thread, which shows it
            if not self._cancel.is_set():  # after a cancel, whatever the interrupted work raised is no news
                self.error = error
        finally:
            self._finished.set()

    def report(self, fraction: float, text: str) -> None:
        with self._lock:
            self._progress = (min(max(float(fraction), 0.0), 1.0), text)
        self._listener(fraction, text)

    def deliver(self, item: object) -> None:
        self._items.put(item)

    def cancel(self) -> None:
        self._cancel.set()

    def is_cancelled(self) -> bool:
        if self._external_cancel():
            self._cancel.set()
        return self._cancel.is_set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    def take(self) -> list:
        """The items delivered since the last call."""
        items = []
        while True:
            try:
                items.append(self._items.get_nowait())
            except queue.Empty:
                return items

    def poll(self) -> tuple[float, str, list, bool]:
        """(fraction, text, newly delivered items, done); after done, `error` or `result` says how it ended."""
        done = self.done  # read first: items delivered before the end are then all in this take()
        with self._lock:
            fraction, text = self._progress
        return fraction, text, self.take(), done

    def wait(self, timeout: float | None = None) -> bool:
        return self._finished.wait(timeout)

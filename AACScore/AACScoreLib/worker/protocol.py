"""What the worker and its client share: the messages, the image a job reads, and a result's files.

Every message is one line of JSON. Client to worker: `{"job": id, "kind": ..., "folder": ..., "params": {...}}`,
`{"cancel": id}` and `{"quit": true}`. Worker to client: `{"event": "ready", ...}` once, then per job
`{"job": id, "event": "progress" | "item" | "done" | "cancelled" | "error", ...}`. Arrays travel as files in the
job's folder: inputs as .npy (exact, no metadata to lose), outputs as NRRD that Slicer reads itself.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import RadiographError
from ..io.radiograph import Radiograph, read_radiograph
from ..kauppila import SUBSCORE_COLUMNS
from ..pipeline import AACResult

PROTOCOL_VERSION = 1
JOB_KINDS: tuple[str, ...] = ("probe", "segment", "score", "batch", "install_model", "finetune")
END_EVENTS: tuple[str, ...] = ("done", "cancelled", "error")


def encode(message: dict) -> str:
    """One protocol line (no newline inside: JSON escapes them)."""
    return json.dumps(message, allow_nan=False, default=_plain) + "\n"


def decode(line: str) -> dict | None:
    """The message on a line, or None for anything else a library printed."""
    try:
        message = json.loads(line)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} cannot be sent to the worker")


# ----------------------------------------------------------------------------------------------- the input image


@dataclass
class VolumeImage:
    """A radiograph as a job reads it: its source file when that still reads to the same size, else the pixels
    captured from the volume (with their spacing), so the worker scores exactly what `aacscore score` would.

    Capturing is cheap: the source file is only named, and the voxels are copied only when asked (one image)
    or when there is no source file, so preparing a batch neither freezes Slicer nor doubles its memory.
    """

    key: str
    name: str
    shape: tuple[int, int] | None  # None: a file scored as it is, without a volume
    source: str | None
    voxels: Radiograph | None

    def load(self) -> Radiograph:
        problem = "no source file"
        if self.source:
            try:
                radiograph = read_radiograph(self.source)
            except RadiographError as error:
                radiograph, problem = None, str(error)
            if radiograph is not None:
                if self.shape is None or radiograph.pixels.shape == self.shape:
                    radiograph.path = self.key
                    return radiograph
                problem = (f"{self.source} is {radiograph.pixels.shape[1]}x{radiograph.pixels.shape[0]} pixels, "
                           f"the volume {self.shape[1]}x{self.shape[0]}")
        if self.voxels is None:
            raise RadiographError(self.key, f"'{self.name}' cannot be read again from its file ({problem}); "
                                  "score it on its own")
        return self.voxels

    def to_message(self, folder: Path, stem: str) -> dict:
        """The image for a job in `folder`: the voxels, when captured, go to `<stem>.npy`."""
        message = {"key": self.key, "name": self.name, "shape": None if self.shape is None else list(self.shape),
                   "source": self.source,
                   "voxels": None}
        if self.voxels is not None:
            path = Path(folder) / f"{stem}.npy"
            np.save(path, np.asarray(self.voxels.pixels, dtype=np.float32))
            voxels = self.voxels
            message["voxels"] = {
                "pixels": str(path), "spacing": None if voxels.spacing is None else list(voxels.spacing),
                "spacing_source": voxels.spacing_source, "format": voxels.format,
                "patient_orientation": None if voxels.patient_orientation is None
                else list(voxels.patient_orientation)}
        return message

    @classmethod
    def from_message(cls, message: dict) -> "VolumeImage":
        voxels = message.get("voxels")
        radiograph = None
        if voxels is not None:
            radiograph = Radiograph(
                pixels=np.load(voxels["pixels"]), path=message["key"], format=voxels["format"],
                spacing=None if voxels["spacing"] is None else tuple(voxels["spacing"]),
                spacing_source=voxels["spacing_source"],
                patient_orientation=None if voxels["patient_orientation"] is None
                else tuple(voxels["patient_orientation"]))
        shape = message.get("shape")
        return cls(message["key"], message["name"], None if shape is None else tuple(shape), message.get("source"),
                   radiograph)


# ----------------------------------------------------------------------------------------------- results


@dataclass
class _Body:
    ap_length_px: float


@dataclass
class BoundaryGeometry:
    """The part of a SpineGeometry that the scene draws (the five disc mid-plane lines), sent as JSON."""

    boundaries: np.ndarray
    boundary_directions: np.ndarray
    vertebrae: list[_Body]
    anterior_source: str

    @classmethod
    def of(cls, geometry) -> "BoundaryGeometry":
        return cls(np.asarray(geometry.boundaries, float), np.asarray(geometry.boundary_directions, float),
                   [_Body(float(v.ap_length_px)) for v in geometry.vertebrae], geometry.anterior_source)

    def to_message(self) -> dict:
        return {"boundaries": self.boundaries.tolist(), "directions": self.boundary_directions.tolist(),
                "ap_lengths_px": [body.ap_length_px for body in self.vertebrae],
                "anterior_source": self.anterior_source}

    @classmethod
    def from_message(cls, message: dict) -> "BoundaryGeometry":
        return cls(np.asarray(message["boundaries"], float), np.asarray(message["directions"], float),
                   [_Body(length) for length in message["ap_lengths_px"]], message["anterior_source"])


def result_message(result, folder: Path, stem: str, write_array: Callable[[Path, np.ndarray], None]) -> dict:
    """A pipeline AACResult as JSON, its label map and heatmap written to `<stem>_labels.nrrd` and
    `<stem>_heatmap.nrrd` in `folder` by `write_array`."""
    record = {key: _finite(value) for key, value in result.record().items()}
    message = {"record": record, "labels_source": result.labels_source,
               "heatmap_all_zero": bool(result.heatmap_all_zero), "labels": None, "heatmap": None,
               "geometry": None if result.geometry is None else BoundaryGeometry.of(result.geometry).to_message()}
    if result.labels is not None:
        message["labels"] = str(Path(folder) / f"{stem}_labels.nrrd")
        write_array(Path(message["labels"]), np.asarray(result.labels, np.uint8))
    if result.context is not None:
        message["context"] = str(Path(folder) / f"{stem}_context.nrrd")
        write_array(Path(message["context"]), np.asarray(result.context, np.uint8))
    if result.heatmap is not None:
        message["heatmap"] = str(Path(folder) / f"{stem}_heatmap.nrrd")
        write_array(Path(message["heatmap"]), np.asarray(result.heatmap, np.float32))
    return message


def result_from_message(message: dict, read_array: Callable[[str], np.ndarray]):
    """(AACResult, its results-table record) from `result_message`'s JSON; arrays read with `read_array`."""
    record = dict(message["record"])
    result = AACResult(file=record["file"], status=record["status"], message=record.get("message") or "",
                       aac24=record.get("aac24"), category=record.get("category"),
                       labels_source=message.get("labels_source") or "",
                       heatmap_all_zero=bool(message.get("heatmap_all_zero")))
    subscores = {key: record[key] for key in SUBSCORE_COLUMNS if record.get(key) is not None}
    result.subscores = subscores or None
    if message.get("labels"):
        result.labels = read_array(message["labels"])
    if message.get("context"):
        result.context = read_array(message["context"])
    if message.get("heatmap"):
        result.heatmap = read_array(message["heatmap"])
    if message.get("geometry"):
        result.geometry = BoundaryGeometry.from_message(message["geometry"])
    return result, record


def _finite(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value

"""Vertebra label maps from files: 0 background, 1..5 = L1..L5, whatever tool wrote them; optionally the context
classes 6 = T12 and 7 = S1 (kauppila.CONTEXT_LABELS), which readers that want only L1..L5 see as background.

Slicer segmentations are matched by segment name, never by label value, because values and segment IDs change
when people edit.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import GeometryError, RadiographError
from ..kauppila import CONTEXT_LABELS, VERTEBRAE

_LEVEL_NAME = re.compile(r"\bL\s*([1-5])\b", re.IGNORECASE)
_CONTEXT_NAME = {name: re.compile(rf"\b{name[0]}\s*{name[1:]}\b", re.IGNORECASE) for name in CONTEXT_LABELS}
MAX_LABEL = max(CONTEXT_LABELS.values())


def vertebra_labels(labels: np.ndarray) -> np.ndarray:
    """L1..L5 only: context classes (T12, S1) become background; a map without them is returned as it is."""
    labels = np.asarray(labels)
    if labels.size == 0 or labels.max() <= len(VERTEBRAE):
        return labels
    return np.where(labels <= len(VERTEBRAE), labels, 0).astype(labels.dtype)


def vertebra_of_segment(name: str) -> str | None:
    """'L3', 'l3', 'L3 vertebra', 'L3 vertebral body' -> 'L3'; other names -> None."""
    found = {f"L{match}" for match in _LEVEL_NAME.findall(name)}
    return found.pop() if len(found) == 1 else None


def context_of_segment(name: str) -> str | None:
    """'T12', 't 12 vertebra' -> 'T12'; 'S1', 'S1 (top of sacrum)' -> 'S1'; names that are not context -> None."""
    found = [context for context, pattern in _CONTEXT_NAME.items() if pattern.search(name)]
    return found[0] if len(found) == 1 and vertebra_of_segment(name) is None else None


def read_seg_nrrd(path: str | Path, image_shape: tuple[int, int], context: bool = False) -> np.ndarray:
    """A Slicer `.seg.nrrd` as a uint8 label map at the image's size, segments matched to L1..L5 by name
    (with `context`, segments named T12 and S1 too, when present)."""
    import slicerio

    path = Path(path)
    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception as error:  # noqa: BLE001 - pynrrd and slicerio raise many types for a bad file
        raise RadiographError(path, f"cannot be read as a segmentation ({error})") from error
    by_level: dict[str, dict] = {}
    for segment in segmentation.get("segments", []):
        name = segment.get("name", "")
        level = vertebra_of_segment(name) or (context_of_segment(name) if context else None)
        if level is None:
            continue
        if level in by_level:
            raise GeometryError(
                f"{path}: segments {by_level[level]['name']!r} and {segment['name']!r} both name {level}"
            )
        by_level[level] = segment
    missing = [level for level in VERTEBRAE if level not in by_level]
    if missing:
        names = ", ".join(repr(s.get("name")) for s in segmentation.get("segments", [])) or "none"
        raise GeometryError(f"{path}: no segment named {', '.join(missing)} (segments: {names})")

    labels = np.zeros(image_shape, np.uint8)
    offset = segmentation.get("referenceImageExtentOffset", [0, 0, 0])
    values = {level: value for value, level in enumerate(VERTEBRAE, start=1)}
    values.update({level: value for level, value in CONTEXT_LABELS.items() if level in by_level})
    for level, value in values.items():
        mask = np.asarray(slicerio.segment_mask(segmentation, by_level[level]))  # (i, j, k) = (col, row, slice)
        if mask.ndim != 3 or mask.shape[2] != 1:
            raise GeometryError(f"{path}: segment {level} is not a single 2D slice (shape {mask.shape})")
        plane = mask[:, :, 0].T  # -> (row, col)
        row0, col0 = int(offset[1]), int(offset[0])
        rows, cols = plane.shape
        if row0 < 0 or col0 < 0 or row0 + rows > image_shape[0] or col0 + cols > image_shape[1]:
            raise GeometryError(
                f"{path}: segment {level} extent (offset {col0},{row0}, size {cols}x{rows}) lies outside the "
                f"image ({image_shape[1]}x{image_shape[0]}); save the segmentation with the radiograph as reference"
            )
        target = labels[row0:row0 + rows, col0:col0 + cols]
        target[plane & ((target == 0) | (value <= len(VERTEBRAE)))] = value  # L1..L5 win over context
    return labels


def read_label_map(path: str | Path, image_shape: tuple[int, int] | None = None, context: bool = False) -> np.ndarray:
    """A label map file as uint8 0..5 (0..7 with `context`: 6 = T12, 7 = S1): PNG/TIFF (grey, or grey saved as
    RGB), NRRD, or a Slicer .seg.nrrd whose segments are matched by name; checked against the image's size when
    it is given. Without `context`, values 6 and 7 read as background, so maps with context serve every reader."""
    path = Path(path)
    if path.name.lower().endswith(".seg.nrrd"):
        if image_shape is None:
            raise GeometryError(f"{path}: a .seg.nrrd is placed by its radiograph; give the radiograph too")
        return read_seg_nrrd(path, image_shape, context)
    try:
        if path.suffix.lower() == ".nrrd":
            import nrrd

            labels, _ = nrrd.read(str(path), index_order="C")
        else:
            from PIL import Image

            with Image.open(path) as image:
                labels = np.asarray(image)
    except Exception as error:  # noqa: BLE001 - any reader failure means the same to the user: unusable file
        raise RadiographError(path, f"cannot be read as a label map ({error})") from error
    labels = np.squeeze(labels)
    if labels.ndim == 3 and np.all(labels == labels[..., :1]):  # grey saved as RGB(A) with equal channels
        labels = labels[..., 0]
    if labels.ndim != 2:
        raise GeometryError(f"{path}: a label map must be one grayscale channel, not shape {labels.shape}")
    if image_shape is not None and labels.shape != tuple(image_shape):
        raise GeometryError(f"{path}: label map is {labels.shape}, its image is {tuple(image_shape)}")
    if labels.dtype.kind == "f" and not (np.isfinite(labels).all() and np.array_equal(labels, np.round(labels))):
        raise GeometryError(f"{path}: label values must be whole numbers, found NaN or fractions")
    if labels.min() < 0 or labels.max() > MAX_LABEL:
        raise GeometryError(f"{path}: label values must be 0..{len(VERTEBRAE)} (L1..L5) or {MAX_LABEL - 1}, "
                            f"{MAX_LABEL} (T12, S1), found {labels.min()}..{labels.max()}")
    labels = labels.astype(np.uint8)
    return labels if context else vertebra_labels(labels)


def write_label_png(path: str | Path, labels: np.ndarray) -> Path:
    """Write a label map as an 8-bit PNG, atomically (fast compression: maps are mostly background)."""
    from PIL import Image

    from .atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as temporary:
        Image.fromarray(np.asarray(labels, dtype=np.uint8)).save(temporary, format="PNG", compress_level=1)
    return path

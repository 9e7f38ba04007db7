"""Which radiographs a batch run covers: files, folders or CSV lists in, a sorted and sharded work list out."""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import AACScoreError

RADIOGRAPH_SUFFIXES = (".dcm", ".dicom", ".ima", ".png", ".jpg", ".jpeg", ".nrrd", ".nii", ".nii.gz", "")
DERIVED_MARKERS = ("_labels", "_heatmap", "_overlay", "_aac24_report")


@dataclass(frozen=True)
class WorkItem:
    """One radiograph to score, with the user's corrected label map when one is given."""

    image: Path | str  # a file, or (str) the WADO-RS address of a DICOMweb instance
    labels: Path | None = None


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'i/n' with 0 <= i < n (SLURM: --array=0-(n-1) and --shard $SLURM_ARRAY_TASK_ID/n)."""
    if not text:
        return None
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise AACScoreError(f"--shard must look like i/n (e.g. 0/10), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise AACScoreError(f"--shard {text}: need n >= 1 and 0 <= i < n")
    return index, count


def collect(paths: Sequence[str | Path], shard: tuple[int, int] | None = None) -> list[WorkItem]:
    """Expand files, folders (recursively) and CSV lists (column `file`, optional `labels`) into work items.

    The list is sorted and de-duplicated before sharding, so every shard of a job array sees the same order and
    each input lands in exactly one shard.
    """
    items: dict[Path, WorkItem] = {}
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for candidate in sorted(p for p in path.rglob("*") if p.is_file()):
                if _looks_like_radiograph(candidate):
                    items.setdefault(candidate.resolve(), WorkItem(candidate))
        elif path.suffix.lower() == ".csv" and path.is_file():
            for item in _read_list(path):
                items.setdefault(item.image.resolve(), item)
        else:
            items.setdefault(path.resolve(), WorkItem(path))  # missing files become error rows later
    ordered = [items[key] for key in sorted(items)]
    if shard is not None:
        index, count = shard
        ordered = ordered[index::count]
    return ordered


def _looks_like_radiograph(path: Path) -> bool:
    name = path.name.lower()
    if name.startswith(".") or any(marker in path.stem.lower() for marker in DERIVED_MARKERS):
        return False
    if name.endswith(".nii.gz"):
        return True
    return path.suffix.lower() in RADIOGRAPH_SUFFIXES


def _read_list(path: Path) -> list[WorkItem]:
    with open(path, newline="") as stream:
        reader = csv.DictReader(stream)
        if not reader.fieldnames or "file" not in reader.fieldnames:
            raise AACScoreError(f"{path}: a CSV list needs a 'file' column (and may have 'labels')")
        items = []
        for row in reader:
            if not (row.get("file") or "").strip():
                continue
            image = _relative_to(path, row["file"].strip())
            labels = (row.get("labels") or "").strip()
            items.append(WorkItem(image, _relative_to(path, labels) if labels else None))
        return items


def _relative_to(csv_path: Path, value: str) -> Path:
    candidate = Path(value)
    return candidate if candidate.is_absolute() else csv_path.parent / candidate


def output_names(items: Sequence[WorkItem]) -> dict[Path, str]:
    """A file stem per input, unique across the cohort (same stems in different folders get a path hash)."""
    counts: dict[str, int] = {}
    for item in items:
        counts[_stem(item.image)] = counts.get(_stem(item.image), 0) + 1
    names = {}
    for item in items:
        stem = _stem(item.image)
        if counts[stem] > 1:
            stem += "-" + hashlib.sha1(str(item.image.resolve()).encode()).hexdigest()[:8]
        names[item.image] = stem
    return names


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".seg.nrrd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem if path.suffix else name

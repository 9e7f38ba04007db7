"""Which radiographs a batch run covers: files, folders or CSV lists in, a sorted and sharded work list out."""

from __future__ import annotations

import csv
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import AACScoreError

RADIOGRAPH_SUFFIXES = (
    ".dcm", ".dicom", ".ima", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".nrrd", ".nii", ".nii.gz", "")
DERIVED_MARKERS = ("_labels", "_heatmap", "_overlay", "_aac24_report")
OUTPUT_HASH_DIGITS = 8


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
    """Expand files, folders (recursively, symlinked subfolders followed once) and CSV lists (column `file`,
    optional `labels`) into work items.

    Inputs are keyed by their resolved real path, so `a.dcm`, `./a.dcm` and `/abs/a.dcm` are one input. The list
    is sorted and de-duplicated before sharding, so every shard of a job array sees the same order and each input
    lands in exactly one shard.
    """
    items: dict[str, WorkItem] = {}
    for raw in paths:
        path = Path(raw)
        if _is_dir(path):
            for candidate in _files_under(path):
                if _looks_like_radiograph(candidate):
                    items.setdefault(real_path(candidate), WorkItem(candidate))
        elif path.suffix.lower() == ".csv" and path.is_file():
            for item in _read_list(path):
                items.setdefault(real_path(item.image), item)
        else:
            items.setdefault(real_path(path), WorkItem(path))  # missing files become error rows later
    ordered = [items[key] for key in sorted(items)]
    if shard is not None:
        index, count = shard
        ordered = ordered[index::count]
    return ordered


def real_path(path: str | Path) -> str:
    """The absolute path with symlinks resolved, the key of an input; a symlink loop keeps its own absolute path
    (reading it then reports the loop) instead of raising. A URL (an instance on a PACS) is its own key."""
    if "://" in str(path):
        return str(path)
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop on Python < 3.13
        return os.path.abspath(path)


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _files_under(folder: Path) -> list[Path]:
    """Every file below `folder`, sorted; symlinked subfolders are followed, each real folder visited once (so a
    link back up the tree cannot loop)."""
    files, seen = [], set()
    for root, folders, names in os.walk(folder, followlinks=True):
        real = real_path(root)
        if real in seen:
            folders[:] = []
            continue
        seen.add(real)
        files += [Path(root) / name for name in names if (Path(root) / name).is_file()]
    return sorted(files)


def _looks_like_radiograph(path: Path) -> bool:
    name = path.name.lower()
    if name.startswith(".") or any(marker in path.stem.lower() for marker in DERIVED_MARKERS):
        return False
    if name.endswith(".nii.gz"):
        return True
    return path.suffix.lower() in RADIOGRAPH_SUFFIXES


def csv_text(path: Path) -> str:
    """A CSV file's text: UTF-8 (a BOM, as Excel's "CSV UTF-8" writes, is dropped), else Latin-1 (which decodes
    every byte: older Excel and Windows tools)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _read_list(path: Path) -> list[WorkItem]:
    try:
        reader = csv.DictReader(io.StringIO(csv_text(path), newline=""))
        columns = [name.strip() for name in reader.fieldnames or []]
        if "file" not in columns:
            raise AACScoreError(f"{path}: a CSV list needs a 'file' column (and may have 'labels'); "
                                f"found {', '.join(columns) or 'no columns'}")
        items = []
        for row in reader:
            row = {(key or "").strip(): (value or "").strip() for key, value in row.items()
                   if not isinstance(value, list)}
            if not row.get("file"):
                continue
            image = _relative_to(path, row["file"])
            labels = row.get("labels", "")
            items.append(WorkItem(image, _relative_to(path, labels) if labels else None))
    except csv.Error as error:
        raise AACScoreError(f"{path}: not a readable CSV list ({error})") from None
    except OSError as error:
        raise AACScoreError(f"{path}: cannot be read ({error.strerror or error})") from None
    return items


def _relative_to(csv_path: Path, value: str) -> Path:
    candidate = Path(value)
    return candidate if candidate.is_absolute() else csv_path.parent / candidate


def output_names(items: Sequence[WorkItem]) -> dict[Path, str]:
    """A file stem per input, unique across the cohort (same stems in different folders get a path hash)."""
    counts: dict[str, int] = {}
    for item in items:
        counts[_stem(item.image)] = counts.get(_stem(item.image), 0) + 1
    return {item.image: output_name(item.image) if counts[_stem(item.image)] > 1 else _stem(item.image)
            for item in items}


def unique_output_names(items: Sequence[WorkItem]) -> dict[Path, str]:
    """A file stem per input that no other input can have, whatever the run: the name plus a short hash of its
    real path (for outputs that accumulate in one folder over several runs, as `score`'s do)."""
    return {item.image: output_name(item.image) for item in items}


def output_name(image: Path) -> str:
    return f"{_stem(image)}-{hashlib.sha1(real_path(image).encode()).hexdigest()[:OUTPUT_HASH_DIGITS]}"


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".seg.nrrd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem if path.suffix else name

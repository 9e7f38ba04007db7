"""A training set that a research group builds while it works: corrected vertebrae and rated scores, on disk.

Why this layout: the folder is an nnU-Net v2 raw dataset (`dataset.json`, `imagesTr/<case>_0000.nrrd`,
`labelsTr/<case>.nrrd`), so nnU-Net's own tools read it as it is, and `scores.csv` is the CSV that
`aacscore train-scorer --csv` reads. Radiographs are stored as NRRD holding only pixels and pixel spacing: no
DICOM header, hence no patient identifiers, is ever copied (text burned into the pixels stays; say so to users).
A case is named by a hash of its pixels, so adding the same radiograph again updates its labels and scores
instead of adding a duplicate. `cases.csv` records, per case, when it was added, the sha256 of the source file
(to recognise it later without keeping its path, which may hold a name), whether it has scores and which context
classes (T12 = 6, S1 = 7: the vertebra above L1 and the top of the sacrum) its label map holds: a segmenter with
context classes counts levels from them, and fine-tuning it keeps them only when the cases carry them.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from ..errors import AACScoreError
from ..kauppila import CONTEXT_LABELS, SUBSCORE_COLUMNS, VERTEBRAE
from .atomic import atomic_path, write_text_atomic
from .radiograph import Radiograph

DATASET_JSON = "dataset.json"
CASES_CSV = "cases.csv"
SCORES_CSV = "scores.csv"
IMAGES = "imagesTr"
LABELS = "labelsTr"
FILE_ENDING = ".nrrd"
CASE_COLUMNS = ("case", "added", "source_sha256", "rows", "cols", "row_mm", "col_mm", "has_scores", "context")
SCORE_COLUMNS = ("file", "labels", "aac24", *SUBSCORE_COLUMNS)


@dataclass(frozen=True)
class TrainingCase:
    """One stored case: its radiograph and label map files, its scores when a rater gave them, and the context
    classes (T12, S1) its label map holds."""

    case: str
    image: Path
    labels: Path
    scores: dict[str, int] | None
    context: tuple[str, ...] = ()


def parse_scores(text: str) -> dict[str, int]:
    """'L1A=0,L1P=1,...' (all eight, integers 0..3) -> {'L1A': 0, ...}; a one-line error otherwise."""
    scores: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, value = part.partition("=")
        name = name.strip().upper()
        if not sep or name not in SUBSCORE_COLUMNS:
            raise AACScoreError(f"scores: {part!r} is not NAME=VALUE with NAME one of {', '.join(SUBSCORE_COLUMNS)}")
        if name in scores:
            raise AACScoreError(f"scores: {name} is given twice")
        scores[name] = _subscore(value, name)
    missing = [name for name in SUBSCORE_COLUMNS if name not in scores]
    if missing:
        raise AACScoreError(f"scores: missing {', '.join(missing)} (all eight Kauppila subscores are needed)")
    return scores


def _subscore(value: object, name: str) -> int:
    try:
        number = float(str(value).strip())
    except ValueError:
        raise AACScoreError(f"scores: {name}={value!r} is not a number") from None
    if number not in (0, 1, 2, 3):
        raise AACScoreError(f"scores: {name}={value!r} must be 0, 1, 2 or 3")
    return int(number)


def pixel_hash(pixels: np.ndarray) -> str:
    """Hash of the pixel values and shape: the case's name, the same whatever file or format they came in."""
    array = np.ascontiguousarray(pixels, dtype=np.float32)
    digest = hashlib.sha256(str(array.shape).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


class TrainingSet:
    """The folder of one training set; every write is atomic and serialised by a lock file."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    # -------------------------------------------------------------------------------------------- reading
    def cases(self) -> list[TrainingCase]:
        scores = {row["file"]: row for row in self._read_csv(SCORES_CSV)}
        out = []
        for row in self._read_csv(CASES_CSV):
            image = f"{IMAGES}/{row['case']}_0000{FILE_ENDING}"
            scored = scores.get(image)
            out.append(TrainingCase(row["case"], self.folder / image,
                                    self.folder / LABELS / f"{row['case']}{FILE_ENDING}",
                                    {n: int(scored[n]) for n in SUBSCORE_COLUMNS} if scored else None,
                                    tuple(name for name in (row.get("context") or "").split() if name in CONTEXT_LABELS)))
        return out

    def counts(self) -> dict[str, int]:
        """How many cases the set holds, and how many of them have scores."""
        cases = self.cases()
        return {"cases": len(cases), "scored": sum(case.scores is not None for case in cases)}

    def fingerprint(self) -> str:
        """sha256 over every stored file: recorded in a fine-tuned package's manifest as its training data."""
        digest = hashlib.sha256()
        for path in sorted(p for p in self.folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
            digest.update(path.relative_to(self.folder).as_posix().encode() + b"\0")
            with open(path, "rb") as stream:
                for block in iter(lambda: stream.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()

    def _read_csv(self, name: str) -> list[dict[str, str]]:
        path = self.folder / name
        if not path.is_file():
            return []
        with open(path, newline="", encoding="utf-8") as stream:
            return list(csv.DictReader(stream))

    # -------------------------------------------------------------------------------------------- writing
    def add(self, radiograph: Radiograph, labels: np.ndarray, scores: Mapping[str, int] | None = None,
            source_sha256: str = "") -> TrainingCase:
        """Store a radiograph with its corrected L1..L5 label map (and the eight subscores, when rated).

        The label map may also hold T12 = 6 and S1 = 7 (context classes); other values are refused.
        Refused, with nothing written: a label map of another size, one without all of L1..L5, a radiograph
        without pixel spacing (the segmenter trains in millimetres), scores outside 0..3."""
        where = radiograph.path
        labels = np.asarray(labels)
        if labels.shape != radiograph.pixels.shape:
            raise AACScoreError(f"{where}: label map {labels.shape} does not match the radiograph {radiograph.pixels.shape}")
        missing = [name for value, name in enumerate(VERTEBRAE, start=1) if not np.any(labels == value)]
        if missing:
            raise AACScoreError(f"{where}: the label map lacks {', '.join(missing)}; a training case needs L1..L5")
        unknown = sorted(set(np.unique(labels).tolist()) - {0, *range(1, len(VERTEBRAE) + 1), *CONTEXT_LABELS.values()})
        if unknown:
            raise AACScoreError(f"{where}: the label map holds values {unknown}; a training case has 0, L1..L5 = 1..5, "
                                f"T12 = 6 and S1 = 7")
        context = [name for name, value in CONTEXT_LABELS.items() if np.any(labels == value)]
        if radiograph.spacing is None:
            raise AACScoreError(f"{where}: pixel spacing unknown; a training case needs it (DICOM or NRRD input)")
        if scores is not None:
            scores = {name: _subscore(scores.get(name), name) for name in SUBSCORE_COLUMNS}
        case = f"case_{pixel_hash(radiograph.pixels)[:16]}"
        with self._locked():
            (self.folder / IMAGES).mkdir(parents=True, exist_ok=True)
            (self.folder / LABELS).mkdir(parents=True, exist_ok=True)
            image = self.folder / IMAGES / f"{case}_0000{FILE_ENDING}"
            label_file = self.folder / LABELS / f"{case}{FILE_ENDING}"
            write_nrrd_2d(image, _storage_pixels(radiograph.pixels), radiograph.spacing)
            write_nrrd_2d(label_file, labels.astype(np.uint8), radiograph.spacing)
            rows = {row["case"]: row for row in self._read_csv(CASES_CSV)}
            old = rows.get(case, {})
            rows[case] = {
                "case": case, "added": old.get("added") or time.strftime("%Y-%m-%dT%H:%M:%S"),
                "source_sha256": source_sha256 or old.get("source_sha256", ""),
                "rows": labels.shape[0], "cols": labels.shape[1],
                "row_mm": f"{radiograph.spacing[0]:.6g}", "col_mm": f"{radiograph.spacing[1]:.6g}",
                "has_scores": "yes" if scores is not None or old.get("has_scores") == "yes" else "no",
                "context": " ".join(context),
            }
            scored = {row["file"]: row for row in self._read_csv(SCORES_CSV)}
            key = f"{IMAGES}/{image.name}"
            if scores is not None:
                scored[key] = {"file": key, "labels": f"{LABELS}/{label_file.name}",
                               "aac24": sum(scores.values()), **scores}
            self._write_csv(SCORES_CSV, SCORE_COLUMNS, [scored[k] for k in sorted(scored)])
            self._write_csv(CASES_CSV, CASE_COLUMNS, [rows[k] for k in sorted(rows)])
            self._write_dataset_json(len(rows), any(row.get("context") for row in rows.values()))
        return next(c for c in self.cases() if c.case == case)

    def _write_csv(self, name: str, columns: tuple[str, ...], rows: list[dict]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(self.folder / name, buffer.getvalue())

    def _write_dataset_json(self, n_cases: int, context: bool) -> None:
        """nnU-Net v2's raw dataset description; SimpleITKIO reads 2D NRRD with its spacing. T12 and S1 are
        declared once any case holds them (nnU-Net then trains them as classes too)."""
        labels = {name: i for i, name in enumerate(VERTEBRAE, start=1)}
        description = {
            "name": "AACScore training set",
            "description": "Lateral lumbar radiographs with corrected L1-L5 vertebral bodies (AACScore)"
                           + (", with T12 and the top of the sacrum (S1) where drawn." if context else "."),
            "channel_names": {"0": "radiograph"},
            "labels": {"background": 0, **labels, **(CONTEXT_LABELS if context else {})},
            "numTraining": n_cases,
            "file_ending": FILE_ENDING,
            "overwrite_image_reader_writer": "SimpleITKIO",
        }
        write_text_atomic(self.folder / DATASET_JSON, json.dumps(description, indent=2) + "\n")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise AACScoreError(f"{self.folder}: cannot create the training set folder ({error.strerror})") from None
        with open(self.folder / ".lock", "a+b") as lock:
            _exclusive(lock, True)
            try:
                yield
            finally:
                _exclusive(lock, False)


def _exclusive(stream, take: bool) -> None:
    """Take or release an exclusive lock on an open file: fcntl on POSIX, msvcrt on Windows (Slicer runs there)."""
    try:
        import fcntl
    except ImportError:
        import msvcrt

        stream.seek(0)
        msvcrt.locking(stream.fileno(), msvcrt.LK_LOCK if take else msvcrt.LK_UNLCK, 1)
        return
    fcntl.flock(stream, fcntl.LOCK_EX if take else fcntl.LOCK_UN)


def _storage_pixels(pixels: np.ndarray) -> np.ndarray:
    """uint16 when the values are whole numbers in range (most radiographs: half the size), else float32."""
    if np.all(np.isfinite(pixels)) and pixels.min() >= 0 and pixels.max() <= 65535 and np.all(pixels == np.round(pixels)):
        return pixels.astype(np.uint16)
    return pixels.astype(np.float32)


def write_nrrd_2d(path: Path, array: np.ndarray, spacing: tuple[float, float]) -> None:
    """A 2D NRRD with its spacing as space directions (columns first, as NRRD orders axes), atomically."""
    import nrrd

    row_mm, col_mm = spacing
    header = {"space dimension": 2, "space directions": [[col_mm, 0.0], [0.0, row_mm]],
              "space origin": [0.0, 0.0], "encoding": "gzip"}
    with atomic_path(path, suffix=FILE_ENDING) as temporary:
        nrrd.write(str(temporary), np.ascontiguousarray(array), header, index_order="C")

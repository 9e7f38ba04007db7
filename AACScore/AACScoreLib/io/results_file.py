"""The cohort results table `results.csv`: one row per input, rewritten atomically, resumable after a stop."""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import Iterable

from .atomic import write_atomic
from .cohort import real_path
from ..errors import AACScoreError, OutputError
from ..kauppila import SUBSCORE_COLUMNS

BASE_COLUMNS: tuple[str, ...] = ("file", "aac24", "category", "status", "message")
# the QC verdict (ok / review / error; status says the same as ok / warning / error), its reasons, the 80% interval
QC_COLUMNS: tuple[str, ...] = ("qc", "qc_reasons", "aac24_low", "aac24_high")
EXTRA_COLUMNS: tuple[str, ...] = ("labels", "levels", "heatmap", "anterior", "spacing_mm", "seconds", "models",
                                  "file_sha256", "dicom", "stored")
COLUMNS: tuple[str, ...] = BASE_COLUMNS + QC_COLUMNS + SUBSCORE_COLUMNS + EXTRA_COLUMNS


class ResultsFile:
    """Rows keyed by the input's resolved real path (so `./a.dcm` and `/abs/a.dcm` are one row), in the order they
    were produced; `file_sha256` recognises an input that was moved since it was scored.

    Every save rewrites the whole file through a temporary file and a rename, so an interrupted run leaves the
    previous complete table. Saves are throttled to one every `min_interval` seconds (plus one at `close`), so
    a cohort of thousands costs little I/O and a hard kill loses at most that many seconds of work.
    """

    def __init__(self, path: str | Path, min_interval: float = 2.0):
        self.path = Path(path)
        self.min_interval = min_interval
        self.rows: dict[str, dict[str, str]] = {}
        self._last_save = 0.0
        self._dirty = False
        if self.path.exists():
            try:
                with open(self.path, newline="", encoding="utf-8") as stream:
                    for row in csv.DictReader(stream):
                        if row.get("file"):
                            self.rows[real_path(row["file"])] = row
            except (OSError, UnicodeDecodeError, csv.Error) as error:
                raise AACScoreError(f"{self.path}: cannot be read as a results table ({_reason(error)})") from None

    def done(self, file: str | Path, retry_errors: bool = False, models: str | None = None) -> bool:
        """True when `file` already has a row (an `error` row counts unless errors are retried) made by `models`
        when given: a rerun with other model packages scores again rather than mixing two models' results."""
        row = self.rows.get(real_path(file))
        if row is None or (retry_errors and row.get("status") == "error"):
            return False
        return models is None or row.get("models") == models

    def moved(self) -> dict[str, str]:
        """{file_sha256: key} of the rows whose input no longer exists at its path (perhaps moved)."""
        return {row["file_sha256"]: key for key, row in self.rows.items()
                if row.get("file_sha256") and not os.path.lexists(key)}

    def forget(self, keys: Iterable[str]) -> None:
        """Drop rows (those of inputs that were moved and have a row under their new path)."""
        for key in list(keys):
            self.rows.pop(key, None)
            self._dirty = True

    def add(self, row: dict[str, object]) -> None:
        cells = {column: format_cell(row.get(column)) for column in COLUMNS}
        if cells["status"] == "error" and not cells["qc"]:  # error rows made before any check ran
            cells["qc"] = "error"
        self.rows[real_path(str(row["file"]))] = cells
        self._dirty = True
        if time.monotonic() - self._last_save >= self.min_interval:
            self.save()

    def save(self) -> None:
        """Write the table; a failure (disk full, read-only folder) leaves the previous table whole and raises
        OutputError, one line naming the file."""
        if not self._dirty and self.path.exists():
            return

        def write(stream) -> None:
            writer = csv.DictWriter(stream, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows.values())

        try:
            write_atomic(self.path, write)
        except OSError as error:
            raise OutputError(f"{self.path}: cannot be saved ({_reason(error)}); the previous table is intact, "
                              "and a rerun resumes from it") from None
        self._last_save = time.monotonic()
        self._dirty = False

    def close(self) -> None:
        self.save()

    def __enter__(self) -> "ResultsFile":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def values(self) -> Iterable[dict[str, str]]:
        return self.rows.values()


def format_cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _reason(error: Exception) -> str:
    return error.strerror if isinstance(error, OSError) and error.strerror else str(error)

"""The cohort results table `results.csv`: one row per input, rewritten atomically, resumable after a stop."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Iterable

from .atomic import write_atomic
from ..kauppila import SUBSCORE_COLUMNS

BASE_COLUMNS: tuple[str, ...] = ("file", "aac24", "category", "status", "message")
EXTRA_COLUMNS: tuple[str, ...] = ("labels", "levels", "heatmap", "anterior", "spacing_mm", "seconds", "models")
COLUMNS: tuple[str, ...] = BASE_COLUMNS + SUBSCORE_COLUMNS + EXTRA_COLUMNS


class ResultsFile:
    """Rows keyed by input file, in the order they were produced.

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
            with open(self.path, newline="") as stream:
                for row in csv.DictReader(stream):
                    if row.get("file"):
                        self.rows[row["file"]] = row

    def done(self, file: str, retry_errors: bool = False, models: str | None = None) -> bool:
        """True when `file` already has a row (an `error` row counts unless errors are retried) made by `models`
        when given: a rerun with other model packages scores again rather than mixing two models' results."""
        row = self.rows.get(file)
        if row is None or (retry_errors and row.get("status") == "error"):
            return False
        return models is None or row.get("models") == models

    def add(self, row: dict[str, object]) -> None:
        self.rows[str(row["file"])] = {column: format_cell(row.get(column)) for column in COLUMNS}
        self._dirty = True
        if time.monotonic() - self._last_save >= self.min_interval:
            self.save()

    def save(self) -> None:
        if not self._dirty and self.path.exists():
            return

        def write(stream) -> None:
            writer = csv.DictWriter(stream, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows.values())

        write_atomic(self.path, write)
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

"""The project's error types: every expected failure is one of these, with a message a user can act on."""

from __future__ import annotations

from pathlib import Path


class AACScoreError(Exception):
    """Base of every error this package raises on purpose; `exit_code` is what the command line exits with."""

    exit_code = 2


class RadiographError(AACScoreError):
    """A file cannot be read as a 2D grayscale radiograph; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # so that the error crosses from a worker process intact
        return type(self), (self.path, self.problem)


class GeometryError(AACScoreError):
    """The vertebra label map cannot give Kauppila geometry (missing, merged or out-of-order vertebrae)."""


class ModelPackageError(AACScoreError):
    """A model package is missing, malformed, or fails its checksum."""


class Cancelled(AACScoreError):
    """The user cancelled a long task; callers stop the whole job rather than record an error row."""


class DeviceError(AACScoreError, ValueError):
    """The requested compute device is unknown (a bad value, hence ValueError too) or cannot be used."""


class OutputError(AACScoreError, OSError):
    """An output cannot be written (read-only folder, a file where a folder should be, disk full); also an OSError
    so that callers catching write failures see it as one."""


class OutputBusy(AACScoreError):
    """Another run holds the output folder's lock; exit code 75 (EX_TEMPFAIL) so job scripts can retry later."""

    exit_code = 75

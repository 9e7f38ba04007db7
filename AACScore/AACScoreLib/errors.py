"""The project's error types: every expected failure is one of these, with a message a user can act on."""

from __future__ import annotations

from pathlib import Path


class AACScoreError(Exception):
    """Base of every error this package raises on purpose."""


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

"""The scorer package's QC calibration file `qc.json`: interval calibration, feature reference and the limit on
the score's spread over crop variants.

It lives in the scorer package because it describes that scorer's errors and features; the manifest pins it by
sha256 like the weights, so it is read through `read_verified`. A package without it still scores: the interval
columns stay empty and the feature and stability checks are skipped (`calibrate-qc` writes one); a qc.json
written before the stability check existed skips that check alone.
"""

from __future__ import annotations

import json

from ..errors import ModelPackageError
from .domain import FeatureReference
from .interval import IntervalCalibration
from .stability import ScoreStability

QC_FILE = "qc.json"
FORMAT = 1


def load_reference(package) -> tuple[IntervalCalibration | None, FeatureReference | None, ScoreStability | None]:
    """(interval calibration, feature reference, stability limit) from a package; Nones where it has none."""
    if package is None or QC_FILE not in package.files:
        return None, None, None
    from ..packages import read_verified

    try:
        data = json.loads(read_verified(package, QC_FILE))
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
        stability = ScoreStability.from_json(data["stability"]) if "stability" in data else None
        return IntervalCalibration.from_json(data["interval"]), FeatureReference.from_json(data["features"]), stability
    except (ValueError, KeyError, TypeError) as error:
        raise ModelPackageError(f"{package.path}: {QC_FILE} is not a valid QC calibration ({error})") from None

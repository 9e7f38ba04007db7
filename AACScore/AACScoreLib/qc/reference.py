"""The scorer package's QC calibration file `qc.json`: interval calibration and feature reference.

It lives in the scorer package because it describes that scorer's errors and features; the manifest pins it by
sha256 like the weights, so it is read through `read_verified`. A package without it still scores: the interval
columns stay empty and the feature check is skipped (`calibrate-qc` writes one).
"""

from __future__ import annotations

import json

from ..errors import ModelPackageError
from .domain import FeatureReference
from .interval import IntervalCalibration

QC_FILE = "qc.json"
FORMAT = 1


def load_reference(package) -> tuple[IntervalCalibration | None, FeatureReference | None]:
    """(interval calibration, feature reference) from a package, or (None, None) when it has no qc.json."""
    if package is None or QC_FILE not in package.files:
        return None, None
    from ..packages import read_verified

    try:
        data = json.loads(read_verified(package, QC_FILE))
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
        return IntervalCalibration.from_json(data["interval"]), FeatureReference.from_json(data["features"])
    except (ValueError, KeyError, TypeError) as error:
        raise ModelPackageError(f"{package.path}: {QC_FILE} is not a valid QC calibration ({error})") from None

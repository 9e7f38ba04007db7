"""Is the image like those the scorer learnt from? Distance of its penultimate features from the training-like set.

The reference is the mean and SD of each backbone feature over the calibration images, and the distance is the
root mean square of the feature z-scores, so one number compares an image with that set whatever the feature
count. An image beyond the largest distance seen among the calibration images' 99.5% is flagged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .verdict import Reason

DISTANCE_QUANTILE = 0.995
UNFAMILIAR_IMAGE = "unfamiliar_image"


@dataclass
class FeatureReference:
    mean: np.ndarray
    std: np.ndarray
    max_distance: float

    def distance(self, features: np.ndarray) -> float:
        z = (np.asarray(features, float) - self.mean) / self.std
        return float(np.sqrt(np.mean(z * z)))

    def to_json(self) -> dict:
        return {"mean": [round(float(v), 6) for v in self.mean], "std": [round(float(v), 6) for v in self.std],
                "max_distance": self.max_distance, "distance_quantile": DISTANCE_QUANTILE}

    @classmethod
    def from_json(cls, data: dict) -> "FeatureReference":
        mean, std = np.asarray(data["mean"], float), np.asarray(data["std"], float)
        if mean.shape != std.shape or mean.ndim != 1 or not np.all(std > 0):
            raise ValueError("feature reference needs equal-length mean and positive std lists")
        return cls(mean, std, float(data["max_distance"]))

    @classmethod
    def fit(cls, features: np.ndarray) -> "FeatureReference":
        features = np.asarray(features, float)
        mean, std = features.mean(axis=0), np.maximum(features.std(axis=0), 1e-6)
        reference = cls(mean, std, 0.0)
        distances = [reference.distance(f) for f in features]
        reference.max_distance = float(np.quantile(distances, DISTANCE_QUANTILE))
        return reference


def domain_reasons(reference: FeatureReference | None, features: np.ndarray) -> tuple[list[Reason], dict[str, float]]:
    if reference is None:
        return [], {}
    distance = reference.distance(features)
    found = []
    if distance > reference.max_distance:
        found.append(Reason(UNFAMILIAR_IMAGE, f"the scorer's features are {distance:.2f} from its reference set "
                                                f"(limit {reference.max_distance:.2f}): unlike the images it learnt from"))
    return found, {"feature_distance": distance}

"""Does the score hold when the crop is slightly blurred or sharpened? A score that moves under such changes rests on
detail the scorer reads unreliably, which is how it errs on images unlike its training ones.

The crop is scored twice more, blurred (Gaussian, sigma 1 pixel of the network's input) and sharpened (unsharp
mask, amount 1, sigma 2 pixels), in the same batched pass as QC's MC dropout: a reader would call all three the
same image. The SD of the three totals is flagged above the 90% quantile of the calibration images' SDs
(`calibrate-qc` fits the limit into qc.json). The variants and the quantile were chosen on development phantoms,
not on the test seeds (README, *Quality control*).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..kauppila import MAX_TOTAL
from .verdict import Reason

BLUR_SIGMA = 1.0  # pixels of the network-size crop
SHARPEN_SIGMA, SHARPEN_AMOUNT = 2.0, 1.0
SPREAD_QUANTILE = 0.9
SCORE_UNSTABLE = "score_unstable"


def crop_variants(crop: np.ndarray) -> list[np.ndarray]:
    """The crop blurred and sharpened, at its own size and intensity scale (the scorer normalises each)."""
    crop = np.asarray(crop, dtype=np.float32)
    smooth = ndimage.gaussian_filter(crop, SHARPEN_SIGMA)
    return [ndimage.gaussian_filter(crop, BLUR_SIGMA), crop + SHARPEN_AMOUNT * (crop - smooth)]


def variant_spread(totals: np.ndarray) -> float:
    """SD of the totals (the crop's and its variants'), each clipped to the scale as results are."""
    return float(np.std(np.clip(np.asarray(totals, float), 0.0, MAX_TOTAL)))


@dataclass
class ScoreStability:
    """The limit on the variants' spread, fitted on a scorer's calibration images (stored in qc.json)."""

    max_spread: float

    def to_json(self) -> dict:
        return {"max_spread": self.max_spread, "spread_quantile": SPREAD_QUANTILE,
                "variants": f"gaussian blur sigma {BLUR_SIGMA:g}; unsharp mask sigma {SHARPEN_SIGMA:g} "
                            f"amount {SHARPEN_AMOUNT:g}"}

    @classmethod
    def from_json(cls, data: dict) -> "ScoreStability":
        limit = float(data["max_spread"])
        if not limit > 0:
            raise ValueError(f"max_spread must be positive, got {limit}")
        return cls(limit)

    @classmethod
    def fit(cls, spreads: np.ndarray) -> "ScoreStability":
        return cls(max(float(np.quantile(np.asarray(spreads, float), SPREAD_QUANTILE)), 1e-3))


def stability_reasons(stability: ScoreStability | None, spread: float) -> tuple[list[Reason], dict[str, float]]:
    found = []
    if stability is not None and spread > stability.max_spread:
        found.append(Reason(SCORE_UNSTABLE, f"the score moves when the crop is slightly blurred or sharpened "
                                              f"(SD {spread:.2f} points, limit {stability.max_spread:.2f})"))
    return found, {"variant_spread": spread}

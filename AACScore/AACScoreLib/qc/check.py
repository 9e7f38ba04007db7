"""All QC checks of one scored radiograph, joined into a verdict with reasons and an interval."""

from __future__ import annotations

import numpy as np

from . import anatomy, domain, levels, stability
from .interval import score_uncertainty
from .reference import load_reference
from .verdict import SCORE_UNCERTAIN, QCVerdict, Reason, flag_kinds, verdict_of

MAX_HALF_WIDTH = 4.0  # an 80% interval wider than +-4 points: an error above 4 (a wrong result) is likely


class QualityControl:
    """Checks bound to a pipeline's models; the scorer package's calibration is read once."""

    def __init__(self, scorer, segmenter=None):
        self.scorer = scorer
        self.segmenter = segmenter
        self.interval, self.features, self.stability = load_reference(getattr(scorer, "package", None))

    def assess(self, radiograph, labels: np.ndarray, labels_source: str, geometry, crop: np.ndarray,
               aac24: float, level_assignment=None, notes: list[Reason] | None = None,
               working_shape: tuple[int, int] | None = None, turns: int | None = None) -> QCVerdict:
        """Run every check; `notes` are reasons the earlier stages already raised (unknown spacing...);
        `working_shape` and `turns` are the grid the segmenter ran on and the quarter turns that made the image
        upright for it, where and how its second look is taken."""
        reasons: list[Reason] = list(notes or ())
        measured: dict[str, float] = {}
        reasons += levels.level_counting_reasons(level_assignment)
        if hasattr(self.segmenter, "predict_logits"):  # an nnU-Net segmenter (not a stand-in without a network)
            dice = levels.flip_dice(self.segmenter, radiograph, labels, working_shape, turns)
            reasons += levels.flip_reasons(dice, labels_source)
            measured["flip_dice_min"] = min(dice.values())
        for check in (lambda: anatomy.shape_reasons(labels, geometry),
                      lambda: anatomy.crop_reasons(geometry, radiograph.pixels.shape)):
            found, numbers = check()
            reasons += found
            measured.update(numbers)
        uncertainty = score_uncertainty(self.scorer, crop, stability.crop_variants(crop))
        measured["mc_spread"] = uncertainty.spread
        spread = stability.variant_spread([uncertainty.total, *uncertainty.variant_totals])
        for found, numbers in (domain.domain_reasons(self.features, uncertainty.features),
                               stability.stability_reasons(self.stability, spread)):
            reasons += found
            measured.update(numbers)
        low = high = None
        if self.interval is not None:  # flagged by the checks above: the wider quantile of flagged results
            flagged = flag_kinds(reasons)
            scale = self.interval.spread_of(uncertainty.spread, spread)
            low, high = self.interval.interval(aac24, scale, flagged)
            half = self.interval.half_width(scale, flagged)
            if half > MAX_HALF_WIDTH:
                reasons.append(Reason(SCORE_UNCERTAIN, f"{self.interval.coverage:.0%} interval "
                                                         f"{low:.1f}-{high:.1f} is wider than +-{MAX_HALF_WIDTH:g}"))
        return QCVerdict(verdict_of(reasons, scored=True), tuple(reasons), low, high, measured)

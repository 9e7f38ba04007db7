"""The AAC-24 prediction interval: a split-conformal quantile of the residuals, scaled by a spread of the score.

Three candidates, all from one batched backbone pass: the MC-dropout spread on the scorer's head (the head is
BatchNorm -> Dropout(0.5) -> Linear, so dropout masks cost a few matrix products), the spread over the crop's
blurred and sharpened variants (`stability`), or no spread (a constant width). A conformal quantile of
|truth - score| / (spread + floor) on held-out images turns a spread into an interval that covers the truth at the
stated rate. `calibrate-qc` measures each candidate on held-out cases and keeps one (its figures go in qc.json):
when the calibration cases come from three or more sets (families, restyled or cropped copies), the one whose
coverage holds best on a set left out of its fitting, since users' images differ from all of them; else the
narrower on held-out folds. The point score stays the network's deterministic output.

Results that other checks flag for review (levels counted with doubt, odd body shapes, an unfamiliar image) miss
by more than the others, and they are most of what changes on images from elsewhere. So when the calibration set
holds enough of both, the quantile is fitted separately for flagged and unflagged results (Mondrian conformal,
Vovk et al. 2005): each group is covered at the nominal rate, and a set with more flagged results gets wider
intervals where it needs them. Results flagged by two or more kinds of check miss by more than those flagged by one,
so they get a third quantile when the calibration set holds enough of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..kauppila import MAX_TOTAL

MC_SAMPLES = 64
MC_SEED = 0  # fixed masks: the same image always gets the same interval
MC_DROPOUT, VARIANTS, CONSTANT = "mc_dropout_conformal", "variant_conformal", "constant_conformal"
METHODS = (MC_DROPOUT, VARIANTS, CONSTANT)  # the constant last: spread-based methods must earn their place
MIN_GAIN = 1.05
MIN_GROUP = 20  # calibration cases each group (unflagged, flagged once, flagged more) needs for its own quantile


@dataclass
class Uncertainty:
    """The scorer's view of one crop: its penultimate features and the MC-dropout spread of the total."""

    features: np.ndarray  # (F,)
    total: float  # deterministic total, unclipped
    spread: float  # SD of the total over dropout masks
    variant_totals: np.ndarray  # deterministic totals of the extra crops, unclipped


def score_uncertainty(scorer, crop: np.ndarray, variants: Sequence[np.ndarray] = (),
                      samples: int = MC_SAMPLES) -> Uncertainty:
    """Features and MC-dropout spread of the total head for one crop, and the totals of `variants` (other
    versions of the same crop), all in one batched backbone pass."""
    import torch
    from torch import nn

    model = scorer.model
    model.eval()
    with torch.no_grad():
        batch = torch.cat([scorer.prepare(c) for c in (crop, *variants)])
        features = model.features(batch)
        norm = next(m for m in model.head if isinstance(m, nn.BatchNorm1d))
        dropout = next(m for m in model.head if isinstance(m, nn.Dropout))
        linear = next(m for m in model.head if isinstance(m, nn.Linear))
        normed = norm(features)
        totals = (linear(normed)[:, 0] * model.target_std + model.target_mean).float().cpu().numpy()
        generator = torch.Generator(device=normed.device).manual_seed(MC_SEED)
        keep = (torch.rand((samples, normed.shape[1]), generator=generator, device=normed.device) >= dropout.p)
        sampled = linear(normed[:1] * keep / (1.0 - dropout.p))[:, 0] * model.target_std + model.target_mean
    return Uncertainty(features[0].float().cpu().numpy(), float(totals[0]), float(sampled.std()), totals[1:])


@dataclass
class IntervalCalibration:
    """How to turn a score and its spread into an interval of the stated coverage (stored in qc.json)."""

    method: str
    coverage: float  # nominal, e.g. 0.8
    quantile: float  # conformal quantile of the (scaled) absolute residual (of unflagged results, with review_quantile)
    floor: float = 0.0  # added to the spread so that a zero spread still gives a width
    review_quantile: float | None = None  # the quantile of results other checks flag; None: one quantile for all
    many_flags_quantile: float | None = None  # of results flagged by 2+ kinds of check; None: review_quantile

    def spread_of(self, mc_spread: float, variant_spread: float) -> float:
        """The spread this method scales its width by."""
        return variant_spread if self.method == VARIANTS else mc_spread

    def half_width(self, spread: float, flagged: int = 0) -> float:
        """`flagged`: how many kinds of check flagged the result (`verdict.flag_kinds`; True counts as one)."""
        quantile = self.quantile
        if flagged and self.review_quantile is not None:
            many = flagged >= 2 and self.many_flags_quantile is not None
            quantile = self.many_flags_quantile if many else self.review_quantile
        if self.method == CONSTANT:
            return quantile
        return quantile * (spread + self.floor)

    def interval(self, score: float, spread: float, flagged: int = 0) -> tuple[float, float]:
        half = self.half_width(spread, flagged)
        return max(0.0, score - half), min(float(MAX_TOTAL), score + half)

    def to_json(self) -> dict:
        data = {"method": self.method, "coverage": self.coverage, "quantile": self.quantile, "floor": self.floor}
        if self.review_quantile is not None:
            data["review_quantile"] = self.review_quantile
        if self.many_flags_quantile is not None:
            data["many_flags_quantile"] = self.many_flags_quantile
        return data

    @classmethod
    def from_json(cls, data: dict) -> "IntervalCalibration":
        if data.get("method") not in METHODS:
            raise ValueError(f"interval method must be one of {METHODS}, got {data.get('method')!r}")
        review, many = (data.get(key) for key in ("review_quantile", "many_flags_quantile"))
        return cls(str(data["method"]), float(data["coverage"]), float(data["quantile"]), float(data.get("floor", 0)),
                   None if review is None else float(review), None if many is None else float(many))


def conformal_quantile(scores: np.ndarray, coverage: float) -> float:
    """The ceil((n + 1) * coverage)-th smallest score: split-conformal, covers at least `coverage` on exchangeable
    new cases (Vovk et al.; Lei et al. 2018)."""
    scores = np.sort(np.asarray(scores, dtype=float))
    if scores.size == 0:
        raise ValueError("no calibration cases")
    rank = int(np.ceil((scores.size + 1) * coverage))
    return float(scores[min(rank, scores.size) - 1])


def fit_interval(method: str, truth: np.ndarray, score: np.ndarray, spread: np.ndarray,
                 coverage: float) -> IntervalCalibration:
    residual = np.abs(np.asarray(truth, float) - np.asarray(score, float))
    if method == CONSTANT:
        return IntervalCalibration(method, coverage, conformal_quantile(residual, coverage))
    floor = float(np.median(spread))  # keeps near-zero spreads from giving near-zero widths
    return IntervalCalibration(method, coverage, conformal_quantile(residual / (spread + floor), coverage), floor)


def evaluate_interval(calibration: IntervalCalibration, truth: np.ndarray, score: np.ndarray,
                      spread: np.ndarray, flagged: np.ndarray | None = None) -> dict[str, float]:
    flagged = np.zeros(len(truth), int) if flagged is None else np.asarray(flagged, int)
    bounds = np.array([calibration.interval(float(s), float(u), int(f)) for s, u, f in zip(score, spread, flagged)])
    covered = (truth >= bounds[:, 0]) & (truth <= bounds[:, 1])
    return {"coverage": float(covered.mean()), "mean_width": float(np.mean(bounds[:, 1] - bounds[:, 0])),
            "n": int(len(truth))}


def fit_by_flag(method: str, truth: np.ndarray, score: np.ndarray, spread: np.ndarray, flagged: np.ndarray,
                coverage: float) -> IntervalCalibration:
    """One quantile for unflagged results, one for flagged ones and, when there are enough of them, one for those
    flagged by two or more kinds of check (`flagged` counts the kinds; each group needs MIN_GROUP cases, else it
    joins the group before); all on the scale (spread floor) of all cases."""
    kinds = np.asarray(flagged, int)
    pooled = fit_interval(method, truth, score, spread, coverage)
    if min(int((kinds > 0).sum()), int((kinds == 0).sum())) < MIN_GROUP:
        return pooled
    scale = 1.0 if method == CONSTANT else spread + pooled.floor
    residual = np.abs(truth - score) / scale
    once, many = kinds == 1, kinds >= 2
    if min(int(once.sum()), int(many.sum())) < MIN_GROUP:
        ok, review = (conformal_quantile(residual[group], coverage) for group in (kinds == 0, kinds > 0))
        return IntervalCalibration(method, coverage, ok, pooled.floor, review)
    ok, review, more = (conformal_quantile(residual[group], coverage) for group in (kinds == 0, once, many))
    return IntervalCalibration(method, coverage, ok, pooled.floor, review, more)


def choose_interval(truth: np.ndarray, score: np.ndarray, spread: np.ndarray, coverage: float = 0.8,
                    folds: int = 2, seed: int = 0, flagged: np.ndarray | None = None,
                    variant_spread: np.ndarray | None = None,
                    groups: np.ndarray | None = None) -> tuple[IntervalCalibration, dict]:
    """Measure every method on cases left out of its fitting and keep one, refitted on all cases. Returns
    (calibration, the figures per method). `spread` is the MC-dropout spread; the variant method is a candidate
    when `variant_spread` is given.

    With `groups` of three or more calibration sets, each set is left out in turn and the method whose coverage
    there is nearest the nominal on average is kept (the narrower on a tie): the one that holds best on images
    unlike those it was fitted on. Otherwise `folds` random folds, keeping the narrower method whose held-out
    coverage is within 0.05 of the nominal, a spread-based one only when it narrows the interval by MIN_GAIN.
    With `flagged` (how many kinds of QC check flagged each result), each method is fitted per group
    (`fit_by_flag`)."""
    truth, score, spread = (np.asarray(a, float) for a in (truth, score, spread))
    flagged = np.zeros(len(truth), int) if flagged is None else np.asarray(flagged, int)
    spreads = {MC_DROPOUT: spread, CONSTANT: spread}
    if variant_spread is not None:
        spreads[VARIANTS] = np.asarray(variant_spread, float)
    spreads = {method: values for method, values in spreads.items()  # a spread that never varies says nothing
               if method == CONSTANT or np.ptp(values) > 0}
    by_set = groups is not None and len(set(np.asarray(groups).tolist())) >= 3
    if by_set:
        labels = np.asarray(groups)
        parts = [np.flatnonzero(labels == label) for label in dict.fromkeys(labels.tolist())]
    else:
        parts = np.array_split(np.random.default_rng(seed).permutation(len(truth)), folds)
    figures = {}
    for method in (m for m in METHODS if m in spreads):
        use = spreads[method]
        results = []
        for k, test in enumerate(parts):
            train = np.concatenate([part for j, part in enumerate(parts) if j != k])
            fitted = fit_by_flag(method, truth[train], score[train], use[train], flagged[train], coverage)
            results.append(evaluate_interval(fitted, truth[test], score[test], use[test], flagged[test]))
        sizes = np.array([len(test) for test in parts])
        covered = np.array([r["coverage"] for r in results])
        figures[method] = {"held_out_coverage": float(covered @ sizes / sizes.sum()),
                           "held_out_mean_width": float(np.array([r["mean_width"] for r in results]) @ sizes
                                                        / sizes.sum())}
        if by_set:
            figures[method]["coverage_by_set_left_out"] = [round(float(c), 4) for c in covered]
            figures[method]["mean_coverage_error"] = float(np.mean(np.abs(covered - coverage)))
    candidates = [m for m in METHODS if m in figures]
    if by_set:
        best = min(candidates, key=lambda m: (figures[m]["mean_coverage_error"], figures[m]["held_out_mean_width"]))
    else:
        best = min(candidates, key=lambda m: (abs(figures[m]["held_out_coverage"] - coverage) > 0.05,
                                              figures[m]["held_out_mean_width"] * (1.0 if m == CONSTANT else MIN_GAIN)))
    figures["chosen"] = best
    figures["chosen_by"] = "sets left out" if by_set else f"{folds} random folds"
    figures["flagged_cases"] = int((flagged > 0).sum())
    figures["flagged_by_two_or_more"] = int((flagged >= 2).sum())
    return fit_by_flag(best, truth, score, spreads[best], flagged, coverage), figures

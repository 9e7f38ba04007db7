"""The AAC-24 prediction interval: MC dropout on the scorer's head, scaled by a split-conformal quantile.

Why this recipe: the head is BatchNorm -> Dropout(0.5) -> Linear, so sampling dropout masks costs one backbone pass
(the features) and a few matrix products, not one network pass per sample. The spread of those samples says how
much the score rests on a few features; a conformal quantile of |truth - score| / (spread + floor) on held-out
images turns it into an interval that covers the truth at the stated rate. `calibrate-qc` also fits the plain
constant-width conformal interval and keeps whichever is narrower on held-out folds (its figures go in qc.json).
The point score stays the network's deterministic output.

Results that other checks flag for review (levels counted with doubt, odd body shapes, an unfamiliar image) miss
by more than the others, and they are most of what changes on images from elsewhere. So when the calibration set
holds enough of both, the quantile is fitted separately for flagged and unflagged results (Mondrian conformal,
Vovk et al. 2005): each group is covered at the nominal rate, and a set with more flagged results gets wider
intervals where it needs them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..kauppila import MAX_TOTAL

MC_SAMPLES = 64
MC_SEED = 0  # fixed masks: the same image always gets the same interval
METHODS = ("mc_dropout_conformal", "constant_conformal")
MIN_GAIN = 1.05
MIN_GROUP = 20  # calibration cases each of flagged / unflagged needs for its own quantile


@dataclass
class Uncertainty:
    """The scorer's view of one crop: its penultimate features and the MC-dropout spread of the total."""

    features: np.ndarray  # (F,)
    total: float  # deterministic total, unclipped
    spread: float  # SD of the total over dropout masks


def score_uncertainty(scorer, crop: np.ndarray, samples: int = MC_SAMPLES) -> Uncertainty:
    """Features and MC-dropout spread of the total head for one crop (one backbone pass)."""
    import torch
    from torch import nn

    model = scorer.model
    model.eval()
    with torch.no_grad():
        features = model.features(scorer.prepare(crop))
        norm = next(m for m in model.head if isinstance(m, nn.BatchNorm1d))
        dropout = next(m for m in model.head if isinstance(m, nn.Dropout))
        linear = next(m for m in model.head if isinstance(m, nn.Linear))
        normed = norm(features)
        total = float(linear(normed)[0, 0] * model.target_std + model.target_mean)
        generator = torch.Generator(device=normed.device).manual_seed(MC_SEED)
        keep = (torch.rand((samples, normed.shape[1]), generator=generator, device=normed.device) >= dropout.p)
        sampled = linear(normed * keep / (1.0 - dropout.p))[:, 0] * model.target_std + model.target_mean
    return Uncertainty(features[0].float().cpu().numpy(), total, float(sampled.std()))


@dataclass
class IntervalCalibration:
    """How to turn a score and its spread into an interval of the stated coverage (stored in qc.json)."""

    method: str
    coverage: float  # nominal, e.g. 0.8
    quantile: float  # conformal quantile of the (scaled) absolute residual (of unflagged results, with review_quantile)
    floor: float = 0.0  # added to the spread so that a zero spread still gives a width
    review_quantile: float | None = None  # the quantile of results other checks flag; None: one quantile for all

    def half_width(self, spread: float, flagged: bool = False) -> float:
        quantile = self.review_quantile if flagged and self.review_quantile is not None else self.quantile
        if self.method == "constant_conformal":
            return quantile
        return quantile * (spread + self.floor)

    def interval(self, score: float, spread: float, flagged: bool = False) -> tuple[float, float]:
        half = self.half_width(spread, flagged)
        return max(0.0, score - half), min(float(MAX_TOTAL), score + half)

    def to_json(self) -> dict:
        data = {"method": self.method, "coverage": self.coverage, "quantile": self.quantile, "floor": self.floor}
        if self.review_quantile is not None:
            data["review_quantile"] = self.review_quantile
        return data

    @classmethod
    def from_json(cls, data: dict) -> "IntervalCalibration":
        if data.get("method") not in METHODS:
            raise ValueError(f"interval method must be one of {METHODS}, got {data.get('method')!r}")
        review = data.get("review_quantile")
        return cls(str(data["method"]), float(data["coverage"]), float(data["quantile"]), float(data.get("floor", 0)),
                   None if review is None else float(review))


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
    if method == "constant_conformal":
        return IntervalCalibration(method, coverage, conformal_quantile(residual, coverage))
    floor = float(np.median(spread))  # keeps near-zero spreads from giving near-zero widths
    return IntervalCalibration(method, coverage, conformal_quantile(residual / (spread + floor), coverage), floor)


def evaluate_interval(calibration: IntervalCalibration, truth: np.ndarray, score: np.ndarray,
                      spread: np.ndarray, flagged: np.ndarray | None = None) -> dict[str, float]:
    flagged = np.zeros(len(truth), bool) if flagged is None else np.asarray(flagged, bool)
    bounds = np.array([calibration.interval(float(s), float(u), bool(f)) for s, u, f in zip(score, spread, flagged)])
    covered = (truth >= bounds[:, 0]) & (truth <= bounds[:, 1])
    return {"coverage": float(covered.mean()), "mean_width": float(np.mean(bounds[:, 1] - bounds[:, 0])),
            "n": int(len(truth))}


def fit_by_flag(method: str, truth: np.ndarray, score: np.ndarray, spread: np.ndarray, flagged: np.ndarray,
                coverage: float) -> IntervalCalibration:
    """One quantile for unflagged and one for flagged results (each group needs MIN_GROUP cases, else one for
    all); both on the scale (MC-dropout floor) of all cases."""
    pooled = fit_interval(method, truth, score, spread, coverage)
    if min(int(flagged.sum()), int((~flagged).sum())) < MIN_GROUP:
        return pooled
    scale = 1.0 if method == "constant_conformal" else spread + pooled.floor
    residual = np.abs(truth - score) / scale
    ok, review = (conformal_quantile(residual[group], coverage) for group in (~flagged, flagged))
    return IntervalCalibration(method, coverage, ok, pooled.floor, review)


def choose_interval(truth: np.ndarray, score: np.ndarray, spread: np.ndarray, coverage: float = 0.8,
                    folds: int = 2, seed: int = 0, flagged: np.ndarray | None = None) -> tuple[IntervalCalibration, dict]:
    """Fit every method on all but one fold and measure it on that fold; keep the narrower one whose held-out
    coverage is nearest the nominal, refitted on all cases. Returns (calibration, the figures per method).

    With `flagged` (which results other QC checks flagged), each method is fitted per group (`fit_by_flag`)."""
    truth, score, spread = (np.asarray(a, float) for a in (truth, score, spread))
    flagged = np.zeros(len(truth), bool) if flagged is None else np.asarray(flagged, bool)
    order = np.random.default_rng(seed).permutation(len(truth))
    parts = np.array_split(order, folds)
    figures = {}
    for method in METHODS:
        covered, widths = [], []
        for k in range(folds):
            test = parts[k]
            train = np.concatenate([parts[j] for j in range(folds) if j != k])
            fitted = fit_by_flag(method, truth[train], score[train], spread[train], flagged[train], coverage)
            result = evaluate_interval(fitted, truth[test], score[test], spread[test], flagged[test])
            covered.append(result["coverage"] * len(test))
            widths.append(result["mean_width"] * len(test))
        figures[method] = {"held_out_coverage": float(sum(covered) / len(truth)),
                           "held_out_mean_width": float(sum(widths) / len(truth))}
    # the spread must earn its place: MC dropout is kept only when it narrows the interval by MIN_GAIN
    best = min(METHODS, key=lambda m: (abs(figures[m]["held_out_coverage"] - coverage) > 0.05,
                                       figures[m]["held_out_mean_width"] * (1.0 if m == METHODS[-1] else MIN_GAIN)))
    figures["chosen"] = best
    figures["flagged_cases"] = int(flagged.sum())
    return fit_by_flag(best, truth, score, spread, flagged, coverage), figures

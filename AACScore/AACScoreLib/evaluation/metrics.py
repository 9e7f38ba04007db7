"""Agreement statistics between AAC-24 scores (truth vs prediction, or rater vs rater) as in Shao et al. 2025.

Pure functions on numpy arrays: no files, no plots (those are in `evaluate`). Point estimates and bootstrap
replicates share one vectorised implementation (`_statistics`), so a CI is always of the same quantity.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Sequence

import numpy as np
from scipy import stats

from ..kauppila import CATEGORIES, MAX_TOTAL, category_index

SCORE_LABELS: tuple[int, ...] = tuple(range(MAX_TOTAL + 1))  # kappa category set: every AAC-24 total 0..24
CLINICAL_ERROR_LIMIT = 4.0  # the paper's "clinically acceptable" |error| < 4
BOOTSTRAP_STATISTICS: tuple[str, ...] = (
    "mae", "mse", "rmse", "pearson_r", "spearman_rho", "r2", "icc_2_1",
    "kappa_linear", "kappa_quadratic", "within_4",
)


def _as_pair(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Validate two paired score vectors: 1-D, equal length, finite, at least two cases."""
    x = np.asarray(a, dtype=float)
    y = np.asarray(b, dtype=float)
    if x.ndim != 1 or y.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"expected two 1-D arrays of equal length, got shapes {x.shape} and {y.shape}")
    if x.size < 2:
        raise ValueError(f"need at least 2 paired cases, got {x.size}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("scores contain NaN or infinite values")
    return x, y


def to_integer_scores(scores: np.ndarray, labels: Sequence[int] = SCORE_LABELS) -> np.ndarray:
    """Round (half to even, as kauppila.category does) and clip continuous scores onto the integer label range."""
    return np.clip(np.rint(np.asarray(scores, dtype=float)), min(labels), max(labels)).astype(int)


# ---------------------------------------------------------------- ICC(2,1)

def _as_table(ratings: np.ndarray) -> np.ndarray:
    x = np.asarray(ratings, dtype=float)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 2:
        raise ValueError(f"ratings must be an (n>=2 targets, k>=2 raters) table, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("ratings contain NaN or infinite values")
    return x


def anova_mean_squares(ratings: np.ndarray) -> dict[str, float]:
    """Two-way ANOVA mean squares of an (n targets, k raters) table: rows (MSR), columns (MSC), error (MSE),
    and the one-way within-target mean square (MSW), named as in McGraw & Wong (1996)."""
    return {name: float(value[0]) for name, value in _mean_squares(_as_table(ratings)[None]).items()}


def _mean_squares(x: np.ndarray) -> dict[str, np.ndarray]:
    """Mean squares for a batch of tables, shape (B, n, k)."""
    _, n, k = x.shape
    grand = x.mean(axis=(1, 2), keepdims=True)
    ss_rows = k * ((x.mean(axis=2, keepdims=True) - grand) ** 2).sum(axis=(1, 2))
    ss_cols = n * ((x.mean(axis=1, keepdims=True) - grand) ** 2).sum(axis=(1, 2))
    ss_total = ((x - grand) ** 2).sum(axis=(1, 2))
    ss_error = np.maximum(ss_total - ss_rows - ss_cols, 0.0)
    return {
        "MSR": ss_rows / (n - 1),
        "MSC": ss_cols / (k - 1),
        "MSE": ss_error / ((n - 1) * (k - 1)),
        "MSW": (ss_total - ss_rows) / (n * (k - 1)),
    }


def _icc_2_1_from(ms: dict[str, np.ndarray], n: int, k: int) -> np.ndarray:
    """ICC(2,1) = (MSR - MSE) / (MSR + (k-1) MSE + k (MSC - MSE) / n); NaN when every rating is equal."""
    msr, msc, mse = ms["MSR"], ms["MSC"], ms["MSE"]
    denominator = msr + (k - 1) * mse + k * (msc - mse) / n
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (msr - mse) / denominator, np.nan)


def icc_2_1(ratings: np.ndarray, confidence: float = 0.95) -> dict[str, float]:
    """Two-way random effects, absolute agreement, single rater ICC (Shrout & Fleiss ICC(2,1); McGraw & Wong
    ICC(A,1)) of an (n targets, k raters) table, with its F test against 0 and the McGraw & Wong (1996) CI."""
    x = _as_table(ratings)
    n, k = x.shape
    batch = _mean_squares(x[None])
    ms = {name: float(value[0]) for name, value in batch.items()}
    msr, msc, mse = ms["MSR"], ms["MSC"], ms["MSE"]
    icc = float(_icc_2_1_from(batch, n, k)[0])
    df1, df2 = n - 1, (n - 1) * (k - 1)
    # no variance at all (constant truth and prediction): F is 0/0, and so is its p value
    f_value = msr / mse if mse > 0 else (np.inf if msr > 0 else np.nan)
    p_value = float(stats.f.sf(f_value, df1, df2)) if np.isfinite(f_value) else (0.0 if f_value > 0 else np.nan)
    result = {"icc": icc, "f": float(f_value), "df1": df1, "df2": df2, "p": p_value,
              "ci_low": float("nan"), "ci_high": float("nan"), **ms}
    if np.isfinite(icc) and mse > 0 and icc < 1:
        # McGraw & Wong (1996), case 2A: Satterthwaite degrees of freedom for the denominator.
        alpha = 1.0 - confidence
        a = k * icc / (n * (1 - icc))
        b = 1 + k * icc * (n - 1) / (n * (1 - icc))
        v = (a * msc + b * mse) ** 2 / ((a * msc) ** 2 / (k - 1) + (b * mse) ** 2 / df2)
        f_upper = stats.f.ppf(1 - alpha / 2, df1, v)
        f_lower = stats.f.ppf(1 - alpha / 2, v, df1)
        rest = k * msc + (k * n - k - n) * mse
        result["ci_low"] = float(n * (msr - f_upper * mse) / (f_upper * rest + n * msr))
        result["ci_high"] = float(n * (f_lower * msr - mse) / (rest + n * f_lower * msr))
    return result


# ---------------------------------------------------------------- weighted kappa

def _confusion_batch(a: np.ndarray, b: np.ndarray, n_labels: int) -> np.ndarray:
    """Counts (B, L, L) of label pairs for a batch of integer label rows (B, n) already in 0..L-1."""
    batch = np.arange(a.shape[0])[:, None] * n_labels * n_labels
    flat = (batch + a * n_labels + b).ravel()
    return np.bincount(flat, minlength=a.shape[0] * n_labels * n_labels).reshape(a.shape[0], n_labels, n_labels)


def _kappa_from_counts(counts: np.ndarray, weights: str) -> np.ndarray:
    """Cohen's weighted kappa 1 - sum(w O) / sum(w E) for a batch of (L, L) count tables."""
    n_labels = counts.shape[-1]
    i, j = np.indices((n_labels, n_labels))
    w = np.abs(i - j) if weights == "linear" else (i - j) ** 2
    observed = counts / counts.sum(axis=(1, 2), keepdims=True)
    expected = observed.sum(axis=2)[:, :, None] * observed.sum(axis=1)[:, None, :]
    disagreement_expected = (w * expected).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(disagreement_expected > 0,
                        1.0 - (w * observed).sum(axis=(1, 2)) / disagreement_expected, np.nan)


def weighted_kappa(rater_a: Sequence[float], rater_b: Sequence[float], weights: str = "linear",
                   labels: Sequence[int] = SCORE_LABELS) -> float:
    """Cohen's linearly or quadratically weighted kappa on integer scores; inputs are rounded and clipped to
    `labels` (default every AAC-24 total 0..24, so the weights do not depend on which scores happen to occur)."""
    if weights not in ("linear", "quadratic"):
        raise ValueError(f"weights must be 'linear' or 'quadratic', got {weights!r}")
    x, y = _as_pair(rater_a, rater_b)
    low = min(labels)
    a = to_integer_scores(x, labels) - low
    b = to_integer_scores(y, labels) - low
    return float(_kappa_from_counts(_confusion_batch(a[None], b[None], len(labels)), weights)[0])


def agreement(rater_a: Sequence[float], rater_b: Sequence[float],
              labels: Sequence[int] = SCORE_LABELS) -> dict[str, float]:
    """Agreement of two raters (or a model and a rater) on the same cases: ICC(2,1) with its CI and p value,
    linear and quadratic weighted kappa on the integer scale `labels`, and the exact-agreement rate."""
    x, y = _as_pair(rater_a, rater_b)
    icc = icc_2_1(np.column_stack([x, y]))
    return {
        "n": int(x.size),
        "icc_2_1": icc["icc"],
        "icc_ci_low": icc["ci_low"],
        "icc_ci_high": icc["ci_high"],
        "icc_p": icc["p"],
        "kappa_linear": weighted_kappa(x, y, "linear", labels),
        "kappa_quadratic": weighted_kappa(x, y, "quadratic", labels),
        "exact_agreement": float(np.mean(to_integer_scores(x, labels) == to_integer_scores(y, labels))),
        "mean_difference": float(np.mean(y - x)),
    }


# ---------------------------------------------------------------- severity categories

def confusion_matrix(truth: Sequence[float], pred: Sequence[float]) -> np.ndarray:
    """3x3 counts of (truth category, predicted category): rows truth, columns prediction, order CATEGORIES."""
    t = np.array([category_index(s) for s in truth], dtype=int)
    p = np.array([category_index(s) for s in pred], dtype=int)
    return _confusion_batch(t[None], p[None], len(CATEGORIES))[0]


def wilson_interval(successes: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (the paper's Table 5 intervals match it); NaN for total 0."""
    if total == 0:
        return float("nan"), float("nan")
    z = stats.norm.ppf(0.5 + confidence / 2)
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * np.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return float(max(centre - half, 0.0)), float(min(centre + half, 1.0))


def _proportion(successes: int, total: int) -> dict[str, float]:
    low, high = wilson_interval(successes, total)
    value = successes / total if total else float("nan")
    return {"value": value, "ci_low": low, "ci_high": high, "successes": int(successes), "total": int(total)}


def category_metrics(matrix: np.ndarray) -> dict:
    """Overall accuracy and, per category (one versus the rest), sensitivity, specificity, PPV, NPV and accuracy,
    each with counts and a 95% Wilson interval."""
    m = np.asarray(matrix, dtype=int)
    total = int(m.sum())
    per_class = {}
    for index, name in enumerate(CATEGORIES):
        tp = int(m[index, index])
        fn = int(m[index].sum()) - tp
        fp = int(m[:, index].sum()) - tp
        tn = total - tp - fn - fp
        per_class[name] = {
            "n_truth": tp + fn,
            "sensitivity": _proportion(tp, tp + fn),
            "specificity": _proportion(tn, tn + fp),
            "ppv": _proportion(tp, tp + fp),
            "npv": _proportion(tn, tn + fn),
            "accuracy": _proportion(tp + tn, total),
        }
    return {"matrix": m.tolist(), "labels": list(CATEGORIES),
            "accuracy": _proportion(int(np.trace(m)), total), "per_class": per_class}


# ---------------------------------------------------------------- continuous scores and bootstrap

def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    denominator = np.sqrt((xc * xc).sum(axis=1) * (yc * yc).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (xc * yc).sum(axis=1) / denominator, np.nan)


def _statistics(truth: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    """Every bootstrapped statistic for a batch of paired rows (B, n): one value per row."""
    n = truth.shape[1]
    error = pred - truth
    squared = (error ** 2).mean(axis=1)
    ss_total = ((truth - truth.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = np.where(ss_total > 0, 1.0 - (error ** 2).sum(axis=1) / ss_total, np.nan)
    a = to_integer_scores(truth)
    b = to_integer_scores(pred)
    counts = _confusion_batch(a, b, len(SCORE_LABELS))
    return {
        "mae": np.abs(error).mean(axis=1),
        "mse": squared,
        "rmse": np.sqrt(squared),
        "pearson_r": _pearson_rows(truth, pred),
        "spearman_rho": _pearson_rows(stats.rankdata(truth, axis=1), stats.rankdata(pred, axis=1)),
        "r2": r2,
        "icc_2_1": _icc_2_1_from(_mean_squares(np.stack([truth, pred], axis=2)), n, 2),
        "kappa_linear": _kappa_from_counts(counts, "linear"),
        "kappa_quadratic": _kappa_from_counts(counts, "quadratic"),
        "within_4": (np.abs(error) < CLINICAL_ERROR_LIMIT).mean(axis=1),
    }


def bootstrap_intervals(truth: Sequence[float], pred: Sequence[float], resamples: int = 1000, seed: int = 0,
                        confidence: float = 0.95, chunk: int = 200) -> dict[str, dict[str, float]]:
    """Percentile bootstrap CIs from resampling cases with replacement (seeded, so reproducible).

    Replicates where a statistic is undefined (e.g. a constant resample for a correlation) are left out and
    counted in `valid`. Note: the paper's CIs come from retraining the model on resampled training sets; these
    only reflect which test cases happened to be drawn.
    """
    x, y = _as_pair(truth, pred)
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    rng = np.random.default_rng(seed)
    values: dict[str, list[np.ndarray]] = {name: [] for name in BOOTSTRAP_STATISTICS}
    for start in range(0, resamples, chunk):
        index = rng.integers(0, x.size, size=(min(chunk, resamples - start), x.size))
        for name, batch in _statistics(x[index], y[index]).items():
            values[name].append(batch)
    tail = 100 * (1 - confidence) / 2
    intervals = {}
    for name, parts in values.items():
        replicate = np.concatenate(parts)
        replicate = replicate[np.isfinite(replicate)]
        low, high = (np.percentile(replicate, [tail, 100 - tail]) if replicate.size else (np.nan, np.nan))
        intervals[name] = {"ci_low": float(low), "ci_high": float(high), "valid": int(replicate.size)}
    return intervals


def evaluate_scores(truth: np.ndarray, pred: np.ndarray, bootstrap: int = 1000, seed: int = 0) -> dict:
    """The paper's statistics for AAC-24 totals: errors, correlations (with p values), R², ICC(2,1), weighted
    kappas, the |error| < 4 rate, the 3-class confusion matrix, and bootstrap 95% CIs (0 resamples: none)."""
    x, y = _as_pair(truth, pred)
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be 0 (no CIs) or more, got {bootstrap}")
    point = {name: float(value[0]) for name, value in _statistics(x[None], y[None]).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        pearson = stats.pearsonr(x, y)
        spearman = stats.spearmanr(x, y)
    icc = icc_2_1(np.column_stack([x, y]))
    intervals = bootstrap_intervals(x, y, bootstrap, seed) if bootstrap > 0 else {}
    scalars = {name: {"value": point[name], **intervals.get(name, {})} for name in BOOTSTRAP_STATISTICS}
    scalars["pearson_r"]["p"] = float(pearson.pvalue)
    scalars["spearman_rho"]["p"] = float(spearman.pvalue)
    scalars["icc_2_1"].update(p=icc["p"], f=icc["f"], analytic_ci_low=icc["ci_low"], analytic_ci_high=icc["ci_high"])
    bias, sd = float(np.mean(y - x)), float(np.std(y - x, ddof=1))
    return {
        "n": int(x.size),
        "metrics": scalars,
        "bias": {"mean_difference": bias, "sd_difference": sd,  # Bland-Altman limits of agreement
                 "loa_low": bias - 1.96 * sd, "loa_high": bias + 1.96 * sd},
        "categories": category_metrics(confusion_matrix(x, y)),
        "bootstrap": {"resamples": int(bootstrap), "seed": int(seed), "method": "percentile, resampling cases"},
    }


# ---------------------------------------------------------------- segmentation

def dice_per_label(truth: np.ndarray, pred: np.ndarray, labels: Iterable[int] = (1, 2, 3, 4, 5)) -> dict[int, float]:
    """Dice 2|A∩B| / (|A|+|B|) of each label between two label maps of equal shape; NaN where both lack it."""
    t = np.asarray(truth)
    p = np.asarray(pred)
    if t.shape != p.shape:
        raise ValueError(f"label maps differ in shape: {t.shape} and {p.shape}")
    result = {}
    for label in labels:
        a, b = t == label, p == label
        size = int(a.sum()) + int(b.sum())
        result[int(label)] = 2.0 * int(np.logical_and(a, b).sum()) / size if size else float("nan")
    return result

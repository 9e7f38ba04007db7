"""Kauppila AAC-24 rules: wall subscores from calcified length, the total, and the severity category."""

from __future__ import annotations

from typing import Mapping, Sequence

VERTEBRAE: tuple[str, ...] = ("L1", "L2", "L3", "L4", "L5")
# Context classes of label maps beside L1..L5 = 1..5: T12 above and S1 (the top sacral segment) below, where in view.
CONTEXT_LABELS: dict[str, int] = {"T12": 6, "S1": 7}
SCORED_LEVELS: tuple[str, ...] = ("L1", "L2", "L3", "L4")
WALLS: tuple[str, ...] = ("A", "P")  # anterior and posterior aortic wall
SUBSCORE_COLUMNS: tuple[str, ...] = tuple(f"{level}{wall}" for level in SCORED_LEVELS for wall in WALLS)
MAX_TOTAL = 24

CATEGORIES: tuple[str, ...] = ("no/mild", "moderate", "severe")
CATEGORY_RANGES: dict[str, tuple[int, int]] = {"no/mild": (0, 4), "moderate": (5, 15), "severe": (16, 24)}
CATEGORY_COLORS: dict[str, str] = {"no/mild": "#2e7d32", "moderate": "#f9a825", "severe": "#c62828"}


def wall_subscore(calcified_fraction: float) -> int:
    """Subscore of one aortic wall in one segment from the fraction of its length that is calcified.

    0 none, 1 below 1/3, 2 from 1/3 up to and including 2/3, 3 above 2/3 (Kauppila 1997; Shao et al. 2025).
    """
    if not 0.0 <= calcified_fraction <= 1.0 + 1e-9:
        raise ValueError(f"calcified fraction must lie in [0, 1], got {calcified_fraction}")
    if calcified_fraction <= 0.0:
        return 0
    if calcified_fraction < 1.0 / 3.0:
        return 1
    if calcified_fraction <= 2.0 / 3.0:
        return 2
    return 3


def total_score(subscores: Mapping[str, int] | Sequence[int]) -> int:
    """AAC-24 total of the eight wall subscores (given as a mapping by column name or in SUBSCORE_COLUMNS order)."""
    values = [subscores[c] for c in SUBSCORE_COLUMNS] if isinstance(subscores, Mapping) else list(subscores)
    if len(values) != len(SUBSCORE_COLUMNS):
        raise ValueError(f"expected {len(SUBSCORE_COLUMNS)} subscores, got {len(values)}")
    for value in values:
        if value not in (0, 1, 2, 3):
            raise ValueError(f"a wall subscore must be 0, 1, 2 or 3, got {value}")
    return int(sum(values))


def category(score: float) -> str:
    """Severity category of an AAC-24 total; a model's continuous score is rounded to the nearest integer first."""
    if score != score:  # NaN
        raise ValueError("score is NaN")
    rounded = int(round(min(max(float(score), 0.0), float(MAX_TOTAL))))
    for name, (low, high) in CATEGORY_RANGES.items():
        if low <= rounded <= high:
            return name
    raise AssertionError("unreachable: the ranges cover 0..24")


def category_index(score: float) -> int:
    """0, 1 or 2 for no/mild, moderate, severe (for confusion matrices and weighted kappa)."""
    return CATEGORIES.index(category(score))

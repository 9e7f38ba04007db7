"""Kauppila AAC-24 rules."""

from __future__ import annotations

import pytest

from AACScoreLib import kauppila


@pytest.mark.parametrize(
    "fraction, expected",
    [(0.0, 0), (0.01, 1), (0.333, 1), (1 / 3, 2), (0.5, 2), (2 / 3, 2), (0.667, 3), (1.0, 3)],
)
def test_wall_subscore_thresholds(fraction, expected):
    assert kauppila.wall_subscore(fraction) == expected


@pytest.mark.parametrize("fraction", [-0.1, 1.2])
def test_wall_subscore_rejects_impossible_fractions(fraction):
    with pytest.raises(ValueError):
        kauppila.wall_subscore(fraction)


def test_total_from_mapping_or_sequence():
    subscores = dict(zip(kauppila.SUBSCORE_COLUMNS, [3, 3, 2, 2, 1, 1, 0, 0]))
    assert kauppila.total_score(subscores) == 12
    assert kauppila.total_score([3] * 8) == kauppila.MAX_TOTAL
    with pytest.raises(ValueError):
        kauppila.total_score([4] + [0] * 7)
    with pytest.raises(ValueError):
        kauppila.total_score([1] * 7)


@pytest.mark.parametrize(
    "score, name",
    [(0, "no/mild"), (4, "no/mild"), (4.4, "no/mild"), (4.6, "moderate"), (5, "moderate"), (15, "moderate"),
     (16, "severe"), (24, "severe"), (-1.0, "no/mild"), (30, "severe")],
)
def test_categories(score, name):
    assert kauppila.category(score) == name
    assert kauppila.category_index(score) == kauppila.CATEGORIES.index(name)


def test_subscore_columns_are_in_paper_order():
    assert kauppila.SUBSCORE_COLUMNS == ("L1A", "L1P", "L2A", "L2P", "L3A", "L3P", "L4A", "L4P")

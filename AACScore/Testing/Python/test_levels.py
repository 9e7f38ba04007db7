"""Level counting on constructed network outputs: from T12 above, from S1 below, both, disagreeing, neither."""

from __future__ import annotations

import numpy as np
import pytest

from AACScoreLib.kauppila import VERTEBRAE
from AACScoreLib.segmentation.levels import LevelAssignment, count_levels, flag_doubtful

WITH_CONTEXT = VERTEBRAE + ("T12", "S1")
VALUE = {"T12": 6, **{name: i + 1 for i, name in enumerate(VERTEBRAE)}, "S1": 7}


def spine(bodies, classes=WITH_CONTEXT, heights=None):
    """Softmax-like output (background, classes) for bodies stacked top to bottom, and the true label map.

    Each body is (true level or None, what the network says): a class name (certain) or {class: P(class | body)}.
    Heights grow down the spine unless given, as lumbar bodies do."""
    heights = heights or [10 + i for i in range(len(bodies))]
    probabilities = np.zeros((1 + len(classes), 20 + sum(h + 5 for h in heights), 40))
    probabilities[0] = 1.0
    truth = np.zeros(probabilities.shape[1:], np.uint8)
    row = 10
    for (level, said), height in zip(bodies, heights):
        said = {said: 1.0} if isinstance(said, str) else said
        rows = slice(row, row + height)
        probabilities[0, rows, 10:30] = 0.05
        for name, p in said.items():
            probabilities[1 + classes.index(name), rows, 10:30] = 0.95 * p
        truth[rows, 10:30] = VALUE[level] if level in classes else 0
        row += height + 5
    return probabilities, truth


def certain(levels):
    return [(level, level) for level in levels]


def unsure(levels, classes):
    """Bodies the network gives only 45% to their true level (the rest spread): no landmark among them."""
    return [(level, {level: 0.45, **{other: 0.55 / 4 for other in classes[:5] if other != level}})
            for level in levels]


def test_both_context_bodies_agree():
    probabilities, truth = spine(certain(["T12", "L1", "L2", "L3", "L4", "L5", "S1"]))
    levels, how = count_levels(probabilities, WITH_CONTEXT)
    assert np.array_equal(levels, truth)
    assert (how.method, how.from_above, how.from_below, how.agree) == ("T12+S1", "T12", "S1", True)
    assert not how.doubtful and how.reasons == () and how.confidence > 0.9 and how.sizes_progress
    assert how.summary() == "T12/S1 agree"


def test_context_above_only_counts_down_from_t12():
    # sacrum cut off and L5 unclear to the network (the DXA case): T12 fixes the count
    bodies = [("T12", "T12")] + certain(["L1", "L2", "L3", "L4"]) + [("L5", {"L4": 0.55, "L5": 0.45})]
    probabilities, truth = spine(bodies)
    levels, how = count_levels(probabilities, WITH_CONTEXT)
    assert np.array_equal(levels, truth)
    assert (how.method, how.from_above, how.from_below, how.agree) == ("T12", "T12", None, None)
    assert not how.doubtful
    assert how.summary() == "T12; from above: T12, from below: none"


def test_context_below_only_counts_up_from_s1():
    # the top of the image cuts T12 off and the network is unsure of every lumbar level, but S1 is clear
    bodies = unsure(VERTEBRAE, VERTEBRAE)
    bodies += [("S1", "S1")]
    probabilities, truth = spine(bodies)
    levels, how = count_levels(probabilities, WITH_CONTEXT)
    assert np.array_equal(levels, truth)
    assert (how.method, how.from_above, how.from_below, how.agree) == ("S1", None, "S1", None)
    assert not how.doubtful


def test_disagreeing_counts_are_doubtful_and_take_the_better_fit():
    # six lumbar-type bodies between T12 and S1 (a transitional vertebra): the two counts differ by one
    bodies = certain(["T12", "L1", "L2", "L3", "L4", "L5"]) + [(None, "L5"), ("S1", "S1")]
    probabilities, truth = spine(bodies)
    levels, how = count_levels(probabilities, WITH_CONTEXT)
    assert (how.from_above, how.from_below, how.agree, how.method) == ("T12", "S1", False, "T12")
    assert how.doubtful and "disagree by 1" in how.reasons[0] and how.confidence <= 0.5
    assert how.summary() == "T12/S1 disagree"
    lumbar = np.where(truth <= 5, truth, 0)
    assert np.array_equal(np.where(levels <= 5, levels, 0), lumbar)  # counted down from T12, as the network fits


def test_both_landmarks_wrong_take_the_count_the_networks_levels_fit_best():
    # the network calls the top lumbar body T12 and the lowest S1 (as on the held-out family): the counts from
    # T12 (L1 one body lower) and from S1 (L1 one body higher) are both wrong; its L2..L4 fix the count
    bodies = ([("L1", {"T12": 0.55, "L1": 0.45})] + certain(["L2", "L3", "L4"])
              + [("L5", {"S1": 0.55, "L5": 0.45})])
    probabilities, truth = spine(bodies)
    levels, how = count_levels(probabilities, WITH_CONTEXT)
    assert np.array_equal(levels, truth)
    assert (how.from_above, how.from_below, how.agree, how.method) == ("T12", "S1", False, "fit")
    assert how.doubtful and "disagree by 2" in how.reasons[0] and "took neither" in how.reasons[0]
    assert how.summary() == "T12/S1 disagree"


def test_neither_landmark_falls_back_to_ordering_and_is_doubtful():
    bodies = unsure(VERTEBRAE, VERTEBRAE)
    probabilities, truth = spine(bodies, classes=VERTEBRAE)
    levels, how = count_levels(probabilities, VERTEBRAE)
    assert np.array_equal(levels, truth)
    assert (how.method, how.from_above, how.from_below, how.agree) == ("ordering", None, None, None)
    assert how.doubtful and how.summary() == "ordering"


def test_model_without_context_counts_from_its_l1_and_l5():
    probabilities, truth = spine(certain(VERTEBRAE) + [(None, {"L5": 0.4, "L4": 0.3, "L3": 0.3})],
                                 classes=VERTEBRAE)
    levels, how = count_levels(probabilities, VERTEBRAE)
    assert np.array_equal(levels, truth)  # the extra body below is left out: no context class to put it in
    assert (how.method, how.agree) == ("L1+L5", True) and not how.doubtful


def test_network_calling_t12_l1_disagrees_with_its_own_l5():
    # T12 looks like L1 to a model without context classes: counting from its L1 and its L5 differ
    bodies = [(None, {"L1": 0.6, "L2": 0.4}), ("L1", {"L1": 0.6, "L2": 0.4}), ("L2", "L2"), ("L3", "L3"),
              ("L4", "L4"), ("L5", "L5")]
    probabilities, truth = spine(bodies, classes=VERTEBRAE)
    levels, how = count_levels(probabilities, VERTEBRAE)
    assert np.array_equal(levels, truth)
    assert (how.from_above, how.from_below, how.agree, how.method) == ("L1", "L5", False, "L5")
    assert how.doubtful


def test_bodies_shrinking_downwards_make_a_count_without_context_doubtful():
    probabilities, _ = spine(certain(VERTEBRAE), classes=VERTEBRAE, heights=[16, 15, 13, 11, 10])
    _, how = count_levels(probabilities, VERTEBRAE)
    assert how.agree and how.sizes_progress is False and how.doubtful
    assert "not larger" in how.reasons[0] and how.summary().endswith("sizes do not grow downwards")


def barely(levels, classes):
    """Bodies the network gives only 30% to their true level."""
    return [(level, {level: 0.3, **{other: 0.7 / 4 for other in classes[:5] if other != level}}) for level in levels]


def test_counting_from_the_networks_own_l1_alone_is_doubtful():
    bodies = [("L1", {"L1": 0.55, "L2": 0.45})] + barely(VERTEBRAE[1:], VERTEBRAE)
    probabilities, truth = spine(bodies, classes=VERTEBRAE)
    levels, how = count_levels(probabilities, VERTEBRAE)
    assert np.array_equal(levels, truth)
    assert (how.method, how.from_above, how.from_below) == ("L1", "L1", None)
    assert how.doubtful and "network's own L1 alone" in how.reasons[0]


def test_a_landmark_the_networks_levels_barely_fit_is_doubtful():
    bodies = [("T12", {"T12": 0.55, "L1": 0.45})] + barely(VERTEBRAE, WITH_CONTEXT)
    probabilities, truth = spine(bodies)
    levels, how = count_levels(probabilities, WITH_CONTEXT)
    assert np.array_equal(levels, truth)
    assert (how.method, how.from_above, how.from_below) == ("T12", "T12", None)
    assert how.confidence < 0.5 and how.doubtful and "fit the count poorly" in how.reasons[-1]


def test_nothing_found_gives_no_assignment():
    levels, how = count_levels(spine([], classes=VERTEBRAE)[0], VERTEBRAE)
    assert how is None and not levels.any()


@pytest.mark.parametrize("how, doubtful", [
    (LevelAssignment("T12+S1", "T12", "S1", True, 0.9), False),
    (LevelAssignment("S1", "L1", "S1", False, 0.4), True),
    (LevelAssignment("S1", None, "S1", None, 0.8, sizes_progress=False), False),
    (LevelAssignment("L5", None, "L5", None, 0.8, sizes_progress=False), True),
    (LevelAssignment("L5", None, "L5", None, 0.9), True),  # the network's own L5 alone: nothing checks it
    (LevelAssignment("pixels", None, None, None, 0.3), True),
    (LevelAssignment("T12+S1", "T12", "S1", True, 0.45), True),  # landmarks the network's levels barely fit
])
def test_doubtful_rule(how, doubtful):
    assert how.doubtful == doubtful


def test_a_doubtful_count_turns_ok_into_warning_with_reasons():
    agreed = LevelAssignment("T12+S1", "T12", "S1", True, 0.95)
    disagreed = LevelAssignment("S1", "T12", "S1", False, 0.4,
                                ("counting from T12 and from S1 disagree by 1 level(s)",))
    assert flag_doubtful("ok", "", agreed) == ("ok", "")
    assert flag_doubtful("ok", "", None) == ("ok", "")
    assert flag_doubtful("ok", "", disagreed) == ("warning", "levels doubtful: counting from T12 and from S1 "
                                                             "disagree by 1 level(s)")
    assert flag_doubtful("warning", "L2 merged", disagreed)[1].startswith("L2 merged; levels doubtful")
    assert flag_doubtful("error", "L5 not found", disagreed) == ("error", "L5 not found")


def test_a_small_t12_joined_to_l1_is_parted_by_its_height():
    """T12 half an L1's height, joined to L1 by a bridge across the disc: the piece is under 1.6 typical bodies'
    area (not parted by area) but as tall as two bodies, so it is parted where the network's classes change."""
    probabilities = np.zeros((1 + len(WITH_CONTEXT), 150, 40))
    probabilities[0] = 1.0
    truth = np.zeros((150, 40), np.uint8)
    row = 10
    for name, height in [("T12", 6)] + [(name, 14) for name in VERTEBRAE]:
        rows = slice(row, row + height)
        probabilities[0, rows, 10:30] = 0.05
        probabilities[1 + WITH_CONTEXT.index(name), rows, 10:30] = 0.95
        truth[rows, 10:30] = VALUE[name]
        row += height + 6
    bridge = np.zeros((150, 40), bool)
    bridge[16:22, 19:21] = True  # across the T12-L1 disc
    probabilities[:, bridge] = probabilities[:, 12, 20][:, None]  # T12's values
    foreground = probabilities[0] < 0.5
    joined_area, body_area = (foreground[:36]).sum(), 14 * 20
    assert 1.2 < joined_area / body_area < 1.6  # the area rule alone would keep it whole

    levels, how = count_levels(probabilities, WITH_CONTEXT)
    lumbar = (truth >= 1) & (truth <= 5)
    assert np.array_equal(levels[lumbar], truth[lumbar])
    assert how.from_above == "T12" and how.parted == 1 and how.doubtful

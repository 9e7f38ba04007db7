"""Are the levels right? How the segmenter fixed them, and whether a second look at the image agrees.

Two checks: (1) the segmenter's own account of its level counting (`LevelAssignment`: counts from above and from
below, whether they agree, how sure it is), flagged when the counts disagree or only the order of the bodies was
available; (2) one more network pass on the left-right mirrored working image, whose per-pixel levels are compared
with the result's label map (Dice per vertebra on the working grid). A level shift or a body the network is unsure
of gives a low Dice; a user's label map whose levels differ from what the segmenter sees gets the same flag.
"""

from __future__ import annotations

import numpy as np

from ..kauppila import VERTEBRAE
from .verdict import Reason

MIN_FLIP_DICE = 0.6  # below this for any vertebra, the second look disagrees with the label map
ORDER_ONLY_METHODS = ("ordering", "pixels")  # segmentation.levels: no landmark, the bodies' order alone


def level_counting_reasons(levels) -> list[Reason]:
    """Reasons from the segmenter's `LevelAssignment` (segmentation/levels.py, which decides when a count is
    doubtful); none for a user's label map (None)."""
    if levels is None or not levels.doubtful:
        return []
    notes = "; ".join(levels.reasons)
    if levels.agree is False:
        return [Reason("levels_disagree", f"counting from above ({levels.from_above}) and from below "
                                          f"({levels.from_below}) give different levels")]
    if levels.method in ORDER_ONLY_METHODS:
        return [Reason("levels_order_only", "levels fixed only by the order of the bodies: neither the sacrum nor "
                                            "T12 anchored the count")]
    if levels.parted:
        return [Reason("bodies_parted", f"{levels.parted} segmented piece(s) held two vertebral bodies joined across "
                                        "a disc and were parted before the levels were counted: check the levels")]
    return [Reason("levels_uncertain", f"level count {levels.summary()}, confidence {levels.confidence:.2f}"
                                       + (f" ({notes})" if notes else ""))]


def flip_dice(segmenter, radiograph, labels: np.ndarray, shape: tuple[int, int] | None = None,
              turns: int | None = None) -> dict[str, float]:
    """Dice per vertebra between `labels` and the segmenter's per-pixel levels on the mirrored working image.

    The second look is taken as the segmentation was: the image turned upright by the segmentation's `turns` (for
    a user's labels, None: as the segmenter would turn it), on the working grid `shape` the segmentation ran on (an
    unknown spacing is found from the bodies' size, so the spacing alone would give another scale); without `shape`,
    the grid the spacing gives, as for a user's labels."""
    from ..segmentation.dataset import to_working_image, working_shape
    from ..segmentation.segmenter import turned

    turns = segmenter.turns_to_upright(radiograph)[0] if turns is None else turns
    radiograph, labels = turned(radiograph, turns), np.rot90(labels, turns)
    if shape is None:
        shape, _ = working_shape(radiograph.pixels.shape, radiograph.spacing, segmenter.working_spacing,
                                 segmenter.default_long_side)
    image = to_working_image(radiograph, shape, segmenter.window)
    logits = segmenter.predict_logits(np.ascontiguousarray(image[:, ::-1]))
    channels = segmenter.ordered_channels(logits)[: 1 + len(VERTEBRAE)]  # background, L1..L5 (context left out)
    second = channels.argmax(0).numpy()[:, ::-1]
    return dice_per_vertebra(nearest_resample(labels, second.shape), second)


def nearest_resample(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The label at each target pixel's centre (cheap; enough for a Dice on a coarse grid)."""
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * labels.shape[0] / shape[0]).astype(int), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * labels.shape[1] / shape[1]).astype(int), labels.shape[1] - 1)
    return labels[np.ix_(rows, cols)]


def dice_per_vertebra(first: np.ndarray, second: np.ndarray) -> dict[str, float]:
    out = {}
    for value, name in enumerate(VERTEBRAE, start=1):
        a, b = first == value, second == value
        total = int(a.sum()) + int(b.sum())
        out[name] = 2.0 * int((a & b).sum()) / total if total else 1.0
    return out


def flip_reasons(dice: dict[str, float], labels_source: str) -> list[Reason]:
    worst = min(dice, key=dice.get)
    if dice[worst] >= MIN_FLIP_DICE:
        return []
    listing = ", ".join(f"{name} {value:.2f}" for name, value in dice.items() if value < MIN_FLIP_DICE)
    if labels_source == "user":
        return [Reason("levels_differ_from_segmenter", f"the segmenter sees other levels than the label map given "
                                                       f"(Dice {listing})")]
    return [Reason("segmenter_unstable", f"the segmentation changes when the image is mirrored (Dice {listing})")]

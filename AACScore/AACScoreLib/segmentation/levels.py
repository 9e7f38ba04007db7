"""Which vertebral body is L1..L5: counted from whatever is in view, and saying how it was counted.

Why: a segmenter that sees five bright blocks can label them perfectly and still be one level off (the top of
the sacrum taken for L5, T12 for L1). Readers fix the levels from landmarks and count; this module does the same
with the network's output on the working grid:

- the vertebral bodies are the connected pieces of the network's foreground, ordered down the spine;
- counting from below: the body the network finds most like S1 (a context class, the top of the sacrum) makes
  the body above it L5; without S1 in view, the body most like L5 is L5;
- counting from above: the body most like T12 (context class) makes the body below it L1; without it, the body
  most like L1 is L1;
- when both counts exist they must agree; when they disagree, one landmark at least is wrong (maybe both), so the
  count the network's own per-body levels fit best is taken, whichever body it puts L1 at, and the result is
  doubtful;
- body size progression (lumbar bodies grow downwards: the lower two larger than the upper two) checks the
  chosen count, since the top of the sacrum taken for L5 makes the lowest "lumbar" bodies shrink;
- with no landmark at all, the five consecutive bodies that best fit the network's levels are taken
  ("ordering"), which is doubtful.
The lowest rib-bearing vertebra and the iliac crest are not used: the segmenter has no class for ribs or the
ilium, so neither can be located from its output.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from ..kauppila import CONTEXT_LABELS, VERTEBRAE

ANCHOR_PROBABILITY = 0.5  # a body is a landmark when its mean P(class | vertebra) reaches this
MIN_CONFIDENCE = 0.5  # below this a count is doubtful (on the training families, sound counts score above 0.65)
SIZE_RATIO_MIN = 0.95  # mean area of the lower two lumbar bodies / the upper two, below which the count is doubted
MIN_FRACTION, MAX_RATIO = 0.2, 3.0  # pieces this far from a typical body's area are specks or borders, not bodies
JOINED_RATIO = 1.6  # a piece this many times a typical body's area is tried as two bodies joined across a disc
TALL_RATIO, TALL_JOINED_RATIO = 1.4, 1.2  # ... and one this many times the median body's height along the spine,
# from this many times a typical body's area (a small T12 joined to L1, or the top of the sacrum to L5)
PART_FRACTION = 0.35  # each part of a split piece must hold this share of a typical body's area
MAX_EROSION = 6  # working-grid pixels eroded at most to part two joined bodies (a body is about 25 across)
LIKELIHOOD_FLOOR = 1e-3  # added to a body's probability of a level, so one zero does not veto a count
_POSITION = {"T12": 0, **{name: i + 1 for i, name in enumerate(VERTEBRAE)}, "S1": len(VERTEBRAE) + 1}


@dataclass(frozen=True)
class LevelAssignment:
    """How L1..L5 were fixed. `method`: the landmarks the chosen count rests on, joined by '+' ('T12+S1', 'S1',
    'L1+L5', ...; T12/S1 are context bodies, L1/L5 the network's own most-L1/L5-like body), 'fit' (the counts
    disagreed and the network's levels fit neither best), 'ordering' (no landmark) or 'pixels' (the network's
    per-pixel levels, when counting bodies failed). `from_above` /
    `from_below`: the landmark each count started from (None: none in view); `agree`: whether the two counts
    gave the same levels (None unless both exist); `confidence` in [0, 1]: the mean of the landmark's probability
    and of the network's probability for each assigned level, scaled down for one-sided (x0.85), disagreeing
    (x0.5) or landmark-free (x0.4) counts and for sizes that do not grow downwards (x0.7); `reasons`: what makes
    the count doubtful, in short sentences (empty when nothing does)."""

    method: str
    from_above: str | None
    from_below: str | None
    agree: bool | None
    confidence: float
    reasons: tuple[str, ...] = ()
    sizes_progress: bool | None = None  # lower lumbar bodies larger than the upper ones (None: not measurable)
    parted: int = 0  # foreground pieces parted into the bodies they joined before counting (_split_joined)

    @property
    def doubtful(self) -> bool:
        """True when the levels should be looked at: counts disagree, no landmark was used, the count rests on
        the network's own L1 or L5 alone (nothing checks it), the confidence is low, (without a context
        landmark) the body sizes contradict the count, or bodies joined across a disc had to be parted."""
        no_context = not {"T12", "S1"} & set(self.method.split("+"))
        return (self.agree is False or self.method in ("ordering", "pixels", "L1", "L5") or self.parted > 0
                or self.confidence < MIN_CONFIDENCE or (self.sizes_progress is False and no_context))

    def with_parted(self, pieces: int) -> "LevelAssignment":
        """This count, noting that `pieces` foreground pieces held two bodies each and were parted (a repair)."""
        return replace(self, parted=self.parted + pieces, reasons=self.reasons + (
            f"{pieces} piece(s) held two bodies joined across a disc and were parted",))

    def summary(self) -> str:
        """One short cell for results.csv: 'T12/S1 agree', 'L1/L5 disagree', 'S1; from above: none, from below:
        S1', 'ordering', with '; sizes do not grow downwards' when they do not and '; joined bodies parted (N)'
        when pieces were parted."""
        if self.agree is None:
            sides = f"from above: {self.from_above or 'none'}, from below: {self.from_below or 'none'}"
            text = self.method if self.method in ("ordering", "pixels") else f"{self.method}; {sides}"
        else:
            text = f"{self.from_above}/{self.from_below} {'agree' if self.agree else 'disagree'}"
        return (text + ("; sizes do not grow downwards" if self.sizes_progress is False else "")
                + (f"; joined bodies parted ({self.parted})" if self.parted else ""))


@dataclass
class _Bodies:
    """The connected foreground pieces taken for vertebral bodies, ordered down the spine."""

    pieces: np.ndarray  # int piece map on the working grid
    ids: list[int]  # piece id of each body, top to bottom
    given: np.ndarray  # (bodies, classes): mean P(class | vertebra) over each body
    areas: np.ndarray  # pixels
    parted: int  # pieces parted into the bodies they joined


def _find_bodies(probabilities: np.ndarray, classes: Sequence[str]) -> _Bodies | None:
    from scipy import ndimage

    pieces, count = ndimage.label(probabilities[0] < 0.5, structure=np.ones((3, 3), bool))
    if count == 0:
        return None
    sizes = np.bincount(pieces.ravel())[1:]
    reference = np.median(np.sort(sizes)[-len(VERTEBRAE):])
    pieces, count, parted = _split_joined(pieces, count, sizes, reference, probabilities[1:].argmax(0))
    sizes = np.bincount(pieces.ravel(), minlength=count + 1)[1:]
    kept = [i + 1 for i in range(count) if MIN_FRACTION * reference <= sizes[i] <= MAX_RATIO * reference]
    if not kept:
        return None
    given = probabilities[1:] / np.clip(1.0 - probabilities[0], 1e-6, None)  # P(class | vertebra)
    mean_given = np.array([[given[c][pieces == piece].mean() for c in range(len(classes))] for piece in kept])
    centroids = np.array(ndimage.center_of_mass(np.ones_like(pieces), pieces, kept)).reshape(-1, 2)
    position = np.array([_POSITION[name] for name in classes], dtype=float)
    order = np.argsort(spine_order(centroids, mean_given @ position))
    return _Bodies(pieces, [kept[i] for i in order], mean_given[order], sizes[np.array(kept)[order] - 1].astype(float),
                   parted)


def _split_joined(pieces: np.ndarray, count: int, sizes: np.ndarray, reference: float, classes: np.ndarray
                  ) -> tuple[np.ndarray, int, int]:
    """Pieces about twice a typical body's area, or as tall as two bodies (_tall_pieces), parted into the bodies
    they join (new piece ids at the end); returns (pieces, their count, how many were parted).

    Why: two bodies that touch across a narrow or blurred disc form one foreground piece, which would be counted
    as one level and shift every level below or above it. Parted where the network's own classes differ (T12 over
    L1, L5 over S1), else where eroding the piece separates it (a bridge across the disc); each pixel then joins
    the nearest part. A piece that parts into fewer than two body-sized parts is kept whole."""
    pieces, parted = pieces.copy(), 0
    tall = _tall_pieces(pieces, sizes, reference)
    for piece in [i + 1 for i in range(len(sizes)) if sizes[i] > JOINED_RATIO * reference or i + 1 in tall]:
        parts = _parts_of(pieces == piece, classes, PART_FRACTION * reference)
        parted += len(parts) > 1
        for part in parts[1:]:
            count += 1
            pieces[part] = count
    return pieces, count, parted


def _tall_pieces(pieces: np.ndarray, sizes: np.ndarray, reference: float) -> set[int]:
    """Pieces from TALL_JOINED_RATIO typical bodies' area that are TALL_RATIO times the median body's height along
    the spine: a body joined to a smaller neighbour (T12 is smaller than L1) adds less than a body's area but a
    body's height, which no single lumbar body has."""
    from scipy import ndimage

    bodies = [i + 1 for i in range(len(sizes)) if MIN_FRACTION * reference <= sizes[i] <= MAX_RATIO * reference]
    if len(bodies) < 3:
        return set()
    centroids = np.array(ndimage.center_of_mass(np.ones_like(pieces), pieces, bodies))
    axis = spine_axis(centroids, np.zeros(len(bodies)))  # its sign does not matter for a height
    heights = {piece: np.ptp(np.argwhere(pieces == piece) @ axis) + 1 for piece in bodies}
    largest = sorted(bodies, key=lambda piece: -sizes[piece - 1])[: len(VERTEBRAE)]
    median = float(np.median([heights[piece] for piece in largest]))
    return {piece for piece in bodies
            if heights[piece] > TALL_RATIO * median and sizes[piece - 1] > TALL_JOINED_RATIO * reference}


def _parts_of(mask: np.ndarray, classes: np.ndarray, min_area: float) -> list[np.ndarray]:
    """The bodies a piece joins (masks, [mask] when it parts into fewer than two of at least `min_area`)."""
    from scipy import ndimage

    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    inner = mask[box]
    seeds, n = np.zeros(inner.shape, np.int32), 0
    for value in np.unique(classes[box][inner]):  # where the network names two levels inside the piece
        components, _ = ndimage.label(inner & (classes[box] == value), structure=np.ones((3, 3), bool))
        for component in np.flatnonzero(np.bincount(components.ravel())[1:] >= min_area) + 1:
            n += 1
            seeds[components == component] = n
    if n < 2:
        seeds, n = np.zeros(inner.shape, np.int32), 0
        for iterations in range(1, MAX_EROSION + 1):  # where a bridge joins two bodies
            eroded = ndimage.binary_erosion(inner, np.ones((3, 3), bool), iterations=iterations)
            components, _ = ndimage.label(eroded, structure=np.ones((3, 3), bool))
            big = np.flatnonzero(np.bincount(components.ravel())[1:] >= min_area / 4) + 1
            if len(big) >= 2:
                for component in big:
                    n += 1
                    seeds[components == component] = n
                break
    if n < 2:
        return [mask]
    nearest = ndimage.distance_transform_edt(seeds == 0, return_distances=False, return_indices=True)
    grown = np.where(inner, seeds[tuple(nearest)], 0)
    if min(int((grown == k).sum()) for k in range(1, n + 1)) < min_area:
        return [mask]
    parts = []
    for k in range(1, n + 1):
        part = np.zeros_like(mask)
        part[box] = grown == k
        parts.append(part)
    return parts


def spine_axis(centroids: np.ndarray, expected_level: np.ndarray) -> np.ndarray:
    """The principal axis of two or more centroids (a unit vector), pointing the way the expected level increases."""
    centred = centroids - centroids.mean(axis=0)
    axis = np.linalg.svd(centred, full_matrices=False)[2][0]
    return -axis if np.sum((centred @ axis) * (expected_level - expected_level.mean())) < 0 else axis


def spine_order(centroids: np.ndarray, expected_level: np.ndarray) -> np.ndarray:
    """Positions along the spine's axis, increasing with the expected level."""
    if len(centroids) < 2:
        return np.zeros(len(centroids))
    return (centroids - centroids.mean(axis=0)) @ spine_axis(centroids, expected_level)


# ---------------------------------------------------------------------------------------------- counting


def count_bodies(given: np.ndarray, areas: np.ndarray, classes: Sequence[str] = VERTEBRAE
                 ) -> tuple[int, LevelAssignment]:
    """(index of L1 among the bodies, how it was counted) for bodies ordered top to bottom, given each body's
    mean P(class | vertebra) over `classes` (L1..L5, optionally T12 and S1) and its area. The index may lie
    outside the bodies (L1 out of view) or leave L5 beyond the last body."""
    column = {name: i for i, name in enumerate(classes)}
    n = len(given)

    def landmark(candidates: tuple[tuple[str, int], ...]) -> tuple[str | None, int, float]:
        """The first candidate class some body clearly shows: (its name, the index of L1 it implies, its P)."""
        for name, shift in candidates:
            if name in column:
                index = int(np.argmax(given[:, column[name]]))
                if given[index, column[name]] >= ANCHOR_PROBABILITY:
                    return name, index + shift, float(given[index, column[name]])
        return None, 0, 0.0

    def fit(first: int) -> float:
        """How well the network's per-body levels fit L1 at body `first` (T12 above it and S1 below it included):
        the log-likelihood of that count against chance, summed over the bodies it names."""
        expected = {"T12": first - 1, **{name: first + j for j, name in enumerate(VERTEBRAE)}, "S1": first + 5}
        return float(sum(np.log(given[index, column[name]] + LIKELIHOOD_FLOOR) + np.log(len(classes))
                         for name, index in expected.items() if name in column and 0 <= index < n))

    from_above, first_above, p_above = landmark((("T12", 1), ("L1", 0)))
    from_below, first_below, p_below = landmark((("S1", -len(VERTEBRAE)), ("L5", 1 - len(VERTEBRAE))))
    reasons, agree = [], None
    if from_above and from_below:
        agree = first_above == first_below
        if agree:
            first, method, anchor_p = first_above, f"{from_above}+{from_below}", (p_above + p_below) / 2
        else:  # one landmark at least is wrong, maybe both: the count the network's levels fit best
            first = max(range(1 - len(VERTEBRAE), n), key=fit)
            method, anchor_p = ((from_below, p_below) if first == first_below else
                                (from_above, p_above) if first == first_above else ("fit", 0.0))
            reasons.append(f"counting from {from_above} and from {from_below} disagree by "
                           f"{abs(first_above - first_below)} level(s); took "
                           + (f"{method}, which fits the network's levels better" if method != "fit" else
                              "neither: the count the network's levels fit best"))
    elif from_above or from_below:
        first, method, anchor_p = (first_above, from_above, p_above) if from_above else \
            (first_below, from_below, p_below)
        if method in ("L1", "L5"):
            reasons.append(f"counted from the network's own {method} alone: no T12, S1 or other end to check it")
    else:
        first, method, anchor_p = max(range(1 - len(VERTEBRAE), n), key=fit), "ordering", 0.0
        reasons.append("no T12, S1 or clear L1/L5 in view: the five bodies that fit the network's levels best")

    sizes_progress = None
    upper, lower = [first, first + 1], [first + 3, first + 4]
    if all(0 <= index < n for index in upper + lower):
        ratio = float(np.mean(areas[lower]) / max(np.mean(areas[upper]), 1e-6))
        sizes_progress = ratio >= SIZE_RATIO_MIN
        if not sizes_progress:
            reasons.append(f"L4-L5 are not larger than L1-L2 (area ratio {ratio:.2f}): a level shift?")
    in_view = [(first + j, column[name]) for j, name in enumerate(VERTEBRAE) if 0 <= first + j < n]
    network_fit = float(np.mean([given[index, c] for index, c in in_view])) if in_view else 0.0
    factor = 0.4 if method == "ordering" else {True: 1.0, None: 0.85, False: 0.5}[agree]
    factor *= 0.7 if sizes_progress is False else 1.0
    confidence = round(factor * (anchor_p + network_fit) / 2, 3)
    if confidence < MIN_CONFIDENCE and agree is not False and method != "ordering":
        reasons.append(f"the network's levels fit the count poorly (confidence {confidence:.2f})")
    return first, LevelAssignment(method, from_above, from_below, agree, confidence, tuple(reasons), sizes_progress)


def count_levels(probabilities: np.ndarray, classes: Sequence[str] = VERTEBRAE
                 ) -> tuple[np.ndarray, LevelAssignment | None]:
    """Working-grid level map from softmax output (background, then `classes`) and how it was counted (None when
    no body was found). Values: 1..5 = L1..L5, and 6 = T12, 7 = S1 for the bodies just outside L1..L5 when the
    model has those classes; other bodies (T11, S2, specks) are left out."""
    levels = np.zeros(probabilities.shape[1:], np.uint8)
    bodies = _find_bodies(probabilities, classes)
    if bodies is None:
        return levels, None
    first, assignment = count_bodies(bodies.given, bodies.areas, classes)
    if bodies.parted:
        assignment = assignment.with_parted(bodies.parted)
    for index, piece in enumerate(bodies.ids):
        position = index - first + 1  # 0 = T12, 1..5 = L1..L5, 6 = S1
        if 1 <= position <= len(VERTEBRAE):
            levels[bodies.pieces == piece] = position
        elif position == 0 and "T12" in classes:
            levels[bodies.pieces == piece] = CONTEXT_LABELS["T12"]
        elif position == len(VERTEBRAE) + 1 and "S1" in classes:
            levels[bodies.pieces == piece] = CONTEXT_LABELS["S1"]
    return levels, assignment


def pixel_assignment(probabilities: np.ndarray) -> LevelAssignment:
    """How levels taken from the network's per-pixel argmax were fixed: by nothing but the network (doubtful)."""
    foreground = probabilities[0] < 0.5
    given = probabilities[1:, foreground] / np.clip(1.0 - probabilities[0, foreground], 1e-6, None)
    network_fit = float(given.max(axis=0).mean()) if foreground.any() else 0.0
    return LevelAssignment("pixels", None, None, None, round(0.4 * network_fit, 3),
                           ("counting the bodies left a level out: levels are the network's per-pixel labels",))


def flag_doubtful(status: str, message: str, assignment: LevelAssignment | None) -> tuple[str, str]:
    """(status, message) of a segmentation after its count: a doubtful count never leaves it "ok" but "warning",
    with the reasons; an error stays an error."""
    if assignment is None or not assignment.doubtful or status == "error":
        return status, message
    note = "levels doubtful: " + ("; ".join(assignment.reasons) or assignment.summary())
    return "warning", f"{message}; {note}" if message else note

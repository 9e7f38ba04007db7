"""Randomised metal drawn over a 2D training image: the segmenter's commonest failure is a spine with implants.

Pedicle screws with rods, cement in a body, an interbody cage, surgical clips and wires are drawn from the label
map's own bodies (where they are and which way the spine runs), each by chance, with random size, number,
angle, density and edge. Why not only the `projected` family's implants: a network learns one generator's metal
as it learns one generator's sacrum; shapes drawn a second, cruder way beside them make it read a bright object
over a body as something that does not change the body's level. The label map is not changed: labels outline bone.
Anchor: copy-paste and occlusion augmentation (Ghiasi et al. 2021; DeVries & Taylor 2017), SyntheX's heavy
randomisation (Gao et al. 2023).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .. import kauppila

KINDS = ("screws", "cement", "cage", "clips", "wires")
CHANCES = {"screws": 0.5, "cement": 0.25, "cage": 0.2, "clips": 0.35, "wires": 0.2}


@dataclass(frozen=True)
class _Body:
    """A labelled body on the image grid: centre (row, col), half extents along its shorter and its longer axis
    (a lumbar body is deeper than it is tall: height, then depth) and its mask."""

    centre: np.ndarray
    half_height: float
    half_depth: float
    mask: np.ndarray


def add_metal(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
              spacing_mm: float) -> tuple[np.ndarray, list[str]]:
    """A float32 copy of `image` (any range; metal is added in units of its bone-to-soft-tissue contrast) with at
    least one kind of metal over or near the lumbar bodies of `labels`, and the kinds drawn.

    spacing_mm: the grid's pixel size, so that a screw is screw-sized on any grid. An image whose label map holds
    fewer than two lumbar bodies is returned unchanged (there is no spine to place metal by)."""
    image = np.asarray(image, np.float32)
    labels = np.asarray(labels)
    if labels.shape != image.shape:
        raise ValueError(f"labels {labels.shape} do not match the image {image.shape}")
    bodies = _bodies(labels)
    if len(bodies) < 2:
        return image.copy(), []
    mm = 1.0 / float(spacing_mm)  # pixels per millimetre
    contrast = _bone_contrast(image, labels)
    spine = bodies[-1].centre - bodies[0].centre
    along = spine / max(float(np.linalg.norm(spine)), 1e-6)
    across = np.array([-along[1], along[0]])
    drawn = [kind for kind in KINDS if rng.random() < CHANCES[kind]] or [str(rng.choice(KINDS))]
    metal = np.zeros(image.shape, np.float32)
    for kind in drawn:
        density = contrast * float(rng.uniform(0.8, 3.0))
        if kind == "screws":
            shape = _screws(image.shape, bodies, along, across, mm, rng)
        elif kind == "cement":
            shape = _cement(bodies, rng)
            density *= 0.5
        elif kind == "cage":
            shape = _cage(image.shape, bodies, along, across, mm, rng)
        elif kind == "clips":
            shape = _clips(image.shape, bodies, across, mm, rng)
        else:
            shape = _wires(image.shape, mm, rng)
        metal = np.maximum(metal, shape * density)
    blur = float(rng.uniform(0.0, 0.8))
    if blur > 0.2:
        metal = ndimage.gaussian_filter(metal, blur)
    return image + metal, drawn


def _bodies(labels: np.ndarray) -> list[_Body]:
    """The lumbar bodies present, top to bottom by label."""
    bodies = []
    for value in range(1, len(kauppila.VERTEBRAE) + 1):
        mask = labels == value
        if mask.sum() < 8:
            continue
        points = np.argwhere(mask).astype(np.float32)
        centre = points.mean(axis=0)
        spread = np.sqrt(np.linalg.eigvalsh(np.cov((points - centre).T)))
        bodies.append(_Body(centre, float(spread[0] * 1.7), float(spread[1] * 1.7), mask))
    return bodies


def _bone_contrast(image: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the bodies minus mean elsewhere, at least a tenth of the image's range (inverted images too)."""
    inside = labels > 0
    span = float(np.ptp(image)) or 1.0
    if inside.all() or not inside.any():
        return 0.1 * span
    return max(abs(float(image[inside].mean()) - float(image[~inside].mean())), 0.1 * span)


def _segment(shape: tuple[int, int], start: np.ndarray, end: np.ndarray, width: float) -> np.ndarray:
    """A soft-edged bar from start to end (row, col), `width` pixels wide, in [0, 1]."""
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    d = end - start
    length2 = max(float(d @ d), 1e-6)
    t = np.clip(((rows - start[0]) * d[0] + (cols - start[1]) * d[1]) / length2, 0.0, 1.0)
    distance = np.hypot(rows - (start[0] + t * d[0]), cols - (start[1] + t * d[1]))
    return np.clip(width / 2 + 0.5 - distance, 0.0, 1.0)


def _disc(shape: tuple[int, int], centre: np.ndarray, radius: float) -> np.ndarray:
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    return np.clip(radius + 0.5 - np.hypot(rows - centre[0], cols - centre[1]), 0.0, 1.0)


def _screws(shape, bodies, along, across, mm, rng) -> np.ndarray:
    """Two pedicle screws at each of 2-4 adjacent levels, entering from one side (either: which side is posterior
    is not known from labels alone), with their heads and a rod joining the heads on each side."""
    count = int(rng.integers(2, min(4, len(bodies)) + 1))
    first = int(rng.integers(0, len(bodies) - count + 1))
    side = float(rng.choice([-1.0, 1.0]))
    width = float(rng.uniform(4.5, 7.0)) * mm
    out = np.zeros(shape, np.float32)
    heads = {0: [], 1: []}
    for body in bodies[first:first + count]:
        for screw in (0, 1):
            offset = along * float(rng.uniform(-0.3, 0.3)) * body.half_height
            entry = body.centre + offset + side * across * (body.half_depth + float(rng.uniform(15.0, 30.0)) * mm)
            tip = body.centre + offset - side * across * body.half_depth * float(rng.uniform(0.1, 0.7))
            tip = tip + along * float(rng.normal(0.0, 3.0)) * mm
            out = np.maximum(out, _segment(shape, entry, tip, width))
            out = np.maximum(out, _disc(shape, entry, float(rng.uniform(4.0, 7.0)) * mm))
            heads[screw].append(entry)
    for ends in heads.values():
        for a, b in zip(ends[:-1], ends[1:]):
            out = np.maximum(out, _segment(shape, a, b, float(rng.uniform(4.0, 6.5)) * mm))
    return out


def _cement(bodies, rng) -> np.ndarray:
    """Cement filling an irregular part (30-80%) of one body."""
    body = bodies[int(rng.integers(0, len(bodies)))]
    field = ndimage.gaussian_filter(rng.standard_normal(body.mask.shape).astype(np.float32), 3.0)
    inside = field[body.mask]
    level = np.quantile(inside, 1.0 - float(rng.uniform(0.3, 0.8)))
    return ndimage.gaussian_filter(((field >= level) & body.mask).astype(np.float32), 0.7)


def _cage(shape, bodies, along, across, mm, rng) -> np.ndarray:
    """An interbody cage in one disc space: a solid block (titanium) or only its 2-4 marker pins (PEEK)."""
    k = int(rng.integers(0, len(bodies) - 1))
    upper, lower = bodies[k], bodies[k + 1]
    centre = (upper.centre + lower.centre) / 2
    depth = min(upper.half_depth, lower.half_depth) * float(rng.uniform(0.5, 0.9))
    height = max(float(np.linalg.norm(lower.centre - upper.centre)) - upper.half_height - lower.half_height,
                 3.0 * mm) * float(rng.uniform(0.8, 1.3))
    if rng.random() < 0.5:
        return _segment(shape, centre - across * depth, centre + across * depth, height)
    out = np.zeros(shape, np.float32)
    for position in np.linspace(-depth, depth, int(rng.integers(2, 5))):
        pin = centre + across * position
        out = np.maximum(out, _segment(shape, pin - along * 2.0 * mm, pin + along * 2.0 * mm, 1.5 * mm))
    return out


def _clips(shape, bodies, across, mm, rng) -> np.ndarray:
    """1-8 short clips anywhere up to 150 mm to either side of the spine."""
    out = np.zeros(shape, np.float32)
    for _ in range(int(rng.integers(1, 9))):
        body = bodies[int(rng.integers(0, len(bodies)))]
        centre = body.centre + across * float(rng.uniform(-150.0, 150.0)) * mm
        direction = rng.normal(size=2)
        direction *= float(rng.uniform(3.0, 6.0)) * mm / max(float(np.linalg.norm(direction)), 1e-6)
        width = float(rng.uniform(1.0, 2.0)) * mm
        out = np.maximum(out, _segment(shape, centre - direction, centre + direction, width))
    return out


def _wires(shape, mm, rng) -> np.ndarray:
    """1-3 wires or leads crossing the image on a gentle curve."""
    out = np.zeros(shape, np.float32)
    size = np.array(shape, np.float32)
    for _ in range(int(rng.integers(1, 4))):
        ends = rng.uniform(0.0, 1.0, (2, 2)) * size
        bend = (ends.mean(axis=0) + rng.normal(0.0, 0.15, 2) * size)
        points = [ends[0], bend, ends[1]]
        width = float(rng.uniform(0.8, 2.5)) * mm
        for t0, t1 in zip(np.linspace(0, 1, 8)[:-1], np.linspace(0, 1, 8)[1:]):
            a = (1 - t0) ** 2 * points[0] + 2 * (1 - t0) * t0 * points[1] + t0 ** 2 * points[2]
            b = (1 - t1) ** 2 * points[0] + 2 * (1 - t1) * t1 * points[1] + t1 ** 2 * points[2]
            out = np.maximum(out, _segment(shape, a, b, width))
    return out

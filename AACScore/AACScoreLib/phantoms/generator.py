"""Synthetic lateral lumbar radiographs (DICOM DX) with exact Kauppila AAC-24 ground truth by construction.

Each phantom draws a lordotic spine (T10..S1 with discs and posterior elements), ribs, pelvis, bowel gas and the
aorta in front of the spine, places calcified plaques along the aortic walls to realise sampled target subscores,
then measures the truth from what it drew: the calcified fraction of each wall between the segment boundary lines
(disc mid-points along the disc mid-planes, defined as in geometry/spine.py). Acquisition and processing vary widely
(facing, rotation, field of view, noise, heel effect, collimation, markers, contrast curves, photometric
interpretation, rescale, spacing tags, compression) so that models trained on them meet unfamiliar images.
Two generator settings exist: "default" for training and "alt" for held-out robustness tests.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from .. import kauppila
from ..io.atomic import atomic_path, write_atomic, write_text_atomic
from ..errors import AACScoreError
from .anatomy import (BOUNDARY_NAMES, CORNER_NAMES, Anatomy, Placement, blur, build_anatomy, curve_normals,
                              disc_boundaries, draw_bodies, draw_plaque, render_coarse, unit, upsample)
from ..io.radiograph import Radiograph

STYLES: tuple[str, ...] = ("default", "alt")
DEFAULT_SEVERITY: tuple[float, float, float] = (0.25, 0.60, 0.15)
DEFAULT_SIZE_RANGE: tuple[int, int] = (1500, 3000)
# `labels` makes truth.csv a list that `aacscore score` and `train-scorer --csv` read with the drawn label maps.
TRUTH_COLUMNS: tuple[str, ...] = ("file", "labels", "aac24", "category") + kauppila.SUBSCORE_COLUMNS
# Calcified fractions drawn for each subscore keep clear of the 1/3 and 2/3 thresholds, so that small geometric
# differences (a segmentation a few pixels off) cannot change a subscore.
FRACTION_RANGES: dict[int, tuple[float, float]] = {1: (0.07, 0.26), 2: (0.40, 0.60), 3: (0.74, 0.93)}
END_MARGIN_MM = 1.5  # plaques stay this far (or 5 % of the segment) from the segment boundaries
GAP_MM = 1.5  # minimum gap between two plaques of one wall segment
COLLIMATOR = 30.0  # attenuation added outside the collimated field (unexposed detector)
_STYLE_CODE = {"default": 0, "alt": 1}
_FIELD_OF_VIEW_MM = (300.0, 450.0)  # field of view along the rows


@dataclass
class Phantom:
    """One generated radiograph: display pixels (bone bright), labels, truth and the DICOM settings to write."""

    name: str
    pixels: np.ndarray  # uint16 (H, W) display values before any MONOCHROME1 inversion or rescale; bone bright
    labels: np.ndarray  # uint8 (H, W): 0 background, 1..5 = L1..L5, exactly the drawn bodies
    truth: dict
    dataset: dict  # photometric, bits, rescale, spacing tags, orientation, transfer syntax, UIDs...
    plaque_mask: np.ndarray | None = None  # bool (H, W): pixels showing drawn plaque, where a family records it


# ---------------------------------------------------------------------------------------------------------- truth


def arc_length(polyline: np.ndarray) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(polyline, axis=0), axis=1))])


def _crossing(wall: np.ndarray, arc: np.ndarray, point: np.ndarray, direction: np.ndarray) -> float:
    """Arc position where the wall crosses the line through `point` along `direction` (nearest crossing)."""
    side = (wall[:, 0] - point[0]) * direction[1] - (wall[:, 1] - point[1]) * direction[0]
    candidates = np.nonzero(np.signbit(side[:-1]) != np.signbit(side[1:]))[0]
    if len(candidates) == 0:
        raise ValueError(f"the wall does not cross the boundary line through {point.round(2).tolist()}")
    best, best_dist = 0.0, np.inf
    for i in candidates:
        t = side[i] / (side[i] - side[i + 1]) if side[i] != side[i + 1] else 0.0
        where = wall[i] + t * (wall[i + 1] - wall[i])
        dist = float(np.hypot(*(where - point)))
        if dist < best_dist:
            best, best_dist = float(arc[i] + t * (arc[i + 1] - arc[i])), dist
    return best


def wall_segment_spans(wall: np.ndarray, boundaries: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """(4, 2) arc positions along `wall` where it enters and leaves the L1..L4 segments."""
    arc = arc_length(wall)
    cuts = np.array([_crossing(wall, arc, p, d) for p, d in zip(boundaries, directions)])
    if np.any(np.diff(cuts) <= 0):
        raise ValueError("the wall crosses the segment boundaries out of order")
    return np.stack([cuts[:-1], cuts[1:]], axis=1)


def calcified_fractions(wall: np.ndarray, deposits: Sequence[tuple[float, float]], boundaries: np.ndarray,
                        directions: np.ndarray) -> list[float]:
    """Kauppila calcified fraction of one wall in each segment L1..L4.

    `deposits` are (start, end) arc positions along `wall` (same units as the wall's coordinates); the fraction is
    the length covered by their union between the two boundary lines divided by the wall length there.
    """
    spans = wall_segment_spans(np.asarray(wall, float), np.asarray(boundaries, float), np.asarray(directions, float))
    merged: list[list[float]] = []
    for start, end in sorted((min(a, b), max(a, b)) for a, b in deposits):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    fractions = []
    for top, bottom in spans:
        covered = sum(max(0.0, min(end, bottom) - max(start, top)) for start, end in merged)
        fractions.append(covered / (bottom - top))
    return fractions


def sample_subscores(u: float, rng: np.random.Generator, severity: Sequence[float]) -> dict[str, int]:
    """Target wall subscores: a category from `u` in [0, 1) by the severity weights, a total uniform within it,
    spread over the walls with lower levels and posterior walls favoured and calcified walls growing first."""
    weights = np.asarray(severity, float) / np.sum(severity)
    name = kauppila.CATEGORIES[int(np.searchsorted(np.cumsum(weights), u, side="right").clip(0, 2))]
    low, high = kauppila.CATEGORY_RANGES[name]
    total = int(rng.integers(low, high + 1))
    base = np.array([[0.55, 0.8, 1.0, 1.25][i // 2] * (1.0 if i % 2 == 0 else 1.15) for i in range(8)])
    base *= rng.uniform(0.6, 1.4, 8)
    scores = np.zeros(8, int)
    for _ in range(total):
        w = base * (scores < 3) * (1.0 + (scores > 0))
        scores[rng.choice(8, p=w / w.sum())] += 1
    return dict(zip(kauppila.SUBSCORE_COLUMNS, (int(s) for s in scores)))


def target_subscores(seed: int, index: int, code: int, rng: np.random.Generator,
                     severity: Sequence[float]) -> dict[str, int]:
    """The wall subscores phantom `index` of `seed` realises: categories spread evenly over consecutive indices
    (golden-ratio steps from a per-seed offset) in the `severity` proportions; `code` tells generator settings apart."""
    offset = np.random.default_rng([seed, 7919, code]).random()
    return sample_subscores((offset + (index + 1) * 0.6180339887498949) % 1.0, rng, severity)


def place_plaques(rng: np.random.Generator, span: tuple[float, float], subscore: int) -> list[tuple[float, float]]:
    """Plaque intervals (arc positions) inside one wall segment whose union realises `subscore`."""
    if subscore == 0:
        return []
    top, bottom = span
    length = bottom - top
    margin = max(END_MARGIN_MM, 0.05 * length)
    low, high = FRACTION_RANGES[subscore]
    pieces = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15] if subscore > 1 else [0.7, 0.3, 0.0]))
    fraction = rng.uniform(low, min(high, (length - 2 * margin - (pieces - 1) * GAP_MM) / length))
    covered = fraction * length
    free = length - 2 * margin - covered - (pieces - 1) * GAP_MM
    if free < 0:
        pieces, free = 1, length - 2 * margin - covered
    sizes = covered * (0.3 / pieces + 0.7 * rng.dirichlet(np.ones(pieces)))
    shares = free * rng.dirichlet(np.ones(pieces + 1))
    gaps = [margin + shares[0]] + [GAP_MM + s for s in shares[1:-1]] + [margin + shares[-1]]
    out, cursor = [], top + gaps[0]
    for size, gap in zip(sizes, gaps[1:]):
        out.append((cursor, cursor + size))
        cursor += size + gap
    return out


def _band_clearance(anatomy: Anatomy, boundaries: np.ndarray, directions: np.ndarray) -> float:
    """Smallest distance (mm) by which the aortic walls stay inside the Kauppila bands of L1..L4."""
    mean_ap = np.mean([anatomy.bodies[n].ap for n in kauppila.VERTEBRAE])
    clearance = np.inf
    for wall in (anatomy.aorta_posterior, anatomy.aorta_anterior):
        spans = wall_segment_spans(wall, boundaries, directions)
        arc = arc_length(wall)
        for level, (top, bottom) in zip(kauppila.SCORED_LEVELS, spans):
            c = dict(zip(CORNER_NAMES, anatomy.bodies[level].corners))
            a = c["superior_anterior"]
            along = unit(c["inferior_anterior"] - a)
            normal = np.array([-along[1], along[0]])
            if normal @ anatomy.bodies[level].normal < 0:
                normal = -normal
            inside = wall[(arc >= top) & (arc <= bottom)]
            depth = (inside - a) @ normal
            clearance = min(clearance, float(depth.min()), float(0.75 * mean_ap - depth.max()))
    return clearance


# ------------------------------------------------------------------------------------------------- the generator


def _look(rng: np.random.Generator, alt: bool) -> dict:
    """Densities, textures, noise and processing of one phantom; "alt" uses other ranges and curve families."""
    u = rng.uniform
    look = dict(
        soft=u(2.2, 3.2), soft_mottle=u(0.008, 0.025), back_fat_mm=u(15, 50), belly_mm=u(110, 230),
        hip_widening=u(0.1, 0.35), lung=u(0.8, 1.6), gas=u(0.2, 0.6), gas_fill=u(-0.5, 0.5), stool=u(0.0, 0.6),
        blood=u(0.02, 0.06),
        posterior=u(0.35, 0.6), rib=u(0.15, 0.3), pelvis=u(0.2, 0.4), heel=u(0.05, 0.3),
        heel_angle=rng.choice([0.0, np.pi]) + u(-0.3, 0.3), correlated_noise=u(0.003, 0.012),
        corner_radius_mm=u(1.0, 2.2), endplate_concavity_mm=u(0.0, 0.6), edge_mm=u(0.12, 0.3),
        trabecular_mm=u(0.25, 0.45), trabecular=u(0.3, 0.6), trabecular_contrast=u(0.05, 0.15),
        cortex=u(0.35, 0.7), cortex_mm=u(0.55, 0.95), plaque=u(0.3, 0.8), plaque_mm=u(0.35, 1.1), patchy=u(0.0, 0.6),
        wall_concavity_mm=u(0.2, 1.0), outline_mm=u(0.0, 0.12),
        noise=u(0.008, 0.03), curve=str(rng.choice(["gamma", "sigmoid"])), curve_param=u(0.0, 1.0),
        latitude=u(0.5, 1.0), detail=u(0.9, 1.5), eq_sigma_mm=u(12, 40), p_low=u(0.2, 2.0), p_high=u(99.3, 99.95),
        headroom=u(0.85, 1.0), double_endplate_mm=u(0.5, 2.0) * (rng.random() < 0.4),
        blur_px=u(0.5, 1.2) * (rng.random() < 0.3), grid_lines=u(0.003, 0.01) * (rng.random() < 0.1),
    )
    if alt:
        look.update(
            soft=u(1.6, 4.0), soft_mottle=u(0.01, 0.05), back_fat_mm=u(8, 80), belly_mm=u(80, 300),
            gas=u(0.1, 0.9), gas_fill=u(-1.0, 1.0), rib=u(0.1, 0.4), pelvis=u(0.1, 0.5), heel=u(0.0, 0.5),
            heel_angle=u(0, 2 * np.pi),
            correlated_noise=u(0.005, 0.03), corner_radius_mm=u(0.6, 3.0), endplate_concavity_mm=u(0.0, 1.0),
            edge_mm=u(0.12, 0.35), trabecular_mm=u(0.4, 0.75), trabecular=u(0.25, 1.0),
            trabecular_contrast=u(0.05, 0.25),
            cortex=u(0.2, 0.9), cortex_mm=u(0.35, 1.1), plaque=u(0.15, 0.9), plaque_mm=u(0.25, 1.4), patchy=u(0.0, 1.0),
            noise=u(0.015, 0.06), curve=str(rng.choice(["exp", "knee", "gamma"])), latitude=u(0.35, 1.0),
            detail=u(0.8, 2.2), eq_sigma_mm=u(5, 60), p_low=u(0.0, 5.0), p_high=u(98.5, 99.99),
            wall_concavity_mm=u(0.0, 1.6), outline_mm=u(0.0, 0.25), double_endplate_mm=u(0.5, 3.0) * (rng.random() < 0.6),
            blur_px=u(0.6, 1.8) * (rng.random() < 0.5), grid_lines=u(0.004, 0.02) * (rng.random() < 0.35),
        )
    return look


def _curve(t: np.ndarray, kind: str, p: float) -> np.ndarray:
    """Contrast curve on [0, 1] (the detector/processing characteristic), monotone increasing."""
    if kind == "gamma":
        return t ** (0.8 + 1.4 * p)
    if kind == "sigmoid":
        gain = 4.0 + 5.0 * p
        s = 1.0 / (1.0 + np.exp(-gain * (t - 0.5 - 0.2 * p)))
        return (s - s[0]) / (s[-1] - s[0])
    if kind == "exp":
        k = -3.0 + 6.0 * p if abs(p - 0.5) > 0.05 else 0.6
        return (1.0 - np.exp(-k * t)) / (1.0 - np.exp(-k))
    toe, shoulder = 0.05 + 0.2 * p, 0.75 + 0.2 * p  # "knee": linear with soft toe and shoulder
    knee = (np.logaddexp(0, (t - toe) * 20) - np.logaddexp(0, (t - shoulder) * 20)) / 20
    return np.clip(knee / (shoulder - toe), 0, 1)


def _acquisition(rng: np.random.Generator, size_range: tuple[int, int], key_mm: np.ndarray, alt: bool) -> dict:
    """Image size, spacing, rotation, facing and position so that the key region lies well inside the image."""
    rows = int(rng.integers(size_range[0], size_range[1] + 1))
    cols = int(np.clip(round(rows * rng.uniform(0.72, 1.0)), size_range[0], size_range[1]))
    spacing = float(np.clip(rows * rng.uniform(0.1, 0.2), *_FIELD_OF_VIEW_MM) / rows)
    angle = float(np.radians(np.clip(rng.normal(0.0, 7.0 if not alt else 9.0), -15.0, 15.0)))
    facing = 1.0 if rng.random() < 0.5 else -1.0  # +1: anterior towards +col (right of the image)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    direction = rot @ np.diag([1.0, facing])
    pts = key_mm @ direction.T
    extent = pts.max(axis=0) - pts.min(axis=0)
    spacing = max(spacing, float(extent[0] / (0.9 * rows)), float(extent[1] / (0.9 * cols)))
    pts_px = pts / spacing
    lo = -pts_px.min(axis=0)
    room = np.array([rows, cols]) - (pts_px.max(axis=0) - pts_px.min(axis=0))
    origin = lo + room * rng.uniform(0.2, 0.8, 2)
    return dict(shape=(rows, cols), spacing=spacing, angle=angle, facing=facing, matrix=direction / spacing,
                origin=origin, key_px=pts_px + origin)


def _collimation(rng: np.random.Generator, place: Placement, key_px: np.ndarray):
    """Coarse map of the extra attenuation outside a rectangular collimated field, the shutter processing and the
    field (top, bottom, left, right) in pixels."""
    rows, cols = place.shape
    shutter = str(rng.choice(["white", "black", "none"], p=[0.5, 0.3, 0.2]))
    field_ = np.zeros(place.coarse_shape, np.float32)
    if shutter == "none":
        return field_, shutter, (0.0, float(rows), 0.0, float(cols))
    margin = 20.0 / place.spacing
    lo, hi = key_px.min(axis=0) - margin, key_px.max(axis=0) + margin
    insets = [rng.uniform(0.0, 0.12) * n if rng.random() < 0.7 else 0.0 for n in (rows, rows, cols, cols)]
    top, bottom = min(insets[0], max(lo[0], 0)), rows - min(insets[1], max(rows - hi[0], 0))
    left, right = min(insets[2], max(lo[1], 0)), cols - min(insets[3], max(cols - hi[1], 0))
    f = place.factor
    r = np.arange(place.coarse_shape[0]) * f + (f - 1) / 2
    c = np.arange(place.coarse_shape[1]) * f + (f - 1) / 2
    soft = 1.0 / (place.spacing * f)  # penumbra about 1 mm

    def step(x):
        return 1.0 / (1.0 + np.exp(-np.clip(x * soft, -30, 30)))

    inside = (step(r - top) * step(bottom - r))[:, None] * (step(c - left) * step(right - c))[None, :]
    return (COLLIMATOR * (1.0 - inside)).astype(np.float32), shutter, (top, bottom, left, right)


def _plaque_path(wall: np.ndarray, arc: np.ndarray, lumen: np.ndarray, start: float, end: float,
                 rng: np.random.Generator, look: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre line (mm), half widths (mm) and strengths of one plaque from arc `start` to `end` on a wall.

    Linear plaques are smooth bright lines; patchy ones vary more in width and density, but never fade out,
    so that the whole interval reads as calcified.
    """
    s = np.append(np.arange(start, end, 0.6), end)
    points = np.stack([np.interp(s, arc, wall[:, 0]), np.interp(s, arc, wall[:, 1])], axis=1)
    normals = np.stack([np.interp(s, arc, lumen[:, 0]), np.interp(s, arc, lumen[:, 1])], axis=1)
    patchy = rng.random() < look["patchy"]

    def wobble(size: int) -> np.ndarray:
        return ndimage.uniform_filter1d(rng.standard_normal(len(s)), size, mode="nearest") * np.sqrt(size) / 1.5

    spread = 0.5 if patchy else 0.3
    half = np.maximum(look["plaque_mm"] * np.clip(0.75 + spread * wobble(3 if patchy else 5), 0.35, 1.6), 0.15)
    density = np.clip(0.75 + spread * wobble(3 if patchy else 5), 0.35 if patchy else 0.5, 1.0)
    strength = look["plaque"] * rng.uniform(0.6, 1.2) * density
    return points + normals * half[:, None], half, strength


def _deposits(rng: np.random.Generator, anatomy: Anatomy, targets: dict[str, int], boundaries: np.ndarray,
              directions: np.ndarray) -> list[dict]:
    """Scored plaques realising the targets, plus unscored ones above T12/L1 and on the iliac arteries."""
    deposits = []
    walls = {"A": anatomy.aorta_anterior, "P": anatomy.aorta_posterior}
    burden = sum(targets.values()) / 24.0
    for wall_name, wall in walls.items():
        spans = wall_segment_spans(wall, boundaries, directions)
        for level, span in zip(kauppila.SCORED_LEVELS, spans):
            for start, end in place_plaques(rng, tuple(span), targets[f"{level}{wall_name}"]):
                deposits.append(dict(wall=wall_name, level=level, start_mm=start, end_mm=end))
        if rng.random() < 0.15 + 0.6 * burden:  # calcification above the scored aorta (not counted)
            top = spans[0][0] - END_MARGIN_MM - rng.uniform(0.5, 10.0)
            length = rng.uniform(2.0, 12.0)
            if top - length > 0:
                deposits.append(dict(wall=wall_name, level=None, start_mm=top - length, end_mm=top))
    for i, (line, diameter) in enumerate(anatomy.iliacs):
        if rng.random() < 0.1 + 0.6 * burden:
            side = 1.0 if rng.random() < 0.5 else -1.0
            wall = line + curve_normals(line) * side * diameter / 2
            arc = arc_length(wall)
            start = rng.uniform(0.0, arc[-1] * 0.6)
            deposits.append(dict(wall=f"iliac{i}{'A' if side > 0 else 'P'}", level=None, start_mm=start,
                                 end_mm=min(arc[-1], start + rng.uniform(3.0, 20.0)), polyline_mm=wall))
    return deposits


def _markers(rng: np.random.Generator, pixels: np.ndarray, place: Placement, key_px: np.ndarray,
             field_: tuple[float, float, float, float], letter: str, value: int) -> list[str]:
    """Burned-in annotations inside the exposed field, away from the key region: a lead letter, a ruler, text."""
    from PIL import Image, ImageDraw, ImageFont

    top, bottom, left, right = (int(v) for v in field_)
    rows, cols = bottom - top, right - left
    lo, hi = key_px.min(axis=0), key_px.max(axis=0)
    drawn = []
    items = []
    if rng.random() < 0.85:
        items.append(("letter", letter))
    if rng.random() < 0.4:
        items.append(("ruler", ""))
    if rng.random() < 0.5:
        items.append(("text", str(rng.choice(["LAT", "LATERAL", "L-SPINE LAT", "STANDING", "LUMBAR", "ERECT"]))))
    for kind, text in items:
        size_mm = rng.uniform(8.0, 16.0)
        px = max(int(size_mm / place.spacing), 8)
        canvas = Image.new("L", (px * max(len(text), 1) + px // 2, px + px // 2) if kind != "ruler" else
                           (px // 2, int(100 / place.spacing)), 0)
        draw = ImageDraw.Draw(canvas)
        if kind == "ruler":
            h = canvas.size[1]
            draw.line([(1, 0), (1, h)], fill=255, width=max(1, px // 12))
            for k, y in enumerate(range(0, h, max(1, int(10 / place.spacing)))):
                draw.line([(1, y), (px // 4 if k % 5 else px // 2 - 1, y)], fill=255, width=max(1, px // 12))
        else:
            font = ImageFont.load_default(size=px)
            if kind == "letter":
                draw.rectangle([0, 0, canvas.size[0] - 1, canvas.size[1] - 1], fill=90)
            draw.text((px // 4, 0), text, fill=255, font=font)
        stamp = np.asarray(canvas, dtype=np.float32) / 255.0
        h, w = stamp.shape
        for _ in range(20):
            r0 = top + int(rng.integers(0, max(1, rows - h)))
            c0 = left + int(rng.integers(0, max(1, cols - w)))
            if r0 + h <= bottom and c0 + w <= right and (r0 + h < lo[0] or r0 > hi[0] or c0 + w < lo[1] or c0 > hi[1]):
                region = pixels[r0:r0 + h, c0:c0 + w]
                region[...] = np.maximum(region, (stamp * value).astype(pixels.dtype))
                drawn.append(kind)
                break
    return drawn


def _exposed_sample(shape: tuple[int, int], spacing: float, field_: tuple[float, float, float, float]):
    """Subsampling step and the mask of sampled pixels inside the collimated field (penumbra excluded)."""
    step = max(1, min(shape) // 400)
    top, bottom, left, right = field_
    penumbra = 3.0 / spacing
    r = np.arange(0, shape[0], step)
    c = np.arange(0, shape[1], step)
    exposed = (((r > top + penumbra) & (r < bottom - penumbra))[:, None]
               & ((c > left + penumbra) & (c < right - penumbra))[None, :])
    return step, exposed


def _process(att: np.ndarray, place: Placement, look: dict, rng: np.random.Generator, bits: int,
             shutter: str, field_: tuple[float, float, float, float]) -> np.ndarray:
    """Quantum noise, then the display processing: uint16 display pixels."""
    if look["blur_px"]:  # detector and focal spot blur
        att = ndimage.gaussian_filter(att, look["blur_px"], truncate=2.0)
    step, exposed = _exposed_sample(att.shape, place.spacing, field_)
    ref = float(np.median(att[::step, ::step][exposed]))
    sigma = np.exp(np.minimum((att - ref) * 0.5, 3.0))
    sigma *= look["noise"]
    noise = rng.random(att.shape, dtype=np.float32)
    noise += rng.random(att.shape, dtype=np.float32)
    noise -= 1.0
    noise *= np.float32(np.sqrt(6.0))
    signal = att + sigma * noise
    del sigma, noise
    return display_pixels(signal, place.spacing, place.factor, look, rng, bits, shutter, field_)


def display_pixels(signal: np.ndarray, spacing: float, factor: int, look: dict, rng: np.random.Generator, bits: int,
                   shutter: str, field_: tuple[float, float, float, float]) -> np.ndarray:
    """Normalisation, grid lines, multi-scale equalisation and a contrast curve of a log-domain image (bone high),
    in place: uint16 display pixels. `factor` is the coarse grid on which the equalisation runs."""
    step, exposed = _exposed_sample(signal.shape, spacing, field_)
    top, bottom, left, right = field_
    lo, hi = np.percentile(signal[::step, ::step][exposed], [0.5, 99.5])
    signal -= lo
    signal *= 1.0 / max(hi - lo, 1e-6)
    if look["grid_lines"]:  # a stationary anti-scatter grid leaves fine stripes
        period = rng.uniform(2.2, 4.0)
        stripes = (look["grid_lines"] * np.sin(2 * np.pi * np.arange(signal.shape[1]) / period)).astype(np.float32)
        signal += stripes[None, :]
    f = factor
    coarse = np.clip(signal[(f - 1) // 2::f, (f - 1) // 2::f], -0.2, 1.2)
    mean = upsample(blur(coarse, look["eq_sigma_mm"] / (spacing * f)), f, signal.shape)
    # Multi-scale processing: y = latitude * (mean - 0.5) + 0.5 + detail * (signal - mean), in place.
    signal -= mean
    signal *= look["detail"]
    mean -= 0.5
    mean *= look["latitude"]
    signal += mean
    signal += 0.5
    del mean
    lo, hi = np.percentile(signal[::step, ::step][exposed], [look["p_low"], look["p_high"]])
    signal -= lo
    signal *= 1.0 / max(hi - lo, 1e-6)
    levels = 16384
    lut = _curve(np.linspace(0.0, 1.0, levels), look["curve"], look["curve_param"])
    lut = np.round(lut * (2**bits - 1) * look["headroom"]).astype(np.uint16)
    np.clip(signal, 0.0, 1.0, out=signal)
    signal *= levels - 1
    pixels = lut[signal.astype(np.uint16)]
    if shutter == "black":  # processing blanks everything outside the field, penumbra included
        penumbra = 2.0 / spacing
        r = np.arange(signal.shape[0])
        c = np.arange(signal.shape[1])
        pixels[(r < top + penumbra) | (r > bottom - penumbra), :] = 0
        pixels[:, (c < left + penumbra) | (c > right - penumbra)] = 0
    return pixels


def phantom_name(seed: int, index: int, style: str = "default") -> str:
    return f"phantom_s{seed}_{index:04d}" if style == "default" else f"phantom_{style}_s{seed}_{index:04d}"


def generate_phantom(seed: int, style: str = "default", index: int = 0,
                     severity: Sequence[float] = DEFAULT_SEVERITY,
                     size_range: tuple[int, int] = DEFAULT_SIZE_RANGE) -> Phantom:
    """One phantom, fully determined by (seed, index, style, severity, size_range)."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if seed < 0 or index < 0:
        raise ValueError("seed and index must be non-negative")
    alt = style == "alt"
    rng = np.random.default_rng([seed, index, _STYLE_CODE[style]])
    targets = target_subscores(seed, index, _STYLE_CODE[style], rng, severity)

    for _ in range(20):  # redraw the rare anatomy whose aorta leaves the Kauppila band
        anatomy = build_anatomy(rng, alt)
        corners_mm = {n: dict(zip(CORNER_NAMES, b.corners)) for n, b in anatomy.bodies.items()}
        bounds_mm, dirs_mm = disc_boundaries(corners_mm)
        if _band_clearance(anatomy, bounds_mm, dirs_mm) > 1.0:
            break
    else:
        raise RuntimeError(f"no phantom anatomy with the aorta inside the Kauppila band for seed {seed} index {index}")
    deposits = _deposits(rng, anatomy, targets, bounds_mm, dirs_mm)
    look = _look(rng, alt)

    mean_ap = float(np.mean([anatomy.bodies[n].ap for n in kauppila.VERTEBRAE]))
    key = [anatomy.bodies[n].corners for n in ("T12", "L1", "L2", "L3", "L4", "L5", "S1")]
    key += [anatomy.aorta_anterior, anatomy.spinous_tips[2:]]
    key += [anatomy.bodies[n].corners + anatomy.bodies[n].normal * 0.75 * mean_ap for n in kauppila.VERTEBRAE]
    acq = _acquisition(rng, size_range, np.vstack(key), alt)
    factor = max(1, int(round(0.45 / acq["spacing"])))
    place = Placement(acq["matrix"], acq["origin"], acq["spacing"], acq["shape"], factor)

    coarse = render_coarse(anatomy, place, look, rng)
    collimation, shutter, field_ = _collimation(rng, place, acq["key_px"])
    att = upsample(coarse + collimation, factor, place.shape)
    labels = np.zeros(place.shape, np.uint8)
    draw_bodies(att, labels, anatomy, place, look, rng, {n: i + 1 for i, n in enumerate(kauppila.VERTEBRAE)})
    walls = {"A": anatomy.aorta_anterior, "P": anatomy.aorta_posterior}
    lumen = {"A": -curve_normals(walls["A"]), "P": curve_normals(walls["P"])}
    for dep in deposits:
        wall = dep.get("polyline_mm", walls.get(dep["wall"]))
        inward = lumen.get(dep["wall"], np.zeros_like(wall))
        path, half, strength = _plaque_path(wall, arc_length(wall), inward, dep["start_mm"], dep["end_mm"], rng, look)
        draw_plaque(att, place.px(path), half / place.spacing, strength)
        dep["polyline"] = place.px(path)

    bits = int(rng.choice([12, 14, 15, 16]))
    pixels = _process(att, place, look, rng, bits, shutter, field_)
    del att
    settings = _dicom_settings(rng, seed, index, style, place, acq, bits)
    marker_value = int((2**bits - 1) * look["headroom"])
    settings["markers"] = _markers(rng, pixels, place, acq["key_px"], field_, settings["marker_letter"], marker_value)
    truth = _truth(anatomy, place, acq, deposits, targets, settings)
    truth.update(name=phantom_name(seed, index, style), seed=seed, index=index, style=style)
    return Phantom(truth["name"], pixels, labels, truth, settings)


def _truth(anatomy: Anatomy, place: Placement, acq: dict, deposits: list[dict], targets: dict[str, int],
           settings: dict) -> dict:
    """Ground truth in image pixels, measured from the drawn geometry and plaques."""
    corners = {n: dict(zip(CORNER_NAMES, place.px(b.corners))) for n, b in anatomy.bodies.items()}
    boundaries, directions = disc_boundaries(corners)
    walls = {"A": place.px(anatomy.aorta_anterior), "P": place.px(anatomy.aorta_posterior)}
    scale = 1.0 / place.spacing  # similarity: arc lengths in px are mm / spacing
    fractions, subscores = {}, {}
    for wall_name, wall in walls.items():
        spans = [(d["start_mm"] * scale, d["end_mm"] * scale) for d in deposits if d["wall"] == wall_name]
        for level, fraction in zip(kauppila.SCORED_LEVELS, calcified_fractions(wall, spans, boundaries, directions)):
            fractions[f"{level}{wall_name}"] = fraction
            subscores[f"{level}{wall_name}"] = kauppila.wall_subscore(min(fraction, 1.0))
    if subscores != targets:
        raise AssertionError(f"drawn subscores {subscores} differ from the targets {targets}")
    anterior = unit(place.matrix @ np.array([0.0, 1.0]))
    inferior = unit(place.matrix @ np.array([1.0, 0.0]))
    # T12/L1 as geometry/spine.py extrapolates it without T12: half the linearly extrapolated disc height above L1's
    # superior endplate, along that endplate's normal (the truth itself uses the drawn T12 and L1).
    mid = {n: {w: (c[f"{w}_anterior"] + c[f"{w}_posterior"]) / 2 for w in ("superior", "inferior")}
           for n, c in corners.items()}
    h12 = np.linalg.norm(mid["L2"]["superior"] - mid["L1"]["inferior"])
    h23 = np.linalg.norm(mid["L3"]["superior"] - mid["L2"]["inferior"])
    h_t12 = float(np.clip(2 * h12 - h23, 0.5 * h12, 1.5 * h12))
    endplate = unit(corners["L1"]["superior_anterior"] - corners["L1"]["superior_posterior"])
    down = np.array([-endplate[1], endplate[0]])
    down = down if down @ inferior > 0 else -down
    mean_ap = float(np.mean([np.linalg.norm(corners[n]["superior_anterior"] - corners[n]["superior_posterior"]) / 2 +
                             np.linalg.norm(corners[n]["inferior_anterior"] - corners[n]["inferior_posterior"]) / 2
                             for n in kauppila.VERTEBRAE]))
    segments = {}
    for k, level in enumerate(kauppila.SCORED_LEVELS):
        a, b = corners[level]["superior_anterior"], corners[level]["inferior_anterior"]
        along = unit(b - a)
        normal = np.array([-along[1], along[0]]) * (1 if np.array([-along[1], along[0]]) @ anterior > 0 else -1)
        poly = []
        for depth in (0.0, 0.75 * mean_ap):
            for p, d in ((boundaries[k], directions[k]), (boundaries[k + 1], directions[k + 1])):
                base = a + normal * depth
                t = np.linalg.solve(np.array([along, -d]).T, p - base)[0]
                poly.append(base + along * t)
        # top-inner, top-outer, bottom-outer, bottom-inner, as geometry.spine.AorticSegment
        segments[level] = np.array([poly[0], poly[2], poly[3], poly[1]])

    def r(x):
        return np.round(np.asarray(x, float), 3).tolist()

    aac24 = kauppila.total_score(subscores)
    return dict(
        image_shape=list(place.shape), spacing=[place.spacing, place.spacing],
        anterior="right" if acq["facing"] > 0 else "left", anterior_vector=r(anterior), inferior_vector=r(inferior),
        rotation_deg=round(float(np.degrees(acq["angle"])), 3),
        vertebrae={n: {k: r(v) for k, v in c.items()} for n, c in corners.items()},
        boundary_names=list(BOUNDARY_NAMES), boundaries=r(boundaries), boundary_directions=r(directions),
        t12_l1_extrapolated=r(mid["L1"]["superior"] - down * h_t12 / 2),
        t12_disc_height_extrapolated_px=round(h_t12, 3),
        mean_ap_px=round(mean_ap, 3), segments={k: r(v) for k, v in segments.items()},
        aorta={"anterior_wall": r(walls["A"]), "posterior_wall": r(walls["P"]),
               "diameter_mm": round(anatomy.aorta_diameter, 3)},
        deposits=[dict(wall=d["wall"], level=d["level"], start_px=round(d["start_mm"] * scale, 3),
                       end_px=round(d["end_mm"] * scale, 3), polyline=r(d["polyline"])) for d in deposits],
        fractions={k: round(v, 6) for k, v in fractions.items()}, subscores=subscores, aac24=aac24,
        category=kauppila.category(aac24),
        dicom={k: v for k, v in settings.items() if k not in ("uids",)},
    )


# ------------------------------------------------------------------------------------------------------- DICOM


def _dicom_settings(rng: np.random.Generator, seed: int, index: int, style: str, place: Placement, acq: dict,
                    bits: int) -> dict:
    from pydicom.uid import (JPEG2000Lossless, JPEGLSLossless, RLELossless, ExplicitVRLittleEndian,
                             generate_uid)

    name = phantom_name(seed, index, style)
    syntaxes = [ExplicitVRLittleEndian, RLELossless, JPEGLSLossless, JPEG2000Lossless]
    syntax = syntaxes[int(rng.choice(4, p=[0.4, 0.25, 0.25, 0.1]))]
    spacing_tags = str(rng.choice(["PixelSpacing", "ImagerPixelSpacing+EMF", "both"], p=[0.4, 0.35, 0.25]))
    rescale = None
    if rng.random() < 0.35:
        rescale = (float(rng.choice([0.25, 0.5, 1.0, 2.0])), float(rng.choice([0.0, -1024.0, 100.0, 1000.0])))
    view = str(rng.choice(["LL", "RL"]))
    orientation = None
    if rng.random() < 0.6:
        orientation = ["A" if acq["facing"] > 0 else "P", "F"]
    return dict(
        transfer_syntax=str(syntax), transfer_syntax_name=syntax.name,
        photometric="MONOCHROME1" if rng.random() < 0.3 else "MONOCHROME2", bits_stored=bits,
        rescale=rescale, spacing_tags=spacing_tags, magnification=round(float(rng.uniform(1.05, 1.25)), 4),
        patient_orientation=orientation, view_position=view, marker_letter=view[0],
        window=bool(rng.random() < 0.7), kvp=round(float(rng.uniform(75, 100)), 1),
        study_date=f"20{rng.integers(15, 26):02d}{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}",
        uids={k: generate_uid(entropy_srcs=[name, k]) for k in ("study", "series", "sop", "frame")},
    )


def phantom_dataset(phantom: Phantom):
    """The DICOM DX dataset of a phantom (compressed when its transfer syntax says so)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

    s = phantom.dataset
    max_value = 2 ** s["bits_stored"] - 1
    stored = (max_value - phantom.pixels).astype(np.uint16) if s["photometric"] == "MONOCHROME1" else phantom.pixels
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray, For Presentation
    ds.file_meta.MediaStorageSOPInstanceUID = s["uids"]["sop"]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = s["uids"]["sop"]
    ds.StudyInstanceUID = s["uids"]["study"]
    ds.SeriesInstanceUID = s["uids"]["series"]
    ds.FrameOfReferenceUID = s["uids"]["frame"]
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.Manufacturer = "AACScore"
    ds.ManufacturerModelName = f"phantom generator ({phantom.truth['style']})"
    ds.PatientName = f"Phantom^{phantom.name}"
    ds.PatientID = phantom.name
    ds.StudyDate = ds.SeriesDate = s["study_date"]
    ds.StudyID = ds.AccessionNumber = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = phantom.truth["index"] + 1
    ds.BodyPartExamined = "LSPINE"
    ds.ViewPosition = s["view_position"]
    ds.KVP = s["kvp"]
    ds.BurnedInAnnotation = "YES" if s.get("markers") else "NO"
    ds.LossyImageCompression = "00"
    if s["patient_orientation"]:
        ds.PatientOrientation = s["patient_orientation"]
    spacing = phantom.truth["spacing"][0]
    if s["spacing_tags"] in ("PixelSpacing", "both"):
        ds.PixelSpacing = [f"{spacing:.6f}", f"{spacing:.6f}"]
    if s["spacing_tags"] in ("ImagerPixelSpacing+EMF", "both"):
        imager = spacing * s["magnification"]
        ds.ImagerPixelSpacing = [f"{imager:.6f}", f"{imager:.6f}"]
        ds.EstimatedRadiographicMagnificationFactor = s["magnification"]
    ds.Rows, ds.Columns = phantom.pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = s["photometric"]
    ds.BitsAllocated = 16
    ds.BitsStored = s["bits_stored"]
    ds.HighBit = s["bits_stored"] - 1
    ds.PixelRepresentation = 0
    slope, intercept = s["rescale"] or (1.0, 0.0)
    if s["rescale"]:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.RescaleType = "US"
    if s["window"]:
        ds.WindowCenter = round(slope * max_value / 2 + intercept, 2)
        ds.WindowWidth = round(slope * max_value, 2)
    ds.PixelData = stored.tobytes()
    if s["transfer_syntax"] != ExplicitVRLittleEndian:
        ds.compress(UID(s["transfer_syntax"]), stored)
    return ds


# ------------------------------------------------------------------------------------------------------ writing


def write_phantom(phantom: Phantom, out_dir: str | Path) -> Path:
    """Write `<name>.dcm`, `<name>_labels.png` and `<name>_truth.json`, each atomically."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dcm = out / f"{phantom.name}.dcm"
    ds = phantom_dataset(phantom)
    with atomic_path(dcm) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    with atomic_path(out / f"{phantom.name}_labels.png") as tmp:
        Image.fromarray(phantom.labels).save(tmp)
    truth = dict(phantom.truth, file=dcm.name, labels=f"{phantom.name}_labels.png")
    write_text_atomic(out / f"{phantom.name}_truth.json", json.dumps(truth, indent=1))
    return dcm


def truth_row(phantom: Phantom) -> dict[str, object]:
    t = phantom.truth
    return dict(file=f"{phantom.name}.dcm", labels=f"{phantom.name}_labels.png", aac24=t["aac24"],
                category=t["category"], **t["subscores"])


def write_truth_csv(path: str | Path, rows: Sequence[dict[str, object]]) -> None:
    """Merge `rows` into `truth.csv` (rows of other files already there are kept), sorted by file, atomically."""
    path = Path(path)
    merged: dict[str, dict[str, object]] = {}
    if path.exists():
        with open(path, newline="") as stream:
            merged = {row["file"]: row for row in csv.DictReader(stream) if row.get("file")}
    merged.update({str(row["file"]): row for row in rows})

    def write(stream) -> None:
        writer = csv.DictWriter(stream, fieldnames=TRUTH_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(merged[k] for k in sorted(merged))

    write_atomic(path, write)


def check_styles(styles: Sequence[str]) -> tuple[str, ...]:
    """The styles, refused with a clear message when empty or unknown (command lines take them comma-separated)."""
    unknown = sorted(set(styles) - set(STYLES)) if styles else ["(none)"]
    if unknown:
        raise AACScoreError(f"phantom styles must be among {', '.join(STYLES)}; got {', '.join(unknown)}")
    return tuple(styles)


def parse_styles(text: str) -> tuple[str, ...]:
    """Styles written comma-separated on a command line ("default,alt")."""
    return check_styles([style.strip() for style in text.split(",") if style.strip()])


@dataclass(frozen=True)
class PhantomSource:
    """Phantom `index` of `seed` as a training case made in memory (segmentation.dataset.load_case), read back without
    the cost of encoding and decoding its DICOM (see read_back)."""

    seed: int
    index: int
    style: str = "default"

    def load(self) -> tuple[Radiograph, np.ndarray]:
        phantom = generate_phantom(self.seed, self.style, self.index)
        return read_back(phantom, f"phantoms_s{self.seed}/{phantom.name}.dcm"), phantom.labels


def read_back(phantom: Phantom, path: str | None = None) -> Radiograph:
    """The radiograph a reader returns from the phantom's written DICOM, without writing it: the same pixels up to
    the linear rescale and MONOCHROME1 inversion the reader undoes, the same spacing and orientation."""
    orientation = phantom.dataset["patient_orientation"]
    return Radiograph(pixels=phantom.pixels.astype(np.float32), spacing=tuple(phantom.truth["spacing"]),
                      spacing_source="phantom", path=path or f"{phantom.name}.dcm", format="DICOM",
                      patient_orientation=tuple(orientation) if orientation else None)


def phantom_sources(n: int, seed: int, styles: Sequence[str] = ("default",)) -> list[PhantomSource]:
    """Phantoms 0..n-1 of `seed` as in-memory training cases, the styles taken in turn."""
    styles = check_styles(styles)
    return [PhantomSource(seed, index, styles[index % len(styles)]) for index in range(n)]


def write_phantoms(out_dir: str | Path, n: int, seed: int, style: str = "default",
                   severity: Sequence[float] = DEFAULT_SEVERITY, size_range: tuple[int, int] = DEFAULT_SIZE_RANGE,
                   start: int = 0, progress=None) -> list[Path]:
    """Generate and write phantoms `start .. start+n-1`, then merge their rows into `out_dir/truth.csv`."""
    paths, rows = [], []
    for index in range(start, start + n):
        began = time.perf_counter()
        phantom = generate_phantom(seed, style, index, severity, size_range)
        generated = time.perf_counter()
        paths.append(write_phantom(phantom, out_dir))
        rows.append(truth_row(phantom))
        if progress:
            progress(phantom, generated - began, time.perf_counter() - generated)
        if len(rows) % 25 == 0:
            write_truth_csv(Path(out_dir) / "truth.csv", rows)
    write_truth_csv(Path(out_dir) / "truth.csv", rows)
    return paths


# ---------------------------------------------------------------------------------------------------------- CLI


def _numbers(text: str, count: int, kind=float) -> tuple:
    try:
        values = tuple(kind(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {count} comma-separated numbers, got {text!r}") from None
    if len(values) != count or any(v < 0 for v in values) or sum(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected {count} non-negative comma-separated numbers, got {text!r}")
    return values


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _size_range(text: str) -> tuple[int, int]:
    low, high = _numbers(text, 2, int)
    if not 64 <= low <= high:
        raise argparse.ArgumentTypeError(f"size range must be LOW,HIGH with 64 <= LOW <= HIGH, got {text!r}")
    return low, high


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "phantoms", help="write synthetic lateral lumbar radiographs with exact AAC-24 truth",
        description="Write DICOM phantoms, <name>_labels.png (1..5 = L1..L5), <name>_truth.json and truth.csv.")
    parser.add_argument("--n", type=_non_negative, required=True, help="number of phantoms")
    parser.add_argument("--seed", type=_non_negative, default=0,
                        help="random seed; (seed, index, style, severity, size range) fix a phantom")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--style", choices=STYLES, default="default",
                        help="generator setting: default (training) or alt (held-out robustness tests)")
    parser.add_argument("--severity", type=lambda t: _numbers(t, 3), default=DEFAULT_SEVERITY,
                        help="share of no/mild, moderate, severe phantoms (default 0.25,0.60,0.15)")
    parser.add_argument("--size-range", type=_size_range, default=DEFAULT_SIZE_RANGE,
                        help="image side lengths in pixels, LOW,HIGH (default 1500,3000)")
    parser.add_argument("--start", type=_non_negative, default=0, help="index of the first phantom (to extend a set)")
    parser.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    def report(phantom: Phantom, gen_s: float, write_s: float) -> None:
        t = phantom.truth
        print(f"{phantom.name}: {phantom.pixels.shape[0]}x{phantom.pixels.shape[1]} AAC-24 {t['aac24']} "
              f"({t['category']}), anterior {t['anterior']}, {phantom.dataset['transfer_syntax_name']}, "
              f"generated in {gen_s:.2f} s, written in {write_s:.2f} s", flush=True)

    write_phantoms(args.out, args.n, args.seed, args.style, args.severity, args.size_range, args.start, report)
    print(f"truth: {Path(args.out) / 'truth.csv'}")
    return 0

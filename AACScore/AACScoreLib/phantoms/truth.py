"""What a phantom is and how its Kauppila truth is measured from what was drawn, shared by every family.

Truth by construction: plaques are placed as intervals of arc length along the aortic walls, and the calcified
fraction of each wall between two segment boundary lines (disc mid-points along the disc mid-planes, as in
geometry/spine.py) is measured from those intervals, never assumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .. import kauppila
from ..io.labelmaps import vertebra_labels
from .anatomy import BOUNDARY_NAMES, CORNER_NAMES, Anatomy, Placement, disc_boundaries, unit

DEFAULT_SEVERITY: tuple[float, float, float] = (0.25, 0.60, 0.15)
DEFAULT_SIZE_RANGE: tuple[int, int] = (1500, 3000)
# Calcified fractions drawn for each subscore keep clear of the 1/3 and 2/3 thresholds, so that small geometric
# differences (a segmentation a few pixels off) cannot change a subscore.
FRACTION_RANGES: dict[int, tuple[float, float]] = {1: (0.07, 0.26), 2: (0.40, 0.60), 3: (0.74, 0.93)}
END_MARGIN_MM = 1.5  # plaques stay this far (or 5 % of the segment) from the segment boundaries
GAP_MM = 1.5  # minimum gap between two plaques of one wall segment


@dataclass
class Phantom:
    """One generated radiograph: display pixels (bone bright, unless a family drew an inverted look), label map,
    truth, the DICOM settings to write, and the plaque that counts."""

    name: str
    pixels: np.ndarray  # uint16 (H, W) display values, before MONOCHROME1 inversion or rescale
    label_map: np.ndarray  # uint8 (H, W): 0 background, 1..5 = L1..L5, 6 = T12, 7 = S1 where in view; as written
    truth: dict
    dataset: dict  # photometric, bits, rescale, spacing tags, orientation, transfer syntax, UIDs...
    plaque_mask: np.ndarray | None = None  # bool (H, W): drawn plaque on the L1..L4 walls, the plaque that counts

    @property
    def labels(self) -> np.ndarray:
        """L1..L5 only (context classes read as background): what geometry and the scorer take."""
        return vertebra_labels(self.label_map)


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
    (golden-ratio steps from a per-seed offset) in the `severity` proportions; `code` tells families apart."""
    offset = np.random.default_rng([seed, 7919, code]).random()
    return sample_subscores((offset + (index + 1) * 0.6180339887498949) % 1.0, rng, severity)


def place_plaques(rng: np.random.Generator, span: tuple[float, float], subscore: int, pieces: int | None = None,
                  gap: float = GAP_MM) -> list[tuple[float, float]]:
    """Plaque intervals (arc positions) inside one wall segment whose union realises `subscore`: 1 to 3 pieces, or
    `pieces` when given. A count that cannot fit `gap` apart at the least fraction of the subscore is cut down, so
    the drawn fraction never falls below its range (a nearly full segment holds only a few pieces)."""
    if subscore == 0:
        return []
    top, bottom = span
    length = bottom - top
    margin = max(END_MARGIN_MM, 0.05 * length)
    low, high = FRACTION_RANGES[subscore]
    if pieces is None:
        pieces = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15] if subscore > 1 else [0.7, 0.3, 0.0]))
    fits = 1 + int((length - 2 * margin - low * length) // gap)
    pieces = max(1, min(pieces, fits))
    fraction = rng.uniform(low, min(high, (length - 2 * margin - (pieces - 1) * gap) / length))
    return lay_out_pieces(rng, top, length, margin, fraction * length, pieces, gap)


def lay_out_pieces(rng: np.random.Generator, top: float, length: float, margin: float, covered: float,
                   pieces: int, gap: float = GAP_MM) -> list[tuple[float, float]]:
    """`pieces` disjoint intervals of total length `covered` in [top + margin, top + length - margin], at least
    `gap` apart (one piece when they cannot fit)."""
    free = length - 2 * margin - covered - (pieces - 1) * gap
    if free < 0:
        pieces, free = 1, length - 2 * margin - covered
    sizes = covered * (0.3 / pieces + 0.7 * rng.dirichlet(np.ones(pieces)))
    shares = free * rng.dirichlet(np.ones(pieces + 1))
    gaps = [margin + shares[0]] + [gap + s for s in shares[1:-1]] + [margin + shares[-1]]
    out, cursor = [], top + gaps[0]
    for size, step in zip(sizes, gaps[1:]):
        out.append((cursor, cursor + size))
        cursor += size + step
    return out


def band_clearance(anatomy: Anatomy, boundaries: np.ndarray, directions: np.ndarray) -> float:
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


def phantom_name(seed: int, index: int, style: str = "default") -> str:
    return f"phantom_s{seed}_{index:04d}" if style == "default" else f"phantom_{style}_s{seed}_{index:04d}"


def measure_truth(anatomy: Anatomy, place: Placement, acq: dict, deposits: list[dict], targets: dict[str, int],
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

"""Kauppila geometry from an L1–L5 label map: vertebra corners, disc mid-planes, aortic segments and the paper's crop.

Corners come from four straight side lines (endplates and walls) fitted to the central part of each side of the
mask's sub-pixel edge, so rounded or slightly ragged corners do not move them; each corner is the intersection
of two adjacent side lines. The definitions (disc mid-points, T12/L1 extrapolation, segments, crop) are those of
the project contract, which the phantom generator uses to write its truth; T12/L1 is extrapolated across the disc
above L1 (along the normal of L1's superior endplate), and `inferior` is the L1 -> L5 centroid direction.

Geometry is computed in "iso" units: pixel coordinates scaled by spacing / min(spacing), so that perpendicular
and lengths are physical even for non-square pixels (for square pixels iso units are pixels). Points are
returned in radiograph pixel coordinates (row, col); lengths named *_px are in iso units (= pixels when square).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import ndimage

from ..errors import GeometryError
from ..kauppila import SCORED_LEVELS, VERTEBRAE
from .orientation import orientation_tag

ANTERIOR_LEFT = True  # crops are upright (superior at row 0) with anterior at column 0 (left)
CORNER_NAMES: tuple[str, ...] = ("superior_anterior", "superior_posterior", "inferior_posterior", "inferior_anterior")
ANTERIOR_MARGIN = 0.75  # x mean AP length: the crop's anterior margin and the aortic band's width (Shao et al. 2025)
SIDE_BAND = 0.6  # central fraction of each side used to fit its line, which keeps rounded corners out
MAX_STRAY_FRACTION = 0.05  # stray pieces of one label up to this share of its area are dropped
MERGED_AREA_RATIO = 1.7  # a label this many times larger than the median of the others holds two vertebrae
MIN_DISC_FRACTION = 0.05  # x mean body height: a thinner disc space (between endplate mid-points) means merged


@dataclass
class Vertebra:
    name: str
    label: int
    centroid: np.ndarray
    corners: dict[str, np.ndarray]
    superior_mid: np.ndarray
    inferior_mid: np.ndarray
    ap_length_px: float  # mean of the two endplate lengths
    height_px: float  # mean of the anterior and posterior wall lengths
    ap_length_mm: float | None = None
    height_mm: float | None = None


@dataclass
class AorticSegment:
    level: str
    top: np.ndarray
    bottom: np.ndarray
    polygon: np.ndarray  # (4, 2): top-inner, top-outer, bottom-outer, bottom-inner (inner = on the anterior wall line)


@dataclass
class Crop:
    affine: np.ndarray  # (3, 3): [row, col, 1] in crop pixels -> [row, col, 1] in the radiograph
    shape: tuple[int, int]


@dataclass
class SpineGeometry:
    vertebrae: list[Vertebra]
    boundaries: np.ndarray
    boundary_directions: np.ndarray
    segments: list[AorticSegment]
    anterior: np.ndarray
    inferior: np.ndarray
    anterior_source: str  # "caller" | "PatientOrientation" | "anatomy" | "default" (anatomy inconclusive)
    crop: Crop
    spacing: tuple[float, float] | None
    t12_inferior_border: np.ndarray | None = None  # L1.superior_mid - h(T12/L1) across the disc: the crop's top
    # anatomy votes in [-1, 1]; + votes for anterior = (-inferior[1], inferior[0]): image right when upright
    anterior_evidence: dict[str, float] = field(default_factory=dict)
    boxed: tuple[str, ...] = ()  # bodies whose sides are their box along the spine (`box_ragged`), not fitted lines

    @property
    def mean_ap_length_px(self) -> float:
        return float(np.mean([v.ap_length_px for v in self.vertebrae]))


@dataclass
class _Line:
    point: np.ndarray
    direction: np.ndarray  # unit

    def signed_distance(self, points: np.ndarray, towards: np.ndarray) -> np.ndarray:
        """Distance of points from the line, positive on the side of `towards`."""
        normal = np.array([-self.direction[1], self.direction[0]])
        if np.dot(towards - self.point, normal) < 0:
            normal = -normal
        return (points - self.point) @ normal


def analyze_spine(
    labels: np.ndarray,
    spacing: Sequence[float] | None = None,
    *,
    anterior: str | Sequence[float] | None = None,
    patient_orientation: Sequence[str] | str | None = None,
    image: np.ndarray | None = None,
    box_ragged: bool = False,
) -> SpineGeometry:
    """Kauppila geometry of an L1–L5 label map (0 background, 1..5 = L1..L5).

    anterior: "left" | "right" | a (row, col) vector, overriding PatientOrientation, which overrides anatomy
    (lumbar lordosis, and when `image` is given, posterior elements brighter behind the bodies).
    box_ragged: a body whose outline gives no four side lines (a ragged or partly missing segment) takes the
    sides of its box along the spine instead of raising, and is named in `boxed`; a segmenter's output is scored
    that way (and flagged), while truth written from drawn label maps stays exact.
    Raises GeometryError naming the missing, split, merged or out-of-order vertebra.
    """
    labels = _checked_labels(labels)
    scale = _iso_scale(spacing)
    bodies = _vertebra_masks(labels)
    _check_not_merged(bodies)
    for index, name in enumerate(VERTEBRAE):
        if index + 1 not in bodies:
            raise GeometryError(f"{name} is missing from the label map")

    points = [_edge_points(*bodies[index + 1]) * scale for index in range(len(VERTEBRAE))]
    centroids = np.array([_mask_centroid(*bodies[index + 1]) * scale for index in range(len(VERTEBRAE))])
    inferior = _unit(centroids[-1] - centroids[0])
    _check_order(centroids, inferior)
    across = np.array([-inferior[1], inferior[0]])

    sides, boxed = [], []
    for index, name in enumerate(VERTEBRAE):
        before, after = centroids[max(index - 1, 0)], centroids[min(index + 1, len(VERTEBRAE) - 1)]
        along = _unit(after - before)
        try:
            fitted = _fit_sides(name, points[index], centroids[index], along, across)
            _check_corners(name, _corners_of(fitted), points[index])
        except GeometryError:
            if not box_ragged:
                raise
            fitted = _box_sides(points[index], centroids[index], along, across)
            boxed.append(name)
        sides.append(fitted)

    sign, source, evidence = _anterior_sign(
        anterior, patient_orientation, image, labels.shape, scale, across, centroids, inferior, sides
    )
    anterior_iso = sign * across

    vertebrae = []
    for index, name in enumerate(VERTEBRAE):
        top, bottom, plus, minus = sides[index]
        front, back = (plus, minus) if sign > 0 else (minus, plus)
        corners = {
            "superior_anterior": _intersect(top, front),
            "superior_posterior": _intersect(top, back),
            "inferior_posterior": _intersect(bottom, back),
            "inferior_anterior": _intersect(bottom, front),
        }
        vertebrae.append(_make_vertebra(name, index + 1, centroids[index], corners))

    _check_disc_spaces(vertebrae, inferior)
    boundaries, directions, t12_border = _disc_boundaries(vertebrae, inferior)
    mean_ap = float(np.mean([v.ap_length_px for v in vertebrae]))
    segments = [
        _aortic_segment(vertebrae[k], boundaries[k], directions[k], boundaries[k + 1], directions[k + 1],
                        anterior_iso, ANTERIOR_MARGIN * mean_ap)
        for k in range(len(SCORED_LEVELS))
    ]
    crop = _paper_crop(vertebrae, t12_border, inferior, anterior_iso, ANTERIOR_MARGIN * mean_ap, scale)

    mm = None if spacing is None else float(min(spacing))
    return SpineGeometry(
        vertebrae=[_vertebra_in_pixels(v, scale, mm) for v in vertebrae],
        boundaries=boundaries / scale,
        boundary_directions=np.array([_unit(d / scale) for d in directions]),
        segments=[AorticSegment(s.level, s.top / scale, s.bottom / scale, s.polygon / scale) for s in segments],
        anterior=_unit(anterior_iso / scale),
        inferior=_unit(inferior / scale),
        anterior_source=source,
        crop=crop,
        spacing=None if spacing is None else (float(spacing[0]), float(spacing[1])),
        t12_inferior_border=t12_border / scale,
        anterior_evidence=evidence,
        boxed=tuple(boxed),
    )


# ---------------------------------------------------------------------------------------------------- validation


def _checked_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise GeometryError(f"the label map must be a 2D array, got shape {labels.shape}")
    if labels.dtype == bool or labels.dtype.kind not in "iuf":
        raise GeometryError(f"the label map must hold integer labels 0..5, got dtype {labels.dtype}")
    if labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels)):
        raise GeometryError("the label map holds non-integer values; expected labels 0..5")
    low, high = labels.min(), labels.max()
    if low < 0 or high > len(VERTEBRAE):
        bad = low if low < 0 else high
        raise GeometryError(f"the label map holds label {int(bad)}; expected only 0 (background) and 1..5 (L1..L5)")
    if high == 0:
        raise GeometryError("the label map is empty: no vertebra is labelled (expected 1..5 = L1..L5)")
    return labels if labels.dtype == np.uint8 else labels.astype(np.uint8)


def _iso_scale(spacing: Sequence[float] | None) -> np.ndarray:
    if spacing is None:
        return np.ones(2)
    values = np.asarray(spacing, dtype=float)
    if values.shape != (2,) or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"spacing must be two positive numbers (row_mm, col_mm), got {spacing!r}")
    return values / values.min()


def _vertebra_masks(labels: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Label -> (its largest piece with holes filled, padded by one pixel; the mask's (row, col) offset)."""
    bodies = {}
    for label, box in enumerate(ndimage.find_objects(labels, max_label=len(VERTEBRAE)), start=1):
        if box is None:
            continue
        name = VERTEBRAE[label - 1]
        mask = labels[box] == label
        pieces, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
        if count > 1:
            sizes = np.bincount(pieces.ravel())[1:]
            largest = int(np.argmax(sizes))
            stray = 1.0 - sizes[largest] / sizes.sum()
            if stray > MAX_STRAY_FRACTION:
                raise GeometryError(
                    f"{name} is in {count} disconnected pieces (the smaller ones hold {stray:.0%} of its area); "
                    "the segmentation is broken there"
                )
            inner = ndimage.find_objects((pieces == largest + 1).astype(np.uint8))[0]
            mask = pieces[inner] == largest + 1
            box = tuple(slice(b.start + i.start, b.start + i.stop) for b, i in zip(box, inner))
        offset = np.array([box[0].start - 1, box[1].start - 1], dtype=float)
        bodies[label] = (np.pad(ndimage.binary_fill_holes(mask), 1), offset)  # holes would add inner edges
    return bodies


def _check_not_merged(bodies: dict[int, tuple[np.ndarray, np.ndarray]]) -> None:
    """Two vertebrae under one label make it about twice as large as the others (before any is reported missing,
    since the merge is what shifted the labels)."""
    areas = {label: int(mask.sum()) for label, (mask, _) in bodies.items()}
    if len(areas) < 3:
        return
    for label, area in areas.items():
        others = np.median([a for other, a in areas.items() if other != label])
        if area > MERGED_AREA_RATIO * others:
            raise GeometryError(
                f"{VERTEBRAE[label - 1]} appears to hold two merged vertebrae: its area is "
                f"{area / others:.1f} times the median of the others"
            )


def _check_order(centroids: np.ndarray, inferior: np.ndarray) -> None:
    along = (centroids - centroids[0]) @ inferior
    for index in range(1, len(VERTEBRAE)):
        for above in range(index):
            if along[index] <= along[above]:
                raise GeometryError(
                    f"{VERTEBRAE[index]} lies above {VERTEBRAE[above]}: the labels are not in L1..L5 order "
                    "along the spine"
                )


def _check_disc_spaces(vertebrae: list[Vertebra], inferior: np.ndarray) -> None:
    """Labels that overlap or touch along a whole endplate leave no disc space: one body split in two, or two
    bodies in contact, and the boundary between them would be meaningless."""
    mean_height = np.mean([v.height_px for v in vertebrae])
    for above, below in zip(vertebrae, vertebrae[1:]):
        gap = float((below.superior_mid - above.inferior_mid) @ inferior)
        if gap < MIN_DISC_FRACTION * mean_height:
            raise GeometryError(
                f"{above.name} and {below.name} appear merged: there is no disc space between them "
                f"({gap:.1f} px between their endplates)"
            )


def _check_corners(name: str, corners: dict[str, np.ndarray], points: np.ndarray) -> None:
    low, high = points.min(axis=0), points.max(axis=0)
    slack = 0.25 * (high - low)
    for corner in corners.values():
        if not (np.all(np.isfinite(corner)) and np.all(corner > low - slack) and np.all(corner < high + slack)):
            raise GeometryError(f"{name} does not look like a vertebral body: its four sides could not be fitted")


# ------------------------------------------------------------------------------------------------ side fitting


def _edge_points(mask: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Sub-pixel edge: the mid-points between each inside pixel and its outside 4-neighbours (unbiased)."""
    rows, cols = np.nonzero(mask[:, :-1] != mask[:, 1:])
    across_cols = np.column_stack([rows, cols + 0.5])
    rows, cols = np.nonzero(mask[:-1, :] != mask[1:, :])
    across_rows = np.column_stack([rows + 0.5, cols])
    return np.vstack([across_cols, across_rows]) + offset


def _mask_centroid(mask: np.ndarray, offset: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    return np.array([rows.mean(), cols.mean()]) + offset


def _fit_line(points: np.ndarray, what: str) -> _Line:
    """Total-least-squares line, refitted twice without points beyond 3 robust sigmas (corners, osteophytes)."""
    for _ in range(3):
        if len(points) < 5:
            raise GeometryError(f"{what} could not be found: the label looks malformed")
        mean = points.mean(axis=0)
        _, vectors = np.linalg.eigh(np.cov((points - mean).T))
        direction = vectors[:, 1]
        residual = (points - mean) @ vectors[:, 0]
        sigma = 1.4826 * np.median(np.abs(residual - np.median(residual)))
        keep = np.abs(residual) <= max(3.0 * sigma, 1.0)
        if keep.all():
            break
        points = points[keep]
    return _Line(mean, direction)


def _between(points: np.ndarray, first: _Line, second: _Line) -> np.ndarray:
    """0 on the first line, 1 on the second, for points between two roughly parallel lines."""
    d1 = first.signed_distance(points, second.point)
    d2 = second.signed_distance(points, first.point)
    with np.errstate(divide="ignore", invalid="ignore"):
        return d1 / (d1 + d2)


def _fit_sides(name: str, points: np.ndarray, centroid: np.ndarray, inferior: np.ndarray, across: np.ndarray):
    """Superior, inferior, +across and -across side lines of one vertebral body, from its edge points."""
    v_dir = np.array([-inferior[1], inferior[0]])
    if np.dot(v_dir, across) < 0:
        v_dir = -v_dir
    u = (points - centroid) @ inferior
    v = (points - centroid) @ v_dir
    margin = 0.5 * (1.0 - SIDE_BAND) * (v.max() - v.min())
    central = (v > v.min() + margin) & (v < v.max() - margin)
    low, high = 0.5 * (1.0 - SIDE_BAND), 0.5 * (1.0 + SIDE_BAND)
    top = _fit_line(points[central & (u < 0)], f"the superior endplate of {name}")
    bottom = _fit_line(points[central & (u > 0)], f"the inferior endplate of {name}")
    for _ in range(2):
        t = _between(points, top, bottom)
        walls = (t > low) & (t < high)
        plus = _fit_line(points[walls & (v > 0)], f"a wall of {name}")
        minus = _fit_line(points[walls & (v < 0)], f"a wall of {name}")
        s = _between(points, minus, plus)
        endplates = (s > low) & (s < high)
        top = _fit_line(points[endplates & (t < 0.5)], f"the superior endplate of {name}")
        bottom = _fit_line(points[endplates & (t > 0.5)], f"the inferior endplate of {name}")
    t = _between(points, top, bottom)
    walls = (t > low) & (t < high)
    plus = _fit_line(points[walls & (v > 0)], f"a wall of {name}")
    minus = _fit_line(points[walls & (v < 0)], f"a wall of {name}")
    return top, bottom, plus, minus


def _box_sides(points: np.ndarray, centroid: np.ndarray, inferior: np.ndarray,
               across: np.ndarray) -> tuple[_Line, _Line, _Line, _Line]:
    """Superior, inferior, +across and -across sides of the body's box along the local spine axis, from robust
    extremes of its edge (2nd and 98th percentiles, so that a spur or a stray edge does not widen it)."""
    v_dir = np.array([-inferior[1], inferior[0]])
    if np.dot(v_dir, across) < 0:
        v_dir = -v_dir
    u_low, u_high = np.percentile((points - centroid) @ inferior, [2, 98])
    v_low, v_high = np.percentile((points - centroid) @ v_dir, [2, 98])
    return (_Line(centroid + u_low * inferior, v_dir), _Line(centroid + u_high * inferior, v_dir),
            _Line(centroid + v_high * v_dir, inferior), _Line(centroid + v_low * v_dir, inferior))


def _corners_of(sides) -> dict[str, np.ndarray]:
    """The four intersections of a body's side lines, whichever side is anterior."""
    top, bottom, plus, minus = sides
    return {"top_plus": _intersect(top, plus), "top_minus": _intersect(top, minus),
            "bottom_plus": _intersect(bottom, plus), "bottom_minus": _intersect(bottom, minus)}


def _intersect(a: _Line, b: _Line) -> np.ndarray:
    matrix = np.column_stack([a.direction, -b.direction])
    if abs(np.linalg.det(matrix)) < 1e-9:
        return np.full(2, np.nan)
    t = np.linalg.solve(matrix, b.point - a.point)
    return a.point + t[0] * a.direction


def _unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=float)
    return vector / np.linalg.norm(vector)


# ----------------------------------------------------------------------------------------------------- anterior


def _anterior_sign(anterior, patient_orientation, image, shape, scale, across, centroids, inferior, sides):
    """+1 when anterior is +across, -1 otherwise, with where that came from and the anatomy votes."""
    if anterior is not None:
        vector = _caller_vector(anterior)
        alignment = np.dot(_unit(vector * scale), across)
        if abs(alignment) < 0.2:
            raise GeometryError(f"the anterior direction given ({anterior!r}) runs along the spine, not across it")
        return (1 if alignment > 0 else -1), "caller", {}
    vector = _orientation_vector(patient_orientation)
    if vector is not None:
        alignment = np.dot(_unit(vector * scale), across)
        if abs(alignment) >= 0.2:
            return (1 if alignment > 0 else -1), "PatientOrientation", {}
    evidence = {"lordosis": _lordosis_vote(centroids, inferior, across)}
    if image is not None:
        evidence["image"] = _posterior_elements_vote(image, shape, scale, sides)
    # the posterior elements are always there, while lordosis flattens or even reverses in some elderly spines
    total = evidence["lordosis"] + 1.5 * evidence.get("image", 0.0)
    if abs(total) >= 0.2:
        return (1 if total > 0 else -1), "anatomy", evidence
    default = np.dot(np.array([0.0, -1.0]) * scale, across)  # the usual display: patient facing left
    if abs(default) < 0.2:
        default = np.dot(np.array([-1.0, 0.0]) * scale, across)
    return (1 if default > 0 else -1), "default", evidence


def _caller_vector(anterior) -> np.ndarray:
    if isinstance(anterior, str):
        named = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0)}
        if anterior.lower() not in named:
            raise ValueError(f"anterior must be 'left', 'right' or a (row, col) vector, got {anterior!r}")
        return np.array(named[anterior.lower()])
    vector = np.asarray(anterior, dtype=float)
    if vector.shape != (2,) or not np.all(np.isfinite(vector)) or not np.any(vector):
        raise ValueError(f"anterior must be 'left', 'right' or a non-zero (row, col) vector, got {anterior!r}")
    return vector


def _orientation_vector(patient_orientation) -> np.ndarray | None:
    """Anterior as a (row, col) vector from DICOM PatientOrientation (increasing column, increasing row)."""
    tag = orientation_tag(patient_orientation)
    if tag is None:
        return None
    column, row = tag
    vector = np.array([("A" in row) - ("P" in row), ("A" in column) - ("P" in column)], dtype=float)
    return vector if np.any(vector) else None


def _lordosis_vote(centroids: np.ndarray, inferior: np.ndarray, across: np.ndarray) -> float:
    """Lumbar lordosis bulges anteriorly: + when the centroid curve bulges towards +across (full vote at 3%)."""
    t = (centroids - centroids[0]) @ inferior
    s = (centroids - centroids[0]) @ across
    curvature = np.polyfit(t, s, 2)[0]
    length = t[-1] - t[0]
    bulge = -curvature * (length / 2.0) ** 2
    return float(np.clip(bulge / (0.03 * length), -1.0, 1.0))


def _posterior_elements_vote(image, shape, scale, sides) -> float:
    """Pedicles, facets and laminae fill the band behind the bodies with bone edges, while the band in front holds
    smoother soft tissue: + when the -across band has more edge energy (so +across is anterior). Edge energy, not
    brightness: how bright the soft tissue in front is depends on the patient and the processing."""
    image = np.asarray(image)
    if image.shape != tuple(shape):
        raise ValueError(f"image shape {image.shape} differs from the label map's {tuple(shape)}")
    along = np.linspace(0.0, 1.0, 15)
    depth = np.linspace(0.1, 1.0, 12)
    bands, widths = [], []
    for top, bottom, plus, minus in sides:
        walls = {side: (_intersect(top, line), _intersect(bottom, line)) for side, line in (("+", plus), ("-", minus))}
        width = np.linalg.norm(walls["+"][0] - walls["-"][0])
        widths.append(np.linalg.norm((walls["+"][0] - walls["-"][0]) / scale))
        for side, (upper, lower) in walls.items():
            outward = np.array([-(lower - upper)[1], (lower - upper)[0]])
            outward = _unit(outward if np.dot(walls["-" if side == "+" else "+"][0] - upper, outward) < 0 else -outward)
            wall = upper + along[:, None] * (lower - upper)
            bands.append((wall[:, None, :] + depth[None, :, None] * width * outward).reshape(-1, 2) / scale)
    # edge energy on a block-averaged copy of the spine's surroundings: ~50 samples per AP length, noise averaged
    factor = max(1, int(np.mean(widths) / 50))
    points = np.vstack(bands)
    low = np.clip(np.floor(points.min(axis=0)).astype(int) - factor, 0, None)
    high = np.minimum(np.ceil(points.max(axis=0)).astype(int) + factor + 1, shape)
    region = _block_mean(image[low[0]:high[0], low[1]:high[1]].astype(np.float32), factor)
    energy = np.hypot(*np.gradient(region))
    means = [ndimage.map_coordinates(energy, ((band - low - (factor - 1) / 2.0) / factor).T, order=1,
                                     mode="nearest").mean() for band in bands]
    plus_energy, minus_energy = np.array(means[0::2]), np.array(means[1::2])
    contrast = (minus_energy - plus_energy) / (minus_energy + plus_energy + 1e-12)
    return float(np.clip(np.median(contrast) / 0.2, -1.0, 1.0))


# ------------------------------------------------------------------------------------------- Kauppila geometry


def _make_vertebra(name: str, label: int, centroid: np.ndarray, corners: dict[str, np.ndarray]) -> Vertebra:
    sa, sp, ip, ia = (corners[key] for key in CORNER_NAMES)
    return Vertebra(
        name=name,
        label=label,
        centroid=centroid,
        corners=corners,
        superior_mid=(sa + sp) / 2.0,
        inferior_mid=(ia + ip) / 2.0,
        ap_length_px=float((np.linalg.norm(sa - sp) + np.linalg.norm(ia - ip)) / 2.0),
        height_px=float((np.linalg.norm(sa - ia) + np.linalg.norm(sp - ip)) / 2.0),
    )


def _vertebra_in_pixels(vertebra: Vertebra, scale: np.ndarray, mm: float | None) -> Vertebra:
    """The vertebra with its points back in radiograph pixels (from iso units) and its lengths in mm too."""
    return Vertebra(
        name=vertebra.name,
        label=vertebra.label,
        centroid=vertebra.centroid / scale,
        corners={key: point / scale for key, point in vertebra.corners.items()},
        superior_mid=vertebra.superior_mid / scale,
        inferior_mid=vertebra.inferior_mid / scale,
        ap_length_px=vertebra.ap_length_px,
        height_px=vertebra.height_px,
        ap_length_mm=None if mm is None else vertebra.ap_length_px * mm,
        height_mm=None if mm is None else vertebra.height_px * mm,
    )


def _endplate_direction(vertebra: Vertebra, side: str) -> np.ndarray:
    """Unit vector along an endplate from its posterior to its anterior corner."""
    return _unit(vertebra.corners[f"{side}_anterior"] - vertebra.corners[f"{side}_posterior"])


def _disc_boundaries(vertebrae: list[Vertebra], inferior: np.ndarray):
    """The five boundaries (T12/L1 extrapolated, then the disc mid-points), their directions, T12's lower border.

    T12/L1 is placed across the disc above L1, i.e. along the normal of L1's superior endplate: the spine's
    overall direction would miss the real disc by several pixels at the thoraco-lumbar junction's curvature.
    """
    pairs = list(zip(vertebrae, vertebrae[1:]))
    heights = [np.linalg.norm(below.superior_mid - above.inferior_mid) for above, below in pairs]
    t12_height = float(np.clip(2.0 * heights[0] - heights[1], 0.5 * heights[0], 1.5 * heights[0]))
    first = vertebrae[0]
    endplate = _endplate_direction(first, "superior")
    down = np.array([-endplate[1], endplate[0]])
    down = down if down @ inferior > 0 else -down
    boundaries = [first.superior_mid - down * t12_height / 2.0]
    directions = [endplate]
    for above, below in pairs:
        boundaries.append((above.inferior_mid + below.superior_mid) / 2.0)
        directions.append(_unit(_endplate_direction(above, "inferior") + _endplate_direction(below, "superior")))
    return np.array(boundaries), np.array(directions), first.superior_mid - down * t12_height


def _aortic_segment(vertebra, top, top_dir, bottom, bottom_dir, anterior, width) -> AorticSegment:
    """The band in front of the vertebra's anterior wall line, `width` deep, between two disc mid-planes."""
    wall = _Line(vertebra.corners["superior_anterior"], _unit(vertebra.corners["inferior_anterior"]
                                                              - vertebra.corners["superior_anterior"]))
    normal = np.array([-wall.direction[1], wall.direction[0]])
    if np.dot(normal, anterior) < 0:
        normal = -normal
    outer = _Line(wall.point + width * normal, wall.direction)
    upper, lower = _Line(top, top_dir), _Line(bottom, bottom_dir)
    polygon = np.array([_intersect(wall, upper), _intersect(outer, upper), _intersect(outer, lower),
                        _intersect(wall, lower)])
    return AorticSegment(level=vertebra.name, top=top, bottom=bottom, polygon=polygon)


def _paper_crop(vertebrae, t12_border, inferior, anterior, margin, scale) -> Crop:
    """Upright crop from T12's lower border to L5's, the L1–L5 bodies plus `margin` in front, anterior at col 0."""
    posterior = -anterior
    corners = np.array([p for v in vertebrae for p in v.corners.values()])
    down = np.append(corners @ inferior, t12_border @ inferior)
    back = corners @ posterior
    top, bottom = down.min(), down.max()
    front, rear = back.min() - margin, back.max()
    origin = top * inferior + front * posterior
    affine = np.eye(3)
    affine[:2, 0] = inferior / scale
    affine[:2, 1] = posterior / scale
    affine[:2, 2] = origin / scale
    shape = (int(np.ceil(bottom - top)) + 1, int(np.ceil(rear - front)) + 1)
    return Crop(affine=affine, shape=shape)


# -------------------------------------------------------------------------------------------------- resampling


def _output_grid(crop: Crop, out_shape: tuple[int, int] | None):
    """Crop-pixel coordinates of the centres of an (out_rows, out_cols) grid spanning the crop."""
    rows, cols = out_shape or crop.shape
    step_r, step_c = crop.shape[0] / rows, crop.shape[1] / cols
    return (np.arange(rows) + 0.5) * step_r - 0.5, (np.arange(cols) + 0.5) * step_c - 0.5, (step_r, step_c)


def extract_crop(
    pixels: np.ndarray, crop: Crop, out_shape: tuple[int, int] | None = None, order: int = 1, cval: float = 0.0
) -> np.ndarray:
    """Resample the crop from the radiograph (float32), optionally at out_shape (rows, cols); `cval` outside it.

    When out_shape is much coarser than the crop, the region is first block-averaged so that thin calcium does
    not alias away (not for order 0, which is meant for label maps).
    """
    pixels = np.asarray(pixels)
    if pixels.ndim != 2:
        raise ValueError(f"pixels must be a 2D array, got shape {pixels.shape}")
    rows, cols, (step_r, step_c) = _output_grid(crop, out_shape)
    a = crop.affine
    image_r = a[0, 0] * rows[:, None] + a[0, 1] * cols[None, :] + a[0, 2]
    image_c = a[1, 0] * rows[:, None] + a[1, 1] * cols[None, :] + a[1, 2]
    height, width = pixels.shape
    inside = (image_r >= -0.5) & (image_r <= height - 0.5) & (image_c >= -0.5) & (image_c <= width - 0.5)
    out = np.full(image_r.shape, cval, dtype=np.float32)
    if not inside.any():
        return out
    pad = 3
    r0 = max(int(np.floor(image_r[inside].min())) - pad, 0)
    r1 = min(int(np.ceil(image_r[inside].max())) + pad + 1, height)
    c0 = max(int(np.floor(image_c[inside].min())) - pad, 0)
    c1 = min(int(np.ceil(image_c[inside].max())) + pad + 1, width)
    region = pixels[r0:r1, c0:c1].astype(np.float32, copy=False)
    image_r, image_c = image_r[inside] - r0, image_c[inside] - c0
    pixel_step = min(step_r * np.hypot(a[0, 0], a[1, 0]), step_c * np.hypot(a[0, 1], a[1, 1]))
    factor = int(pixel_step) if order >= 1 else 1
    if factor >= 2:
        region = _block_mean(region, factor)
        image_r = (image_r - (factor - 1) / 2.0) / factor
        image_c = (image_c - (factor - 1) / 2.0) / factor
    out[inside] = ndimage.map_coordinates(region, [image_r, image_c], order=order, mode="nearest",
                                          prefilter=order > 1, output=np.float32)
    return out


def _block_mean(region: np.ndarray, factor: int) -> np.ndarray:
    rows = -(-region.shape[0] // factor) * factor
    cols = -(-region.shape[1] // factor) * factor
    region = np.pad(region, ((0, rows - region.shape[0]), (0, cols - region.shape[1])), mode="edge")
    return region.reshape(rows // factor, factor, cols // factor, factor).mean(axis=(1, 3), dtype=np.float32)


def crop_to_image(values: np.ndarray, crop: Crop, image_shape: tuple[int, int]) -> np.ndarray:
    """Map a crop-space map (any size; it spans the whole crop) onto the radiograph grid: float32, 0 outside."""
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"values must be a 2D array, got shape {values.shape}")
    height, width = image_shape
    out = np.zeros((height, width), dtype=np.float32)
    rows, cols = crop.shape
    frame = np.array([[-0.5, -0.5, 1], [-0.5, cols - 0.5, 1], [rows - 0.5, -0.5, 1], [rows - 0.5, cols - 0.5, 1]])
    footprint = frame @ crop.affine.T
    r0 = max(int(np.floor(footprint[:, 0].min())), 0)
    r1 = min(int(np.ceil(footprint[:, 0].max())) + 1, height)
    c0 = max(int(np.floor(footprint[:, 1].min())), 0)
    c1 = min(int(np.ceil(footprint[:, 1].max())) + 1, width)
    if r0 >= r1 or c0 >= c1:
        return out
    # values index = (crop coordinate + 0.5) / step - 0.5, crop coordinate = inverse affine of (r0 + i, c0 + j)
    inverse = np.linalg.inv(crop.affine)
    step = np.array([rows / values.shape[0], cols / values.shape[1]])
    matrix = inverse[:2, :2] / step[:, None]
    offset = (inverse[:2, :2] @ [r0, c0] + inverse[:2, 2] + 0.5) / step - 0.5
    window_shape = (r1 - r0, c1 - c0)
    window = ndimage.affine_transform(values, matrix, offset, window_shape, order=1, mode="nearest",
                                      output=np.float32)
    inside = ndimage.affine_transform(np.ones_like(values), matrix, offset, window_shape, order=0,
                                      mode="grid-constant", cval=0.0, output=np.float32)
    window *= inside
    out[r0:r1, c0:c1] = window
    return out

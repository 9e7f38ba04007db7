"""Do the bodies look like L1–L5, and does the scored region lie inside the image?

Plausible ranges are anatomical, wide enough for fractures, degeneration and both sexes: adult lumbar bodies are
about 22–32 mm tall and 30–50 mm deep (antero-posterior) on a lateral view, discs 6–15 mm, and neighbouring
bodies differ little in size. Checks on millimetres run only when the pixel spacing is known; the ratios always.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull

from ..kauppila import VERTEBRAE
from .verdict import Reason

HEIGHT_MM = (15.0, 45.0)
AP_DEPTH_MM = (22.0, 65.0)
HEIGHT_TO_DEPTH = (0.4, 1.15)
SIZE_TO_MEDIAN = (0.6, 1.6)  # area of each body / the median body's
DISC_TO_HEIGHT = (0.08, 0.8)  # disc gap (endplate mid-points) / mean body height
STEP_TO_HEIGHT = (1.0, 2.0)  # centroid spacing along the spine / mean body height
MIN_SOLIDITY = 0.88  # body area / its convex hull's: a body is nearly convex
MAX_DEPTH_DROP = 0.8  # L5 depth / L1 depth below this: sizes shrink down the spine, the wrong way
MAX_OUTSIDE = 0.02  # share of an aortic segment (or 10x this of the crop) that may fall outside the image


def _outside(low: float, high: float, value: float) -> bool:
    return not low <= value <= high


def shape_reasons(labels: np.ndarray, geometry) -> tuple[list[Reason], dict[str, float]]:
    """Body sizes, shapes and spacing along the spine against plausible ranges; (reasons, measurements)."""
    found: list[Reason] = []
    vertebrae = geometry.vertebrae
    heights = np.array([v.height_px for v in vertebrae])
    depths = np.array([v.ap_length_px for v in vertebrae])
    mean_height = float(heights.mean())
    odd = []
    if vertebrae[0].height_mm is not None:
        for v in vertebrae:
            if _outside(*HEIGHT_MM, v.height_mm) or _outside(*AP_DEPTH_MM, v.ap_length_mm):
                odd.append(f"{v.name} {v.height_mm:.0f}x{v.ap_length_mm:.0f} mm")
        if odd:
            found.append(Reason("body_size", f"body height x depth outside {HEIGHT_MM[0]:.0f}-{HEIGHT_MM[1]:.0f} x "
                                             f"{AP_DEPTH_MM[0]:.0f}-{AP_DEPTH_MM[1]:.0f} mm: {', '.join(odd)}"))
    ratios = heights / depths
    odd = [f"{v.name} {r:.2f}" for v, r in zip(vertebrae, ratios) if _outside(*HEIGHT_TO_DEPTH, r)]
    if odd:
        found.append(Reason("body_shape", f"height/depth outside {HEIGHT_TO_DEPTH[0]}-{HEIGHT_TO_DEPTH[1]}: "
                                          f"{', '.join(odd)}"))
    areas, solidity = _areas_and_solidity(labels)
    relative = areas / np.median(areas)
    odd = [f"{name} {r:.2f}" for name, r in zip(VERTEBRAE, relative) if _outside(*SIZE_TO_MEDIAN, r)]
    if odd:
        found.append(Reason("body_area", f"area / median body outside {SIZE_TO_MEDIAN[0]}-{SIZE_TO_MEDIAN[1]}: "
                                         f"{', '.join(odd)}"))
    odd = [f"{name} {s:.2f}" for name, s in zip(VERTEBRAE, solidity) if s < MIN_SOLIDITY]
    if odd:
        found.append(Reason("body_outline", f"ragged or concave outline (solidity < {MIN_SOLIDITY}): {', '.join(odd)}"))
    inferior = geometry.inferior * _iso(geometry)
    inferior = inferior / np.linalg.norm(inferior)
    scale = _iso(geometry)
    gaps = np.array([float((b.superior_mid - a.inferior_mid) * scale @ inferior)
                     for a, b in zip(vertebrae, vertebrae[1:])]) / mean_height
    odd = [f"{a.name}/{b.name} {g:.2f}" for a, b, g in zip(vertebrae, vertebrae[1:], gaps) if _outside(*DISC_TO_HEIGHT, g)]
    if odd:
        found.append(Reason("disc_gap", f"disc space / body height outside {DISC_TO_HEIGHT[0]}-{DISC_TO_HEIGHT[1]}: "
                                        f"{', '.join(odd)}"))
    steps = np.array([float(np.linalg.norm((b.centroid - a.centroid) * scale))
                      for a, b in zip(vertebrae, vertebrae[1:])]) / mean_height
    odd = [f"{a.name}-{b.name} {s:.2f}" for a, b, s in zip(vertebrae, vertebrae[1:], steps) if _outside(*STEP_TO_HEIGHT, s)]
    if odd:
        found.append(Reason("body_spacing", f"centroid spacing / body height outside {STEP_TO_HEIGHT[0]}-"
                                            f"{STEP_TO_HEIGHT[1]}: {', '.join(odd)}"))
    if depths[-1] / depths[0] < MAX_DEPTH_DROP:
        found.append(Reason("size_progression", f"L5 is {depths[-1] / depths[0]:.2f} times as deep as L1: lumbar bodies "
                                                "grow down the spine"))
    measurements = {"min_solidity": float(solidity.min()), "max_area_ratio": float(relative.max()),
                    "min_area_ratio": float(relative.min()), "l5_to_l1_depth": float(depths[-1] / depths[0]),
                    "min_disc_ratio": float(gaps.min()), "max_disc_ratio": float(gaps.max())}
    return found, measurements


def _iso(geometry) -> np.ndarray:
    if geometry.spacing is None:
        return np.ones(2)
    spacing = np.asarray(geometry.spacing, dtype=float)
    return spacing / spacing.min()


def _areas_and_solidity(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    areas, solidity = [], []
    for value, box in enumerate(ndimage.find_objects(labels, max_label=len(VERTEBRAE)), start=1):
        mask = labels[box] == value
        area = float(mask.sum())
        edge = mask ^ ndimage.binary_erosion(mask)
        points = np.argwhere(edge).astype(float)
        # pixel squares, not centres: the hull of the centres is half a pixel short all round
        corners = (points[:, None, :] + np.array([[0, 0], [0, 1], [1, 0], [1, 1]])[None]).reshape(-1, 2)
        hull = ConvexHull(corners).volume if len(points) >= 3 else area
        areas.append(area)
        solidity.append(min(area / hull, 1.0))
    return np.array(areas), np.array(solidity)


def inside_fraction(polygon: np.ndarray, shape: tuple[int, int], samples: int = 24) -> float:
    """Share of a quadrilateral (4 corners, (row, col)) lying inside an image of `shape`, by bilinear sampling."""
    t = (np.arange(samples) + 0.5) / samples
    a, b, c, d = polygon  # corners in order around the quadrilateral
    top = a[None] + t[:, None] * (b - a)[None]
    bottom = d[None] + t[:, None] * (c - d)[None]
    points = (top[:, None] + t[None, :, None] * (bottom - top)[:, None]).reshape(-1, 2)
    inside = ((points[:, 0] >= -0.5) & (points[:, 0] <= shape[0] - 0.5)
              & (points[:, 1] >= -0.5) & (points[:, 1] <= shape[1] - 0.5))
    return float(inside.mean())


def room_to_border(start: np.ndarray, direction: np.ndarray, shape: tuple[int, int]) -> float:
    """Pixels from `start` along `direction` (row, col) to the image's border."""
    steps = []
    for axis in range(2):
        if direction[axis] > 1e-9:
            steps.append((shape[axis] - 0.5 - start[axis]) / direction[axis])
        elif direction[axis] < -1e-9:
            steps.append((-0.5 - start[axis]) / direction[axis])
    return max(0.0, min(steps)) * float(np.linalg.norm(direction))


def crop_reasons(geometry, image_shape: tuple[int, int]) -> tuple[list[Reason], dict[str, float]]:
    """The paper's crop and the four aortic segments against the image's borders. How much of the spine beyond
    L1 and L5 is in view (in body heights) is measured but raises no reason by itself: with the sacrum cut away
    the demo segmenter still counted right on all 65 phantoms it scored, so whether such levels hold is left to the
    level counting's own account (`levels.level_counting_reasons`)."""
    rows, cols = geometry.crop.shape
    frame = np.array([[0, 0, 1], [0, cols - 1, 1], [rows - 1, cols - 1, 1], [rows - 1, 0, 1]], float)
    crop_inside = inside_fraction((frame @ geometry.crop.affine.T)[:, :2], image_shape)
    band_inside = {s.level: inside_fraction(s.polygon, image_shape) for s in geometry.segments}
    found = []
    cut = [f"{level} {1 - f:.0%}" for level, f in band_inside.items() if f < 1.0 - MAX_OUTSIDE]
    if cut:
        found.append(Reason("band_outside_image", f"aortic band partly outside the image: {', '.join(cut)} out"))
    if crop_inside < 1.0 - 10 * MAX_OUTSIDE:
        found.append(Reason("crop_outside_image", f"{1 - crop_inside:.0%} of the scored crop lies outside the image"))
    scale = _iso(geometry)
    inferior = geometry.inferior / np.linalg.norm(geometry.inferior)
    height = float(np.mean([v.height_px for v in geometry.vertebrae]))
    below = room_to_border(geometry.vertebrae[-1].inferior_mid, inferior, image_shape)
    above = room_to_border(geometry.vertebrae[0].superior_mid, -inferior, image_shape)
    step = float(np.linalg.norm(inferior * scale))  # iso units per pixel along the spine
    room = {"room_below_l5": below * step / height, "room_above_l1": above * step / height}
    return found, {"crop_inside": crop_inside, "band_inside_min": min(band_inside.values()), **room}

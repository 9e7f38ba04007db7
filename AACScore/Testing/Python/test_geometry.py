"""Geometry from label maps: corners, disc boundaries, segments, crop and its affine, anterior side, and errors.

The synthetic spines here are drawn from known corners (tilted, wedged quadrilaterals with rounded corners along
a lordotic curve, rotated and facing either way), and the truth is computed with the contract's definitions.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from skimage.draw import polygon as fill_polygon

from AACScoreLib.errors import GeometryError
from AACScoreLib.geometry.spine import (
    CORNER_NAMES,
    Crop,
    analyze_spine,
    crop_to_image,
    extract_crop,
)

LEFT, RIGHT, DOWN = np.array([0.0, -1.0]), np.array([0.0, 1.0]), np.array([1.0, 0.0])


def _unit(v):
    return np.asarray(v, float) / np.linalg.norm(v)


def _rounded(corners: np.ndarray, radius: float, steps: int = 10) -> np.ndarray:
    """Outline of a convex quadrilateral whose corners are replaced by arcs of `radius` tangent to both sides."""
    outline = []
    for i in range(4):
        prev, corner, nxt = corners[i - 1], corners[i], corners[(i + 1) % 4]
        a, b = _unit(prev - corner), _unit(nxt - corner)
        half = np.arccos(np.clip(a @ b, -1, 1)) / 2
        start, end = corner + a * radius / np.tan(half), corner + b * radius / np.tan(half)
        centre = corner + _unit(a + b) * radius / np.sin(half)
        angle0 = np.arctan2((start - centre)[1], (start - centre)[0])
        angle1 = np.arctan2((end - centre)[1], (end - centre)[0])
        sweep = (angle1 - angle0 + np.pi) % (2 * np.pi) - np.pi
        for angle in angle0 + np.linspace(0, 1, steps) * sweep:
            outline.append(centre + radius * np.array([np.cos(angle), np.sin(angle)]))
    return np.array(outline)


def make_spine(shape=(1400, 1100), facing="left", rotation=0.0, size=1.0, lordosis=0.08, radius=0.15, seed=0,
               disc_heights=None, image=False):
    """Label map (and optional image) of L1..L5 with exact truth computed by the contract's definitions."""
    rng = np.random.default_rng(seed)
    theta = np.deg2rad(rotation)
    inferior = np.array([np.cos(theta), np.sin(theta)])
    across = np.array([-np.sin(theta), np.cos(theta)])  # +col when upright
    anterior = -across if facing == "left" else across
    height, ap = 150.0 * size, 220.0 * size
    discs = np.array(disc_heights if disc_heights is not None else [45, 50, 55, 58]) * size
    # centres along the spine: x along inferior, y (anterior) bulging by lordosis * length
    steps = np.concatenate([[0.0], np.cumsum(height + discs)])
    length = steps[-1]
    x = steps - length / 2
    bulge = lordosis * length
    y = bulge * (1 - (2 * x / length) ** 2)
    slope = -8 * bulge * x / length**2  # dy/dx: the local tilt of the curve
    centre = np.array(shape) / 2.0
    labels = np.zeros(shape, np.uint8)
    truth = []
    for k in range(5):
        tilt = np.arctan(slope[k]) + np.deg2rad(rng.uniform(-3, 3))
        ex = np.array([np.cos(tilt), np.sin(tilt)])  # local inferior in (x, y)
        ey = np.array([-np.sin(tilt), np.cos(tilt)])  # local anterior
        wedge = rng.uniform(-6, 10) * size
        local = {  # (x, y) in the spine frame
            "superior_anterior": (-(height + wedge) / 2) * ex + (ap / 2) * ey,
            "superior_posterior": (-(height - wedge) / 2) * ex - (ap / 2) * ey,
            "inferior_posterior": ((height - wedge) / 2) * ex - (ap / 2) * ey,
            "inferior_anterior": ((height + wedge) / 2) * ex + (ap / 2) * ey,
        }
        corners = {name: centre + (x[k] + p[0]) * inferior + (y[k] + p[1]) * anterior for name, p in local.items()}
        outline = _rounded(np.array([corners[n] for n in CORNER_NAMES]), radius * height)
        rr, cc = fill_polygon(outline[:, 0], outline[:, 1], shape)
        labels[rr, cc] = k + 1
        truth.append(corners)
    result = {"labels": labels, "corners": truth, "anterior": anterior, "inferior": inferior}
    result.update(_truth_boundaries(truth, labels))
    if image:
        result["image"] = _draw_image(labels, truth, anterior, rng)
    return result


def _l1_down(l1):
    """Unit normal of L1's superior endplate pointing down the spine: the T12/L1 extrapolation direction."""
    endplate = _unit(l1["superior_anterior"] - l1["superior_posterior"])
    down = np.array([-endplate[1], endplate[0]])
    return down if down @ (l1["inferior_anterior"] - l1["superior_anterior"]) > 0 else -down


def _truth_boundaries(corners, labels):
    sup = [(c["superior_anterior"] + c["superior_posterior"]) / 2 for c in corners]
    inf = [(c["inferior_anterior"] + c["inferior_posterior"]) / 2 for c in corners]
    h = [np.linalg.norm(sup[k + 1] - inf[k]) for k in range(4)]
    h0 = np.clip(2 * h[0] - h[1], 0.5 * h[0], 1.5 * h[0])
    down = _l1_down(corners[0])
    bounds = [sup[0] - down * h0 / 2] + [(inf[k] + sup[k + 1]) / 2 for k in range(4)]

    def ep(c, side):
        return _unit(c[f"{side}_anterior"] - c[f"{side}_posterior"])

    dirs = [ep(corners[0], "superior")] + [_unit(ep(corners[k], "inferior") + ep(corners[k + 1], "superior"))
                                           for k in range(4)]
    return {"boundaries": np.array(bounds), "directions": np.array(dirs), "t12_height": h0}


def _draw_image(labels, corners, anterior, rng):
    """Soft tissue, bright bodies, and brighter posterior elements (pedicles) behind each body."""
    image = 100 + rng.normal(0, 8, labels.shape).astype(np.float32)
    image[labels > 0] += 120
    for c in corners:
        sp, ip = c["superior_posterior"], c["inferior_posterior"]
        ap = np.linalg.norm(c["superior_anterior"] - sp)
        back = -anterior * ap
        quad = np.array([sp + 0.05 * back, sp + 0.45 * back, sp + 0.6 * (ip - sp) + 0.45 * back,
                         sp + 0.6 * (ip - sp) + 0.05 * back])
        rr, cc = fill_polygon(quad[:, 0], quad[:, 1], labels.shape)
        image[rr, cc] += 150
    return image


def _corner_error(geometry, spine):
    return max(np.linalg.norm(v.corners[name] - spine["corners"][i][name])
               for i, v in enumerate(geometry.vertebrae) for name in CORNER_NAMES)


def _angle_deg(a, b):
    return np.degrees(np.arccos(np.clip(np.sum(a * b, axis=-1), -1, 1)))


# ---------------------------------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("facing, rotation, radius, seed", [
    ("left", 0.0, 0.15, 1), ("right", -15.0, 0.25, 2), ("left", 13.0, 0.33, 3), ("right", 7.0, 0.05, 4),
])
def test_corners_boundaries_and_directions_match_the_drawn_truth(facing, rotation, radius, seed):
    spine = make_spine(facing=facing, rotation=rotation, radius=radius, seed=seed)
    geometry = analyze_spine(spine["labels"], anterior=facing)
    assert [v.name for v in geometry.vertebrae] == ["L1", "L2", "L3", "L4", "L5"]
    assert _corner_error(geometry, spine) < 1.5
    assert np.linalg.norm(geometry.boundaries - spine["boundaries"], axis=1).max() < 1.0
    assert _angle_deg(geometry.boundary_directions, spine["directions"]).max() < 1.0
    assert _angle_deg(geometry.inferior, spine["inferior"]) < 1.0
    assert _angle_deg(geometry.anterior, spine["anterior"]) < 1.0
    assert geometry.anterior_source == "caller"
    for vertebra in geometry.vertebrae:  # endplate mid-points are the mean of their corners
        c = vertebra.corners
        np.testing.assert_allclose(vertebra.superior_mid, (c["superior_anterior"] + c["superior_posterior"]) / 2)
        np.testing.assert_allclose(vertebra.inferior_mid, (c["inferior_anterior"] + c["inferior_posterior"]) / 2)
        assert vertebra.ap_length_px == pytest.approx(220, abs=3)
        assert 135 < vertebra.height_px < 165
        assert vertebra.ap_length_mm is None
    # boundary directions run from posterior to anterior
    assert np.all(geometry.boundary_directions @ geometry.anterior > 0.9)


def test_large_image_is_accurate_and_fast():
    spine = make_spine(shape=(3000, 2400), size=2.2, rotation=-11, facing="right", seed=5)
    analyze_spine(spine["labels"], anterior="right")  # warm-up
    start = time.perf_counter()
    geometry = analyze_spine(spine["labels"], anterior="right")
    elapsed = time.perf_counter() - start
    assert np.linalg.norm(geometry.boundaries - spine["boundaries"], axis=1).max() < 1.0
    assert _corner_error(geometry, spine) < 1.5
    assert elapsed < 1.0, f"analyze_spine took {elapsed:.2f} s on a 3000x2400 label map"  # ~0.08 s here, 2 CPUs shared


def test_ragged_edges_and_holes_do_not_move_the_boundaries():
    spine = make_spine(facing="left", rotation=-6, seed=19)
    labels = spine["labels"].copy()
    rng = np.random.default_rng(19)
    edge = (labels != np.roll(labels, 1, 0)) | (labels != np.roll(labels, 1, 1))
    flip = edge & (rng.random(labels.shape) < 0.4)
    labels[flip] = np.where(labels[flip] > 0, 0, np.roll(labels, 1, 0)[flip] | np.roll(labels, 1, 1)[flip])
    labels[labels > 5] = 0
    centre = np.argwhere(labels == 3).mean(axis=0).astype(int)
    labels[centre[0] - 10:centre[0] + 10, centre[1] - 10:centre[1] + 10] = 0  # a hole inside L3
    geometry = analyze_spine(labels, anterior="left")
    assert np.linalg.norm(geometry.boundaries - spine["boundaries"], axis=1).max() < 1.5
    assert _corner_error(geometry, spine) < 2.5


def test_t12_boundary_is_extrapolated_and_clamped():
    spine = make_spine(seed=6, lordosis=0.1)
    geometry = analyze_spine(spine["labels"], anterior="left")
    l1 = geometry.vertebrae[0]
    h12 = np.linalg.norm(geometry.vertebrae[1].superior_mid - l1.inferior_mid)
    h23 = np.linalg.norm(geometry.vertebrae[2].superior_mid - geometry.vertebrae[1].inferior_mid)
    expected = np.clip(2 * h12 - h23, 0.5 * h12, 1.5 * h12)
    down = _l1_down(l1.corners)  # across the disc above L1, not along the spine's overall direction
    assert _angle_deg(down, geometry.inferior) > 2.0
    np.testing.assert_allclose(geometry.boundaries[0], l1.superior_mid - down * expected / 2, atol=1e-6)
    np.testing.assert_allclose(geometry.t12_inferior_border, l1.superior_mid - down * expected, atol=1e-6)
    # a much taller L2/L3 disc would extrapolate below half of L1/L2: the clamp holds it at 0.5 * h(L1/L2)
    tall = make_spine(seed=6, lordosis=0.0, disc_heights=[40, 80, 55, 58])
    assert tall["t12_height"] == pytest.approx(20.0, abs=0.5)
    geometry = analyze_spine(tall["labels"], anterior="left")
    np.testing.assert_allclose(geometry.boundaries, tall["boundaries"], atol=1.0)
    gap = np.linalg.norm(geometry.vertebrae[0].superior_mid - geometry.boundaries[0])
    assert gap == pytest.approx(10.0, abs=0.5)


def test_aortic_segments_lie_in_front_of_their_vertebrae():
    spine = make_spine(facing="right", rotation=8, seed=7)
    geometry = analyze_spine(spine["labels"], anterior="right")
    mean_ap = geometry.mean_ap_length_px
    assert [s.level for s in geometry.segments] == ["L1", "L2", "L3", "L4"]
    for k, segment in enumerate(geometry.segments):
        vertebra = geometry.vertebrae[k]
        np.testing.assert_allclose(segment.top, geometry.boundaries[k])
        np.testing.assert_allclose(segment.bottom, geometry.boundaries[k + 1])
        inner_top, outer_top, outer_bottom, inner_bottom = segment.polygon
        wall = vertebra.corners["inferior_anterior"] - vertebra.corners["superior_anterior"]
        # inner edge on the anterior wall line, outer edge 0.75 mean AP further anterior
        for point in (inner_top, inner_bottom):
            offset = point - vertebra.corners["superior_anterior"]
            assert abs(offset[0] * wall[1] - offset[1] * wall[0]) / np.linalg.norm(wall) < 1e-6
        assert np.linalg.norm(outer_top - inner_top) * abs(_unit(outer_top - inner_top) @ _unit(
            [-wall[1], wall[0]])) == pytest.approx(0.75 * mean_ap, rel=1e-6)
        assert (outer_top - inner_top) @ geometry.anterior > 0
        # the segment spans from the disc mid-plane above to the one below
        assert (inner_bottom - inner_top) @ geometry.inferior > vertebra.height_px


def test_crop_is_upright_holds_all_bodies_and_the_anterior_margin():
    for facing, rotation in (("left", 12.0), ("right", -14.0)):
        spine = make_spine(facing=facing, rotation=rotation, seed=8)
        geometry = analyze_spine(spine["labels"], anterior=facing)
        crop = geometry.crop
        inverse = np.linalg.inv(crop.affine)
        body = np.argwhere(spine["labels"] > 0).astype(float)
        in_crop = np.column_stack([body, np.ones(len(body))]) @ inverse.T
        rows, cols = in_crop[:, 0], in_crop[:, 1]
        assert rows.min() >= -0.5 and rows.max() <= crop.shape[0] - 0.5
        assert cols.min() >= -0.5 and cols.max() <= crop.shape[1] - 0.5
        # anterior at column 0: the front of the bodies sits 3/4 of the mean AP length from the crop's left edge
        corners = np.array([[*p, 1.0] for v in geometry.vertebrae for p in v.corners.values()]) @ inverse.T
        assert corners[:, 1].min() == pytest.approx(0.75 * geometry.mean_ap_length_px, abs=1e-6)
        assert cols.min() >= corners[:, 1].min() - 0.5
        assert crop.shape[1] - 0.5 - corners[:, 1].max() < 1.0  # the posterior edge hugs the bodies
        # upright: superior at the top; the top is T12's inferior border
        l1, l5 = (np.linalg.solve(crop.affine, [*geometry.vertebrae[k].centroid, 1.0]) for k in (0, 4))
        assert l1[0] < l5[0]
        t12 = np.linalg.solve(crop.affine, [*geometry.t12_inferior_border, 1.0])
        assert t12[0] >= -1e-6
        # native sampling: one crop pixel step is one radiograph pixel
        np.testing.assert_allclose(np.linalg.norm(crop.affine[:2, :2], axis=0), [1.0, 1.0])


# ---------------------------------------------------------------------------------------------------- resampling


def _smooth_image(shape):
    r, c = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    return 100 + 30 * np.sin(r / 37.0) + 20 * np.cos(c / 23.0) + 0.01 * r


def test_extract_crop_samples_the_affine_and_maps_back():
    spine = make_spine(facing="right", rotation=10, seed=9)
    geometry = analyze_spine(spine["labels"], anterior="right")
    image = _smooth_image(spine["labels"].shape)
    crop = extract_crop(image, geometry.crop)
    assert crop.shape == geometry.crop.shape and crop.dtype == np.float32
    # a crop pixel holds the radiograph's value at its affine image position
    for r, c in ((0, 0), (crop.shape[0] // 2, crop.shape[1] // 3), (crop.shape[0] - 1, crop.shape[1] - 1)):
        ir, ic, _ = geometry.crop.affine @ [r, c, 1.0]
        assert crop[r, c] == pytest.approx(100 + 30 * np.sin(ir / 37) + 20 * np.cos(ic / 23) + 0.01 * ir, abs=0.3)
    # the label map resampled with order 0 puts L1 above L5 and the bodies to the right of the margin
    labels = extract_crop(spine["labels"], geometry.crop, order=0)
    rows_l1, rows_l5 = np.nonzero(labels == 1)[0], np.nonzero(labels == 5)[0]
    assert rows_l1.mean() < rows_l5.mean()
    assert np.nonzero(labels > 0)[1].min() > 0.6 * geometry.mean_ap_length_px
    # back onto the radiograph: equal inside the footprint, 0 outside
    back = crop_to_image(crop, geometry.crop, image.shape)
    footprint = crop_to_image(np.ones_like(crop), geometry.crop, image.shape) > 0
    assert footprint.sum() == pytest.approx(crop.size, rel=0.01)
    assert np.all(back[~footprint] == 0)
    from scipy.ndimage import binary_erosion
    interior = binary_erosion(footprint, iterations=2)
    assert np.abs(back[interior] - image[interior]).max() < 0.5
    # a smaller crop-space map (like a heatmap at the model's input size) spans the same footprint
    small = extract_crop(image, geometry.crop, out_shape=(200, 100))
    back_small = crop_to_image(small, geometry.crop, image.shape)
    assert np.all(back_small[~footprint] == 0)
    assert np.abs(back_small[interior] - image[interior]).mean() < 2.0


def test_extract_crop_is_fast_and_antialiased():
    spine = make_spine(shape=(3000, 2400), size=2.2, rotation=5, seed=10)
    geometry = analyze_spine(spine["labels"], anterior="left")
    rng = np.random.default_rng(0)
    image = rng.normal(0, 1, spine["labels"].shape).astype(np.float32)
    extract_crop(image, geometry.crop, out_shape=(1000, 500))  # warm-up
    start = time.perf_counter()
    small = extract_crop(image, geometry.crop, out_shape=(1000, 500))
    elapsed = time.perf_counter() - start
    assert small.shape == (1000, 500)
    assert elapsed < 0.5, f"extract_crop took {elapsed:.2f} s"  # ~0.05 s here
    # averaging before sampling: noise shrinks when the crop is sampled 4x coarser than native
    coarse = extract_crop(image, geometry.crop, out_shape=(geometry.crop.shape[0] // 4, geometry.crop.shape[1] // 4))
    assert coarse.std() < 0.5


def test_crop_outside_the_image_is_filled_with_cval():
    crop = Crop(affine=np.array([[1.0, 0, -10], [0, 1.0, -20], [0, 0, 1]]), shape=(50, 60))
    image = np.full((100, 100), 7.0, np.float32)
    out = extract_crop(image, crop, cval=-1.0)
    assert np.all(out[:10] == -1) and np.all(out[:, :20] == -1)
    assert np.all(out[10:, 20:] == 7)
    back = crop_to_image(out, crop, (100, 100))
    assert back[5, 5] == 7 and back[45, 45] == 0 and back[39, 39] == 7


# ------------------------------------------------------------------------------------------------------ spacing


def test_spacing_gives_mm_and_non_square_pixels_are_handled():
    spine = make_spine(seed=11, rotation=6)
    geometry = analyze_spine(spine["labels"], spacing=(0.2, 0.2), anterior="left")
    assert geometry.spacing == (0.2, 0.2)
    assert geometry.vertebrae[2].ap_length_mm == pytest.approx(0.2 * geometry.vertebrae[2].ap_length_px)
    # the same anatomy sampled at 0.2 mm rows x 0.4 mm cols: squeeze columns by 2, compare in mm
    squeezed = spine["labels"][:, ::2]
    wide = analyze_spine(squeezed, spacing=(0.2, 0.4), anterior="left")
    for a, b in zip(geometry.vertebrae, wide.vertebrae):
        assert b.ap_length_mm == pytest.approx(a.ap_length_mm, abs=0.6)
        assert b.height_mm == pytest.approx(a.height_mm, abs=0.6)
    scaled = wide.boundaries * [1.0, 2.0] + [0.0, 0.5]  # back to the square grid's pixel coordinates
    assert np.linalg.norm(scaled - geometry.boundaries, axis=1).max() < 1.5
    assert np.linalg.norm(wide.crop.affine[:2, 0] * [0.2, 0.4]) == pytest.approx(0.2)  # crop pixel = 0.2 mm
    with pytest.raises(ValueError, match="spacing"):
        analyze_spine(spine["labels"], spacing=(0.0, 0.2))


# ----------------------------------------------------------------------------------------------------- anterior


@pytest.mark.parametrize("facing", ["left", "right"])
def test_anterior_from_lordosis(facing):
    spine = make_spine(facing=facing, rotation=-9, lordosis=0.07, seed=12)
    geometry = analyze_spine(spine["labels"])
    assert geometry.anterior_source == "anatomy"
    assert _angle_deg(geometry.anterior, spine["anterior"]) < 1.0
    assert geometry.vertebrae[0].corners["superior_anterior"] @ spine["anterior"] > \
        geometry.vertebrae[0].corners["superior_posterior"] @ spine["anterior"]


@pytest.mark.parametrize("facing", ["left", "right"])
def test_anterior_from_posterior_elements_on_a_straight_or_kyphotic_spine(facing):
    for lordosis in (0.0, -0.03):
        spine = make_spine(facing=facing, rotation=6, lordosis=lordosis, seed=13, image=True)
        geometry = analyze_spine(spine["labels"], image=spine["image"])
        assert geometry.anterior_source == "anatomy"
        image_vote = geometry.anterior_evidence["image"]
        assert image_vote > 0.5 if facing == "right" else image_vote < -0.5
        assert _angle_deg(geometry.anterior, spine["anterior"]) < 1.0


def test_anterior_defaults_to_left_when_anatomy_is_silent():
    spine = make_spine(facing="right", lordosis=0.0, seed=14)
    geometry = analyze_spine(spine["labels"])
    assert geometry.anterior_source == "default"
    assert geometry.anterior[1] < -0.9


@pytest.mark.parametrize("orientation, expected", [
    (("A", "F"), RIGHT), (("P", "F"), LEFT), (["AF", "F"], RIGHT), ("P\\F", LEFT),
])
def test_anterior_from_patient_orientation_overrides_anatomy(orientation, expected):
    spine = make_spine(facing="left", lordosis=0.07, seed=15)  # anatomy says left
    geometry = analyze_spine(spine["labels"], patient_orientation=orientation)
    assert geometry.anterior_source == "PatientOrientation"
    assert _angle_deg(geometry.anterior, expected) < 1.0


def test_patient_orientation_of_a_rotated_image_uses_the_row_direction():
    spine = make_spine(shape=(1100, 1400), facing="left", rotation=90, seed=16)  # spine runs along +col
    assert _angle_deg(spine["anterior"], DOWN) < 1e-6
    geometry = analyze_spine(spine["labels"], patient_orientation=("F", "A"))
    assert geometry.anterior_source == "PatientOrientation"
    assert _angle_deg(geometry.anterior, DOWN) < 1.0
    # without A or P in it the orientation says nothing about anterior: anatomy decides
    geometry = analyze_spine(spine["labels"], patient_orientation=("F", "L"))
    assert geometry.anterior_source == "anatomy" and _angle_deg(geometry.anterior, DOWN) < 1.0


def test_caller_overrides_orientation_and_anatomy():
    spine = make_spine(facing="left", lordosis=0.07, seed=17, image=True)
    geometry = analyze_spine(spine["labels"], anterior="right", patient_orientation=("P", "F"), image=spine["image"])
    assert geometry.anterior_source == "caller" and _angle_deg(geometry.anterior, RIGHT) < 1.0
    geometry = analyze_spine(spine["labels"], anterior=(0.3, -1.0))
    assert geometry.anterior_source == "caller" and _angle_deg(geometry.anterior, LEFT) < 1.0
    with pytest.raises(GeometryError, match="runs along the spine"):
        analyze_spine(spine["labels"], anterior=(1.0, 0.0))
    with pytest.raises(ValueError, match="anterior must be"):
        analyze_spine(spine["labels"], anterior="front")


# ------------------------------------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def clean():
    return make_spine(shape=(1000, 800), size=0.6, seed=18)["labels"]


def test_error_not_2d(clean):
    with pytest.raises(GeometryError, match="2D"):
        analyze_spine(clean[None])


def test_error_empty_and_foreign_labels(clean):
    with pytest.raises(GeometryError, match="empty"):
        analyze_spine(np.zeros_like(clean))
    bad = clean.copy()
    bad[5, 5] = 7
    with pytest.raises(GeometryError, match="label 7"):
        analyze_spine(bad)
    with pytest.raises(GeometryError, match="non-integer"):
        analyze_spine(clean.astype(float) + 0.5)


def test_error_missing_vertebra(clean):
    labels = clean.copy()
    labels[labels == 3] = 0
    with pytest.raises(GeometryError, match="L3 is missing from the label map"):
        analyze_spine(labels)


def test_split_vertebra_keeps_its_body_or_fails(clean):
    rows, cols = np.nonzero(clean == 2)
    speck = clean.copy()
    speck[10:14, 10:14] = 2  # a stray speck far away is dropped
    geometry = analyze_spine(speck, anterior="left")
    reference = analyze_spine(clean, anterior="left")
    np.testing.assert_allclose(geometry.boundaries, reference.boundaries)
    halves = clean.copy()
    middle = int(np.median(cols))
    halves[(halves == 2) & (np.abs(np.arange(clean.shape[1]) - middle) < 3)[None, :]] = 0
    with pytest.raises(GeometryError, match="L2 is in 2 disconnected pieces"):
        analyze_spine(halves)


def test_error_merged_vertebrae(clean):
    touching = make_spine(shape=(1000, 800), size=0.6, seed=18, disc_heights=[45, 0, 55, 58])["labels"]
    with pytest.raises(GeometryError, match="L2 and L3 appear merged: there is no disc space"):
        analyze_spine(touching)
    flat = make_spine(shape=(1000, 800), size=0.6, seed=18, lordosis=0.0, disc_heights=[45, 50, 0, 58])["labels"]
    with pytest.raises(GeometryError, match="L3 and L4 appear merged"):
        analyze_spine(flat)
    # a narrow posterior contact (a wedge-shaped disc closing at the back) is not a merge
    wedge = make_spine(shape=(1000, 800), size=0.6, seed=18)["labels"]  # faces left: posterior is +col
    rows, cols = np.nonzero(wedge == 2)
    corner = wedge[rows.max() - 5:rows.max() + 40, cols.max() - 25:cols.max() - 5]
    corner[corner == 0] = 2
    assert np.any(corner == 3)  # L2's posterior corner now reaches down to L3
    analyze_spine(wedge, anterior="left")
    one_label = clean.copy()  # L2 and L3 segmented as one label, bridged across the disc: twice as large
    one_label[clean == 3] = 2
    bottom_of_l2, top_of_l3 = np.nonzero(clean == 2)[0].max(), np.nonzero(clean == 3)[0].min()
    middle = int(np.nonzero(clean == 2)[1].mean())
    one_label[bottom_of_l2:top_of_l3 + 1, middle - 40:middle + 40] = 2
    with pytest.raises(GeometryError, match="L2 appears to hold two merged vertebrae"):
        analyze_spine(one_label)


def _with_triangular_l3(labels: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """L3 redrawn as a triangle (apex up) over its own extent: no superior endplate to fit; and that extent."""
    rows, cols = np.nonzero(labels == 3)
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    ragged = np.where(labels == 3, 0, labels)
    rr, cc = fill_polygon([top, bottom, bottom], [(left + right) / 2, right, left], labels.shape)
    ragged[rr, cc] = 3
    return ragged, (top, bottom, left, right)


def test_a_body_without_four_sides_is_an_error_or_boxed_on_request(clean):
    ragged, (top, bottom, left, right) = _with_triangular_l3(clean)
    with pytest.raises(GeometryError, match="the superior endplate of L3 could not be found"):
        analyze_spine(ragged, anterior="left")
    geometry = analyze_spine(ragged, anterior="left", box_ragged=True)
    assert geometry.boxed == ("L3",)
    corners = np.array(list(geometry.vertebrae[2].corners.values()))
    # the box along the (nearly vertical) spine spans the triangle's extent, within a few pixels
    np.testing.assert_allclose(np.sort(corners[:, 0])[[0, -1]], [top, bottom], atol=6)
    np.testing.assert_allclose(np.sort(corners[:, 1])[[0, -1]], [left, right], atol=6)
    # the other bodies keep their fitted sides: the same corners as without the ragged one
    reference = analyze_spine(clean, anterior="left", box_ragged=True)
    assert reference.boxed == ()
    for index in (0, 1, 3, 4):
        for name in CORNER_NAMES:
            np.testing.assert_allclose(geometry.vertebrae[index].corners[name],
                                       reference.vertebrae[index].corners[name], atol=1e-6)


def test_error_out_of_order(clean):
    swapped = clean.copy()
    swapped[clean == 3], swapped[clean == 4] = 4, 3
    with pytest.raises(GeometryError, match="L4 lies above L3"):
        analyze_spine(swapped)


def test_bone_contrast_says_which_way_round_the_grey_values_run():
    """Bodies brighter than the discs and tissue around them: positive; the same image inverted: as negative; a map
    with no body says nothing (0)."""
    from AACScoreLib.geometry.polarity import bone_contrast, inverted

    rng = np.random.default_rng(3)
    image = rng.normal(1000.0, 30.0, size=(700, 300))
    labels = np.zeros(image.shape, np.uint8)
    for level in range(1, 6):
        top = 60 + (level - 1) * 120
        labels[top:top + 95, 100:200] = level
    image[labels > 0] += 400.0
    bright = bone_contrast(image, labels)
    assert bright > 0.5
    assert bone_contrast(inverted(image), labels) == pytest.approx(-bright)
    assert bone_contrast(image, np.zeros_like(labels)) == 0.0

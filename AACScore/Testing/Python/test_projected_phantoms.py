"""Projected phantom family: determinism, projected body labels with T12/S1 context, field of view, truth measured
again from the projected plaque and the true label map's geometry, DICOM read-back."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from AACScoreLib import kauppila
from AACScoreLib.geometry.spine import analyze_spine
from AACScoreLib.io.labelmaps import read_label_map
from AACScoreLib.io.radiograph import read_radiograph
from AACScoreLib.phantoms import generator, projected
from AACScoreLib.phantoms.families import FAMILIES
from AACScoreLib.phantoms.volume import ellipsoid, rotation_matrix, tube

SMALL = (360, 440)  # image sides for fast tests (the spacing grows to keep the field of view)
SEED = 0  # its first eight phantoms hold sacrum-out images, a 4-lumbar and a 6-lumbar spine


@pytest.fixture(scope="module")
def phantoms():
    return [projected.generate_projected(SEED, index, size_range=SMALL) for index in range(8)]


def test_chord_lengths_are_exact_for_simple_shapes():
    source = np.array([-500.0, 0.0, 0.0])
    rays = np.array([[1.0, 0.0, 0.0], [1.0, 0.01, 0.0]], np.float32)
    rays /= np.linalg.norm(rays, axis=1, keepdims=True)
    rays = np.ascontiguousarray(rays.T)  # (3, N): one row per coordinate
    sphere = ellipsoid([0.0, 0.0, 0.0], np.eye(3), [10.0, 10.0, 10.0])
    miss = 500.0 * rays[1, 1]  # closest approach of the second ray to the centre
    assert sphere.chord(source, rays) == pytest.approx([20.0, 2 * np.sqrt(100.0 - miss**2)], abs=5e-3)  # float32
    rod = tube([0.0, -20.0, 0.0], [0.0, 20.0, 0.0], (5.0, 8.0), reference=(0.0, 0.0, 1.0))
    assert rod.chord(source, rays[:, :1]) == pytest.approx([16.0], abs=1e-3)  # across the 8 mm semi-axis
    half = rod.cut([0.0, 1.0, 0.0], [0.0, 0.0, 0.0])
    along = np.array([[0.0], [1.0], [0.0]], np.float32)
    assert half.chord(np.array([0.0, -100.0, 0.0]), along) == pytest.approx([20.0], abs=1e-3)
    turned = ellipsoid([0.0, 0.0, 0.0], rotation_matrix([0.0, 0.0, 1.0], np.pi / 2), [30.0, 5.0, 5.0])
    assert turned.chord(np.array([0.0, -100.0, 0.0]), along) == pytest.approx([60.0], abs=1e-3)


def test_same_seed_and_index_give_the_same_phantom(phantoms):
    again = projected.generate_projected(SEED, 1, size_range=SMALL)
    first = phantoms[1]
    assert np.array_equal(first.pixels, again.pixels) and np.array_equal(first.labels, again.labels)
    assert np.array_equal(first.plaque_mask, again.plaque_mask)
    assert json.dumps(first.truth) == json.dumps(again.truth) and first.dataset == again.dataset
    assert first.name == f"phantom_projected_s{SEED}_0001"
    assert first.pixels.shape != phantoms[2].pixels.shape or not np.array_equal(first.pixels, phantoms[2].pixels)


def test_labels_are_the_bodies_once_each_in_order_with_context(phantoms):
    for phantom in phantoms:
        labels, truth = phantom.label_map, phantom.truth
        assert np.array_equal(phantom.labels, np.where(labels <= 5, labels, 0))
        assert labels.dtype == np.uint8 and labels.shape == phantom.pixels.shape == tuple(truth["image_shape"])
        assert set(np.unique(labels)) <= set(range(8)) and {1, 2, 3, 4, 5} <= set(np.unique(labels))
        for label in range(1, 6):
            pieces, count = ndimage.label(labels == label)
            assert count == 1, f"{phantom.name}: label {label} is in {count} pieces"
            rows, cols = np.nonzero(labels == label)  # the body lies inside the image, clear of its edges
            assert rows.min() > 0 and cols.min() > 0 and rows.max() < labels.shape[0] - 1
            assert cols.max() < labels.shape[1] - 1
        present = [k for k in (6, 1, 2, 3, 4, 5, 7) if np.any(labels == k)]
        centroids = np.array([np.argwhere(labels == k).mean(axis=0) for k in present])
        along = centroids @ np.array(truth["inferior_vector"])
        assert np.all(np.diff(along) > 0), f"{phantom.name}: labels {present} are not in order down the spine"
        assert truth["context_labels"] == {"T12": 6 in present, "S1": 7 in present}
        if truth["field_of_view"]["top_edge_in"] != "T12/L1":
            assert 6 in present
        if truth["field_of_view"]["sacrum_in_view"]:
            assert 7 in present


def test_field_of_view_and_anatomy_vary(phantoms):
    out = [p for p in phantoms if not p.truth["field_of_view"]["sacrum_in_view"]]
    assert out and len(out) < len(phantoms)
    for phantom in out:  # the image ends a few mm below L5
        spacing = phantom.truth["spacing"][0]
        below_l5 = (phantom.labels.shape[0] - 1 - np.nonzero(phantom.labels == 5)[0].max()) * spacing
        assert below_l5 < 8.0 + 2 * spacing
    assert {p.truth["lumbar_vertebrae"] for p in phantoms} == {4, 5, 6}
    kinds = {4: "sacralised L5", 5: "", 6: "L6"}  # the naming the other families use
    assert all(p.truth["transitional"] == kinds[p.truth["lumbar_vertebrae"]] for p in phantoms)
    assert {p.truth["anterior"] for p in phantoms} == {"left", "right"}
    projection = [p.truth["projection"] for p in phantoms]
    assert all(1000.0 <= q["source_image_mm"] <= 1800.0 and q["magnification"] > 1.0 for q in projection)
    assert all(p.dataset["magnification"] == p.truth["projection"]["magnification"] for p in phantoms)
    assert {p.truth["dicom"]["photometric"] for p in phantoms} == {"MONOCHROME1", "MONOCHROME2"}


def test_truth_is_the_geometry_of_the_true_labels(phantoms):
    for phantom in phantoms:
        truth = phantom.truth
        geometry = analyze_spine(phantom.labels, truth["spacing"], anterior=truth["anterior"])
        assert np.allclose(geometry.boundaries, truth["boundaries"], atol=1e-2)
        for vertebra in geometry.vertebrae:
            corners = np.array(list(truth["vertebrae"][vertebra.name].values()))
            assert np.allclose(np.array(list(vertebra.corners.values())), corners, atol=1e-2)
    rejected = sum(p.truth["rejected_draws"]["geometry"] for p in phantoms)
    assert rejected <= len(phantoms) // 4  # label maps the geometry rejects are rare


def _measured_fractions(phantom) -> dict[str, float]:
    """Calcified fraction of each wall segment measured from the plaque mask: wall points just inside the lumen
    (0.6 mm), between the boundaries the geometry finds on the true labels."""
    truth = phantom.truth
    geometry = analyze_spine(phantom.labels, truth["spacing"], anterior=truth["anterior"])
    walls = {"A": np.array(truth["aorta"]["anterior_wall"]), "P": np.array(truth["aorta"]["posterior_wall"])}
    measured = {}
    for name, other in (("A", "P"), ("P", "A")):
        wall = walls[name]
        inward = walls[other] - wall
        inward /= np.linalg.norm(inward, axis=1, keepdims=True)
        arc = generator.arc_length(wall)
        fine = np.arange(0.0, arc[-1], 0.25)
        points = np.stack([np.interp(fine, arc, wall[:, k] + inward[:, k] * 0.6 / truth["spacing"][0])
                           for k in range(2)], axis=1)
        inside = np.round(points).astype(int)
        valid = np.all((inside >= 0) & (inside < phantom.labels.shape), axis=1)
        calcified = np.zeros(len(fine), bool)
        calcified[valid] = phantom.plaque_mask[inside[valid, 0], inside[valid, 1]]
        spans = generator.wall_segment_spans(wall, geometry.boundaries, geometry.boundary_directions)
        for level, (top, bottom) in zip(kauppila.SCORED_LEVELS, spans):
            between = (fine >= top) & (fine <= bottom)
            measured[f"{level}{name}"] = float(calcified[between].mean())
    return measured


def test_subscores_measured_again_from_the_projected_plaque_equal_the_truth(phantoms):
    for phantom in phantoms:
        measured = _measured_fractions(phantom)
        for column, fraction in measured.items():
            assert kauppila.wall_subscore(fraction) == phantom.truth["subscores"][column], (phantom.name, column)
            assert fraction == pytest.approx(phantom.truth["fractions"][column], abs=0.04), (phantom.name, column)
    assert any(p.truth["aac24"] > 0 for p in phantoms) and any(p.plaque_mask.any() for p in phantoms)


def test_plaque_habits_vary_and_still_realise_the_targets(phantoms):
    """Line, patchy and punctate plaque occur over 12 phantoms, with faint to dense and thin to thick walls; every
    phantom's truth, measured again from its piece spans, equals the targets its seed and index set, punctate
    ones included, whose specks stay at least GAP_MM apart."""
    from AACScoreLib.phantoms.truth import DEFAULT_SEVERITY, GAP_MM, calcified_fractions, target_subscores

    more = phantoms + [projected.generate_projected(SEED, index, size_range=SMALL) for index in range(8, 12)]
    habits = [p.truth["plaque"]["habit"] for p in more]
    assert set(habits) == set(projected.HABITS), habits
    density = [p.truth["plaque"]["density"] for p in more]
    thick = [p.truth["plaque"]["thick_mm"] for p in more]
    assert min(density) < 0.6 and max(density) > 1.0 and min(thick) < 1.5 and max(thick) > 2.5
    for index, phantom in enumerate(more):
        truth = phantom.truth
        rng = np.random.default_rng([SEED, index, projected._CODE])
        targets = target_subscores(SEED, index, projected._CODE, rng, DEFAULT_SEVERITY)
        assert truth["subscores"] == targets, phantom.name
        for wall, key in (("A", "anterior_wall"), ("P", "posterior_wall")):
            spans = [(d["start_px"], d["end_px"]) for d in truth["deposits"] if d["wall"] == wall]
            fractions = calcified_fractions(np.array(truth["aorta"][key]), spans, np.array(truth["boundaries"]),
                                            np.array(truth["boundary_directions"]))
            for level, fraction in zip(kauppila.SCORED_LEVELS, fractions):
                assert kauppila.wall_subscore(fraction) == targets[f"{level}{wall}"], (phantom.name, level, wall)
    punctate = [p for p in more if p.truth["plaque"]["habit"] == "punctate"]
    counted = [d for p in punctate for d in p.truth["deposits"] if d["level"]]
    assert counted
    for phantom in punctate:
        spacing = phantom.truth["spacing"][0]
        for wall in "AP":
            for level in kauppila.SCORED_LEVELS:
                spans = sorted((d["start_px"], d["end_px"]) for d in phantom.truth["deposits"]
                               if d["wall"] == wall and d["level"] == level)
                gaps = [(b[0] - a[1]) * spacing for a, b in zip(spans[:-1], spans[1:])]
                assert all(g >= GAP_MM - 1e-3 for g in gaps), (phantom.name, level, wall)
    lengths = [(d["end_px"] - d["start_px"]) * p.truth["spacing"][0] for p in punctate for d in p.truth["deposits"]
               if d["level"]]
    assert np.median(lengths) < 4.0


def test_a_written_phantom_reads_back(phantoms, tmp_path):
    phantom = next(p for p in phantoms if p.dataset["photometric"] == "MONOCHROME1")
    path = generator.write_phantom(phantom, tmp_path)
    radiograph = read_radiograph(path)
    assert radiograph.pixels.shape == phantom.pixels.shape
    assert radiograph.spacing == pytest.approx(tuple(phantom.truth["spacing"]), rel=1e-4)
    slope, intercept = phantom.dataset["rescale"] or (1.0, 0.0)
    read = (radiograph.pixels - intercept) / slope  # bone bright again after the reader undoes MONOCHROME1
    assert np.corrcoef(read.ravel(), phantom.pixels.ravel())[0, 1] > 0.999
    labels = np.asarray(Image.open(tmp_path / f"{phantom.name}_labels.png"))
    assert np.array_equal(labels, phantom.label_map)
    assert np.array_equal(read_label_map(tmp_path / f"{phantom.name}_labels.png", context=True), phantom.label_map)
    assert np.array_equal(read_label_map(tmp_path / f"{phantom.name}_labels.png"), phantom.labels)
    generator.write_truth_csv(tmp_path / "truth.csv", [generator.truth_row(phantom)])
    row = (tmp_path / "truth.csv").read_text().splitlines()[1]
    assert row.startswith(f"{phantom.name}.dcm,{phantom.name}_labels.png,{phantom.truth['aac24']},")
    assert row.endswith(f",projected,{phantom.truth['transitional']}")


def test_the_family_is_registered():
    assert "projected" in FAMILIES and not FAMILIES["projected"].held_out
    phantom = generator.generate_phantom(2, "projected", 1, size_range=SMALL)
    assert phantom.name == "phantom_projected_s2_0001" and phantom.truth["family"] == "projected"


def test_scatter_never_turns_the_exposure_negative():
    """Phantom 26 of seed 2027 once had ~no scatter behind the spine: scaling it to the wanted ratio blew the
    scatter up to -1.8e5, and the image became NaN (cast to black). A beam through nothing at all has exactly no
    scatter behind the spine; the image must stay finite and flat."""
    import types
    import warnings

    beam = types.SimpleNamespace(shape=(120, 90), spacing=0.2)
    spine = np.zeros(beam.shape, bool)
    spine[40:80, 30:60] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = projected._expose(np.zeros(beam.shape, np.float32), beam, 2, spine, np.random.default_rng(3))
    assert np.isfinite(image).all() and abs(float(np.median(image))) < 1.0


def test_implants_vary_and_cross_the_bodies_in_a_lateral_view():
    """Screws, cement, cage markers and clips each occur, in a minority of images; metal is far denser than bone;
    pedicle screws overlie their vertebral bodies in a lateral view (determinism: the test of the same seed above)."""
    anatomy = projected.build_anatomy_3d(np.random.default_rng(5))
    drawn = [projected.implants(np.random.default_rng([SEED, index]), anatomy) for index in range(200)]
    kinds = [{what.split()[0] for what in placed} for _, placed in drawn]
    assert set().union(*kinds) == {"screws", "cement", "cage", "clips"}
    assert 0.15 < np.mean([bool(k) for k in kinds]) < 0.5
    cortical = anatomy.mu["cortical"]
    for terms, placed in drawn:
        assert bool(terms) == bool(placed)
        metal = [density for _, density in terms]
        assert all(d > 0.5 * cortical for d in metal)
        if {"screws", "clips"} & {what.split()[0] for what in placed}:
            assert max(metal) >= 2 * cortical
    terms, placed = next((t, p) for t, p in drawn if p and p[0].startswith("screws"))
    v = anatomy.vertebra(placed[0].split()[1].split("-")[0])
    origin = v.local(-3000.0, 0.0, 0.0)  # far to the side: nearly parallel rays across the body's plane
    grid = np.array([v.local(0.0, u, a) for u in np.linspace(-v.height / 2, v.height / 2, 25)
                     for a in np.linspace(-v.ap / 2, v.ap / 2, 25)])
    directions = (grid - origin).T
    directions = (directions / np.linalg.norm(directions, axis=0)).astype(np.float32)
    through_metal = sum(shape.chord(origin, directions) for shape, _ in terms)
    through_body = v.outline.chord(origin, directions)
    assert ((through_metal > 0) & (through_body > 0)).any()

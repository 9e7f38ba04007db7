"""Phantom generator: determinism, truth files, labels, DICOM variants, severity mix, calcified fraction maths."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

from AACScoreLib import cli, kauppila
from AACScoreLib.phantoms import generator as phantoms

SMALL = (300, 360)  # image sides for fast tests (spacing grows to keep a 300-450 mm field of view)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    paths = phantoms.write_phantoms(out, 4, seed=5, size_range=SMALL)
    return out, paths


def test_same_seed_and_index_give_the_same_phantom():
    a = phantoms.generate_phantom(7, index=2, size_range=SMALL)
    b = phantoms.generate_phantom(7, index=2, size_range=SMALL)
    c = phantoms.generate_phantom(7, index=3, size_range=SMALL)
    assert np.array_equal(a.pixels, b.pixels) and np.array_equal(a.labels, b.labels)
    assert json.dumps(a.truth) == json.dumps(b.truth) and a.dataset == b.dataset
    assert a.pixels.shape != c.pixels.shape or not np.array_equal(a.pixels, c.pixels)
    alt = phantoms.generate_phantom(7, "alt", index=2, size_range=SMALL)
    assert alt.name == "phantom_alt_s7_0002" and not np.array_equal(alt.labels, a.labels)


def test_truth_csv_columns_and_consistency(written):
    out, paths = written
    with open(out / "truth.csv", newline="") as stream:
        reader = csv.DictReader(stream)
        assert tuple(reader.fieldnames) == ("file", "labels", "aac24", "category", *kauppila.SUBSCORE_COLUMNS,
                                         "family", "transitional")
        rows = list(reader)
    assert [r["file"] for r in rows] == sorted(p.name for p in paths)
    for row in rows:
        assert (out / row["labels"]).is_file() and row["labels"] == row["file"].replace(".dcm", "_labels.png")
        subscores = [int(row[c]) for c in kauppila.SUBSCORE_COLUMNS]
        assert int(row["aac24"]) == sum(subscores)
        assert row["category"] == kauppila.category(int(row["aac24"]))
        truth = json.loads((out / row["file"].replace(".dcm", "_truth.json")).read_text())
        assert truth["subscores"] == dict(zip(kauppila.SUBSCORE_COLUMNS, subscores))
        for column, fraction in truth["fractions"].items():
            assert kauppila.wall_subscore(fraction) == truth["subscores"][column]
            assert min(abs(fraction - 1 / 3), abs(fraction - 2 / 3)) > 0.05  # kept clear of the thresholds


def test_truth_csv_merges_runs(written, tmp_path):
    phantoms.write_phantoms(tmp_path, 1, seed=5, size_range=SMALL)
    phantoms.write_phantoms(tmp_path, 1, seed=5, style="alt", size_range=SMALL)
    with open(tmp_path / "truth.csv", newline="") as stream:
        files = [row["file"] for row in csv.DictReader(stream)]
    assert files == ["phantom_alt_s5_0000.dcm", "phantom_s5_0000.dcm"]
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_labels_are_t12_l1_to_l5_s1_in_order_down_the_spine(written):
    out, paths = written
    order = ("T12", *kauppila.VERTEBRAE, "S1")
    values = [kauppila.CONTEXT_LABELS["T12"], 1, 2, 3, 4, 5, kauppila.CONTEXT_LABELS["S1"]]
    for path in paths:
        labels = np.asarray(Image.open(out / f"{path.stem}_labels.png"))
        truth = json.loads((out / f"{path.stem}_truth.json").read_text())
        assert labels.dtype == np.uint8 and labels.shape == tuple(truth["image_shape"])
        assert set(np.unique(labels)) == {0, 1, 2, 3, 4, 5, 6, 7}  # T12 and S1 are always in these families' view
        centroids = np.array([np.argwhere(labels == k).mean(axis=0) for k in values])
        along = centroids @ np.array(truth["inferior_vector"])
        assert np.all(np.diff(along) > 0)
        for k, name in enumerate(order):  # the label is the drawn body: centred on its corners
            corners = np.array(list(truth["vertebrae"][name].values()))
            assert np.linalg.norm(centroids[k] - corners.mean(axis=0)) < 2.0


def test_boundaries_follow_the_contract_definitions(written):
    out, paths = written
    truth = json.loads((out / f"{paths[0].stem}_truth.json").read_text())
    corners = {n: {k: np.array(v) for k, v in c.items()} for n, c in truth["vertebrae"].items()}
    points, directions = phantoms.disc_boundaries(corners)
    assert np.allclose(points, truth["boundaries"], atol=1e-2)
    assert np.allclose(directions, truth["boundary_directions"], atol=1e-2)
    # Linear disc heights: the extrapolated T12/L1 boundary lands on the drawn one.
    assert np.linalg.norm(points[0] - np.array(truth["t12_l1_extrapolated"])) < 1.0
    assert set(truth["vertebrae"]) >= {"T12", "L1", "L2", "L3", "L4", "L5", "S1"}


def test_aortic_walls_lie_inside_the_kauppila_bands(written):
    out, paths = written
    for path in paths:
        t = json.loads((out / f"{path.stem}_truth.json").read_text())
        boundaries, directions = np.array(t["boundaries"]), np.array(t["boundary_directions"])
        anterior = np.array(t["anterior_vector"])
        for wall in ("anterior_wall", "posterior_wall"):
            polyline = np.array(t["aorta"][wall])
            arc = phantoms.arc_length(polyline)
            spans = phantoms.wall_segment_spans(polyline, boundaries, directions)
            for level, (top, bottom) in zip(kauppila.SCORED_LEVELS, spans):
                c = t["vertebrae"][level]
                a, b = np.array(c["superior_anterior"]), np.array(c["inferior_anterior"])
                normal = np.array([-(b - a)[1], (b - a)[0]]) / np.linalg.norm(b - a)
                normal = normal if normal @ anterior > 0 else -normal
                depth = (polyline[(arc >= top) & (arc <= bottom)] - a) @ normal
                assert depth.min() > 0 and depth.max() < 0.75 * t["mean_ap_px"]


def test_dicom_files_read_back_with_every_transfer_syntax(written):
    out, paths = written
    for path in paths:
        ds = pydicom.dcmread(path)
        truth = json.loads((out / f"{path.stem}_truth.json").read_text())
        assert ds.Modality == "DX" and ds.ViewPosition in ("LL", "RL")
        assert ds.file_meta.TransferSyntaxUID == truth["dicom"]["transfer_syntax"]
        assert ds.pixel_array.shape == tuple(truth["image_shape"])
    phantom = phantoms.generate_phantom(3, index=1, size_range=SMALL)
    for syntax in (ExplicitVRLittleEndian, RLELossless, JPEGLSLossless, JPEG2000Lossless):
        for photometric in ("MONOCHROME1", "MONOCHROME2"):
            phantom.dataset.update(transfer_syntax=str(syntax), photometric=photometric)
            buffer = io.BytesIO()
            phantoms.phantom_dataset(phantom).save_as(buffer, enforce_file_format=True)
            ds = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
            assert ds.file_meta.TransferSyntaxUID == syntax
            top = 2 ** ds.BitsStored - 1
            expected = top - phantom.pixels if photometric == "MONOCHROME1" else phantom.pixels
            assert np.array_equal(ds.pixel_array, expected)  # lossless, inverted when MONOCHROME1


def test_dicom_spacing_and_orientation_tags():
    seen = Counter()
    for index in range(12):
        phantom = phantoms.generate_phantom(9, index=index, size_range=SMALL)
        ds = phantoms.phantom_dataset(phantom)
        spacing = phantom.truth["spacing"][0]
        if "PixelSpacing" in ds:
            assert float(ds.PixelSpacing[0]) == pytest.approx(spacing, rel=1e-5)
        else:
            corrected = float(ds.ImagerPixelSpacing[0]) / float(ds.EstimatedRadiographicMagnificationFactor)
            assert corrected == pytest.approx(spacing, rel=1e-4)
        if "PatientOrientation" in ds:
            assert ds.PatientOrientation[0] == ("A" if phantom.truth["anterior"] == "right" else "P")
        seen[phantom.dataset["spacing_tags"]] += 1
        seen[phantom.dataset["photometric"]] += 1
        seen[phantom.truth["anterior"]] += 1
    assert all(seen[k] > 0 for k in ("MONOCHROME1", "MONOCHROME2", "left", "right", "PixelSpacing"))


def test_severity_distribution_is_respected():
    categories = Counter(phantoms.generate_phantom(2, index=i, size_range=(256, 256)).truth["category"]
                         for i in range(40))
    assert 7 <= categories["no/mild"] <= 13 and 19 <= categories["moderate"] <= 29 and 3 <= categories["severe"] <= 9
    severe_only = {phantoms.generate_phantom(2, index=i, severity=(0, 0, 1), size_range=(256, 256)).truth["category"]
                   for i in range(3)}
    assert severe_only == {"severe"}


def test_calcified_fraction_on_a_hand_built_wall():
    wall = np.stack([np.linspace(0.0, 100.0, 201), np.zeros(201)], axis=1)  # straight, down column 0
    boundaries = np.array([[10.0, 0.0], [30.0, 0.0], [48.0 + 2.0, 10.0], [70.0, 0.0], [90.0, 0.0]])
    directions = np.array([[0.0, 1.0], [0.0, 1.0], [0.2, 1.0], [0.0, 1.0], [0.0, 1.0]])
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    # The tilted line through (50, 10) crosses column 0 at row 48.
    spans = phantoms.wall_segment_spans(wall, boundaries, directions)
    assert np.allclose(spans, [[10, 30], [30, 48], [48, 70], [70, 90]])
    deposits = [(20.0, 25.0), (24.0, 28.0), (35.0, 44.0), (60.0, 75.0), (95.0, 99.0)]
    fractions = phantoms.calcified_fractions(wall, deposits, boundaries, directions)
    assert fractions == pytest.approx([8 / 20, 9 / 18, 10 / 22, 5 / 20])
    assert [kauppila.wall_subscore(f) for f in fractions] == [2, 2, 2, 1]


def test_cli_writes_phantoms(tmp_path, capsys):
    assert cli.main(["phantoms", "--n", "1", "--seed", "4", "--out", str(tmp_path), "--size-range", "256,300",
                     "--severity", "0,1,0"]) == 0
    assert (tmp_path / "phantom_s4_0000.dcm").is_file() and (tmp_path / "phantom_s4_0000_labels.png").is_file()
    assert "moderate" in (tmp_path / "truth.csv").read_text()
    with pytest.raises(SystemExit):
        cli.main(["phantoms", "--n", "1", "--out", str(tmp_path), "--severity", "1,2"])
    assert "expected 3" in capsys.readouterr().err

"""Stress sets that QC is measured and calibrated on: the sacrum cut out of view, and another look."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from AACScoreLib.cli import main as cli_main
from AACScoreLib.io.labelmaps import read_label_map
from AACScoreLib.io.radiograph import read_radiograph
from AACScoreLib.phantoms.generator import write_phantoms


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantoms")
    write_phantoms(folder, 2, seed=8400, size_range=(360, 440))
    return folder


def _rows(path):
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def test_sacrum_out_cuts_image_and_labels_below_l5(phantoms, tmp_path):
    assert cli_main(["stress-set", str(phantoms), "--kind", "sacrum-out", "--out", str(tmp_path)]) == 0
    original, cut = _rows(phantoms / "truth.csv"), _rows(tmp_path / "truth.csv")
    assert [row["aac24"] for row in cut] == [row["aac24"] for row in original]
    for row, source in zip(cut, original):
        image = read_radiograph(tmp_path / row["file"])
        labels = read_label_map(tmp_path / row["labels"])
        assert labels.shape == image.pixels.shape < read_radiograph(phantoms / source["file"]).pixels.shape
        assert (labels == 5).any() and not (labels[-1] == 5).all()


def test_restyle_changes_the_look_not_the_anatomy_or_the_truth(phantoms, tmp_path):
    assert cli_main(["stress-set", str(phantoms), "--kind", "restyle", "--out", str(tmp_path), "--seed", "3"]) == 0
    original, restyled = _rows(phantoms / "truth.csv"), _rows(tmp_path / "truth.csv")
    assert [row["aac24"] for row in restyled] == [row["aac24"] for row in original]
    for row, source in zip(restyled, original):
        image, before = read_radiograph(tmp_path / row["file"]), read_radiograph(phantoms / source["file"])
        assert image.pixels.shape == before.pixels.shape and image.spacing == pytest.approx(before.spacing)
        np.testing.assert_array_equal(read_label_map(tmp_path / row["labels"]),
                                      read_label_map(phantoms / source["labels"]))
        assert not np.allclose(image.pixels / image.pixels.max(), before.pixels / before.pixels.max(), atol=0.02)

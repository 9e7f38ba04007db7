"""Which way up: the upright check's training and package, and the segmenter turning untagged radiographs."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from AACScoreLib.cli import main as cli_main
from AACScoreLib.errors import ModelPackageError
from AACScoreLib.evaluation.metrics import dice_per_label
from AACScoreLib.packages import verify_package
from AACScoreLib.phantoms.generator import generate_phantom, read_back
from AACScoreLib.qc.levels import MIN_FLIP_DICE, flip_dice
from AACScoreLib.segmentation.segmenter import Segmenter, turned
from AACScoreLib.segmentation.upright import (THUMBNAIL_PX, TURN_NAMES, UprightCheck, thumbnail,
                                              training_sample)


@pytest.fixture(scope="module")
def segmenter():
    """The demo segmenter with the bundled upright check, as `aacscore score` loads it."""
    return Segmenter.from_package(None, device="cpu")


@pytest.fixture(scope="module")
def phantom():
    return generate_phantom(9001, "default", 0, size_range=(1000, 1100))


def test_a_thumbnail_keeps_the_image_shape_on_a_black_square():
    tall = np.tile(np.linspace(0.0, 1.0, 300, dtype=np.float32)[:, None], (1, 150))
    thumb = thumbnail(tall)
    assert thumb.shape == (THUMBNAIL_PX, THUMBNAIL_PX) and thumb.min() >= 0.0 and thumb.max() <= 1.0
    filled = np.flatnonzero(thumb.max(axis=0) > 0)
    assert (filled[0], filled[-1]) == (32, 95)  # 64 columns wide, centred: the picture's shape is kept


def test_a_training_sample_is_turned_the_way_its_label_says():
    """Texture only in the top third of an upright image: after a sample's turn it must lie on the side the label
    names (numpy.rot90: one turn takes the top to the left). A label turned the wrong way would teach the check
    to turn images the wrong way."""
    base = np.full((240, 120), 0.5, np.float32)
    rows, cols = np.indices((80, 120))
    base[:80] += 0.4 * (((rows // 6) + (cols // 6)) % 2) - 0.2
    side_of = {0: np.s_[:40, :], 1: np.s_[:, :40], 2: np.s_[-40:, :], 3: np.s_[:, -40:]}
    opposite = {0: 2, 1: 3, 2: 0, 3: 1}
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(24):
        sample, turns = training_sample(base, rng)
        texture = np.abs(np.diff(sample, axis=0)).mean(), np.abs(np.diff(sample, axis=1)).mean()
        assert min(texture) > 0
        edges = np.abs(np.diff(sample, axis=0))[:, :-1] + np.abs(np.diff(sample, axis=1))[:-1, :]
        edges = np.pad(edges, ((0, 1), (0, 1)))
        assert edges[side_of[turns]].mean() > edges[side_of[opposite[turns]]].mean()
        seen.add(turns)
    assert seen == {0, 1, 2, 3}


def _write_upright_pngs(folder, n: int = 3) -> None:
    folder.mkdir()
    for index in range(n):
        radiograph = read_back(generate_phantom(9101, "default", index, size_range=(400, 450)))
        pixels = radiograph.pixels
        scaled = (255 * (pixels - pixels.min()) / max(1e-6, float(np.ptp(pixels)))).astype(np.uint8)
        Image.fromarray(scaled).save(folder / f"upright_{index}.png")


def test_an_upright_package_is_trained_written_checked_and_loaded(tmp_path):
    images, out = tmp_path / "upright", tmp_path / "aacscore-upright"
    _write_upright_pngs(images)
    assert cli_main(["train-upright", str(images), "--samples", "128", "--epochs", "1", "--out", str(out),
                     "--version", "0.1", "--held-out", str(images), "--device", "cpu"]) == 0
    package = verify_package(out)
    assert package.kind == "upright" and package.manifest["labels"] == list(TURN_NAMES)
    assert package.manifest["metrics"]["held_out"]["images"] == 3
    assert package.manifest["training_data"]["radiographs"] == 3
    check = UprightCheck.from_package(str(out), "cpu")
    guess = check.guess(np.random.default_rng(0).random((300, 200)).astype(np.float32))
    assert guess.turns in range(4) and abs(sum(guess.probabilities) - 1) < 1e-3
    assert guess.probability == max(guess.probabilities)
    weights = out / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"tampered")
    with pytest.raises(ModelPackageError, match="weights.safetensors"):
        Segmenter.from_package(None, device="cpu", upright=str(out))


def test_train_upright_refuses_a_folder_without_radiographs_in_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli_main(["train-upright", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert "no radiographs found" in error and str(tmp_path / "empty") in error and "\n" not in error
    assert cli_main(["train-upright", str(tmp_path / "empty"), "--samples", "10", "--out", str(tmp_path)]) == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("turns", [1, 2, 3])
def test_an_untagged_radiograph_stored_turned_is_found_and_segmented_upright(segmenter, phantom, turns):
    """No PatientOrientation (a PNG export, an untagged DICOM): the upright check tells the turn, the image is
    segmented upright and its labels come back on the image as stored, as a result to look at. Without the check
    the same image gives no right levels."""
    stored = turned(read_back(phantom), turns)
    assert stored.patient_orientation is None
    truth = np.rot90(phantom.labels, turns)
    result = segmenter.segment(stored)
    assert result.turns == (4 - turns) % 4 and "upright check sees the image" in result.message
    assert result.status == "warning" and result.labels.shape == truth.shape
    assert min(dice_per_label(truth, result.labels).values()) > 0.85
    assert min(flip_dice(segmenter, stored, result.labels, result.working_shape, result.turns).values()) >= MIN_FLIP_DICE
    without = Segmenter.from_package(None, device="cpu", upright=None).segment(stored)
    assert without.turns == 0 and (without.status == "error" or min(dice_per_label(truth, without.labels).values()) < 0.5)


def test_an_upright_image_and_a_tag_that_says_which_way_up_are_left_as_they_are(segmenter, phantom):
    """An untagged upright image stays as it is; a tag naming the feet is believed over the check (here a tag
    that lies: the pixels are on their side, the tag says upright, so nothing is turned)."""
    radiograph = read_back(phantom)
    upright = segmenter.segment(replace(radiograph, patient_orientation=None))
    assert upright.turns == 0 and "upright check" not in upright.message
    on_its_side = replace(turned(radiograph, 1), patient_orientation=("A", "F"))
    assert segmenter.segment(on_its_side).turns == 0


def test_the_pipeline_scores_an_untagged_turned_radiograph_and_asks_for_a_look(segmenter, phantom, tiny_scorer):
    from AACScoreLib.pipeline import Pipeline

    result = Pipeline(tiny_scorer, segmenter).run(turned(read_back(phantom), 2), heatmap=False)
    codes = [reason.code for reason in result.qc_reasons]
    assert result.qc == "review" and "segmenter_note" in codes and "segmenter_unstable" not in codes
    assert result.turns == 2 and result.qc_measurements["flip_dice_min"] >= MIN_FLIP_DICE


def test_when_the_turned_image_fails_it_is_segmented_as_stored_and_never_ok(segmenter, phantom, monkeypatch):
    """The check is sure the image is on its side, but the network finds no spine that way up (here made to fail):
    the image is segmented as stored, and since the check doubted that, the result is one to look at."""
    from AACScoreLib.segmentation.segmenter import SegmentationResult

    stored = turned(read_back(phantom), 1)
    real = segmenter._segment_upright

    def failing_when_turned(radiograph, step, started):
        if radiograph.pixels.shape != stored.pixels.shape:
            return SegmentationResult(np.zeros(radiograph.pixels.shape, np.uint8), "error", "L1 not found")
        return real(radiograph, step, started)

    monkeypatch.setattr(segmenter, "_segment_upright", failing_when_turned)
    result = segmenter.segment(stored)
    assert result.turns == 0 and result.status in ("warning", "error")
    assert ("segmented as stored: no PatientOrientation, and the upright check sees the image turned 90 degrees "
            "anticlockwise") in result.message
    assert "turned upright it gave L1 not found" in result.message


def test_a_users_label_map_on_an_untagged_turned_radiograph_gets_the_second_look_upright(segmenter, phantom,
                                                                                        tiny_scorer):
    """Corrected segments of a turned export scored in Slicer come as the user's labels: QC's second look must turn
    the image as the segmenter would, or every such result would say the segmenter sees other levels."""
    from AACScoreLib.pipeline import Pipeline

    stored = turned(read_back(phantom), 3)
    result = Pipeline(tiny_scorer, segmenter).run(stored, np.ascontiguousarray(np.rot90(phantom.labels, 3)),
                                                  heatmap=False)
    codes = [reason.code for reason in result.qc_reasons]
    assert result.labels_source == "user" and "levels_differ_from_segmenter" not in codes
    assert result.qc_measurements["flip_dice_min"] >= MIN_FLIP_DICE
    assert segmenter.turns_to_upright(stored)[0] == 1

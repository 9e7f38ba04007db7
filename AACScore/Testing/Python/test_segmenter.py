"""Segmentation: dataset export, a real (tiny) nnU-Net training, packaging, in-process inference, post-processing."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from AACScoreLib.cli import main as cli_main
from AACScoreLib.errors import AACScoreError, GeometryError, ModelPackageError, RadiographError
from AACScoreLib.io.labelmaps import read_label_map, vertebra_labels, vertebra_of_segment
from AACScoreLib.segmentation.dataset import export_dataset, phantom_cases, resample_labels, working_shape
from AACScoreLib.packages import verify_package
from AACScoreLib.io.radiograph import read_radiograph
from AACScoreLib.devices import resolve_device
from AACScoreLib.errors import Cancelled, DeviceError
from AACScoreLib.qc.levels import MIN_FLIP_DICE, flip_dice
from AACScoreLib.segmentation.levels import count_levels
from AACScoreLib.segmentation.segmenter import (TYPICAL_BODY_MM, Segmenter, body_scale, channel_argmax,
                                                levels_at_full_size, postprocess_labels, view_wider_than_assumed)
from AACScoreLib.segmentation.package import convert_nnunet_results

TOY_SHAPE = (96, 72)


def toy_spine(seed: int, shape=TOY_SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """A radiograph-like toy: seven bright blocks (T12, L1..L5, S1) in a column on a noisy background, labelled
    1..5 = L1..L5, 6 = T12, 7 = S1 as phantoms are."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    image = rng.normal(0.2, 0.03, shape)
    labels = np.zeros(shape, np.uint8)
    height, gap = rows * 0.1, rows * 0.035
    top = rng.uniform(0.02, 0.06) * rows
    left, width = cols * rng.uniform(0.3, 0.4), cols * 0.3
    for level in range(7):
        r0, r1 = int(top + level * (height + gap)), int(top + level * (height + gap) + height)
        image[r0:r1, int(left):int(left + width)] += 0.4 + 0.05 * level
        labels[r0:r1, int(left):int(left + width)] = {0: 6, 6: 7}.get(level, level)
    return np.clip(image * 4000, 0, 4095).astype(np.uint16), labels


def write_toys(folder: Path, n: int, first_seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for seed in range(first_seed, first_seed + n):
        pixels, labels = toy_spine(seed)
        Image.fromarray(pixels).save(folder / f"toy_{seed:03d}.png")
        Image.fromarray(labels).save(folder / f"toy_{seed:03d}_labels.png")
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Export toys with T12/S1 context classes, run nnU-Net planning/preprocessing and a few training iterations,
    keep its results folder.

    The 10 epochs asked for are cut to 3 by a zero time budget (3 epochs are measured before it applies)."""
    from AACScoreLib.segmentation.training import train_segmenter

    base = tmp_path_factory.mktemp("segmenter")
    data = write_toys(base / "toys", 8)
    package, metrics = train_segmenter(
        [data], base / "package", work=base / "work", name="toy-segmenter", epochs=10, iterations_per_epoch=3,
        patch_size=(64, 48), features=(4, 8, 16), batch_size=2, default_long_side_px=96, device="cpu",
        eval_cases=phantom_cases(data)[:2], time_budget_s=0.0, context=True)
    results = next((base / "work" / "results").glob("Dataset*/*__2d"))
    return {"package": Path(package), "metrics": metrics, "results": results, "base": base}


# ---------------------------------------------------------------------------------------------- export


def test_working_shape_uses_spacing_or_assumes_long_side():
    assert working_shape((3000, 2400), (0.15, 0.15), 1.25) == ((360, 288), False)
    assert working_shape((3000, 2400), None, 1.25, 300) == ((300, 240), True)


def test_resample_labels_keeps_every_vertebra():
    labels = np.zeros((400, 300), np.uint8)
    for level in range(1, 6):
        labels[40 + 60 * (level - 1): 80 + 60 * (level - 1), 100:200] = level
    small = resample_labels(labels, (40, 30))
    assert set(np.unique(small)) == {0, 1, 2, 3, 4, 5}


def test_export_writes_nnunet_raw_dataset(tmp_path):
    data = write_toys(tmp_path / "toys", 2)
    summary = export_dataset(phantom_cases(data), tmp_path / "raw", 7, "Toy", default_long_side_px=48)
    dataset = summary.dataset_dir
    assert dataset.name == "Dataset007_Toy"
    import json

    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "X-ray"}
    assert meta["labels"] == {"background": 0, "L1": 1, "L2": 2, "L3": 3, "L4": 4, "L5": 5}
    assert meta["numTraining"] == 2 and meta["file_ending"] == ".png"
    image = np.asarray(Image.open(dataset / "imagesTr" / "case_0000_0000.png"))
    labels = np.asarray(Image.open(dataset / "labelsTr" / "case_0000.png"))
    assert image.dtype == np.uint16 and image.shape == labels.shape == (48, 36)
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4, 5}
    assert summary.assumed_spacing == [str(data / "toy_000.png"), str(data / "toy_001.png")]


def test_export_with_context_classes_and_randomised_copies(tmp_path):
    import json

    data = write_toys(tmp_path / "toys", 2)

    def export(folder):
        return export_dataset(phantom_cases(data), folder, 7, "Toy", default_long_side_px=48, context=True,
                              randomise_copies=2, seed=5).dataset_dir

    dataset = export(tmp_path / "raw")
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "L1": 1, "L2": 2, "L3": 3, "L4": 4, "L5": 5, "T12": 6, "S1": 7}
    assert meta["numTraining"] == 6 and len(list((dataset / "imagesTr").glob("*.png"))) == 6

    def png(path):
        return np.asarray(Image.open(path)).astype(int)

    labels = png(dataset / "labelsTr" / "case_0000.png")
    assert set(np.unique(labels)) == set(range(8))
    original = png(dataset / "imagesTr" / "case_0000_0000.png")
    copies = [png(dataset / "imagesTr" / f"case_0000r{k}_0000.png") for k in (1, 2)]
    for k, copy in enumerate(copies, 1):  # same geometry and labels, another look
        assert copy.shape == original.shape and np.abs(copy - original).mean() > 500
        assert np.array_equal(png(dataset / "labelsTr" / f"case_0000r{k}.png"), labels)
    assert np.abs(copies[0] - copies[1]).mean() > 500
    again = export(tmp_path / "again")  # fixed by the seed, the case and the copy
    assert np.array_equal(png(again / "imagesTr" / "case_0001r2_0000.png"),
                          png(dataset / "imagesTr" / "case_0001r2_0000.png"))
    metal = export_dataset(phantom_cases(data), tmp_path / "metal", 7, "Toy", default_long_side_px=48, context=True,
                           randomise_copies=2, seed=5, metal_chance=1.0).dataset_dir
    assert json.loads((metal / "aacscore_export.json").read_text())["metal_chance"] == 1.0
    for name in ("imagesTr/case_0000_0000.png", "labelsTr/case_0000r1.png"):  # originals and labels as they were
        assert np.array_equal(png(metal / name), png(dataset / name))
    with_metal = png(metal / "imagesTr" / "case_0000r1_0000.png")
    assert not np.array_equal(with_metal, copies[0])  # the same copy, now with metal drawn in
    with pytest.raises(RadiographError, match="metal chance"):
        export_dataset(phantom_cases(data), tmp_path / "bad", 7, "Toy", default_long_side_px=48, metal_chance=1.5)
    assert not (tmp_path / "bad").exists()  # refused before anything is written


def test_export_refuses_context_classes_that_no_label_map_carries(tmp_path):
    data = write_toys(tmp_path / "toys", 1)
    image, label_path = phantom_cases(data)[0]
    lumbar_only = read_label_map(label_path)  # context read as background
    assert lumbar_only.max() == 5
    with pytest.raises(GeometryError, match="no label map holds T12"):
        export_dataset([(image, lumbar_only)], tmp_path / "raw", 7, "Toy", default_long_side_px=48, context=True)


def test_phantoms_made_in_memory_export_like_their_written_files(tmp_path):
    from AACScoreLib.phantoms.generator import phantom_sources, write_phantoms

    sources = phantom_sources(2, 77, ("default", "alt"))
    files = []
    for source in sources:  # one folder each, to keep the order of `sources`
        write_phantoms(tmp_path / str(source.index), 1, source.seed, source.style, start=source.index)
        files += phantom_cases(tmp_path / str(source.index))
    in_memory = export_dataset(sources, tmp_path / "memory", 7, "Toy", workers=2).dataset_dir
    written = export_dataset(files, tmp_path / "written", 7, "Toy").dataset_dir
    for case in ("case_0000", "case_0001"):
        memory_image = np.asarray(Image.open(in_memory / "imagesTr" / f"{case}_0000.png")).astype(int)
        file_image = np.asarray(Image.open(written / "imagesTr" / f"{case}_0000.png")).astype(int)
        assert memory_image.shape == file_image.shape and np.abs(memory_image - file_image).max() <= 2
        assert np.array_equal(np.asarray(Image.open(in_memory / "labelsTr" / f"{case}.png")),
                              np.asarray(Image.open(written / "labelsTr" / f"{case}.png")))


def test_export_in_worker_processes_writes_the_same_dataset(tmp_path):
    data = write_toys(tmp_path / "toys", 3)
    alone = export_dataset(phantom_cases(data), tmp_path / "one", 7, "Toy", default_long_side_px=48)
    pooled = export_dataset(phantom_cases(data), tmp_path / "two", 7, "Toy", default_long_side_px=48, workers=2)
    assert alone.assumed_spacing == pooled.assumed_spacing and alone.median_working_shape == pooled.median_working_shape
    for path in sorted(alone.dataset_dir.rglob("*.png")):
        twin = pooled.dataset_dir / path.relative_to(alone.dataset_dir)
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(twin)))


def test_export_error_from_a_worker_names_the_file(tmp_path):
    data = write_toys(tmp_path / "toys", 2)
    (data / "toy_001.png").write_bytes(b"not an image")
    with pytest.raises(RadiographError, match="toy_001.png"):
        export_dataset(phantom_cases(data), tmp_path / "raw", 7, "Toy", default_long_side_px=48, workers=2)


def test_unknown_phantom_style_is_refused():
    from AACScoreLib.phantoms.generator import parse_styles

    assert parse_styles("default, alt") == ("default", "alt")
    with pytest.raises(AACScoreError, match="among default, alt, .*varied.*; got odd"):
        parse_styles("default,odd")


def test_segment_names_match_levels():
    assert [vertebra_of_segment(n) for n in ("L1", "l2", "L3 vertebra", "vertebra L4", "l5 body")] == \
        ["L1", "L2", "L3", "L4", "L5"]
    assert vertebra_of_segment("aorta") is None and vertebra_of_segment("L12") is None


def test_seg_nrrd_segments_are_matched_by_name_not_value(tmp_path):
    import slicerio

    truth = vertebra_labels(toy_spine(3)[1])
    ijk = np.diag([0.2, 0.2, 1.0, 1.0])
    segmentation = slicerio.create_segmentation((TOY_SHAPE[1], TOY_SHAPE[0], 1), ijk)
    slicerio.add_segment(segmentation, np.zeros((TOY_SHAPE[1], TOY_SHAPE[0], 1), bool), {"name": "aorta"})
    for level, name in [(5, "L5 vertebra"), (3, "l3"), (1, "L1"), (4, "L4"), (2, "L2 vertebra")]:  # shuffled
        slicerio.add_segment(segmentation, (truth == level).T[:, :, None], {"name": name})
    path = tmp_path / "toy.seg.nrrd"
    slicerio.write_segmentation(str(path), segmentation)
    labels = read_label_map(path, TOY_SHAPE)
    assert np.array_equal(labels, truth)

    slicerio.write_segmentation(str(path), {**segmentation, "segments": segmentation["segments"][:3]})
    with pytest.raises(GeometryError, match="no segment named L1, L2, L4"):
        read_label_map(path, TOY_SHAPE)


# ---------------------------------------------------------------------------------------------- post-processing


def stacked_labels(order=(1, 2, 3, 4, 5), heights=(10, 10, 10, 10, 10)) -> np.ndarray:
    labels = np.zeros((120, 40), np.uint8)
    row = 5
    for value, height in zip(order, heights):
        labels[row:row + height, 10:30] = value
        row += height + 4
    return labels


def test_postprocess_keeps_largest_piece_and_accepts_good_labels():
    labels = stacked_labels()
    noisy = labels.copy()
    noisy[110:113, 2:5] = 2  # a stray fragment of L2 far away
    out, status, message = postprocess_labels(noisy)
    assert status == "ok" and message == ""
    assert np.array_equal(out, labels)


def test_postprocess_reorders_labels_down_the_spine():
    swapped = stacked_labels(order=(1, 3, 2, 4, 5))
    out, status, message = postprocess_labels(swapped)
    assert np.array_equal(out, stacked_labels())
    assert status == "ok" and "anatomical order" in message


def test_postprocess_reports_missing_and_merged():
    labels = stacked_labels()
    labels[labels == 3] = 0
    _, status, message = postprocess_labels(labels)
    assert status == "error" and "L3 not found" in message

    merged = stacked_labels(order=(1, 2, 3, 4), heights=(10, 24, 10, 10))
    _, status, message = postprocess_labels(merged)
    assert status == "error" and "L5 not found" in message and "L2" in message and "merged" in message

    assert postprocess_labels(np.zeros((20, 20), np.uint8))[1] == "error"


def test_assign_levels_places_five_consecutive_bodies_by_probability():
    # six bodies top to bottom: T12 (looks like L1), then L1..L5 with L3 mistaken for L2 by the "network"
    peaks = [1, 1, 2, 2, 4, 5]
    probabilities = np.zeros((6, 130, 40))
    probabilities[0] = 1.0
    truth = np.zeros((130, 40), np.uint8)
    for index, peak in enumerate(peaks):
        rows = slice(5 + 20 * index, 19 + 20 * index)
        probabilities[0, rows, 10:30] = 0.1
        probabilities[1:, rows, 10:30] = 0.9 * 0.1
        probabilities[peak, rows, 10:30] = 0.9 * 0.6
        truth[rows, 10:30] = index  # 0 for T12, 1..5 for L1..L5
    levels, how = count_levels(probabilities)
    assert np.array_equal(levels, truth)
    assert how.method == "L5" and how.agree is False  # its most L1-like body is T12: counting from above differs

    full, parted = levels_at_full_size(np.kron(levels > 0, np.ones((3, 3), bool)), levels, (0, 390, 0, 120),
                                       (390, 120))
    assert np.array_equal(full, np.kron(truth, np.ones((3, 3), np.uint8))) and parted == 0


def test_bodies_joined_across_a_disc_are_parted_before_counting():
    # six bodies as above, the network's classes T12-like-L1, L1, L2, L3, L4, L5; a bridge across one disc joins
    # T12 to L1 (one class: parted by erosion) or L4 to L5 (two classes: parted where the classes change)
    for above in (0, 4):
        probabilities = np.zeros((6, 130, 40))
        probabilities[0] = 1.0
        truth = np.zeros((130, 40), np.uint8)
        for index, peak in enumerate([1, 1, 2, 3, 4, 5]):
            rows = slice(5 + 20 * index, 19 + 20 * index)
            probabilities[0, rows, 10:30] = 0.1
            probabilities[1:, rows, 10:30] = 0.9 * 0.1
            probabilities[peak, rows, 10:30] = 0.9 * 0.6
            truth[rows, 10:30] = index
        bridge = np.zeros((130, 40), bool)
        bridge[19 + 20 * above: 25 + 20 * above, 19:21] = True
        probabilities[:, bridge] = probabilities[:, 10 + 20 * above, 20][:, None]  # the upper body's values
        levels, how = count_levels(probabilities)
        assert np.array_equal(levels[~bridge], truth[~bridge]) and how.from_below == "L5"
        assert how.parted == 1 and how.doubtful and "joined bodies parted" in how.summary()  # a repair: look

        wide = np.kron(bridge, np.ones((3, 3), bool))
        full, parted = levels_at_full_size(np.kron(truth > 0, np.ones((3, 3), bool)) | wide, truth,
                                           (0, 390, 0, 120), (390, 120))
        assert np.array_equal(full[~wide], np.kron(truth, np.ones((3, 3), np.uint8))[~wide])  # two levels, not one
        assert parted == (above == 4)  # T12 has no level in this map, so only the L4-L5 piece spans two


# ---------------------------------------------------------------------------------------------- device


def test_device_auto_falls_back_and_explicit_cuda_is_checked():
    import torch

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(DeviceError, match="cuda"):
            resolve_device("cuda")


# ---------------------------------------------------------------------------------------------- train -> package -> infer


def test_training_writes_a_verified_package(trained):
    package = verify_package(trained["package"])
    manifest = package.manifest
    assert package.kind == "segmenter" and manifest["labels"] == ["L1", "L2", "L3", "L4", "L5", "T12", "S1"]
    assert manifest["label_values"] == {"L1": 1, "L2": 2, "L3": 3, "L4": 4, "L5": 5, "T12": 6, "S1": 7}
    assert manifest["training_data"]["context_classes"] == ["S1", "T12"]
    assert manifest["architecture"]["trainer"] == "nnUNetTrainerAACScore"
    assert manifest["architecture"]["features_per_stage"] == [4, 8, 16]
    assert manifest["input"]["working_spacing_mm"] == 1.25 and manifest["input"]["mirror_axes"] == [1]
    assert set(package.files) == {"plans.json", "dataset.json", "fold_all.safetensors"}
    assert set(trained["metrics"]["held_out"]["dice_mean"]) == {"L1", "L2", "L3", "L4", "L5"}
    assert not list(trained["package"].glob("*.pth"))
    assert manifest["training_data"]["epochs"] == 3  # the time budget ended the run after the settling epochs


def test_epochs_are_fitted_to_the_time_budget():
    from AACScoreLib.segmentation.training import epochs_within_budget

    assert epochs_within_budget([9.0, 2.0], 100.0, 50) == 50  # still settling: the asked-for maximum
    assert epochs_within_budget([9.0, 2.0, 2.0], 20.0, 50) == 13  # 3 done + 10 of 2 s (the warm-up 9 s ignored)
    assert epochs_within_budget([9.0, 2.0, 2.0], 500.0, 50) == 50  # never more than asked
    assert epochs_within_budget([9.0, 2.0, 2.0], -5.0, 50) == 3  # over budget: stop after what is done
    assert epochs_within_budget([9.0, 2.0, 2.0], 20.0, 100, done_before=40) == 53  # resumed at epoch 40


def test_inference_from_package_gives_label_map_at_image_size(trained, tmp_path):
    pixels, _ = toy_spine(50, shape=(150, 110))
    Image.fromarray(pixels).save(tmp_path / "big.png")
    radiograph = read_radiograph(tmp_path / "big.png")
    segmenter = Segmenter.from_package(trained["package"], device="cpu")
    steps = []
    result = segmenter.segment(radiograph, progress=lambda fraction, text: steps.append(fraction))
    assert result.labels.shape == (150, 110) and result.labels.dtype == np.uint8
    assert set(np.unique(result.labels)) <= {0, 1, 2, 3, 4, 5}
    assert result.context.shape == (150, 110) and set(np.unique(result.context)) <= {0, 6, 7}
    assert result.levels is None or result.levels.method  # None only when the barely trained model finds no body
    assert result.status in ("ok", "warning", "error")
    assert result.spacing_assumed and "spacing unknown" in result.message
    assert steps == sorted(steps) and steps[0] == 0.0 and steps[-1] == 1.0
    with pytest.raises(Cancelled):
        segmenter.segment(radiograph, cancel=lambda: True)


def test_channel_argmax_is_torch_argmax_first_on_ties():
    import torch

    scores = torch.from_numpy(np.random.default_rng(0).integers(0, 4, (8, 60, 50)).astype(np.float32))  # many ties
    assert np.array_equal(channel_argmax(scores), scores.argmax(0).numpy())
    assert channel_argmax(scores).dtype == np.uint8


def test_body_scale_is_the_growth_that_makes_the_median_body_typical():
    foreground = np.zeros((200, 60), bool)
    for index, side in enumerate((18, 20, 20, 22, 40)):  # the last drawn twice too big: the median ignores it
        foreground[5 + 38 * index:5 + 38 * index + side, 10:10 + side] = True
    foreground[70:73, 50:53] = True  # a speck, no body
    assert body_scale(foreground, 1.25) == pytest.approx(TYPICAL_BODY_MM / (20 * 1.25))
    foreground[81:] = False
    assert body_scale(foreground, 1.25) is None  # two bodies and a speck do not set a scale


def test_a_view_is_taken_for_wider_than_assumed_only_when_even_its_largest_piece_is_small():
    typical = round(TYPICAL_BODY_MM / 1.25)  # a typical body's side in working pixels at 1.25 mm

    def pieces(*boxes):
        foreground = np.zeros((200, 80), bool)
        for row, col, height, width in boxes:
            foreground[row:row + height, col:col + width] = True
        return foreground

    assert view_wider_than_assumed(pieces(), 1.25)  # nothing found at all
    small = pieces((10, 10, 15, 15), (40, 10, 15, 15))  # two pieces a third of a body's area
    assert body_scale(small, 1.25) is None and view_wider_than_assumed(small, 1.25)
    smear = pieces((10, 10, typical + 3, typical + 3), (60, 10, 5, 5))  # small bodies run together: over one body
    assert body_scale(smear, 1.25) is None and view_wider_than_assumed(smear, 1.25)
    joined = pieces((10, 10, 2 * typical, typical), (80, 10, 15, 15))  # two bodies joined across a disc
    assert body_scale(joined, 1.25) is None and not view_wider_than_assumed(joined, 1.25)  # about the right scale
    bodies = pieces(*[(5 + 38 * index, 10, typical, typical) for index in range(5)])
    assert body_scale(bodies, 1.25) == pytest.approx(1.0, rel=0.05) and not view_wider_than_assumed(bodies, 1.25)


def test_a_missing_or_wrong_spacing_is_found_from_the_vertebral_bodies():
    """A lumbar-only view without spacing (as a PNG export is): the assumed field of view is twice too wide, so
    the bodies come out half their size; the demo segmenter runs again at the scale they imply, and counts right.
    A stated spacing twice the truth is doubted the same way; the right one is used as it is."""
    from dataclasses import replace

    from AACScoreLib.evaluation.metrics import dice_per_label
    from AACScoreLib.phantoms.generator import generate_phantom, read_back

    phantom = generate_phantom(9001, "default", 0, size_range=(1000, 1100))
    radiograph, truth = read_back(phantom), phantom.labels
    rows, cols = np.nonzero(np.isin(truth, range(1, 6)))
    margin = int(5 / phantom.truth["spacing"][0])  # 5 mm around L1..L5
    box = (slice(max(rows.min() - margin, 0), rows.max() + margin),
           slice(max(cols.min() - margin, 0), cols.max() + margin))
    lumbar = replace(radiograph, pixels=np.ascontiguousarray(radiograph.pixels[box]))
    truth = truth[box]
    segmenter = Segmenter.from_package(None, device="cpu")
    known = segmenter.segment(lumbar)
    assert not known.spacing_assumed and "spacing" not in known.message

    result = segmenter.segment(replace(lumbar, spacing=None, spacing_source="unknown"))
    assumed_mm = segmenter.default_long_side * segmenter.working_spacing / max(truth.shape)
    assert assumed_mm > 1.5 * phantom.truth["spacing"][0]  # the long-side guess alone is far off
    assert result.spacing_assumed and "from the size of the vertebral bodies" in result.message, result.message
    estimated = float(result.message.split("took ")[1].split(" mm per pixel")[0])
    assert estimated == pytest.approx(phantom.truth["spacing"][0], rel=0.15)
    assert min(dice_per_label(truth, result.labels).values()) > 0.85  # every level right
    # QC's second look is taken on the grid the segmentation used; on the assumed one it would see other levels
    unknown = replace(lumbar, spacing=None, spacing_source="unknown")
    assert min(flip_dice(segmenter, unknown, result.labels, result.working_shape).values()) >= MIN_FLIP_DICE
    assert min(flip_dice(segmenter, unknown, result.labels).values()) < MIN_FLIP_DICE

    wrong = segmenter.segment(replace(lumbar, spacing=tuple(2 * value for value in lumbar.spacing)))
    assert not wrong.spacing_assumed and "disagrees with the size of the vertebral bodies" in wrong.message
    segmented_at = float(wrong.message.split("segmented at ")[1].split(" mm per pixel")[0])
    assert segmented_at == pytest.approx(phantom.truth["spacing"][0], rel=0.15)
    assert min(dice_per_label(truth, wrong.labels).values()) > 0.85


def test_a_view_far_wider_than_assumed_is_found_by_looking_wider(monkeypatch):
    """A lumbar view padded to 2.5 times its size (a long full-spine view, or an export padded) without
    spacing: at the assumed field of view the bodies are too small for the network to find any, so there is
    nothing to measure; looking at a view twice as wide finds them, and their size then sets the scale."""
    from dataclasses import replace

    from AACScoreLib.evaluation.metrics import dice_per_label
    from AACScoreLib.evaluation.segmentation_benchmark import widen_view
    from AACScoreLib.phantoms.generator import generate_phantom, read_back
    from AACScoreLib.segmentation import segmenter as segmenter_module

    phantom = generate_phantom(9001, "default", 1, size_range=(1000, 1100))
    wide, truth = widen_view(read_back(phantom), phantom.labels, 2.5)
    wide = replace(wide, spacing=None, spacing_source="unknown")
    segmenter = Segmenter.from_package(None, device="cpu")

    result = segmenter.segment(wide)
    assert "from the size of the vertebral bodies" in result.message, result.message
    estimated = float(result.message.split("pixel spacing unknown: took ")[1].split(" mm per pixel")[0])
    assert estimated == pytest.approx(phantom.truth["spacing"][0], rel=0.15)
    assert min(dice_per_label(truth, result.labels).values()) > 0.85

    monkeypatch.setattr(segmenter_module, "WIDER_VIEW", 1.0)
    alone = segmenter.segment(wide)  # the assumed field of view alone
    assert alone.status == "error" and "the long side taken as" in alone.message


def _turn_tag(tag: tuple[str, str], turns: int) -> tuple[str, str]:
    """PatientOrientation of an image turned by numpy.rot90(k=turns): each turn, the new columns run as the old
    rows did and the new rows against the old columns."""
    opposite = {"A": "P", "P": "A", "F": "H", "H": "F", "L": "R", "R": "L"}
    for _ in range(turns % 4):
        tag = (tag[1], opposite[tag[0]])
    return tag


@pytest.mark.parametrize("turns", [1, 2, 3])
def test_a_radiograph_stored_on_its_side_is_segmented_upright(turns):
    """The demo segmenter was trained upright. PatientOrientation says where the feet are, and the image is turned
    upright for it; the labels come back on the image as stored, and the result is one to look at."""
    from dataclasses import replace

    from AACScoreLib.evaluation.metrics import dice_per_label
    from AACScoreLib.phantoms.generator import generate_phantom, read_back

    phantom = generate_phantom(9001, "default", 0, size_range=(1000, 1100))
    radiograph = read_back(phantom)
    assert radiograph.patient_orientation == ("A", "F")
    stored = replace(radiograph, pixels=np.ascontiguousarray(np.rot90(radiograph.pixels, turns)),
                     spacing=radiograph.spacing[::-1] if turns % 2 else radiograph.spacing,
                     patient_orientation=_turn_tag(("A", "F"), turns))
    truth = np.rot90(phantom.labels, turns)
    segmenter = Segmenter.from_package(None, device="cpu")
    result = segmenter.segment(stored)
    turned_back = {1: "90 degrees clockwise", 2: "180 degrees", 3: "90 degrees anticlockwise"}[turns]
    assert result.labels.shape == truth.shape and f"turned {turned_back} for the network" in result.message
    assert "PatientOrientation" in result.message
    assert result.status == "warning"
    assert min(dice_per_label(truth, result.labels).values()) > 0.85
    assert _turn_tag(("A", "F"), 4) == ("A", "F") and _turn_tag(("A", "F"), 2) == ("P", "H")
    # QC's second look turns the image upright too
    assert min(flip_dice(segmenter, stored, result.labels, result.working_shape).values()) >= MIN_FLIP_DICE


def test_a_bone_dark_radiograph_is_segmented_inverted_and_said_so():
    """Tags can be wrong: an image whose vertebrae come out darker than their surroundings is segmented again
    inverted, as the network was trained, and never plainly ok."""
    from dataclasses import replace

    from AACScoreLib.evaluation.metrics import dice_per_label
    from AACScoreLib.geometry.polarity import bone_contrast, inverted
    from AACScoreLib.phantoms.generator import generate_phantom, read_back

    phantom = generate_phantom(9001, "default", 1, size_range=(1000, 1100))
    radiograph = read_back(phantom)
    dark = replace(radiograph, pixels=inverted(radiograph.pixels))
    assert bone_contrast(radiograph.pixels, phantom.labels) > 0.05 > -0.05 > bone_contrast(dark.pixels, phantom.labels)
    segmenter = Segmenter.from_package(None, device="cpu")
    as_drawn, result = segmenter.segment(radiograph), segmenter.segment(dark)
    assert "bone dark" not in as_drawn.message
    assert as_drawn.bone_contrast > 0.05 and result.bone_contrast < -0.05  # what the pipeline follows
    assert result.message.startswith("bone dark as stored (bone contrast -0.") and result.status == "warning"
    assert min(dice_per_label(phantom.labels, result.labels).values()) > 0.85
    np.testing.assert_array_equal(result.labels, as_drawn.labels)  # the same pixels went into the network


def test_segment_command_writes_label_pngs_for_files_and_folders(trained, tmp_path):
    images = write_toys(tmp_path / "in", 2, first_seed=20)
    more = write_toys(tmp_path / "more", 1, first_seed=22)
    paths = [str(images / "toy_020.png"), str(images / "toy_021.png"), str(more)]
    code = cli_main(["segment", *paths, "--out", str(tmp_path / "out"), "--model", str(trained["package"]),
                     "--device", "cpu"])
    assert code in (0, 1)  # 1 only when a toy vertebra is missing from an untrained model's output
    for name in ("toy_020_labels.png", "toy_021_labels.png", "toy_022_labels.png"):
        written = np.asarray(Image.open(tmp_path / "out" / name))
        assert written.shape == TOY_SHAPE and written.max() <= 5
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_tampered_weights_are_refused(trained, tmp_path):
    copy = tmp_path / "tampered"
    shutil.copytree(trained["package"], copy)
    weights = copy / "fold_all.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelPackageError, match="checksum"):
        Segmenter.from_package(copy, device="cpu")


def test_nnunet_export_zip_converts_to_the_same_network(trained, tmp_path):
    results = trained["results"]
    archive = tmp_path / "exported.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for file in results.rglob("*"):
            if file.is_file() and file.suffix in (".json", ".pth"):
                zf.write(file, file.relative_to(results.parents[1]))
    converted = convert_nnunet_results(archive, tmp_path / "converted", name="from-zip", fp16=False)
    package = verify_package(converted)
    assert package.manifest["architecture"]["weights_dtype"] == "float32"
    assert package.manifest["input"]["working_spacing_mm"] is None  # trained on PNGs: no millimetres known
    a = Segmenter.from_package(trained["package"], device="cpu")
    b = Segmenter.from_package(converted, device="cpu")
    for key, value in a.predictor.list_of_parameters[0].items():
        assert np.allclose(value.numpy(), b.predictor.list_of_parameters[0][key].numpy(), atol=1e-2)


def test_blend_writes_the_weighted_mean_of_two_trainings_and_names_both(trained, tmp_path):
    from safetensors.torch import save

    from AACScoreLib.packages import load_safetensors, write_package
    from AACScoreLib.segmentation.blend import blend_segmenters
    from AACScoreLib.segmentation.package import load_segmenter_package

    base = verify_package(trained["package"])
    weights = load_safetensors(base, "fold_all.safetensors")
    moved = {key: value + 1.0 if value.is_floating_point() else value for key, value in weights.items()}
    further = {name: trained["package"] / name for name in base.files if name != "fold_all.safetensors"}
    tuned = write_package(tmp_path / "tuned", {**base.manifest, "version": "2.0"},
                          {**further, "fold_all.safetensors": save(moved)}).path
    assert cli_main(["blend-segmenters", str(base.path), str(tuned), "--weight", "0.25",
                     "--out", str(tmp_path / "blend")]) == 0
    blended = load_segmenter_package(tmp_path / "blend")
    manifest = blended.package.manifest
    assert manifest["version"] == "2.0+blend25" and manifest["metrics"] == {}
    record = manifest["training_data"]["blended"]
    assert record["weight_of_tuned"] == 0.25 and record["base"]["version"] == base.manifest["version"]
    assert record["tuned"]["version"] == "2.0"
    stored = load_safetensors(blended.package, "fold_all.safetensors")
    for key, value in weights.items():
        if value.is_floating_point():
            assert np.allclose(stored[key].float().numpy(), value.float().numpy() + 0.25, atol=2e-2)
    labels = Segmenter.from_package(tmp_path / "blend", device="cpu").segment(
        read_radiograph(write_toys(tmp_path / "toys", 1) / "toy_000.png")).labels
    assert labels.shape == TOY_SHAPE
    with pytest.raises(ModelPackageError, match="network differs"):  # the demo segmenter: another network
        blend_segmenters(base.path, "aacscore-demo-segmenter", 0.5, tmp_path / "other")
    with pytest.raises(ModelPackageError, match=r"weight must lie in \[0, 1\]"):
        blend_segmenters(base.path, tuned, 1.5, tmp_path / "bad")
    assert not (tmp_path / "other").exists() and not (tmp_path / "bad").exists()


def test_checkpoint_with_code_is_refused(tmp_path):
    import torch

    from AACScoreLib.segmentation.package import read_checkpoint

    class Sneaky:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": {}, "extra": Sneaky()}, path)
    with pytest.raises(ModelPackageError, match="cannot be read"):
        read_checkpoint(path)


def test_training_on_the_held_out_phantom_family_is_refused_unless_asked(tmp_path, capsys):
    code = cli_main(["train-segmenter", "--phantoms", "2", "--phantom-families", "default,varied",
                     "--out", str(tmp_path / "package")])
    assert code == 2 and "varied is held out of all training" in capsys.readouterr().err
    assert not (tmp_path / "package").exists()
    code = cli_main(["train-segmenter", "--phantoms", "2", "--metal-chance", "0.5",
                     "--out", str(tmp_path / "package")])
    assert code == 2 and "give --randomise-copies K too" in capsys.readouterr().err  # else it would do nothing
    assert not (tmp_path / "package").exists()

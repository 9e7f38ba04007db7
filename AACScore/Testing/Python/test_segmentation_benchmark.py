"""The generalisation benchmark: sacrum-cropped images, per-set figures, and one real run of the demo segmenter."""

from __future__ import annotations

import json

import numpy as np
import pytest

from AACScoreLib.cli import main as cli_main
from AACScoreLib.evaluation.segmentation_benchmark import crop_below_l5, summarise, widen_view
from AACScoreLib.io.radiograph import Radiograph


def _spine(rows_down: bool = True) -> tuple[Radiograph, np.ndarray]:
    labels = np.zeros((200, 60), np.uint8)
    for value, top in zip((6, 1, 2, 3, 4, 5, 7), range(5, 200, 27)):
        labels[top:top + 20, 20:40] = value
    labels = labels if rows_down else labels[::-1]
    radiograph = Radiograph(labels.astype(np.float32) * 10, (0.5, 0.5), "test", "spine.png", "PNG")
    return radiograph, labels


@pytest.mark.parametrize("rows_down", [True, False])
def test_sacrum_crop_ends_just_below_l5(rows_down):
    radiograph, labels = _spine(rows_down)
    cropped, kept = crop_below_l5(radiograph, labels, margin_mm=2.0)
    assert cropped.pixels.shape == kept.shape and kept.shape[1] == 60
    assert 7 not in kept and (kept == 5).sum() == (labels == 5).sum() and (kept == 6).sum() == (labels == 6).sum()
    l5_rows = np.flatnonzero((kept == 5).any(axis=1))
    edge = l5_rows.max() if rows_down else l5_rows.min()
    assert (kept.shape[0] - 1 - edge if rows_down else edge) == 4  # 2 mm at 0.5 mm per pixel
    assert cropped.spacing == radiograph.spacing and "sacrum cropped" in cropped.path


def test_a_widened_view_keeps_the_spine_and_its_labels_in_the_middle():
    radiograph, labels = _spine()
    wide, wide_labels = widen_view(radiograph, labels, 2.0)
    assert wide.pixels.shape == wide_labels.shape == (400, 120) and wide.spacing == radiograph.spacing
    assert np.array_equal(wide_labels[100:300, 30:90], labels) and not wide_labels[:100].any()
    assert np.array_equal(wide.pixels[100:300, 30:90], radiograph.pixels)
    assert wide.pixels[0, 0] == np.percentile(radiograph.pixels, 5) and "view widened 2x" in wide.path


def test_summary_counts_levels_errors_and_wrong_but_ok():
    def case(status, dice, method="T12+S1"):
        return {"status": status, "dice": dice, "all_right": status != "error" and min(dice) >= 0.5,
                "levels": {"method": method}, "seconds": 0.5}

    figures = summarise([case("ok", [0.9] * 5), case("ok", [0.0] * 5, "L1+L5"), case("warning", [0.9] * 5),
                         case("error", [0.0] * 5)])
    assert figures["n"] == 4 and figures["all_levels_right"] == 0.5
    assert figures["error_rows"] == 0.25 and figures["wrong_but_ok"] == 0.25 and figures["warning_rows"] == 0.25
    assert figures["dice_mean"]["L3"] == pytest.approx(0.45)
    assert figures["levels_methods"] == {"L1+L5": 1, "T12+S1": 3} and figures["seconds_per_image"] == 0.5


def test_benchmark_command_writes_json_and_table(tmp_path):
    code = cli_main(["segment-benchmark", "--families", "default", "--n", "1", "--device", "cpu",
                     "--out", str(tmp_path)])
    assert code == 0
    figures = json.loads((tmp_path / "segment_benchmark.json").read_text())
    entry = figures["families"]["default"]
    assert set(entry) >= {"full", "sacrum cropped"} and entry["seen_in_training"]
    assert entry["full"]["n"] == 1 and entry["full"]["all_levels_right"] == 1.0  # the demo segmenter's own family
    assert [case["set"] for case in figures["cases"]] == ["full", "sacrum cropped"]
    table = (tmp_path / "segment_benchmark.md").read_text()
    assert "| default | full | 1 | 100% |" in table and "sacrum cropped" in table


def test_benchmark_without_spacing_withholds_it_from_the_segmenter(tmp_path):
    code = cli_main(["segment-benchmark", "--families", "default", "--n", "1", "--no-sacrum-cropped",
                     "--spacing", "unknown", "--device", "cpu", "--out", str(tmp_path)])
    assert code == 0
    figures = json.loads((tmp_path / "segment_benchmark.json").read_text())
    assert figures["spacing"] == "unknown" and "pixel spacing unknown: took" in figures["cases"][0]["message"]
    assert "pixel spacing withheld" in (tmp_path / "segment_benchmark.md").read_text()
    assert cli_main(["segment-benchmark", "--families", "default", "--n", "1", "--widen", "9", "--device", "cpu",
                     "--out", str(tmp_path)]) == 2


def test_benchmark_stores_images_turned_without_their_tag_for_the_upright_check(tmp_path):
    code = cli_main(["segment-benchmark", "--families", "default", "--n", "1", "--no-sacrum-cropped", "--turn", "2",
                     "--device", "cpu", "--out", str(tmp_path / "on")])
    assert code == 0
    figures = json.loads((tmp_path / "on" / "segment_benchmark.json").read_text())
    assert figures["stored_turns"] == 2 and "aacscore-upright" in figures["upright_check"]
    assert figures["cases"][0]["turns"] == 2 and figures["cases"][0]["all_right"]
    assert figures["families"]["default"]["full"]["segmented_upright"] == 1.0
    table = (tmp_path / "on" / "segment_benchmark.md").read_text()
    assert "without PatientOrientation" in table and "segmented upright |" in table
    code = cli_main(["segment-benchmark", "--families", "default", "--n", "1", "--no-sacrum-cropped", "--turn", "2",
                     "--no-upright-check", "--device", "cpu", "--out", str(tmp_path / "off")])
    figures = json.loads((tmp_path / "off" / "segment_benchmark.json").read_text())
    assert code == 0 and figures["upright_check"] is None
    assert figures["families"]["default"]["full"]["segmented_upright"] == 0.0


def test_benchmark_of_image_folders(tmp_path):
    from AACScoreLib.phantoms.generator import write_phantoms

    write_phantoms(tmp_path / "site", 1, 9301, style="default")
    code = cli_main(["segment-benchmark", "--cases", str(tmp_path / "site"), "--device", "cpu",
                     "--out", str(tmp_path / "out")])
    assert code == 0
    figures = json.loads((tmp_path / "out" / "segment_benchmark.json").read_text())
    entry = figures["families"]["site"]
    assert entry["from_files"] and entry["full"]["n"] == 1 and entry["full"]["all_levels_right"] == 1.0
    assert entry["sacrum cropped"]["n"] == 1 and figures["folders"] == [str(tmp_path / "site")]
    table = (tmp_path / "out" / "segment_benchmark.md").read_text()
    assert f"images and label maps from {tmp_path / 'site'}" in table and "| site | full | 1 | 100% |" in table
    (tmp_path / "empty").mkdir()
    assert cli_main(["segment-benchmark", "--cases", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert cli_main(["segment-benchmark", "--cases", str(tmp_path / "site"), "--families", "default",
                     "--out", str(tmp_path / "o")]) == 2

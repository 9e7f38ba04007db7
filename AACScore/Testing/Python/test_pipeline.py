"""The one pipeline and the batch runner: results, error rows, resume, shards, outputs written whole."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.draw import polygon as fill_polygon

from AACScoreLib.batch import merge_shards, score_cohort
from AACScoreLib.io.cohort import WorkItem, collect, output_names
from AACScoreLib.kauppila import SUBSCORE_COLUMNS
from AACScoreLib.phantoms.generator import write_phantoms
from AACScoreLib.pipeline import Pipeline


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> list[Path]:
    return write_phantoms(tmp_path_factory.mktemp("phantoms"), 3, seed=77, size_range=(500, 600))


def _labels_of(image: Path) -> Path:
    return image.with_name(image.stem + "_labels.png")


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def test_pipeline_scores_a_radiograph_from_a_user_label_map(tiny_scorer, phantoms):
    result = Pipeline(tiny_scorer).run(phantoms[0], _labels_of(phantoms[0]))
    assert result.status in ("ok", "warning"), result.message
    assert 0.0 <= result.aac24 <= 24.0 and result.category in ("no/mild", "moderate", "severe")
    assert set(result.subscores) == set(SUBSCORE_COLUMNS)
    assert result.labels_source == "user"
    assert result.heatmap.shape == result.radiograph.pixels.shape
    assert result.heatmap_all_zero == (not result.heatmap.any())
    assert set(result.seconds) == {"read", "segment", "crop", "score", "heatmap", "qc"}
    record = result.record()
    assert record["file"] == str(phantoms[0]) and record["status"] == result.status


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda labels: np.where(labels == 3, 0, labels), "L3 is missing"),
        (lambda labels: labels[:-7], "label map is"),
        (lambda labels: np.zeros_like(labels), "missing|empty"),
    ],
)
def test_pipeline_reports_bad_label_maps_as_error_results(tiny_scorer, phantoms, damage, problem):
    labels = np.asarray(Image.open(_labels_of(phantoms[0])))
    result = Pipeline(tiny_scorer).run(phantoms[0], damage(labels))
    assert result.status == "error"
    assert re.search(problem, result.message), result.message


def test_a_body_whose_sides_cannot_be_fitted_is_scored_from_its_box_and_flagged(tiny_scorer, phantoms):
    labels = np.asarray(Image.open(_labels_of(phantoms[0])))
    rows, cols = np.nonzero(labels == 3)
    ragged = np.where(labels == 3, 0, labels)  # L3 redrawn as a triangle: no superior endplate to fit
    rr, cc = fill_polygon([rows.min(), rows.max(), rows.max()], [cols.mean(), cols.max(), cols.min()], labels.shape)
    ragged[rr, cc] = 3
    result = Pipeline(tiny_scorer).run(phantoms[0], ragged)
    assert result.qc == "review" and result.status == "warning" and 0.0 <= result.aac24 <= 24.0
    boxed = [reason for reason in result.qc_reasons if reason.code == "body_boxed"]
    assert len(boxed) == 1 and "L3" in boxed[0].text, result.qc_reasons
    assert "body_boxed:" in result.record()["qc_reasons"]


def test_pipeline_without_segmenter_or_labels_says_so(tiny_scorer, phantoms):
    result = Pipeline(tiny_scorer).run(phantoms[0])
    assert result.status == "error" and "no label map given and no segmenter loaded" in result.message


def _broken_inputs(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    empty = folder / "empty.dcm"
    empty.write_bytes(b"")
    text = folder / "notes.dcm"
    text.write_text("this is not an image")
    colour = folder / "colour.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(colour)
    return [empty, text, colour, folder / "missing.dcm"]


def test_batch_writes_rows_outputs_and_error_rows_and_resumes(tiny_scorer, phantoms, tmp_path):
    broken = _broken_inputs(tmp_path / "broken")
    truncated = tmp_path / "broken" / "truncated.dcm"
    truncated.write_bytes(phantoms[1].read_bytes()[:5000])
    items = [WorkItem(p, _labels_of(p)) for p in phantoms] + [WorkItem(p) for p in broken + [truncated]]
    out = tmp_path / "out"
    pipeline = Pipeline(tiny_scorer)
    table = score_cohort(pipeline, items, out)
    rows = {Path(row["file"]).name: row for row in _rows(table)}
    assert len(rows) == len(items)
    for phantom in phantoms:
        row = rows[phantom.name]
        assert row["status"] in ("ok", "warning") and float(row["aac24"]) >= 0
        assert Path(row["labels"]).is_file() and "labels" in Path(row["labels"]).name
        assert Path(row["heatmap"]).is_file()
        assert all(row[column] != "" for column in SUBSCORE_COLUMNS)
    for path in broken + [truncated]:
        row = rows[path.name]
        assert row["status"] == "error" and path.name in row["message"], row
        assert "Traceback" not in row["message"]
    locks = (".results.lock", ".run.lock")
    assert not [p for p in out.rglob(".*") if p.is_file() and p.name not in locks], "temporary files left"

    calls = []
    original = pipeline.run
    pipeline.run = lambda *args, **kwargs: calls.append(args) or original(*args, **kwargs)
    score_cohort(pipeline, items, out)
    assert calls == [], "a rerun must not score again what is already in results.csv"
    broken[0].write_bytes(phantoms[2].read_bytes())  # the user replaces the empty file with a good one
    score_cohort(pipeline, items, out, retry_errors=True)
    assert len(calls) == 1, "only error rows are retried, and of those only the now readable file is scored"
    rows = {Path(row["file"]).name: row for row in _rows(table)}
    assert "no label map given and no segmenter loaded" in rows[broken[0].name]["message"]
    assert {row["models"] for row in rows.values()} == {pipeline.models}

    calls.clear()
    manifest_before = tiny_scorer.manifest
    tiny_scorer.manifest = {**manifest_before, "version": "retrained"}  # another model: every row is made again
    try:
        score_cohort(pipeline, items, out)
        assert len(calls) == len(phantoms) + 1  # the readable images (the others are error rows again)
        assert {row["models"] for row in _rows(table)} == {pipeline.models}
    finally:
        tiny_scorer.manifest = manifest_before


def test_an_interrupted_batch_keeps_its_rows_and_resumes(tiny_scorer, phantoms, tmp_path):
    items = [WorkItem(p, _labels_of(p)) for p in phantoms]
    pipeline = Pipeline(tiny_scorer)
    original = pipeline.run
    count = {"n": 0}

    def interrupt_on_second(*args, **kwargs):
        count["n"] += 1
        if count["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    pipeline.run = interrupt_on_second
    with pytest.raises(KeyboardInterrupt):
        score_cohort(pipeline, items, tmp_path)
    assert [Path(r["file"]).name for r in _rows(tmp_path / "results.csv")] == [phantoms[0].name]
    pipeline.run = original
    score_cohort(pipeline, items, tmp_path)
    assert sorted(Path(r["file"]).name for r in _rows(tmp_path / "results.csv")) == sorted(p.name for p in phantoms)


def test_shards_write_their_own_tables_and_merge(tiny_scorer, phantoms, tmp_path):
    listing = tmp_path / "cohort.csv"
    listing.write_text("file,labels\n" + "".join(f"{p},{_labels_of(p)}\n" for p in phantoms))
    pipeline = Pipeline(tiny_scorer)
    everything = collect([listing])
    names = output_names(everything)
    for index in range(2):
        score_cohort(pipeline, collect([listing], (index, 2)), tmp_path / "out", names=names, shard=(index, 2),
                     heatmaps=False)
    assert len(list((tmp_path / "out" / "shards").glob("results-*.csv"))) == 2
    merged = merge_shards(tmp_path / "out")
    assert sorted(Path(r["file"]).name for r in _rows(merged)) == sorted(p.name for p in phantoms)


def test_output_names_stay_unique_for_equal_stems(tmp_path):
    items = [WorkItem(tmp_path / "a" / "x.dcm"), WorkItem(tmp_path / "b" / "x.dcm"), WorkItem(tmp_path / "y.dcm")]
    names = output_names(items)
    assert len(set(names.values())) == 3 and names[tmp_path / "y.dcm"] == "y"


@pytest.fixture(scope="module")
def demo_pipeline():
    """The bundled demo models, loaded as `aacscore score` loads them."""
    return Pipeline.from_packages(device="cpu")


def test_every_file_of_pydicoms_corpus_ends_as_a_row_without_traceback(demo_pipeline, tmp_path):
    import pydicom

    corpus = Path(pydicom.__file__).parent / "data" / "test_files"
    items = collect([corpus])
    assert len(items) > 150
    table = score_cohort(demo_pipeline, items, tmp_path, heatmaps=False)
    rows = _rows(table)
    assert len(rows) == len(items)
    for row in rows:
        assert row["status"] in ("ok", "warning", "error")
        if row["status"] == "error":
            assert row["message"] and "Traceback" not in row["message"]
            assert "internal error" not in row["message"], row


def test_benchmark_times_every_stage_and_the_batch(demo_pipeline, tmp_path):
    from AACScoreLib.evaluation.bench import STAGES, run_benchmark
    from AACScoreLib.slicer.sample_data import SAMPLE_DATA_DIR

    images = sorted(SAMPLE_DATA_DIR.glob("*.dcm"))[:2]
    figures = run_benchmark(demo_pipeline, images, single_runs=1, batch_out=tmp_path)
    assert set(figures["stages_s_per_image"]) == set(STAGES)
    assert all(seconds > 0 for seconds in figures["stages_s_per_image"].values())
    assert figures["batch_images"] == 2 and figures["images_per_hour"] > 0 and figures["peak_rss_mb"] > 0
    assert figures["single_images_timed"] == 1  # the second image's single time is estimated from the first
    assert figures["batch_vs_sum_of_single"] == pytest.approx(figures["batch_s"] / figures["single_sum_s"], rel=0.02)


def test_the_demo_command_scores_every_bundled_radiograph(tmp_path, capsys):
    from AACScoreLib import cli

    assert cli.main(["demo", "--out", str(tmp_path), "--device", "cpu"]) == 0
    rows = _rows(tmp_path / "results.csv")
    assert len(rows) == 3 and all(row["status"] in ("ok", "warning") for row in rows), rows
    printed = capsys.readouterr().out
    assert "not for clinical use" in printed and all(Path(row["file"]).name in printed for row in rows)


def test_a_level_shifted_label_map_gets_review_and_the_true_one_does_not(demo_pipeline, phantoms):
    """The segmenter's second look (QC) sees that the user's map calls every body one level off."""
    import json

    from AACScoreLib.evaluation.stress import shifted_labels
    from AACScoreLib.io.labelmaps import read_label_map

    truth = json.loads(phantoms[0].with_name(phantoms[0].stem + "_truth.json").read_text())
    labels = read_label_map(_labels_of(phantoms[0]))
    honest = demo_pipeline.run(phantoms[0], labels, heatmap=False)
    assert "levels_differ_from_segmenter" not in [r.code for r in honest.qc_reasons], honest.qc_reasons
    for direction in ("up", "down"):
        result = demo_pipeline.run(phantoms[0], shifted_labels(labels, truth, direction), heatmap=False)
        assert result.qc == "review" and result.status == "warning", (direction, result.qc_reasons)
        assert "levels_differ_from_segmenter" in [r.code for r in result.qc_reasons]
        row = result.record()
        assert row["qc"] == "review" and "levels_differ_from_segmenter:" in row["qc_reasons"]
        _assert_interval_of_its_group(demo_pipeline, result)
    _assert_interval_of_its_group(demo_pipeline, honest)


def _assert_interval_of_its_group(pipeline, result) -> None:
    """The demo scorer's qc.json has wider quantiles for flagged results, widest for those flagged by two or more
    kinds of check: each result gets its group's width."""
    from AACScoreLib.qc.verdict import flag_kinds

    calibration = pipeline.quality.interval
    assert calibration.quantile < calibration.review_quantile < calibration.many_flags_quantile
    kinds = flag_kinds(result.qc_reasons)  # score_uncertain, which follows from the others, is not a kind
    half = [calibration.quantile, calibration.review_quantile, calibration.many_flags_quantile][min(kinds, 2)]
    assert (result.aac24_low, result.aac24_high) == pytest.approx((max(0.0, result.aac24 - half),
                                                                   min(24.0, result.aac24 + half)))


def test_results_say_how_the_levels_were_counted(demo_pipeline, phantoms):
    """The demo segmenter has context classes: it counts down from T12 and up from S1, which agree on a phantom."""
    result = demo_pipeline.run(phantoms[1], heatmap=False)
    assert result.levels is not None and result.levels.from_above == "T12" and result.levels.from_below == "S1"
    assert result.record()["levels"] == result.levels.summary() == "T12/S1 agree"
    assert result.context is not None and {6, 7} <= set(np.unique(result.context))
    assert result.status == "ok", result.message
    user = demo_pipeline.run(phantoms[1], _labels_of(phantoms[1]), heatmap=False)
    assert user.levels is None and user.record()["levels"] == "user"


def test_qc_calibration_end_to_end_scores_from_the_segmenter_and_leaves_out_what_it_cannot_score(demo_pipeline,
                                                                                                   tmp_path):
    from AACScoreLib.qc.calibrate import measure
    from AACScoreLib.scoring.data import ScoreRecord, read_score_csv

    write_phantoms(tmp_path, 2, seed=8410, style="alt")
    records = read_score_csv(tmp_path / "truth.csv")
    Image.fromarray(np.full((600, 500), 1000, np.uint16)).save(tmp_path / "blank.png")
    records.append(ScoreRecord(tmp_path / "blank.png", records[0].labels, 3.0))
    measured = measure(demo_pipeline, records, end_to_end=True, groups=[0, 1, 2])
    from_labels = measure(demo_pipeline, records[:2])
    assert int(measured["not_scored"]) == 1 and len(measured["score"]) == 2
    assert list(measured["group"]) == [0, 1] and len(measured["variant_spread"]) == 2  # the blank's set left out
    assert measured["features"].shape[0] == 2 and list(measured["truth"]) == list(from_labels["truth"])
    assert not np.array_equal(measured["score"], from_labels["score"])  # the segmenter's crop is not the drawn one

"""The probe of bad inputs, interruptions and reruns (issue 16), replayed: nothing silently wrong, nothing lost,
no tracebacks. Each test names the item of the issue it covers."""

from __future__ import annotations

import csv
import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from AACScoreLib import cli
from AACScoreLib.batch import _ProgressBar, merge_shards, run_lock, score_cohort
from AACScoreLib.errors import AACScoreError, ModelPackageError, OutputBusy, OutputError
from AACScoreLib.evaluation import metrics
from AACScoreLib.evaluation.evaluate import evaluate, format_report, read_scores_csv
from AACScoreLib.geometry.orientation import check_numbering
from AACScoreLib.io import atomic
from AACScoreLib.io.cohort import WorkItem, collect, unique_output_names
from AACScoreLib.io.labelmaps import read_label_map
from AACScoreLib.io.radiograph import read_radiograph
from AACScoreLib.io.results_file import ResultsFile
from AACScoreLib.kauppila import SUBSCORE_COLUMNS
from AACScoreLib.packages import MANIFEST_SEAL, find_package, install_package, write_package
from AACScoreLib.phantoms.generator import write_phantoms
from AACScoreLib.pipeline import Pipeline
from AACScoreLib.scoring.scorer import Scorer

AACSCORE = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> list[Path]:
    return write_phantoms(tmp_path_factory.mktemp("phantoms"), 3, seed=77, size_range=(500, 600))


@pytest.fixture(scope="module")
def scorer_package(tmp_path_factory) -> Path:
    """A real, tiny scorer package on disk (for the command line and for tampering with copies of it)."""
    import torch

    from AACScoreLib.scoring.model import build_model
    from AACScoreLib.scoring.training import TrainResult, TrainSettings, build_manifest, write_scorer_package

    settings = TrainSettings(input_size=(64, 32), backbone="resnet18", subscores_head=True)
    torch.manual_seed(1)
    model = build_model(settings.architecture()).eval()
    manifest = build_manifest(model, settings, TrainResult(0, 0, 0, None, 0.0, "cpu"), {"source": "none"}, {},
                              "probe-scorer", "1.0.0")
    return write_scorer_package(tmp_path_factory.mktemp("models") / "probe-scorer", model, manifest).path


def _labels_of(image: Path) -> Path:
    return image.with_name(image.stem + "_labels.png")


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def _listing(path: Path, images, encoding="utf-8") -> Path:
    path.write_text("file,labels\n" + "".join(f"{p},{_labels_of(p)}\n" for p in images), encoding=encoding)
    return path


def _score_cli(paths, out: Path, scorer: Path, *extra) -> int:
    try:
        return cli.main(["score", *map(str, paths), "--out", str(out), "--scorer", str(scorer), "--no-heatmap",
                         *extra])
    finally:
        import logging

        logging.captureWarnings(False)  # the command routes warnings to its log; give pytest them back


# ------------------------------------------------------------------ 1: reruns with another shard count


def test_1_a_rerun_with_another_shard_count_is_not_overruled_by_stale_shard_tables(tiny_scorer, phantoms, tmp_path):
    pipeline, out = Pipeline(tiny_scorer), tmp_path / "out"
    broken = WorkItem(phantoms[0], tmp_path / "missing_labels.png")  # an error row at first
    items = [broken] + [WorkItem(p, _labels_of(p)) for p in phantoms[1:]]
    names = unique_output_names(items)
    for index in range(3):
        score_cohort(pipeline, items[index::3], out, names=names, shard=(index, 3), heatmaps=False)
    assert {r["status"] for r in _rows(out / "results.csv") if Path(r["file"]).name == phantoms[0].name} == {"error"}

    fixed = [WorkItem(phantoms[0], _labels_of(phantoms[0]))] + items[1:]  # the user fixes the labels path
    for index in range(2):
        score_cohort(pipeline, fixed[index::2], out, names=names, shard=(index, 2), heatmaps=False,
                     retry_errors=True)
    rows = _rows(out / "results.csv")
    assert len(rows) == len(phantoms)
    assert {r["status"] for r in rows} <= {"ok", "warning"}, [r["message"] for r in rows]
    assert sorted(p.name for p in (out / "shards").glob("results-*.csv")) == [
        "results-0000-of-0002.csv", "results-0001-of-0002.csv"]
    assert len(list((out / "shards" / "retired").glob("results-*-of-0003.csv"))) == 3
    assert merge_shards(out) == out / "results.csv" and len(_rows(out / "results.csv")) == len(phantoms)


# ------------------------------------------------------------------ 2: which end of the spine is up


def _with_orientation(source: Path, target: Path, orientation, flip: bool = False) -> Path:
    ds = pydicom.dcmread(source)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()
    if flip:
        ds.PixelData = np.ascontiguousarray(np.flipud(ds.pixel_array)).tobytes()
    if orientation is None:
        if "PatientOrientation" in ds:
            del ds.PatientOrientation
    else:
        ds.PatientOrientation = list(orientation)
    ds.save_as(target)
    return target


def _reversed_numbering(labels: np.ndarray) -> np.ndarray:
    return np.where(labels > 0, 6 - labels.astype(np.int16), 0).astype(np.uint8)


def _l1_row(result) -> float:
    return float(result.geometry.vertebrae[0].centroid[0])


def test_2_a_label_map_numbered_bottom_up_is_renumbered_by_patient_orientation(tiny_scorer, phantoms, tmp_path):
    image = _with_orientation(phantoms[0], tmp_path / "upright.dcm", ("A", "F"))
    labels = np.asarray(Image.open(_labels_of(phantoms[0])))
    pipeline = Pipeline(tiny_scorer)
    right = pipeline.run(image, labels, heatmap=False)
    assert right.status == "ok", right.message  # no false alarm on a correctly numbered map
    wrong = pipeline.run(image, _reversed_numbering(labels), heatmap=False)
    assert wrong.status == "warning" and "numbered bottom-up" in wrong.message
    assert _l1_row(wrong) == pytest.approx(_l1_row(right))
    assert wrong.subscores == pytest.approx(right.subscores, abs=1e-4)


def test_2_an_upside_down_image_is_scored_upright_and_flagged(tiny_scorer, phantoms, tmp_path):
    upright = _with_orientation(phantoms[1], tmp_path / "upright.dcm", ("A", "F"))
    upside_down = _with_orientation(phantoms[1], tmp_path / "upside_down.dcm", ("A", "H"), flip=True)
    labels = np.asarray(Image.open(_labels_of(phantoms[1])))
    # as a segmenter trained on upright images numbers them: L1 at the top of the picture
    top_down_in_picture = _reversed_numbering(np.flipud(labels))
    pipeline = Pipeline(tiny_scorer)
    reference = pipeline.run(upright, labels, heatmap=False)
    result = pipeline.run(upside_down, top_down_in_picture, heatmap=False)
    assert result.status == "warning" and "upside down" in result.message
    height = labels.shape[0]
    assert _l1_row(result) == pytest.approx(height - 1 - _l1_row(reference), abs=0.5)  # L1 is still L1


def test_2_without_tags_a_map_whose_bodies_shrink_downwards_is_flagged(phantoms):
    for phantom in phantoms:
        labels = np.asarray(Image.open(_labels_of(phantom)))
        assert check_numbering(labels, None) == (labels, [])
        _, notes = check_numbering(_reversed_numbering(labels), None)
        assert notes and "wrong end" in notes[0]


# ------------------------------------------------------------------ 3: same names in different folders


def test_3_same_file_names_in_two_folders_never_share_outputs_across_runs(tiny_scorer, phantoms, tmp_path):
    first, second = tmp_path / "a" / "x.dcm", tmp_path / "b" / "x.dcm"
    for target, source in ((first, phantoms[0]), (second, phantoms[1])):
        target.parent.mkdir()
        shutil.copy(source, target)
        shutil.copy(_labels_of(source), _labels_of(target))
    pipeline, out = Pipeline(tiny_scorer), tmp_path / "out"
    for image in (first, second):  # two separate runs, one input each
        score_cohort(pipeline, [WorkItem(image, _labels_of(image))], out)
    rows = _rows(out / "results.csv")
    assert len(rows) == 2
    assert len({r["labels"] for r in rows}) == 2 and len({r["heatmap"] for r in rows}) == 2
    assert all(Path(r["labels"]).is_file() and Path(r["heatmap"]).is_file() for r in rows)


# ------------------------------------------------------------------ 4: concurrent runs


def test_4_a_second_run_into_a_held_out_folder_is_refused(tiny_scorer, phantoms, tmp_path, scorer_package, capsys):
    items = [WorkItem(phantoms[0], _labels_of(phantoms[0]))]
    out = tmp_path / "out"
    with run_lock(out, None):
        with pytest.raises(OutputBusy, match="another aacscore run"):
            score_cohort(Pipeline(tiny_scorer), items, out, heatmaps=False)
        listing = _listing(tmp_path / "list.csv", phantoms[:1])
        assert _score_cli([listing], out, scorer_package) == 75
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("aacscore score: error: ") and "another aacscore run" in error
    with run_lock(out, (0, 2)):  # the shards of one job array run side by side
        score_cohort(Pipeline(tiny_scorer), items, out, shard=(1, 2), heatmaps=False)
        with pytest.raises(OutputBusy):
            score_cohort(Pipeline(tiny_scorer), items, out, heatmaps=False)
        with pytest.raises(OutputBusy, match="shard 0/2"):
            score_cohort(Pipeline(tiny_scorer), items, out, shard=(0, 2), heatmaps=False)


def test_4_a_killed_run_frees_its_lock(tiny_scorer, phantoms, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from AACScoreLib.batch import run_lock\n"
                               "with run_lock(Path(sys.argv[1]), None):\n    print('held', flush=True)\n"
                               "    time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(AACSCORE)})
    try:
        assert holder.stdout.readline().strip() == "held"
        items = [WorkItem(phantoms[0], _labels_of(phantoms[0]))]
        with pytest.raises(OutputBusy):
            score_cohort(Pipeline(tiny_scorer), items, out, heatmaps=False)
        holder.kill()  # SIGKILL: no cleanup code runs
        holder.wait(timeout=30)
        score_cohort(Pipeline(tiny_scorer), items, out, heatmaps=False)
        assert len(_rows(out / "results.csv")) == 1
    finally:
        holder.kill()
        holder.stdout.close()


# ------------------------------------------------------------------ 5: resume keyed by the real path


def test_5_resume_knows_an_input_by_its_real_path_and_a_moved_one_by_its_content(
        tiny_scorer, phantoms, tmp_path, monkeypatch):
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    for phantom in phantoms:
        shutil.copy(phantom, cohort / phantom.name)
    pipeline, out = Pipeline(tiny_scorer), tmp_path / "out"
    calls = []
    original = pipeline.run
    pipeline.run = lambda *args, **kwargs: calls.append(args) or original(*args, **kwargs)
    labels = {p.name: _labels_of(p) for p in phantoms}

    def items(paths):
        return [WorkItem(p, labels[Path(p).name]) for p in paths]

    monkeypatch.chdir(tmp_path)
    score_cohort(pipeline, items([Path("cohort") / p.name for p in phantoms]), out, heatmaps=False)
    assert len(calls) == len(phantoms)
    monkeypatch.chdir(cohort)
    score_cohort(pipeline, items([Path(p.name) for p in phantoms]), out, heatmaps=False)  # cd DIR && score .
    score_cohort(pipeline, items([cohort / p.name for p in phantoms]), out, heatmaps=False)  # absolute
    score_cohort(pipeline, items(item.image for item in collect(["."])), out, heatmaps=False)
    assert len(calls) == len(phantoms) and len(_rows(out / "results.csv")) == len(phantoms)

    moved = tmp_path / "archive"
    cohort.rename(moved)
    score_cohort(pipeline, items(sorted(moved.iterdir())), out, heatmaps=False)
    rows = _rows(out / "results.csv")
    assert len(calls) == len(phantoms), "a moved file is recognised by its content, not scored again"
    assert sorted(r["file"] for r in rows) == sorted(str(p.resolve()) for p in moved.iterdir())


# ------------------------------------------------------------------ 6: a model is known by its content


def test_6_another_scorer_with_the_same_name_and_version_scores_again(phantoms, tmp_path, scorer_package):
    other_package = tmp_path / "other"
    shutil.copytree(scorer_package, other_package)
    manifest = json.loads((other_package / "manifest.json").read_text())
    manifest["metrics"] = {"note": "retrained"}  # same name, version and weights file name; other contents
    files = {relpath: other_package / relpath for relpath in manifest["files"]}
    rewritten = write_package(tmp_path / "retrained", {k: v for k, v in manifest.items() if k != "files"}, files)
    first, second = Scorer.from_package(scorer_package), Scorer.from_package(rewritten.path)
    assert (first.manifest["name"], first.manifest["version"]) == (second.manifest["name"], second.manifest["version"])
    items = [WorkItem(phantoms[0], _labels_of(phantoms[0]))]
    out = tmp_path / "out"
    score_cohort(Pipeline(first), items, out, heatmaps=False)
    pipeline = Pipeline(second)
    calls = []
    original = pipeline.run
    pipeline.run = lambda *args, **kwargs: calls.append(args) or original(*args, **kwargs)
    score_cohort(pipeline, items, out, heatmaps=False)
    assert len(calls) == 1 and _rows(out / "results.csv")[0]["models"] == pipeline.models
    assert first.identity and first.identity[:12] in Pipeline(first).models and first.identity != second.identity


def test_6_trained_packages_get_a_fresh_version_by_default():
    import argparse

    from AACScoreLib.packages import timestamped_version
    from AACScoreLib.scoring import training

    parser = argparse.ArgumentParser()
    training.add_cli(parser.add_subparsers())
    assert parser.parse_args(["train-scorer", "--synthetic", "4", "--out", "x"]).version is None
    assert timestamped_version("1.0.0").startswith("1.0.0+") and timestamped_version("1.0.0") != "1.0.0"


# ------------------------------------------------------------------ 7: the manifest is covered too


def test_7_an_edited_manifest_is_refused_at_load(scorer_package, tmp_path):
    package = tmp_path / "tampered"
    shutil.copytree(scorer_package, package)
    assert (package / MANIFEST_SEAL).is_file()
    Scorer.from_package(package)  # intact: loads
    manifest = json.loads((package / "manifest.json").read_text())
    manifest["input"]["size"] = [32, 16]
    (package / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelPackageError, match="manifest.json was changed"):
        Scorer.from_package(package)


def test_7_an_impossible_input_size_is_refused_not_an_internal_error(scorer_package, tmp_path):
    package = tmp_path / "zero"
    shutil.copytree(scorer_package, package)
    manifest = json.loads((package / "manifest.json").read_text())
    manifest["input"]["size"] = [0, 0]
    (package / "manifest.json").write_text(json.dumps(manifest))
    (package / MANIFEST_SEAL).unlink()  # an unsealed package, as a third party might hand out
    with pytest.raises(ModelPackageError, match=r"input.size must be .*\[0, 0\]"):
        Scorer.from_package(package)


def test_7_scorer_weights_linked_from_outside_the_package_are_refused(scorer_package, tmp_path):
    package = tmp_path / "linked"
    shutil.copytree(scorer_package, package)
    weights = json.loads((package / "manifest.json").read_text())["architecture"]["weights"]
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(package / weights, outside)
    (package / weights).symlink_to(outside)
    with pytest.raises(ModelPackageError, match="links outside the package"):
        Scorer.from_package(find_package(str(package), "scorer"))


# ------------------------------------------------------------------ 8: NaN label maps


def test_8_a_float_label_map_with_nan_is_refused(phantoms, tmp_path):
    import nrrd

    labels = np.asarray(Image.open(_labels_of(phantoms[0]))).astype(np.float32)
    labels[10, 10] = np.nan
    path = tmp_path / "labels.nrrd"
    nrrd.write(str(path), labels, index_order="C")
    with pytest.raises(AACScoreError, match="labels.nrrd: label map holds NaN"):
        read_label_map(path)


# ------------------------------------------------------------------ 9-11: evaluate


def _csv(path: Path, rows: list[dict]) -> Path:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _subscores(values) -> dict:
    return dict(zip(SUBSCORE_COLUMNS, values))


@pytest.mark.parametrize("bad, problem", [
    ({"aac24": "30"}, "aac24 30 is outside 0..24"),
    ({"aac24": "-5"}, "aac24 -5 is outside 0..24"),
    ({"L1A": "7"}, "L1A 7 is outside 0..3"),
    ({"L2P": "-1"}, "L2P -1 is outside 0..3"),
    ({"aac24": "9"}, "aac24 9 is not the sum of its subscores"),
])
def test_9_evaluate_refuses_impossible_truth_values(tmp_path, bad, problem):
    truth = [{"file": f"c{i}.dcm", "aac24": str(i), **_subscores([i, 0, 0, 0, 0, 0, 0, 0])} for i in range(3)]
    truth[1].update(bad)
    pred = [{"file": f"c{i}.dcm", "aac24": str(i + 0.5), "status": "ok"} for i in range(3)]
    with pytest.raises(AACScoreError, match=rf"truth.csv: \d+ impossible value.*c1.dcm: {problem}"):
        evaluate(_csv(tmp_path / "truth.csv", truth), _csv(tmp_path / "pred.csv", pred), bootstrap=0)
    pred[2]["aac24"] = "31"
    truth[1] = {"file": "c1.dcm", "aac24": "1", **_subscores([1, 0, 0, 0, 0, 0, 0, 0])}
    with pytest.raises(AACScoreError, match="pred.csv: 1 impossible value.*c2.dcm: aac24 31"):
        evaluate(_csv(tmp_path / "truth.csv", truth), _csv(tmp_path / "pred.csv", pred), bootstrap=0)


def test_10_constant_truth_and_prediction_give_icc_and_p_not_available(tmp_path):
    icc = metrics.icc_2_1(np.array([[3.0, 3.0]] * 5))
    assert np.isnan(icc["icc"]) and np.isnan(icc["p"])
    assert metrics.icc_2_1(np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]))["p"] == 0.0  # perfect agreement
    rows = [{"file": f"c{i}.dcm", "aac24": "3", "status": "ok"} for i in range(4)]
    results = evaluate(_csv(tmp_path / "t.csv", rows), _csv(tmp_path / "p.csv", rows), bootstrap=0)
    icc_line = next(line for line in format_report(results).splitlines() if line.startswith("| ICC(2,1)"))
    assert icc_line.split("|")[2].strip() == "n/a" and icc_line.split("|")[4].strip() == "n/a"


def test_11_warning_rows_are_compared_and_reported_by_status(tmp_path):
    truth = [{"file": f"c{i}.png", "aac24": str(i)} for i in range(4)]
    pred = [{"file": f"/data/c{i}.png", "aac24": str(i + 1), "status": "warning",
             "message": "pixel spacing unknown: geometry in pixels"} for i in range(4)]
    pred[3].update(status="error", aac24="")
    results = evaluate(_csv(tmp_path / "t.csv", truth), _csv(tmp_path / "p.csv", pred), bootstrap=0)
    assert results["n"] == 3 and len(results["excluded"]) == 1
    assert results["by_status"] == {"warning": {"n": 3, "mae": 1.0}}
    assert "Cases compared: 3 (warning 3, MAE 1.00); excluded: 1" in results["report"]


# ------------------------------------------------------------------ 12-16: one line, never a traceback


def test_12_a_symlink_loop_given_as_a_file_becomes_an_error_row(tiny_scorer, phantoms, tmp_path):
    loop = tmp_path / "loop.dcm"
    loop.symlink_to(loop)
    items = collect([loop, _listing(tmp_path / "list.csv", phantoms[:1])])
    table = score_cohort(Pipeline(tiny_scorer), items, tmp_path / "out", heatmaps=False)
    rows = {Path(r["file"]).name: r for r in _rows(table)}
    assert rows["loop.dcm"]["status"] == "error" and "symbolic link loop" in rows["loop.dcm"]["message"]
    assert rows[phantoms[0].name]["status"] in ("ok", "warning")


@pytest.mark.parametrize("encoding, prefix", [("latin-1", ""), ("utf-8", "\ufeff")])
def test_13_14_csv_lists_in_latin1_or_with_a_bom_are_read(phantoms, tmp_path, encoding, prefix):
    folder = tmp_path / "Études été"
    folder.mkdir()
    image = folder / "patiént.dcm"
    shutil.copy(phantoms[0], image)
    listing = tmp_path / "list.csv"
    listing.write_text(prefix + f"file,labels\n{image},{_labels_of(phantoms[0])}\n", encoding=encoding)
    items = collect([listing])
    assert [item.image for item in items] == [image] and items[0].image.is_file()
    truth = tmp_path / "truth.csv"
    truth.write_text(prefix + "file,aac24\npatiént.dcm,3\nzoë.dcm,5\n", encoding=encoding)
    assert [row["file"] for row in read_scores_csv(truth)] == ["patiént.dcm", "zoë.dcm"]


def test_15_an_out_that_is_a_file_or_read_only_is_one_line(phantoms, tmp_path, scorer_package, capsys, monkeypatch):
    listing = _listing(tmp_path / "list.csv", phantoms[:1])
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    assert _score_cli([listing], a_file, scorer_package) == 2
    assert _score_cli([listing], a_file / "out", scorer_package) == 2
    truth = _csv(tmp_path / "t.csv", [{"file": f"c{i}", "aac24": str(i)} for i in range(3)])
    assert cli.main(["evaluate", "--truth", str(truth), "--pred", str(truth), "--out", str(a_file),
                     "--bootstrap", "0"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all("taken" in line for line in errors), errors
    assert all("is not a folder" in line or "is a file" in line for line in errors), errors

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(args[0]))

    monkeypatch.setattr(Path, "mkdir", read_only)  # as on a read-only disk (the tests run as root)
    assert _score_cli([listing], tmp_path / "new", scorer_package) == 2
    assert cli.main(["evaluate", "--truth", str(truth), "--pred", str(truth), "--out", str(tmp_path / "ev"),
                     "--bootstrap", "0"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all("Permission denied" in line for line in errors), errors
    assert "Traceback" not in "".join(errors)


def test_16_disk_full_while_saving_results_is_one_line_and_the_table_stays(
        phantoms, tmp_path, scorer_package, capsys, monkeypatch):
    listing = _listing(tmp_path / "list.csv", phantoms)
    out = tmp_path / "out"
    assert _score_cli([_listing(tmp_path / "one.csv", phantoms[:1])], out, scorer_package) == 0
    before = (out / "results.csv").read_text()
    capsys.readouterr()
    real_fsync = os.fsync

    def full(descriptor):
        if Path(os.readlink(f"/proc/self/fd/{descriptor}")).name.startswith(".results."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(descriptor)

    monkeypatch.setattr(atomic.os, "fsync", full)
    assert _score_cli([listing], out, scorer_package) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "results.csv: cannot be saved (No space left on device)" in error and "intact" in error
    assert (out / "results.csv").read_text() == before
    assert not [p for p in out.iterdir() if p.name.startswith(".results.") and p.suffix == ".csv"]


# ------------------------------------------------------------------ 17: misleading messages and the terminal


def test_17_truncated_dicoms_are_reported_as_truncated(phantoms, tmp_path):
    data = phantoms[0].read_bytes()
    for size in (300, 2000, len(data) // 2):
        cut = tmp_path / f"cut{size}.dcm"
        cut.write_bytes(data[:size])
        with pytest.raises(AACScoreError, match=f"cut{size}.dcm: DICOM file is truncated"):
            read_radiograph(cut)
    native = _with_orientation(phantoms[0], tmp_path / "native.dcm", ("A", "F"))
    cut = tmp_path / "native_cut.dcm"
    cut.write_bytes(native.read_bytes()[:-5000])
    with pytest.raises(AACScoreError, match="native_cut.dcm: DICOM file is truncated: .* inside its pixel data"):
        read_radiograph(cut)


def test_17_decoder_warnings_go_into_the_message_not_the_terminal(tiny_scorer, phantoms, tmp_path, recwarn):
    padded = _with_orientation(phantoms[0], tmp_path / "padded.dcm", ("A", "F"))
    ds = pydicom.dcmread(padded)
    ds.PixelData = ds.PixelData + b"\0" * 4096
    ds.save_as(padded)
    result = Pipeline(tiny_scorer).run(padded, _labels_of(phantoms[0]), heatmap=False)
    assert result.status == "warning" and "excess padding" in result.message
    assert not [w for w in recwarn if "padding" in str(w.message)], "the warning escaped to the caller"


def test_17_a_radiograph_with_coloured_marks_is_scored_as_grey_and_flagged(tiny_scorer, phantoms, tmp_path):
    """A web export: grey as RGB, with a red arrow burned in. Scored, never plainly ok; the reason says why."""
    pixels = read_radiograph(phantoms[0]).pixels
    grey = np.uint8(255 * (pixels - pixels.min()) / np.ptp(pixels))
    rgb = np.stack([grey] * 3, axis=-1)
    rgb[20:40, 20:120] = (220, 30, 30)
    Image.fromarray(rgb).save(tmp_path / "marked.png")
    result = Pipeline(tiny_scorer).run(tmp_path / "marked.png", _labels_of(phantoms[0]), heatmap=False)
    assert result.aac24 is not None and result.status == "warning" and result.qc == "review"
    assert [reason.code for reason in result.qc_reasons if "colour on" in reason.text] == ["decoder_warning"]


def test_17_a_bone_dark_radiograph_is_scored_bone_bright_and_flagged(tiny_scorer, phantoms):
    """Whatever its tags say: an image whose vertebrae are darker than the tissue around them is inverted back, scores
    as the bone-bright image does, and is never plainly ok."""
    upright = read_radiograph(phantoms[0])
    dark = dataclasses.replace(upright, pixels=upright.pixels.max() + upright.pixels.min() - upright.pixels)
    labels = _labels_of(phantoms[0])
    as_drawn = Pipeline(tiny_scorer).run(upright, labels, heatmap=False)
    result = Pipeline(tiny_scorer).run(dark, labels, heatmap=False)
    assert "image_inverted" not in [reason.code for reason in as_drawn.qc_reasons]
    assert [reason.code for reason in result.qc_reasons if reason.code == "image_inverted"] == ["image_inverted"]
    assert result.qc == "review" and result.status == "warning"
    assert result.aac24 == pytest.approx(as_drawn.aac24, abs=1e-4)
    np.testing.assert_array_equal(result.radiograph.pixels, upright.pixels)


def test_17_the_pipeline_follows_the_segmenters_polarity_decision(tiny_scorer, phantoms):
    """Segmentation and crop go by one decision: where the segmenter measured the bone contrast, the pipeline takes
    its measure instead of measuring again on other labels."""
    from types import SimpleNamespace

    upright = read_radiograph(phantoms[0])
    labels = read_label_map(_labels_of(phantoms[0]))

    class DecidedSegmenter:
        manifest = {"name": "seg", "version": "1"}

        def __init__(self, contrast):
            self.contrast = contrast

        def segment(self, radiograph, cancel=None):
            return SimpleNamespace(status="ok", labels=labels, message="", bone_contrast=self.contrast)

    said_dark = Pipeline(tiny_scorer, DecidedSegmenter(-0.3)).run(upright, heatmap=False)
    said_bright = Pipeline(tiny_scorer, DecidedSegmenter(0.3)).run(upright, heatmap=False)
    assert "image_inverted" in [reason.code for reason in said_dark.qc_reasons]
    assert "contrast -0.30" in said_dark.message
    assert "image_inverted" not in [reason.code for reason in said_bright.qc_reasons]
    np.testing.assert_array_equal(said_bright.radiograph.pixels, upright.pixels)


def test_17_the_spacing_warning_is_said_once(tiny_scorer, phantoms, tmp_path):
    png = tmp_path / "image.png"
    pixels = read_radiograph(phantoms[0]).pixels
    Image.fromarray(np.uint8(255 * (pixels - pixels.min()) / np.ptp(pixels))).save(png)

    class SpacingNoteSegmenter:  # what the segmenter says of a PNG
        manifest = {"name": "seg", "version": "1"}

        def segment(self, radiograph, cancel=None):
            from types import SimpleNamespace

            labels = read_label_map(_labels_of(phantoms[0]))  # L1..L5, as a segmenter gives them
            return SimpleNamespace(status="ok", labels=labels, message="pixel spacing unknown: took 0.200 mm per "
                                   "pixel, from the size of the vertebral bodies")

    result = Pipeline(tiny_scorer, SpacingNoteSegmenter()).run(png, heatmap=False)
    assert result.message.count("pixel spacing unknown") == 1, result.message
    result = Pipeline(tiny_scorer).run(png, _labels_of(phantoms[0]), heatmap=False)
    assert result.message.count("pixel spacing unknown") == 1, result.message


def test_17_a_symlinked_subfolder_is_followed_once(phantoms, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    shutil.copy(phantoms[0], real / "a.dcm")
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    shutil.copy(phantoms[1], cohort / "b.dcm")
    (cohort / "linked").symlink_to(real, target_is_directory=True)
    (real / "back").symlink_to(cohort, target_is_directory=True)  # a loop through the links
    assert sorted(item.image.name for item in collect([cohort])) == ["a.dcm", "b.dcm"]


def test_17_install_errors_name_the_users_zip(scorer_package, tmp_path):
    archive = tmp_path / "my-model.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for file in scorer_package.iterdir():
            data = file.read_bytes()
            zipped.writestr(f"pkg/{file.name}", data[:-1] + b"?" if file.suffix == ".safetensors" else data)
    with pytest.raises(ModelPackageError) as error:
        install_package(archive, models_dir=tmp_path / "models")
    assert str(error.value).startswith(f"{archive}/pkg: ") and "checksum does not match" in str(error.value)
    assert ".install-" not in str(error.value)


def test_17_a_refused_run_does_not_create_out(tmp_path, scorer_package, capsys):
    out = tmp_path / "out"
    assert _score_cli([tmp_path / "nothing-here"], out, tmp_path / "no-such-package") == 2
    assert _score_cli([tmp_path / "empty.csv"], out, scorer_package, "--shard", "3/2") == 2
    assert not out.exists()
    assert len(capsys.readouterr().err.strip().splitlines()) == 2


def test_17_a_closed_stderr_does_not_fail_a_good_run(phantoms, tmp_path, scorer_package):
    listing = _listing(tmp_path / "list.csv", phantoms)
    command = [sys.executable, "-m", "AACScoreLib.cli", "score", str(listing), "--out", str(tmp_path / "out"),
               "--scorer", str(scorer_package), "--no-heatmap"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": str(AACSCORE)})
    process.stderr.close()  # as `2>&1 | head -1` once head has exited
    assert process.wait(timeout=300) == 0
    assert len(_rows(tmp_path / "out" / "results.csv")) == len(phantoms)


def test_17_the_progress_bar_survives_a_broken_pipe():
    class Closed:
        def isatty(self):
            return False

        def write(self, text):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        def flush(self):
            pass

    bar = _ProgressBar(Closed())
    bar(1, 2, "a")
    bar(2, 2, "b")  # no exception: scoring goes on


def test_results_table_rows_are_keyed_by_real_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.dcm").write_bytes(b"x")
    (tmp_path / "link.dcm").symlink_to(tmp_path / "a.dcm")
    with ResultsFile(tmp_path / "results.csv", min_interval=0) as results:
        results.add({"file": str(tmp_path / "a.dcm"), "status": "ok"})
    reopened = ResultsFile(tmp_path / "results.csv")
    assert reopened.done("a.dcm") and reopened.done("./a.dcm") and reopened.done("link.dcm")


def test_3_scored_label_maps_still_match_the_truth_by_name(tiny_scorer, phantoms, tmp_path):
    from AACScoreLib.evaluation.evaluate import dice_by_vertebra

    out = tmp_path / "out"
    score_cohort(Pipeline(tiny_scorer), [WorkItem(phantoms[0], _labels_of(phantoms[0]))], out, heatmaps=False)
    (written,) = (out / "labels").iterdir()
    assert written.name != f"{phantoms[0].stem}_labels.png"  # the name carries the path hash
    dice = dice_by_vertebra(phantoms[0].parent, out / "labels")
    assert dice["n"] == 1 and all(value == 1.0 for value in dice["cases"][phantoms[0].stem].values())


_STALLING_RUN = """
import signal, sys, time
from AACScoreLib.batch import score_cohort
from AACScoreLib.io.cohort import collect
from AACScoreLib.pipeline import Pipeline
from AACScoreLib.scoring.scorer import Scorer

# Ctrl-C as in a terminal: a suite started in the background (`cmd &`) passes SIGINT down ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
pipeline = Pipeline(Scorer.from_package(sys.argv[1]))
original, calls = pipeline.run, []

def stall_on_third(*args, **kwargs):
    calls.append(args)
    if len(calls) == 3:
        print("stalled", flush=True)
        time.sleep(300)
    return original(*args, **kwargs)

pipeline.run = stall_on_third
score_cohort(pipeline, collect([sys.argv[2]]), sys.argv[3], heatmaps=False)
"""


@pytest.mark.parametrize("signal_name, rows_kept", [("SIGKILL", 1), ("SIGINT", 2)])
def test_an_interrupted_run_leaves_a_whole_table_and_resumes_without_duplicates(
        phantoms, tmp_path, scorer_package, signal_name, rows_kept):
    import signal

    listing, out = _listing(tmp_path / "list.csv", phantoms), tmp_path / "out"
    run = subprocess.Popen([sys.executable, "-c", _STALLING_RUN, str(scorer_package), str(listing), str(out)],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                           env={**os.environ, "PYTHONPATH": str(AACSCORE)})
    try:
        assert run.stdout.readline().strip() == "stalled"
        run.send_signal(getattr(signal, signal_name))
        run.wait(timeout=180)  # generous: a loaded machine is slow to unwind and exit
    finally:
        run.kill()
        run.stdout.close()
    assert len(_rows(out / "results.csv")) == rows_kept  # parseable, and every finished image kept
    pipeline = Pipeline(Scorer.from_package(scorer_package))
    calls = []
    original = pipeline.run
    pipeline.run = lambda *args, **kwargs: calls.append(args) or original(*args, **kwargs)
    score_cohort(pipeline, collect([listing]), out, heatmaps=False)
    rows = _rows(out / "results.csv")
    assert len(calls) == len(phantoms) - rows_kept
    assert sorted(r["file"] for r in rows) == sorted(str(p.resolve()) for p in phantoms)

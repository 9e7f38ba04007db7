"""DICOM outputs (SEG, TID 1500 SR, heatmap Secondary Capture) made with highdicom, read back with highdicom, and a
DICOM SEG accepted as the user's label map."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from AACScoreLib.cli import main
from AACScoreLib.errors import GeometryError
from AACScoreLib.io import dicom_results
from AACScoreLib.io.labelmaps import read_label_map
from AACScoreLib.io.terminology import vertebra_terms
from AACScoreLib.kauppila import SUBSCORE_COLUMNS

SAMPLES = Path(__file__).resolve().parents[2] / "Resources" / "SampleData"
SAMPLE = SAMPLES / "phantom_alt_s4002_0000.dcm"
ROW = {"aac24": 7.123, "category": "moderate", **dict(zip(SUBSCORE_COLUMNS, (1.0, 0.5, 1.25, 0.0, 2.0, 1.1, 0.9, 0.4))),
       "models": "aacscore-demo-scorer==0.2.0; aacscore-demo-segmenter==1.2"}


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return np.asarray(Image.open(SAMPLE.with_name(SAMPLE.stem + "_labels.png")))


@pytest.fixture(scope="module")
def written(labels, tmp_path_factory):
    header = dicom_results.read_source_header(SAMPLE)
    row = {**ROW, "qc": "review", "qc_reasons": "anterior side not evident", "aac24_low": 4.5, "aac24_high": 9.75}
    picture = np.zeros((120, 100, 3), np.uint8)
    picture[:, :50] = (250, 120, 0)
    results = dicom_results.make_results(header, row, labels, True, picture)
    return dicom_results.write_results(results, tmp_path_factory.mktemp("dicom"), "sample"), header, row


def test_seg_holds_l1_to_l5_coded_as_the_slicer_segments_and_reads_back_equal(written, labels):
    paths, header, _ = written
    seg = pydicom.dcmread(paths["seg"])
    assert seg.SOPClassUID == pydicom.uid.SegmentationStorage and seg.StudyInstanceUID == header.StudyInstanceUID
    terms = vertebra_terms()
    assert [s.SegmentLabel for s in seg.SegmentSequence] == list(terms)
    assert [s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence] == \
        [term.type.value for term in terms.values()]
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    np.testing.assert_array_equal(read_label_map(paths["seg"], labels.shape, source_uid=header.SOPInstanceUID), labels)


def test_report_says_what_the_row_says(written):
    paths, header, row = written
    values = dicom_results.read_report(paths["sr"])
    for column in ("aac24", "aac24_low", "aac24_high") + SUBSCORE_COLUMNS:
        assert values[column] == pytest.approx(row[column], abs=1e-9)
    assert {key: values[key] for key in ("category", "qc", "qc_reasons", "models")} == \
        {key: row[key] for key in ("category", "qc", "qc_reasons", "models")}
    assert values["source_uid"] == header.SOPInstanceUID
    sr = pydicom.dcmread(paths["sr"])
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    evidence = {item.ReferencedSOPInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
    assert header.SOPInstanceUID in evidence and pydicom.dcmread(paths["seg"]).SOPInstanceUID in evidence


def test_a_report_without_qc_fields_leaves_them_out(labels):
    header = dicom_results.read_source_header(SAMPLE)
    report = dicom_results.make_report(dicom_results._complete_source(header), {**ROW, "qc": "", "aac24_low": None})
    values = dicom_results.read_report(report)
    assert "qc" not in values and "aac24_low" not in values and values["aac24"] == pytest.approx(7.123)


def test_heatmap_is_a_secondary_capture_in_the_radiographs_study(written):
    paths, header, _ = written
    capture = pydicom.dcmread(paths["heatmap"])
    assert capture.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage and capture.Modality == "OT"
    assert capture.StudyInstanceUID == header.StudyInstanceUID
    assert capture.pixel_array.shape == (120, 100, 3)
    assert abs(int(capture.pixel_array[60, 10, 0]) - 250) < 20  # lossy, but the colour stays


def test_dicom3tools_finds_no_error_in_the_outputs(written):
    """dciodvfy (David Clunie's IOD checker, Debian dicom3tools) checks what highdicom's reader does not."""
    binary = shutil.which("dciodvfy")
    if binary is None:
        message = "dciodvfy not found (Debian package dicom3tools)"
        if os.environ.get("CI"):
            pytest.fail(message + "; .ci/run installs it", pytrace=False)
        pytest.skip(message)
    paths, _, _ = written
    for path in paths.values():
        checked = subprocess.run([binary, "-new", str(path)], capture_output=True, text=True)
        errors = [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{path.name}: {errors}"


def test_a_seg_is_matched_by_coded_concept_and_refused_for_another_image(written, labels, tmp_path):
    paths, header, _ = written
    seg = pydicom.dcmread(paths["seg"])
    for number, description in enumerate(reversed(seg.SegmentSequence)):
        description.SegmentLabel = f"segment {number}"  # names that say nothing: the codes still do
    seg.save_as(tmp_path / "renamed.dcm")
    np.testing.assert_array_equal(read_label_map(tmp_path / "renamed.dcm", labels.shape), labels)
    with pytest.raises(GeometryError, match="made for image"):
        read_label_map(paths["seg"], labels.shape, source_uid="1.2.3.4")
    with pytest.raises(GeometryError, match="radiograph"):
        read_label_map(paths["seg"], (labels.shape[0] + 1, labels.shape[1]))
    seg.SegmentSequence[2].SegmentedPropertyTypeCodeSequence[0].CodeValue = "0"
    seg.save_as(tmp_path / "no_l3.dcm")
    with pytest.raises(GeometryError, match="no segment for L3"):
        read_label_map(tmp_path / "no_l3.dcm", labels.shape)


def test_score_writes_dicom_for_dicom_inputs_and_says_why_not_for_others(tmp_path, written, labels):
    paths, _, _ = written
    from AACScoreLib.io.overlay import display_gray
    from AACScoreLib.io.radiograph import read_radiograph

    png = tmp_path / "radiograph.png"
    Image.fromarray(display_gray(read_radiograph(SAMPLE).pixels)).save(png)
    Image.fromarray(labels).save(tmp_path / "radiograph_labels.png")
    listing = tmp_path / "list.csv"
    with open(listing, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["file", "labels"])
        writer.writerow([SAMPLE, paths["seg"]])  # a DICOM SEG as the corrected label map
        writer.writerow([png, tmp_path / "radiograph_labels.png"])
    out = tmp_path / "out"
    assert main(["score", str(listing), "--out", str(out), "--dicom-out", str(out / "dicom"), "--device", "cpu",
                 "--no-heatmap"]) == 0
    with open(out / "results.csv", newline="") as stream:
        rows = {Path(row["file"]).name: row for row in csv.DictReader(stream)}
    dicom_row = rows[SAMPLE.name]
    assert dicom_row["status"] != "error", dicom_row
    np.testing.assert_array_equal(np.asarray(Image.open(dicom_row["labels"])), labels)
    written_now = [Path(p) for p in dicom_row["dicom"].split("; ")]
    stem = Path(dicom_row["labels"]).name.removesuffix("_labels.png")  # the input's name and a hash of its path
    assert stem.startswith("phantom_alt_s4002_0000-")
    assert [p.name for p in written_now] == [f"{stem}_labels.dcm", f"{stem}_aac24_report.dcm"]
    seg = pydicom.dcmread(written_now[0])
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "MANUAL"  # the user's labels, not a model's
    assert dicom_results.read_report(written_now[1])["aac24"] == pytest.approx(float(dicom_row["aac24"]))
    png_row = rows["radiograph.png"]
    assert "no DICOM outputs: the input is PNG" in png_row["message"] and png_row["dicom"] == ""


def test_folder_scans_skip_dicom_outputs(written, tmp_path):
    from AACScoreLib.io.cohort import collect

    paths, _, _ = written
    shutil.copy(SAMPLE, tmp_path)
    for path in paths.values():
        shutil.copy(path, tmp_path)
    assert [item.image.name for item in collect([tmp_path])] == [SAMPLE.name]

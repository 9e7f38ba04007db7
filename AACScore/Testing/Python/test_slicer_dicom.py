"""The Slicer module's DICOM actions against slicer-core's real scene: Export DICOM of a scored radiograph, and a
DICOM SEG loaded back as the radiograph's L1–L5 segments (a person's segmentation, never silently overwritten)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from mrml_testing import paint_segment

from AACScoreLib.errors import AACScoreError, RadiographError
from AACScoreLib.io import dicom_results
from AACScoreLib.io.labelmaps import read_label_map
from AACScoreLib.io.radiograph import read_radiograph
from AACScoreLib.kauppila import SUBSCORE_COLUMNS, VERTEBRAE
from AACScoreLib.pipeline import Pipeline
from AACScoreLib.slicer import scene as aac_scene
from AACScoreLib.slicer.dicom import export_dicom, load_dicom_seg
from AACScoreLib.slicer.workflow import Workflow

SAMPLE = Path(__file__).resolve().parents[2] / "Resources" / "SampleData" / "phantom_alt_s4003_0000.dcm"


@pytest.fixture
def labels() -> np.ndarray:
    return np.asarray(Image.open(SAMPLE.with_name(SAMPLE.stem + "_labels.png")))


@pytest.fixture
def scored(tiny_scorer, labels):
    """A scene with the sample radiograph, its vertebrae as the model would have made them, scored."""
    scene = aac_scene.new_scene()
    workflow = Workflow(scene, Pipeline(tiny_scorer))
    volume = aac_scene.add_radiograph_volume(scene, read_radiograph(SAMPLE))
    aac_scene.add_vertebra_segmentation(scene, volume, labels)
    outcome = workflow.score(volume)
    assert outcome.result.status != "error", outcome.result.message
    return workflow, volume


def test_export_dicom_writes_what_the_scene_shows_and_it_loads_back_as_segments(scored, labels, tmp_path):
    workflow, volume = scored
    paths = export_dicom(workflow, volume, tmp_path / "dicom")
    assert set(paths) == {"seg", "sr", "heatmap"}
    row = aac_scene.result_rows(workflow.results_table(), aac_scene.MODEL_SOURCE)[0]
    values = dicom_results.read_report(paths["sr"])
    for column in ("aac24",) + SUBSCORE_COLUMNS:
        assert values[column] == pytest.approx(row[column], abs=5e-4)
    assert values["category"] == row["category"] and values["models"] == workflow.pipeline().models
    assert pydicom.dcmread(paths["seg"]).SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"

    fresh = aac_scene.new_scene()
    other = aac_scene.add_radiograph_volume(fresh, read_radiograph(SAMPLE))
    segmentation = load_dicom_seg(Workflow(fresh), other, paths["seg"])
    names = [segmentation.GetSegmentation().GetNthSegment(i).GetName()
             for i in range(segmentation.GetSegmentation().GetNumberOfSegments())]
    assert names == list(VERTEBRAE)
    np.testing.assert_array_equal(aac_scene.read_vertebra_labels(segmentation, other), labels)
    assert aac_scene.segmentation_was_edited(segmentation)  # a loaded SEG is a person's, not the model's


def test_an_edited_segmentation_exports_as_manual_and_is_not_overwritten_by_a_seg(scored, labels, tmp_path):
    workflow, volume = scored
    segmentation = aac_scene.find_vertebra_segmentation(workflow.scene, volume)
    edited = labels.copy()
    edited[labels == 5] = 0
    edited[(labels == 0) & (np.roll(labels, 3, axis=0) == 5)] = 5
    segment_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName("L5")
    paint_segment(segmentation, segment_id, edited == 5, volume)
    paths = export_dicom(workflow, volume, tmp_path)
    assert pydicom.dcmread(paths["seg"]).SegmentSequence[0].SegmentAlgorithmType == "MANUAL"
    np.testing.assert_array_equal(read_label_map(paths["seg"], labels.shape), edited)
    with pytest.raises(AACScoreError, match="edited"):
        load_dicom_seg(workflow, volume, paths["seg"])


def test_export_refuses_an_unscored_or_non_dicom_radiograph(tiny_scorer, labels, tmp_path):
    scene = aac_scene.new_scene()
    workflow = Workflow(scene, Pipeline(tiny_scorer))
    volume = aac_scene.add_radiograph_volume(scene, read_radiograph(SAMPLE))
    with pytest.raises(AACScoreError, match="no score yet"):
        export_dicom(workflow, volume, tmp_path)
    png = tmp_path / "radiograph.png"
    Image.fromarray(labels * 40).save(png)
    png_volume = aac_scene.add_radiograph_volume(scene, read_radiograph(png))
    with pytest.raises(RadiographError, match="not DICOM"):
        export_dicom(workflow, png_volume, tmp_path)

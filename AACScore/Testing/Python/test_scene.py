"""The MRML side against slicer-core's real headless scene: geometry, segments by name, edits, heatmap, table, mrb."""

from __future__ import annotations

import os

import csv
import json
from dataclasses import dataclass, field

import numpy as np
import pytest
from mrml_testing import paint_segment
import slicer
import slicer.util
import vtk
import vtk.util.numpy_support

from AACScoreLib.slicer import scene as aac_scene
from AACScoreLib.errors import AACScoreError, GeometryError
from AACScoreLib.kauppila import SUBSCORE_COLUMNS, VERTEBRAE
from AACScoreLib.io.radiograph import Radiograph

ROWS, COLS = 60, 40
ROW_MM, COL_MM = 0.2, 0.15


def _radiograph(spacing=(ROW_MM, COL_MM), path="/data/patient 7/lateral_01.dcm") -> Radiograph:
    pixels = np.arange(ROWS * COLS, dtype=np.float32).reshape(ROWS, COLS)
    return Radiograph(pixels=pixels, spacing=spacing, spacing_source="PixelSpacing" if spacing else "unknown",
                      path=path, format="DICOM", patient_orientation=("A", "F"))


def _labels() -> np.ndarray:
    """Five stacked boxes, L1 at the top, with two-row gaps (discs) between them."""
    labels = np.zeros((ROWS, COLS), np.uint8)
    for k in range(5):
        labels[5 + 10 * k: 13 + 10 * k, 12:30] = k + 1
    return labels


@dataclass
class _Vertebra:  # the attributes of geometry.Vertebra that the boundary lines use
    name: str
    ap_length_px: float


@dataclass
class _Geometry:  # the attributes of geometry.SpineGeometry that the boundary lines use
    boundaries: np.ndarray
    boundary_directions: np.ndarray
    vertebrae: list = field(default_factory=lambda: [_Vertebra(name, 10.0) for name in VERTEBRAE])


@pytest.fixture
def scene():
    return aac_scene.new_scene()


@pytest.fixture
def volume(scene):
    return aac_scene.add_radiograph_volume(scene, _radiograph())


def test_new_scene_has_colour_tables_and_segmentation_converters(scene):
    assert slicer.mrmlScene is scene
    assert scene.GetFirstNodeByName("Grey") is not None
    assert scene.GetFirstNodeByName("Labels") is not None
    assert scene.GetSubjectHierarchyNode() is not None


def test_radiograph_volume_spacing_orientation_and_name(scene, volume):
    assert volume.GetName() == "lateral_01"
    assert volume.GetSpacing() == pytest.approx((COL_MM, ROW_MM, 1.0))
    array = slicer.util.arrayFromVolume(volume)
    assert array.shape == (1, ROWS, COLS)
    np.testing.assert_array_equal(array[0], _radiograph().pixels)
    assert volume.GetAttribute(aac_scene.SPACING_KNOWN_ATTRIBUTE) == "true"
    assert volume.GetAttribute(aac_scene.SOURCE_PATH_ATTRIBUTE) == "/data/patient 7/lateral_01.dcm"
    assert volume.GetAttribute(aac_scene.PATIENT_ORIENTATION_ATTRIBUTE) == "A\\F"
    assert volume.GetDisplayNode() is not None
    # Axial (Red) view: screen up is +A, screen right is -R. Row 0 must be on top, column 0 on the left.
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijk_to_ras)
    top_left = np.array(ijk_to_ras.MultiplyPoint((0, 0, 0, 1))[:3])
    bottom_left = np.array(ijk_to_ras.MultiplyPoint((0, ROWS - 1, 0, 1))[:3])
    top_right = np.array(ijk_to_ras.MultiplyPoint((COLS - 1, 0, 0, 1))[:3])
    assert bottom_left[1] - top_left[1] == pytest.approx(-(ROWS - 1) * ROW_MM)  # down the rows = less anterior
    assert top_right[0] - top_left[0] == pytest.approx(-(COLS - 1) * COL_MM)  # along the columns = to the left
    assert bottom_left[2] == top_left[2] == top_right[2]


def test_red_slice_view_shows_the_radiograph_upright(scene):
    """Render the volume through a real axial slice logic: the screen shows row 0 at the top, column 0 at left."""
    volume = aac_scene.add_radiograph_volume(scene, _radiograph(spacing=(1.0, 1.0)))
    slice_logic = slicer.vtkMRMLSliceLogic()
    slice_logic.SetMRMLScene(scene)
    slice_node = slice_logic.AddSliceNode("Red")
    slice_node.SetOrientation("Axial")
    slice_node.SetDimensions(COLS, ROWS, 1)
    slice_logic.GetSliceCompositeNode().SetBackgroundVolumeID(volume.GetID())
    slice_logic.FitSliceToAll()
    reslice = slice_logic.GetBackgroundLayer().GetReslice()
    reslice.Update()
    image = reslice.GetOutput()
    width, height, _ = image.GetDimensions()
    screen = vtk.util.numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)
    screen = screen[::-1, :, 0].astype(float)  # VTK's image rows run bottom to top
    pixels = _radiograph().pixels
    # same picture up to the half-pixel offset between screen pixel centres and voxel centres
    assert np.corrcoef(screen.ravel(), pixels.ravel())[0, 1] > 0.99
    assert np.abs(screen - pixels).max() <= 0.5 * (COLS + 1) + 1e-6


def test_unknown_spacing_is_one_mm_and_flagged(scene):
    volume = aac_scene.add_radiograph_volume(scene, _radiograph(spacing=None, path="/x/scan.nii.gz"))
    assert volume.GetName() == "scan"
    assert volume.GetSpacing() == pytest.approx((1.0, 1.0, 1.0))
    assert volume.GetAttribute(aac_scene.SPACING_KNOWN_ATTRIBUTE) == "false"
    assert volume.GetAttribute(aac_scene.SPACING_SOURCE_ATTRIBUTE) == "unknown"


def test_terminology_file_has_the_dicom_vertebra_codes():
    context = json.loads(aac_scene.TERMINOLOGY_FILE.read_text())
    types = context["SegmentationCodes"]["Category"][0]["Type"]
    codes = {kind["3dSlicerLabel"]: kind["CodeValue"] for kind in types}
    # SNOMED CT codes of DICOM CID 7603 "Vertebra"
    assert codes == {"L1": "66794005", "L2": "14293000", "L3": "36470004", "L4": "11994002", "L5": "49668003",
                     "T12": "23215003", "S1": "65985001"}  # S1 is SNOMED CT's first sacral vertebra (not in 7603)
    # Slicer's own terminology logic reads the file
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    assert logic.LoadContextFromFile(str(aac_scene.TERMINOLOGY_FILE))
    entry = slicer.vtkSlicerTerminologyEntry()
    assert logic.FindTypeInTerminologyBy3dSlicerLabel(context["SegmentationCategoryTypeContextName"], "L3", entry)
    assert entry.GetTypeObject().GetCodeMeaning() == "L3 vertebra"


def test_segments_are_named_coloured_coded_and_read_back(scene, volume):
    labels = _labels()
    node = aac_scene.add_vertebra_segmentation(scene, volume, labels)
    assert node.GetName() == "lateral_01 vertebrae"
    segmentation = node.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert names == list(VERTEBRAE)
    terms = aac_scene.vertebra_terminology()
    entry = slicer.vtkSlicerTerminologyEntry()
    for vertebra in VERTEBRAE:
        segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(vertebra))
        assert segment.GetColor() == pytest.approx(terms[vertebra]["color"])
        tag = segment.GetTerminology()
        assert tag == terms[vertebra]["entry"]
        assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(tag, entry)
        assert entry.GetCategoryObject().GetCodeValue() == "123037004"
        assert entry.GetTypeObject().GetCodeMeaning() == f"{vertebra} vertebra"
    np.testing.assert_array_equal(aac_scene.read_vertebra_labels(node, volume), labels)
    assert not aac_scene.segmentation_was_edited(node)
    assert aac_scene.find_vertebra_segmentation(scene, volume) is node
    # no scratch nodes left behind
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0


def test_edited_segments_are_read_by_name_whatever_their_ids_and_label_values(scene, volume):
    labels = _labels()
    node = aac_scene.add_vertebra_segmentation(scene, volume, labels)
    segmentation = node.GetSegmentation()
    expected = labels.copy()

    # L2 deleted and brought back by importing a label map with value 9 (new segment ID, new label value)
    segmentation.RemoveSegment(segmentation.GetSegmentIdBySegmentName("L2"))
    imported = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    imported.SetIJKToRASMatrix(matrix)
    new_l2 = np.zeros_like(labels)
    new_l2[14:24, 10:32] = 9
    slicer.util.updateVolumeFromArray(imported, new_l2[np.newaxis])
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(imported, node)
    scene.RemoveNode(imported)
    new_id = segmentation.GetNthSegmentID(segmentation.GetNumberOfSegments() - 1)
    assert new_id != "L2"
    segmentation.GetSegment(new_id).SetName("L2")
    expected[expected == 2] = 0
    expected[14:24, 10:32] = 2

    # L4 painted larger, segments re-ordered, an unrelated segment added
    grown = labels == 4
    grown[35:43, 30:36] = True
    paint_segment(node, segmentation.GetSegmentIdBySegmentName("L4"), grown, volume)
    expected[grown] = 4
    segmentation.SetSegmentIndex(segmentation.GetSegmentIdBySegmentName("L5"), 0)
    aorta = np.zeros_like(labels, bool)
    aorta[:, 2:6] = True
    aorta_id = segmentation.AddEmptySegment("", "Aorta")
    paint_segment(node, aorta_id, aorta, volume)

    np.testing.assert_array_equal(aac_scene.read_vertebra_labels(node, volume), expected)
    assert aac_scene.segmentation_was_edited(node)


def test_missing_or_doubled_vertebra_segment_is_named_in_the_error(scene, volume):
    node = aac_scene.add_vertebra_segmentation(scene, volume, _labels())
    segmentation = node.GetSegmentation()
    segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("L3")).SetName("L3 old")
    with pytest.raises(GeometryError, match="no segment named 'L3'"):
        aac_scene.read_vertebra_labels(node, volume)
    assert aac_scene.segmentation_was_edited(node)
    segmentation.AddEmptySegment("", "L4")
    with pytest.raises(GeometryError, match="no segment named 'L3' and 2 segments named 'L4'"):
        aac_scene.read_vertebra_labels(node, volume)


def test_context_segments_are_hidden_never_scored_and_replaced_with_the_vertebrae(scene, volume):
    labels = _labels()
    context = np.zeros_like(labels)
    context[0:4, 12:30] = 6  # T12 above L1
    context[57:60, 12:30] = 7  # the top of the sacrum below L5
    node = aac_scene.add_vertebra_segmentation(scene, volume, labels, context=context)
    segmentation = node.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert names == [*VERTEBRAE, "T12", "S1"]
    display = node.GetDisplayNode()
    ids = aac_scene.context_segment_ids(node)
    assert len(ids) == 2 and not any(display.GetSegmentVisibility(i) for i in ids)
    assert all(display.GetSegmentVisibility(segmentation.GetSegmentIdBySegmentName(v)) for v in VERTEBRAE)
    entry = slicer.vtkSlicerTerminologyEntry()
    t12 = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("T12"))
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(t12.GetTerminology(), entry)
    assert entry.GetTypeObject().GetCodeValue() == "23215003"
    np.testing.assert_array_equal(aac_scene.read_vertebra_labels(node, volume), labels)  # context is not scored
    assert not aac_scene.segmentation_was_edited(node)
    assert aac_scene.show_context_segments(node, True) == 2 and all(display.GetSegmentVisibility(i) for i in ids)

    context[57:60] = 0  # the next model sees no sacrum; a person's own segment named T12 stays
    own = segmentation.AddEmptySegment("", "T12 (mine)")
    aac_scene.update_vertebra_segmentation(node, volume, labels, context=context)
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert sorted(names) == sorted([*VERTEBRAE, "T12 (mine)", "T12"]) and segmentation.GetSegment(own) is not None
    aac_scene.update_vertebra_segmentation(node, volume, labels)  # a model without context classes
    assert aac_scene.context_segment_ids(node) == [] and segmentation.GetSegment(own) is not None


def test_update_replaces_unedited_segments_and_refuses_edited_ones(scene, volume):
    labels = _labels()
    node = aac_scene.add_vertebra_segmentation(scene, volume, labels)
    new_labels = np.roll(labels, 2, axis=0)
    new_labels[new_labels == 4] = 0  # L4 not found this time: its old content must go
    aac_scene.update_vertebra_segmentation(node, volume, new_labels)
    np.testing.assert_array_equal(aac_scene.read_vertebra_labels(node, volume), new_labels)
    assert not aac_scene.segmentation_was_edited(node)

    segmentation = node.GetSegmentation()
    paint_segment(node, segmentation.GetSegmentIdBySegmentName("L1"), labels == 1, volume)
    assert aac_scene.segmentation_was_edited(node)
    with pytest.raises(aac_scene.AACScoreError, match="was edited"):
        aac_scene.update_vertebra_segmentation(node, volume, labels)
    aac_scene.update_vertebra_segmentation(node, volume, labels, overwrite_edits=True)
    np.testing.assert_array_equal(aac_scene.read_vertebra_labels(node, volume), labels)


def test_label_map_of_wrong_shape_is_refused(scene, volume):
    with pytest.raises(GeometryError, match="does not match 'lateral_01'"):
        aac_scene.add_vertebra_segmentation(scene, volume, np.zeros((ROWS + 1, COLS), np.uint8))


def test_results_are_placed_beside_the_radiograph_in_the_subject_hierarchy(scene, volume):
    sh = scene.GetSubjectHierarchyNode()
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient 7")
    study = sh.CreateStudyItem(patient, "Lumbar spine")
    sh.SetItemParent(sh.GetItemByDataNode(volume), study)
    segmentation = aac_scene.add_vertebra_segmentation(scene, volume, _labels())
    heatmap = aac_scene.add_heatmap_volume(scene, volume, np.zeros((ROWS, COLS)))
    assert sh.GetItemParent(sh.GetItemByDataNode(segmentation)) == study
    assert sh.GetItemParent(sh.GetItemByDataNode(heatmap)) == study


def test_heatmap_volume_geometry_display_and_update(scene, volume):
    heat = np.zeros((ROWS, COLS), np.float32)
    node = aac_scene.add_heatmap_volume(scene, volume, heat)  # all zero is a valid Grad-CAM result
    assert node.GetName() == "lateral_01 heatmap"
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node)[0], heat)
    volume_matrix, heat_matrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(volume_matrix)
    node.GetIJKToRASMatrix(heat_matrix)
    assert slicer.util.arrayFromVTKMatrix(heat_matrix) == pytest.approx(slicer.util.arrayFromVTKMatrix(volume_matrix))
    display = node.GetDisplayNode()
    assert display.GetColorNode().GetName() == aac_scene.HEATMAP_COLOR_NAME
    assert display.GetColorNode().GetNumberOfColors() == 256
    assert not display.GetAutoWindowLevel()
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx((0.0, 1.0))
    assert display.GetApplyThreshold() and 0.0 < display.GetLowerThreshold() < 0.01

    heat[10:20, 5:15] = 0.8
    again = aac_scene.add_heatmap_volume(scene, volume, heat)
    assert again is node  # re-scoring updates, not duplicates
    np.testing.assert_allclose(slicer.util.arrayFromVolume(node)[0], heat)
    volumes = [scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
               for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))]
    assert [v.GetAttribute(aac_scene.ROLE_ATTRIBUTE) for v in volumes] == ["radiograph", "heatmap"]
    with pytest.raises(GeometryError):
        aac_scene.add_heatmap_volume(scene, volume, np.zeros((COLS, ROWS)))


def test_results_table_upserts_rows_per_file_and_source(scene, tmp_path):
    table = aac_scene.results_table(scene)
    assert aac_scene.results_table(scene) is table
    model = {"file": "a.dcm", "aac24": 6.4, "category": "moderate", "status": "ok", "message": "",
             **{column: 1 for column in SUBSCORE_COLUMNS}}
    aac_scene.upsert_result_row(table, model)
    aac_scene.upsert_result_row(table, {"file": "b.dcm", "status": "error", "message": "cannot be read"})
    aac_scene.upsert_result_row(table, {"file": "a.dcm", "source": "rater 1", "aac24": 5, "category": "moderate"})
    aac_scene.upsert_result_row(table, {**model, "aac24": 7.25, "L4P": 3})  # re-scored
    assert table.GetNumberOfRows() == 3
    rows = aac_scene.result_rows(table)
    assert [(row["file"], row["source"]) for row in rows] == [("a.dcm", "model"), ("b.dcm", "model"),
                                                              ("a.dcm", "rater 1")]
    assert rows[0]["aac24"] == 7.25 and rows[0]["L4P"] == 3.0
    assert rows[1]["aac24"] is None and rows[1]["message"] == "cannot be read"
    with pytest.raises(ValueError, match="aac_24"):
        aac_scene.upsert_result_row(table, {"file": "a.dcm", "aac_24": 3})
    with pytest.raises(ValueError, match="L2A: 'two' is not a number"):
        aac_scene.upsert_result_row(table, {"file": "a.dcm", "L2A": "two"})
    assert table.GetNumberOfRows() == 3

    path = aac_scene.table_to_csv(table, tmp_path / "out" / "results.csv", source="model")
    with open(path, newline="") as stream:
        written = list(csv.DictReader(stream))
    assert [row["file"] for row in written] == ["a.dcm", "b.dcm"]
    assert written[0]["aac24"] == "7.250" and written[0]["L4P"] == "3.000" and written[1]["aac24"] == ""
    assert list(written[0]) == list(aac_scene.TABLE_COLUMNS)
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.csv"]  # no temporary file left


def test_boundary_lines_lie_on_the_disc_mid_planes(scene, volume):
    boundaries = np.array([[4.0, 20.0], [13.5, 21.0], [23.5, 21.5], [33.5, 22.0], [43.5, 22.0]])
    directions = np.tile([[0.0, -1.0]], (5, 1))
    directions[2] = [0.6, -0.8]
    lines = aac_scene.add_segment_boundary_lines(scene, _Geometry(boundaries, directions), volume)
    assert [line.GetName() for line in lines] == [f"lateral_01 {name}" for name in aac_scene.BOUNDARY_NAMES]
    ap = 10.0
    for line, point, direction in zip(lines, boundaries, directions):
        assert isinstance(line, slicer.vtkMRMLMarkupsLineNode)
        assert line.GetNumberOfControlPoints() == 2 and line.GetLocked()
        for index, (row, col) in enumerate((point - 0.5 * ap * direction, point + 1.5 * ap * direction)):
            ras = np.zeros(3)
            line.GetNthControlPointPosition(index, ras)
            assert ras == pytest.approx((-col * COL_MM, -row * ROW_MM, 0.0))
    sh = scene.GetSubjectHierarchyNode()
    folder = sh.GetItemParent(sh.GetItemByDataNode(lines[0]))
    assert sh.GetItemName(folder) == "lateral_01 segment boundaries"
    again = aac_scene.add_segment_boundary_lines(scene, _Geometry(boundaries, directions), volume)
    assert scene.GetNumberOfNodesByClass("vtkMRMLMarkupsLineNode") == 5  # replaced, not added
    assert all(line.GetScene() is scene for line in again)
    assert sh.GetItemParent(sh.GetItemByDataNode(again[0])) == folder
    assert sh.GetNumberOfItemChildren(folder) == 5


def test_mrb_round_trip_keeps_volume_segments_heatmap_table_and_lines(scene, volume, tmp_path):
    labels = _labels()
    aac_scene.add_vertebra_segmentation(scene, volume, labels)
    heat = np.linspace(0, 1, ROWS * COLS, dtype=np.float32).reshape(ROWS, COLS)
    aac_scene.add_heatmap_volume(scene, volume, heat)
    table = aac_scene.results_table(scene)
    aac_scene.upsert_result_row(table, {"file": "lateral_01.dcm", "aac24": 3.5, "category": "no/mild",
                                        "status": "ok"})
    geometry = _Geometry(np.array([[4.0 + 10 * k, 20.0] for k in range(5)]), np.tile([[0.0, -1.0]], (5, 1)))
    aac_scene.add_segment_boundary_lines(scene, geometry, volume)

    path = aac_scene.save_scene_mrb(scene, tmp_path / "case.mrb")
    assert path.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["case.mrb"]
    loaded = aac_scene.load_scene_mrb(path)

    volume2 = loaded.GetFirstNodeByName("lateral_01")
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume2)[0], _radiograph().pixels)
    assert volume2.GetSpacing() == pytest.approx((COL_MM, ROW_MM, 1.0))
    segmentation2 = aac_scene.find_vertebra_segmentation(loaded, volume2)
    assert segmentation2 is not None and segmentation2.GetName() == "lateral_01 vertebrae"
    names = [segmentation2.GetSegmentation().GetNthSegment(i).GetName() for i in range(5)]
    assert names == list(VERTEBRAE)
    assert "L3 vertebra" in segmentation2.GetSegmentation().GetSegment(
        segmentation2.GetSegmentation().GetSegmentIdBySegmentName("L3")).GetTerminology()
    np.testing.assert_array_equal(aac_scene.read_vertebra_labels(segmentation2, volume2), labels)
    assert not aac_scene.segmentation_was_edited(segmentation2)
    heat2 = loaded.GetFirstNodeByName("lateral_01 heatmap")
    np.testing.assert_allclose(slicer.util.arrayFromVolume(heat2)[0], heat)
    assert heat2.GetDisplayNode().GetColorNode().GetName() == aac_scene.HEATMAP_COLOR_NAME
    rows = aac_scene.result_rows(aac_scene.results_table(loaded))
    assert len(rows) == 1 and rows[0]["aac24"] == 3.5 and rows[0]["source"] == "model"
    assert rows[0]["L1A"] is None  # blank stays blank, not 0
    assert loaded.GetNumberOfNodesByClass("vtkMRMLMarkupsLineNode") == 5


def test_loading_a_missing_or_broken_mrb_says_so(tmp_path):
    with pytest.raises(aac_scene.AACScoreError, match="does not exist"):
        aac_scene.load_scene_mrb(tmp_path / "none.mrb")
    broken = tmp_path / "broken.mrb"
    broken.write_bytes(b"not a zip")
    working_directory = os.getcwd()
    with pytest.raises(aac_scene.AACScoreError, match="broken.mrb"):
        aac_scene.load_scene_mrb(broken)
    assert os.getcwd() == working_directory, "a failed load must not leave the process in a deleted folder"


# ----------------------------------------------------------------------------------------------- panel fixes


def test_heatmap_uses_slicers_own_inferno_colour_table_when_the_scene_has_it(scene, volume):
    slicers = slicer.vtkMRMLColorTableNode()
    slicers.SetName("Inferno")
    slicers.SetSingletonTag("FileInferno.txt")  # how Slicer's colour logic adds its colour files
    scene.AddNode(slicers)
    assert slicers.GetID() == aac_scene.SLICER_INFERNO_ID
    node = aac_scene.add_heatmap_volume(scene, volume, np.zeros((ROWS, COLS), np.float32))
    assert node.GetDisplayNode().GetColorNodeID() == aac_scene.SLICER_INFERNO_ID
    assert scene.GetFirstNodeByName(aac_scene.HEATMAP_COLOR_NAME) is None  # no copy of it made


def test_heatmap_opacity_changes_only_views_that_show_a_heatmap(scene, volume):
    heatmap = aac_scene.add_heatmap_volume(scene, volume, np.zeros((ROWS, COLS), np.float32))
    other = aac_scene.add_radiograph_volume(scene, _radiograph())  # e.g. another module's overlay
    red, green = (scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(2))
    red.SetForegroundVolumeID(heatmap.GetID())
    green.SetForegroundVolumeID(other.GetID())
    green.SetForegroundOpacity(0.9)
    assert aac_scene.set_heatmap_opacity(scene, 0.25) == 1
    assert red.GetForegroundOpacity() == pytest.approx(0.25) and green.GetForegroundOpacity() == pytest.approx(0.9)


def test_scratch_nodes_are_hidden_from_the_node_selectors(scene, volume):
    """Reading the segments adds a scratch label map: the panel's selectors must not list (and flicker) it."""
    segmentation = aac_scene.add_vertebra_segmentation(scene, volume, _labels())
    added = []
    tag = scene.AddObserver(scene.NodeAddedEvent, lambda caller, event: added.append(
        caller.GetNthNode(caller.GetNumberOfNodes() - 1)))
    try:
        aac_scene.read_vertebra_labels(segmentation, volume)
    finally:
        scene.RemoveObserver(tag)
    volumes = [node for node in added if node.IsA("vtkMRMLVolumeNode")]
    assert volumes and all(node.GetHideFromEditors() for node in volumes)


def test_worker_outputs_are_read_by_slicers_own_reader(scene, tmp_path):
    from AACScoreLib.worker.server import write_nrrd

    heat = np.linspace(0, 1, ROWS * COLS, dtype=np.float32).reshape(ROWS, COLS)
    write_nrrd(tmp_path / "h.nrrd", heat)
    before = scene.GetNumberOfNodes()
    np.testing.assert_array_equal(aac_scene.read_image_array(scene, tmp_path / "h.nrrd"), heat)
    assert scene.GetNumberOfNodes() == before
    with pytest.raises(AACScoreError, match="missing.nrrd"):
        aac_scene.read_image_array(scene, tmp_path / "missing.nrrd")


def test_a_results_table_of_an_older_scene_gets_the_qc_columns(scene):
    old = scene.AddNewNodeByClass("vtkMRMLTableNode", aac_scene.RESULTS_TABLE_NAME)
    old.SetAttribute(aac_scene.ROLE_ATTRIBUTE, "results")
    for column in ("file", "source", "aac24", "category", "status", "message", *SUBSCORE_COLUMNS):
        array = vtk.vtkDoubleArray() if column in aac_scene.NUMBER_COLUMNS else vtk.vtkStringArray()
        array.SetName(column)
        old.AddColumn(array)
    old.AddEmptyRow()
    old.GetTable().GetColumnByName("file").SetValue(0, "a.dcm")
    table = aac_scene.results_table(scene)
    assert table is old
    (row,) = aac_scene.result_rows(table)
    assert row["file"] == "a.dcm" and row["qc"] == "" and row["aac24_low"] is None
    aac_scene.upsert_result_row(table, {"file": "a.dcm", "qc": "review", "aac24_low": 3.5})
    assert aac_scene.result_rows(table)[0]["qc"] == "review"


def test_results_layout_is_the_red_slice_view_above_a_table_view():
    import xml.etree.ElementTree as ET

    views = [view.attrib for view in ET.fromstring(aac_scene.RESULTS_LAYOUT_XML).iter("view")]
    assert views == [{"class": "vtkMRMLSliceNode", "singletontag": "Red"},
                     {"class": "vtkMRMLTableViewNode", "singletontag": "TableView1"}]
    assert aac_scene.RESULTS_LAYOUT_ID > 1000  # clear of Slicer's own layout numbers

"""The Slicer module's logic (workflow.py) against slicer-core's real scene: segment, edit, score, table, heatmap,
boundary lines, raters and agreement, batch with cancel, worker-thread jobs, and the .mrb round trip.

The real Pipeline runs with a real (tiny, untrained) scorer package; the nnU-Net segmenter is stood in for by
label maps. Most tests use `_LabelPipeline` instead: it has the pipeline's interface (`run`, `segmenter.segment`)
and computes its AAC-24 from the label map it is given, so a test can tell exactly which vertebrae were scored,
and it can be slowed down or counted. Everything scene-side (segmentations, table, heatmap, markups, subject
hierarchy, .mrb) is the real thing.
"""

from __future__ import annotations

import csv
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest
from mrml_testing import paint_segment
import slicer
import slicer.util

from AACScoreLib.geometry import spine as geometry
from AACScoreLib import kauppila
from AACScoreLib.evaluation import metrics
from AACScoreLib.slicer import scene as aac_scene
from AACScoreLib.errors import AACScoreError, Cancelled, GeometryError, RadiographError
from AACScoreLib.kauppila import SUBSCORE_COLUMNS, VERTEBRAE
from AACScoreLib.pipeline import AACResult, Pipeline
from AACScoreLib.io.radiograph import Radiograph
from AACScoreLib.slicer.workflow import (Job, JobPoller, Workflow, capture_volume, find_heatmap, is_flagged,
                                         qc_text, SegmentedLabels, radiograph_from_volume, radiograph_key,
                                         radiograph_volumes)

ROWS, COLS = 200, 160
SPACING = (0.5, 0.4)


def _labels(shift: int = 0) -> np.ndarray:
    """L1..L5 as stacked boxes with a slight lordotic curve, anterior on the left."""
    labels = np.zeros((ROWS, COLS), np.uint8)
    for k in range(5):
        top, offset = 20 + 34 * k, int(round(3 * np.sin(np.pi * k / 4)))
        labels[top:top + 26, 60 - offset + shift:100 - offset + shift] = k + 1
    return labels


def _radiograph(name: str = "lateral_01", shift: int = 0) -> Radiograph:
    pixels = (_labels(shift) > 0).astype(np.float32) * 800 + np.linspace(0, 50, COLS, dtype=np.float32)
    return Radiograph(pixels=pixels, spacing=SPACING, spacing_source="PixelSpacing",
                      path=f"/nonexistent/cohort/{name}.dcm", format="DICOM")


def _score_of(labels: np.ndarray) -> float:
    """The stand-in model's AAC-24: L1's area in hundreds of pixels (1040 px -> 10.4), so edits show."""
    return float(min(24.0, np.count_nonzero(labels == 1) / 100.0))


@dataclass
class _Segmentation:
    labels: np.ndarray
    status: str = "ok"
    message: str = ""


class _Segmenter:
    def __init__(self):
        self.calls = 0

    def segment(self, radiograph, progress=None, cancel=None):
        self.calls += 1
        shift = int(radiograph.pixels[0, -1] > 1000)  # a marker pixel moves the spine (a different "prediction")
        return _Segmentation(_labels(shift))


class _FixedSegmenter:
    def __init__(self, labels):
        self.labels = labels

    def segment(self, radiograph, progress=None, cancel=None):
        return _Segmentation(self.labels)


class _LabelPipeline:
    """Pipeline-like: the real geometry on the given (or 'segmented') labels, a score computed from them."""

    def __init__(self, delay: float = 0.0):
        self.segmenter = _Segmenter()
        self.delay = delay
        self.runs = 0
        self.threads: set = set()

    def run(self, source, labels=None, *, anterior=None, heatmap=True, progress=None, cancel=None):
        self.runs += 1
        self.threads.add(threading.current_thread())
        result = AACResult(file=source.path, status="ok", radiograph=source)
        if labels is None:
            labels, result.labels_source = self.segmenter.segment(source).labels, "segmenter"
        else:
            result.labels_source = "user"
        result.labels = labels
        for step in range(5):
            if progress is not None:
                progress(step / 5, "working")
            if cancel is not None and cancel():
                raise Cancelled("cancelled by the user")
            time.sleep(self.delay / 5)
        result.geometry = geometry.analyze_spine(labels, source.spacing, anterior="left")
        result.aac24 = _score_of(labels)
        result.category = kauppila.category(result.aac24)
        result.subscores = {column: min(3.0, result.aac24 / 8) for column in SUBSCORE_COLUMNS}
        if heatmap:
            result.heatmap = (labels == 1).astype(np.float32) * 0.75
        return result


@pytest.fixture
def scene():
    return aac_scene.new_scene()


@pytest.fixture
def pipeline():
    return _LabelPipeline()


@pytest.fixture
def workflow(scene, pipeline):
    return Workflow(scene, pipeline)


@pytest.fixture
def volume(scene):
    return aac_scene.add_radiograph_volume(scene, _radiograph())


def _edit_segment(segmentation_node, name, mask, volume_node):
    segment_id = segmentation_node.GetSegmentation().GetSegmentIdBySegmentName(name)
    paint_segment(segmentation_node, segment_id, mask, volume_node)


def _model_rows(workflow):
    return aac_scene.result_rows(workflow.results_table(), aac_scene.MODEL_SOURCE)


# ----------------------------------------------------------------------------------------------- volume -> radiograph


def test_radiograph_from_volume_keeps_pixels_spacing_and_file(scene, volume):
    radiograph = radiograph_from_volume(volume)
    np.testing.assert_array_equal(radiograph.pixels, _radiograph().pixels)
    assert radiograph.spacing == pytest.approx(SPACING)
    assert radiograph.path == "/nonexistent/cohort/lateral_01.dcm" == radiograph_key(volume)
    radiograph.pixels[0, 0] = -1  # a copy: the worker thread never writes into the scene
    assert slicer.util.arrayFromVolume(volume)[0, 0, 0] != -1


def test_radiograph_from_a_volume_slicer_loaded_itself(scene, tmp_path):
    """A PNG opened by Slicer: 1 x 1 mm spacing and no AACScore attributes means spacing unknown."""
    plain = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "scan")
    slicer.util.updateVolumeFromArray(plain, np.ones((1, 30, 20), np.int16))
    radiograph = radiograph_from_volume(plain)
    assert radiograph.spacing is None and radiograph.pixels.shape == (30, 20) and radiograph.path == "scan"
    plain.SetSpacing(0.14, 0.15, 1.0)
    assert radiograph_from_volume(plain).spacing == pytest.approx((0.15, 0.14))
    ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    slicer.util.updateVolumeFromArray(ct, np.zeros((4, 10, 10), np.int16))
    with pytest.raises(RadiographError, match="ct.*not a single 2D radiograph"):
        radiograph_from_volume(ct)
    colour = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "photo")  # an RGB PNG: channels averaged
    slicer.util.updateVolumeFromArray(colour, np.dstack([np.full((30, 20), v, np.uint8) for v in (30, 60, 90)])[None])
    assert radiograph_from_volume(colour).pixels == pytest.approx(np.full((30, 20), 60.0))


def test_radiograph_from_volume_rereads_its_source_file(scene, tmp_path):
    """When the file is there, the module scores what `aacscore score` would: the reader's own result."""
    from PIL import Image

    path = tmp_path / "xray.png"
    Image.fromarray((np.arange(80 * 70).reshape(80, 70) % 256).astype(np.uint8)).save(path)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "xray")
    slicer.util.updateVolumeFromArray(volume, np.zeros((1, 80, 70), np.uint8))
    volume.SetAttribute(aac_scene.SOURCE_PATH_ATTRIBUTE, str(path))
    radiograph = radiograph_from_volume(volume)
    assert radiograph.format == "PNG" and radiograph.pixels[79, 69] == (80 * 70 - 1) % 256
    assert radiograph.path == str(path)

    Image.fromarray(np.zeros((90, 70), np.uint8)).save(path)  # the file changed after loading
    assert radiograph_from_volume(volume).format == "volume"  # one image: the volume's own voxels
    with pytest.raises(RadiographError, match=r"xray.*cannot be read again.*70x90 pixels, the volume 70x80"):
        capture_volume(volume, copy_voxels=False).load()  # a batch copies no voxels when there is a file


def test_batch_goes_on_past_a_radiograph_whose_file_changed(scene, workflow, tmp_path):
    from PIL import Image

    volumes = _volumes(scene, 2)
    path = tmp_path / "case_0.png"
    Image.fromarray(np.zeros((ROWS, COLS), np.uint8)).save(path)
    volumes[0].SetAttribute(aac_scene.SOURCE_PATH_ATTRIBUTE, str(path))
    requests, _ = workflow.prepare_batch(volumes)
    assert requests[0].image.voxels is None and requests[1].image.voxels is not None  # no file: voxels copied
    Image.fromarray(np.zeros((ROWS + 1, COLS), np.uint8)).save(path)
    job = Job(workflow.batch_work(requests)).run_here()
    outcomes = [workflow.apply_score(request, result) for request, result in job.take()]
    assert [outcome.result.status for outcome in outcomes] == ["error", "ok"]
    assert "cannot be read again" in _model_rows(workflow)[0]["message"]


# ----------------------------------------------------------------------------------------------- segmentation


def test_segment_makes_named_coded_vertebrae_beside_the_radiograph(scene, workflow, volume):
    outcome = workflow.segment(volume)
    assert outcome.status == "created"
    node = outcome.segmentation
    assert node.GetName() == "lateral_01 vertebrae"
    segmentation = node.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(5)] == list(VERTEBRAE)
    assert "L1 vertebra" in segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("L1")).GetTerminology()
    np.testing.assert_array_equal(aac_scene.read_vertebra_labels(node, volume), _labels())
    sh = scene.GetSubjectHierarchyNode()
    assert sh.GetItemParent(sh.GetItemByDataNode(node)) == sh.GetItemParent(sh.GetItemByDataNode(volume))
    # segmenting again with nothing edited updates the same node
    assert workflow.segment(volume).status == "updated"
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1


def test_a_segmenter_with_context_classes_adds_hidden_t12_and_s1_segments(scene, workflow, volume):
    labels = _labels()
    context = np.zeros_like(labels)
    context[: int(np.argmax((labels == 1).any(axis=1))) - 1, 10:20] = 6
    request = workflow.prepare_segment(volume)
    node = workflow.apply_segment(request, SegmentedLabels(labels, "ok", "", context)).segmentation
    segmentation = node.GetSegmentation()
    t12 = segmentation.GetSegmentIdBySegmentName("T12")
    assert t12 and aac_scene.context_segment_ids(node) == [t12] and not segmentation.GetSegmentIdBySegmentName("S1")
    assert not node.GetDisplayNode().GetSegmentVisibility(t12)
    np.testing.assert_array_equal(aac_scene.read_vertebra_labels(node, volume), labels)
    outcome = workflow.apply_segment(workflow.prepare_segment(volume), SegmentedLabels(labels, "ok", ""))
    assert outcome.status == "updated" and aac_scene.context_segment_ids(node) == []


def test_edited_segmentation_is_kept_unless_overwrite(scene, workflow, pipeline, volume):
    node = workflow.segment(volume).segmentation
    smaller = _labels() == 1
    smaller[20:33] = False  # the person trims L1's upper half
    _edit_segment(node, "L1", smaller, volume)
    calls = pipeline.segmenter.calls

    outcome = workflow.segment(volume)
    assert outcome.status == "edited" and "edits" in outcome.message and outcome.segmentation is node
    assert pipeline.segmenter.calls == calls  # not even computed
    assert np.array_equal(aac_scene.read_vertebra_labels(node, volume) == 1, smaller)

    # edited while the segmenter ran: apply refuses too
    request = workflow.prepare_segment(volume)
    assert request.edited
    assert workflow.apply_segment(request, workflow.compute_segment(request)).status == "edited"

    outcome = workflow.segment(volume, overwrite=True)
    assert outcome.status == "updated" and outcome.segmentation is node
    np.testing.assert_array_equal(aac_scene.read_vertebra_labels(node, volume), _labels())
    assert not aac_scene.segmentation_was_edited(node)


def test_empty_segmentation_result_is_an_error(scene, workflow, volume):
    request = workflow.prepare_segment(volume)
    with pytest.raises(AACScoreError, match="no vertebrae found.*check the image"):
        workflow.apply_segment(request, _Segmentation(np.zeros((ROWS, COLS), np.uint8), "error", "check the image"))
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


# ----------------------------------------------------------------------------------------------- scoring


def test_score_writes_row_heatmap_and_boundary_lines(scene, workflow, volume):
    outcome = workflow.score(volume)  # no segmentation yet: the pipeline segments and the result keeps it
    assert outcome.result.aac24 == pytest.approx(10.4)
    rows = _model_rows(workflow)
    assert len(rows) == 1
    row = rows[0]
    assert row["file"] == "/nonexistent/cohort/lateral_01.dcm" and row["source"] == "model"
    assert row["aac24"] == pytest.approx(10.4) and row["category"] == "moderate" and row["status"] == "ok"
    assert row["L1A"] == pytest.approx(1.3)
    assert outcome.segmentation is aac_scene.find_vertebra_segmentation(scene, volume)

    heat = outcome.heatmap
    assert heat.GetName() == "lateral_01 heatmap"
    np.testing.assert_allclose(slicer.util.arrayFromVolume(heat)[0], (_labels() == 1) * 0.75)
    assert heat.GetNodeReference(aac_scene.RADIOGRAPH_ROLE) is volume
    assert find_heatmap(scene, volume) is heat
    assert find_heatmap(scene, aac_scene.add_radiograph_volume(scene, _radiograph("other"))) is None

    lines = outcome.boundary_lines
    assert [line.GetName() for line in lines] == [f"lateral_01 {name}" for name in aac_scene.BOUNDARY_NAMES]
    assert scene.GetNumberOfNodesByClass("vtkMRMLMarkupsLineNode") == 5
    assert all(line.GetNumberOfControlPoints() == 2 and line.GetLocked() for line in lines)


def test_score_uses_the_edited_segments_by_name_and_updates_the_row(scene, workflow, pipeline, volume):
    workflow.score(volume)
    node = aac_scene.find_vertebra_segmentation(scene, volume)
    segmentation = node.GetSegmentation()
    trimmed = _labels() == 1
    trimmed[20:30] = False  # L1 loses 10 of its 26 rows: 640 px -> 6.4
    _edit_segment(node, "L1", trimmed, volume)
    segmentation.SetSegmentIndex(segmentation.GetSegmentIdBySegmentName("L5"), 0)  # order does not matter
    segmentation.AddEmptySegment("", "Aorta")  # nor other segments
    calls = pipeline.segmenter.calls

    outcome = workflow.score(volume)
    assert pipeline.segmenter.calls == calls  # the segments as they are now, not a new segmentation
    assert outcome.result.aac24 == pytest.approx(6.4) and outcome.result.labels_source == "user"
    rows = _model_rows(workflow)
    assert len(rows) == 1 and rows[0]["aac24"] == pytest.approx(6.4)  # updated, not duplicated
    assert scene.GetNumberOfNodesByClass("vtkMRMLMarkupsLineNode") == 5  # lines replaced, not added
    assert len([n for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                if n.GetAttribute(aac_scene.ROLE_ATTRIBUTE) == "heatmap"]) == 1


def test_a_missing_vertebra_segment_is_named(scene, workflow, volume):
    node = workflow.segment(volume).segmentation
    segmentation = node.GetSegmentation()
    segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("L3")).SetName("L3 old")
    with pytest.raises(GeometryError, match="no segment named 'L3'"):
        workflow.score(volume)


def test_a_chosen_segmentation_node_is_scored(scene, workflow, volume):
    """A person's own segmentation (not made by AACScore), chosen in the panel, is read by segment name."""
    own = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my vertebrae")
    own.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    labels = _labels()
    labels[20:25][labels[20:25] == 1] = 0  # 840 px of L1
    for k, name in enumerate(VERTEBRAE, start=1):
        own.GetSegmentation().AddEmptySegment("", name)
        _edit_segment(own, name, labels == k, volume)
    outcome = workflow.score(volume, own)
    assert outcome.result.aac24 == pytest.approx(8.4) and outcome.segmentation is own
    assert aac_scene.find_vertebra_segmentation(scene, volume) is None  # no second segmentation made


def test_the_real_pipeline_scores_the_segments_as_edited(scene, volume, tiny_scorer):
    workflow = Workflow(scene, Pipeline(tiny_scorer, _Segmenter()))
    node = workflow.segment(volume).segmentation
    first = workflow.score(volume)
    result = first.result
    assert result.status in ("ok", "warning"), result.message
    assert 0.0 <= result.aac24 <= 24.0 and set(result.subscores) == set(SUBSCORE_COLUMNS)
    assert result.category == kauppila.category(result.aac24) and result.labels_source == "user"
    heat = slicer.util.arrayFromVolume(first.heatmap)[0]
    assert heat.shape == (ROWS, COLS) and heat.min() >= 0.0 and heat.max() <= 1.0
    assert len(first.boundary_lines) == 5

    trimmed = _labels() == 1
    trimmed[20:30] = False
    _edit_segment(node, "L1", trimmed, volume)
    second = workflow.score(volume)
    np.testing.assert_array_equal(second.result.labels == 1, trimmed)  # what the pipeline scored: the edit
    (row,) = _model_rows(workflow)
    assert row["aac24"] == pytest.approx(round(second.result.aac24, 3))
    assert row["L4P"] == pytest.approx(round(second.result.subscores["L4P"], 3))


# ----------------------------------------------------------------------------------------------- raters and agreement


def _three_scored(scene, workflow):
    volumes = []
    for index, trim in enumerate((0, 8, 16)):
        volume = aac_scene.add_radiograph_volume(scene, _radiograph(f"case_{index}"))
        labels = _labels()
        labels[20:20 + trim][labels[20:20 + trim] == 1] = 0
        aac_scene.add_vertebra_segmentation(scene, volume, labels)
        workflow.score(volume)
        volumes.append(volume)
    return volumes  # model scores 10.4, 7.2, 4.0


def test_rater_rows_sit_beside_the_model_rows_and_agreement_is_computed(scene, workflow):
    volumes = _three_scored(scene, workflow)
    ratings = {"Ann": [(2, 1, 1, 1, 1, 1, 2, 1), (1, 1, 1, 1, 1, 1, 1, 0), (1, 1, 0, 1, 0, 1, 0, 0)],
               "Bob": [(3, 1, 1, 1, 1, 1, 1, 1), (1, 1, 1, 1, 1, 1, 1, 1), (1, 0, 0, 0, 0, 0, 0, 0)]}
    for rater, per_case in ratings.items():
        for volume, subscores in zip(volumes, per_case):
            workflow.save_rating(volume, rater, dict(zip(SUBSCORE_COLUMNS, subscores)))
    workflow.save_rating(volumes[2], "Bob", dict(zip(SUBSCORE_COLUMNS, (1, 1, 0, 0, 0, 0, 0, 0))))  # re-rated

    table = workflow.results_table()
    assert table.GetNumberOfRows() == 9  # 3 model + 3 Ann + 3 Bob: a new rating replaces the old one
    bob = workflow.rating(volumes[2], "Bob")
    assert bob["aac24"] == 2 and bob["category"] == "no/mild" and bob["L1P"] == 1 and bob["L2A"] == 0
    assert workflow.sources() == ["model", "Ann", "Bob"]

    found = {(a.first, a.second): a for a in workflow.agreement()}
    assert set(found) == {("model", "Ann"), ("model", "Bob"), ("Ann", "Bob")}
    model, ann, bob = [10.4, 7.2, 4.0], [10, 7, 4], [10, 8, 2]
    for (first, second), (x, y) in {("model", "Ann"): (model, ann), ("model", "Bob"): (model, bob),
                                    ("Ann", "Bob"): (ann, bob)}.items():
        expected = metrics.agreement(x, y)
        agreement = found[(first, second)]
        assert agreement.n == 3
        assert agreement.statistics["icc_2_1"] == pytest.approx(expected["icc_2_1"])
        assert agreement.statistics["kappa_linear"] == pytest.approx(expected["kappa_linear"])
        assert agreement.statistics["kappa_quadratic"] == pytest.approx(expected["kappa_quadratic"])
    assert "ICC(2,1)" in found[("Ann", "Bob")].text() and "kappa" in found[("Ann", "Bob")].text()


def test_agreement_with_too_few_shared_cases_says_so(scene, workflow):
    volumes = _three_scored(scene, workflow)
    workflow.save_rating(volumes[0], "Ann", dict.fromkeys(SUBSCORE_COLUMNS, 1))
    (only,) = workflow.agreement()
    assert only.statistics is None and only.n == 1 and "at least 2" in only.text()


@pytest.mark.parametrize("rater, subscores, problem", [
    ("", dict.fromkeys(SUBSCORE_COLUMNS, 1), "rater's name"),
    ("model", dict.fromkeys(SUBSCORE_COLUMNS, 1), "reserved"),
    ("Ann", dict.fromkeys(SUBSCORE_COLUMNS[:7], 1), "lacks L4P"),
    ("Ann", {**dict.fromkeys(SUBSCORE_COLUMNS, 1), "L2P": 4}, "0, 1, 2 or 3"),
])
def test_bad_ratings_are_refused_and_nothing_is_written(scene, workflow, volume, rater, subscores, problem):
    with pytest.raises(AACScoreError, match=problem):
        workflow.save_rating(volume, rater, subscores)
    assert workflow.results_table().GetNumberOfRows() == 0


# ----------------------------------------------------------------------------------------------- batch and jobs


def _volumes(scene, count):
    return [aac_scene.add_radiograph_volume(scene, _radiograph(f"case_{index}")) for index in range(count)]


def test_batch_scores_every_volume_and_a_broken_one_gets_an_error_row(scene, workflow):
    volumes = _volumes(scene, 3)
    broken = workflow.segment(volumes[1]).segmentation
    broken.GetSegmentation().RemoveSegment(broken.GetSegmentation().GetSegmentIdBySegmentName("L4"))
    seen = []
    batch = workflow.score_volumes(volumes, progress=lambda fraction, text: seen.append(fraction))
    assert not batch.cancelled and batch.total == 3 and len(batch.outcomes) == 3
    assert batch.message == "3 of 3 radiographs scored, 1 with errors"
    rows = {row["file"]: row for row in _model_rows(workflow)}
    assert rows["/nonexistent/cohort/case_1.dcm"]["status"] == "error"
    assert "no segment named 'L4'" in rows["/nonexistent/cohort/case_1.dcm"]["message"]
    assert rows["/nonexistent/cohort/case_2.dcm"]["aac24"] == pytest.approx(10.4)
    assert seen == sorted(seen) and seen[-1] == 1.0


def test_radiograph_volumes_leave_out_heatmaps_label_maps_and_3d_volumes(scene, workflow):
    volumes = _volumes(scene, 2)
    workflow.score(volumes[0])
    ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    slicer.util.updateVolumeFromArray(ct, np.zeros((4, 10, 10), np.int16))
    label_map = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    slicer.util.updateVolumeFromArray(label_map, np.zeros((1, 10, 10), np.uint8))
    scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    assert radiograph_volumes(scene) == volumes


def test_batch_cancel_stops_early_and_keeps_what_is_done(scene, workflow, pipeline):
    volumes = _volumes(scene, 4)
    cancel_after_first = lambda: pipeline.runs >= 2  # noqa: E731 - asked while the second image runs
    batch = workflow.score_volumes(volumes, cancel=cancel_after_first)
    assert batch.cancelled and len(batch.outcomes) == 1 and batch.total == 4
    assert batch.message.startswith("Cancelled: 1 of 4")
    assert [row["file"] for row in _model_rows(workflow)] == ["/nonexistent/cohort/case_0.dcm"]
    assert pipeline.runs == 2  # the third and fourth never started


def test_job_on_a_worker_thread_delivers_results_for_the_main_thread_to_apply(scene):
    """The widget's flow: prepare here, compute on a thread, poll (a QTimer in Slicer), apply here, cancel."""
    pipeline = _LabelPipeline(delay=0.1)
    workflow = Workflow(scene, pipeline)
    volumes = _volumes(scene, 5)
    requests, problems = workflow.prepare_batch(volumes)
    assert not problems
    job = Job(workflow.batch_work(requests)).start()
    applied, deadline = [], time.monotonic() + 20

    while time.monotonic() < deadline:
        fraction, text, items, done = job.poll()
        assert 0.0 <= fraction <= 1.0
        for request, result in items:
            assert threading.current_thread() is threading.main_thread()
            applied.append(workflow.apply_score(request, result))
            if len(applied) == 2:
                job.cancel()
        if done:
            break
        time.sleep(0.01)
    assert job.done and job.cancelled and job.error is None
    assert pipeline.threads and threading.main_thread() not in pipeline.threads  # the models ran off the UI thread
    assert 2 <= len(applied) < 5
    assert len(_model_rows(workflow)) == len(applied)


def test_a_cancel_that_a_model_reports_in_its_own_way_ends_as_cancelled():
    class _ModelStopped(AACScoreError):  # e.g. the segmenter's own "cancelled" error
        pass

    def work(job):
        job.cancel()
        raise _ModelStopped("segmentation cancelled")

    job = Job(work).start()
    assert job.wait(5) and job.cancelled and job.error is None


def test_job_hands_an_unexpected_error_to_the_main_thread():
    def work(job):
        job.report(0.5, "half way")
        raise RuntimeError("disk full")

    job = Job(work).start()
    assert job.wait(5)
    fraction, text, items, done = job.poll()
    assert done and (fraction, text) == (0.5, "half way") and items == []
    assert isinstance(job.error, RuntimeError) and not job.cancelled


# ----------------------------------------------------------------------------------------------- files


def test_a_demo_radiograph_from_its_dicom_file_through_segment_score_and_mrb(scene, tmp_path, tiny_scorer):
    """The flow of the in-Slicer self-test on a shipped demo radiograph (its label map stands in for the model)."""
    from PIL import Image

    from AACScoreLib.io.radiograph import read_radiograph
    from AACScoreLib.slicer.sample_data import SAMPLE_DATA_DIR, SAMPLE_SHA256

    path = SAMPLE_DATA_DIR / sorted(SAMPLE_SHA256)[0]
    labels = np.asarray(Image.open(path.with_name(path.stem + "_labels.png")))
    workflow = Workflow(scene, Pipeline(tiny_scorer, _FixedSegmenter(labels)))
    (volume,), problems = workflow.load_radiographs([path])
    assert not problems
    reread = radiograph_from_volume(volume)
    assert reread.format == "DICOM" and reread.spacing == read_radiograph(path).spacing  # the file, re-read

    assert workflow.segment(volume).status == "created"
    outcome = workflow.score(volume)
    assert outcome.result.status == "ok", outcome.result.message
    assert outcome.result.geometry.anterior_source != "default"  # the anterior side was found in the image
    (row,) = _model_rows(workflow)
    assert row["file"] == str(path) and row["aac24"] == pytest.approx(round(outcome.result.aac24, 3))
    assert slicer.util.arrayFromVolume(outcome.heatmap).shape == (1, *labels.shape)
    assert len(outcome.boundary_lines) == 5

    loaded = aac_scene.load_scene_mrb(aac_scene.save_scene_mrb(scene, tmp_path / "demo.mrb"))
    volume2 = loaded.GetFirstNodeByName(path.stem)
    np.testing.assert_array_equal(
        aac_scene.read_vertebra_labels(aac_scene.find_vertebra_segmentation(loaded, volume2), volume2), labels)
    assert aac_scene.result_rows(aac_scene.results_table(loaded)) == aac_scene.result_rows(workflow.results_table())


def test_load_radiographs_from_a_folder_reports_unreadable_files(scene, workflow, tmp_path):
    from PIL import Image

    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((80, 70), 100, np.uint8)).save(tmp_path / name)
    (tmp_path / "c.dcm").write_bytes(b"not a dicom file")
    volumes, problems = workflow.load_radiographs([tmp_path])
    assert [volume.GetName() for volume in volumes] == ["a", "b"]
    assert len(problems) == 1 and "c.dcm" in problems[0]
    assert slicer.util.arrayFromVolume(volumes[0]).shape == (1, 80, 70)


def test_export_csv_has_model_and_rater_rows(scene, workflow, volume, tmp_path):
    workflow.score(volume)
    workflow.save_rating(volume, "Ann", dict.fromkeys(SUBSCORE_COLUMNS, 1))
    path = workflow.export_csv(tmp_path / "results.csv")
    with open(path, newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [(row["source"], row["aac24"]) for row in rows] == [("model", "10.400"), ("Ann", "8.000")]


def test_mrb_round_trip_keeps_every_result_and_rescoring_updates_them(scene, workflow, volume, tmp_path):
    workflow.score(volume)
    workflow.save_rating(volume, "Ann", dict.fromkeys(SUBSCORE_COLUMNS, 2))
    path = aac_scene.save_scene_mrb(scene, tmp_path / "study.mrb")

    loaded = aac_scene.load_scene_mrb(path)
    volume2 = loaded.GetFirstNodeByName("lateral_01")
    assert radiograph_key(volume2) == "/nonexistent/cohort/lateral_01.dcm"
    segmentation2 = aac_scene.find_vertebra_segmentation(loaded, volume2)
    np.testing.assert_array_equal(aac_scene.read_vertebra_labels(segmentation2, volume2), _labels())
    heat = loaded.GetFirstNodeByName("lateral_01 heatmap")
    np.testing.assert_allclose(slicer.util.arrayFromVolume(heat)[0], (_labels() == 1) * 0.75)
    assert loaded.GetNumberOfNodesByClass("vtkMRMLMarkupsLineNode") == 5
    workflow2 = Workflow(loaded, _LabelPipeline())
    rows = aac_scene.result_rows(workflow2.results_table())
    assert [(row["source"], row["aac24"]) for row in rows] == [("model", pytest.approx(10.4)), ("Ann", 16.0)]

    radiograph = radiograph_from_volume(volume2)
    assert radiograph.spacing == pytest.approx(SPACING)
    workflow2.score(volume2)
    assert workflow2.results_table().GetNumberOfRows() == 2
    assert loaded.GetNumberOfNodesByClass("vtkMRMLMarkupsLineNode") == 5
    assert loaded.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1


def test_device_setting_is_checked(scene):
    workflow = Workflow(scene, _LabelPipeline())
    with pytest.raises(AACScoreError, match="unknown device 'gpu'"):
        workflow.configure(None, None, "gpu")
    workflow.configure("scorer-x", None, "cpu")  # a change drops the loaded pipeline; it reloads on next use
    assert workflow._pipeline is None


def test_add_to_training_set_stores_the_corrected_segments_and_the_raters_scores(scene, workflow, volume, tmp_path):
    from AACScoreLib.io.labelmaps import read_label_map
    from AACScoreLib.io.training_set import TrainingSet

    with pytest.raises(AACScoreError, match="no vertebra segmentation"):
        workflow.add_to_training_set(volume, tmp_path / "set")
    segmentation = workflow.segment(volume).segmentation
    corrected = _labels()
    corrected[20:30] = 0  # the user trims L1's top in the Segment Editor
    _edit_segment(segmentation, "L1", corrected == 1, volume)
    with pytest.raises(AACScoreError, match="Ann has not rated"):
        workflow.add_to_training_set(volume, tmp_path / "set", rater="Ann")
    case, counts = workflow.add_to_training_set(volume, tmp_path / "set")
    assert counts == {"cases": 1, "scored": 0}
    assert np.array_equal(read_label_map(case.labels), corrected)
    workflow.save_rating(volume, "Ann", dict(zip(SUBSCORE_COLUMNS, (1, 2, 0, 0, 3, 0, 1, 0))))
    case, counts = workflow.add_to_training_set(volume, tmp_path / "set", rater="Ann")
    assert counts == {"cases": 1, "scored": 1} and sum(case.scores.values()) == 7
    assert TrainingSet(tmp_path / "set").cases()[0].scores == case.scores
    assert case.context == ()
    context = np.zeros_like(corrected)
    context[4:19, 55:100] = 6  # a T12 segment above L1 (from a segmenter with context classes, or drawn)
    context[32:36, 55:100] = 6  # where it overlaps L1, L1 wins
    aac_scene.write_context_segments(segmentation, volume, context)
    case, counts = workflow.add_to_training_set(volume, tmp_path / "set", rater="Ann")
    assert counts == {"cases": 1, "scored": 1} and case.context == ("T12",)
    assert np.array_equal(read_label_map(case.labels, context=True), np.where(corrected == 0, context, corrected))
    assert np.array_equal(read_label_map(case.labels), corrected)

# ----------------------------------------------------------------------------------------------- panel fixes


def test_a_segmentation_made_for_another_radiograph_is_refused(scene, workflow):
    first, second = _volumes(scene, 2)
    segmentation_of_first = workflow.segment(first).segmentation
    with pytest.raises(AACScoreError, match="'case_0 vertebrae' belongs to radiograph 'case_0', not to 'case_1'"):
        workflow.prepare_score(second, segmentation_of_first)
    assert workflow.score(second).result.aac24 == pytest.approx(10.4)  # its own segmentation is fine


def test_results_of_a_closed_scene_never_land_on_a_new_volume_with_the_same_id(scene, workflow, volume):
    request = workflow.prepare_score(volume)
    result = workflow.compute_score(request)
    scene.Clear(0)  # the person closed the scene while the job ran
    other = aac_scene.add_radiograph_volume(scene, _radiograph("another_patient"))
    assert other.GetID() == request.volume_id
    with pytest.raises(AACScoreError, match="removed from the scene meanwhile"):
        workflow.apply_score(request, result)
    assert aac_scene.results_table(scene).GetNumberOfRows() == 0 and find_heatmap(scene, other) is None


def test_job_poller_applies_every_item_even_when_one_fails_and_is_not_reentered():
    def work(job):
        for item in range(4):
            job.deliver(item)

    job = Job(work).start()
    assert job.wait(5)
    applied = []
    poller = None

    def apply(item):
        assert poller.poll() is False  # what a modal dialog's event loop would do: ignored while applying
        if item == 1:
            raise AACScoreError("case 1: cannot be placed")
        applied.append(item)

    poller = JobPoller(job, apply)
    assert poller.poll() is True
    assert applied == [0, 2, 3] and poller.problems == ["case 1: cannot be placed"]


def test_next_to_review_steps_through_flagged_results_in_table_order(scene, workflow):
    table = workflow.results_table()
    for file, qc, status in (("a", "ok", "ok"), ("b", "review", "ok"), ("c", "", "error"), ("d", "ok", "warning"),
                             ("e", "error", "error"), ("f", "", "ok")):
        aac_scene.upsert_result_row(table, {"file": file, "qc": qc, "status": status, "qc_reasons": f"why {file}",
                                            "aac24": 5.0, "aac24_low": 3.25, "aac24_high": 7.0})
    aac_scene.upsert_result_row(table, {"file": "b", "source": "Ann", "status": "ok"})  # raters are not stepped
    steps, current = [], None
    for _ in range(4):
        current = workflow.next_to_review(current)["file"]
        steps.append(current)
    assert steps == ["b", "c", "e", "b"]  # wraps round; "d" has QC ok, so its warning status does not count
    assert workflow.next_to_review("d")["file"] == "e"
    assert qc_text(workflow.rating("b", "model")) == ("review  [3.2–7.0]", "why b")
    assert qc_text(None) == ("", "") and not is_flagged({"qc": "ok", "status": "error"})
    assert Workflow(aac_scene.new_scene(), _LabelPipeline()).next_to_review() is None

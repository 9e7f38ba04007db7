"""Everything AACScore puts into an MRML scene: radiograph, vertebra segmentation, heatmap, results, boundary lines.

Every function takes the scene (or a node of it) as an argument and imports only `slicer` and `vtk`, never
`slicer.app`, Qt or CTK, so the same code runs inside 3D Slicer and against slicer-core's headless scene in
tests and scripts. Nodes made from a radiograph keep a node reference to its volume (role `RADIOGRAPH_ROLE`)
and say what they are in the attribute `AACScore.Role`, so re-scoring updates them instead of piling up copies,
and a saved scene (.mrb) still knows which heatmap and segmentation belong to which radiograph.

Segments are found by name ("L1".."L5"), never by ID or label value: both change when a person edits.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import slicer
import slicer.util
import vtk

from ..io.atomic import atomic_path, write_atomic
from ..errors import AACScoreError, GeometryError
from ..kauppila import CONTEXT_LABELS, SUBSCORE_COLUMNS, VERTEBRAE
from ..io.results_file import BASE_COLUMNS
from ..io.results_file import format_cell as _csv_value  # the cell format of results.csv
from ..io.terminology import TERMINOLOGY_FILE  # the L1–L5 terms, shared with the DICOM SEG

ROLE_ATTRIBUTE = "AACScore.Role"
RADIOGRAPH_ROLE = "AACScoreRadiograph"
LABELS_HASH_ATTRIBUTE = "AACScore.LabelsSHA256"
CONTEXT_TAG = "AACScore.Context"  # segment tag of the T12/S1 segments a segmenter with context classes wrote
SPACING_KNOWN_ATTRIBUTE = "AACScore.SpacingKnown"
SPACING_SOURCE_ATTRIBUTE = "AACScore.SpacingSource"
SOURCE_PATH_ATTRIBUTE = "AACScore.SourcePath"
PATIENT_ORIENTATION_ATTRIBUTE = "AACScore.PatientOrientation"  # DICOM style, e.g. "A\\F"

RESULTS_TABLE_NAME = "AACScore results"
MODEL_SOURCE = "model"
QC_COLUMNS: tuple[str, ...] = ("qc", "qc_reasons", "aac24_low", "aac24_high")
"""Quality control of a model result: verdict ok | review | error, its reasons and the score's interval."""
NUMBER_COLUMNS: tuple[str, ...] = ("aac24", "aac24_low", "aac24_high") + SUBSCORE_COLUMNS
TABLE_COLUMNS: tuple[str, ...] = ("file", "source") + BASE_COLUMNS[1:] + QC_COLUMNS + SUBSCORE_COLUMNS
"""One row per (file, source): source is "model" for AACScore's prediction, a rater's name for a person's score,
so model, first and second rater share columns and `aacscore evaluate` reads any one of them."""

BOUNDARY_NAMES: tuple[str, ...] = ("T12/L1", "L1/L2", "L2/L3", "L3/L4", "L4/L5")
BOUNDARY_COLOR = (0.0, 0.9, 0.9)

SLICER_INFERNO_ID = "vtkMRMLColorTableNodeFileInferno.txt"
"""Slicer's own Inferno colour table (Base/Logic/Resources/ColorFiles/Inferno.txt, in Slicer 5.6 to 5.12)."""
HEATMAP_COLOR_NAME = "AACScore Inferno"
HEATMAP_THRESHOLD = 1e-3
"""Heatmap values below this are transparent in the slice views, so an all-zero map shows the bare radiograph."""
# matplotlib's "inferno" at 9 evenly spaced points, the map of the overlay pictures (overlay.heat_colors);
# written out because matplotlib is not part of Slicer's Python.
_INFERNO_ANCHORS = np.array([
    (0.001, 0.0, 0.014), (0.129, 0.047, 0.291), (0.342, 0.062, 0.429), (0.541, 0.135, 0.415),
    (0.736, 0.216, 0.33), (0.894, 0.353, 0.194), (0.978, 0.558, 0.035), (0.975, 0.798, 0.206),
    (0.988, 0.998, 0.645),
])


# ----------------------------------------------------------------------------------------------- scene


def new_scene() -> "slicer.vtkMRMLScene":
    """A scene on which segmentations, colour tables and .mrb files work without the Slicer application.

    Inside Slicer use `slicer.mrmlScene` instead. The logics are kept on the scene object (they must live as
    long as it does) and `slicer.mrmlScene` is set because `slicer.util` helpers look there.
    """
    scene = slicer.vtkMRMLScene()
    application_logic = slicer.vtkSlicerApplicationLogic()
    application_logic.SetMRMLScene(scene)
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLApplicationLogic(application_logic)
    with _vtk_log_silenced():  # it looks for Slicer's colour files, which slicer-core does not ship
        colors.SetMRMLScene(scene)
    if scene.GetFirstNodeByName("Grey") is None:
        raise AACScoreError("slicer-core did not create its default colour tables; the scene is unusable")
    application_logic.SetColorLogic(colors)
    application_logic.SetModuleLogic("Colors", colors)
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()  # registers the segmentation converters
    segmentations.SetMRMLApplicationLogic(application_logic)
    segmentations.SetMRMLScene(scene)
    application_logic.SetModuleLogic("Segmentations", segmentations)
    scene._aacscore_logics = {"application": application_logic, "colors": colors, "segmentations": segmentations}
    slicer.mrmlScene = scene
    return scene


@contextlib.contextmanager
def _vtk_log_silenced() -> Iterator[None]:
    previous = vtk.vtkLogger.GetCurrentVerbosityCutoff()
    vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_OFF)
    try:
        yield
    finally:
        vtk.vtkLogger.SetStderrVerbosity(previous)


def _application_logic(scene, application_logic=None):
    if application_logic is not None:
        return application_logic
    logics = getattr(scene, "_aacscore_logics", None)
    if logics is None:
        raise AACScoreError("this scene was not made by new_scene(); pass Slicer's application logic "
                            "(slicer.app.applicationLogic())")
    return logics["application"]


def save_scene_mrb(scene, path: str | Path, application_logic=None) -> Path:
    """Save the whole scene as a Slicer data bundle (.mrb), atomically."""
    path = Path(path)
    logic = _application_logic(scene, application_logic)
    with tempfile.TemporaryDirectory(prefix="aacscore-mrb-") as folder:
        bundle = Path(folder) / path.stem
        bundle.mkdir()
        if not logic.SaveSceneToSlicerDataBundleDirectory(str(bundle)):
            raise AACScoreError(f"{path}: the scene could not be written as a data bundle")
        with atomic_path(path) as temporary:
            if not logic.Zip(str(temporary), str(bundle)):
                raise AACScoreError(f"{path}: the data bundle could not be zipped")
    return path


def load_scene_mrb(path: str | Path) -> "slicer.vtkMRMLScene":
    """A new scene (see `new_scene`) holding what the .mrb file at `path` holds."""
    path = Path(path)
    if not path.is_file():
        raise AACScoreError(f"{path}: scene file does not exist")
    scene = new_scene()
    working_directory = os.getcwd()
    try:
        with tempfile.TemporaryDirectory(prefix="aacscore-mrb-") as folder:
            if not _application_logic(scene).OpenSlicerDataBundle(str(path), folder):
                raise AACScoreError(f"{path}: not a readable Slicer data bundle (.mrb)")
    finally:
        os.chdir(working_directory)  # vtkArchive leaves the process in its (deleted) unzip folder on failure
    return scene


# ----------------------------------------------------------------------------------------------- volumes


def add_radiograph_volume(scene, radiograph, name: str | None = None) -> "slicer.vtkMRMLScalarVolumeNode":
    """The radiograph as a (1, H, W) volume with its physical spacing, grey display, row 0 at the top.

    The geometry is the one Slicer gives a 2D image it loads itself (IJK->RAS = diag(-col_mm, -row_mm, 1),
    origin 0): in the axial (Red) view row 0 is at the top and column 0 at the left. Unknown spacing becomes
    1 mm, and the attribute `AACScore.SpacingKnown` says "false" so lengths are not taken for millimetres.
    """
    pixels = np.asarray(radiograph.pixels, dtype=np.float32)
    if pixels.ndim != 2:
        raise ValueError(f"{radiograph.path}: expected a 2D image, got shape {pixels.shape}")
    row_mm, col_mm = radiograph.spacing if radiograph.spacing is not None else (1.0, 1.0)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or _file_stem(radiograph.path))
    volume.SetIJKToRASDirections(-1, 0, 0, 0, -1, 0, 0, 0, 1)
    volume.SetSpacing(col_mm, row_mm, 1.0)
    volume.SetOrigin(0.0, 0.0, 0.0)
    slicer.util.updateVolumeFromArray(volume, pixels[np.newaxis])
    volume.SetAttribute(SOURCE_PATH_ATTRIBUTE, str(radiograph.path))
    volume.SetAttribute(SPACING_KNOWN_ATTRIBUTE, "true" if radiograph.spacing is not None else "false")
    volume.SetAttribute(SPACING_SOURCE_ATTRIBUTE, str(getattr(radiograph, "spacing_source", "unknown")))
    if getattr(radiograph, "patient_orientation", None):  # tells the geometry where anterior is on a re-run
        volume.SetAttribute(PATIENT_ORIENTATION_ATTRIBUTE, "\\".join(radiograph.patient_orientation))
    volume.SetAttribute(ROLE_ATTRIBUTE, "radiograph")
    volume.CreateDefaultDisplayNodes()
    _subject_hierarchy_item(scene, volume)
    return volume


def add_heatmap_volume(scene, volume_node, heatmap: np.ndarray, name: str | None = None):
    """The Grad-CAM map (H, W, values 0..1) on the radiograph's grid, ready to show as the foreground layer.

    Shown with an inferno colour table over a fixed 0..1 window; values below `HEATMAP_THRESHOLD` are
    transparent, so an all-zero map (a valid Grad-CAM result for a low score) shows the radiograph unchanged.
    Scoring the same radiograph again updates its heatmap node instead of adding another.
    """
    values = np.asarray(heatmap, dtype=np.float32)
    _check_image_shape(volume_node, values, "heatmap")
    heat = _derived_node(scene, volume_node, "heatmap")
    if heat is None:
        heat = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or f"{volume_node.GetName()} heatmap")
        _mark_derived(heat, volume_node, "heatmap")
    _copy_geometry(volume_node, heat)
    slicer.util.updateVolumeFromArray(heat, values[np.newaxis])
    if heat.GetDisplayNode() is None:
        heat.CreateDefaultDisplayNodes()
    display = heat.GetDisplayNode()
    display.SetAndObserveColorNodeID(heatmap_color_node(scene).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.AutoThresholdOff()
    display.SetThreshold(HEATMAP_THRESHOLD, max(1.0, float(values.max(initial=0.0))))
    display.ApplyThresholdOn()
    display.SetInterpolate(True)
    _place_beside(scene, heat, volume_node)
    return heat


def heatmap_color_node(scene) -> "slicer.vtkMRMLColorTableNode":
    """Slicer's own Inferno colour table; where there is none (slicer-core ships no colour files), an equal one
    made once in the scene."""
    slicers = scene.GetNodeByID(SLICER_INFERNO_ID)
    if slicers is not None:
        return slicers
    node = scene.GetFirstNodeByName(HEATMAP_COLOR_NAME)
    if node is not None:
        return node
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", HEATMAP_COLOR_NAME)
    node.SetTypeToUser()
    count = 256
    node.SetNumberOfColors(count)
    positions = np.linspace(0.0, 1.0, len(_INFERNO_ANCHORS))
    for index, t in enumerate(np.linspace(0.0, 1.0, count)):
        rgb = [float(np.interp(t, positions, _INFERNO_ANCHORS[:, channel])) for channel in range(3)]
        node.SetColor(index, f"{t:.3f}", *rgb, 1.0)
    node.SetAttribute(ROLE_ATTRIBUTE, "heatmap colors")
    return node


def read_image_array(scene, path: str | Path) -> np.ndarray:
    """The 2D array in an image file Slicer reads (the worker's NRRD outputs), read by Slicer's own volume
    reader through a hidden scratch node, so Slicer's Python needs no NRRD package."""
    node = _hidden_node(scene, slicer.vtkMRMLScalarVolumeNode(), "AACScore temporary image")
    storage = _hidden_node(scene, slicer.vtkMRMLVolumeArchetypeStorageNode(), "AACScore temporary storage")
    try:
        storage.SetFileName(str(path))
        storage.SetSingleFile(True)
        if not storage.ReadData(node):
            raise AACScoreError(f"{path}: the worker's output could not be read")
        return np.array(slicer.util.arrayFromVolume(node)[0])
    finally:
        scene.RemoveNode(storage)
        scene.RemoveNode(node)


def set_heatmap_opacity(scene, opacity: float) -> int:
    """Set the foreground opacity of the slice views that show an AACScore heatmap, and only those (another
    module's foreground keeps its own); returns how many views changed."""
    changed = 0
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        foreground = scene.GetNodeByID(composite.GetForegroundVolumeID() or "")
        if foreground is not None and foreground.GetAttribute(ROLE_ATTRIBUTE) == "heatmap":
            composite.SetForegroundOpacity(float(opacity))
            changed += 1
    return changed


RESULTS_LAYOUT_ID = 8301
"""Slicer layout ID of the results view (a number no built-in layout uses)."""
RESULTS_LAYOUT_XML = """<layout type="vertical" split="true">
 <item splitSize="650">
  <view class="vtkMRMLSliceNode" singletontag="Red">
   <property name="orientation" action="default">Axial</property>
   <property name="viewlabel" action="default">R</property>
   <property name="viewcolor" action="default">#F34A33</property>
  </view>
 </item>
 <item splitSize="350">
  <view class="vtkMRMLTableViewNode" singletontag="TableView1">
   <property name="viewlabel" action="default">T</property>
  </view>
 </item>
</layout>"""
"""The radiograph in the Red slice view alone (no 3D view: a radiograph is 2D) above the results table."""


# ----------------------------------------------------------------------------------------------- segmentation


def vertebra_terminology() -> dict[str, dict]:
    """Per vertebra name: Slicer's serialized terminology entry and the recommended colour (0..1 RGB)."""
    context = json.loads(TERMINOLOGY_FILE.read_text())
    context_name = context["SegmentationCategoryTypeContextName"]
    category = context["SegmentationCodes"]["Category"][0]
    entries = {}
    for kind in category["Type"]:
        entry = slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(
            context_name,
            category["CodeValue"], category["CodingSchemeDesignator"], category["CodeMeaning"],
            kind["CodeValue"], kind["CodingSchemeDesignator"], kind["CodeMeaning"],
            "", "", "", "", "", "", "", "", "", "")
        color = tuple(value / 255.0 for value in kind["recommendedDisplayRGBValue"])
        entries[kind["3dSlicerLabel"]] = {"entry": entry, "color": color}
    missing = [name for name in VERTEBRAE if name not in entries]
    if missing:
        raise AACScoreError(f"{TERMINOLOGY_FILE}: no terminology type for {', '.join(missing)}")
    return entries


def add_vertebra_segmentation(scene, volume_node, labels: np.ndarray, name: str | None = None,
                              context: np.ndarray | None = None):
    """Segments "L1".."L5" from a label map (1..5 = L1..L5), named, coloured and coded with SNOMED CT terms.

    The segmentation takes the radiograph's geometry, sits beside it in the subject hierarchy, and remembers
    a hash of what the model wrote so that `segmentation_was_edited` can tell a person's edits apart.
    `context` (6 = T12, 7 = S1, from a segmenter with context classes) adds hidden segments "T12" and "S1":
    they show how the levels were counted and are never scored.
    """
    labels = _checked_labels(volume_node, labels)
    segmentation_node = scene.AddNewNodeByClass(
        "vtkMRMLSegmentationNode", name or f"{volume_node.GetName()} vertebrae")
    segmentation_node.CreateDefaultDisplayNodes()
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    _mark_derived(segmentation_node, volume_node, "vertebrae")
    _write_labels(segmentation_node, volume_node, labels)
    write_context_segments(segmentation_node, volume_node, context)
    _place_beside(scene, segmentation_node, volume_node)
    return segmentation_node


def update_vertebra_segmentation(segmentation_node, volume_node, labels: np.ndarray,
                                 overwrite_edits: bool = False, context: np.ndarray | None = None) -> None:
    """Replace the vertebrae (and the context segments) with a new label map; refuses when a person edited
    them, unless told to."""
    labels = _checked_labels(volume_node, labels)
    if not overwrite_edits and segmentation_was_edited(segmentation_node):
        raise AACScoreError(f"segmentation '{segmentation_node.GetName()}' was edited; "
                            "not overwriting it without confirmation")
    _write_labels(segmentation_node, volume_node, labels)
    write_context_segments(segmentation_node, volume_node, context)


def write_context_segments(segmentation_node, volume_node, context: np.ndarray | None) -> None:
    """Segments "T12" and "S1" from a context map (6 = T12, 7 = S1), hidden until `show_context_segments`;
    with None (a model without context classes) the context segments AACScore wrote before are removed."""
    segmentation = segmentation_node.GetSegmentation()
    for name in CONTEXT_LABELS:
        segment_id = segmentation.GetSegmentIdBySegmentName(name)
        if segment_id and segmentation.GetSegment(segment_id).HasTag(CONTEXT_TAG):
            segmentation.RemoveSegment(segment_id)
    if context is None:
        return
    context = np.asarray(context)
    _check_image_shape(volume_node, context, "context map")
    present = [name for name, value in CONTEXT_LABELS.items() if (context == value).any()]
    if not present:
        return
    terms = vertebra_terminology()
    segment_ids = vtk.vtkStringArray()
    for name in present:
        segment_id = _add_coded_segment(segmentation, "", name, terms[name])
        segmentation.GetSegment(segment_id).SetTag(CONTEXT_TAG, "1")
        segment_ids.InsertNextValue(segment_id)
    mapped = np.zeros(context.shape, np.uint8)
    for index, name in enumerate(present, 1):
        mapped[context == CONTEXT_LABELS[name]] = index
    _import_labels(segmentation_node, volume_node, mapped, segment_ids, "context map")
    show_context_segments(segmentation_node, False)


def context_segment_ids(segmentation_node) -> list[str]:
    """IDs of the T12/S1 context segments AACScore wrote (a person's own segments of those names excluded)."""
    segmentation = segmentation_node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    return [segment_id for segment_id in ids if segmentation.GetSegment(segment_id).HasTag(CONTEXT_TAG)]


def show_context_segments(segmentation_node, visible: bool) -> int:
    """Show or hide the T12/S1 context segments; returns how many there are."""
    segment_ids = context_segment_ids(segmentation_node)
    display = segmentation_node.GetDisplayNode()
    if display is None:
        segmentation_node.CreateDefaultDisplayNodes()
        display = segmentation_node.GetDisplayNode()
    for segment_id in segment_ids:
        display.SetSegmentVisibility(segment_id, bool(visible))
    return len(segment_ids)


def find_vertebra_segmentation(scene, volume_node):
    """The vertebra segmentation AACScore made for this radiograph volume, or None."""
    return _derived_node(scene, volume_node, "vertebrae")


def read_vertebra_labels(segmentation_node, volume_node) -> np.ndarray:
    """The segments named L1..L5 as a uint8 (H, W) label map 1..5 on the radiograph's grid.

    Segments are matched by name, so edits that change segment IDs, label values or order, and added
    segments with other names, do not matter. Where edited segments overlap, the lower vertebra wins.
    """
    segmentation = segmentation_node.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    problems = [f"no segment named '{vertebra}'" if names.count(vertebra) == 0
                else f"{names.count(vertebra)} segments named '{vertebra}'"
                for vertebra in VERTEBRAE if names.count(vertebra) != 1]
    if problems:
        raise GeometryError(f"segmentation '{segmentation_node.GetName()}' has {' and '.join(problems)} "
                            f"(segments: {', '.join(names) or 'none'})")
    return _export_named_segments(segmentation_node, volume_node, VERTEBRAE)


def read_context_labels(segmentation_node, volume_node) -> np.ndarray | None:
    """The segments named T12 and S1 (AACScore's or a person's) as a uint8 map 6 = T12, 7 = S1 on the
    radiograph's grid, for a training case; None when there is neither. A name used by two segments is refused."""
    segmentation = segmentation_node.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    doubled = [name for name in CONTEXT_LABELS if names.count(name) > 1]
    if doubled:
        raise GeometryError(f"segmentation '{segmentation_node.GetName()}' has {len(doubled)} name(s) used twice: "
                            f"{', '.join(doubled)}; keep one segment of each")
    present = [name for name in CONTEXT_LABELS if name in names]
    if not present:
        return None
    exported = _export_named_segments(segmentation_node, volume_node, present)
    context = np.zeros_like(exported)
    for index, name in enumerate(present, 1):
        context[exported == index] = CONTEXT_LABELS[name]
    return context


def _export_named_segments(segmentation_node, volume_node, names) -> np.ndarray:
    """The segments of these names as a uint8 label map on the radiograph's grid, the k-th name as label k."""
    segmentation = segmentation_node.GetSegmentation()
    segment_ids = vtk.vtkStringArray()
    for name in names:
        segment_ids.InsertNextValue(segmentation.GetSegmentIdBySegmentName(name))
    with _temporary_labelmap(segmentation_node.GetScene()) as labelmap:
        # the exported label of a segment is its position in segment_ids plus one
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node, segment_ids, labelmap, volume_node):
            raise GeometryError(f"segmentation '{segmentation_node.GetName()}' could not be exported "
                                f"onto '{volume_node.GetName()}'")
        return slicer.util.arrayFromVolume(labelmap)[0].astype(np.uint8)


def segmentation_was_edited(segmentation_node) -> bool:
    """True when the L1..L5 content differs from what AACScore wrote, or the segmentation is not AACScore's."""
    written = segmentation_node.GetAttribute(LABELS_HASH_ATTRIBUTE)
    volume_node = segmentation_node.GetNodeReference(RADIOGRAPH_ROLE)
    if not written or volume_node is None:
        return True
    try:
        labels = read_vertebra_labels(segmentation_node, volume_node)
    except GeometryError:  # a vertebra renamed, deleted or doubled
        return True
    return _labels_hash(labels) != written


def _checked_labels(volume_node, labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    _check_image_shape(volume_node, labels, "label map")
    if labels.size and (labels.min() < 0 or labels.max() > len(VERTEBRAE)):
        raise GeometryError(f"label map for '{volume_node.GetName()}' has values outside 0..{len(VERTEBRAE)}")
    return labels.astype(np.uint8)


def _write_labels(segmentation_node, volume_node, labels: np.ndarray) -> None:
    """Put label k into the segment named VERTEBRAE[k-1], creating the segments that do not exist (yet)."""
    segmentation = segmentation_node.GetSegmentation()
    terms = vertebra_terminology()
    segment_ids = vtk.vtkStringArray()
    for vertebra in VERTEBRAE:
        segment_id = segmentation.GetSegmentIdBySegmentName(vertebra)
        if not segment_id:
            segment_id = _add_coded_segment(segmentation, vertebra, vertebra, terms[vertebra])
        segment_ids.InsertNextValue(segment_id)
    _import_labels(segmentation_node, volume_node, labels, segment_ids, "label map")
    segmentation_node.SetAttribute(LABELS_HASH_ATTRIBUTE, _labels_hash(labels))


def _add_coded_segment(segmentation, segment_id: str, name: str, term: dict) -> str:
    """An empty segment with its name, colour and terminology entry fixed (not auto-generated); its ID."""
    segment_id = segmentation.AddEmptySegment(segment_id, name, term["color"])
    segment = segmentation.GetSegment(segment_id)
    segment.SetNameAutoGenerated(False)
    segment.SetColorAutoGenerated(False)
    segment.SetTag(segment.GetTerminologyEntryTagName(), term["entry"])
    return segment_id


def _import_labels(segmentation_node, volume_node, labels: np.ndarray, segment_ids, what: str) -> None:
    """Label value k of `labels` fills the k-th of `segment_ids`; a segment whose label is absent is emptied."""
    with _temporary_labelmap(segmentation_node.GetScene()) as labelmap:
        _copy_geometry(volume_node, labelmap)
        slicer.util.updateVolumeFromArray(labelmap, labels[np.newaxis])
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
                labelmap, segmentation_node, segment_ids):
            raise GeometryError(f"{what} could not be imported into '{segmentation_node.GetName()}'")


def _labels_hash(labels: np.ndarray) -> str:
    digest = hashlib.sha256(str(labels.shape).encode())
    digest.update(np.ascontiguousarray(labels, dtype=np.uint8).tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- results table


def results_table(scene, name: str = RESULTS_TABLE_NAME) -> "slicer.vtkMRMLTableNode":
    """The scene's AACScore results table (one row per radiograph and source), made on first use."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLTableNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLTableNode")
        if node.GetName() == name and node.GetAttribute(ROLE_ATTRIBUTE) == "results":
            _add_missing_columns(node)  # a scene saved by an older AACScore
            return node
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table.SetAttribute(ROLE_ATTRIBUTE, "results")
    for column in TABLE_COLUMNS:
        array = vtk.vtkDoubleArray() if column in NUMBER_COLUMNS else vtk.vtkStringArray()
        array.SetName(column)
        table.AddColumn(array)
    table.SetUseColumnTitleAsColumnHeader(True)
    table.SetLocked(True)  # rows are written by the module, not typed over by accident
    return table


def _add_missing_columns(table) -> None:
    data = table.GetTable()
    for column in TABLE_COLUMNS:
        if data.GetColumnByName(column) is None:
            array = vtk.vtkDoubleArray() if column in NUMBER_COLUMNS else vtk.vtkStringArray()
            array.SetName(column)
            array.SetNumberOfTuples(data.GetNumberOfRows())
            for row in range(data.GetNumberOfRows()):
                array.SetValue(row, math.nan if column in NUMBER_COLUMNS else "")
            data.AddColumn(array)
    table.Modified()


def upsert_result_row(table, record: Mapping[str, object]) -> int:
    """Write `record` into the row with the same file and source (default "model"); returns the row index.

    Scoring a radiograph again updates its row. Missing columns become blank (NaN in number columns);
    unknown keys raise, so a misspelt column cannot be dropped silently.
    """
    unknown = sorted(set(record) - set(TABLE_COLUMNS))
    if unknown:
        raise ValueError(f"unknown result columns: {', '.join(unknown)} (columns: {', '.join(TABLE_COLUMNS)})")
    if not record.get("file"):
        raise ValueError("a result row needs a 'file'")
    key = (str(record["file"]), str(record.get("source") or MODEL_SOURCE))
    values = {column: _number(column, record.get(column)) if column in NUMBER_COLUMNS
              else ("" if record.get(column) is None else str(record[column])) for column in TABLE_COLUMNS}
    values["source"] = key[1]  # converted before touching the table, so a bad value leaves the row as it was
    row = _find_row(table, key)
    if row < 0:
        row = table.AddEmptyRow()
    for column, value in values.items():
        table.GetTable().GetColumnByName(column).SetValue(row, value)
    table.GetTable().Modified()
    table.Modified()
    return row


def result_rows(table, source: str | None = None) -> list[dict[str, object]]:
    """The table's rows as dicts (numbers as float, blank as None), optionally of one source only."""
    data = table.GetTable()
    rows = []
    for row in range(data.GetNumberOfRows()):
        values: dict[str, object] = {}
        for column in TABLE_COLUMNS:
            value = data.GetColumnByName(column).GetValue(row)
            if column in NUMBER_COLUMNS:
                value = None if math.isnan(value) else float(value)
            values[column] = value
        if source is None or values["source"] == source:
            rows.append(values)
    return rows


def table_to_csv(table, path: str | Path, source: str | None = None) -> Path:
    """Write the results (all rows, or one source's) as CSV atomically; numbers with 3 decimals as results.csv."""
    rows = result_rows(table, source)

    def write(stream) -> None:
        writer = csv.DictWriter(stream, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({column: _csv_value(value) for column, value in row.items()})

    write_atomic(path, write)
    return Path(path)


def _find_row(table, key: tuple[str, str]) -> int:
    data = table.GetTable()
    files, sources = data.GetColumnByName("file"), data.GetColumnByName("source")
    for row in range(data.GetNumberOfRows()):
        if (files.GetValue(row), sources.GetValue(row) or MODEL_SOURCE) == key:
            return row
    return -1


def _number(column: str, value: object) -> float:
    if value is None or value == "":
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"result column {column}: {value!r} is not a number") from None


# ----------------------------------------------------------------------------------------------- boundary lines


def add_segment_boundary_lines(scene, geometry, volume_node) -> list:
    """Markups lines along the five disc mid-planes (T12/L1..L4/L5) that bound the Kauppila aortic segments.

    Each line runs along the disc mid-plane direction from the middle of the vertebral bodies to past the
    aortic band (0.75 mean AP length in front of the bodies, plus a margin). The lines are locked, sit in a
    subject hierarchy folder beside the radiograph, and replace the lines of an earlier run.
    """
    for node in _derived_nodes(scene, volume_node, "boundary"):
        _remove_node(scene, node)
    ap_length = float(np.mean([vertebra.ap_length_px for vertebra in geometry.vertebrae]))
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    folder = _boundary_folder(scene, volume_node)
    lines = []
    for name, point, direction in zip(BOUNDARY_NAMES, geometry.boundaries, geometry.boundary_directions):
        point, direction = np.asarray(point, float), np.asarray(direction, float)
        ends = (point - 0.5 * ap_length * direction, point + 1.5 * ap_length * direction)
        line = scene.AddNewNodeByClass("vtkMRMLMarkupsLineNode", f"{volume_node.GetName()} {name}")
        line.CreateDefaultDisplayNodes()
        for end in ends:
            line.AddControlPoint(_row_col_to_ras(ijk_to_ras, end))
        line.SetLocked(True)
        line.GetDisplayNode().SetSelectedColor(BOUNDARY_COLOR)
        line.GetDisplayNode().SetColor(BOUNDARY_COLOR)
        _mark_derived(line, volume_node, "boundary")
        if folder:
            sh = scene.GetSubjectHierarchyNode()
            sh.SetItemParent(_subject_hierarchy_item(scene, line), folder)
        lines.append(line)
    return lines


def _row_col_to_ras(ijk_to_ras, point: np.ndarray) -> tuple[float, float, float]:
    row, col = point
    ras = ijk_to_ras.MultiplyPoint((float(col), float(row), 0.0, 1.0))
    return ras[0], ras[1], ras[2]


def _boundary_folder(scene, volume_node) -> int:
    sh = scene.GetSubjectHierarchyNode()
    if sh is None:
        return 0
    parent = sh.GetItemParent(_subject_hierarchy_item(scene, volume_node))
    name = f"{volume_node.GetName()} segment boundaries"
    existing = sh.GetItemChildWithName(parent, name)
    return existing or sh.CreateFolderItem(parent, name)


# ----------------------------------------------------------------------------------------------- helpers


def _file_stem(path: str | Path) -> str:
    name = Path(str(path)).name
    for suffix in (".nii.gz", ".seg.nrrd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem or name


def _check_image_shape(volume_node, values: np.ndarray, what: str) -> None:
    expected = tuple(slicer.util.arrayFromVolume(volume_node).shape[1:])
    if values.shape != expected:
        raise GeometryError(f"{what} of shape {values.shape} does not match '{volume_node.GetName()}' "
                            f"of shape {expected}")


def _copy_geometry(source, target) -> None:
    matrix = vtk.vtkMatrix4x4()
    source.GetIJKToRASMatrix(matrix)
    target.SetIJKToRASMatrix(matrix)


def _mark_derived(node, volume_node, role: str) -> None:
    node.SetAttribute(ROLE_ATTRIBUTE, role)
    node.SetNodeReferenceID(RADIOGRAPH_ROLE, volume_node.GetID())


def _derived_nodes(scene, volume_node, role: str) -> list:
    nodes = []
    for index in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(index)
        if (node.GetAttribute(ROLE_ATTRIBUTE) == role
                and node.GetNodeReferenceID(RADIOGRAPH_ROLE) == volume_node.GetID()):
            nodes.append(node)
    return nodes


def _derived_node(scene, volume_node, role: str):
    nodes = _derived_nodes(scene, volume_node, role)
    return nodes[-1] if nodes else None


@contextlib.contextmanager
def _temporary_labelmap(scene) -> Iterator["slicer.vtkMRMLLabelMapVolumeNode"]:
    """A scratch label map node; it and whatever it brings along (display node, colour table) go afterwards."""
    before = {scene.GetNthNode(index).GetID() for index in range(scene.GetNumberOfNodes())}
    try:
        yield _hidden_node(scene, slicer.vtkMRMLLabelMapVolumeNode(), "AACScore temporary labels")
    finally:
        added = [scene.GetNthNode(index) for index in range(scene.GetNumberOfNodes())]
        for node in added:
            if node.GetID() not in before and node.GetScene() is not None:  # may have gone with its owner
                _remove_node(scene, node)


def _hidden_node(scene, node, name: str):
    """Add `node` hidden from the node selectors, so scratch nodes do not flicker through the panel's lists."""
    node.SetName(name)
    node.SetHideFromEditors(True)
    node.SetSaveWithScene(False)
    scene.AddNode(node)
    return node


def _remove_node(scene, node) -> None:
    """Remove a node and its subject hierarchy item (headless, nothing removes a stale item for us)."""
    sh = scene.GetSubjectHierarchyNode()
    item = sh.GetItemByDataNode(node) if sh is not None else 0
    if item:
        sh.RemoveItem(item, False, False)  # asked to remove the data node too, it leaves the item behind
    scene.RemoveNode(node)


def _subject_hierarchy_item(scene, node) -> int:
    """The node's subject hierarchy item, made under the scene when Slicer's plugins did not make one."""
    sh = scene.GetSubjectHierarchyNode()
    if sh is None:
        return 0
    item = sh.GetItemByDataNode(node)
    return item or sh.CreateItem(sh.GetSceneItemID(), node)


def _place_beside(scene, node, volume_node) -> None:
    """Put `node` under the same subject hierarchy parent (patient/study/folder) as the radiograph."""
    sh = scene.GetSubjectHierarchyNode()
    if sh is None:
        return
    parent = sh.GetItemParent(_subject_hierarchy_item(scene, volume_node))
    sh.SetItemParent(_subject_hierarchy_item(scene, node), parent)

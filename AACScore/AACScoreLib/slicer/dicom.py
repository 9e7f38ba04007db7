"""DICOM from the Slicer module: "Export DICOM" (SEG, SR and heatmap of a scored radiograph) and "Load DICOM SEG"
(a DICOM SEG of L1–L5, e.g. corrected elsewhere, as the radiograph's vertebra segmentation).

Both work on the scene as it is, so what is exported is what the person sees: the segments named L1..L5 as
they are now (a SEG of edited segments says MANUAL, of the model's untouched ones AUTOMATIC), the model's row of
the results table, and the heatmap volume. A loaded SEG counts as a person's segmentation: the segmenter never
overwrites it without confirmation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import slicer.util

from . import scene as aac_scene
from ..errors import AACScoreError
from ..io import dicom_results
from ..io.labelmaps import is_dicom_file, read_label_map
from .workflow import capture_volume, find_heatmap, radiograph_from_volume, radiograph_key


def export_dicom(workflow, volume_node, folder: str | Path) -> dict[str, Path]:
    """Write the SEG, SR and (when there is a heatmap) the heatmap Secondary Capture of a scored radiograph into
    `folder`; returns {"seg"|"sr"|"heatmap": path}. The radiograph must come from a DICOM file."""
    from ..io.overlay import render_overlay

    header = _dicom_header(volume_node)
    key = radiograph_key(volume_node)
    rows = [row for row in aac_scene.result_rows(workflow.results_table(), aac_scene.MODEL_SOURCE)
            if row["file"] == key and row["status"] != "error"]
    if not rows:
        raise AACScoreError(f"'{volume_node.GetName()}' has no score yet: score it before exporting DICOM")
    row = {**rows[0], "models": workflow.pipeline().models}
    segmentation = aac_scene.find_vertebra_segmentation(workflow.scene, volume_node)
    if segmentation is None:
        raise AACScoreError(f"'{volume_node.GetName()}' has no vertebra segmentation to export")
    labels = aac_scene.read_vertebra_labels(segmentation, volume_node)
    heatmap_node = find_heatmap(workflow.scene, volume_node)
    picture = None
    if heatmap_node is not None:
        radiograph = radiograph_from_volume(volume_node)
        title = f"{volume_node.GetName()}  AAC-24 {row['aac24']:.1f} ({row['category']})"
        picture = np.asarray(render_overlay(radiograph.pixels, slicer.util.arrayFromVolume(heatmap_node)[0], labels,
                                            None, title, row["category"]))
    results = dicom_results.make_results(header, row, labels, not aac_scene.segmentation_was_edited(segmentation),
                                         picture)
    return dicom_results.write_results(results, folder, Path(key).stem if Path(key).suffix else volume_node.GetName())


def load_dicom_seg(workflow, volume_node, path: str | Path, overwrite: bool = False):
    """A DICOM SEG of L1–L5 made on this radiograph as its vertebra segmentation (segments L1..L5, coded);
    refuses to replace a person's edits unless `overwrite`. Returns the segmentation node."""
    source = capture_volume(volume_node, copy_voxels=False).source
    source_uid = dicom_results.read_source_header(source).SOPInstanceUID if source and is_dicom_file(source) else None
    shape = tuple(slicer.util.arrayFromVolume(volume_node).shape[1:])
    labels = read_label_map(path, shape, source_uid=source_uid)
    existing = aac_scene.find_vertebra_segmentation(workflow.scene, volume_node)
    if existing is None:
        segmentation = aac_scene.add_vertebra_segmentation(workflow.scene, volume_node, labels)
    else:
        aac_scene.update_vertebra_segmentation(existing, volume_node, labels, overwrite_edits=overwrite)
        segmentation = existing
    segmentation.SetAttribute(aac_scene.LABELS_HASH_ATTRIBUTE, "")  # not the model's: counts as a person's edit
    return segmentation


def _dicom_header(volume_node):
    source = capture_volume(volume_node, copy_voxels=False).source
    if source is None:
        raise AACScoreError(f"'{volume_node.GetName()}' has no source file: "
                            "DICOM outputs must reference the DICOM image they describe")
    return dicom_results.read_source_header(source)

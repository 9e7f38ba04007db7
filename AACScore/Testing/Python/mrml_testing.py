"""Test helpers that do to a real slicer-core scene what a person does in Slicer."""

from __future__ import annotations

import numpy as np
import slicer
import vtk


def paint_segment(segmentation_node, segment_id: str, mask: np.ndarray, volume_node) -> None:
    """What the segment editor does when a person paints: replace one segment's binary labelmap."""
    scene = segmentation_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    labelmap.SetIJKToRASMatrix(matrix)
    slicer.util.updateVolumeFromArray(labelmap, mask.astype(np.uint8)[np.newaxis])
    image = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(labelmap)
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image, segmentation_node, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    scene.RemoveNode(labelmap)

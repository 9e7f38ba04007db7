"""Round trip: phantom -> DICOM file -> radiograph reader -> geometry, compared with the phantom's exact truth."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.path import Path as PolygonPath
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

from AACScoreLib import kauppila
from AACScoreLib.phantoms import generator as phantoms
from AACScoreLib.geometry.spine import analyze_spine
from AACScoreLib.io.radiograph import read_radiograph

# (style, index, transfer syntax, photometric, spacing tags, rescale, orientation written)
CASES = [
    ("default", 0, ExplicitVRLittleEndian, "MONOCHROME2", "PixelSpacing", None, True),
    ("default", 1, RLELossless, "MONOCHROME1", "ImagerPixelSpacing+EMF", (0.5, -1024.0), False),
    ("default", 2, JPEGLSLossless, "MONOCHROME2", "both", (2.0, 100.0), False),
    ("alt", 0, JPEG2000Lossless, "MONOCHROME1", "PixelSpacing", None, True),
    ("alt", 1, ExplicitVRLittleEndian, "MONOCHROME2", "ImagerPixelSpacing+EMF", None, False),
]


@pytest.mark.parametrize("style, index, syntax, photometric, spacing_tags, rescale, orientation", CASES)
def test_phantom_survives_reader_and_geometry(tmp_path, style, index, syntax, photometric, spacing_tags, rescale,
                                              orientation):
    phantom = phantoms.generate_phantom(17, style, index, size_range=(560, 700))
    truth = phantom.truth
    phantom.dataset.update(transfer_syntax=str(syntax), photometric=photometric, spacing_tags=spacing_tags,
                           rescale=rescale,
                           patient_orientation=(["A" if truth["anterior"] == "right" else "P", "F"] if orientation else None))
    radiograph = read_radiograph(phantoms.write_phantom(phantom, tmp_path))

    assert radiograph.format == "DICOM" and radiograph.pixels.shape == phantom.labels.shape
    assert radiograph.spacing == pytest.approx(tuple(truth["spacing"]), rel=1e-4)
    assert radiograph.patient_orientation == (tuple(phantom.dataset["patient_orientation"]) if orientation else None)
    # Bone bright whatever the photometric interpretation and rescale: an increasing affine map of the phantom.
    sample = (slice(None, None, 3), slice(None, None, 3))
    assert np.corrcoef(radiograph.pixels[sample].ravel(), phantom.pixels[sample].ravel())[0, 1] > 0.999

    geometry = analyze_spine(phantom.labels, radiograph.spacing, patient_orientation=radiograph.patient_orientation,
                             image=radiograph.pixels)
    assert geometry.anterior @ np.array(truth["anterior_vector"]) > 0.9
    errors = np.linalg.norm(geometry.boundaries - np.array(truth["boundaries"]), axis=1)
    assert errors.max() < 2.0, f"boundary errors (px): {errors.round(2)}"
    assert np.linalg.norm(geometry.boundaries[0] - np.array(truth["t12_l1_extrapolated"])) < 2.0
    assert np.all(np.abs(np.sum(geometry.boundary_directions * np.array(truth["boundary_directions"]), axis=1)) > 0.99)
    # Every scored plaque lies inside geometry's aortic segment of its level.
    for deposit in truth["deposits"]:
        if deposit["level"] in kauppila.SCORED_LEVELS:
            segment = geometry.segments[kauppila.SCORED_LEVELS.index(deposit["level"])]
            inside = PolygonPath(segment.polygon).contains_points(np.array(deposit["polyline"]), radius=1e-9)
            assert inside.all(), f"{deposit['level']}{deposit['wall']} plaque leaves the segment"

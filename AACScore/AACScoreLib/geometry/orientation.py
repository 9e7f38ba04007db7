"""Which end of the spine is up: a label map's L1..L5 order checked against the DICOM tags and the anatomy.

Geometry takes L1 -> L5 as the inferior direction, so a map numbered from the wrong end (or an upside-down image
whose vertebrae a segmenter numbered from the top of the picture) would be scored with the subscores of L1 and
L4 swapped. PatientOrientation's row direction (F: rows run to the feet, H: to the head) settles the order, and
the map is renumbered; without it, lumbar bodies grow from L1 to L5, so a map whose bodies shrink is flagged.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from ..kauppila import VERTEBRAE

SHRINK_RATIO = 1.0
"""Flag a map whose L4-L5 bodies are smaller than this times its L1-L2 bodies: lumbar bodies grow caudally, the
projected L4-L5 area being some 5-30% larger than L1-L2's (phantoms and the demo radiographs)."""


def orientation_tag(patient_orientation: Sequence[str] | str | None) -> tuple[str, str] | None:
    """DICOM PatientOrientation as (direction of increasing column, of increasing row), upper case; None when the
    tag is absent or not two values."""
    if patient_orientation is None:
        return None
    values = patient_orientation.split("\\") if isinstance(patient_orientation, str) else list(patient_orientation)
    if len(values) != 2:
        return None
    return str(values[0]).upper(), str(values[1]).upper()


def rows_towards_feet(patient_orientation: Sequence[str] | str | None) -> int:
    """+1 when image rows run towards the feet, -1 towards the head, 0 when the tag does not say."""
    tag = orientation_tag(patient_orientation)
    return 0 if tag is None else ("F" in tag[1]) - ("H" in tag[1])


def says_which_way_up(patient_orientation: Sequence[str] | str | None) -> bool:
    """True when PatientOrientation names the head or the feet for the rows or the columns, so the turn that makes
    the image upright comes from the tag, not from looking at the picture."""
    tag = orientation_tag(patient_orientation)
    return tag is not None and any(end in value for value in tag for end in "FH")


def upright_turns(patient_orientation: Sequence[str] | str | None) -> int:
    """Quarter turns (numpy.rot90's k) that make image rows run towards the feet, as PatientOrientation tells;
    0 when it is upright already or does not say. Why: a network trained on upright radiographs does not find
    the vertebrae of one stored on its side or upside down."""
    tag = orientation_tag(patient_orientation)
    if tag is None:
        return 0
    column, row = tag
    if "F" in row or "H" in row:
        return 2 if "H" in row else 0
    return 3 if "F" in column else 1 if "H" in column else 0  # rot90(k=3): new rows run as the old columns


def check_numbering(labels: np.ndarray, patient_orientation=None) -> tuple[np.ndarray, list[str]]:
    """(labels, notes): the map renumbered from the head down when PatientOrientation contradicts its order, with
    a note saying so; a note too when the tag is absent and the anatomy suggests the wrong end. A map lacking a
    vertebra is returned unchanged (geometry reports what is missing)."""
    labels = np.asarray(labels)
    count = len(VERTEBRAE)
    present = np.bincount(labels.ravel().astype(np.intp), minlength=count + 1)[1:count + 1]
    if labels.dtype.kind not in "iu" or not present.all():
        return labels, []
    rows = np.array([centre[0] for centre in ndimage.center_of_mass(labels > 0, labels, range(1, count + 1))])
    down = float(rows[-1] - rows[0])  # L1 -> L5 along the image rows
    towards_feet = rows_towards_feet(patient_orientation)
    upside_down = "the image is upside down (PatientOrientation: rows run to the head); scored turned upright"
    if towards_feet and np.sign(down) == -towards_feet:
        renumbered = np.where(labels > 0, count + 1 - labels.astype(np.int16), 0).astype(labels.dtype)
        if towards_feet > 0:
            return renumbered, ["the label map is numbered bottom-up (L1 lowest, while PatientOrientation says rows "
                                "run to the feet): renumbered L1..L5 from the head down"]
        return renumbered, [upside_down + ", its vertebrae renumbered from the head end"]
    if towards_feet < 0:
        return labels, [upside_down]
    if towards_feet == 0:
        ratio = float(present[-2:].mean() / present[:2].mean())
        if ratio < SHRINK_RATIO:
            return labels, [f"vertebral bodies shrink from L1 to L5 (L4-L5 {1 - ratio:.0%} smaller than L1-L2): "
                            "the levels may be numbered from the wrong end or the image upside down; check them"]
    return labels, []

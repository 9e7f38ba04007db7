"""The coded terms of the L1–L5 segments (SNOMED CT, DICOM CID 7603), read from the extension's terminology file.

One file serves Slicer's segment editor (as a terminology context) and the DICOM SEG written and read here, so
a segment coded "L3 vertebra" in Slicer is the same concept in a DICOM SEG.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import AACScoreError
from ..kauppila import VERTEBRAE

TERMINOLOGY_FILE = Path(__file__).resolve().parents[2] / "Resources" / "AACScore.term.json"
"""Slicer terminology context of L1–L5; load it into Slicer's Terminologies module (`LoadContextFromFile`) so
that the segment editor lists the same entries."""


@dataclass(frozen=True)
class Code:
    """A coded concept as DICOM writes it: (CodeValue, CodingSchemeDesignator, CodeMeaning)."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class VertebraTerm:
    name: str  # "L1".."L5", the segment's label
    category: Code
    type: Code
    color: tuple[int, int, int]  # recommended display colour, 0..255 RGB


def vertebra_terms() -> dict[str, VertebraTerm]:
    """Per vertebra name ("L1".."L5"), its category, type and colour from the terminology file."""
    context = json.loads(TERMINOLOGY_FILE.read_text())
    category = context["SegmentationCodes"]["Category"][0]
    category_code = Code(category["CodeValue"], category["CodingSchemeDesignator"], category["CodeMeaning"])
    terms = {}
    for kind in category["Type"]:
        name = kind["3dSlicerLabel"]
        terms[name] = VertebraTerm(name, category_code,
                                   Code(kind["CodeValue"], kind["CodingSchemeDesignator"], kind["CodeMeaning"]),
                                   tuple(kind["recommendedDisplayRGBValue"]))
    missing = [name for name in VERTEBRAE if name not in terms]
    if missing:
        raise AACScoreError(f"{TERMINOLOGY_FILE}: no terminology type for {', '.join(missing)}")
    return {name: terms[name] for name in VERTEBRAE}

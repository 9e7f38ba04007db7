"""AACScore's results as DICOM objects made with highdicom, and the readers that take them back.

- **SEG**: the L1–L5 vertebrae, one binary segment each, labelled and coded (SNOMED CT) as the Slicer segments
  (`terminology.py`), referencing the radiograph they were made on.
- **SR**: a TID 1500 measurement report (Comprehensive 3D SR) with AAC-24, the category, the eight wall
  subscores, the QC verdict, its reasons and the prediction interval when the result has them, and the model
  packages (algorithm identification) that made them.
- **Heatmap**: the overlay picture (radiograph, Grad-CAM colours, vertebra outlines) as a Secondary Capture.

Why so:
- A lateral radiograph is a projection image without patient-space geometry (no Image Position). The SEG uses
  the radiograph's pixel grid (spatial locations preserved) and carries neither a Frame of Reference nor Pixel
  Measures: with a Frame of Reference DICOM requires a Slice Thickness that a projection does not have, and
  highdicom 0.28 cannot read back a SEG it wrote with Pixel Spacing but no Slice Thickness.
- The heatmap is a Secondary Capture, not a Parametric Map: highdicom 0.28 cannot build a Parametric Map on a
  projection radiograph without a Frame of Reference (it fails on the dimension index), Grad-CAM values are
  relative weights without a unit, made to be looked at, and every PACS viewer shows a Secondary Capture.
- Only a DICOM radiograph gets DICOM outputs: a SEG and an SR must reference the image they describe, and a PNG
  or NRRD has no patient, study or instance to reference (`not_dicom_message` says so in the row).
- AAC-24 has no standard code; its concepts use the private coding scheme `99AACSCORE` (CODES below).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from .. import __version__
from ..errors import GeometryError, RadiographError
from ..kauppila import SUBSCORE_COLUMNS, VERTEBRAE
from .atomic import atomic_path
from .terminology import Code, vertebra_terms

SCHEME = "99AACSCORE"
MANUFACTURER = "AACScore"
SEG_SERIES, SR_SERIES, HEATMAP_SERIES = 9001, 9002, 9003
SERIES_DESCRIPTIONS = {SEG_SERIES: "AACScore vertebrae L1-L5", SR_SERIES: "AACScore AAC-24 report",
                       HEATMAP_SERIES: "AACScore Grad-CAM heatmap"}
RADIOGRAPH_MODALITIES: tuple[str, ...] = ("CR", "DX", "RG")
"""Modalities of projection radiographs; other instances from a PACS (CT, SEG, SR, our own heatmaps) are not scored."""

_WALL_NAMES = {"A": "anterior", "P": "posterior"}
CODES: dict[str, Code] = {
    "procedure": Code("AACSCORING", SCHEME, "AAC-24 scoring of a lateral lumbar radiograph"),
    "finding": Code("AAC", SCHEME, "Abdominal aortic calcification"),
    "aac24": Code("AAC24", SCHEME, "Kauppila AAC-24 score"),
    "aac24_low": Code("AAC24LOW", SCHEME, "AAC-24 prediction interval lower limit"),
    "aac24_high": Code("AAC24HIGH", SCHEME, "AAC-24 prediction interval upper limit"),
    **{column: Code(column, SCHEME, f"AAC {_WALL_NAMES[column[2]]} wall score at {column[:2]}")
       for column in SUBSCORE_COLUMNS},
    "category": Code("AACCATEGORY", SCHEME, "AAC-24 category"),
    "qc": Code("AACQC", SCHEME, "Quality control verdict"),
    "qc_reasons": Code("AACQCREASONS", SCHEME, "Quality control reasons"),
}
MEASURED = ("aac24",) + SUBSCORE_COLUMNS + ("aac24_low", "aac24_high")
CATEGORY_CODES: dict[str, Code] = {
    "no/mild": Code("AACNOMILD", SCHEME, "no/mild (AAC-24 0-4)"),
    "moderate": Code("AACMODERATE", SCHEME, "moderate (AAC-24 5-15)"),
    "severe": Code("AACSEVERE", SCHEME, "severe (AAC-24 16-24)"),
}
ALGORITHM_PARAMETER = ("111002", "DCM")  # TID 4019 "Algorithm Parameters": one per model package
SCORE_UNIT = Code("{score}", "UCUM", "score")
_TYPE2_ATTRIBUTES = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                     "ReferringPhysicianName", "StudyID", "AccessionNumber")


def qc_code(verdict: str) -> Code:
    """The coded QC verdict (ok, review, error: AACQCOK, AACQCREVIEW, AACQCERROR); its meaning is the verdict."""
    return Code(f"AACQC{verdict.upper()}"[:16], SCHEME, verdict)


@dataclass
class DicomResults:
    """The DICOM objects of one scored radiograph (any may be None when it could not be made)."""

    seg: object | None = None
    sr: object | None = None
    heatmap: object | None = None

    def datasets(self) -> list:
        return [dataset for dataset in (self.seg, self.sr, self.heatmap) if dataset is not None]


def not_dicom_message(radiograph_format: str) -> str:
    return (f"no DICOM outputs: the input is {radiograph_format}, not DICOM "
            "(a SEG and an SR must reference a DICOM image)")


def read_source_header(path: str | Path):
    """The radiograph's DICOM header without pixel data: what the outputs copy and reference."""
    import pydicom

    from .labelmaps import is_dicom_file

    if not is_dicom_file(path):
        raise RadiographError(path, not_dicom_message(Path(path).name))
    return pydicom.dcmread(path, stop_before_pixels=True)


def make_results(source, row: Mapping[str, object], labels: np.ndarray | None, labels_by_model: bool,
                 picture: np.ndarray | None = None) -> DicomResults:
    """SEG (from `labels`), SR (from the results row, so it says exactly what results.csv says) and heatmap."""
    source = _complete_source(source)
    models = str(row.get("models") or "")
    seg = make_segmentation(source, labels, models if labels_by_model else None) if labels is not None else None
    heatmap = make_heatmap_capture(source, picture) if picture is not None else None
    return DicomResults(seg, make_report(source, row, [d for d in (seg, heatmap) if d is not None]), heatmap)


def _complete_source(source):
    """A copy of the source header that highdicom accepts: empty Type 2 patient and study attributes where the
    file has none (many files leave them out), and no Frame of Reference or Pixel Spacing (see the module note)."""
    source = copy.deepcopy(source)
    for keyword in _TYPE2_ATTRIBUTES:
        if keyword not in source:
            setattr(source, keyword, "")
    for keyword in ("FrameOfReferenceUID", "PixelSpacing"):
        if keyword in source:
            delattr(source, keyword)
    return source


def _coded(code: Code):
    import highdicom as hd

    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)


def _algorithm(models: str):
    """AACScore and its model packages ('name==version; ...'), as DICOM algorithm identification."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    packages = [package.strip() for package in models.split(";") if package.strip()]
    return hd.AlgorithmIdentificationSequence(name="AACScore", version=__version__,
                                              family=codes.cid7162.ArtificialIntelligence,
                                              parameters={package.split("==")[0]: package.partition("==")[2]
                                                          for package in packages} or None)


def make_segmentation(source, labels: np.ndarray, models: str | None):
    """A binary SEG with one segment per vertebra; `models` None means a person drew or corrected the labels."""
    import highdicom as hd

    labels = np.asarray(labels)
    if labels.shape != (int(source.Rows), int(source.Columns)):
        raise GeometryError(f"label map is {labels.shape}, the radiograph {source.Rows}x{source.Columns}")
    algorithm = _algorithm(models) if models is not None else None
    kind = hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC if models is not None else \
        hd.seg.SegmentAlgorithmTypeValues.MANUAL
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=term.name,
            segmented_property_category=_coded(term.category), segmented_property_type=_coded(term.type),
            algorithm_type=kind, algorithm_identification=algorithm,
        )
        for number, term in enumerate(vertebra_terms().values(), start=1)
    ]
    masks = np.stack([labels == value for value in range(1, len(VERTEBRAE) + 1)], axis=-1)
    seg = hd.seg.Segmentation(
        source_images=[source], pixel_array=masks[None], segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=SEG_SERIES,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name="AACScore", software_versions=__version__, device_serial_number="none",
        series_description=SERIES_DESCRIPTIONS[SEG_SERIES], omit_empty_frames=False,
    )
    # without plane orientation, DICOM wants the image's orientation (Type 2C); the SEG shares the radiograph's grid
    seg.PatientOrientation = source.get("PatientOrientation", "")
    return seg


def make_report(source, row: Mapping[str, object], also_derived: list | None = None):
    """The TID 1500 report of one results row; `also_derived` (the SEG, the heatmap) are listed as evidence."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    models = str(row.get("models") or "")
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=["AACScore", __version__, models]), name="AACScore",
        manufacturer_name=MANUFACTURER, model_name=models[:64] or "AACScore")
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    packages = [p.strip() for p in models.split(";") if p.strip()]
    algorithm = hd.sr.AlgorithmIdentification(name="AACScore", version=__version__, parameters=packages or None)
    measurements = [
        hd.sr.Measurement(name=_coded(CODES[column]), value=float(row[column]), unit=_coded(SCORE_UNIT))
        for column in MEASURED if _filled(row.get(column))
    ]
    evaluations = [hd.sr.QualitativeEvaluation(_coded(CODES["category"]), _coded(CATEGORY_CODES[str(row["category"])]))]
    if _filled(row.get("qc")):
        evaluations.append(hd.sr.QualitativeEvaluation(_coded(CODES["qc"]), _coded(qc_code(str(row["qc"])))))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="AAC-24"),
        finding_type=_coded(CODES["finding"]), finding_sites=[hd.sr.FindingSite(codes.SCT.AbdominalAorta)],
        algorithm_id=algorithm, measurements=measurements, qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )
    if _filled(row.get("qc_reasons")):
        group[0].ContentSequence.append(hd.sr.TextContentItem(
            name=_coded(CODES["qc_reasons"]), value=str(row["qc_reasons"])[:1024],
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=_coded(CODES["procedure"]),
                                     imaging_measurements=[group], title=codes.DCM.ImagingMeasurementReport)
    return hd.sr.Comprehensive3DSR(
        evidence=[source] + list(also_derived or []), content=report[0], series_instance_uid=hd.UID(),
        series_number=SR_SERIES, sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
        is_complete=True, series_description=SERIES_DESCRIPTIONS[SR_SERIES],
        coding_schemes=[hd.coding_schemes.CodingSchemeIdentificationItem(
            designator=SCHEME, name="AACScore codes for Kauppila AAC-24 scoring", responsible_organization="AACScore")],
    )


def _filled(value: object) -> bool:
    return value is not None and str(value).strip() != ""


def make_heatmap_capture(source, picture: np.ndarray):
    """The overlay picture (RGB, uint8) as a Secondary Capture in the radiograph's study (modality OT), JPEG
    compressed: it is a picture to look at (the PNG overlay keeps it losslessly), and JPEG makes it 0.5 MB where
    RLE made it 3.8 MB."""
    import highdicom as hd
    from pydicom.uid import JPEGBaseline8Bit

    picture = np.ascontiguousarray(picture, dtype=np.uint8)
    orientation = _biped_orientation(source.get("PatientOrientation"))
    capture = hd.sc.SCImage.from_ref_dataset(
        source, pixel_array=picture, photometric_interpretation="YBR_FULL_422", bits_allocated=8,
        coordinate_system="PATIENT", patient_orientation=orientation or ("A", "F"), series_instance_uid=hd.UID(),
        series_number=HEATMAP_SERIES, sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
        transfer_syntax_uid=JPEGBaseline8Bit, series_description=SERIES_DESCRIPTIONS[HEATMAP_SERIES],
    )
    if orientation is None:  # highdicom needs one to build the image; DICOM allows it empty (Type 2): unknown
        capture.PatientOrientation = ""
    if source.get("BodyPartExamined"):  # an unpaired body part: no Laterality needed
        capture.BodyPartExamined = source.BodyPartExamined
    return capture


def _biped_orientation(value) -> tuple[str, str] | None:
    """The source's Patient Orientation when it is two single directions (what highdicom accepts), else None."""
    parts = [str(part).strip().upper() for part in (value or [])] if not isinstance(value, str) else []
    return (parts[0], parts[1]) if len(parts) == 2 and all(p in ("A", "P", "L", "R", "H", "F") for p in parts) \
        else None


def write_results(results: DicomResults, folder: str | Path, stem: str) -> dict[str, Path]:
    """Write each object atomically as `<stem>_labels.dcm` (SEG), `<stem>_aac24_report.dcm` (SR) and
    `<stem>_heatmap.dcm`; the names carry the markers that keep a folder scan from taking them as radiographs."""
    names = {"seg": f"{stem}_labels.dcm", "sr": f"{stem}_aac24_report.dcm", "heatmap": f"{stem}_heatmap.dcm"}
    written = {}
    for kind, name in names.items():
        dataset = getattr(results, kind)
        if dataset is None:
            continue
        with atomic_path(Path(folder) / name) as temporary:
            dataset.save_as(temporary, enforce_file_format=True)
        written[kind] = Path(folder) / name
    return written


# --- reading back ------------------------------------------------------------------------------------------


def read_report(source: str | Path | object) -> dict[str, object]:
    """The values of a report written by `make_report`, as results-row columns (floats for scores, strings
    for the rest, 'models' as 'name==version; ...'); also the SOP instance UID of the image it describes."""
    import highdicom as hd

    name = str(source) if isinstance(source, (str, Path)) else "DICOM SR"
    try:
        sr = hd.sr.srread(source) if isinstance(source, (str, Path)) else \
            hd.sr.Comprehensive3DSR.from_dataset(source, copy=False)
        groups = sr.content.get_image_measurement_groups()
    except Exception as error:  # noqa: BLE001
        raise RadiographError(name, f"cannot be read as a TID 1500 report ({type(error).__name__}: {error})") \
            from error
    if len(groups) != 1:
        raise RadiographError(name, f"expected one AAC-24 measurement group, found {len(groups)}")
    group = groups[0]
    by_code = {CODES[key].value: key for key in MEASURED}
    values: dict[str, object] = {}
    for measurement in group.get_measurements():
        key = by_code.get(measurement.name.value)
        if key is not None:
            values[key] = float(measurement.value)
    categories = {code.value: category for category, code in CATEGORY_CODES.items()}
    for evaluation in group.get_qualitative_evaluations():
        if evaluation.name.value == CODES["category"].value:
            values["category"] = categories.get(evaluation.value.value, evaluation.value.meaning)
        elif evaluation.name.value == CODES["qc"].value:
            values["qc"] = evaluation.value.meaning
    packages = []
    for item in group[0].ContentSequence:
        concept = item.ConceptNameCodeSequence[0]
        if item.ValueType == "TEXT" and concept.CodeValue == CODES["qc_reasons"].value:
            values["qc_reasons"] = str(item.TextValue)
        elif item.ValueType == "TEXT" and (concept.CodeValue, concept.CodingSchemeDesignator) == ALGORITHM_PARAMETER:
            packages.append(str(item.TextValue))
    values["models"] = "; ".join(packages)
    sources = group.source_images
    values["source_uid"] = sources[0].referenced_sop_instance_uid if sources else ""
    return values

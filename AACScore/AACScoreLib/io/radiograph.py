"""Reading a radiograph file into one float image with its physical spacing and orientation hints.

Everything downstream (segmenter, geometry, scorer, Slicer scene) takes a `Radiograph`, so this is the only
place that knows about file formats, photometric interpretation and pixel spacing tags. The format is found
from the file's content, not its extension, and every failure, whatever library it comes from, leaves as a
`RadiographError` naming the file and the problem, so that a batch run can report it and carry on.
"""

from __future__ import annotations

import errno
import logging
import math
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import RadiographError

MIN_SIDE = 64
"""Smallest accepted image side in pixels: smaller images cannot show five vertebrae."""
MAX_PIXELS = 100_000_000
"""Largest accepted image (pixels), checked before decoding so a corrupt header cannot exhaust memory."""

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI_MAGICS = (b"n+1\x00", b"ni1\x00")
# A DICOM file without the 128-byte preamble starts with a group 0002 or 0008 tag (little or big endian).
_DICOM_NO_PREAMBLE_STARTS = (b"\x02\x00", b"\x08\x00", b"\x00\x08")
# Everything else a decoder raises is wrapped, BaseException included: the Rust RLE decoder reports corrupt
# data with pyo3's PanicException, which does not derive from Exception.
_NOT_DECODER_ERRORS = (KeyboardInterrupt, SystemExit, GeneratorExit)
_HEAD_BYTES = 348  # enough for the NIfTI-1 magic at offset 344
# Warnings from these parts of the decoders concern the pixels themselves, so they go into the result's message;
# the others (a tag value of the wrong form, say) only go to the log.
_PIXEL_WARNING_SOURCES = ("/pixels/", "/pixel_data_handlers/", "/PIL/")
_WARNINGS_LOCK = threading.Lock()
_log = logging.getLogger(__name__)
_DICOM_METADATA_TAGS = (
    "Modality", "Manufacturer", "ManufacturerModelName", "BodyPartExamined", "PhotometricInterpretation",
    "SOPClassUID", "SOPInstanceUID", "BitsAllocated", "BitsStored", "PixelRepresentation",
    "RescaleSlope", "RescaleIntercept", "EstimatedRadiographicMagnificationFactor",
)


@dataclass
class Radiograph:
    """A 2D grayscale radiograph; `pixels` follows the bone-bright convention whatever the file said."""

    pixels: np.ndarray  # float32 (H, W) as a viewer shows it (modality LUT, non-linear VOI), bone bright
    spacing: tuple[float, float] | None  # (row_mm, col_mm), None when unknown
    spacing_source: str  # which tag or header gave the spacing, "unknown" when none did
    path: str
    format: str  # "DICOM" | "PNG" | "JPEG" | "TIFF" | "NRRD" | "NIfTI"
    patient_orientation: tuple[str, str] | None = None  # DICOM (0020,0020): increasing column, increasing row
    view_position: str | None = None
    image_laterality: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    read_warnings: list[str] = field(default_factory=list)  # doubts about the pixels: decoders', colour marks


def read_radiograph(path: str | Path) -> Radiograph:
    """Read a DICOM, PNG, JPEG, TIFF, NRRD or NIfTI radiograph; raises RadiographError and nothing else.

    Decoder warnings never reach the terminal: those about the pixels are kept in `read_warnings` (the result's
    message shows them), the others go to the log."""
    path = Path(path)
    with _DecoderWarnings(path) as caught:
        try:
            radiograph = _read(path, caught)
        except (RadiographError, *_NOT_DECODER_ERRORS):
            raise
        except BaseException as exc:  # noqa: BLE001 - decoders raise anything; the caller needs one error type
            raise RadiographError(path, f"cannot be read: {_reason(exc)}") from exc
    radiograph.read_warnings = [*radiograph.read_warnings, *caught.about_pixels()]
    return radiograph


class _DecoderWarnings:
    """Collect the warnings that this thread raises while reading one file (the batch reads on a worker thread
    while the main thread scores, so other threads' warnings are passed on untouched)."""

    def __init__(self, path: Path):
        self.path = path
        self.messages: list[tuple[str, str]] = []  # (source file, one-line message)

    def __enter__(self) -> "_DecoderWarnings":
        _WARNINGS_LOCK.acquire()
        self._context = warnings.catch_warnings()
        self._context.__enter__()
        warnings.simplefilter("always")  # every file gets its own warnings, not only the first file
        reader, passed_on = threading.get_ident(), warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if threading.get_ident() == reader:
                self.messages.append((str(filename).replace("\\", "/"), " ".join(str(message).split())))
            else:
                passed_on(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            self._context.__exit__(*exc_info)
        finally:
            _WARNINGS_LOCK.release()
        for source, message in self.messages:
            if not self._about_pixels(source):
                _log.warning("%s: %s", self.path, message)

    def ended_early(self) -> bool:
        return any("End of file" in message for _, message in self.messages)

    def about_pixels(self) -> list[str]:
        return list(dict.fromkeys(message for source, message in self.messages if self._about_pixels(source)))

    @staticmethod
    def _about_pixels(source: str) -> bool:
        return any(part in source for part in _PIXEL_WARNING_SOURCES)


def read_or_error(path: str | Path) -> Radiograph | RadiographError:
    """Read a radiograph, returning the error instead of raising it (for reading ahead on a worker thread)."""
    try:
        return read_radiograph(path)
    except RadiographError as error:
        return error


def _reason(exc: BaseException) -> str:
    """One line, so that the message fits a CSV cell and a status bar."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _read(path: Path, caught: _DecoderWarnings) -> Radiograph:
    try:
        path.stat()
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise RadiographError(path, "is a symbolic link loop (the link points back to itself)") from None
        if path.is_symlink():
            raise RadiographError(path, "is a broken symbolic link (its target does not exist)") from None
        raise RadiographError(path, "file does not exist") from None
    if path.is_dir():
        raise RadiographError(path, "is a folder, not an image file")
    with open(path, "rb") as f:
        head = f.read(_HEAD_BYTES)
    if not head:
        raise RadiographError(path, "file is empty (0 bytes)")
    file_format = _detect_format(path, head)
    if file_format == "DICOM":
        radiograph = _read_dicom(path, caught)
    else:
        readers = {"PNG": _read_pillow, "JPEG": _read_pillow, "TIFF": _read_pillow,
                   "NRRD": _read_nrrd, "NIfTI": _read_nifti}
        radiograph = readers[file_format](path)
    _check_pixels(path, radiograph.pixels)
    return radiograph


def _detect_format(path: Path, head: bytes) -> str:
    """Content first (magic bytes), extension only for NIfTI, whose gzip form has no magic of its own."""
    if head.startswith(_PNG_MAGIC):
        return "PNG"
    if head.startswith(_JPEG_MAGIC):
        return "JPEG"
    if head.startswith(b"NRRD"):
        return "NRRD"
    if head[128:132] == b"DICM":  # before TIFF: a DICOM preamble may hold a TIFF header (dual-format files)
        return "DICOM"
    if head[:4] in _TIFF_MAGICS:
        return "TIFF"
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")) or head[344:348] in _NIFTI_MAGICS:
        return "NIfTI"
    if head[:2] in _DICOM_NO_PREAMBLE_STARTS:
        return "DICOM"
    detail = "gzip-compressed; decompress it first" if head.startswith(_GZIP_MAGIC) else \
        f"extension '{path.suffix}'" if path.suffix else "no extension"
    raise RadiographError(path, f"unrecognised file format ({detail}); expected DICOM, PNG, JPEG, TIFF, NRRD or NIfTI")


def _check_pixels(path: Path, pixels: np.ndarray) -> None:
    """The checks every format shares: one 2D plane, large enough, finite values."""
    if pixels.ndim != 2:
        raise RadiographError(path, f"image has shape {pixels.shape}; expected one 2D grayscale image")
    _check_size(path, *pixels.shape)
    if not np.isfinite(pixels).all():
        raise RadiographError(path, "image contains NaN or infinite values")


def _check_size(path: Path, rows: int, cols: int) -> None:
    if min(rows, cols) < MIN_SIDE:
        raise RadiographError(path, f"image too small ({rows}x{cols} pixels; at least {MIN_SIDE} on each side)")
    if rows * cols > MAX_PIXELS:
        raise RadiographError(path, f"image too large ({rows}x{cols} pixels; at most {MAX_PIXELS:,} pixels)")


def _valid_spacing(values) -> tuple[float, float] | None:
    """(row_mm, col_mm) when both values are finite and positive, else None."""
    try:
        row, col = (float(v) for v in values)
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(row) and math.isfinite(col) and row > 0 and col > 0):
        return None
    return row, col


# --- DICOM -------------------------------------------------------------------------------------------------


def _apply_modality_lut(stored: np.ndarray, ds) -> np.ndarray:
    """pydicom's modality LUT: `pydicom.pixels` in pydicom 3, `pixel_data_handlers.util` in pydicom 2 (the one
    3D Slicer 5.10 bundles, which AACScore never replaces)."""
    try:
        from pydicom.pixels import apply_modality_lut
    except ImportError:
        from pydicom.pixel_data_handlers.util import apply_modality_lut
    return apply_modality_lut(stored, ds)


def _read_dicom(path: Path, caught: _DecoderWarnings) -> Radiograph:
    import pydicom

    # defer_size: the header checks below reject non-radiographs before the pixel data is even read.
    return _dicom_radiograph(path, pydicom.dcmread(path, force=True, defer_size="1 MB"), caught.ended_early)


def radiograph_from_dataset(ds, name: str) -> Radiograph:
    """A radiograph from a DICOM dataset already in memory (retrieved from a PACS); `name` stands for its path
    in messages. Raises RadiographError and nothing else, as `read_radiograph` does."""
    try:
        radiograph = _dicom_radiograph(name, ds)
        _check_pixels(name, radiograph.pixels)
        return radiograph
    except (RadiographError, *_NOT_DECODER_ERRORS):
        raise
    except BaseException as exc:  # noqa: BLE001 - decoders raise anything; the caller needs one error type
        raise RadiographError(name, f"cannot be read: {_reason(exc)}") from exc


def _dicom_radiograph(path: Path | str, ds, ended_early: Callable[[], bool] = lambda: False) -> Radiograph:
    """`path` is the file (truncation is then checked against its size) or, for a dataset in memory, a name."""
    _check_dicom_header(path, ds, ended_early())
    _infer_missing_transfer_syntax(ds)
    cut = isinstance(path, Path) and _pixel_data_cut(path, ds)  # before decoding, which replaces the raw element
    try:
        stored = ds.pixel_array
    except _NOT_DECODER_ERRORS:
        raise
    except BaseException as exc:  # noqa: BLE001 - any decoder plugin's failure
        if cut or ended_early():
            raise RadiographError(path, f"DICOM file is truncated: it ends after {path.stat().st_size:,} bytes, "
                                        "inside its pixel data (an interrupted copy or download?)") from exc
        syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
        where = f" ({syntax.name})" if syntax else ""
        raise RadiographError(path, f"cannot decode the pixel data{where}: {_reason(exc)}") from exc
    notes = []
    if stored.ndim == 3 and stored.shape[-1] == 3 and str(ds.get("PhotometricInterpretation", "")).strip() == "RGB":
        stored, notes = _grey_from_rgb(path, stored, "DICOM, PhotometricInterpretation RGB")
    if stored.ndim != 2:
        raise RadiographError(path, f"decoded pixel data has shape {stored.shape}; expected one 2D image")
    voi, voi_problem = _nonlinear_voi(ds)
    try:
        pixels = _to_display(stored, ds, voi)
    except Exception as exc:  # noqa: BLE001 - a malformed VOI LUT: read without it, and say so
        voi_problem = f"{voi} could not be applied ({_reason(exc)}); read without it"
        voi = None
        pixels = _to_display(stored, ds, voi)
    if voi_problem:
        notes.append(voi_problem)
    if str(ds.get("PresentationIntentType", "")).strip().upper() == "FOR PROCESSING":
        notes.append("raw detector data (Presentation Intent FOR PROCESSING), not processed for display as the "
                     "models' training images were: prefer the image FOR PRESENTATION")
    if _shown_inverted(ds):
        lo, hi = _display_range(ds, voi)
        pixels = (lo + hi) - pixels.astype(np.float64)
    spacing, spacing_source, spacing_problem = _dicom_spacing(ds)
    metadata = _dicom_metadata(ds)
    if voi:
        metadata["VOITransform"] = voi
    if spacing_problem:
        metadata["SpacingProblem"] = spacing_problem
    return Radiograph(
        pixels=np.ascontiguousarray(pixels, dtype=np.float32),
        spacing=spacing,
        spacing_source=spacing_source,
        path=str(path),
        format="DICOM",
        patient_orientation=_patient_orientation(ds),
        view_position=_dicom_string(ds, "ViewPosition"),
        image_laterality=_dicom_string(ds, "ImageLaterality"),
        metadata=metadata,
        read_warnings=notes,
    )


def _check_dicom_header(path: Path | str, ds, ended_early: bool = False) -> None:
    """Reject what is not a single grayscale image before decoding, with the reason a user can act on. 8-bit RGB
    passes, to be read as grey after decoding when its channels agree (a radiograph kept as a secondary capture);
    YBR is refused: pydicom 2 and 3 do not convert it to RGB alike."""
    if "PixelData" not in ds:
        kind = _sop_class_name(ds)
        if isinstance(path, Path) and (ended_early or "Image Storage" in kind or "Rows" in ds):
            size = path.stat().st_size
            raise RadiographError(path, f"DICOM file is truncated: it ends after {size:,} bytes, before its "
                                        "pixel data is complete (an interrupted copy or download?)")
        if not kind:
            raise RadiographError(path, "DICOM file has no pixel data and no SOP Class; it is corrupt or not an image")
        raise RadiographError(path, f"DICOM file has no pixel data ({kind}); it is not an image")
    frames = ds.get("NumberOfFrames", 1)
    try:
        frames = int(frames or 1)
    except (TypeError, ValueError):
        raise RadiographError(path, f"invalid NumberOfFrames {frames!r}") from None
    if frames > 1:
        raise RadiographError(path, f"multi-frame DICOM ({frames} frames); expected a single 2D radiograph")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    samples = ds.get("SamplesPerPixel", 1)
    if not photometric:
        raise RadiographError(path, "DICOM image has no PhotometricInterpretation; cannot tell grayscale from colour")
    grey_as_rgb = photometric == "RGB" and samples == 3 and ds.get("BitsAllocated") == 8  # checked once decoded
    if not grey_as_rgb and (photometric not in ("MONOCHROME1", "MONOCHROME2") or samples != 1):
        raise RadiographError(
            path, f"colour or non-grayscale image (PhotometricInterpretation {photometric}, "
                  f"SamplesPerPixel {samples}); a radiograph must be grayscale")
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if rows is None or cols is None:
        raise RadiographError(path, "DICOM image has no Rows or Columns")
    _check_size(path, int(rows), int(cols))


def _pixel_data_cut(path: Path, ds) -> bool:
    """True when the pixel data element claims more bytes than the file holds after it."""
    element = ds.get_item("PixelData")
    tell, length = getattr(element, "value_tell", None), getattr(element, "length", None)
    if tell is None or length is None or length == 0xFFFFFFFF:  # undefined length: encapsulated fragments
        return False
    return tell + length > path.stat().st_size


def _infer_missing_transfer_syntax(ds) -> None:
    """Files without a file meta header (older than DICOM Part 10) are uncompressed; pydicom knows how it read
    them but will not decode pixels without a Transfer Syntax UID, so give it the one matching that encoding."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" in ds.file_meta:
        return
    syntax = {(True, True): ImplicitVRLittleEndian, (False, True): ExplicitVRLittleEndian,
              (False, False): ExplicitVRBigEndian}.get(_read_encoding(ds))
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax


def _read_encoding(ds) -> tuple[bool, bool]:
    """(implicit VR, little endian) as the file was read: `original_encoding` in pydicom 3, the dataset's own
    flags in pydicom 2."""
    if hasattr(ds, "original_encoding"):
        return tuple(ds.original_encoding)
    return ds.is_implicit_VR, ds.is_little_endian


def _sop_class_name(ds) -> str:
    uid = ds.get("SOPClassUID") or getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID")
    return str(uid.name) if uid is not None else ""


def _shown_inverted(ds) -> bool:
    """Whether a viewer shows the stored values inverted: MONOCHROME1, or MONOCHROME2 with Presentation LUT Shape
    INVERSE (some CR). In DX, MONOCHROME1 comes with INVERSE by rule (PS3.3 C.8.11.3): one inversion, not two."""
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    return photometric == "MONOCHROME1" or (photometric == "MONOCHROME2" and shape == "INVERSE")


def _display_range(ds, voi: str | None) -> tuple[float, float]:
    """Nominal output range of the modality LUT (and the VOI transform applied), so an inverted image inverts the
    same way for every image."""
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    # Every stored value up to 16 bits, as a VOI LUT need not be monotonic; the two ends beyond that.
    stored = np.arange(low, high + 1, dtype=np.int64) if bits <= 16 else np.array([low, high], dtype=np.int64)
    mapped = np.asarray(_to_display(stored, ds, voi), dtype=np.float64)
    return float(mapped.min()), float(mapped.max())


def _nonlinear_voi(ds) -> tuple[str | None, str]:
    """(the VOI transform to apply, a problem to report). Only a transform that changes contrast non-linearly is
    applied, as a viewer would show it: the first item of a VOI LUT Sequence (CR and DX processing curves), or a
    SIGMOID window. A linear window is not: the models scale intensities between percentiles, which undoes it,
    and its clipping would only lose detail."""
    sequence = ds.get("VOILUTSequence")
    if sequence:
        explanation = _dicom_string(sequence[0], "LUTExplanation")
        return f"VOI LUT Sequence, item 1 of {len(sequence)}" + (f" ({explanation})" if explanation else ""), ""
    if str(ds.get("VOILUTFunction", "") or "").strip().upper() == "SIGMOID":
        if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
            return "SIGMOID window, the first", ""
        return None, "VOILUTFunction SIGMOID without a window; read without it"
    return None, ""


def _to_display(stored: np.ndarray, ds, voi: str | None) -> np.ndarray:
    """Stored values through the modality LUT and then, when `voi` names one, the VOI transform."""
    values = _apply_modality_lut(stored, ds)
    if voi is None:
        return values
    apply_voi, apply_windowing = _voi_functions()
    if voi.startswith("VOI LUT Sequence"):
        return apply_voi(np.rint(values).astype(np.int64), ds, index=0)  # a LUT is indexed by whole values
    return apply_windowing(np.asarray(values, dtype=np.float64), ds, index=0)


def _voi_functions():
    """pydicom's VOI functions: `pydicom.pixels` in pydicom 3, `pixel_data_handlers.util` in pydicom 2."""
    try:
        from pydicom.pixels import apply_voi, apply_windowing
    except ImportError:
        from pydicom.pixel_data_handlers.util import apply_voi, apply_windowing
    return apply_voi, apply_windowing


def _dicom_spacing(ds) -> tuple[tuple[float, float] | None, str, str]:
    """(spacing, source, problem): the first valid of PixelSpacing, ImagerPixelSpacing (magnification-corrected
    when the factor is given) and NominalScannedPixelSpacing; invalid values are reported, never used."""
    problems: list[str] = []
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        spacing = _valid_spacing(value)
        if spacing is None:
            problems.append(f"{keyword} {value!r} is not two positive numbers")
            continue
        source = keyword
        if keyword == "ImagerPixelSpacing":
            spacing, source = _magnification_corrected(ds, spacing, problems)
        return spacing, source, "; ".join(problems)
    return None, "unknown", "; ".join(problems)


def _magnification_corrected(ds, spacing: tuple[float, float], problems: list[str]) -> tuple[tuple[float, float], str]:
    """ImagerPixelSpacing is at the detector; dividing by the magnification brings it to the patient plane."""
    value = ds.get("EstimatedRadiographicMagnificationFactor")
    if value is None or value == "":
        return spacing, "ImagerPixelSpacing"
    try:
        factor = float(value)
    except (TypeError, ValueError):
        factor = math.nan
    if not (math.isfinite(factor) and factor > 0):
        problems.append(f"EstimatedRadiographicMagnificationFactor {value!r} ignored (not a positive number)")
        return spacing, "ImagerPixelSpacing"
    return ((spacing[0] / factor, spacing[1] / factor),
            "ImagerPixelSpacing corrected by EstimatedRadiographicMagnificationFactor")


def _patient_orientation(ds) -> tuple[str, str] | None:
    value = ds.get("PatientOrientation")
    if value is None or value == "":
        return None
    parts = [value] if isinstance(value, str) else list(value)
    parts = [str(p).strip().upper() for p in parts]
    if len(parts) != 2 or not all(parts):
        return None
    return parts[0], parts[1]


def _dicom_string(ds, keyword: str) -> str | None:
    value = ds.get(keyword)
    text = str(value).strip() if value is not None else ""
    return text or None


def _dicom_metadata(ds) -> dict[str, str]:
    metadata = {}
    for keyword in _DICOM_METADATA_TAGS:
        text = _dicom_string(ds, keyword)
        if text is not None:
            metadata[keyword] = text
    file_meta = getattr(ds, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if syntax:
        metadata["TransferSyntaxUID"] = str(syntax)
        metadata["TransferSyntax"] = str(syntax.name)
    return metadata


# --- PNG / JPEG / TIFF -------------------------------------------------------------------------------------


def _read_pillow(path: Path) -> Radiograph:
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        _check_size(path, image.height, image.width)
        image.load()  # decodes now, so a truncated file fails here
        fmt = image.format if image.format in ("PNG", "TIFF") else "JPEG"
        if getattr(image, "n_frames", 1) > 1:
            what = "multi-page TIFF" if fmt == "TIFF" else f"animated or multi-frame {fmt}"
            raise RadiographError(path, f"{what} ({image.n_frames} frames); expected one 2D radiograph")
        mode = image.mode
        white_is_zero = fmt == "TIFF" and image.tag_v2.get(262) == 0
        bits = image.tag_v2.get(258, (8,))[0] if fmt == "TIFF" else 8
        image = ImageOps.exif_transpose(image)  # as viewers show it
        pixels, notes = _pillow_gray(path, image)
    if white_is_zero and mode not in ("1", "L"):  # Pillow inverts 1- and 8-bit WhiteIsZero itself, not the rest
        pixels = _white_is_zero_inverted(pixels, bits)
    return Radiograph(
        pixels=np.ascontiguousarray(pixels, dtype=np.float32),
        spacing=None,  # a DPI in PNG/JPEG/TIFF is the screen's or the scanner's, not millimetres on the detector
        spacing_source="unknown",
        path=str(path),
        format=fmt,
        metadata={"Mode": mode, "Format": fmt},
        read_warnings=notes,
    )


def _white_is_zero_inverted(pixels: np.ndarray, bits: int) -> np.ndarray:
    """TIFF WhiteIsZero (as DICOM MONOCHROME1) made bone bright: over the bit depth, or the data range for floats."""
    values = pixels.astype(np.float64)
    if np.issubdtype(pixels.dtype, np.floating):
        return values.min() + values.max() - values
    return float(2 ** bits - 1) - values


GREY_TOLERANCE = 10
"""A pixel whose 8-bit channels differ by at most this much is grey: JPEG and colour-managed exports of a grey
radiograph stored as RGB differ by a few counts."""
MAX_COLOURED_SHARE = 0.02
"""Coloured pixels (spread above GREY_TOLERANCE) up to this share are burned-in annotations or markers: the image
is read as grey and the result flagged for review. More, and it is not a radiograph (a photo, a heatmap overlay)."""


def _pillow_gray(path: Path, image) -> tuple[np.ndarray, list[str]]:
    """Grayscale pixels and notes for the result. An RGB image is read as the mean of its channels when they are
    equal up to GREY_TOLERANCE, and with a note when a few pixels (annotations) are coloured; otherwise refused."""
    if image.mode in ("L", "I", "F") or image.mode.startswith("I;"):
        return np.asarray(image), []
    if image.mode == "1":
        return np.asarray(image.convert("L")), []
    if image.mode in ("LA", "PA", "RGBA") or "transparency" in image.info:
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        if (alpha != 255).any():
            raise RadiographError(
                path, f"image has transparent pixels (mode {image.mode}); expected an opaque radiograph")
    return _grey_from_rgb(path, np.asarray(image.convert("RGB")), f"mode {image.mode}")


def _grey_from_rgb(path: Path | str, rgb: np.ndarray, kind: str) -> tuple[np.ndarray, list[str]]:
    """8-bit RGB (H, W, 3) of a grey radiograph: its grey and notes, or RadiographError when it is not grey."""
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    if np.array_equal(red, green) and np.array_equal(red, blue):
        return red, []
    spread = rgb.max(axis=2).astype(np.int16) - rgb.min(axis=2)
    coloured = float((spread > GREY_TOLERANCE).mean())
    if coloured > MAX_COLOURED_SHARE:
        raise RadiographError(
            path, f"colour image ({kind}; {coloured:.0%} of pixels coloured, at most "
                  f"{MAX_COLOURED_SHARE:.0%} are taken as annotations); a radiograph must be grayscale")
    notes = [f"colour on {coloured:.2%} of pixels (annotations or markers?), read as grey: check that none lies "
             "on the spine or the aorta"] if coloured else []
    return rgb.mean(axis=2, dtype=np.float32), notes


# --- NRRD / NIfTI ------------------------------------------------------------------------------------------


def _read_nrrd(path: Path) -> Radiograph:
    import nrrd

    header = nrrd.read_header(str(path))
    sizes = [int(n) for n in header.get("sizes", [])]
    if int(np.prod(sizes, dtype=np.int64)) > MAX_PIXELS:
        raise RadiographError(path, f"image too large (sizes {sizes}; at most {MAX_PIXELS:,} pixels)")
    data, header = nrrd.read(str(path), index_order="C")  # C order: (..., rows, cols)
    kinds = [str(k).lower() for k in header.get("kinds", [])]
    if any("color" in k for k in kinds):
        raise RadiographError(path, f"colour NRRD (kinds {kinds}); a radiograph must be grayscale")
    if data.ndim == 3 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 2:
        raise RadiographError(path, f"NRRD has {data.ndim} dimensions {data.shape}; expected one 2D image")
    spacing, source = None, "unknown"
    directions = header.get("space directions")
    if directions is not None:
        # Header axes run fastest first: axis 0 is columns, axis 1 rows.
        norms = [float(np.linalg.norm(np.asarray(d, dtype=float))) for d in list(directions)[:2]]
        spacing, source = _valid_spacing((norms[1], norms[0])), "NRRD space directions"
    elif header.get("spacings") is not None:
        spacings = list(header["spacings"])[:2]
        spacing, source = _valid_spacing((spacings[1], spacings[0])), "NRRD spacings"
    return Radiograph(
        pixels=np.ascontiguousarray(data, dtype=np.float32),
        spacing=spacing,
        spacing_source=source if spacing is not None else "unknown",
        path=str(path),
        format="NRRD",
        metadata={"type": str(header.get("type", "")), "space": str(header.get("space", ""))},
    )


def _read_nifti(path: Path) -> Radiograph:
    import nibabel

    image = nibabel.load(str(path))
    if image.get_data_dtype().names:  # RGB24 and other structured voxel types
        raise RadiographError(path, f"colour NIfTI (voxel type {image.get_data_dtype()}); expected grayscale")
    shape = image.shape
    if len(shape) < 2 or any(n != 1 for n in shape[2:]):
        raise RadiographError(path, f"NIfTI has shape {shape}; expected one 2D image")
    _check_size(path, shape[1], shape[0])
    data = np.asarray(image.dataobj).reshape(shape[:2])
    if np.iscomplexobj(data):
        raise RadiographError(path, "NIfTI has complex voxels; expected a real grayscale image")
    # NIfTI's first voxel axis is x (columns), the second y (rows), as ITK and Slicer write 2D images.
    zoom_i, zoom_j = (float(z) for z in image.header.get_zooms()[:2])
    unit = image.header.get_xyzt_units()[0]
    scale = {"meter": 1000.0, "mm": 1.0, "micron": 0.001}.get(unit, 1.0)
    spacing = _valid_spacing((zoom_j * scale, zoom_i * scale))
    source = "NIfTI header" if unit in ("meter", "mm", "micron") else "NIfTI header (units unknown, assumed mm)"
    return Radiograph(
        pixels=np.ascontiguousarray(data.T, dtype=np.float32),
        spacing=spacing,
        spacing_source=source if spacing is not None else "unknown",
        path=str(path),
        format="NIfTI",
        metadata={"datatype": str(image.get_data_dtype()), "units": str(unit)},
    )

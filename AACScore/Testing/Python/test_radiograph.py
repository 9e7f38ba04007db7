"""read_radiograph: every format, the pixel and spacing conventions, and one error type for every bad input."""

from __future__ import annotations

import time
from pathlib import Path

import nibabel
import nrrd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ComprehensiveSRStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from AACScoreLib.errors import RadiographError
from AACScoreLib.io.radiograph import Radiograph, read_radiograph

CORPUS = Path(pydicom.__file__).parent / "data" / "test_files"
CORPUS_FILES = sorted(p for p in CORPUS.rglob("*") if p.is_file())
PYDICOM_3 = int(pydicom.__version__.split(".")[0]) >= 3
"""These tests also run with pydicom 2.4 (3D Slicer 5.10 bundles it): a venv with numpy, pillow and pydicom 2.4.4."""


# --- pydicom's test corpus: read as a 2D grayscale radiograph, or a RadiographError naming the file ------------


@pytest.mark.filterwarnings("ignore")  # pydicom warns about the corpus's deliberately odd files
@pytest.mark.parametrize("path", CORPUS_FILES, ids=[str(p.relative_to(CORPUS)) for p in CORPUS_FILES])
def test_corpus_file_reads_or_raises_radiograph_error(path):
    try:
        radiograph = read_radiograph(path)
    except RadiographError as exc:
        assert str(path) in str(exc)
        assert exc.problem
        return
    assert radiograph.pixels.ndim == 2
    assert radiograph.pixels.dtype == np.float32
    assert np.isfinite(radiograph.pixels).all()
    assert min(radiograph.pixels.shape) >= 64
    assert radiograph.format == "DICOM"


def test_corpus_has_enough_files():
    assert len(CORPUS_FILES) > 150


@pytest.mark.filterwarnings("ignore:The pixel data is")  # MR_small_padded's padding, on purpose
@pytest.mark.parametrize("name", [
    "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm",
    "MR_small_expb.dcm", "MR_small_implicit.dcm", "MR_small_padded.dcm",
])
def test_corpus_lossless_variants_match_uncompressed(name):
    reference = read_radiograph(CORPUS / "MR_small.dcm")
    assert reference.spacing == pytest.approx((0.3125, 0.3125))
    assert reference.spacing_source == "PixelSpacing"
    np.testing.assert_array_equal(read_radiograph(CORPUS / name).pixels, reference.pixels)


def test_corpus_ct_applies_rescale():
    radiograph = read_radiograph(CORPUS / "CT_small.dcm")
    ds = pydicom.dcmread(CORPUS / "CT_small.dcm")
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(radiograph.pixels, expected)
    assert radiograph.metadata["Modality"] == "CT"


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name, reason", [
    ("rtplan.dcm", "no pixel data"),
    ("rtstruct.dcm", "no pixel data"),
    ("test-SR.dcm", "no pixel data"),
    ("dicomdirtests/DICOMDIR", "no pixel data"),
    ("waveform_ecg.dcm", "no pixel data"),
    ("SC_rgb_rle.dcm", "colour"),
    *[("examples_palette.dcm", "PALETTE COLOR")] * PYDICOM_3,  # pydicom 2 downloads these two on demand
    ("SC_ybr_full_422_uncompressed.dcm", "colour"),
    ("rtdose.dcm", "multi-frame"),
    *[("examples_ybr_color.dcm", "multi-frame")] * PYDICOM_3,
    ("rtdose_1frame.dcm", "too small"),
    ("MR_truncated.dcm", "pixel data"),
    ("README.txt", "unrecognised file format"),
    ("zipMR.gz", "gzip"),
])
def test_corpus_rejections_say_why(name, reason):
    with pytest.raises(RadiographError, match=reason):
        read_radiograph(CORPUS / name)


# --- files written here -----------------------------------------------------------------------------------


def _header(sop_class: str, modality: str) -> Dataset:
    """A dataset with file meta, SOP class and instance, and modality: what every test file starts with."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = modality
    return ds


def _dicom(pixels: np.ndarray, bits_stored: int = 12, **tags) -> Dataset:
    """A minimal DX DICOM dataset holding `pixels` (uint16), with extra tags by keyword."""
    ds = _header(DigitalXRayImageStorageForPresentation, "DX")
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    if PYDICOM_3:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.save_as(path, write_like_original=False)
    return path


def _compress(ds: Dataset, syntax) -> None:
    if not PYDICOM_3 and syntax != RLELossless:
        pytest.skip(f"pydicom 2 cannot encode {syntax.name} (its decoding is tested on the corpus files)")
    ds.compress(syntax)


@pytest.fixture
def stored() -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, 4096, size=(96, 80)).astype(np.uint16)


def test_dicom_monochrome2_metadata_and_orientation(tmp_path, stored):
    path = _save(_dicom(stored, PatientOrientation=["A", "F"], ViewPosition="LL", ImageLaterality="U",
                        Manufacturer="ACME"), tmp_path / "a.dcm")
    radiograph = read_radiograph(path)
    assert isinstance(radiograph, Radiograph)
    assert radiograph.format == "DICOM"
    assert radiograph.path == str(path)
    assert radiograph.pixels.dtype == np.float32 and radiograph.pixels.shape == (96, 80)
    np.testing.assert_array_equal(radiograph.pixels, stored)
    assert radiograph.patient_orientation == ("A", "F")
    assert radiograph.view_position == "LL"
    assert radiograph.image_laterality == "U"
    assert radiograph.metadata["Manufacturer"] == "ACME"
    assert radiograph.metadata["PhotometricInterpretation"] == "MONOCHROME2"
    assert radiograph.metadata["TransferSyntaxUID"] == ExplicitVRLittleEndian
    assert radiograph.metadata["BitsStored"] == "12"


def test_dicom_without_orientation_gives_none(tmp_path, stored):
    radiograph = read_radiograph(_save(_dicom(stored), tmp_path / "a.dcm"))
    assert radiograph.patient_orientation is None
    assert radiograph.view_position is None
    assert radiograph.image_laterality is None


def test_monochrome1_is_inverted_over_the_stored_range(tmp_path, stored):
    radiograph = read_radiograph(_save(_dicom(stored, PhotometricInterpretation="MONOCHROME1"), tmp_path / "m1.dcm"))
    np.testing.assert_array_equal(radiograph.pixels, 4095.0 - stored)


@pytest.mark.parametrize("photometric, shape, inverted", [
    ("MONOCHROME2", "INVERSE", True),  # some CR: shown inverted
    ("MONOCHROME1", "INVERSE", True),  # DX: the two go together and mean one inversion
    ("MONOCHROME2", "IDENTITY", False),
])
def test_presentation_lut_shape_inverse(tmp_path, stored, photometric, shape, inverted):
    path = _save(_dicom(stored, PhotometricInterpretation=photometric, PresentationLUTShape=shape),
                 tmp_path / "p.dcm")
    np.testing.assert_array_equal(read_radiograph(path).pixels, 4095.0 - stored if inverted else stored)


def test_rescale_slope_and_intercept_are_applied(tmp_path, stored):
    path = _save(_dicom(stored, RescaleSlope="0.5", RescaleIntercept="-100"), tmp_path / "r.dcm")
    np.testing.assert_allclose(read_radiograph(path).pixels, stored * 0.5 - 100)


def test_monochrome1_with_rescale_inverts_the_rescaled_range(tmp_path, stored):
    path = _save(_dicom(stored, PhotometricInterpretation="MONOCHROME1", RescaleSlope="2", RescaleIntercept="-1000"),
                 tmp_path / "m1r.dcm")
    low, high = -1000.0, 4095 * 2 - 1000.0
    np.testing.assert_allclose(read_radiograph(path).pixels, low + high - (stored * 2.0 - 1000))


def _voi_lut_item(lut: np.ndarray, first_mapped: int = 0, bits: int = 16, explanation: str = "") -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(lut), first_mapped, bits]
    item.LUTData = np.asarray(lut, dtype="<u2").tobytes()  # OW, as modalities write it
    if explanation:
        item.LUTExplanation = explanation
    return item


GAMMA_LUT = np.round(65535 * (np.arange(4096) / 4095.0) ** 2.5).astype(np.uint16)  # a processing curve


def test_voi_lut_sequence_is_applied_as_a_viewer_shows_it(tmp_path, stored):
    ds = _dicom(stored, WindowCenter="2048", WindowWidth="4096")
    ds.VOILUTSequence = [_voi_lut_item(GAMMA_LUT, explanation="SOFT"), _voi_lut_item(GAMMA_LUT[::-1].copy())]
    radiograph = read_radiograph(_save(ds, tmp_path / "voi.dcm"))
    np.testing.assert_array_equal(radiograph.pixels, GAMMA_LUT[stored])
    assert radiograph.metadata["VOITransform"] == "VOI LUT Sequence, item 1 of 2 (SOFT)"
    assert radiograph.read_warnings == []


def test_voi_lut_sequence_maps_values_below_its_first_entry_to_the_first(tmp_path, stored):
    ds = _dicom(stored)
    ds.VOILUTSequence = [_voi_lut_item(GAMMA_LUT[1000:], first_mapped=1000)]
    pixels = read_radiograph(_save(ds, tmp_path / "voi.dcm")).pixels
    np.testing.assert_array_equal(pixels, GAMMA_LUT[np.maximum(stored, 1000)])


def test_monochrome1_with_voi_lut_inverts_the_lut_output(tmp_path, stored):
    ds = _dicom(stored, PhotometricInterpretation="MONOCHROME1")
    ds.VOILUTSequence = [_voi_lut_item(GAMMA_LUT)]
    pixels = read_radiograph(_save(ds, tmp_path / "voi1.dcm")).pixels
    np.testing.assert_array_equal(pixels, 65535.0 - GAMMA_LUT[stored])


def test_a_linear_window_is_not_applied(tmp_path, stored):
    """The models scale intensities between percentiles, which undoes a linear window; its clipping would lose
    what lies outside it."""
    ds = _dicom(stored, WindowCenter="1000", WindowWidth="400", VOILUTFunction="LINEAR")
    radiograph = read_radiograph(_save(ds, tmp_path / "w.dcm"))
    np.testing.assert_array_equal(radiograph.pixels, stored)
    assert "VOITransform" not in radiograph.metadata


def test_a_sigmoid_window_is_applied(tmp_path, stored):
    ds = _dicom(stored, WindowCenter="2000", WindowWidth="1000", VOILUTFunction="SIGMOID")
    radiograph = read_radiograph(_save(ds, tmp_path / "s.dcm"))
    expected = 4095.0 / (1 + np.exp(-4 * (stored - 2000.0) / 1000.0))  # PS3.3 C.11.2.1.3.1, output 0..4095
    np.testing.assert_allclose(radiograph.pixels, expected, rtol=1e-4, atol=1e-3)
    assert radiograph.metadata["VOITransform"] == "SIGMOID window, the first"


def test_a_voi_lut_that_cannot_be_applied_is_left_out_and_noted(tmp_path, stored):
    ds = _dicom(stored)
    ds.VOILUTSequence = [_voi_lut_item(GAMMA_LUT, bits=9)]  # 9 bits per entry: not allowed by PS3.3
    radiograph = read_radiograph(_save(ds, tmp_path / "bad.dcm"))
    np.testing.assert_array_equal(radiograph.pixels, stored)
    assert len(radiograph.read_warnings) == 1
    assert "VOI LUT Sequence, item 1 of 1 could not be applied" in radiograph.read_warnings[0]
    assert "read without it" in radiograph.read_warnings[0]


def test_raw_detector_data_is_noted(tmp_path, stored):
    radiograph = read_radiograph(_save(_dicom(stored, PresentationIntentType="FOR PROCESSING"), tmp_path / "raw.dcm"))
    np.testing.assert_array_equal(radiograph.pixels, stored)
    assert any("FOR PROCESSING" in note for note in radiograph.read_warnings)


@pytest.mark.parametrize("tags, spacing, source", [
    ({"PixelSpacing": [0.2, 0.1], "ImagerPixelSpacing": [0.3, 0.3]}, (0.2, 0.1), "PixelSpacing"),
    ({"ImagerPixelSpacing": [0.18, 0.12], "EstimatedRadiographicMagnificationFactor": "1.2"}, (0.15, 0.1),
     "ImagerPixelSpacing corrected by EstimatedRadiographicMagnificationFactor"),
    ({"ImagerPixelSpacing": [0.18, 0.12]}, (0.18, 0.12), "ImagerPixelSpacing"),
    ({"PixelSpacing": [0, 0.1], "ImagerPixelSpacing": [0.18, 0.12]}, (0.18, 0.12), "ImagerPixelSpacing"),
    ({"ImagerPixelSpacing": [0.18, 0.12], "EstimatedRadiographicMagnificationFactor": "0"}, (0.18, 0.12),
     "ImagerPixelSpacing"),
    ({"PixelSpacing": [-0.1, 0.1]}, None, "unknown"),
    ({}, None, "unknown"),
])
def test_dicom_spacing_sources(tmp_path, stored, tags, spacing, source):
    radiograph = read_radiograph(_save(_dicom(stored, **tags), tmp_path / "s.dcm"))
    assert radiograph.spacing_source == source
    if spacing is None:
        assert radiograph.spacing is None
    else:
        assert radiograph.spacing == pytest.approx(spacing)


def test_invalid_spacing_is_reported_in_metadata(tmp_path, stored):
    radiograph = read_radiograph(_save(_dicom(stored, PixelSpacing=[0, 0.1]), tmp_path / "s.dcm"))
    assert radiograph.spacing is None
    assert "PixelSpacing" in radiograph.metadata["SpacingProblem"]


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless], ids=lambda s: s.name)
def test_compressed_dicom_reads_back_exactly(tmp_path, stored, syntax):
    ds = _dicom(stored, PixelSpacing=[0.15, 0.15])
    _compress(ds, syntax)
    radiograph = read_radiograph(_save(ds, tmp_path / "c.dcm"))
    np.testing.assert_array_equal(radiograph.pixels, stored)
    assert radiograph.metadata["TransferSyntaxUID"] == syntax
    assert radiograph.spacing == pytest.approx((0.15, 0.15))


@pytest.mark.parametrize("implicit_vr, little_endian", [(True, True), (False, True), (False, False)])
def test_dicom_without_file_meta_reads(tmp_path, stored, implicit_vr, little_endian):
    ds = _dicom(stored)
    del ds.file_meta
    ds.PixelData = stored.astype("<u2" if little_endian else ">u2").tobytes()
    path = tmp_path / "no_meta.dcm"
    if PYDICOM_3:
        ds.save_as(path, implicit_vr=implicit_vr, little_endian=little_endian, enforce_file_format=False)
    else:
        ds.is_implicit_VR, ds.is_little_endian = implicit_vr, little_endian
        ds.save_as(path, write_like_original=True)
    assert path.read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(read_radiograph(path).pixels, stored)


def test_dicom_with_wrong_extension_reads(tmp_path, stored):
    radiograph = read_radiograph(_save(_dicom(stored), tmp_path / "image.png"))
    assert radiograph.format == "DICOM"
    np.testing.assert_array_equal(radiograph.pixels, stored)


def test_large_dicom_reads_fast(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 4096, size=(3000, 2400)).astype(np.uint16)
    ds = _dicom(pixels, RescaleSlope="1", RescaleIntercept="0", PixelSpacing=[0.15, 0.15])
    path = _save(ds, tmp_path / "big.dcm")
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        radiograph = read_radiograph(path)
        best = min(best, time.perf_counter() - start)
    assert radiograph.pixels.shape == (3000, 2400)
    assert best < 0.5, f"reading a 3000x2400 DICOM took {best:.2f} s"


def test_png_8_bit(tmp_path):
    pixels = np.random.default_rng(2).integers(0, 256, size=(70, 90)).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    radiograph = read_radiograph(tmp_path / "a.png")
    assert radiograph.format == "PNG"
    assert radiograph.pixels.dtype == np.float32
    np.testing.assert_array_equal(radiograph.pixels, pixels)
    assert radiograph.spacing is None and radiograph.spacing_source == "unknown"


def test_png_16_bit(tmp_path):
    pixels = np.random.default_rng(3).integers(0, 65536, size=(70, 90)).astype(np.uint16)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_radiograph(tmp_path / "a.png").pixels, pixels)


def test_gray_png_stored_as_rgb_is_accepted(tmp_path):
    pixels = np.random.default_rng(4).integers(0, 256, size=(70, 90)).astype(np.uint8)
    Image.fromarray(np.stack([pixels] * 3, axis=-1)).save(tmp_path / "rgb_gray.png")
    np.testing.assert_array_equal(read_radiograph(tmp_path / "rgb_gray.png").pixels, pixels)


def test_colour_png_is_rejected(tmp_path):
    rgb = np.random.default_rng(5).integers(0, 256, size=(70, 90, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    with pytest.raises(RadiographError, match="colour image .* 9[0-9]% of pixels coloured") as info:
        read_radiograph(tmp_path / "colour.png")
    assert str(tmp_path / "colour.png") in str(info.value)


def test_gray_jpeg_stored_as_near_gray_rgb_is_read_as_the_mean_of_its_channels(tmp_path):
    """Colour-managed exports of a grey radiograph differ by a few counts per channel: still grey, no note."""
    pixels = np.random.default_rng(6).integers(20, 230, size=(70, 90)).astype(np.int16)
    tint = np.random.default_rng(7).integers(-3, 4, size=(70, 90, 3))
    Image.fromarray((pixels[..., None] + tint).astype(np.uint8)).save(tmp_path / "near_gray.png")
    radiograph = read_radiograph(tmp_path / "near_gray.png")
    assert np.abs(radiograph.pixels - pixels).max() <= 3
    assert radiograph.read_warnings == []


def test_coloured_annotations_are_read_as_gray_with_a_note_that_flags_the_result(tmp_path):
    pixels = np.random.default_rng(8).integers(0, 256, size=(100, 100)).astype(np.uint8)
    rgb = np.stack([pixels] * 3, axis=-1)
    rgb[10:20, 10:20] = (255, 0, 0)  # a red marker: 1% of the pixels
    Image.fromarray(rgb).save(tmp_path / "marked.png")
    radiograph = read_radiograph(tmp_path / "marked.png")
    np.testing.assert_array_equal(radiograph.pixels[30:, 30:], pixels[30:, 30:])
    assert radiograph.pixels[15, 15] == 85  # the mean of (255, 0, 0)
    assert radiograph.read_warnings == [
        "colour on 1.00% of pixels (annotations or markers?), read as grey: check that none lies on the spine or "
        "the aorta"]


def test_jpeg(tmp_path):
    rows, cols = np.mgrid[0:80, 0:100]
    pixels = (rows * 2 + cols).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=95)
    radiograph = read_radiograph(tmp_path / "a.jpg")
    assert radiograph.format == "JPEG"
    assert radiograph.spacing is None and radiograph.spacing_source == "unknown"
    assert np.abs(radiograph.pixels - pixels).mean() < 2


@pytest.mark.parametrize("compression", [None, "tiff_lzw", "tiff_adobe_deflate"])
def test_tiff_16_bit(tmp_path, compression):
    pixels = np.random.default_rng(11).integers(0, 65536, size=(70, 90)).astype(np.uint16)
    Image.fromarray(pixels).save(tmp_path / "a.tif", compression=compression)
    radiograph = read_radiograph(tmp_path / "a.tif")
    assert radiograph.format == "TIFF"
    np.testing.assert_array_equal(radiograph.pixels, pixels)
    assert radiograph.spacing is None and radiograph.spacing_source == "unknown"


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_white_is_zero_tiff_is_inverted_like_monochrome1(tmp_path, dtype):
    """Bone bright whatever the file says: Pillow inverts 8-bit WhiteIsZero itself, the reader the 16-bit one."""
    top = np.iinfo(dtype).max
    pixels = np.random.default_rng(12).integers(0, top, size=(70, 90), endpoint=True).astype(dtype)
    Image.fromarray(pixels).save(tmp_path / "white_is_zero.tif", tiffinfo={262: 0})
    stored = Image.open(tmp_path / "white_is_zero.tif")
    assert stored.tag_v2[262] == 0
    raw = pixels if dtype == np.uint16 else top - pixels  # Pillow writes 8-bit WhiteIsZero inverted
    assert raw.tobytes() in (tmp_path / "white_is_zero.tif").read_bytes()
    np.testing.assert_array_equal(read_radiograph(tmp_path / "white_is_zero.tif").pixels,
                                  top - raw.astype(np.float32))


def test_multi_page_tiff_is_rejected(tmp_path):
    pages = [Image.fromarray(np.full((70, 90), value, np.uint8)) for value in (10, 20)]
    pages[0].save(tmp_path / "pages.tif", save_all=True, append_images=pages[1:])
    _expect_error(tmp_path / "pages.tif", r"multi-page TIFF \(2 frames\)")


def test_png_with_dcm_extension_reads_as_png(tmp_path):
    pixels = np.random.default_rng(6).integers(0, 256, size=(70, 90)).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "actually_png.dcm", format="PNG")
    radiograph = read_radiograph(tmp_path / "actually_png.dcm")
    assert radiograph.format == "PNG"
    np.testing.assert_array_equal(radiograph.pixels, pixels)


def test_nrrd_with_spacing(tmp_path, stored):
    # pynrrd's default (Fortran) order: the first axis is the fastest, i.e. columns.
    header = {"space": "left-posterior-superior", "space directions": [[0.1, 0, 0], [0, 0.2, 0]],
              "space origin": [0, 0, 0]}
    nrrd.write(str(tmp_path / "a.nrrd"), stored.T.copy(), header)
    radiograph = read_radiograph(tmp_path / "a.nrrd")
    assert radiograph.format == "NRRD"
    np.testing.assert_array_equal(radiograph.pixels, stored)
    assert radiograph.spacing == pytest.approx((0.2, 0.1))
    assert radiograph.spacing_source == "NRRD space directions"


def test_nrrd_with_singleton_third_dimension_is_2d(tmp_path, stored):
    nrrd.write(str(tmp_path / "a.nrrd"), stored[None], index_order="C")
    np.testing.assert_array_equal(read_radiograph(tmp_path / "a.nrrd").pixels, stored)


def test_3d_nrrd_is_rejected(tmp_path, stored):
    nrrd.write(str(tmp_path / "vol.nrrd"), np.stack([stored] * 3), index_order="C")
    with pytest.raises(RadiographError, match="3 dimensions"):
        read_radiograph(tmp_path / "vol.nrrd")


@pytest.mark.parametrize("name", ["a.nii", "a.nii.gz"])
def test_nifti_with_spacing(tmp_path, stored, name):
    # NIfTI's first voxel axis is x (columns), so the file holds the transposed array; zooms (col, row) mm.
    image = nibabel.Nifti1Image(stored.T[:, :, None].astype(np.int16), np.diag([0.1, 0.2, 1.0, 1.0]))
    image.header.set_xyzt_units("mm")
    nibabel.save(image, tmp_path / name)
    radiograph = read_radiograph(tmp_path / name)
    assert radiograph.format == "NIfTI"
    np.testing.assert_array_equal(radiograph.pixels, stored)
    assert radiograph.spacing == pytest.approx((0.2, 0.1))
    assert radiograph.spacing_source == "NIfTI header"


# --- errors: always RadiographError, naming the file and the problem -----------------------------------------


def _expect_error(path: Path, match: str) -> None:
    with pytest.raises(RadiographError, match=match) as info:
        read_radiograph(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    _expect_error(tmp_path / "nowhere.dcm", "does not exist")


def test_folder(tmp_path):
    _expect_error(tmp_path, "folder")


def test_zero_bytes(tmp_path):
    (tmp_path / "empty.dcm").write_bytes(b"")
    _expect_error(tmp_path / "empty.dcm", "empty")


def test_truncated_dicom(tmp_path, stored):
    data = _save(_dicom(stored), tmp_path / "full.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) // 2])
    _expect_error(tmp_path / "cut.dcm", "pixel data")


def test_truncated_png(tmp_path, stored):
    Image.fromarray(stored).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    _expect_error(tmp_path / "cut.png", "cannot be read")


def test_garbage_with_dcm_extension(tmp_path):
    (tmp_path / "garbage.dcm").write_bytes(np.random.default_rng(8).bytes(5000))
    _expect_error(tmp_path / "garbage.dcm", "unrecognised file format")


def test_garbage_with_dicom_preamble(tmp_path):
    (tmp_path / "garbage.dcm").write_bytes(b"\0" * 128 + b"DICM" + np.random.default_rng(9).bytes(5000))
    _expect_error(tmp_path / "garbage.dcm", "corrupt or not an image")


def test_unsupported_extension(tmp_path):
    (tmp_path / "notes.txt").write_text("lateral lumbar spine\n")
    _expect_error(tmp_path / "notes.txt", "unrecognised file format")


def test_multi_frame_dicom(tmp_path):
    frames = np.zeros((3, 80, 80), np.uint16)
    _expect_error(_save(_dicom(frames, NumberOfFrames=3), tmp_path / "mf.dcm"), "multi-frame")


def _rgb_dicom(rgb: np.ndarray, path: Path) -> Path:
    ds = _dicom(np.zeros(rgb.shape[:2], np.uint16), PhotometricInterpretation="RGB", SamplesPerPixel=3)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PlanarConfiguration = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(rgb, np.uint8).tobytes()
    return _save(ds, path)


def test_colour_dicom(tmp_path):
    rgb = np.random.default_rng(13).integers(0, 256, size=(80, 80, 3)).astype(np.uint8)
    _expect_error(_rgb_dicom(rgb, tmp_path / "rgb.dcm"), r"colour image \(DICOM, PhotometricInterpretation RGB; 9")


def test_grey_dicom_stored_as_rgb_is_read_as_grey_and_marks_are_noted(tmp_path):
    """A radiograph kept as an RGB secondary capture, as some film digitisers and viewers store it."""
    grey = np.random.default_rng(14).integers(0, 256, size=(100, 100)).astype(np.uint8)
    rgb = np.stack([grey] * 3, axis=-1)
    plain = read_radiograph(_rgb_dicom(rgb, tmp_path / "grey.dcm"))
    np.testing.assert_array_equal(plain.pixels, grey)
    assert plain.read_warnings == [] and plain.format == "DICOM"
    rgb[5:15, 5:15] = (0, 200, 0)
    marked = read_radiograph(_rgb_dicom(rgb, tmp_path / "marked.dcm"))
    np.testing.assert_array_equal(marked.pixels[20:, 20:], grey[20:, 20:])
    assert marked.read_warnings[0].startswith("colour on 1.00% of pixels")


def test_16_bit_rgb_dicom_is_refused_before_decoding(tmp_path):
    ds = _dicom(np.zeros((80, 80), np.uint16), PhotometricInterpretation="RGB", SamplesPerPixel=3)
    ds.PlanarConfiguration = 0
    ds.PixelData = np.zeros((80, 80, 3), np.uint16).tobytes()
    _expect_error(_save(ds, tmp_path / "rgb16.dcm"), "PhotometricInterpretation RGB, SamplesPerPixel 3")


def test_sr_without_pixel_data(tmp_path):
    ds = _header(ComprehensiveSRStorage, "SR")
    _expect_error(_save(ds, tmp_path / "sr.dcm"), "no pixel data .Comprehensive SR Storage.")


def test_too_small_image(tmp_path):
    Image.fromarray(np.zeros((40, 200), np.uint8)).save(tmp_path / "thin.png")
    _expect_error(tmp_path / "thin.png", "too small")


def test_header_claiming_a_huge_image_is_rejected_before_decoding(tmp_path, stored):
    ds = _dicom(stored)
    ds.Rows, ds.Columns = 12000, 12000
    _expect_error(_save(ds, tmp_path / "huge.dcm"), "too large")


def test_nan_pixels_in_nrrd(tmp_path, stored):
    values = stored.astype(np.float32)
    values[3, 4] = np.nan
    nrrd.write(str(tmp_path / "nan.nrrd"), values, index_order="C")
    _expect_error(tmp_path / "nan.nrrd", "NaN")


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("kind", ["dcm", "png", "tif", "rle.dcm"])
def test_damaged_files_only_raise_radiograph_error(tmp_path, stored, kind):
    """Cut and scrambled copies of a good file: each reads or raises RadiographError, nothing else escapes."""
    good = tmp_path / f"good.{kind}"
    if kind in ("png", "tif"):
        Image.fromarray(stored).save(good)
    else:
        ds = _dicom(stored)
        if kind == "rle.dcm":
            _compress(ds, RLELossless)
        _save(ds, good)
    data = good.read_bytes()
    rng = np.random.default_rng(10)
    for i in range(40):
        damaged = bytearray(data[: rng.integers(1, len(data))] if i % 2 else data)
        for position in rng.integers(0, len(damaged), size=8):
            damaged[position] = rng.integers(0, 256)
        path = tmp_path / f"damaged_{i}.{kind}"
        path.write_bytes(bytes(damaged))
        try:
            read_radiograph(path)
        except RadiographError as exc:
            assert str(path) in str(exc)

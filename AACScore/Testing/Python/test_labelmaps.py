"""Reading label maps written by other tools."""

from __future__ import annotations

import nrrd
import numpy as np
import pytest
from PIL import Image

from AACScoreLib.errors import GeometryError, RadiographError
from AACScoreLib.io.labelmaps import read_label_map


def _labels() -> np.ndarray:
    labels = np.zeros((40, 30), np.uint8)
    for value in range(1, 6):
        labels[value * 6: value * 6 + 4, 5:25] = value
    return labels


def test_png_grey_as_rgb_and_nrrd_read_the_same(tmp_path):
    labels = _labels()
    Image.fromarray(labels).save(tmp_path / "a_labels.png")
    Image.fromarray(np.repeat(labels[..., None], 3, axis=2)).save(tmp_path / "b_labels.png")
    nrrd.write(str(tmp_path / "c_labels.nrrd"), labels, index_order="C")
    for name in ("a_labels.png", "b_labels.png", "c_labels.nrrd"):
        read = read_label_map(tmp_path / name, labels.shape)
        assert read.dtype == np.uint8 and np.array_equal(read, labels), name


def test_bad_label_maps_say_what_is_wrong(tmp_path):
    labels = _labels()
    Image.fromarray(labels).save(tmp_path / "ok_labels.png")
    with pytest.raises(GeometryError, match=r"label map is \(40, 30\), its image is \(41, 30\)"):
        read_label_map(tmp_path / "ok_labels.png", (41, 30))
    Image.fromarray(labels * 2).save(tmp_path / "big_labels.png")
    with pytest.raises(GeometryError, match="big_labels.png: label values must be 0..5"):
        read_label_map(tmp_path / "big_labels.png")
    colour = np.stack([labels, labels * 0, labels], axis=2)
    Image.fromarray(colour).save(tmp_path / "colour_labels.png")
    with pytest.raises(GeometryError, match="one grayscale channel"):
        read_label_map(tmp_path / "colour_labels.png")
    (tmp_path / "junk_labels.png").write_bytes(b"junk")
    with pytest.raises(RadiographError, match="junk_labels.png: cannot be read as a label map"):
        read_label_map(tmp_path / "junk_labels.png")
    with pytest.raises(GeometryError, match="give the radiograph too"):
        read_label_map(tmp_path / "x.seg.nrrd")


def test_context_classes_read_as_background_unless_asked_for(tmp_path):
    from AACScoreLib.kauppila import CONTEXT_LABELS

    labels = _labels()
    labels[:4, 5:25] = CONTEXT_LABELS["T12"]
    labels[36:, 5:25] = CONTEXT_LABELS["S1"]
    Image.fromarray(labels).save(tmp_path / "context_labels.png")
    plain = read_label_map(tmp_path / "context_labels.png", labels.shape)
    assert np.array_equal(plain, np.where(labels <= 5, labels, 0)) and plain.dtype == np.uint8
    assert np.array_equal(read_label_map(tmp_path / "context_labels.png", context=True), labels)
    Image.fromarray(np.where(labels == 7, 8, labels).astype(np.uint8)).save(tmp_path / "eight_labels.png")
    with pytest.raises(GeometryError, match=r"eight_labels.png: label values must be 0..5 \(L1..L5\) or 6, 7"):
        read_label_map(tmp_path / "eight_labels.png", context=True)
    nan = labels.astype(np.float32)
    nan[0, 0] = np.nan
    nrrd.write(str(tmp_path / "nan_labels.nrrd"), nan, index_order="C")
    with pytest.raises(GeometryError, match="nan_labels.nrrd: label values must be whole numbers"):
        read_label_map(tmp_path / "nan_labels.nrrd")


def test_seg_nrrd_context_segments_are_read_by_name_on_request(tmp_path):
    import slicerio

    from AACScoreLib.io.labelmaps import context_of_segment

    assert [context_of_segment(n) for n in ("T12", "t 12 vertebra", "S1 (top of sacrum)", "L1", "T11", "S12")] == \
        ["T12", "T12", "S1", None, None, None]
    labels = _labels()
    shape = labels.shape
    segmentation = slicerio.create_segmentation((shape[1], shape[0], 1), np.diag([0.2, 0.2, 1.0, 1.0]))
    top, bottom = np.zeros(shape, bool), np.zeros(shape, bool)
    top[:4, 5:25], bottom[36:, 5:25] = True, True
    slicerio.add_segment(segmentation, bottom.T[:, :, None], {"name": "S1 (top of sacrum)"})
    for value in (3, 1, 5, 2, 4):
        slicerio.add_segment(segmentation, (labels == value).T[:, :, None], {"name": f"L{value}"})
    slicerio.add_segment(segmentation, top.T[:, :, None], {"name": "T12 vertebra"})
    path = tmp_path / "context.seg.nrrd"
    slicerio.write_segmentation(str(path), segmentation)
    assert np.array_equal(read_label_map(path, shape), labels)
    expected = labels.copy()
    expected[top], expected[bottom] = 6, 7
    assert np.array_equal(read_label_map(path, shape, context=True), expected)

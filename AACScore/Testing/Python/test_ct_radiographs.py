"""Lateral radiographs from a segmented CT: bodies without their arches, orientation, views, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from AACScoreLib.cli import main as cli_main
from AACScoreLib.errors import AACScoreError
from AACScoreLib.evaluation.ct_radiographs import (ID_PRESETS, TOP_MARGIN_MM, make_ct_radiographs, parse_ids,
                                                   patient_mask, vertebral_bodies)
from AACScoreLib.io.labelmaps import read_label_map
from AACScoreLib.io.radiograph import read_radiograph

TS = ID_PRESETS["totalsegmentator"]
LEVELS = ("T12", "L1", "L2", "L3", "L4", "L5", "S1")  # top to bottom
VOXEL = (2.0, 2.0, 2.5)
BODY = (slice(12, 28), slice(30, 45))  # x (left-right), y (back to front)


def _vertebra(z: slice, shape=(40, 60, 90)) -> np.ndarray:
    """A body in front of an arch whose canal the body closes, and a spinous process, over slices z."""
    mask = np.zeros(shape, bool)
    mask[BODY[0], BODY[1], z] = True
    mask[13:27, 18:30, z] = True  # the arch
    mask[16:24, 21:30, z] = False  # the canal, closed in front by the body
    mask[19:21, 8:18, z] = True  # spinous process
    return mask


def _ct(tmp_path, drop: str | None = None, shape=(40, 60, 90)):
    import nibabel

    ct = np.full(shape, -1000, np.int16)
    xx, yy = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    ct[((xx - 20) / 19.0) ** 2 + ((yy - 30) / 29.0) ** 2 <= 1] = 40  # the body outline, soft tissue
    labels = np.zeros(shape, np.uint8)
    for index, name in enumerate(LEVELS):  # superior is +z: T12 at the top
        top = shape[2] - 2 - index * 12
        z = slice(top - 10, top)
        vertebra = _vertebra(z, shape)
        ct[vertebra] = 500
        if name != drop:
            labels[vertebra] = TS[name]
    affine = np.diag([*VOXEL, 1.0])
    paths = tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz"
    nibabel.save(nibabel.Nifti1Image(ct, affine), str(paths[0]))
    nibabel.save(nibabel.Nifti1Image(labels, affine), str(paths[1]))
    return paths


def test_a_body_is_the_part_in_front_of_the_canal():
    vertebra = _vertebra(slice(10, 20))
    body = vertebral_bodies(vertebra, None)
    expected = np.zeros_like(vertebra)
    expected[BODY[0], BODY[1], 10:20] = True
    assert np.array_equal(body, expected)
    mask = np.zeros_like(vertebra)
    mask[:, 40:, :] = True
    assert np.array_equal(vertebral_bodies(vertebra, mask), vertebra & mask)
    solid = np.zeros_like(vertebra)  # no closed canal anywhere: the front share of its depth
    solid[10:30, 10:50, 5:15] = True
    kept = np.flatnonzero(vertebral_bodies(solid, None).any(axis=(0, 2)))
    assert kept.min() == 31 and kept.max() == 49  # 49 - 0.45 * 39, rounded


def test_the_ct_table_is_not_part_of_the_patient():
    ct = np.full((30, 40, 20), -1000.0)
    ct[5:25, 10:35, :] = 40  # the patient
    ct[12:18, 20:26, 5:15] = 600  # bone inside
    ct[:, 2:5, :] = 300  # the table, apart from the patient by air
    mask = patient_mask(ct)
    assert mask[5:25, 10:35, :].all() and not mask[:, 2:5, :].any() and mask.sum() == 20 * 25 * 20
    assert not patient_mask(np.full((4, 4, 4), -1000.0)).any()


def test_lateral_radiographs_with_their_levels(tmp_path):
    ct, seg = _ct(tmp_path)
    written = make_ct_radiographs(ct, seg, tmp_path / "out", TS, angles=(0.0, 10.0), spacing_mm=0.5)
    assert len(written) == 8 and all(path.is_file() for path in written)
    record = json.loads((tmp_path / "out" / "ct_radiographs.json").read_text())
    assert len(record["ct_sha256"]) == 64 and record["images"] == [path.name for path in written]

    right = read_radiograph(tmp_path / "out" / "ct_a+0_right_full.nrrd")
    labels = read_label_map(tmp_path / "out" / "ct_a+0_right_full_labels.png", right.pixels.shape, context=True)
    assert right.spacing == (0.5, 0.5) and right.pixels.shape == (90 * 5, 60 * 4)
    assert set(np.unique(labels)) == set(range(8))
    centres = {v: np.argwhere(labels == v).mean(axis=0) for v in range(1, 8)}
    assert centres[6][0] < centres[1][0] < centres[3][0] < centres[5][0] < centres[7][0]  # superior at the top
    columns = np.flatnonzero((labels == 3).any(axis=0))  # the body only, anterior on the right
    assert abs(columns.min() - 30 * 4) <= 3 and abs(columns.max() - 45 * 4) <= 3
    spine = right.pixels[int(centres[3][0])]
    assert spine[columns].mean() > spine[:columns.min() - 40].mean()  # bone bright

    left = read_label_map(tmp_path / "out" / "ct_a+0_left_full_labels.png", right.pixels.shape, context=True)
    assert np.array_equal(left, labels[:, ::-1])
    top = read_label_map(tmp_path / "out" / "ct_a+0_right_top-at-L1_labels.png", None, context=True)
    assert np.flatnonzero((top == 1).any(axis=1))[0] == TOP_MARGIN_MM / 0.5
    turned = read_label_map(tmp_path / "out" / "ct_a+10_right_full_labels.png", None, context=True)
    assert set(np.unique(turned)) == set(range(8)) and not np.array_equal(turned, labels)


def test_bad_input_is_one_line_naming_the_file(tmp_path):
    ct, seg = _ct(tmp_path, drop="L3")
    with pytest.raises(AACScoreError, match=r"seg\.nii\.gz: no voxel has the label of L3 \(L3=29\)"):
        make_ct_radiographs(ct, seg, tmp_path / "out", TS)
    other = tmp_path / "other"
    other.mkdir()
    _, small = _ct(other, shape=(40, 60, 96))
    with pytest.raises(AACScoreError, match="grid"):
        make_ct_radiographs(ct, small, tmp_path / "out", TS)
    (tmp_path / "broken.nii.gz").write_bytes(b"not a volume")
    with pytest.raises(AACScoreError, match="broken.nii.gz: cannot read the CT"):
        make_ct_radiographs(tmp_path / "broken.nii.gz", seg, tmp_path / "out", TS)
    assert not (tmp_path / "out").exists()
    assert cli_main(["ct-radiographs", str(ct), "--labels", str(seg), "--angles", "60", "--out", str(tmp_path)]) == 2
    assert cli_main(["ct-radiographs", str(ct), "--labels", str(tmp_path / "none.nii.gz"),
                     "--out", str(tmp_path)]) == 2


def test_label_values_by_preset_or_named():
    assert parse_ids("verse")["L1"] == 20 and "S1" not in parse_ids("verse")
    assert parse_ids("L1=1,L2=2,L3=3,L4=4,L5=5,S1=9") == {"L1": 1, "L2": 2, "L3": 3, "L4": 4, "L5": 5, "S1": 9}
    with pytest.raises(AACScoreError, match="no label value for L2, L3, L4, L5"):
        parse_ids("L1=3")
    with pytest.raises(AACScoreError, match="'L7=3' is not NAME=VALUE"):
        parse_ids("L7=3")


def test_a_folder_of_masks_as_totalsegmentator_writes_them(tmp_path):
    import nibabel

    ct, seg = _ct(tmp_path)
    image = nibabel.load(str(seg))
    values = np.asarray(image.dataobj)
    folder = tmp_path / "segmentations"
    folder.mkdir()
    for name in ("L1", "L2", "L3", "L4", "L5", "T12", "S1", "T11"):  # T11: not a level read, and empty
        nibabel.save(nibabel.Nifti1Image((values == TS.get(name, -1)).astype(np.uint8), image.affine),
                     str(folder / f"vertebrae_{name}.nii.gz"))
    from_file = make_ct_radiographs(ct, seg, tmp_path / "a", TS, angles=(0.0,), facings=("right",), views=("full",))
    from_folder = make_ct_radiographs(ct, folder, tmp_path / "b", TS, angles=(0.0,), facings=("right",),
                                      views=("full",))
    labels = [read_label_map(path.with_name(path.stem + "_labels.png"), None, context=True)
              for path in (from_file[0], from_folder[0])]
    assert np.array_equal(*labels) and set(np.unique(labels[0])) == set(range(8))
    record = json.loads((tmp_path / "b" / "ct_radiographs.json").read_text())
    assert set(record["segmentation_sha256"]) == {f"vertebrae_{n}.nii.gz" for n in ("L1", "L2", "L3", "L4", "L5",
                                                                                     "T12", "S1")}
    (folder / "vertebrae_L4.nii.gz").unlink()
    with pytest.raises(AACScoreError, match="segmentations: no vertebrae_<level>.nii.gz with voxels for L4"):
        make_ct_radiographs(ct, folder, tmp_path / "c", TS)

"""`aacscore ct-radiographs`: lateral radiographs computed from a CT scan and its vertebra segmentation, so that level
counting can be tested on real anatomy.

No public lateral radiographs come with their vertebral levels, but CT scans segmented by TotalSegmentator, or
annotated as in VerSe, do. The patient (not the CT's table) is turned about the long axis by each beam angle, its
attenuation (from Hounsfield units, water 0.02 per mm) summed along the left-right axis (a parallel beam: the line
integral a radiograph shows, bone bright), and written facing either way, with the field of view as scanned and cut
just above L1. Its label map holds the projected vertebral bodies: where bodies are crossed over at least
`MIN_PATH_MM`, the one crossed longest (1..5 = L1..L5, 6 = T12, 7 = S1). `aacscore segment-benchmark --cases DIR`
reads the pairs.

They test anatomy and counting, not the look: a radiograph also has a cone beam, scatter, a focal spot and its
maker's processing, which this projection does not add. Bodies come from a body mask when one is given
(TotalSegmentator's `vertebrae_body` task: 1 = body), else from each vertebra's mask, the part in front of the
spinal canal.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from ..errors import AACScoreError
from ..io.atomic import write_text_atomic
from ..io.checksums import sha256_file
from ..io.labelmaps import write_label_png
from ..io.training_set import write_nrrd_2d
from ..kauppila import CONTEXT_LABELS, VERTEBRAE

# Label value of each vertebra in a segmentation, by the tool that wrote it.
ID_PRESETS: dict[str, dict[str, int]] = {
    # TotalSegmentator v2, task "total" (totalsegmentator/map_to_binary.py)
    "totalsegmentator": {"L1": 31, "L2": 30, "L3": 29, "L4": 28, "L5": 27, "T12": 32, "S1": 26},
    # VerSe (Sekuboyina et al. 2021): 8..19 = T1..T12, 20..24 = L1..L5; no S1 label
    "verse": {"L1": 20, "L2": 21, "L3": 22, "L4": 23, "L5": 24, "T12": 19},
}
OUR_VALUE = {**{name: index + 1 for index, name in enumerate(VERTEBRAE)}, **CONTEXT_LABELS}
MU_WATER_PER_MM = 0.02  # linear attenuation of water at about 60 keV
PATIENT_HU = -400.0  # tissue denser than this is the patient's (air and lung below)
MIN_PATH_MM = 6.0  # a pixel belongs to a body crossed over at least this length
BODY_SHARE = 0.45  # the body's share of a vertebra's depth (front to tip of the spinous process)
IN_PLANE_MM = 1.0  # the CT is resampled to at least this in-plane voxel before turning it
TOP_MARGIN_MM = 12.0  # the "top at L1" view starts this far above L1
VIEWS = ("full", "top-at-L1")
FACINGS = ("left", "right")  # the side anterior faces


def parse_ids(text: str) -> dict[str, int]:
    """A preset name, or `L1=31,L2=30,...` (L1..L5 required, T12 and S1 optional)."""
    if text in ID_PRESETS:
        return dict(ID_PRESETS[text])
    ids = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in OUR_VALUE or not value.strip().isdigit():
            raise AACScoreError(f"--ids: '{part}' is not NAME=VALUE with NAME one of {', '.join(OUR_VALUE)} "
                                f"(or a preset: {', '.join(ID_PRESETS)})")
        ids[name] = int(value)
    missing = [name for name in VERTEBRAE if name not in ids]
    if missing:
        raise AACScoreError(f"--ids: no label value for {', '.join(missing)}")
    return ids


def load_volume(path: str | Path, what: str) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
    """(array in RAS order, voxel size in mm, affine) of a NIfTI volume, or a one-line error naming the file."""
    import nibabel

    try:
        image = nibabel.as_closest_canonical(nibabel.load(str(path)))
    except (OSError, ValueError, nibabel.filebasedimages.ImageFileError) as error:
        raise AACScoreError(f"{path}: cannot read the {what} as NIfTI ({error})") from None
    if len(image.shape) != 3:
        raise AACScoreError(f"{path}: the {what} has shape {image.shape}; expected one 3D volume")
    return np.asarray(image.dataobj), tuple(float(z) for z in image.header.get_zooms()[:3]), image.affine


def vertebral_bodies(vertebra: np.ndarray, body_mask: np.ndarray | None) -> np.ndarray:
    """The body of one vertebra's mask (RAS order): within the body mask when there is one, else the part in front
    of the spinal canal (the hole the vertebral arch closes in axial slices; its front edge is the body's back
    wall), or the front BODY_SHARE of the vertebra's depth where no slice closes the arch."""
    if body_mask is not None:
        return vertebra & body_mask
    front_of_canal = []
    for z in np.flatnonzero(vertebra.any(axis=(0, 1))):
        axial = vertebra[:, :, z]
        holes, count = ndimage.label(ndimage.binary_fill_holes(axial) & ~axial)
        if count:
            sizes = ndimage.sum(holes > 0, holes, index=range(1, count + 1))
            front_of_canal.append(np.flatnonzero((holes == 1 + int(np.argmax(sizes))).any(axis=0)).max())
    depth = np.flatnonzero(vertebra.any(axis=(0, 2)))
    if front_of_canal:
        back_wall = int(np.median(front_of_canal)) + 1
    else:
        back_wall = int(round(depth.max() - BODY_SHARE * (depth.max() - depth.min())))
    body = vertebra.copy()
    body[:, :back_wall, :] = False
    return body


def vertebra_masks(labels_path: str | Path, ids: dict[str, int], shape: tuple[int, ...], affine: np.ndarray
                   ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """({level: mask} of the levels in view, {file: sha256}) from one label volume with `ids`, or from a folder of
    one mask per structure as TotalSegmentator writes by default (`vertebrae_L1.nii.gz`, ...)."""
    labels_path = Path(labels_path)
    if labels_path.is_dir():
        files = {name: labels_path / f"vertebrae_{name}.nii.gz" for name in OUR_VALUE}
        masks = {name: _on_grid(path, f"mask of {name}", shape, affine) > 0
                 for name, path in files.items() if path.is_file()}
        sources = {files[name].name: sha256_file(files[name]) for name in masks}
    else:
        values = _on_grid(labels_path, "segmentation", shape, affine)
        masks = {name: values == ids[name] for name in ids}
        sources = {labels_path.name: sha256_file(labels_path)}
    masks = {name: mask for name, mask in masks.items() if mask.any()}
    missing = [name for name in VERTEBRAE if name not in masks]
    if missing:
        where = (f"no vertebrae_<level>.nii.gz with voxels for {', '.join(missing)}" if labels_path.is_dir() else
                 f"no voxel has the label of {', '.join(missing)} ({', '.join(f'{n}={ids[n]}' for n in missing)}); "
                 "check --ids")
        raise AACScoreError(f"{labels_path}: {where}")
    return masks, sources


def patient_mask(ct: np.ndarray) -> np.ndarray:
    """The patient in a CT: the largest connected body of tissue denser than PATIENT_HU. A radiograph does not show
    the CT's table, cushions or the edge of its reconstruction field, which lie apart from the patient."""
    pieces, count = ndimage.label(ct > PATIENT_HU)
    if count == 0:
        return np.zeros(ct.shape, bool)
    sizes = ndimage.sum(np.ones(ct.shape, bool), pieces, index=range(1, count + 1))
    return pieces == 1 + int(np.argmax(sizes))


def _on_grid(path: str | Path, what: str, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """A volume that must lie on the CT's voxel grid."""
    values, _, own_affine = load_volume(path, what)
    if values.shape != tuple(shape) or not np.allclose(own_affine, affine, atol=1e-3):
        raise AACScoreError(f"{path}: the {what}'s grid ({values.shape}) is not the CT's ({tuple(shape)})")
    return values


def _in_plane(volume: np.ndarray, zooms: Sequence[float]) -> tuple[np.ndarray, float]:
    """The volume resampled to square in-plane voxels of max(x, y, IN_PLANE_MM) mm (z kept), and that size."""
    size = max(zooms[0], zooms[1], IN_PLANE_MM)
    factors = (zooms[0] / size, zooms[1] / size, 1.0)
    if np.allclose(factors, 1.0):
        return volume, size
    return ndimage.zoom(volume, factors, order=1, grid_mode=True, mode="grid-constant"), size


def project_lateral(mu: np.ndarray, bodies: dict[str, np.ndarray], voxel_mm: float, z_mm: float, angle: float,
                    spacing_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """(image, label map) of a lateral view turned by `angle` degrees about the long axis, rows superior to
    inferior, anterior on the right, pixels of `spacing_mm`."""
    def turned(array: np.ndarray) -> np.ndarray:
        return ndimage.rotate(array, angle, axes=(0, 1), reshape=False, order=1) if angle else array

    factors = (z_mm / spacing_mm, voxel_mm / spacing_mm)

    def view(plane: np.ndarray, order: int) -> np.ndarray:  # (y, z) plane -> rows z (superior first), columns y
        return ndimage.zoom(plane.T[::-1], factors, order=order, grid_mode=True, mode="grid-constant")

    image = view(turned(mu).sum(axis=0) * voxel_mm, 3).astype(np.float32)
    names = list(bodies)
    paths = np.stack([view(turned(bodies[n].astype(np.float32)).sum(axis=0) * voxel_mm, 1) for n in names])
    values = np.array([OUR_VALUE[n] for n in names], np.uint8)
    labels = np.where(paths.max(axis=0) >= MIN_PATH_MM, values[paths.argmax(axis=0)], 0).astype(np.uint8)
    return image, labels


def make_ct_radiographs(ct_path: str | Path, labels_path: str | Path, out_dir: str | Path, ids: dict[str, int],
                        bodies_path: str | Path | None = None, angles: Sequence[float] = (-10.0, 0.0, 10.0),
                        facings: Sequence[str] = FACINGS, views: Sequence[str] = VIEWS,
                        spacing_mm: float = 0.5) -> list[Path]:
    """Write `<ct>_a<angle>_<facing>_<view>.nrrd` with `_labels.png` beside each into `out_dir`, and
    `ct_radiographs.json` (sources and settings); returns the images written."""
    ct, zooms, affine = load_volume(ct_path, "CT")
    vertebrae, sources = vertebra_masks(labels_path, ids, ct.shape, affine)
    body_mask = None
    if bodies_path is not None:
        body_mask = _on_grid(bodies_path, "body mask", ct.shape, affine) == 1
    bodies = {name: vertebral_bodies(mask, body_mask) for name, mask in vertebrae.items()}
    mu = np.clip(ct.astype(np.float32) + 1000.0, 0.0, None) * (MU_WATER_PER_MM / 1000.0) * patient_mask(ct)
    mu, voxel_mm = _in_plane(mu, zooms)
    bodies = {name: _in_plane(mask.astype(np.float32), zooms)[0] >= 0.5 for name, mask in bodies.items()}

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(ct_path).name.split(".")[0]
    written = []
    for angle in angles:
        image, labels = project_lateral(mu, bodies, voxel_mm, zooms[2], angle, spacing_mm)
        l1_rows = np.flatnonzero((labels == OUR_VALUE["L1"]).any(axis=1))
        top = max(0, int(l1_rows[0] - round(TOP_MARGIN_MM / spacing_mm))) if l1_rows.size else 0
        for facing in facings:
            pixels, truth = (image, labels) if facing == "right" else (image[:, ::-1], labels[:, ::-1])
            for view in views:
                rows = slice(top if view == "top-at-L1" else 0, None)
                name = f"{stem}_a{angle:+g}_{facing}_{view}"
                write_nrrd_2d(out_dir / f"{name}.nrrd", pixels[rows].astype(np.float32), (spacing_mm,) * 2)
                write_label_png(out_dir / f"{name}_labels.png", truth[rows])
                written.append(out_dir / f"{name}.nrrd")
    record = {"ct": str(ct_path), "ct_sha256": sha256_file(ct_path), "segmentation": str(labels_path),
              "segmentation_sha256": sources, "ids": ids if Path(labels_path).is_file() else "vertebrae_<level> files",
              "bodies": str(bodies_path) if bodies_path else "vertebra masks in front of the spinal canal",
              "ct_voxel_mm": list(zooms), "angles_deg": list(angles), "facings": list(facings), "views": list(views),
              "pixel_spacing_mm": spacing_mm, "mu_water_per_mm": MU_WATER_PER_MM, "min_path_mm": MIN_PATH_MM,
              "images": [p.name for p in written]}
    write_text_atomic(out_dir / "ct_radiographs.json", json.dumps(record, indent=2) + "\n")
    return written


# ---------------------------------------------------------------------------------------------- command line


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "ct-radiographs", help="lateral radiographs with true levels, computed from a segmented CT",
        description="Project a CT scan and its vertebra segmentation (TotalSegmentator, VerSe) to lateral "
                    "radiographs (NRRD) with label maps of the vertebral bodies, for `aacscore segment-benchmark "
                    "--cases`: level counting tested on real anatomy.")
    parser.add_argument("ct", help="CT volume (NIfTI, Hounsfield units)")
    parser.add_argument("--labels", required=True,
                        help="vertebra segmentation on the CT's grid (NIfTI), or a folder of vertebrae_L1.nii.gz ... "
                             "masks as TotalSegmentator writes them by default")
    parser.add_argument("--ids", default="totalsegmentator",
                        help=f"label values: a preset ({', '.join(ID_PRESETS)}) or L1=31,L2=30,... (default "
                             "totalsegmentator: its 'total' task)")
    parser.add_argument("--bodies", default=None,
                        help="vertebral body mask on the CT's grid, 1 = body (TotalSegmentator's vertebrae_body task); "
                             "without it bodies are the vertebra masks less their thin posterior elements")
    parser.add_argument("--angles", default="-10,0,10", help="beam angles about the long axis, degrees")
    parser.add_argument("--spacing", type=float, default=0.5, help="pixel spacing of the radiographs, mm")
    parser.add_argument("--out", required=True, help="folder for the radiographs and label maps")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        angles = [float(a) for a in args.angles.split(",") if a.strip()]
    except ValueError:
        raise AACScoreError(f"--angles: '{args.angles}' is not a comma-separated list of degrees") from None
    if not angles or any(abs(a) > 45 for a in angles):
        raise AACScoreError(f"--angles: give one or more angles within +-45 degrees, not '{args.angles}'")
    if not 0.1 <= args.spacing <= 3.0:
        raise AACScoreError(f"--spacing must be between 0.1 and 3 mm, not {args.spacing:g}")
    for path in (args.ct, args.bodies):
        if path is not None and not Path(path).is_file():
            raise AACScoreError(f"{path}: no such file")
    if not Path(args.labels).exists():
        raise AACScoreError(f"{args.labels}: no such file or folder")
    written = make_ct_radiographs(args.ct, args.labels, args.out, parse_ids(args.ids), args.bodies, angles,
                                  spacing_mm=args.spacing)
    print(f"{len(written)} radiographs with label maps in {args.out}")
    return 0

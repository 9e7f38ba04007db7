"""`aacscore stress-set`: phantom sets that make wrong results on purpose, to measure whether QC flags them.

--kind sacrum-out: each radiograph cut a few millimetres below L5, so the sacrum is out of view (the view of a
  lumbar DXA or a tight collimation); written as NRRD with its pixel spacing, with the label map cut alike and a
  truth.csv. Score the folder (not the CSV, whose `labels` column would replace the segmenter).
--kind level-shift: each phantom's true label map relabelled one level off: alternately T12..L4 as L1..L5 and
  L2..S1 as L1..L5 (T12 and S1 filled from the drawn corners in <name>_truth.json). list.csv pairs every image
  with its shifted map; `aacscore score list.csv` then scores a user map whose levels are all wrong, and
  `aacscore evaluate --truth PHANTOMS/truth.csv --labels-truth PHANTOMS` tells which results are wrong.
--kind restyle: each radiograph given another look, as another source's detector and processing would
  (phantoms/randomise.py without labels: intensity curve, bias field, gamma, blur, resolution drop, noise,
  sometimes inverted), written as 16-bit NRRD with its spacing, its label map and a truth.csv; anatomy unchanged.
  A calibration set of restyled images makes QC's interval cover images that do not look like the training ones.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from ..errors import AACScoreError
from ..io.atomic import atomic_path, write_atomic
from ..io.labelmaps import read_label_map, write_label_png
from ..io.radiograph import read_radiograph
from ..kauppila import SUBSCORE_COLUMNS, VERTEBRAE
from ..phantoms.randomise import randomise

KINDS = ("sacrum-out", "level-shift", "restyle")
SHIFTS = {"up": ("T12", "L1", "L2", "L3", "L4"), "down": ("L2", "L3", "L4", "L5", "S1")}


def _truth_rows(phantoms: Path) -> list[dict[str, str]]:
    path = phantoms / "truth.csv"
    if not path.is_file():
        raise AACScoreError(f"{phantoms}: no truth.csv (expected a folder written by `aacscore phantoms`)")
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def _drawn_truth(phantoms: Path, row: dict[str, str]) -> dict:
    path = phantoms / (Path(row["file"]).stem + "_truth.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise AACScoreError(f"{path}: cannot read the phantom's drawn truth ({error})") from None


def _quadrilateral_mask(corners: dict[str, list[float]], shape: tuple[int, int]) -> np.ndarray:
    from skimage.draw import polygon

    points = np.array([corners[k] for k in ("superior_anterior", "superior_posterior", "inferior_posterior",
                                            "inferior_anterior")])
    mask = np.zeros(shape, bool)
    mask[polygon(points[:, 0], points[:, 1], shape)] = True
    return mask


def shifted_labels(labels: np.ndarray, truth: dict, direction: str) -> np.ndarray:
    """L1..L5 given to the five bodies one level above ("up") or below ("down") the true ones."""
    out = np.zeros_like(labels)
    for new_value, name in enumerate(SHIFTS[direction], start=1):
        if name in VERTEBRAE:
            body = labels == VERTEBRAE.index(name) + 1
        else:
            body = _quadrilateral_mask(truth["vertebrae"][name], labels.shape) & (labels == 0)
        out[body] = new_value
    return out


def sacrum_cut_row(truth: dict, rng: np.random.Generator, margin_mm: tuple[float, float] = (3.0, 12.0)) -> int:
    """The first image row to drop: a few mm below L5's lowest corner."""
    lowest = max(point[0] for point in truth["vertebrae"]["L5"].values())
    return int(np.ceil(lowest + rng.uniform(*margin_mm) / truth["spacing"][0]))


def write_stress_set(phantoms: str | Path, out: str | Path, kind: str, seed: int = 0) -> int:
    """Write the set; returns how many cases it holds."""
    import nrrd

    phantoms, out = Path(phantoms), Path(out)
    if kind not in KINDS:
        raise AACScoreError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    rng = np.random.default_rng(seed)
    rows_out = []
    for index, row in enumerate(_truth_rows(phantoms)):
        image_path, truth = phantoms / row["file"], _drawn_truth(phantoms, row)
        labels = read_label_map(phantoms / row["labels"])
        stem = Path(row["file"]).stem
        if kind == "level-shift":
            direction = ("up", "down")[index % 2]
            target = out / "shifted" / f"{stem}_labels.png"
            write_label_png(target, shifted_labels(labels, truth, direction))
            rows_out.append({"file": str(image_path.resolve()), "labels": str(target.resolve()), "shift": direction})
            continue
        radiograph = read_radiograph(image_path)
        if kind == "restyle":
            cut = radiograph.pixels.shape[0]
            pixels = np.round(randomise(radiograph.pixels, rng) * 65535).astype(np.uint16)
        else:
            cut = min(sacrum_cut_row(truth, rng), radiograph.pixels.shape[0])
            pixels = radiograph.pixels[:cut]
        with atomic_path(out / f"{stem}.nrrd") as temporary:
            nrrd.write(str(temporary), pixels, {"spacings": [radiograph.spacing[1], radiograph.spacing[0]]},
                       index_order="C")
        write_label_png(out / f"{stem}_labels.png", labels[:cut])
        rows_out.append({"file": f"{stem}.nrrd", "labels": f"{stem}_labels.png", "aac24": row["aac24"],
                         **{column: row[column] for column in SUBSCORE_COLUMNS}})
    columns = list(rows_out[0]) if rows_out else ["file"]

    def write(stream) -> None:
        writer = csv.DictWriter(stream, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows_out)

    write_atomic(out / ("list.csv" if kind == "level-shift" else "truth.csv"), write)
    return len(rows_out)


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "stress-set", help="phantom sets with the sacrum out of view, level-shifted label maps or another look (QC)",
        description="Make wrong results on purpose from a phantom folder, to measure whether QC flags them.")
    parser.add_argument("phantoms", help="folder written by `aacscore phantoms`")
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the cut positions and looks")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    count = write_stress_set(args.phantoms, args.out, args.kind, args.seed)
    print(f"{count} cases written to {args.out}")
    return 0

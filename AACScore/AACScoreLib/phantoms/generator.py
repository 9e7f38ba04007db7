"""Synthetic lateral lumbar radiographs (DICOM DX) with exact Kauppila AAC-24 ground truth by construction: the
public entry to every phantom family (families.py), their DICOM files, label maps, truth files and command line.

A phantom is fixed by (seed, index, family, severity, size range). The families differ in how anatomy is modelled
and how the image is formed; the label maps hold 1..5 = L1..L5 and the context classes 6 = T12, 7 = S1 where in
view. "style" is the older name of "family" and stays in the APIs and flags that used it.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import kauppila
from ..errors import AACScoreError
from ..io.atomic import atomic_path, write_atomic, write_text_atomic
from ..io.radiograph import Radiograph
from .anatomy import disc_boundaries
from .families import FAMILIES, HELD_OUT_FAMILY
from .truth import (DEFAULT_SEVERITY, DEFAULT_SIZE_RANGE, Phantom, arc_length, calcified_fractions, phantom_name,
                    wall_segment_spans)

__all__ = ["STYLES", "Phantom", "arc_length", "calcified_fractions", "disc_boundaries", "generate_phantom",
           "phantom_name", "wall_segment_spans"]

STYLES: tuple[str, ...] = tuple(FAMILIES)
# `labels` makes truth.csv a list that `aacscore score` and `train-scorer --csv` read with the drawn label maps.
TRUTH_COLUMNS: tuple[str, ...] = ("file", "labels", "aac24", "category") + kauppila.SUBSCORE_COLUMNS + (
    "family", "transitional")


def generate_phantom(seed: int, style: str = "default", index: int = 0,
                     severity: Sequence[float] = DEFAULT_SEVERITY,
                     size_range: tuple[int, int] = DEFAULT_SIZE_RANGE) -> Phantom:
    """One phantom of family `style`, fully determined by (seed, index, style, severity, size_range)."""
    if style not in FAMILIES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if seed < 0 or index < 0:
        raise ValueError("seed and index must be non-negative")
    phantom = FAMILIES[style].generate(seed, index, severity, size_range)
    phantom.truth.setdefault("family", style)
    phantom.truth.setdefault("transitional", "")
    return phantom


# ------------------------------------------------------------------------------------------------------- DICOM


def phantom_dataset(phantom: Phantom):
    """The DICOM DX dataset of a phantom (compressed when its transfer syntax says so)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

    s = phantom.dataset
    max_value = 2 ** s["bits_stored"] - 1
    stored = (max_value - phantom.pixels).astype(np.uint16) if s["photometric"] == "MONOCHROME1" else phantom.pixels
    allocated = 8 if s["bits_stored"] <= 8 else 16  # 8-bit (DXA-like) images in 8-bit words, as devices write
    stored = stored.astype(np.uint8 if allocated == 8 else np.uint16)  # (and pydicom's RLE encoder needs them)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray, For Presentation
    ds.file_meta.MediaStorageSOPInstanceUID = s["uids"]["sop"]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = s["uids"]["sop"]
    ds.StudyInstanceUID = s["uids"]["study"]
    ds.SeriesInstanceUID = s["uids"]["series"]
    ds.FrameOfReferenceUID = s["uids"]["frame"]
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.Manufacturer = "AACScore"
    ds.ManufacturerModelName = f"phantom generator ({phantom.truth['style']})"
    ds.PatientName = f"Phantom^{phantom.name}"
    ds.PatientID = phantom.name
    ds.StudyDate = ds.SeriesDate = s["study_date"]
    ds.StudyID = ds.AccessionNumber = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = phantom.truth["index"] + 1
    ds.BodyPartExamined = "LSPINE"
    ds.ViewPosition = s["view_position"]
    ds.KVP = s["kvp"]
    ds.BurnedInAnnotation = "YES" if s.get("markers") else "NO"
    ds.LossyImageCompression = "00"
    if s["patient_orientation"]:
        ds.PatientOrientation = s["patient_orientation"]
    spacing = phantom.truth["spacing"][0]
    if s["spacing_tags"] in ("PixelSpacing", "both"):
        ds.PixelSpacing = [f"{spacing:.6f}", f"{spacing:.6f}"]
    if s["spacing_tags"] in ("ImagerPixelSpacing+EMF", "both"):
        imager = spacing * s["magnification"]
        ds.ImagerPixelSpacing = [f"{imager:.6f}", f"{imager:.6f}"]
        ds.EstimatedRadiographicMagnificationFactor = s["magnification"]
    ds.Rows, ds.Columns = phantom.pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = s["photometric"]
    ds.BitsAllocated = allocated
    ds.BitsStored = s["bits_stored"]
    ds.HighBit = s["bits_stored"] - 1
    ds.PixelRepresentation = 0
    slope, intercept = s["rescale"] or (1.0, 0.0)
    if s["rescale"]:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.RescaleType = "US"
    if s["window"]:
        ds.WindowCenter = round(slope * max_value / 2 + intercept, 2)
        ds.WindowWidth = round(slope * max_value, 2)
    ds.PixelData = stored.tobytes()
    if s["transfer_syntax"] != ExplicitVRLittleEndian:
        ds.compress(UID(s["transfer_syntax"]), stored)
    return ds


# ------------------------------------------------------------------------------------------------------ writing


def write_phantom(phantom: Phantom, out_dir: str | Path) -> Path:
    """Write `<name>.dcm`, `<name>_labels.png` and `<name>_truth.json`, each atomically."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dcm = out / f"{phantom.name}.dcm"
    ds = phantom_dataset(phantom)
    with atomic_path(dcm) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    with atomic_path(out / f"{phantom.name}_labels.png") as tmp:
        Image.fromarray(phantom.label_map).save(tmp)
    truth = dict(phantom.truth, file=dcm.name, labels=f"{phantom.name}_labels.png")
    write_text_atomic(out / f"{phantom.name}_truth.json", json.dumps(truth, indent=1))
    return dcm


def truth_row(phantom: Phantom) -> dict[str, object]:
    t = phantom.truth
    return dict(file=f"{phantom.name}.dcm", labels=f"{phantom.name}_labels.png", aac24=t["aac24"],
                category=t["category"], **t["subscores"], family=t["family"], transitional=t["transitional"])


def write_truth_csv(path: str | Path, rows: Sequence[dict[str, object]]) -> None:
    """Merge `rows` into `truth.csv` (rows of other files already there are kept), sorted by file, atomically."""
    path = Path(path)
    merged: dict[str, dict[str, object]] = {}
    if path.exists():
        with open(path, newline="") as stream:
            merged = {row["file"]: row for row in csv.DictReader(stream) if row.get("file")}
    merged.update({str(row["file"]): row for row in rows})

    def write(stream) -> None:
        writer = csv.DictWriter(stream, fieldnames=TRUTH_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(merged[k] for k in sorted(merged))

    write_atomic(path, write)


def check_styles(styles: Sequence[str]) -> tuple[str, ...]:
    """The styles (families), refused with a clear message when empty or unknown (command lines take them
    comma-separated)."""
    unknown = sorted(set(styles) - set(STYLES)) if styles else ["(none)"]
    if unknown:
        raise AACScoreError(f"phantom styles must be among {', '.join(STYLES)}; got {', '.join(unknown)}")
    return tuple(styles)


def parse_styles(text: str) -> tuple[str, ...]:
    """Styles written comma-separated on a command line ("default,alt")."""
    return check_styles([style.strip() for style in text.split(",") if style.strip()])


@dataclass(frozen=True)
class PhantomSource:
    """Phantom `index` of `seed` as a training case made in memory (segmentation.dataset.load_case), read back without
    the cost of encoding and decoding its DICOM (see read_back)."""

    seed: int
    index: int
    style: str = "default"
    context: bool = False  # labels with the context classes 6 = T12 and 7 = S1 beside L1..L5 = 1..5

    def load(self) -> tuple[Radiograph, np.ndarray]:
        phantom = generate_phantom(self.seed, self.style, self.index)
        labels = phantom.label_map if self.context else phantom.labels
        return read_back(phantom, f"phantoms_s{self.seed}/{phantom.name}.dcm"), labels


def read_back(phantom: Phantom, path: str | None = None) -> Radiograph:
    """The radiograph a reader returns from the phantom's written DICOM, without writing it: the same pixels up to
    the linear rescale and MONOCHROME1 inversion the reader undoes, the same spacing and orientation."""
    orientation = phantom.dataset["patient_orientation"]
    return Radiograph(pixels=phantom.pixels.astype(np.float32), spacing=tuple(phantom.truth["spacing"]),
                      spacing_source="phantom", path=path or f"{phantom.name}.dcm", format="DICOM",
                      patient_orientation=tuple(orientation) if orientation else None)


def phantom_sources(n: int, seed: int, styles: Sequence[str] = ("default",),
                    context: bool = False) -> list[PhantomSource]:
    """Phantoms 0..n-1 of `seed` as in-memory training cases, the styles (families) taken in turn."""
    styles = check_styles(styles)
    return [PhantomSource(seed, index, styles[index % len(styles)], context) for index in range(n)]


def write_phantoms(out_dir: str | Path, n: int, seed: int, style: str = "default",
                   severity: Sequence[float] = DEFAULT_SEVERITY, size_range: tuple[int, int] = DEFAULT_SIZE_RANGE,
                   start: int = 0, progress=None) -> list[Path]:
    """Generate and write phantoms `start .. start+n-1`, then merge their rows into `out_dir/truth.csv`."""
    paths, rows = [], []
    for index in range(start, start + n):
        began = time.perf_counter()
        phantom = generate_phantom(seed, style, index, severity, size_range)
        generated = time.perf_counter()
        paths.append(write_phantom(phantom, out_dir))
        rows.append(truth_row(phantom))
        if progress:
            progress(phantom, generated - began, time.perf_counter() - generated)
        if len(rows) % 25 == 0:
            write_truth_csv(Path(out_dir) / "truth.csv", rows)
    write_truth_csv(Path(out_dir) / "truth.csv", rows)
    return paths


# ---------------------------------------------------------------------------------------------------------- CLI


def _numbers(text: str, count: int, kind=float) -> tuple:
    try:
        values = tuple(kind(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {count} comma-separated numbers, got {text!r}") from None
    if len(values) != count or any(v < 0 for v in values) or sum(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected {count} non-negative comma-separated numbers, got {text!r}")
    return values


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _size_range(text: str) -> tuple[int, int]:
    low, high = _numbers(text, 2, int)
    if not 64 <= low <= high:
        raise argparse.ArgumentTypeError(f"size range must be LOW,HIGH with 64 <= LOW <= HIGH, got {text!r}")
    return low, high


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "phantoms", help="write synthetic lateral lumbar radiographs with exact AAC-24 truth",
        description="Write DICOM phantoms, <name>_labels.png (1..5 = L1..L5, 6 = T12, 7 = S1 where in view), "
                    "<name>_truth.json and truth.csv.")
    parser.add_argument("--n", type=_non_negative, help="number of phantoms")
    parser.add_argument("--seed", type=_non_negative, default=0,
                        help="random seed; (seed, index, family, severity, size range) fix a phantom")
    parser.add_argument("--out", help="output folder")
    parser.add_argument("--family", "--style", dest="style", choices=STYLES, default="default",
                        help=f"phantom family (--list-families describes them); {HELD_OUT_FAMILY} and its "
                             "site variant are held out of all training; --style is its older name")
    parser.add_argument("--list-families", action="store_true", help="print the phantom families and exit")
    parser.add_argument("--severity", type=lambda t: _numbers(t, 3), default=DEFAULT_SEVERITY,
                        help="share of no/mild, moderate, severe phantoms (default 0.25,0.60,0.15)")
    parser.add_argument("--size-range", type=_size_range, default=DEFAULT_SIZE_RANGE,
                        help="image side lengths in pixels, LOW,HIGH (default 1500,3000); varied keeps the long "
                             "side in it, and its DXA-like images are smaller")
    parser.add_argument("--start", type=_non_negative, default=0, help="index of the first phantom (to extend a set)")
    parser.set_defaults(func=_run_cli, parser=parser)


def family_lines() -> list[str]:
    """One line per family: name, use and description."""
    width = max(len(name) for name in FAMILIES)
    return [f"{name:<{width}}  {'held out' if family.held_out else 'training'}  {family.description}"
            for name, family in FAMILIES.items()]


def _run_cli(args: argparse.Namespace) -> int:
    if args.list_families:
        print("\n".join(family_lines()))
        return 0
    if args.n is None or args.out is None:
        args.parser.error("--n and --out are required (or give --list-families)")

    times, truths = [], []

    def report(phantom: Phantom, gen_s: float, write_s: float) -> None:
        t = phantom.truth
        times.append(gen_s)
        truths.append(t)
        print(f"{phantom.name}: {phantom.pixels.shape[0]}x{phantom.pixels.shape[1]} AAC-24 {t['aac24']} "
              f"({t['category']}), anterior {t['anterior']}, {phantom.dataset['transfer_syntax_name']}"
              f"{', ' + t['transitional'] if t['transitional'] else ''}, "
              f"generated in {gen_s:.2f} s, written in {write_s:.2f} s", flush=True)

    write_phantoms(args.out, args.n, args.seed, args.style, args.severity, args.size_range, args.start, report)
    if times:
        print(summary_line(args.style, times, truths))
    print(f"truth: {Path(args.out) / 'truth.csv'}")
    return 0


def summary_line(family: str, times: Sequence[float], truths: Sequence[dict]) -> str:
    """Median generation time and, for families that record them, the shares of fields of view and anatomy."""
    n = len(truths)
    parts = [f"{n} {family} phantoms, median generation {float(np.median(times)):.2f} s",
             f"transitional {sum(bool(t['transitional']) for t in truths)}/{n}"]
    flags = [t["varied"] for t in truths if "varied" in t]
    if flags:
        parts += [f"sacrum out of view {sum(not f['sacrum_in_view'] for f in flags)}/{n}",
                  f"T12 out of view {sum(not f['t12_in_view'] for f in flags)}/{n}",
                  f"DXA-like {sum(f['dxa_like'] for f in flags)}/{n}",
                  f"inverted look {sum(f['inverted_look'] for f in flags)}/{n}",
                  f"implants {sum(bool(f['implants']) for f in flags)}/{n}"]
    return "; ".join(parts)

"""Export vertebra label maps as an nnU-Net v2 raw dataset on the segmenter's coarse working grid.

Why a coarse grid: L1–L5 are 25–45 mm tall, so 1.25 mm per pixel keeps their outlines while making the
network about a hundred times cheaper than at the radiograph's own 0.1–0.2 mm. The export resamples every
image to that grid itself and writes it as a 16-bit PNG (nnU-Net's NaturalImage2DIO): all cases then have the
same pixel size, nnU-Net sees spacing (1, 1) and never resamples, and the segmenter repeats exactly the same
steps (resample, intensity window) on arrays at inference. The millimetres live in `aacscore_export.json`.

Sources: a phantom folder (`<name>.dcm` + `<name>_labels.png`), explicit image/label-map pairs, and 3D Slicer
segmentations (`.seg.nrrd`) whose segments are matched by name (L1..L5), never by label value.

Context classes: with `context`, the dataset's labels are background, L1..L5 and T12 = 6, S1 = 7 (the top of the
sacrum) as the label maps carry them where in view, so that the network learns the landmarks levels are counted
from (segmentation/levels.py). Randomised copies: each case can also be written `randomise_copies` more times
with SynthSeg-style randomisation (phantoms/randomise.py) applied on the working grid, so that the network cannot
rely on one generator's look; with `metal_chance`, that share of the copies first gets randomised metal drawn over
the spine (phantoms/metal.py), the segmenter's commonest failure.
"""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence, Union

import numpy as np

from ..io.atomic import atomic_path, write_text_atomic
from ..errors import GeometryError, RadiographError
from ..kauppila import CONTEXT_LABELS, VERTEBRAE
from ..io.labelmaps import read_label_map, vertebra_labels
from ..io.radiograph import Radiograph, read_radiograph

WORKING_SPACING_MM = 1.25  # mm per working pixel, rows and columns
DEFAULT_LONG_SIDE_PX = 344  # working long side assumed when an image's spacing is unknown (43 cm at 1.25 mm)
WINDOW_PERCENTILES = (0.5, 99.5)  # intensity window on the working image, mapped to [0, 1]
LABELS = {"background": 0, **{name: index + 1 for index, name in enumerate(VERTEBRAE)}}
CONTEXT_DATASET_LABELS = {**LABELS, **CONTEXT_LABELS}  # L1..L5 plus T12 = 6, S1 = 7
EXPORT_SUMMARY = "aacscore_export.json"
METAL_STREAM = 0x3E7A1  # the randomised copies' metal draws come from a stream of their own

Progress = Callable[[float, str], None]


class LoadableCase(Protocol):
    """A training case made in memory (phantoms.generator.PhantomSource): picklable, so worker processes can load it."""

    def load(self) -> tuple[Radiograph, np.ndarray]: ...


CaseSource = Union[tuple[Union[str, Path], Union[str, Path, np.ndarray]], LoadableCase]


# ---------------------------------------------------------------------------------------------- working grid


def working_shape(
    image_shape: tuple[int, int],
    spacing: tuple[float, float] | None,
    working_spacing_mm: float | Sequence[float] | None = WORKING_SPACING_MM,
    default_long_side_px: int | None = DEFAULT_LONG_SIDE_PX,
) -> tuple[tuple[int, int], bool]:
    """(rows, cols) of the working grid for an image, and whether the spacing had to be assumed.

    `working_spacing_mm` is one value or (row_mm, col_mm). Unknown spacing (or a model without a working
    spacing): scale so the long side is `default_long_side_px`; with neither, keep the image's own size.
    """
    rows, cols = image_shape
    if spacing is not None and working_spacing_mm:
        target = np.broadcast_to(np.asarray(working_spacing_mm, dtype=float), (2,))
        shape = (rows * spacing[0] / target[0], cols * spacing[1] / target[1])
        assumed = False
    elif default_long_side_px:
        factor = default_long_side_px / max(rows, cols)
        shape, assumed = (rows * factor, cols * factor), True
    else:
        shape, assumed = (rows, cols), spacing is None
    return (max(8, int(round(shape[0]))), max(8, int(round(shape[1])))), assumed


def resample_image(pixels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a float image; shrinking averages over each target pixel's footprint (no aliasing)."""
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None, None]
    shrinking = shape[0] <= pixels.shape[0] and shape[1] <= pixels.shape[1]
    if shrinking:
        out = F.interpolate(tensor, size=shape, mode="area")
    else:
        out = F.interpolate(tensor, size=shape, mode="bilinear", align_corners=False, antialias=True)
    return out[0, 0].numpy()


def resample_labels(labels: np.ndarray, shape: tuple[int, int], n_labels: int = len(LABELS)) -> np.ndarray:
    """Resize a label map by majority of area (one-hot averaged, then argmax), so thin parts are not lost."""
    fractions = np.stack([resample_image((labels == value).astype(np.float32), shape) for value in range(n_labels)])
    return fractions.argmax(axis=0).astype(np.uint8)


def window_intensity(pixels: np.ndarray, percentiles: Sequence[float] = WINDOW_PERCENTILES) -> np.ndarray:
    """Map the image's robust intensity range to [0, 1], so that any bit depth or scanner offset looks alike."""
    low, high = np.percentile(pixels, percentiles)
    if high <= low:
        return np.zeros(pixels.shape, np.float32)
    return np.clip((pixels - low) / (high - low), 0.0, 1.0).astype(np.float32)


def to_working_image(radiograph: Radiograph, shape: tuple[int, int],
                     window: Sequence[float] | None = WINDOW_PERCENTILES) -> np.ndarray:
    """The radiograph on the working grid, windowed to [0, 1] (kept as is without a window, as an imported
    model may expect): what the network is trained on and given."""
    image = resample_image(radiograph.pixels, shape)
    return window_intensity(image, window) if window else image


# ---------------------------------------------------------------------------------------------- sources


def _image_stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".seg.nrrd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def phantom_cases(folder: str | Path) -> list[tuple[Path, Path]]:
    """(image, label map) pairs of a folder holding `<name>.<ext>` beside `<name>_labels.png` or `<name>.seg.nrrd`."""
    folder = Path(folder)
    cases = []
    for image in sorted(folder.iterdir()):
        if not image.is_file() or image.name.endswith(("_labels.png", ".seg.nrrd")) or image.suffix in (".json", ".csv"):
            continue
        stem = _image_stem(image)
        for label in (folder / f"{stem}_labels.png", folder / f"{stem}.seg.nrrd"):
            if label.is_file():
                cases.append((image, label))
                break
    if not cases:
        raise RadiographError(folder, "holds no image with a `<name>_labels.png` or `<name>.seg.nrrd` beside it")
    return cases


# ---------------------------------------------------------------------------------------------- export


@dataclass
class ExportSummary:
    dataset_dir: Path
    dataset_name: str
    n_cases: int
    working_spacing_mm: float
    median_working_shape: tuple[int, int]
    assumed_spacing: list[str]  # cases whose spacing was unknown and assumed


def dataset_name(dataset_id: int, name: str) -> str:
    return f"Dataset{dataset_id:03d}_{name}"


def _write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as temporary:
        Image.fromarray(array).save(temporary, format="PNG")


def load_case(case: CaseSource, context: bool = False) -> tuple[Radiograph, np.ndarray]:
    """(radiograph, label map at its size) of a case: an (image path, label path or array) pair, or an object
    with `load()` that makes both in memory (phantoms.generator.PhantomSource). Without `context` the T12/S1
    context classes read as background."""
    if hasattr(case, "load"):
        radiograph, labels = case.load()
        return radiograph, labels if context else vertebra_labels(labels)
    image_path, label_source = case
    radiograph = read_radiograph(image_path)
    if isinstance(label_source, np.ndarray):
        labels = label_source.astype(np.uint8)
        if labels.shape != radiograph.pixels.shape:
            raise GeometryError(f"{image_path}: label map is {labels.shape}, image is {radiograph.pixels.shape}")
        labels = labels if context else vertebra_labels(labels)
    else:
        labels = read_label_map(label_source, radiograph.pixels.shape, context=context)
    return radiograph, labels


def _export_case(job: tuple) -> tuple[tuple[int, int], bool, str, bool]:
    """Write one case's working image and labels, and its randomised copies; returns (working shape, spacing
    assumed, source, whether its labels hold a context class)."""
    case, folder, index, working_spacing_mm, default_long_side_px, context, copies, metal_chance, seed = job
    radiograph, labels = load_case(case, context)
    shape, was_assumed = working_shape(radiograph.pixels.shape, radiograph.spacing, working_spacing_mm,
                                       default_long_side_px)
    image = to_working_image(radiograph, shape)
    working_labels = resample_labels(labels, shape, len(CONTEXT_DATASET_LABELS if context else LABELS))
    _write_png(folder / "imagesTr" / f"case_{index:04d}_0000.png", np.round(image * 65535).astype(np.uint16))
    _write_png(folder / "labelsTr" / f"case_{index:04d}.png", working_labels)
    if copies:
        from ..phantoms.metal import add_metal
        from ..phantoms.randomise import randomise

        for copy in range(1, copies + 1):
            rng = np.random.default_rng([seed, index, copy])
            metal_rng = np.random.default_rng([seed, index, copy, METAL_STREAM])  # leaves `rng`'s draws as they were
            source = image
            if metal_rng.random() < metal_chance:
                source, _ = add_metal(image, working_labels, metal_rng, working_spacing_mm)
            randomised = window_intensity(randomise(source, rng, labels=working_labels))  # windowed as at inference
            name = f"case_{index:04d}r{copy}"
            _write_png(folder / "imagesTr" / f"{name}_0000.png", np.round(randomised * 65535).astype(np.uint16))
            _write_png(folder / "labelsTr" / f"{name}.png", working_labels)
    return shape, was_assumed, radiograph.path, bool((working_labels > len(VERTEBRAE)).any())


def export_dataset(
    cases: Iterable[CaseSource],
    raw_root: str | Path,
    dataset_id: int = 501,
    name: str = "AACScoreLumbar",
    working_spacing_mm: float = WORKING_SPACING_MM,
    default_long_side_px: int = DEFAULT_LONG_SIDE_PX,
    progress: Progress | None = None,
    workers: int = 1,
    context: bool = False,
    randomise_copies: int = 0,
    seed: int = 0,
    metal_chance: float = 0.0,
) -> ExportSummary:
    """Write `raw_root/Dataset###_Name/` (imagesTr, labelsTr, dataset.json) from cases (see load_case).

    A label map is a path (PNG/TIFF 0..5, 0..7 with context, or .seg.nrrd) or a uint8 array at the image's
    size. `workers` > 1 exports cases in that many processes (phantoms generated in memory are the slow part).
    `context`: labels T12 = 6 and S1 = 7 as classes too (refused when no case carries them).
    `randomise_copies`: K randomised copies of every case beside it (fixed by `seed`, the case and the copy).
    `metal_chance`: the share of those copies that get randomised metal over the spine first.
    """
    cases = list(cases)
    if not cases:
        raise RadiographError(raw_root, "no training cases to export")
    if randomise_copies < 0:
        raise RadiographError(raw_root, f"randomised copies must be 0 or more, not {randomise_copies}")
    if not 0.0 <= metal_chance <= 1.0:
        raise RadiographError(raw_root, f"the metal chance must lie in [0, 1], not {metal_chance}")
    folder = Path(raw_root) / dataset_name(dataset_id, name)
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    jobs = [(case, folder, index, working_spacing_mm, default_long_side_px, context, randomise_copies, metal_chance,
             seed)
            for index, case in enumerate(cases)]
    shapes, assumed, sources, with_context = [], [], [], 0
    with ExitStack() as stack:
        mapper = stack.enter_context(ProcessPoolExecutor(max_workers=workers)).map if workers > 1 else map
        for done, (shape, was_assumed, source, has_context) in enumerate(mapper(_export_case, jobs), 1):
            shapes.append(shape)
            sources.append(source)
            with_context += has_context
            if was_assumed:
                assumed.append(source)
            if progress:
                progress(done / len(cases), f"exported {Path(source).name}")
    if context and not with_context:
        raise GeometryError(f"{folder}: context classes asked for, but no label map holds T12 (6) or S1 (7)")
    classes = "L1-L5 vertebrae" + (" with T12 and S1 context" if context else "")
    dataset_json = {
        "channel_names": {"0": "X-ray"},
        "labels": CONTEXT_DATASET_LABELS if context else LABELS,
        "numTraining": len(cases) * (1 + randomise_copies),
        "file_ending": ".png",
        "name": name,
        "description": f"{classes} on a {working_spacing_mm} mm working grid, written by AACScore",
    }
    write_text_atomic(folder / "dataset.json", json.dumps(dataset_json, indent=2) + "\n")
    median = tuple(int(v) for v in np.median(np.array(shapes), axis=0))
    summary = ExportSummary(folder, folder.name, len(cases), working_spacing_mm, median, assumed)
    write_text_atomic(folder / EXPORT_SUMMARY, json.dumps({
        "working_spacing_mm": working_spacing_mm,
        "default_long_side_px": default_long_side_px,
        "median_working_shape": list(median),
        "window_percentiles": list(WINDOW_PERCENTILES),
        "n_cases": len(cases),
        "randomised_copies_per_case": randomise_copies,
        "metal_chance": metal_chance,
        "context_classes": sorted(CONTEXT_LABELS) if context else [],
        "cases_with_context": with_context,
        "sources": sources,
        "assumed_spacing": assumed,
    }, indent=2) + "\n")
    return summary


def read_export_summary(dataset_dir: str | Path) -> dict:
    return json.loads((Path(dataset_dir) / EXPORT_SUMMARY).read_text(encoding="utf-8"))

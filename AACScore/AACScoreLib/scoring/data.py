"""Training data for the scorer: a CSV of radiographs with label maps and scores -> normalised crops; augmentations.

Each image is read and cropped once (geometry's paper crop, resampled to the model's input size) and the crops are
kept in memory and in an .npz cache beside the training output, so that an epoch costs only the network.
Augmentations follow Shao et al. (2025) and act on batches of crops on the training side only; their randomness
comes from one torch.Generator so that a seed reproduces a run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import AACScoreError
from ..kauppila import SUBSCORE_COLUMNS

PERCENTILES = (1.0, 99.0)  # crop intensity window: robust to a few saturated or dead pixels

# Shao et al. (2025): brightness ±10 %, contrast ±10 %, Gaussian noise sigma 0..10 on 0..255, shift ±5 %,
# scale ±5 %, rotation ±30°.
PAPER_AUGMENTATION = {"brightness": 0.10, "contrast": 0.10, "noise_sigma": 10.0 / 255.0, "shift": 0.05,
                      "scale": 0.05, "rotation": 30.0}
# Beyond the paper (train-scorer --augment robust): users' scanners and processing differ in tone curve and sharpness.
ROBUST_AUGMENTATION = {"gamma": (0.7, 1.5), "blur_sigma": (0.0, 1.2), "blur_probability": 0.3}


@dataclass
class ScoreRecord:
    """One training case: a radiograph, its L1–L5 label map, and its scores (subscores optional)."""

    image: Path
    labels: Path
    aac24: float
    subscores: list[float] | None = None


@dataclass
class CropSet:
    """Normalised crops (N, 1, H, W) in 0..1 with their targets; `names` are the image file names."""

    crops: torch.Tensor
    totals: torch.Tensor
    subscores: torch.Tensor | None
    names: list[str]
    skipped: dict[str, str] = field(default_factory=dict)  # image name -> why it could not be cropped

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, indices: Sequence[int]) -> "CropSet":
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return CropSet(self.crops[index], self.totals[index],
                       None if self.subscores is None else self.subscores[index],
                       [self.names[i] for i in index.tolist()])


def read_score_csv(path: str | Path) -> list[ScoreRecord]:
    """Read a training CSV: `file` (image), optional `labels` (label map; default `<stem>_labels.png` beside the
    image), `aac24`, and optionally all of L1A..L4P. Relative paths are taken from the CSV's folder; a phantom
    folder's truth.csv is such a file."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as stream:
            rows = list(csv.DictReader(stream))
    except OSError as error:
        raise AACScoreError(f"{path}: cannot be read ({error.strerror})") from None
    if not rows:
        raise AACScoreError(f"{path}: no rows")
    columns = set(rows[0])
    for needed in ("file", "aac24"):
        if needed not in columns:
            raise AACScoreError(f"{path}: needs a '{needed}' column (has {', '.join(sorted(columns))})")
    has_subscores = all(c in columns for c in SUBSCORE_COLUMNS)
    records = []
    for line, row in enumerate(rows, start=2):
        image = path.parent / row["file"]
        labels = path.parent / row["labels"] if row.get("labels") else image.with_name(image.stem + "_labels.png")
        try:
            total = float(row["aac24"])
            subs = [float(row[c]) for c in SUBSCORE_COLUMNS] if has_subscores else None
        except (TypeError, ValueError):
            raise AACScoreError(f"{path}: line {line}: aac24 or a subscore is not a number") from None
        if not 0.0 <= total <= 24.0:
            raise AACScoreError(f"{path}: line {line}: aac24 {total} outside 0..24")
        records.append(ScoreRecord(image, labels, total, subs))
    return records


def normalise_crop(crop: np.ndarray) -> np.ndarray:
    """Scale a crop's intensities to 0..1 between its 1st and 99th percentiles (bone bright), float32."""
    crop = np.asarray(crop, dtype=np.float32)
    low, high = np.percentile(crop, PERCENTILES)
    if not high > low:
        return np.zeros_like(crop)
    return np.clip((crop - np.float32(low)) / np.float32(high - low), 0.0, 1.0).astype(np.float32, copy=False)


def read_case(record: ScoreRecord):
    """Read one case: its radiograph and the Kauppila geometry of its label map."""
    from ..geometry.spine import analyze_spine
    from ..io.labelmaps import read_label_map
    from ..io.radiograph import read_radiograph

    radiograph = read_radiograph(record.image)
    labels = read_label_map(record.labels, radiograph.pixels.shape)  # checks the size against the image
    geometry = analyze_spine(labels, radiograph.spacing, patient_orientation=radiograph.patient_orientation,
                             image=radiograph.pixels)
    return radiograph, geometry


def model_crop(pixels: np.ndarray, geometry, input_size: tuple[int, int]) -> np.ndarray:
    """The network's input from a radiograph: geometry's paper crop at input_size (rows, cols), normalised."""
    from ..geometry.spine import extract_crop

    return normalise_crop(extract_crop(pixels, geometry.crop, out_shape=tuple(input_size)))


def crop_record(record: ScoreRecord, input_size: tuple[int, int]) -> np.ndarray:
    """Read one case and return its normalised crop at input_size (rows, cols), anterior on the left."""
    radiograph, geometry = read_case(record)
    return model_crop(radiograph.pixels, geometry, input_size)


def _cache_key(records: Sequence[ScoreRecord], input_size: tuple[int, int]) -> str:
    text = json.dumps([[str(r.image), str(r.labels), r.image.stat().st_mtime_ns if r.image.exists() else 0]
                       for r in records] + [list(input_size)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_crop_set(records: Sequence[ScoreRecord], input_size: tuple[int, int], cache_dir: str | Path | None = None,
                  progress: Callable[[int, int], None] | None = None) -> CropSet:
    """Crops and targets of every record that geometry can crop; the others are listed in `skipped`.

    With cache_dir, the crops are saved as `crops_<H>x<W>_<key>.npz` and reused when the inputs are unchanged.
    """
    from ..io.atomic import atomic_path

    input_size = (int(input_size[0]), int(input_size[1]))
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"crops_{input_size[0]}x{input_size[1]}_{_cache_key(records, input_size)}.npz"
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as data:
            crops, kept = data["crops"], [int(i) for i in data["kept"]]
            skipped = json.loads(str(data["skipped"]))
    else:
        crops_list, kept, skipped = [], [], {}
        for index, record in enumerate(records):
            try:
                crops_list.append(crop_record(record, input_size).astype(np.float16))
                kept.append(index)
            except AACScoreError as error:
                skipped[record.image.name] = str(error)
            if progress is not None:
                progress(index + 1, len(records))
        crops = np.stack(crops_list) if crops_list else np.zeros((0, *input_size), np.float16)
        if cache is not None:
            with atomic_path(cache) as temporary:
                np.savez(temporary, crops=crops, kept=np.array(kept, dtype=np.int64), skipped=json.dumps(skipped))
    chosen = [records[i] for i in kept]
    has_subs = bool(chosen) and all(r.subscores is not None for r in chosen)
    return CropSet(
        crops=torch.from_numpy(np.asarray(crops)).unsqueeze(1),
        totals=torch.tensor([r.aac24 for r in chosen], dtype=torch.float32),
        subscores=torch.tensor([r.subscores for r in chosen], dtype=torch.float32) if has_subs else None,
        names=[r.image.name for r in chosen],
        skipped=skipped,
    )


def phantom_case(seed: int, index: int, style: str, input_size: tuple[int, int]):
    """Generate one phantom in memory and crop it from its drawn label map: (crop float16, aac24, subscores, name).

    The crop equals the one made from the written files (the reader only undoes a linear rescale and MONOCHROME1,
    which the percentile normalisation ignores), without the cost of encoding and decoding a large DICOM.
    """
    from ..geometry.spine import analyze_spine
    from ..phantoms.generator import generate_phantom, read_back

    phantom = generate_phantom(seed, style, index)
    radiograph = read_back(phantom)
    geometry = analyze_spine(phantom.labels, radiograph.spacing, patient_orientation=radiograph.patient_orientation,
                             image=phantom.pixels)
    crop = model_crop(phantom.pixels, geometry, input_size)
    truth = phantom.truth
    return (crop.astype(np.float16), float(truth["aac24"]), [float(truth["subscores"][c]) for c in SUBSCORE_COLUMNS],
            f"{phantom.name}.dcm")


def _phantom_case_or_error(job: tuple[int, int, str, tuple[int, int]]):
    try:
        return phantom_case(*job)
    except AACScoreError as error:
        return str(error)


def synthetic_crop_set(n: int, seed: int, styles: Sequence[str], input_size: tuple[int, int],
                       cache_dir: str | Path | None = None, workers: int = 1,
                       progress: Callable[[int, int], None] | None = None) -> CropSet:
    """Crops of phantoms 0..n-1 of `seed` (styles taken in turn), generated in memory by `workers` processes.

    With cache_dir they are saved as `phantoms_<seed>_<n>_<styles>_<H>x<W>.npz`; a cache of the same seed,
    styles and size with at least n phantoms is reused (phantom i depends only on seed, i and style), so a smaller
    comparison run costs no generation. A changed generator needs a new seed or cache folder.
    """
    from concurrent.futures import ProcessPoolExecutor

    from ..phantoms.generator import check_styles

    styles = check_styles(styles)
    input_size = (int(input_size[0]), int(input_size[1]))
    key = f"{'-'.join(styles)}_{input_size[0]}x{input_size[1]}"
    if cache_dir is not None:
        for cached_n, cached in sorted(_phantom_caches(Path(cache_dir), seed, key)):
            if cached_n >= n:
                return _read_phantom_cache(cached, n)
    crops, totals, subscores, names, indices, skipped = [], [], [], [], [], {}
    jobs = [(seed, index, styles[index % len(styles)], input_size) for index in range(n)]
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for done, (job, result) in enumerate(zip(jobs, pool.map(_phantom_case_or_error, jobs, chunksize=4)), 1):
            if isinstance(result, str):
                skipped[str(job[1])] = f"phantom {job[1]} of seed {job[0]} ({job[2]}): {result}"
            else:
                crops.append(result[0])
                totals.append(result[1])
                subscores.append(result[2])
                names.append(result[3])
                indices.append(job[1])
            if progress is not None:
                progress(done, n)
    arrays = {"crops": np.stack(crops) if crops else np.zeros((0, *input_size), np.float16),
              "totals": np.asarray(totals, np.float32),
              "subscores": np.asarray(subscores, np.float32).reshape(-1, len(SUBSCORE_COLUMNS)),
              "names": np.array(names, dtype=str), "indices": np.asarray(indices, np.int64),
              "skipped": np.array(json.dumps(skipped))}
    if cache_dir is not None:
        from ..io.atomic import atomic_path

        with atomic_path(Path(cache_dir) / f"phantoms_{seed}_{n}_{key}.npz") as temporary:
            np.savez(temporary, **arrays)
    return _phantom_crop_set(arrays, n)


def _phantom_caches(cache_dir: Path, seed: int, key: str) -> list[tuple[int, Path]]:
    found = []
    for path in cache_dir.glob(f"phantoms_{seed}_*_{key}.npz"):
        count = path.name[len(f"phantoms_{seed}_"):-len(f"_{key}.npz")]
        if count.isdigit():
            found.append((int(count), path))
    return found


def _read_phantom_cache(path: Path, n: int) -> CropSet:
    with np.load(path, allow_pickle=False) as data:
        return _phantom_crop_set({name: data[name] for name in data.files}, n)


def _phantom_crop_set(arrays: dict, n: int) -> CropSet:
    """The CropSet of phantoms 0..n-1 among the arrays of a (possibly larger) generated set."""
    keep = np.flatnonzero(arrays["indices"] < n)
    skipped = {index: why for index, why in json.loads(str(arrays["skipped"])).items() if int(index) < n}
    return CropSet(torch.from_numpy(np.ascontiguousarray(arrays["crops"][keep])).unsqueeze(1),
                   torch.from_numpy(arrays["totals"][keep]), torch.from_numpy(arrays["subscores"][keep]),
                   [str(name) for name in arrays["names"][keep]], skipped)


class TrainingCrops:
    """The training crops as a map-style torch dataset whose keys are (index, draw): crop `index`, SynthSeg-style
    randomised with probability `probability` by a generator seeded from (seed, draw) (phantoms.randomise).

    The training loop numbers the draws by iteration and batch position, so a run (and a resumed run) sees the same
    randomisation whatever process prepares it; a torch DataLoader's worker processes can then prepare the next
    batches on the CPU cores while the accelerator trains. A randomised crop is normalised again (percentiles
    1..99), exactly as the scorer normalises any crop it meets.
    """

    def __init__(self, crops: torch.Tensor, probability: float = 0.0, strength: float = 1.0, seed: int = 0):
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"randomisation probability must lie in [0, 1], got {probability}")
        self.crops, self.probability, self.strength, self.seed = crops, probability, strength, seed
        if probability > 0:
            randomiser()  # fail at once, not in a worker process

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        index, draw = key
        crop = self.crops[index].float()
        if self.probability > 0:
            rng = np.random.default_rng([self.seed, draw])
            if rng.random() < self.probability:
                crop = torch.from_numpy(randomised_crop(crop[0].numpy(), rng, self.strength))[None]
        return crop


def with_randomised_copies(crop_set: CropSet, copies: int, strength: float = 1.0, seed: int = 0,
                           workers: int = 0) -> CropSet:
    """`crop_set` followed by `copies` SynthSeg-style randomised copies of every crop (same targets, names with
    `#r<k>`), made once by `workers` processes. Beyond the paper: on a GPU the loader processes that randomise on
    the fly (`TrainingCrops`) cannot keep up with a ResNet34 at 1000x500 (3.3 iterations a second on an H200 with
    8 of them), while stored copies cost a lookup. Copy k of crop i depends only on (seed, i, k)."""
    from concurrent.futures import ProcessPoolExecutor

    if copies <= 0:
        return crop_set
    randomiser()  # fail at once, not in a worker process
    jobs = [(crop_set.crops[i, 0].numpy(), seed, i, k, strength) for k in range(1, copies + 1)
            for i in range(len(crop_set))]
    if workers > 0:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            made = list(pool.map(_randomised_copy, jobs, chunksize=8))
    else:
        made = [_randomised_copy(job) for job in jobs]
    extra = torch.from_numpy(np.stack(made)).unsqueeze(1).to(crop_set.crops.dtype)
    repeat = copies + 1
    return CropSet(torch.cat([crop_set.crops, extra]), crop_set.totals.repeat(repeat),
                   None if crop_set.subscores is None else crop_set.subscores.repeat(repeat, 1),
                   crop_set.names + [f"{name}#r{k}" for k in range(1, repeat) for name in crop_set.names],
                   dict(crop_set.skipped))


def _randomised_copy(job: tuple) -> np.ndarray:
    crop, seed, index, copy, strength = job
    rng = np.random.default_rng([seed, index, copy, 0x5C0])  # a stream apart from TrainingCrops' (seed, draw)
    return randomised_crop(crop.astype(np.float32), rng, strength)


def randomised_crop(crop: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """A crop SynthSeg-style randomised and normalised again (percentiles 1..99), as the scorer normalises any crop."""
    return normalise_crop(randomiser()(crop, rng, strength=strength))


def randomiser() -> Callable:
    """phantoms.randomise.randomise(image, rng, labels=None, strength=1.0): random tissue intensities, bias field,
    gamma, blur, resolution and noise."""
    try:
        from ..phantoms.randomise import randomise
    except ImportError as error:
        raise AACScoreError(f"training-time randomisation needs phantoms/randomise.py ({error})") from None
    return randomise


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded random split into training and validation indices (at least one of each when n >= 2)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"validation fraction must lie in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(n).tolist()
    n_val = min(max(int(round(n * val_fraction)), 1 if val_fraction > 0 and n >= 2 else 0), n - 1) if n else 0
    return sorted(order[n_val:]), sorted(order[:n_val])


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return float(low + (high - low) * torch.rand((), generator=generator))


def augment_batch(batch: torch.Tensor, generator: torch.Generator, robust: bool = False,
                  rotation: float = PAPER_AUGMENTATION["rotation"]) -> torch.Tensor:
    """Randomly augment a training batch (B, 1, H, W) in 0..1 with the paper's transforms (+ robust ones).

    Parameters are drawn per image from `generator` (a CPU generator), so the same generator state gives the same
    batch; the batch may lie on the accelerator, where the transforms then run.
    `rotation` is the largest angle in degrees (the paper's 30 by default; crops are already upright).
    """
    import torchvision.transforms.v2.functional as F

    p = PAPER_AUGMENTATION
    out = []
    height, width = batch.shape[-2:]
    for image in batch.float():
        image = F.adjust_brightness(image, _uniform(generator, 1 - p["brightness"], 1 + p["brightness"]))
        image = F.adjust_contrast(image, _uniform(generator, 1 - p["contrast"], 1 + p["contrast"]))
        if robust:
            r = ROBUST_AUGMENTATION
            image = F.adjust_gamma(image, math.exp(_uniform(generator, *map(math.log, r["gamma"]))))
            sigma = _uniform(generator, *r["blur_sigma"])
            if _uniform(generator, 0, 1) < r["blur_probability"] and sigma > 0.1:
                kernel = 2 * math.ceil(3 * sigma) + 1
                image = F.gaussian_blur(image, [kernel, kernel], [sigma, sigma])
        sigma = _uniform(generator, 0.0, p["noise_sigma"])
        noise = torch.randn(image.shape, generator=generator).to(image.device)
        image = (image + sigma * noise).clamp(0.0, 1.0)
        image = F.affine(
            image,
            angle=_uniform(generator, -rotation, rotation),
            translate=[_uniform(generator, -p["shift"], p["shift"]) * width,
                       _uniform(generator, -p["shift"], p["shift"]) * height],
            scale=_uniform(generator, 1 - p["scale"], 1 + p["scale"]),
            shear=[0.0, 0.0],
            interpolation=F.InterpolationMode.BILINEAR,
        )
        out.append(image)
    return torch.stack(out)

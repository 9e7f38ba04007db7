"""Which way up an untagged radiograph is: a small network that tells the quarter turn from the whole picture.

Why: the segmenter was trained on upright radiographs (feet at the bottom). One stored on its side or upside down
without a PatientOrientation tag (a PNG or JPEG export, a DICOM without the tag) came out as an error row or with
levels to doubt: of 48 turned phantoms none was right. The segmenter's own output does not tell the turn: on a
turned image it counts levels, wrongly, with high confidence. A reader sees the turn at a glance from the whole
picture (the spine's run, the pelvis below, ribs and diaphragm above), so this is a whole-image classifier on a
small square thumbnail with four classes, numpy.rot90's k applied to an upright image. It is trained on phantoms of
the training families with their look (`phantoms.randomise`), crop, tilt, facing and padding randomised, and lives
in its own package (kind "upright"), so that any segmenter can use it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from ..devices import resolve_device
from ..errors import AACScoreError
from ..geometry.orientation import upright_turns
from .dataset import resample_image, window_intensity

THUMBNAIL_PX = 128  # side of the square thumbnail the network sees: enough for the run of the spine and the pelvis
BASE_PX = 256  # long side each training image is kept at, before a sample is cut and turned from it
WIDTHS = (16, 32, 64, 96, 128)  # channels of the five stride-2 stages
TURN_NAMES = ("upright", "turned 90 degrees anticlockwise", "turned 180 degrees", "turned 90 degrees clockwise")
MAX_TILT_DEG = 20.0  # training tilt: lateral radiographs are taken up to about this far off vertical
CROP_KEEP = (0.6, 1.0)  # share of each side a training sample keeps (field of view: top and bottom vary)
WIDER_CHANCE, WIDER_UP_TO = 0.3, 1.8  # share of samples padded to a wider view, and how much wider at most

Log = Callable[[str], None]

if TYPE_CHECKING:
    import torch

    from ..packages import ModelPackage


def thumbnail(pixels: np.ndarray, size: int = THUMBNAIL_PX) -> np.ndarray:
    """The image shrunk to fit a `size` square (area averaging, aspect kept), windowed to [0, 1] and centred on a
    black square: its shape is part of what the network reads (a lateral lumbar view is taller than wide)."""
    rows, cols = pixels.shape
    factor = size / max(rows, cols)
    small = window_intensity(resample_image(np.asarray(pixels, np.float32),
                                            (max(4, round(rows * factor)), max(4, round(cols * factor)))))
    out = np.zeros((size, size), np.float32)
    top, left = (size - small.shape[0]) // 2, (size - small.shape[1]) // 2
    out[top:top + small.shape[0], left:left + small.shape[1]] = small
    return out


def build_network(widths: Sequence[int] = WIDTHS) -> "torch.nn.Module":
    """Five stride-2 stages of two 3x3 convolutions each, global average pooling, four logits (the turns)."""
    import torch.nn as nn

    layers, channels = [], 1
    for width in widths:
        layers += [nn.Conv2d(channels, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                   nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
                         nn.Linear(channels, len(TURN_NAMES)))


@dataclass(frozen=True)
class TurnGuess:
    """The turn the network sees (numpy.rot90's k from upright to the image as stored) and its probabilities."""

    turns: int
    probabilities: tuple[float, float, float, float]

    @property
    def probability(self) -> float:
        return self.probabilities[self.turns]


class UprightCheck:
    """An upright package's network, ready to tell the turn of a radiograph."""

    def __init__(self, package, device):
        import torch

        from ..packages import load_safetensors

        self.package = package
        architecture = package.manifest["architecture"]
        self.size = int(package.manifest["input"].get("thumbnail_px", THUMBNAIL_PX))
        self.network = build_network(architecture.get("widths", WIDTHS))
        state = {name: tensor.float() if tensor.is_floating_point() else tensor
                 for name, tensor in load_safetensors(package, "weights.safetensors").items()}
        try:
            self.network.load_state_dict(state)
        except RuntimeError as error:
            raise AACScoreError(f"{package.path}: weights do not fit the network its manifest describes ({error})")
        self.device = device
        self.network.to(device).eval()
        self._torch = torch

    @classmethod
    def from_package(cls, package=None, device: str = "auto", models_dir=None) -> "UprightCheck":
        """Load an upright package (path, name, ModelPackage, or None for the newest installed/bundled)."""
        from ..packages import ModelPackage, find_package

        if not isinstance(package, ModelPackage):
            package = find_package(package, "upright", models_dir)
        return cls(package, resolve_device(device))

    def guess(self, pixels: np.ndarray) -> TurnGuess:
        """How the stored image is turned from upright, as the network sees it."""
        torch = self._torch
        image = torch.from_numpy(thumbnail(pixels, self.size))[None, None].to(self.device)
        with torch.no_grad():
            probabilities = torch.softmax(self.network(image).float(), 1)[0].cpu().numpy()
        return TurnGuess(int(probabilities.argmax()), tuple(round(float(p), 4) for p in probabilities))


# ---------------------------------------------------------------------------------------------- training


def base_image(pixels: np.ndarray) -> np.ndarray:
    """A training image kept small (long side BASE_PX) and windowed, from which samples are cut."""
    rows, cols = pixels.shape
    factor = min(1.0, BASE_PX / max(rows, cols))
    return window_intensity(resample_image(np.asarray(pixels, np.float32),
                                           (max(8, round(rows * factor)), max(8, round(cols * factor)))))


def upright_pixels(radiograph) -> np.ndarray:
    """A training radiograph's pixels turned upright as its PatientOrientation says (untagged ones are taken as
    upright: train only on images known to be)."""
    return np.rot90(radiograph.pixels, upright_turns(radiograph.patient_orientation))


def training_sample(base: np.ndarray, rng: np.random.Generator, size: int = THUMBNAIL_PX) -> tuple[np.ndarray, int]:
    """(thumbnail, turns): an upright `base` image with its look randomised, cut to another field of view, tilted,
    facing either way, sometimes padded to a wider view, then turned by a random number of quarter turns."""
    from scipy import ndimage

    from ..phantoms.randomise import randomise

    image = randomise(base, rng, strength=float(rng.uniform(0.3, 1.0)))
    rows, cols = image.shape
    keep_rows, keep_cols = (max(8, int(side * rng.uniform(*CROP_KEEP))) for side in (rows, cols))
    top, left = int(rng.integers(0, rows - keep_rows + 1)), int(rng.integers(0, cols - keep_cols + 1))
    image = image[top:top + keep_rows, left:left + keep_cols]
    image = ndimage.rotate(image, float(rng.uniform(-MAX_TILT_DEG, MAX_TILT_DEG)), order=1, reshape=True,
                           mode="constant", cval=float(np.percentile(image, 5)))
    if rng.random() < WIDER_CHANCE:
        pad = [int(side * (rng.uniform(1.0, WIDER_UP_TO) - 1) / 2) for side in image.shape]
        fill = float(rng.choice([image.min(), image.max(), np.percentile(image, 5)]))
        image = np.pad(image, ((pad[0], pad[0]), (pad[1], pad[1])), constant_values=fill)
    if rng.random() < 0.5:
        image = image[:, ::-1]  # the patient facing the other way
    turns = int(rng.integers(0, len(TURN_NAMES)))
    return thumbnail(np.rot90(image, turns), size), turns


_BASES: list[np.ndarray] = []  # the training images of a sample-making process, set once per process


def _keep_bases(bases: list[np.ndarray]) -> None:
    _BASES[:] = bases


def _samples(job: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    first, count, seed = job
    rng = np.random.default_rng([seed, first])
    made = [training_sample(_BASES[(first + i) % len(_BASES)], rng) for i in range(count)]
    return np.stack([m[0] for m in made]).astype(np.float16), np.array([m[1] for m in made], np.int64)


def make_samples(bases: list[np.ndarray], n: int, seed: int, processes: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """`n` randomised, turned thumbnails cycling through `bases`; the same for the same seed on any process count."""
    chunk = 256
    jobs = [(first, min(chunk, n - first), seed) for first in range(0, n, chunk)]
    if processes > 1:
        from multiprocessing import get_context

        with get_context("spawn").Pool(processes, initializer=_keep_bases, initargs=(bases,)) as pool:
            parts = pool.map(_samples, jobs)
    else:
        _keep_bases(bases)
        parts = [_samples(job) for job in jobs]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def train_upright(images: Sequence[str | Path], out_dir: str | Path, samples: int = 20000, epochs: int = 12,
                  seed: int = 0, processes: int = 1, device: str = "auto", version: str | None = None,
                  held_out: Sequence[str | Path] = (), log: Log = print) -> "ModelPackage":
    """Train the turn classifier on upright radiographs (folders, files or CSV lists) and write an upright
    package to `out_dir`. `held_out`: upright radiographs of a source kept out of training, whose accuracy over the
    four turns goes in the manifest's metrics."""
    import torch
    import torch.nn.functional as F

    from ..io.cohort import collect
    from ..io.radiograph import read_radiograph
    from ..packages import timestamped_version, write_package

    started = time.perf_counter()
    paths = [item.image for item in collect(images)]
    if not paths:
        raise AACScoreError(f"no radiographs found in {', '.join(str(p) for p in images)}")
    bases = [base_image(upright_pixels(read_radiograph(path))) for path in paths]
    torch.manual_seed(seed)
    x, y = make_samples(bases, samples, seed, processes)
    log(f"{len(paths)} radiographs, {samples} turned samples made in {time.perf_counter() - started:.0f} s")
    target = resolve_device(device)
    network = build_network().to(target)
    batch = 64
    steps = max(1, epochs * (samples // batch))
    optimiser = torch.optim.AdamW(network.parameters(), 2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, 4e-3, total_steps=steps)
    images_t, turns_t = torch.from_numpy(x)[:, None], torch.from_numpy(y)
    step, generator = 0, torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        network.train()
        order, total = torch.randperm(samples, generator=generator), 0.0
        for first in range(0, samples - batch + 1, batch):
            chosen = order[first:first + batch]
            loss = F.cross_entropy(network(images_t[chosen].float().to(target)), turns_t[chosen].to(target),
                                   label_smoothing=0.05)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if step < steps - 1:
                schedule.step()
            step, total = step + 1, total + loss.item()
        log(f"epoch {epoch + 1}/{epochs}: loss {total / max(1, samples // batch):.4f} "
            f"({time.perf_counter() - started:.0f} s)")
    network.eval()
    metrics = {"training_loss": round(total / max(1, samples // batch), 4)}
    if held_out:
        metrics["held_out"] = turn_accuracy(network, [upright_pixels(read_radiograph(item.image))
                                                       for item in collect(held_out)], target)
        log(f"held-out radiographs, all four turns: {metrics['held_out']['accuracy']:.1%} right")
    from safetensors.torch import save

    manifest = {
        "name": "aacscore-upright", "version": version or timestamped_version("1.0"), "kind": "upright",
        "architecture": {"network": "stride-2 CNN", "widths": list(WIDTHS),
                         "parameters": int(sum(p.numel() for p in network.parameters())), "weights_dtype": "float16"},
        "input": {"thumbnail_px": THUMBNAIL_PX, "window_percentiles": [0.5, 99.5]},
        "labels": list(TURN_NAMES),
        "training_data": {"sources": [Path(source).name for source in images], "radiographs": len(paths),
                          "samples": samples, "epochs": epochs, "seed": seed,
                          "augmentation": {"tilt_deg": MAX_TILT_DEG, "crop_keep": list(CROP_KEEP),
                                           "wider_chance": WIDER_CHANCE, "wider_up_to": WIDER_UP_TO,
                                           "look": "phantoms.randomise", "mirrored": 0.5}},
        "training": {"device": str(target), "seconds": round(time.perf_counter() - started, 1)},
        "metrics": metrics,
    }
    weights = {name: (tensor.half() if tensor.is_floating_point() else tensor).detach().cpu().contiguous()
               for name, tensor in network.state_dict().items()}  # fp16: half the size, the same turns
    return write_package(out_dir, manifest, {"weights.safetensors": save(weights)})


def turn_accuracy(network: "torch.nn.Module", images: Sequence[np.ndarray], device) -> dict:
    """Share of (image, turn) pairs whose turn the network names, over all four turns of upright `images`."""
    import torch

    right, total = 0, 0
    with torch.no_grad():
        for pixels in images:
            batch = torch.from_numpy(np.stack([thumbnail(np.rot90(pixels, k)) for k in range(len(TURN_NAMES))]))
            named = network(batch[:, None].to(device)).argmax(1).cpu().numpy()
            right += int((named == np.arange(len(TURN_NAMES))).sum())
            total += len(TURN_NAMES)
    return {"images": len(images), "accuracy": round(right / total, 4) if total else None}


# ---------------------------------------------------------------------------------------------- command line


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "train-upright", help="train the network that tells which way up an untagged radiograph is",
        description="Train a four-class turn classifier on upright radiographs (each sample randomised and turned) "
                    "and write an upright package to --out.")
    parser.add_argument("images", nargs="+", metavar="PATH", help="upright radiographs: files, folders or CSV lists")
    parser.add_argument("--out", required=True, help="output package folder")
    parser.add_argument("--samples", type=int, default=20000, help="turned, randomised samples to train on")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processes", type=int, default=1, help="processes making the samples")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--version", default=None, help="package version (default: 1.0+timestamp)")
    parser.add_argument("--held-out", nargs="*", default=(), metavar="PATH",
                        help="upright radiographs kept out of training, for the accuracy in the manifest")
    parser.set_defaults(func=_train_command)


def _train_command(args) -> int:
    if args.samples < 64 or args.epochs < 1:
        raise AACScoreError("--samples must be at least 64 and --epochs at least 1")
    package = train_upright(args.images, args.out, args.samples, args.epochs, args.seed, args.processes,
                            args.device, args.version, args.held_out)
    print(f"wrote {package}")
    return 0

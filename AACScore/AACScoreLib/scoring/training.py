"""`aacscore train-scorer`: train the AAC-24 regression network on a researcher's own data (or phantoms).

The recipe is Shao et al. (2025): SGD (momentum 0.9, weight decay 5e-4), lr 0.01 warmed up linearly from lr/3 over
200 iterations then cosine-annealed to 1e-4 over the remaining iterations, batch 32, MSE, up to 500 epochs,
validation every 10 epochs with early stopping. Beyond the paper, and settable: the total is regressed in
standardised units (scoring.model), gradients are clipped (norm 5), the largest rotation can be lowered, crops can be
SynthSeg-style randomised before the paper's augmentations (`--randomise P`, phantoms.randomise), and a time budget
fits the epoch count (and so the cosine schedule) to the time there is. On CUDA the network runs channels-last in
mixed precision (bfloat16, or float16 with loss scaling), the paper's augmentations run on the GPU, and worker
processes randomise the next batches on the CPU cores; phantoms are generated and cropped before training starts.
A run is resumable: the model, the optimiser's momentum, the position in the schedule and every random state are
saved as safetensors + JSON (never pickle), so an interrupted run continues exactly as it would have.
The result is a model package (fp16 safetensors + manifest with settings and validation/held-out metrics).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..devices import resolve_device
from ..errors import AACScoreError
from ..kauppila import SUBSCORE_COLUMNS
from ..packages import timestamped_version
from ..phantoms.families import FAMILIES, HELD_OUT_FAMILY
from ..phantoms.generator import parse_styles

CHECKPOINT_WEIGHTS = "checkpoint.safetensors"
CHECKPOINT_STATE = "checkpoint.json"
BEST_WEIGHTS = "best.safetensors"
PACKAGE_WEIGHTS = "weights.safetensors"
AUGMENT_MODES = ("paper", "robust", "none")
PRECISIONS = ("bf16", "fp16", "fp32")  # on CUDA; the CPU always trains in float32


@dataclass
class TrainSettings:
    """Every setting of a run (written into the package manifest). Defaults are the paper's."""

    input_size: tuple[int, int] = (1000, 500)
    backbone: str = "resnet34"
    scse_combine: str = "max"
    subscores_head: bool = False
    subscore_weight: float = 1.0
    epochs: int = 500
    batch: int = 32
    lr: float = 0.01
    min_lr: float = 1e-4
    warmup_iterations: int = 200
    warmup_start_factor: float = 1.0 / 3.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    val_fraction: float = 0.2
    val_every: int = 10
    patience: int = 5  # validations without improvement before stopping
    clip_grad_norm: float = 5.0  # beyond the paper: from random initialisation the BatchNorm1d head can blow up
    augment: str = "paper"  # "paper", "robust" (paper + gamma and blur, beyond the paper) or "none"
    rotation: float = 30.0  # largest augmentation rotation in degrees
    randomise: float = 0.0  # probability that a training crop is SynthSeg-style randomised (beyond the paper)
    randomise_strength: float = 1.0
    randomise_copies: int = 0  # randomised copies of every training crop, made once before training
    precision: str = "bf16"  # mixed precision on CUDA: "bf16", "fp16" (with loss scaling) or "fp32"
    time_budget_minutes: float | None = None  # train at most `epochs`, fewer if the budget ends first
    seed: int = 0
    device: str = "auto"

    def architecture(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "scse_combine": self.scse_combine, "subscores_head": self.subscores_head}


@dataclass
class TrainResult:
    epochs_run: int
    iterations: int
    best_epoch: int
    best_val_loss: float | None
    seconds: float
    device: str
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False


def lr_at(iteration: int, total_iterations: int, s: TrainSettings) -> float:
    """Learning rate at an iteration: linear warm-up from lr·f to lr, then cosine decay to min_lr at the end."""
    if iteration < s.warmup_iterations:
        return s.lr * (s.warmup_start_factor + (1.0 - s.warmup_start_factor) * iteration / s.warmup_iterations)
    remaining = max(total_iterations - s.warmup_iterations, 1)
    progress = min((iteration - s.warmup_iterations) / remaining, 1.0)
    return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1.0 + math.cos(math.pi * progress))


def iterations_per_epoch(n_train: int, batch: int) -> int:
    """Batches per epoch; a last batch of one image is dropped (BatchNorm cannot train on a single image)."""
    return n_train // batch + (1 if n_train % batch >= 2 else 0)


def predict(model, crops, device, batch: int = 32, precision: str = "bf16"):
    """Network outputs (N, 1 or 9) for crops (N, 1, H, W) in eval mode, as a float32 CPU tensor."""
    import torch

    model.eval()
    outputs = []
    with torch.no_grad(), _autocast(device, precision):
        for start in range(0, len(crops), batch):
            outputs.append(model(crops[start:start + batch].to(device).float()).float().cpu())
    return torch.cat(outputs) if outputs else torch.zeros((0, 1))


def _autocast(device, precision: str = "bf16"):
    """Mixed precision on CUDA (bfloat16 needs no loss scaling; float16 does); full float32 on the CPU."""
    import contextlib

    import torch

    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _loss(outputs, totals, subscores, s: TrainSettings, target_std: float):
    """MSE of the total in standardised units (+ weighted MSE of the 0..3 subscores)."""
    import torch.nn.functional as F

    loss = F.mse_loss(outputs[:, 0], totals) / target_std ** 2
    if s.subscores_head and subscores is not None:
        loss = loss + s.subscore_weight * F.mse_loss(outputs[:, 1:], subscores)
    return loss


# ------------------------------------------------------------------------------------------ checkpoints


def _save_checkpoint(work_dir: Path, model, optimizer, generator, state: dict) -> None:
    import torch
    from safetensors.torch import save

    from ..io.atomic import write_bytes_atomic, write_text_atomic

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param in enumerate(params):
        buffer = optimizer.state.get(param, {}).get("momentum_buffer")
        if buffer is not None:
            tensors[f"momentum.{index}"] = buffer.detach().cpu().contiguous()
    tensors["rng.generator"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    # Weights first, then the JSON; both name the iteration, so a crash between the two writes is detected on resume.
    write_bytes_atomic(work_dir / CHECKPOINT_WEIGHTS, save(tensors, metadata={"iteration": str(state["iteration"])}))
    write_text_atomic(work_dir / CHECKPOINT_STATE, json.dumps(state, indent=1))


def _load_checkpoint(work_dir: Path, model, optimizer, generator) -> dict:
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    state_path, weights_path = work_dir / CHECKPOINT_STATE, work_dir / CHECKPOINT_WEIGHTS
    if not state_path.is_file() or not weights_path.is_file():
        raise AACScoreError(f"{work_dir}: no checkpoint to resume from")
    state = json.loads(state_path.read_text(encoding="utf-8"))
    with safe_open(weights_path, "pt") as handle:
        if handle.metadata().get("iteration") != str(state["iteration"]):
            raise AACScoreError(f"{work_dir}: checkpoint weights and state disagree (interrupted while saving?)")
    tensors = load_file(weights_path)
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param in enumerate(params):
        if f"momentum.{index}" in tensors:
            optimizer.state[param]["momentum_buffer"] = tensors[f"momentum.{index}"].to(param.device)
    generator.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state


# ------------------------------------------------------------------------------------------ training


def train(train_set, val_set, settings: TrainSettings, work_dir: str | Path, *, imagenet_weights: str | Path | None = None,
          resume: bool = False, log: Callable[[str], None] = print, checkpoint_seconds: float = 60.0,
          on_epoch_end: Callable[[int, dict], None] | None = None, loader_workers: int = 0,
          initial_weights: dict | None = None, freeze: Sequence[str] = (), freeze_batchnorm: bool = False):
    """Train on `train_set` (a scoring.data.CropSet), validating on `val_set` (may be empty); returns the model
    with the best validation weights loaded, and a TrainResult.

    A checkpoint goes to work_dir after every validation, at the end, and otherwise after any epoch that ends
    `checkpoint_seconds` or more after the last one (writing ~2x the weights every few seconds would dominate
    small runs); a resumed run repeats at most those epochs, identically. `loader_workers` processes prepare
    (randomise) the next batches; the result does not depend on their number.

    Fine-tuning: `initial_weights` (a package's state dict, its score scale included) start the network instead
    of a fresh initialisation, the backbone stages named in `freeze` are not trained, and with
    `freeze_batchnorm` every BatchNorm layer keeps its running statistics.
    """
    import torch
    from safetensors.torch import load_file, save

    from ..io.atomic import write_bytes_atomic
    from ..segmentation.training import epochs_within_budget
    from .data import TrainingCrops, augment_batch, with_randomised_copies
    from .model import batchnorm_modules, build_model, freeze_stages

    s = settings
    if len(train_set) < 2:
        raise AACScoreError(f"need at least 2 training images, got {len(train_set)}")
    if s.augment not in AUGMENT_MODES:
        raise ValueError(f"augment must be one of {AUGMENT_MODES}, got {s.augment!r}")
    if s.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {s.precision!r}")
    if s.subscores_head and train_set.subscores is None:
        raise AACScoreError("--subscores-head needs the eight subscore columns L1A..L4P in the training data")
    if s.randomise_copies < 0:
        raise ValueError(f"randomise_copies must be 0 or more, got {s.randomise_copies}")
    if s.randomise_copies:
        began = time.monotonic()
        train_set = with_randomised_copies(train_set, s.randomise_copies, s.randomise_strength, s.seed, loader_workers)
        log(f"made {s.randomise_copies} randomised copies of each training crop ({len(train_set)} crops) in "
            f"{time.monotonic() - began:.0f} s")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(s.device)
    torch.manual_seed(s.seed)
    generator = torch.Generator().manual_seed(s.seed)
    model = build_model(s.architecture(), imagenet_weights)
    model.set_target_scale(float(train_set.totals.mean()), float(train_set.totals.std()))
    if initial_weights is not None:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in initial_weights.items()})
    frozen = freeze_stages(model, freeze) + (batchnorm_modules(model) if freeze_batchnorm else [])
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr_at(0, 1, s),
                                momentum=s.momentum, weight_decay=s.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and s.precision == "fp16")
    crops = TrainingCrops(train_set.crops, s.randomise, s.randomise_strength, s.seed)
    per_epoch = iterations_per_epoch(len(train_set), s.batch)
    state = {"epoch": 0, "iteration": 0, "best_val_loss": None, "best_epoch": 0, "bad_validations": 0,
             "history": [], "seconds": 0.0, "settings": _jsonable(asdict(s)), "train_names": train_set.names,
             "planned_epochs": s.epochs, "epoch_seconds": []}
    if resume:
        saved = _load_checkpoint(work_dir, model, optimizer, generator)
        if saved["settings"] != state["settings"] or saved["train_names"] != train_set.names:
            raise AACScoreError(f"{work_dir}: the checkpoint was made with other settings or data; "
                                "start without --resume or use another --work-dir")
        state = {**state, **saved}
        log(f"resuming after epoch {state['epoch']} (iteration {state['iteration']})")
    elif (work_dir / BEST_WEIGHTS).exists():
        (work_dir / BEST_WEIGHTS).unlink()

    started = time.monotonic() - state["seconds"]
    budget_s = None if s.time_budget_minutes is None else 60.0 * s.time_budget_minutes
    last_saved = time.monotonic()
    stopped_early = False
    bar = _progress_bar(s.epochs, state["epoch"])
    while state["epoch"] < state["planned_epochs"]:
        epoch_started = time.monotonic()
        total_iterations = per_epoch * state["planned_epochs"]
        model.train()
        for module in frozen:
            module.eval()
        order = torch.randperm(len(train_set), generator=generator)
        losses = []
        for step, images in enumerate(_batches(crops, order, per_epoch, s.batch, state["iteration"], loader_workers)):
            index = order[step * s.batch:(step + 1) * s.batch]
            images = images.to(device, non_blocking=True)
            if s.augment != "none":
                images = augment_batch(images, generator, robust=s.augment == "robust", rotation=s.rotation)
            images = images.contiguous(memory_format=memory_format)
            totals = train_set.totals[index].to(device)
            subs = None if train_set.subscores is None else train_set.subscores[index].to(device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(state["iteration"], total_iterations, s)
            with _autocast(device, s.precision):
                outputs = model(images)
            loss = _loss(outputs.float(), totals, subs, s, float(model.target_std))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if s.clip_grad_norm > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(loss.detach()))
            state["iteration"] += 1
        state["epoch"] += 1
        entry = {"epoch": state["epoch"], "iteration": state["iteration"], "train_loss": float(np.mean(losses)),
                 "lr": optimizer.param_groups[0]["lr"]}
        if budget_s is not None:  # refit the epoch count to the time left (the cosine schedule follows it)
            state["epoch_seconds"].append(time.monotonic() - epoch_started)
            left = budget_s - (time.monotonic() - started)
            state["planned_epochs"] = epochs_within_budget(state["epoch_seconds"], left, s.epochs)
        last = state["epoch"] >= state["planned_epochs"]
        if len(val_set) and (state["epoch"] % s.val_every == 0 or last):
            outputs = predict(model, val_set.crops, device, s.batch, s.precision)
            entry["val_loss"] = float(torch.mean((outputs[:, 0] - val_set.totals) ** 2))
            entry["val_mae"] = float(torch.mean(torch.abs(outputs[:, 0].clamp(0, 24) - val_set.totals)))
            if state["best_val_loss"] is None or entry["val_loss"] < state["best_val_loss"]:
                state.update(best_val_loss=entry["val_loss"], best_epoch=state["epoch"], bad_validations=0)
                write_bytes_atomic(work_dir / BEST_WEIGHTS, save(
                    {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}))
            else:
                state["bad_validations"] += 1
                stopped_early = state["bad_validations"] >= s.patience
        state["history"].append(entry)
        state["seconds"] = time.monotonic() - started
        if "val_loss" in entry or last or stopped_early or time.monotonic() - last_saved >= checkpoint_seconds:
            _save_checkpoint(work_dir, model, optimizer, generator, state)
            last_saved = time.monotonic()
        bar(entry)
        if on_epoch_end is not None:
            on_epoch_end(state["epoch"], entry)
        if stopped_early:
            log(f"early stop at epoch {state['epoch']}: no better validation loss in {s.patience} validations")
            break
    if budget_s is not None and state["planned_epochs"] < s.epochs and not stopped_early:
        log(f"time budget: stopped after epoch {state['epoch']} of {s.epochs}")
    if (work_dir / BEST_WEIGHTS).is_file():
        model.load_state_dict(load_file(str(work_dir / BEST_WEIGHTS)))
    else:
        state["best_epoch"] = state["epoch"]
    model = model.to(memory_format=torch.contiguous_format).eval()
    return model, TrainResult(state["epoch"], state["iteration"], state["best_epoch"], state["best_val_loss"],
                              time.monotonic() - started, str(device), state["history"], stopped_early)


def _batches(crops, order, per_epoch: int, batch: int, first_iteration: int, workers: int):
    """The epoch's batches of (possibly randomised) crops in `order`; each crop's draw is numbered by iteration
    and position, so the batches do not depend on `workers` (processes preparing the next batches)."""
    import torch
    from torch.utils.data import DataLoader

    keys = [[(int(index), (first_iteration + step) * batch + position)
             for position, index in enumerate(order[step * batch:(step + 1) * batch])] for step in range(per_epoch)]
    # The loader's own generator keeps it from drawing on torch's global one, which dropout uses.
    return DataLoader(crops, batch_sampler=keys, num_workers=workers, generator=torch.Generator(),
                      prefetch_factor=4 if workers else None)


def _progress_bar(epochs: int, start: int) -> Callable[[dict], None]:
    """One update per epoch: tqdm when installed, otherwise a plain line."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        bar = tqdm(total=epochs, initial=start, desc="train-scorer", unit="epoch", file=sys.stderr)

        def update(entry: dict) -> None:
            bar.set_postfix({k: round(v, 4) for k, v in entry.items() if k in ("train_loss", "val_mae", "lr")})
            bar.update(1)
            if entry["epoch"] >= epochs:
                bar.close()
        return update

    def line(entry: dict) -> None:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()),
              file=sys.stderr, flush=True)
    return line


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------ evaluation and package


def score_summary(truth: np.ndarray, pred: np.ndarray) -> dict:
    """Key agreement figures (metrics.evaluate_scores, no bootstrap) of predicted vs true totals."""
    from ..evaluation.metrics import evaluate_scores

    if len(truth) < 2:
        return {"n": int(len(truth))}
    result = evaluate_scores(np.asarray(truth, float), np.clip(np.asarray(pred, float), 0, 24), bootstrap=0)
    summary = {name: round(entry["value"], 4) for name, entry in result["metrics"].items()}
    summary["n"] = result["n"]
    summary["category_accuracy"] = round(result["categories"]["accuracy"]["value"], 4)
    summary["confusion_matrix"] = result["categories"]["matrix"]
    return summary


def evaluate_model(model, crop_set, device, batch: int = 32) -> dict:
    if len(crop_set) == 0:
        return {"n": 0}
    outputs = predict(model, crop_set.crops, device, batch)
    summary = score_summary(crop_set.totals.numpy(), outputs[:, 0].numpy())
    if outputs.shape[1] > 1 and crop_set.subscores is not None:
        subscores = outputs[:, 1:].clamp(0, 3)
        summary["subscore_mae"] = round(float((subscores - crop_set.subscores).abs().mean()), 4)
        summary["total_from_subscores_mae"] = round(float((subscores.sum(1) - crop_set.totals).abs().mean()), 4)
    return summary


def heatmap_band_summary(model, records, input_size: tuple[int, int], min_score: float = 12.0,
                         limit: int = 20) -> dict:
    """How much of the Grad-CAM mass lies on the aortic band (union of the four segment polygons) for up to
    `limit` cases scoring at least `min_score`; `band_area_fraction` is the band's share of the crop (chance)."""
    import torch

    from ..errors import AACScoreError
    from .gradcam import band_fraction, band_mask, grad_cam
    from .data import model_crop, read_case

    fractions, areas, all_zero = [], [], 0
    for record in [r for r in records if r.aac24 >= min_score][:limit]:
        try:
            radiograph, geometry = read_case(record)
        except AACScoreError:
            continue
        crop = model_crop(radiograph.pixels, geometry, input_size)
        heat = grad_cam(model, torch.from_numpy(crop))
        fraction = band_fraction(heat.on_image(geometry.crop, radiograph.pixels.shape), geometry)
        if fraction is None:
            all_zero += 1
            continue
        fractions.append(fraction)
        areas.append(float(band_mask(geometry, radiograph.pixels.shape).sum()) / float(np.prod(geometry.crop.shape)))
    return {"n": len(fractions), "min_score": min_score, "all_zero_maps": all_zero,
            "band_mass_fraction_mean": round(float(np.mean(fractions)), 4) if fractions else None,
            "band_mass_fraction_min": round(float(np.min(fractions)), 4) if fractions else None,
            "band_area_fraction_mean": round(float(np.mean(areas)), 4) if areas else None}


def build_manifest(model, settings: TrainSettings, result: TrainResult, training_data: dict, metrics: dict,
                   name: str, version: str) -> dict:
    labels = ["aac24"] + (list(SUBSCORE_COLUMNS) if settings.subscores_head else [])
    return {
        "name": name,
        "version": version,
        "kind": "scorer",
        "architecture": {**model.architecture, "family": "scSE-ResNet regression (Shao et al. 2025)",
                         "outputs": labels, "weights": PACKAGE_WEIGHTS, "dtype": "float16"},
        "input": {"size": list(settings.input_size), "channels": 1,
                  "crop": "geometry paper crop: inferior border of T12 to inferior border of L5, L1-L5 bodies "
                          "plus 3/4 mean AP length anteriorly; upright, anterior on the left",
                  "normalisation": "crop percentiles 1..99 -> 0..1, then (x - 0.449) / 0.226 inside the network"},
        "labels": labels,
        "training_data": training_data,
        "settings": _jsonable(asdict(settings)),
        "training": asdict(result),
        "metrics": metrics,
    }


def write_scorer_package(out_dir: str | Path, model, manifest: dict):
    """Write the model as a package (fp16 safetensors + manifest) with packages.write_package."""
    from safetensors.torch import save

    from ..packages import write_package
    from .model import state_dict_fp16

    return write_package(out_dir, manifest, {PACKAGE_WEIGHTS: save(state_dict_fp16(model))})


def data_summary(crop_set, source: str) -> dict:
    totals = crop_set.totals.numpy()
    from ..kauppila import category

    counts = {}
    for value in totals:
        counts[category(value)] = counts.get(category(value), 0) + 1
    return {"source": source, "n_images": len(crop_set), "n_skipped": len(crop_set.skipped),
            "aac24_mean": round(float(totals.mean()), 3) if len(totals) else None,
            "categories": counts, "has_subscores": crop_set.subscores is not None}


# ------------------------------------------------------------------------------------------ command line


def _input_size(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"input size must look like 1000x500 (rows x cols), got {text!r}") from None
    if rows < 32 or cols < 32:
        raise argparse.ArgumentTypeError("input size must be at least 32x32")
    return rows, cols


def add_cli(subparsers) -> None:
    d = TrainSettings()
    p = subparsers.add_parser("train-scorer", help="train the AAC-24 scoring network on your own data",
                              description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", help="CSV with file, aac24 [, labels] [, L1A..L4P]; paths relative to the CSV")
    source.add_argument("--phantoms", metavar="DIR", help="a folder written by `aacscore phantoms` (uses truth.csv)")
    source.add_argument("--synthetic", type=int, metavar="N",
                        help="N phantoms generated in memory (seed --phantom-seed), cropped from their drawn labels")
    p.add_argument("--phantom-seed", type=int, default=2000)
    p.add_argument("--phantom-styles", default="default,alt",
                   help="with --synthetic: phantom families, taken in turn (e.g. default,alt,projected)")
    p.add_argument("--allow-held-out-family", action="store_true",
                   help=f"train on the held-out family ({HELD_OUT_FAMILY or 'none registered'}) too, which is kept "
                        "out of the shipped models' training for held-out reports")
    p.add_argument("--workers", type=int, default=2,
                   help="processes generating phantoms (--synthetic, --holdout-synthetic) before training starts")
    p.add_argument("--out", required=True, help="model package folder to write")
    p.add_argument("--holdout", metavar="CSV_OR_DIR", help="test set evaluated after training (metrics in the manifest)")
    p.add_argument("--holdout-synthetic", type=int, metavar="N",
                   help="a held-out test set of N phantoms made in memory (families --holdout-styles), scored from "
                        "their drawn labels after training")
    p.add_argument("--holdout-styles", default=HELD_OUT_FAMILY,
                   help=f"families of --holdout-synthetic (default: the held-out family, {HELD_OUT_FAMILY})")
    p.add_argument("--holdout-seed", type=int, default=9500)
    p.add_argument("--work-dir", help="checkpoints (default: <out>.training)")
    p.add_argument("--cache-dir", help="crop cache, shareable between runs (default: the work dir)")
    p.add_argument("--input-size", type=_input_size, default=d.input_size, metavar="ROWSxCOLS",
                   help="network input (default 1000x500 as in the paper; e.g. 384x192 on a CPU)")
    p.add_argument("--backbone", choices=("resnet34", "resnet18"), default=d.backbone)
    p.add_argument("--imagenet-weights", metavar="PTH", help="local torchvision ImageNet file, e.g. resnet34-b627a593.pth")
    p.add_argument("--init-from", metavar="PACKAGE",
                   help="start from a scorer package's weights (same backbone and heads; the input size may differ) "
                        "instead of a fresh network, e.g. to widen a trained scorer to more phantom families or "
                        "carry it to a finer input size")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup_iterations, help="warm-up iterations")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--val-every", type=int, default=d.val_every, help="validate every N epochs")
    p.add_argument("--patience", type=int, default=d.patience, help="validations without improvement before stopping")
    p.add_argument("--clip-grad", type=float, default=d.clip_grad_norm,
                   help="gradient norm limit (not in the paper; 0 = off)")
    p.add_argument("--subscores-head", action="store_true", help="also predict L1A..L4P (needs them in the data)")
    p.add_argument("--subscore-weight", type=float, default=d.subscore_weight)
    p.add_argument("--augment", choices=AUGMENT_MODES, default=d.augment,
                   help="paper: the paper's transforms (training set only); robust: also random gamma and blur "
                        "(beyond the paper, for other scanners' processing); none")
    p.add_argument("--rotation", type=float, default=d.rotation, help="largest augmentation rotation (degrees)")
    p.add_argument("--randomise", type=float, default=d.randomise, metavar="P",
                   help="probability that a training crop is SynthSeg-style randomised (random tissue intensities, "
                        "bias field, gamma, blur, resolution, noise) before the paper's augmentations; beyond the "
                        "paper, for radiographs from elsewhere (default 0: off)")
    p.add_argument("--randomise-strength", type=float, default=d.randomise_strength)
    p.add_argument("--randomise-copies", type=int, default=d.randomise_copies, metavar="K",
                   help="also train on K SynthSeg-style randomised copies of every training crop, made once before "
                        "training by --loader-workers processes (beyond the paper; costs no CPU per iteration, so a "
                        "GPU is not held back by loader processes randomising on the fly as with --randomise)")
    p.add_argument("--loader-workers", type=int, default=0,
                   help="processes preparing (randomising) the next batches while the network trains")
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="on CUDA: bf16 or fp16 (with loss scaling) mixed precision, or fp32; the CPU uses fp32")
    p.add_argument("--time-budget-minutes", type=float, default=None,
                   help="train at most --epochs, fewer if this much training time ends first (the cosine "
                        "schedule is fitted to the epochs that fit)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device)
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: torch's default; 1 is fastest on a busy shared machine)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", action="store_true", help="continue the run checkpointed in the work dir")
    p.add_argument("--name", default="aacscore-scorer")
    p.add_argument("--version", default=None,
                   help="package version (default: 1.0.0+ the UTC time of training, so that two trainings never "
                        "share a name and version)")
    p.set_defaults(func=_run)


def training_families(text: str, allow_held_out: bool) -> tuple[str, ...]:
    """The phantom families to train on; a held-out family is refused unless explicitly allowed."""
    families = parse_styles(text)
    held_out = [family for family in families if FAMILIES[family].held_out]
    if held_out and not allow_held_out:
        raise AACScoreError(f"--phantom-styles {text}: {', '.join(held_out)} is the held-out family of the shipped "
                            "models (kept out of their training for held-out reports); add --allow-held-out-family "
                            "to train on it anyway")
    if held_out:
        print(f"warning: training on the held-out family {', '.join(held_out)}: its reports are no longer "
              "held out", file=sys.stderr)
    return families


def starting_weights(package_name: str, settings: TrainSettings) -> tuple[dict, dict]:
    """The weights of a scorer package to start training from, and its reference for the manifest; refused when
    the package's network is not the one `settings` describes.

    The input size may differ: the backbone is convolutional and pools globally, so its weights serve any size,
    and training it further at a finer size carries a low-resolution network to a higher one (Touvron et al.
    2019, FixRes)."""
    from ..packages import find_package, load_safetensors, package_reference

    package = find_package(package_name, "scorer")
    architecture = package.manifest["architecture"]
    have = {"backbone": architecture["backbone"], "subscore head": bool(architecture.get("subscores_head")),
            "scSE combine": architecture.get("scse_combine", "max")}
    want = {"backbone": settings.backbone, "subscore head": settings.subscores_head,
            "scSE combine": settings.scse_combine}
    differ = [f"{key} {have[key]} (asked: {want[key]})" for key in have if have[key] != want[key]]
    if differ:
        raise AACScoreError(f"--init-from {package.path}: another network: {'; '.join(differ)}")
    return load_safetensors(package, architecture["weights"]), package_reference(package)


def _records(source: str, is_dir: bool):
    from .data import read_score_csv

    path = Path(source)
    return read_score_csv(path / "truth.csv" if is_dir or path.is_dir() else path)


def _print_progress(done: int, total: int) -> None:
    if done % 50 == 0 or done == total:
        print(f"  cropped {done}/{total}", file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> int:
    import torch

    from .data import load_crop_set, split_indices, synthetic_crop_set

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    settings = TrainSettings(
        input_size=args.input_size, backbone=args.backbone, subscores_head=args.subscores_head,
        subscore_weight=args.subscore_weight, epochs=args.epochs, batch=args.batch, lr=args.lr,
        warmup_iterations=args.warmup, val_fraction=args.val_fraction, val_every=args.val_every,
        patience=args.patience, clip_grad_norm=args.clip_grad, augment=args.augment, rotation=args.rotation,
        randomise=args.randomise, randomise_strength=args.randomise_strength,
        randomise_copies=args.randomise_copies, precision=args.precision,
        time_budget_minutes=args.time_budget_minutes, seed=args.seed, device=args.device)
    if not 0.0 <= settings.randomise <= 1.0:
        raise AACScoreError(f"--randomise is a probability in [0, 1], got {settings.randomise}")
    if settings.randomise_copies < 0:
        raise AACScoreError(f"--randomise-copies must be 0 or more, got {settings.randomise_copies}")
    if settings.time_budget_minutes is not None and settings.time_budget_minutes <= 0:
        raise AACScoreError(f"--time-budget-minutes must be positive, got {settings.time_budget_minutes}")
    out = Path(args.out)
    work_dir = Path(args.work_dir) if args.work_dir else out.with_name(out.name + ".training")
    cache_dir = Path(args.cache_dir) if args.cache_dir else work_dir
    if args.holdout_synthetic and not args.holdout_styles:
        raise AACScoreError("--holdout-synthetic: no held-out phantom family is registered; name --holdout-styles")
    holdout_styles = parse_styles(args.holdout_styles) if args.holdout_synthetic else ()
    initial_weights, base = starting_weights(args.init_from, settings) if args.init_from else (None, None)
    if args.synthetic:
        styles = training_families(args.phantom_styles, args.allow_held_out_family)
        source = f"{args.synthetic} phantoms, seed {args.phantom_seed}, styles {'/'.join(styles)}"
        print(f"generating and cropping {source} at {settings.input_size[0]}x{settings.input_size[1]}", file=sys.stderr)
        data = synthetic_crop_set(args.synthetic, args.phantom_seed, styles, settings.input_size, cache_dir=cache_dir,
                                  workers=args.workers, progress=_print_progress)
    else:
        source = args.csv or args.phantoms
        records = _records(source, args.phantoms is not None)
        print(f"cropping {len(records)} images at {settings.input_size[0]}x{settings.input_size[1]}", file=sys.stderr)
        data = load_crop_set(records, settings.input_size, cache_dir=cache_dir, progress=_print_progress)
    holdout_set = None
    if args.holdout_synthetic:  # made before training, so that the accelerator is not held while the CPU draws
        print(f"generating {args.holdout_synthetic} held-out phantoms ({'/'.join(holdout_styles)}, seed "
              f"{args.holdout_seed})", file=sys.stderr)
        holdout_set = synthetic_crop_set(args.holdout_synthetic, args.holdout_seed, holdout_styles,
                                         settings.input_size, cache_dir=cache_dir, workers=args.workers,
                                         progress=_print_progress)
    for name, why in data.skipped.items():
        print(f"skipped {name}: {why}", file=sys.stderr)
    train_index, val_index = split_indices(len(data), settings.val_fraction, settings.seed)
    model, result = train(data.subset(train_index), data.subset(val_index), settings, work_dir,
                          imagenet_weights=args.imagenet_weights, resume=args.resume,
                          log=lambda text: print(text, file=sys.stderr), loader_workers=args.loader_workers,
                          initial_weights=initial_weights)
    device = resolve_device(settings.device)
    metrics = {"validation": evaluate_model(model, data.subset(val_index), device, settings.batch)}
    if args.holdout:
        holdout_records = _records(args.holdout, False)
        holdout = load_crop_set(holdout_records, settings.input_size, cache_dir=work_dir, progress=_print_progress)
        metrics["holdout"] = {"source": str(args.holdout), "n_skipped": len(holdout.skipped),
                              **evaluate_model(model, holdout, device, settings.batch),
                              "heatmap": heatmap_band_summary(model, holdout_records, settings.input_size)}
    if holdout_set is not None:
        metrics["holdout_synthetic"] = {
            "source": f"{args.holdout_synthetic} phantoms, seed {args.holdout_seed}, styles {'/'.join(holdout_styles)}",
            "n_skipped": len(holdout_set.skipped), **evaluate_model(model, holdout_set, device, settings.batch)}
    summary = data_summary(data, str(source))
    summary.update(n_train=len(train_index), n_validation=len(val_index))
    if base is not None:
        summary["initialised_from"] = base
    manifest = build_manifest(model, settings, result, summary, metrics, args.name,
                              args.version or timestamped_version("1.0.0"))
    package = write_scorer_package(out, model.cpu(), manifest)
    print(json.dumps(metrics, indent=1))
    print(f"wrote {package} in {result.seconds:.0f} s ({result.epochs_run} epochs, best epoch {result.best_epoch})")
    return 0

"""Train the L1–L5 segmenter with nnU-Net v2's own planning, preprocessing and training, then package it.

nnU-Net plans the 2d configuration from the exported dataset (fingerprint, normalisation, resampling); we then
set a smaller network and patch, because the exported images are already on a coarse 1.25 mm working grid (see
segmentation/dataset.py). The paper's plan for full-resolution radiographs is 1536x1024 patches, 9 stages, 59 M
parameters; ours is a 320x256 patch (40x32 cm: the whole working image of most radiographs, so the network sees
the sacrum and T12 while it counts levels), 6 stages of 16..128 features, about 2 M parameters, 4 MB as fp16
safetensors. The defaults follow nnU-Net's schedule (1000 epochs of 250 iterations); `time_budget_s` fits the
schedule to the time there is. A small trainer subclass restricts augmentation to what radiographs show:
rotation within ±20° and left-right mirroring only (upside-down spines do not occur, and mirroring rows would
swap L1 and L5).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import AACScoreError
from ..kauppila import VERTEBRAE
from ..packages import package_reference, timestamped_version
from .dataset import (DEFAULT_LONG_SIDE_PX, WINDOW_PERCENTILES, WORKING_SPACING_MM, dataset_name,
                             export_dataset, phantom_cases, read_export_summary)
from ..phantoms.families import FAMILIES
from ..phantoms.generator import PhantomSource, parse_styles, phantom_sources, write_phantoms

PLANS_NAME = "AACScorePlans"
TRAINER_NAME = "nnUNetTrainerAACScore"
PATCH_SIZE = (320, 256)
FEATURES = (16, 32, 64, 128, 128, 128)
BATCH_SIZE = 16
ROTATION_DEGREES = 20.0
DATASET_ID = 501


def _set_nnunet_environment(work: Path, raw: Path, processes: int) -> None:
    """nnU-Net reads its folders and worker counts from the environment."""
    os.environ["nnUNet_raw"] = str(raw)
    os.environ["nnUNet_preprocessed"] = str(work / "preprocessed")
    os.environ["nnUNet_results"] = str(work / "results")
    os.environ["nnUNet_n_proc_DA"] = str(processes)
    os.environ["nnUNet_def_n_proc"] = str(processes)
    os.environ.setdefault("nnUNet_compile", "false")


def customise_plans(plans: dict, patch_size: Sequence[int], features: Sequence[int], batch_size: int) -> dict:
    """nnU-Net's 2d plan with our patch, stage count and feature widths; other configurations dropped."""
    n = len(features)
    divisor = 2 ** (n - 1)
    if any(size % divisor for size in patch_size):
        raise AACScoreError(f"patch size {tuple(patch_size)} must be divisible by {divisor} for {n} stages")
    configuration = json.loads(json.dumps(plans["configurations"]["2d"]))
    configuration.update(patch_size=list(patch_size), batch_size=int(batch_size),
                         data_identifier=f"{PLANS_NAME}_2d")
    configuration["architecture"]["arch_kwargs"].update(
        n_stages=n, features_per_stage=list(features), kernel_sizes=[[3, 3]] * n,
        strides=[[1, 1]] + [[2, 2]] * (n - 1), n_conv_per_stage=[2] * n, n_conv_per_stage_decoder=[2] * (n - 1))
    return {**plans, "plans_name": PLANS_NAME, "configurations": {"2d": configuration}}


def trainer_class():
    """nnUNetTrainer with settable epochs, a time budget and radiograph-appropriate augmentation."""
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class nnUNetTrainerAACScore(nnUNetTrainer):
        time_budget_s: float | None = None  # set before run_training: fit the epoch count to this much time
        initial_weights: dict | None = None  # set before run_training: fine-tune from these (a package's)

        def initialize(self):
            super().initialize()
            if self.initial_weights is not None:
                from .package import transfer_weights

                fresh = transfer_weights(self.network, self.initial_weights, "base segmenter")
                self.print_to_log_file(f"started from the base segmenter's weights; fresh: {fresh or 'none'}")

        def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
            patch_size = self.configuration_manager.patch_size
            rotation = (-np.deg2rad(ROTATION_DEGREES), np.deg2rad(ROTATION_DEGREES))
            initial = get_patch_size(patch_size, rotation, rotation, rotation, (0.85, 1.25))
            mirror_axes = (1,)  # columns only: anterior may face either way; never swap L1 and L5
            self.inference_allowed_mirroring_axes = mirror_axes
            return rotation, False, initial, mirror_axes

        def on_train_start(self):
            super().on_train_start()
            self._budget_start = (time.perf_counter(), self.current_epoch, self.num_epochs)

        def on_epoch_start(self):
            if self.current_epoch >= self.num_epochs:  # the budget shortened the run below the loop's range
                raise _TimeBudgetReached
            super().on_epoch_start()

        def on_epoch_end(self):
            super().on_epoch_end()
            if self.time_budget_s is not None:
                started, first_epoch, max_epochs = self._budget_start
                starts = self.logger.get_value("epoch_start_timestamps", None)[first_epoch:]
                ends = self.logger.get_value("epoch_end_timestamps", None)[first_epoch:]
                left = self.time_budget_s - (time.perf_counter() - started)
                self.num_epochs = epochs_within_budget(np.subtract(ends, starts), left, max_epochs, first_epoch)
                self.lr_scheduler.max_steps = self.num_epochs

        def load_checkpoint(self, checkpoint: dict) -> None:
            """Resume from a checkpoint dict read with weights_only=True (the base class would unpickle a file)."""
            if not self.was_initialized:
                self.initialize()
            self.network.load_state_dict(checkpoint["network_weights"])
            self.optimizer.load_state_dict(checkpoint["optimizer_state"])
            if self.grad_scaler is not None and checkpoint.get("grad_scaler_state") is not None:
                self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])
            self.current_epoch = checkpoint["current_epoch"]
            self.logger.load_checkpoint(checkpoint["logging"])
            self._best_ema = checkpoint["_best_ema"]

    nnUNetTrainerAACScore.__name__ = nnUNetTrainerAACScore.__qualname__ = TRAINER_NAME
    return nnUNetTrainerAACScore


class _TimeBudgetReached(Exception):
    """Raised at the start of an epoch beyond a budget-shortened run (nnU-Net's epoch loop has a fixed range)."""


def epochs_within_budget(epoch_seconds: Sequence[float], budget_left_s: float, max_epochs: int,
                         done_before: int = 0, settle_epochs: int = 3) -> int:
    """The epoch count that ends training within the budget, from the median time of this run's epochs so far
    (the first, with its warm-up, left out); `max_epochs` until `settle_epochs` have been measured."""
    if len(epoch_seconds) < settle_epochs:
        return max_epochs
    epoch_s = max(float(np.median(epoch_seconds[1:])), 1e-6)
    done = done_before + len(epoch_seconds)
    return max(done, min(max_epochs, done + int(max(0.0, budget_left_s) // epoch_s)))


def run_nnunet(
    dataset_dir: Path,
    work: Path,
    *,
    epochs: int,
    iterations_per_epoch: int,
    fold: int | str = "all",
    device: str = "auto",
    patch_size: Sequence[int] = PATCH_SIZE,
    features: Sequence[int] = FEATURES,
    batch_size: int = BATCH_SIZE,
    processes: int = 2,
    resume: bool = False,
    time_budget_s: float | None = None,
    initial_weights: dict | None = None,
    initial_lr: float | None = None,
) -> tuple[Path, int]:
    """Plan, preprocess and train one 2d fold; returns the nnU-Net results folder (Trainer__Plans__2d) and the
    number of epochs trained.

    `resume`: continue the run already in `work` from its newest checkpoint up to `epochs` (as nnU-Net's
    `--c`), reusing its preprocessed data. `time_budget_s`: train at most `epochs`, fewer if the training
    loop would outlast the budget (the learning-rate schedule is fitted to the shorter run).
    `processes`: CPU processes for preprocessing and data augmentation (nnU-Net's workers).
    `initial_weights` (fine-tuning): a package's weights to start from, for a network of the same plan;
    `initial_lr` replaces nnU-Net's initial learning rate (0.01), lower when fine-tuning.
    """
    _set_nnunet_environment(work, dataset_dir.parent, processes)
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                      plan_experiment_dataset, preprocess_dataset)

    from ..devices import resolve_device
    from .package import read_checkpoint

    dataset_id = int(dataset_dir.name[len("Dataset"):].split("_")[0])
    preprocessed = work / "preprocessed" / dataset_dir.name
    fold_dir = work / "results" / dataset_dir.name / f"{TRAINER_NAME}__{PLANS_NAME}__2d" / f"fold_{fold}"
    checkpoints = [fold_dir / f"checkpoint_{kind}.pth" for kind in ("final", "latest", "best")]
    checkpoint = next((path for path in checkpoints if path.is_file()), None) if resume else None
    if resume and checkpoint is None:
        raise AACScoreError(f"{fold_dir}: no checkpoint to resume from")
    if checkpoint is None:
        extract_fingerprint_dataset(dataset_id, num_processes=processes, check_dataset_integrity=True,
                                    verbose=False, show_progress_bar=False)
        plan_experiment_dataset(dataset_id)
        plans = customise_plans(load_json(str(preprocessed / "nnUNetPlans.json")), patch_size, features, batch_size)
        save_json(plans, str(preprocessed / f"{PLANS_NAME}.json"), sort_keys=False)
        preprocess_dataset(dataset_id, PLANS_NAME, ("2d",), [processes], show_progress_bar=False)
    plans = load_json(str(preprocessed / f"{PLANS_NAME}.json"))

    dataset_json = load_json(str(dataset_dir / "dataset.json"))
    trainer = trainer_class()({**plans, "continue_training": checkpoint is not None}, "2d", fold, dataset_json,
                              resolve_device(device))
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = iterations_per_epoch
    trainer.num_val_iterations_per_epoch = max(1, iterations_per_epoch // 10)
    trainer.save_every = 5
    trainer.time_budget_s = time_budget_s
    if checkpoint is None:
        trainer.initial_weights = initial_weights
    if initial_lr is not None:
        trainer.initial_lr = initial_lr
    if checkpoint is not None:
        trainer.load_checkpoint(read_checkpoint(checkpoint))  # no unpickling of code, even of our own files
    torch.set_num_threads(processes)
    try:
        trainer.run_training()
    except _TimeBudgetReached:
        trainer.on_train_end()  # final checkpoint, data loaders stopped, as after a full run
    return Path(trainer.output_folder_base), trainer.current_epoch


def evaluate_package(package, cases: Sequence[tuple[Path, Path]], device: str = "auto") -> dict:
    """Mean Dice per vertebra (and the worst case) of a segmenter package on held-out (image, labels) cases."""
    from ..evaluation.metrics import dice_per_label
    from ..io.labelmaps import read_label_map
    from ..io.radiograph import read_radiograph
    from .segmenter import Segmenter

    segmenter = Segmenter.from_package(package, device)
    scores, seconds, statuses = [], [], {}
    for image_path, label_path in cases:
        radiograph = read_radiograph(image_path)
        result = segmenter.segment(radiograph)
        truth = read_label_map(label_path, radiograph.pixels.shape)
        dice = dice_per_label(truth, result.labels, range(1, len(VERTEBRAE) + 1))
        scores.append([dice[v] for v in range(1, len(VERTEBRAE) + 1)])
        seconds.append(result.seconds)
        statuses[result.status] = statuses.get(result.status, 0) + 1
    scores = np.array(scores, dtype=float)
    return {
        "dice_mean": {name: round(float(np.nanmean(scores[:, i])), 4) for i, name in enumerate(VERTEBRAE)},
        "dice_min": {name: round(float(np.nanmin(scores[:, i])), 4) for i, name in enumerate(VERTEBRAE)},
        "n_cases": len(cases),
        "statuses": statuses,
        "mean_seconds": round(float(np.mean(seconds)), 3),
    }


def train_segmenter(
    data: Sequence[str | Path],
    out: str | Path,
    *,
    work: str | Path | None = None,
    name: str = "aacscore-demo-segmenter",
    version: str = "1.0",
    epochs: int = 1000,
    iterations_per_epoch: int = 250,
    fold: int | str = "all",
    device: str = "auto",
    patch_size: Sequence[int] = PATCH_SIZE,
    features: Sequence[int] = FEATURES,
    batch_size: int = BATCH_SIZE,
    working_spacing_mm: float = WORKING_SPACING_MM,
    default_long_side_px: int = DEFAULT_LONG_SIDE_PX,
    eval_cases: Sequence[tuple[Path, Path]] = (),
    training_note: dict | None = None,
    resume: bool = False,
    phantoms: Sequence[PhantomSource] = (),
    cases: Sequence[tuple[Path, Path]] = (),
    processes: int = 2,
    time_budget_s: float | None = None,
    initial_weights: dict | None = None,
    initial_lr: float | None = None,
    context: bool = False,
    randomise_copies: int = 0,
    seed: int = 0,
    metal_chance: float = 0.0,
) -> tuple[Path, dict]:
    """Export `data` folders, (image, label map) `cases` and `phantoms` (made in memory), train with nnU-Net,
    convert to a package at `out`; returns (package, metrics).

    `context`: T12 and S1 as classes beside L1..L5 (the label maps must carry them: 6 = T12, 7 = S1).
    `randomise_copies`: K SynthSeg-style randomised copies of every case (see dataset.export_dataset), from `seed`;
    `metal_chance` of them with randomised metal over the spine.

    `resume` continues the training kept in `work` (from an earlier call with the same `work`) to `epochs`.
    `processes` export cases, preprocess and augment in parallel (see run_nnunet for `time_budget_s`,
    `initial_weights` and `initial_lr`, which fine-tune a package: finetune.py).
    """
    from .package import convert_nnunet_results

    started = time.perf_counter()
    owned = work is None
    if resume and owned:
        raise AACScoreError("resuming needs the --work folder of the run to continue")
    work = Path(tempfile.mkdtemp(prefix="aacscore-train-")) if owned else Path(work)
    try:
        dataset_dir = work / "raw" / dataset_name(DATASET_ID, "AACScoreLumbar")
        if not resume:
            sources = [case for folder in data for case in phantom_cases(folder)] + list(cases) + list(phantoms)
            export_dataset(sources, work / "raw", DATASET_ID, "AACScoreLumbar", working_spacing_mm,
                           default_long_side_px, workers=processes, context=context,
                           randomise_copies=randomise_copies, seed=seed, metal_chance=metal_chance)
        exported = read_export_summary(dataset_dir)
        results, epochs_trained = run_nnunet(dataset_dir, work, epochs=epochs, iterations_per_epoch=iterations_per_epoch,
                             fold=fold, device=device, patch_size=patch_size, features=features,
                             batch_size=batch_size, processes=processes, resume=resume,
                             time_budget_s=time_budget_s, initial_weights=initial_weights, initial_lr=initial_lr)
        training_seconds = time.perf_counter() - started
        input_settings = {
            "working_spacing_mm": working_spacing_mm,
            "default_long_side_px": int(max(exported["median_working_shape"])),
            "window_percentiles": list(WINDOW_PERCENTILES),
        }
        training_data = {
            "n_cases": exported["n_cases"],
            "randomised_copies_per_case": exported.get("randomised_copies_per_case", 0),
            "metal_chance": exported.get("metal_chance", 0.0),
            "context_classes": exported.get("context_classes", []),
            "sources": sorted({Path(image).parent.name for image in exported["sources"]}),
            "median_working_shape": exported["median_working_shape"],
            "epochs": epochs_trained, "iterations_per_epoch": iterations_per_epoch,
            "batch_size": batch_size, "patch_size": list(patch_size),
            "fold": str(fold),
            "training_seconds": round(training_seconds, 1),
            **(training_note or {}),
        }
        package = convert_nnunet_results(results, out, name=name, version=version, folds=[fold],
                                         input_settings=input_settings, training_data=training_data)
        metrics = {}
        if eval_cases:
            metrics = {"held_out": evaluate_package(package, eval_cases, device)}
            package = convert_nnunet_results(results, out, name=name, version=version, folds=[fold],
                                             input_settings=input_settings, training_data=training_data,
                                             metrics=metrics)
        return package, metrics
    finally:
        if owned:
            shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- command line


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "train-segmenter", help="train the L1-L5 nnU-Net segmenter and write a model package",
        description="Export labelled radiographs (<name>.<ext> + <name>_labels.png or <name>.seg.nrrd) and/or "
                    "generated phantoms, train nnU-Net 2D on a coarse grid, and write a segmenter package.")
    parser.add_argument("--data", nargs="*", default=[], help="folders of labelled radiographs")
    parser.add_argument("--phantoms", type=int, default=0,
                        help="also train on N phantoms, generated in memory (no files written)")
    parser.add_argument("--seed", type=int, default=1000, help="phantom seed for training")
    parser.add_argument("--phantom-styles", "--phantom-families", dest="phantom_styles", default="default",
                        help="with --phantoms: phantom families, in turn (comma-separated)")
    parser.add_argument("--include-held-out", action="store_true",
                        help="allow the held-out phantom family in --phantom-families")
    parser.add_argument("--context-classes", action="store_true",
                        help="train T12 and S1 (top of the sacrum) as classes beside L1-L5, for level counting; "
                             "label maps must carry them (6 = T12, 7 = S1), as phantoms do")
    parser.add_argument("--randomise-copies", type=int, default=0, metavar="K",
                        help="also train on K SynthSeg-style randomised copies of every case (random intensity per "
                             "label, bias field, gamma, blur, resolution drop, noise, inversion)")
    parser.add_argument("--metal-chance", type=float, default=0.0, metavar="P",
                        help="with --randomise-copies: the share of copies that first get randomised metal drawn "
                             "over the spine (screws and rods, cement, cage, clips, wires)")
    parser.add_argument("--eval-phantoms", type=int, default=0, help="held-out phantoms for Dice (seed --eval-seed)")
    parser.add_argument("--eval-seed", type=int, default=9001)
    parser.add_argument("--out", required=True, help="package folder to write")
    parser.add_argument("--name", default="aacscore-demo-segmenter")
    parser.add_argument("--version", default=None,
                        help="package version (default: 1.0+ the UTC time of training, so that two trainings "
                             "never share a name and version)")
    parser.add_argument("--epochs", type=int, default=1000, help="epochs (at most, with --time-budget-minutes)")
    parser.add_argument("--iterations-per-epoch", type=int, default=250)
    parser.add_argument("--time-budget-minutes", type=float, default=None,
                        help="end the training loop within this time: the epoch count and learning-rate schedule "
                             "are fitted to it after the first epochs")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--patch-size", type=int, nargs=2, default=PATCH_SIZE, metavar=("ROWS", "COLS"),
                        help=f"training patch on the {WORKING_SPACING_MM} mm working grid")
    parser.add_argument("--processes", type=int, default=2,
                        help="CPU processes for export, preprocessing and data augmentation")
    parser.add_argument("--fold", default="all", help="0-4 (5-fold split) or all (train on every case)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--work", default=None, help="keep nnU-Net's raw/preprocessed/results folders here")
    parser.add_argument("--resume", action="store_true",
                        help="continue the training kept in --work up to --epochs (no new export)")
    parser.add_argument("--init-from", metavar="PACKAGE",
                        help="start from a segmenter package's weights (nnU-Net's pretrained-weights rule: same "
                             "network; the output layer starts fresh when the classes differ, e.g. adding T12/S1)")
    parser.add_argument("--lr", type=float, default=None,
                        help="initial learning rate (default: nnU-Net's 0.01; lower to start from --init-from)")
    parser.set_defaults(func=_train_command)


def base_features(loaded) -> tuple[int, ...]:
    """Feature widths per stage of a loaded segmenter package's network."""
    return tuple(loaded.plans["configurations"]["2d"]["architecture"]["arch_kwargs"]["features_per_stage"])


def starting_package(name: str, patch_size: tuple[int, int]):
    """A segmenter package to start training from (its network must be the one being trained)."""
    from .package import load_segmenter_package

    loaded = load_segmenter_package(name)
    spacing = loaded.package.manifest.get("input", {}).get("working_spacing_mm")
    if spacing != WORKING_SPACING_MM:
        raise AACScoreError(f"--init-from {loaded.package.path}: working spacing {spacing} mm, not this recipe's "
                            f"{WORKING_SPACING_MM} mm (a package trained by AACScore is needed)")
    base_patch = tuple(loaded.plans["configurations"]["2d"]["patch_size"])
    if base_patch != patch_size:
        raise AACScoreError(f"--init-from {loaded.package.path}: patch {base_patch}, asked {patch_size}; "
                            f"give --patch-size {base_patch[0]} {base_patch[1]}")
    return loaded


def _train_command(args) -> int:
    data = [Path(folder) for folder in args.data]
    if args.metal_chance and not args.randomise_copies:
        raise AACScoreError("--metal-chance draws metal on the randomised copies: give --randomise-copies K too")
    styles = parse_styles(args.phantom_styles)
    held_out = [style for style in styles if FAMILIES[style].held_out]
    if held_out and not args.include_held_out:
        raise AACScoreError(f"phantom family {', '.join(held_out)} is held out of all training (it measures how models "
                            f"meet an unseen generator); add --include-held-out to train on it anyway")
    phantoms = phantom_sources(args.phantoms, args.seed, styles, args.context_classes) if args.phantoms else []
    if not data and not phantoms and not args.resume:
        raise AACScoreError("give --data FOLDER and/or --phantoms N")
    base = starting_package(args.init_from, tuple(args.patch_size)) if args.init_from else None
    scratch = Path(tempfile.mkdtemp(prefix="aacscore-phantoms-"))
    try:
        eval_cases = []
        if args.eval_phantoms:  # written as files: evaluated as a user's radiographs would be
            write_phantoms(scratch / "eval", args.eval_phantoms, args.eval_seed)
            eval_cases = phantom_cases(scratch / "eval")
        fold = args.fold if args.fold == "all" else int(args.fold)
        note = {"phantoms": {"n": args.phantoms, "seed": args.seed, "styles": list(styles)}} if phantoms else {}
        if base is not None:
            note["initialised_from"] = package_reference(base.package)
        budget = args.time_budget_minutes * 60 if args.time_budget_minutes else None
        package, metrics = train_segmenter(
            data, args.out, work=args.work, name=args.name,
            version=args.version or timestamped_version("1.0"), epochs=args.epochs,
            iterations_per_epoch=args.iterations_per_epoch, fold=fold, device=args.device, eval_cases=eval_cases,
            training_note=note, resume=args.resume, phantoms=phantoms, processes=args.processes,
            time_budget_s=budget, batch_size=args.batch_size, patch_size=tuple(args.patch_size),
            context=args.context_classes, randomise_copies=args.randomise_copies, seed=args.seed,
            metal_chance=args.metal_chance,
            features=FEATURES if base is None else base_features(base),
            initial_weights=None if base is None else base.fold_weights[0], initial_lr=args.lr)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"wrote {package}")
    if metrics:
        print(json.dumps(metrics, indent=2))
    return 0

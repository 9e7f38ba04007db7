"""Train the L1–L5 segmenter with nnU-Net v2's own planning, preprocessing and training, then package it.

nnU-Net plans the 2d configuration from the exported dataset (fingerprint, normalisation, resampling); we then
shrink its network and patch for CPU training, because the exported images are already on a coarse 1.25 mm
working grid (see nnunet_dataset.py). The paper's plan for full-resolution radiographs is 1536x1024 patches,
9 stages, 59 M parameters; ours is a 256x192 patch (32x24 cm: all of L1-L5 with T12 and the sacrum), 6 stages
of 16..128 features, about 2 M parameters, 4 MB as fp16 safetensors. A small trainer subclass shortens epochs
and restricts augmentation to what radiographs show: rotation within ±20° and left-right mirroring only
(upside-down spines do not occur, and mirroring rows would swap L1 and L5).
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

from .errors import AACScoreError
from .kauppila import VERTEBRAE
from .nnunet_dataset import (DEFAULT_LONG_SIDE_PX, WINDOW_PERCENTILES, WORKING_SPACING_MM, dataset_name,
                             export_dataset, phantom_cases, read_export_summary)

PLANS_NAME = "AACScorePlans"
TRAINER_NAME = "nnUNetTrainerAACScore"
PATCH_SIZE = (256, 192)
FEATURES = (16, 32, 64, 128, 128, 128)
BATCH_SIZE = 2
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
    """nnUNetTrainer with settable short epochs and radiograph-appropriate augmentation."""
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class nnUNetTrainerAACScore(nnUNetTrainer):
        def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
            patch_size = self.configuration_manager.patch_size
            rotation = (-np.deg2rad(ROTATION_DEGREES), np.deg2rad(ROTATION_DEGREES))
            initial = get_patch_size(patch_size, rotation, rotation, rotation, (0.85, 1.25))
            mirror_axes = (1,)  # columns only: anterior may face either way; never swap L1 and L5
            self.inference_allowed_mirroring_axes = mirror_axes
            return rotation, False, initial, mirror_axes

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
) -> Path:
    """Plan, preprocess and train one 2d fold; returns the nnU-Net results folder (Trainer__Plans__2d).

    `resume`: continue the run already in `work` from its newest checkpoint up to `epochs` (as nnU-Net's
    `--c`), reusing its preprocessed data.
    """
    _set_nnunet_environment(work, dataset_dir.parent, processes)
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                      plan_experiment_dataset, preprocess_dataset)

    from .devices import resolve_device
    from .segmenter_package import read_checkpoint

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
    if checkpoint is not None:
        trainer.load_checkpoint(read_checkpoint(checkpoint))  # no unpickling of code, even of our own files
    torch.set_num_threads(processes)
    trainer.run_training()
    return Path(trainer.output_folder_base)


def evaluate_package(package, cases: Sequence[tuple[Path, Path]], device: str = "auto") -> dict:
    """Mean Dice per vertebra (and the worst case) of a segmenter package on held-out (image, labels) cases."""
    from .metrics import dice_per_label
    from .labelmaps import read_label_map
    from .radiograph import read_radiograph
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
    epochs: int = 80,
    iterations_per_epoch: int = 25,
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
) -> tuple[Path, dict]:
    """Export `data` folders, train with nnU-Net, convert to a package at `out`; returns (package, metrics).

    `resume` continues the training kept in `work` (from an earlier call with the same `work`) to `epochs`.
    """
    from .segmenter_package import convert_nnunet_results

    started = time.perf_counter()
    owned = work is None
    if resume and owned:
        raise AACScoreError("resuming needs the --work folder of the run to continue")
    work = Path(tempfile.mkdtemp(prefix="aacscore-train-")) if owned else Path(work)
    try:
        dataset_dir = work / "raw" / dataset_name(DATASET_ID, "AACScoreLumbar")
        if not resume:
            cases = [case for folder in data for case in phantom_cases(folder)]
            export_dataset(cases, work / "raw", DATASET_ID, "AACScoreLumbar", working_spacing_mm,
                           default_long_side_px)
        exported = read_export_summary(dataset_dir)
        results = run_nnunet(dataset_dir, work, epochs=epochs, iterations_per_epoch=iterations_per_epoch,
                             fold=fold, device=device, patch_size=patch_size, features=features,
                             batch_size=batch_size, resume=resume)
        training_seconds = time.perf_counter() - started
        input_settings = {
            "working_spacing_mm": working_spacing_mm,
            "default_long_side_px": int(max(exported["median_working_shape"])),
            "window_percentiles": list(WINDOW_PERCENTILES),
        }
        training_data = {
            "n_cases": exported["n_cases"],
            "sources": sorted({Path(image).parent.name for image in exported["sources"]}),
            "median_working_shape": exported["median_working_shape"],
            "epochs": epochs, "iterations_per_epoch": iterations_per_epoch, "batch_size": batch_size,
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
    parser.add_argument("--phantoms", type=int, default=0, help="also train on N generated phantoms")
    parser.add_argument("--seed", type=int, default=1000, help="first phantom seed for training")
    parser.add_argument("--eval-phantoms", type=int, default=0, help="held-out phantoms for Dice (seed --eval-seed)")
    parser.add_argument("--eval-seed", type=int, default=9001)
    parser.add_argument("--out", required=True, help="package folder to write")
    parser.add_argument("--name", default="aacscore-demo-segmenter")
    parser.add_argument("--version", default="1.0")
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--iterations-per-epoch", type=int, default=25)
    parser.add_argument("--fold", default="all", help="0-4 (5-fold split) or all (train on every case)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--work", default=None, help="keep nnU-Net's raw/preprocessed/results folders here")
    parser.add_argument("--resume", action="store_true",
                        help="continue the training kept in --work up to --epochs (no new export)")
    parser.set_defaults(func=_train_command)


def _train_command(args) -> int:
    data = [Path(folder) for folder in args.data]
    scratch = Path(tempfile.mkdtemp(prefix="aacscore-phantoms-"))
    try:
        eval_cases = []
        if args.phantoms or args.eval_phantoms:
            from .phantoms import write_phantoms
        if args.phantoms:
            write_phantoms(scratch / "train", args.phantoms, args.seed)
            data.append(scratch / "train")
        if args.eval_phantoms:
            write_phantoms(scratch / "eval", args.eval_phantoms, args.eval_seed)
            eval_cases = phantom_cases(scratch / "eval")
        if not data and not args.resume:
            raise AACScoreError("give --data FOLDER and/or --phantoms N")
        fold = args.fold if args.fold == "all" else int(args.fold)
        note = {"phantoms": {"n": args.phantoms, "seed": args.seed}} if args.phantoms else None
        package, metrics = train_segmenter(
            data, args.out, work=args.work, name=args.name, version=args.version, epochs=args.epochs,
            iterations_per_epoch=args.iterations_per_epoch, fold=fold, device=args.device, eval_cases=eval_cases,
            training_note=note, resume=args.resume)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"wrote {package}")
    if metrics:
        print(json.dumps(metrics, indent=2))
    return 0

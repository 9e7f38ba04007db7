"""From a group's own corrected cases to a model for its cohort: fine-tuning and cross-validation.

The shipped models are trained on phantoms; a group's real accuracy comes from its own images. A training set
(io/training_set.py) collects corrected segmentations and rated scores; `finetune` starts from an installed or
bundled package (by default the one `aacscore score` would use) and writes a new package whose manifest records
the base package, a hash of the training data and the metrics; `crossval` fine-tunes once per fold and tests on
the cases left out, so a group can publish figures measured on its own data with the paper's statistics.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import AACScoreError
from .io.atomic import write_text_atomic
from .io.training_set import TrainingCase, TrainingSet, parse_scores
from .kauppila import SUBSCORE_COLUMNS, VERTEBRAE
from .packages import ModelPackage, find_package, package_reference

Log = Callable[[str], None]


@dataclass
class ScorerFinetuneSettings:
    """Fine-tuning defaults for few cases: a tenth of the paper's learning rate, short warm-up, stem and first
    residual stage frozen (their filters are generic), BatchNorm statistics kept while training (measured: with 50
    cases of an unseen phantom family, MAE 1.90 kept against 2.40 updated), no validation split (every case trains).

    `adapt_batchnorm` (off by default): before training, the backbone's BatchNorm statistics are re-estimated on
    every case of the training set, rated or not (scoring.model.adapt_batchnorm), when it holds ADAPT_MIN_CASES or
    more. It is an option, not the default, because it helped on some sites and hurt on others: on the "site"
    phantom family with 50 cases, MAE 2.25 -> 2.06 on a validation site, but 2.25 -> 2.82 on a test site (README,
    "Your own cohort"). `epochs=0` with it adapts without training, and needs no scores."""

    epochs: int = 30
    lr: float = 0.001
    batch: int = 8
    freeze: tuple[str, ...] = ("stem", "layer1")
    freeze_batchnorm: bool = True
    adapt_batchnorm: bool = False
    warmup_iterations: int = 20
    seed: int = 0
    device: str = "auto"
    qc_folds: int = 0


ADAPT_MIN_CASES = 10  # fewer images give BatchNorm statistics noisier than the base's
QC_MIN_CASES = 10  # rated cases a cross-validated QC calibration needs (its 80% quantile rests on them)


@dataclass
class SegmenterFinetuneSettings:
    """Fine-tuning defaults for few cases on 2 CPU cores: 10 epochs of 25 iterations of 8 patches (~15 min),
    nnU-Net's learning rate lowered tenfold, and 20 of the base's own training phantoms (its manifest's seed and
    families) replayed beside the cases. Why replay: with 20 cases of an unseen family alone, demo segmenter 2.1
    got worse on that family (all levels right 73% -> 60% on 60 validation phantoms); with 20 replayed, 78%.
    `replay=None` replays REPLAY_DEFAULT when the base names its training phantoms, none otherwise."""

    epochs: int = 10
    iterations_per_epoch: int = 25
    batch_size: int = 8
    lr: float = 0.001
    device: str = "auto"
    processes: int = 2
    replay: int | None = None


REPLAY_DEFAULT = 20


def _base_package(base: str | Path | ModelPackage | None, kind: str) -> ModelPackage:
    return base if isinstance(base, ModelPackage) else find_package(None if base is None else str(base), kind)


def _data_summary(dataset: TrainingSet, cases: Sequence[TrainingCase]) -> dict:
    return {"source": "AACScore training set", "training_set_sha256": dataset.fingerprint(),
            "n_cases": len(cases), "cases": [case.case for case in cases]}


# ----------------------------------------------------------------------------------------------- scorer


def _score_records(cases: Sequence[TrainingCase]):
    """Scoring records of cases; an unrated case (crops for BatchNorm statistics only) has a NaN total."""
    from .scoring.data import ScoreRecord

    return [ScoreRecord(case.image, case.labels, float("nan"), None) if case.scores is None else
            ScoreRecord(case.image, case.labels, float(sum(case.scores.values())),
                        [float(case.scores[name]) for name in SUBSCORE_COLUMNS]) for case in cases]


def finetune_scorer(data: str | Path, out: str | Path, base: str | Path | ModelPackage | None = None,
                    settings: ScorerFinetuneSettings | None = None, *, cases: Sequence[TrainingCase] | None = None,
                    name: str | None = None, version: str | None = None, work_dir: str | Path | None = None,
                    log: Log = print, on_epoch_end: Callable[[int, dict], None] | None = None) -> Path:
    """Fine-tune a scorer package on the rated cases of a training set (optionally after adapting its BatchNorm
    statistics to all cases, see ScorerFinetuneSettings); returns the new package's folder.
    `on_epoch_end(epoch, entry)` reports progress; raising from it (Cancelled) stops the training."""
    import torch

    from .devices import resolve_device
    from .packages import load_safetensors
    from .scoring.model import model_from_state
    from .scoring.training import (TrainResult, TrainSettings, build_manifest, evaluate_model, iterations_per_epoch,
                                   train, write_scorer_package)

    s = settings or ScorerFinetuneSettings()
    dataset = TrainingSet(data)
    pool = list(dataset.cases() if cases is None else cases)
    rated = [case for case in pool if case.scores is not None]
    if s.epochs < 0:
        raise AACScoreError(f"epochs must be 0 or more, got {s.epochs}")
    if s.epochs and len(rated) < 2:
        raise AACScoreError(f"{dataset.folder}: {len(rated)} case(s) with scores; fine-tuning the scorer needs 2 or "
                            "more (--epochs 0 --adapt-batchnorm adapts it to the cases' look without scores)")
    if not s.epochs and not s.adapt_batchnorm:
        raise AACScoreError("0 epochs would leave the scorer as it is: add BatchNorm adaptation "
                            "(--adapt-batchnorm) or train for 1 epoch or more")
    if not s.epochs and len(pool) < ADAPT_MIN_CASES:
        raise AACScoreError(f"{dataset.folder}: 0 epochs adapts the scorer's BatchNorm statistics, which needs "
                            f"{ADAPT_MIN_CASES} or more cases (it has {len(pool)})")
    if s.qc_folds and not (2 <= s.qc_folds and len(rated) >= max(QC_MIN_CASES, s.qc_folds)):
        raise AACScoreError(f"{dataset.folder}: calibrating QC by {s.qc_folds}-fold cross-validation needs 2 or more "
                            f"folds and {max(QC_MIN_CASES, s.qc_folds)} or more rated cases (it has {len(rated)})")
    package = _base_package(base, "scorer")
    manifest = package.manifest
    architecture = manifest["architecture"]
    input_size = tuple(int(v) for v in manifest["input"]["size"])
    weights = load_safetensors(package, architecture["weights"])
    batch = max(1, min(s.batch, len(rated)))
    total_iterations = s.epochs * iterations_per_epoch(len(rated), batch) if rated else 0
    train_settings = TrainSettings(
        input_size=input_size, backbone=architecture["backbone"], scse_combine=architecture.get("scse_combine", "max"),
        subscores_head=bool(architecture.get("subscores_head")), epochs=s.epochs, batch=batch,
        lr=s.lr, min_lr=s.lr / 100, warmup_iterations=min(s.warmup_iterations, max(1, total_iterations // 5)),
        val_fraction=0.0, seed=s.seed, device=s.device)
    owned = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="aacscore-finetune-")) if owned else Path(work_dir)
    try:
        crops = _crops_of(dataset, rated, input_size, work)
        statistics = "kept" if s.freeze_batchnorm else "updated"
        n_adapted = 0
        if s.adapt_batchnorm and len(pool) >= ADAPT_MIN_CASES:
            unrated = [case for case in pool if case.scores is None]
            adapt_on = torch.cat([crops.crops] + ([_crops_of(dataset, unrated, input_size, work).crops] if unrated
                                                  else []))
            weights = _adapted_weights(architecture, weights, adapt_on, s.device)
            n_adapted = len(adapt_on)
            statistics = f"adapted to {len(adapt_on)} cases" + (f", then {statistics}" if s.epochs else "")
            log(f"BatchNorm statistics re-estimated on {len(adapt_on)} cases ({len(unrated)} without scores)")
        elif s.adapt_batchnorm:
            log(f"BatchNorm statistics not adapted: {len(pool)} cases, fewer than {ADAPT_MIN_CASES}")
        if s.epochs:
            model, result = train(crops, crops.subset([]), train_settings, work / "train", initial_weights=weights,
                                  freeze=s.freeze, freeze_batchnorm=s.freeze_batchnorm, log=log,
                                  on_epoch_end=on_epoch_end)
        else:
            model = model_from_state(architecture, weights)
            result = TrainResult(epochs_run=0, iterations=0, best_epoch=0, best_val_loss=None, seconds=0.0,
                                 device="none: statistics only")
        fit = evaluate_model(model, crops, resolve_device(s.device), batch)
    finally:
        if owned:
            shutil.rmtree(work, ignore_errors=True)
    summary = _data_summary(dataset, rated)
    summary["fine_tuned_from"] = package_reference(package)
    summary["freeze"] = list(s.freeze)
    summary["batchnorm_statistics"] = statistics
    summary["n_cases_for_statistics"] = n_adapted
    metrics = {"training_cases": {"note": "fit on the fine-tuning cases themselves, not a test: "
                                          "`aacscore crossval scorer` measures accuracy on cases left out", **fit}}
    new_manifest = build_manifest(model, train_settings, result, summary, metrics, name or f"{package.name}-finetuned",
                                  version or time.strftime("%Y%m%d.%H%M%S"))
    written = write_scorer_package(out, model.cpu(), new_manifest)
    if s.qc_folds:
        _calibrate_qc_by_folds(written, data, package, s, pool, rated, log, on_epoch_end)
    else:
        log("the new scorer has no QC calibration (qc.json), so its results have no interval: "
            "--qc-folds 5 calibrates it by cross-validation")
    return Path(written.path)


def _calibrate_qc_by_folds(written: ModelPackage, data: str | Path, base: ModelPackage,
                           s: ScorerFinetuneSettings, pool: Sequence[TrainingCase], rated: Sequence[TrainingCase],
                           log: Log, on_epoch_end: Callable[[int, dict], None] | None) -> None:
    """Write qc.json into a freshly fine-tuned scorer from out-of-fold residuals: each fold fine-tunes the base
    again, with the same settings, on every case but the fold's rated ones, and scores those from their label maps.

    Why folds: residuals on the training cases themselves would be too small, and the base's calibration describes
    another network (the cross-validation variant of conformal prediction, Barber et al. 2021; with 50 cases the
    coverage on new cases of the site came out at 73% and 88% on two test sites, README). The feature reference is
    the new model's features on its own rated cases: the images it learnt from."""
    from .pipeline import Pipeline
    from .qc.calibrate import calibration_file, measure, write_calibration
    from .scoring.scorer import Scorer

    assignment = fold_of_cases(rated, s.qc_folds, s.seed)
    fold_settings = replace(s, qc_folds=0)
    residual_keys = ("truth", "score", "spread", "variant_spread", "flagged", "noted")
    measured: dict[str, list] = {key: [] for key in residual_keys}
    with tempfile.TemporaryDirectory(prefix="aacscore-qc-folds-") as scratch:
        for fold in range(s.qc_folds):
            held = [case for case, f in zip(rated, assignment) if f == fold]
            kept = [case for case in pool if case not in held]
            log(f"QC calibration, fold {fold + 1}/{s.qc_folds}: fine-tuning on {len(kept)} cases, scoring {len(held)}")
            folder = finetune_scorer(data, Path(scratch) / f"fold{fold}", base, fold_settings, cases=kept,
                                     log=lambda _: None, on_epoch_end=on_epoch_end)
            fold_pipeline = Pipeline(Scorer.from_package(folder, device=s.device), None)
            part = measure(fold_pipeline, _score_records(held))
            for key in residual_keys:
                measured[key].append(part[key])
    own = measure(Pipeline(Scorer.from_package(written.path, device=s.device), None), _score_records(rated))
    columns = {key: np.concatenate(parts) for key, parts in measured.items()}
    columns["features"] = own["features"]
    source = (f"{s.qc_folds}-fold cross-validation of this fine-tuning on its {len(rated)} rated cases "
              f"(out-of-fold residuals); feature reference: this model on the same cases")
    calibration = calibration_file(columns, 0.8, source, written.manifest)
    write_calibration(written, calibration)
    figures = calibration["calibration_set"]
    log(f"QC calibrated: out-of-fold MAE {figures['mae']:.2f}, 80% interval {_interval_text(calibration['interval'])}")


def _interval_text(interval: dict) -> str:
    flagged, many = interval.get("review_quantile"), interval.get("many_flags_quantile")
    scale = {"mc_dropout_conformal": " x (MC-dropout spread + floor)",
             "variant_conformal": " x (crop-variant spread + floor)"}.get(interval["method"], "")
    return (f"+-{interval['quantile']:.2f}{scale}" + ("" if flagged is None else f", flagged results +-{flagged:.2f}")
            + ("" if many is None else f", flagged by 2+ checks +-{many:.2f}"))


def _crops_of(dataset: TrainingSet, cases: Sequence[TrainingCase], input_size: tuple[int, int], work: Path):
    """The scorer's crops of cases; refused in one line when geometry cannot crop one of them."""
    from .scoring.data import load_crop_set

    crops = load_crop_set(_score_records(cases), input_size, cache_dir=work)
    if crops.skipped:
        skipped = "; ".join(f"{k}: {v}" for k, v in crops.skipped.items())
        raise AACScoreError(f"{dataset.folder}: cases could not be cropped ({skipped})")
    return crops


def _adapted_weights(architecture: dict, weights: dict, crops, device: str) -> dict:
    """A package's weights with the backbone's BatchNorm statistics re-estimated on `crops`."""
    from .devices import resolve_device
    from .scoring.model import adapt_batchnorm, model_from_state

    model = model_from_state(architecture, weights).to(resolve_device(device))
    adapt_batchnorm(model, crops)
    return {name: tensor.cpu() for name, tensor in model.state_dict().items()}


def score_cases(package: str | Path, cases: Sequence[TrainingCase], device: str = "auto") -> list[dict]:
    """Predictions of a scorer package for cases, from their stored (true) label maps: results.csv-like rows."""
    from .pipeline import Pipeline

    pipeline = Pipeline.from_packages(str(package), device=device, need_segmenter=False)
    return [pipeline.run(case.image, case.labels, heatmap=False).record() for case in cases]


# ----------------------------------------------------------------------------------------------- segmenter


def finetune_segmenter(data: str | Path, out: str | Path, base: str | Path | ModelPackage | None = None,
                       settings: SegmenterFinetuneSettings | None = None, *,
                       cases: Sequence[TrainingCase] | None = None, name: str | None = None,
                       version: str | None = None, work: str | Path | None = None, log: Log = print) -> Path:
    """Fine-tune a segmenter package (nnU-Net v2, same plan) on the corrected cases of a training set."""
    from .segmentation.package import load_segmenter_package
    from .segmentation.training import base_features, train_segmenter

    s = settings or SegmenterFinetuneSettings()
    dataset = TrainingSet(data)
    cases = list(dataset.cases() if cases is None else cases)
    if len(cases) < 2:
        raise AACScoreError(f"{dataset.folder}: {len(cases)} case(s); fine-tuning the segmenter needs 2 or more")
    if s.epochs < 1:
        raise AACScoreError(f"fine-tuning the segmenter needs 1 epoch or more, got {s.epochs}")
    loaded = load_segmenter_package(_base_package(base, "segmenter"))
    configuration = loaded.plans["configurations"]["2d"]
    manifest_input = loaded.package.manifest.get("input", {})
    spacing = manifest_input.get("working_spacing_mm")
    if not isinstance(spacing, (int, float)):
        raise AACScoreError(f"{loaded.package.path}: fine-tuning needs a segmenter trained by AACScore "
                            f"(one working spacing in mm), not an imported nnU-Net model")
    context = _keeps_context(loaded, cases, log)
    summary = _data_summary(dataset, cases)
    summary["fine_tuned_from"] = package_reference(loaded.package)
    replayed = _replay_phantoms(loaded.package, s.replay, context, log)
    if replayed:
        summary["replayed_phantoms"] = {"n": len(replayed), "seed": replayed[0].seed,
                                        "families": sorted({source.style for source in replayed})}
    package, _ = train_segmenter(
        [], out, work=work, name=name or f"{loaded.package.name}-finetuned",
        version=version or time.strftime("%Y%m%d.%H%M%S"), epochs=s.epochs,
        iterations_per_epoch=s.iterations_per_epoch, device=s.device,
        patch_size=tuple(configuration["patch_size"]),
        features=base_features(loaded),
        batch_size=s.batch_size, working_spacing_mm=float(spacing),
        default_long_side_px=int(manifest_input.get("default_long_side_px", 271)),
        training_note=summary, cases=[(case.image, case.labels) for case in cases], processes=s.processes,
        initial_weights=loaded.fold_weights[0], initial_lr=s.lr, context=context, phantoms=replayed)
    return Path(package)


def _replay_phantoms(package: ModelPackage, n: int | None, context: bool, log: Log) -> list:
    """The first `n` phantoms the base package was trained on (seed and families from its manifest), made in
    memory. A base that names none (imported, or itself fine-tuned) has none to replay: refused when `n` was
    asked for, said in the log when it was the default."""
    from .phantoms.generator import phantom_sources

    trained_on = (package.manifest.get("training_data") or {}).get("phantoms")
    known = isinstance(trained_on, dict) and bool(trained_on.get("styles"))
    if n is None:
        if not known:
            log(f"{package.path.name} names no training phantoms: fine-tuning on the cases alone, without replay")
        n = REPLAY_DEFAULT if known else 0
    if n <= 0:
        return []
    if not known:
        raise AACScoreError(f"{package.path}: its manifest names no training phantoms to replay; "
                            f"fine-tune it with --replay 0")
    return phantom_sources(n, int(trained_on["seed"]), trained_on["styles"], context)


def _keeps_context(loaded, cases: Sequence[TrainingCase], log: Log) -> bool:
    """Whether the fine-tuned segmenter keeps the base's T12/S1 context classes: only when some case draws them.

    Cases without them teach that T12 and the sacrum are background, so a base's context is kept only when the
    cases carry it (Slicer stores the T12/S1 segments with the case; `dataset add` reads 6 = T12, 7 = S1);
    otherwise the new model has L1..L5 only, starts from the base's rows for those, and counts levels without
    context (said in the log)."""
    from .segmentation.package import context_classes

    base_context = sorted(context_classes(loaded.package.manifest))
    drawn = sum(bool(case.context) for case in cases)
    if base_context and not drawn:
        log(f"{loaded.package.path.name} has the context classes {', '.join(base_context)}, but no case draws them: "
            f"the fine-tuned segmenter labels L1-L5 only and counts levels without context")
    elif base_context:
        log(f"fine-tuning with the context classes {', '.join(base_context)} ({drawn} of {len(cases)} cases draw them)")
    return bool(base_context and drawn)


def segment_cases(package: str | Path, cases: Sequence[TrainingCase], device: str = "auto") -> list[dict]:
    """Dice per vertebra and whether all five levels are right, per case, for a segmenter package."""
    from .evaluation.metrics import dice_per_label
    from .io.labelmaps import read_label_map
    from .io.radiograph import read_radiograph
    from .segmentation.segmenter import Segmenter

    segmenter = Segmenter.from_package(find_package(str(package), "segmenter"), device)
    rows = []
    for case in cases:
        radiograph = read_radiograph(case.image)
        truth = read_label_map(case.labels, radiograph.pixels.shape)
        result = segmenter.segment(radiograph)
        dice = dice_per_label(truth, result.labels, range(1, len(VERTEBRAE) + 1))
        rows.append({"case": case.case, "status": result.status,
                     **{name: round(float(dice[i]), 4) for i, name in enumerate(VERTEBRAE, start=1)},
                     "levels_right": levels_right(truth, result.labels)})
    return rows


def levels_right(truth: np.ndarray, pred: np.ndarray) -> bool:
    """All five levels right: each predicted vertebra overlaps its own true body more than any other label."""
    for value in range(1, len(VERTEBRAE) + 1):
        mask = pred == value
        if not mask.any():
            return False
        if np.bincount(truth[mask].astype(np.int64), minlength=len(VERTEBRAE) + 1)[1:].argmax() + 1 != value:
            return False
    return True


def summarise_segmentation(rows: Sequence[dict]) -> dict:
    return {"n": len(rows),
            "levels_right": round(float(np.mean([row["levels_right"] for row in rows])), 4) if rows else None,
            "dice_mean": {name: round(float(np.nanmean([row[name] for row in rows])), 4) for name in VERTEBRAE},
            "statuses": {status: sum(row["status"] == status for row in rows) for status in {r["status"] for r in rows}}}


# ----------------------------------------------------------------------------------------------- cross-validation


def fold_of_cases(cases: Sequence[TrainingCase], folds: int, seed: int = 0) -> list[int]:
    """Fold number of each case: a seeded shuffle dealt round-robin, so folds differ in size by at most one."""
    if not 2 <= folds <= len(cases):
        raise AACScoreError(f"--folds must be between 2 and the number of cases ({len(cases)}), got {folds}")
    order = np.random.default_rng(seed).permutation(len(cases))
    assignment = [0] * len(cases)
    for position, index in enumerate(order):
        assignment[index] = position % folds
    return assignment


def crossval(kind: str, data: str | Path, out: str | Path, folds: int = 5, base: str | None = None,
             scorer_settings: ScorerFinetuneSettings | None = None,
             segmenter_settings: SegmenterFinetuneSettings | None = None, seed: int = 0, log: Log = print) -> dict:
    """Fine-tune on all folds but one, test on that one, for every fold; write the report to `out`."""
    dataset = TrainingSet(data)
    cases = [c for c in dataset.cases() if kind == "segmenter" or c.scores is not None]
    assignment = fold_of_cases(cases, folds, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="aacscore-crossval-") as scratch:
        for fold in range(folds):
            train_cases = [c for c, f in zip(cases, assignment) if f != fold]
            test_cases = [c for c, f in zip(cases, assignment) if f == fold]
            log(f"fold {fold + 1}/{folds}: fine-tuning on {len(train_cases)} cases, testing on {len(test_cases)}")
            package = Path(scratch) / f"fold{fold}"
            if kind == "scorer":
                finetune_scorer(data, package, base, scorer_settings, cases=train_cases, log=log)
                predicted = score_cases(package, test_cases, (scorer_settings or ScorerFinetuneSettings()).device)
            else:
                finetune_segmenter(data, package, base, segmenter_settings, cases=train_cases, log=log)
                predicted = segment_cases(package, test_cases, (segmenter_settings or SegmenterFinetuneSettings()).device)
            rows.extend({**row, "fold": fold} for row in predicted)
    seconds = round(time.perf_counter() - started, 1)
    if kind == "scorer":
        return _scorer_report(dataset, cases, rows, out, folds, seconds)
    summary = {"kind": "segmenter", "folds": folds, "seconds": seconds, **summarise_segmentation(rows), "cases": rows}
    write_text_atomic(out / "crossval.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomic(out / "report.md", _segmenter_markdown(summary))
    return summary


def _scorer_report(dataset: TrainingSet, cases: Sequence[TrainingCase], rows: list[dict], out: Path, folds: int,
                   seconds: float) -> dict:
    from .evaluation.evaluate import evaluate

    by_image = {str(case.image): case for case in cases}
    truth = [{"file": Path(row["file"]).name, "aac24": sum(by_image[row["file"]].scores.values()),
              **by_image[row["file"]].scores} for row in rows if row["file"] in by_image]
    predictions = [{**row, "file": Path(row["file"]).name} for row in rows]
    _write_rows(out / "truth.csv", truth)
    _write_rows(out / "predictions.csv", predictions)
    results = evaluate(out / "truth.csv", out / "predictions.csv", out)
    results.update(kind="scorer", folds=folds, seconds=seconds, training_set=str(dataset.folder))
    return results


def _write_rows(path: Path, rows: Sequence[dict]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def _segmenter_markdown(summary: dict) -> str:
    lines = [f"# Segmenter cross-validation ({summary['folds']} folds, {summary['n']} cases, {summary['seconds']} s)",
             "", f"All five levels right: {100 * summary['levels_right']:.1f}%", "",
             "| " + " | ".join(VERTEBRAE) + " |", "|" + "---|" * len(VERTEBRAE),
             "| " + " | ".join(f"{summary['dice_mean'][name]:.3f}" for name in VERTEBRAE) + " |", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- learning curve


def _phantom_cases(folder: Path, n: int, seed: int, style: str, size_range: tuple[int, int] | None
                   ) -> list[TrainingCase]:
    """Phantoms written as files a user would have (DICOM + label PNG), as cases with their true subscores."""
    from .phantoms.generator import DEFAULT_SIZE_RANGE, generate_phantom, write_phantom

    cases = []
    for index in range(n):
        phantom = generate_phantom(seed, style, index, size_range=size_range or DEFAULT_SIZE_RANGE)
        image = write_phantom(phantom, folder)
        cases.append(TrainingCase(phantom.name, image, folder / f"{phantom.name}_labels.png",
                                  dict(phantom.truth["subscores"])))
    return cases


def learning_curve(kind: str, style: str, sizes: Sequence[int], n_test: int, out: str | Path, *,
                   base: str | None = None, seed: int = 8300, scorer_settings: ScorerFinetuneSettings | None = None,
                   segmenter_settings: SegmenterFinetuneSettings | None = None,
                   size_range: tuple[int, int] | None = None, log: Log = print) -> dict:
    """Accuracy on a phantom family after fine-tuning on 0, n1, n2, ... of its cases (0 = the base package).

    Training cases come from `seed`, test cases from `seed + 1`: never the same phantom. Each size starts again
    from the base package; the table and every fold's package go to `out`."""
    from .io.radiograph import read_radiograph

    out = Path(out)
    sizes = sorted(set(int(n) for n in sizes))
    if not sizes or sizes[0] < 0:
        raise AACScoreError(f"sizes must be 0 or more, got {sizes}")
    log(f"writing {max(sizes)} training and {n_test} test phantoms ({style})")
    train_cases = _phantom_cases(out / "phantoms-train", max(sizes), seed, style, size_range)
    test_cases = _phantom_cases(out / "phantoms-test", n_test, seed + 1, style, size_range)
    dataset = TrainingSet(out / "trainingset")
    stored = [dataset.add(read_radiograph(case.image), _labels(case), case.scores) for case in train_cases]
    rows = []
    for size in sizes:
        started = time.perf_counter()
        package: str | Path | None = base
        if size:
            log(f"fine-tuning the {kind} on {size} cases")
            package = out / f"{kind}-{size}"
            if kind == "scorer":
                finetune_scorer(dataset.folder, package, base, scorer_settings, cases=stored[:size], log=log)
            else:
                finetune_segmenter(dataset.folder, package, base, segmenter_settings, cases=stored[:size],
                                   log=log)
        seconds = round(time.perf_counter() - started, 1)
        if package is None:
            package = find_package(None, kind).path
        if kind == "scorer":
            predicted = score_cases(package, test_cases, (scorer_settings or ScorerFinetuneSettings()).device)
            truth = np.array([sum(case.scores.values()) for case in test_cases], dtype=float)
            pred = np.array([np.nan if row["aac24"] is None else float(row["aac24"]) for row in predicted])
            ok = np.isfinite(pred)
            row = {"cases": size, "mae": round(float(np.mean(np.abs(pred[ok] - truth[ok]))), 3),
                   "n_test": int(ok.sum()), "errors": int((~ok).sum()), **_qc_figures(predicted, truth)}
        else:
            predicted = segment_cases(package, test_cases, (segmenter_settings or SegmenterFinetuneSettings()).device)
            summary = summarise_segmentation(predicted)
            row = {"cases": size, "levels_right": summary["levels_right"], "dice_mean": summary["dice_mean"],
                   "n_test": summary["n"], "statuses": summary["statuses"]}
        row["finetune_seconds"] = seconds
        rows.append(row)
        log(json.dumps(row))
    settings = (scorer_settings or ScorerFinetuneSettings()) if kind == "scorer" else \
        (segmenter_settings or SegmenterFinetuneSettings())
    curve = {"kind": kind, "family": style, "train_seed": seed, "test_seed": seed + 1,
             "settings": asdict(settings), "rows": rows}
    write_text_atomic(out / "curve.json", json.dumps(curve, indent=2) + "\n")
    return curve


def _qc_figures(predicted: Sequence[dict], truth: np.ndarray) -> dict:
    """The share of scored results flagged for review and, where the package has an interval, how often it held
    the truth (None without one)."""
    scored = [(row, t) for row, t in zip(predicted, truth) if row["aac24"] is not None]
    bounded = [(row, t) for row, t in scored if row["aac24_low"] is not None]
    coverage = (round(float(np.mean([row["aac24_low"] <= t <= row["aac24_high"] for row, t in bounded])), 3)
                if bounded else None)
    flagged = round(float(np.mean([row["qc"] != "ok" for row, _ in scored])), 3) if scored else None
    return {"interval_coverage": coverage, "flagged": flagged}


def _labels(case: TrainingCase) -> np.ndarray:
    from .io.labelmaps import read_label_map

    return read_label_map(case.labels, context=True)


# ---------------------------------------------------------------------------------------------- command line


def add_cli(subparsers) -> None:
    """`aacscore dataset add|list`, `aacscore finetune segmenter|scorer`, `aacscore crossval segmenter|scorer`."""
    dataset = subparsers.add_parser("dataset", help="build a training set of corrected cases (nnU-Net layout + scores)")
    actions = dataset.add_subparsers(dest="dataset_command", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="store a radiograph with its corrected label map (and rated subscores)")
    add.add_argument("image", metavar="IMAGE", help="radiograph (DICOM or NRRD: a training case needs pixel spacing)")
    add.add_argument("--labels", required=True, metavar="LABELMAP",
                     help="corrected label map: PNG/NRRD with L1..L5 = 1..5 and, where drawn, T12 = 6 and "
                          "S1 = 7 (top of the sacrum), or a Slicer .seg.nrrd (segments named L1..L5, T12, S1)")
    add.add_argument("--scores", metavar="L1A=..,L1P=..,...", help="the eight Kauppila subscores, when rated")
    add.add_argument("--data", required=True, metavar="DIR", help="the training set folder")
    add.set_defaults(func=_add_command)
    listing = actions.add_parser("list", help="how many cases (and rated cases) a training set holds")
    listing.add_argument("--data", required=True, metavar="DIR")
    listing.set_defaults(func=_list_command)

    finetune = subparsers.add_parser("finetune", help="fine-tune the segmenter or scorer on a training set")
    crossval_parser = subparsers.add_parser("crossval", help="k-fold cross-validated fine-tuning: accuracy on your data")
    for parser, func in ((finetune, _finetune_command), (crossval_parser, _crossval_command)):
        parser.add_argument("kind", choices=("segmenter", "scorer"))
        parser.add_argument("--data", required=True, metavar="DIR", help="training set folder (`aacscore dataset add`)")
        parser.add_argument("--from", dest="base", metavar="PACKAGE",
                            help="base package (default: the one `aacscore score` would use)")
        parser.add_argument("--out", required=True, metavar="DIR",
                            help="package folder (finetune) or report folder (crossval)")
        parser.add_argument("--epochs", type=int, help="scorer default 30 (0 with --adapt-batchnorm: adapt only, "
                                                         "no scores needed); segmenter default 10")
        parser.add_argument("--adapt-batchnorm", action="store_true",
                            help="scorer: re-estimate the backbone's BatchNorm statistics on every case first "
                                 "(10 or more; helps on some cohorts, hurts on others: compare with crossval)")
        parser.add_argument("--lr", type=float, help="learning rate (default 0.001: a tenth of training's)")
        parser.add_argument("--freeze", default=None, metavar="STAGES",
                            help="scorer: backbone stages kept fixed, comma-separated among stem,layer1..layer4 "
                                 "(default stem,layer1; 'none' trains all)")
        parser.add_argument("--iterations-per-epoch", type=int, help="segmenter: default 25")
        parser.add_argument("--replay", type=int, metavar="N",
                            help="segmenter: replay N of the base's own training phantoms beside the cases, so "
                                 "that it does not forget what it knew (default 20 when the base names them; 0: none)")
        parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
        parser.set_defaults(func=func)
    qc_help = ("scorer: also calibrate the new scorer's QC (prediction interval, feature reference) by K-fold "
               "cross-validation of this fine-tuning, K more fine-tunings (e.g. 5; needs 10 or more rated cases); "
               "without it the new scorer's results have no interval")
    finetune.add_argument("--qc-folds", type=int, default=0, metavar="K", help=qc_help)
    finetune.add_argument("--name", help="new package name (default: <base>-finetuned)")
    finetune.add_argument("--version", help="new package version (default: a timestamp)")
    crossval_parser.add_argument("--folds", type=int, default=5)
    curve = subparsers.add_parser("finetune-curve", help="accuracy on a phantom family after fine-tuning on 0..N of its cases")
    curve.add_argument("kind", choices=("segmenter", "scorer"))
    curve.add_argument("--family", required=True, help="phantom family (style) the base models never saw")
    curve.add_argument("--sizes", default="0,10,20,50", help="numbers of fine-tuning cases, comma-separated")
    curve.add_argument("--n-test", type=int, default=100, help="test phantoms (seed + 1)")
    curve.add_argument("--seed", type=int, default=8300, help="seed of the fine-tuning phantoms")
    curve.add_argument("--from", dest="base", metavar="PACKAGE")
    curve.add_argument("--out", required=True, metavar="DIR")
    curve.add_argument("--epochs", type=int)
    curve.add_argument("--adapt-batchnorm", action="store_true")
    curve.add_argument("--lr", type=float)
    curve.add_argument("--freeze", default=None, metavar="STAGES")
    curve.add_argument("--iterations-per-epoch", type=int)
    curve.add_argument("--replay", type=int, metavar="N")
    curve.add_argument("--qc-folds", type=int, default=0, metavar="K", help=qc_help + "; the table then "
                       "reports the interval's coverage and the flagged share on the test phantoms")
    curve.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    curve.set_defaults(func=_curve_command)
    crossval_parser.add_argument("--seed", type=int, default=0, help="seed of the fold assignment")


def _add_command(args) -> int:
    from .io.labelmaps import read_label_map
    from .io.radiograph import read_radiograph
    from .packages import sha256_file

    scores = parse_scores(args.scores) if args.scores else None
    radiograph = read_radiograph(args.image)
    labels = read_label_map(args.labels, radiograph.pixels.shape, context=True)
    dataset = TrainingSet(args.data)
    case = dataset.add(radiograph, labels, scores, source_sha256=sha256_file(args.image))
    counts = dataset.counts()
    print(f"stored {case.case} in {dataset.folder} ({counts['cases']} cases, {counts['scored']} with scores; "
          f"no DICOM header is kept)")
    return 0


def _list_command(args) -> int:
    dataset = TrainingSet(args.data)
    counts = dataset.counts()
    print(f"{dataset.folder}: {counts['cases']} cases, {counts['scored']} with scores")
    for case in dataset.cases():
        total = "" if case.scores is None else f"  AAC-24 {sum(case.scores.values())}"
        print(f"  {case.case}{total}")
    return 0


def _settings(args) -> tuple[ScorerFinetuneSettings, SegmenterFinetuneSettings]:
    scorer, segmenter = ScorerFinetuneSettings(device=args.device), SegmenterFinetuneSettings(device=args.device)
    if args.epochs is not None:
        scorer.epochs = segmenter.epochs = args.epochs
    scorer.adapt_batchnorm = args.adapt_batchnorm
    scorer.qc_folds = getattr(args, "qc_folds", 0)  # crossval has no --qc-folds: its folds need no interval
    if args.lr is not None:
        scorer.lr = segmenter.lr = args.lr
    if args.freeze is not None:
        scorer.freeze = () if args.freeze.strip().lower() == "none" else tuple(
            part.strip() for part in args.freeze.split(",") if part.strip())
    if args.iterations_per_epoch is not None:
        segmenter.iterations_per_epoch = args.iterations_per_epoch
    if args.replay is not None:
        segmenter.replay = args.replay
    return scorer, segmenter


def _finetune_command(args) -> int:
    scorer, segmenter = _settings(args)
    log = lambda text: print(text, file=sys.stderr)  # noqa: E731
    if args.kind == "scorer":
        package = finetune_scorer(args.data, args.out, args.base, scorer, name=args.name, version=args.version, log=log)
    else:
        package = finetune_segmenter(args.data, args.out, args.base, segmenter, name=args.name, version=args.version,
                                     log=log)
    print(f"wrote {package}; use it with --{args.kind} {package} or install it with `aacscore models install {package}`")
    return 0


def _crossval_command(args) -> int:
    scorer, segmenter = _settings(args)
    results = crossval(args.kind, args.data, args.out, args.folds, args.base, scorer, segmenter, args.seed,
                       log=lambda text: print(text, file=sys.stderr))
    print(results.get("report") or _segmenter_markdown(results), end="")
    print(f"report in {args.out}")
    return 0


def _curve_command(args) -> int:
    from .phantoms.generator import check_styles

    check_styles([args.family])
    scorer, segmenter = _settings(args)
    try:
        sizes = [int(part) for part in args.sizes.split(",") if part.strip()]
    except ValueError:
        raise AACScoreError(f"--sizes must be comma-separated whole numbers, got {args.sizes!r}") from None
    curve = learning_curve(args.kind, args.family, sizes, args.n_test, args.out, base=args.base, seed=args.seed,
                           scorer_settings=scorer, segmenter_settings=segmenter,
                           log=lambda text: print(text, file=sys.stderr))
    print(json.dumps(curve["rows"], indent=1))
    return 0

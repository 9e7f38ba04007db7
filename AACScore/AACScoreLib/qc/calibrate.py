"""`aacscore calibrate-qc`: measure a scorer on held-out cases with known scores and store its QC calibration.

For every case of the truth CSVs (a phantom folder's truth.csv: image, true label map, AAC-24) it scores the
crop of the true label map, as `aacscore score truth.csv` does (or, with --end-to-end, of the segmenter's label
map, as users' radiographs are scored), and records the MC-dropout spread, the backbone features and the spread
of the score over crop variants. From these it fits the interval (see `interval.choose_interval`), the feature
reference and the stability limit, and with `--write` stores them as `qc.json` in the scorer package, pinned by
sha256 in its manifest (weights and other files unchanged). Use cases the scorer never trained on.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import AACScoreError
from .domain import UNFAMILIAR_IMAGE, FeatureReference
from .interval import choose_interval, score_uncertainty
from .reference import FORMAT, QC_FILE
from .stability import SCORE_UNSTABLE, ScoreStability, crop_variants, variant_spread
from .verdict import SCORE_UNCERTAIN, SEGMENTER_NOTE

REFITTED = (SCORE_UNCERTAIN, UNFAMILIAR_IMAGE, SCORE_UNSTABLE)  # reasons that come from the calibration fitted here


def measure(pipeline, records, progress=None, end_to_end: bool = False,
            groups: list[int] | None = None) -> dict[str, np.ndarray]:
    """truth, score, spread, variant spread and features of every case the pipeline scores from its true label map,
    or, with `end_to_end`, from the pipeline's own segmentation (cases it cannot score are left out and counted);
    `groups` (the calibration set of each record) is kept for the cases scored."""
    columns: dict[str, list] = {"truth": [], "score": [], "spread": [], "variant_spread": [], "features": [],
                                "flagged": [], "noted": [], "group": []}
    skipped = 0
    for index, record in enumerate(records):
        result = pipeline.run(record.image, None if end_to_end else record.labels, heatmap=False)
        if result.aac24 is None and end_to_end:
            skipped += 1
            continue
        if result.aac24 is None:
            raise AACScoreError(f"{record.image}: cannot be scored from its label map: {result.message}")
        crop = pipeline.scorer.crop(result.radiograph.pixels, result.geometry)
        uncertainty = score_uncertainty(pipeline.scorer, crop, crop_variants(crop))
        columns["truth"].append(record.aac24)
        columns["score"].append(result.aac24)
        columns["spread"].append(uncertainty.spread)
        columns["variant_spread"].append(variant_spread([uncertainty.total, *uncertainty.variant_totals]))
        raised = {reason.code for reason in result.qc_reasons if reason.code not in REFITTED}
        columns["flagged"].append(len(raised - {SEGMENTER_NOTE}))  # as `verdict.flag_kinds` counts them
        columns["noted"].append(SEGMENTER_NOTE in raised)
        columns["features"].append(uncertainty.features)
        columns["group"].append(0 if groups is None else groups[index])
        if progress is not None:
            progress(index + 1, len(records))
    measured = {key: np.array(values, dtype=float) for key, values in columns.items()}
    measured["not_scored"] = np.array(skipped)
    return measured


def calibration_file(measured: dict[str, np.ndarray], coverage: float, source: str, scorer_manifest: dict) -> dict:
    reference = FeatureReference.fit(measured["features"])
    # how many kinds of check flag each case: those fitted here, and the others as the pipeline raised them
    flagged = np.array([reference.distance(f) > reference.max_distance for f in measured["features"]], int)
    stability = None
    if "variant_spread" in measured:  # cases measured without crop variants: no limit, the check is skipped
        stability = ScoreStability.fit(measured["variant_spread"])
        flagged += measured["variant_spread"] > stability.max_spread
    if "flagged" in measured:
        flagged += measured["flagged"].astype(int)
    if "noted" in measured:  # the segmenter's note counts when nothing else flags the case
        flagged[(flagged == 0) & measured["noted"].astype(bool)] = 1
    interval, figures = choose_interval(measured["truth"], measured["score"], measured["spread"], coverage,
                                        flagged=flagged, variant_spread=measured.get("variant_spread"),
                                        groups=measured.get("group"))
    residual = np.abs(measured["truth"] - measured["score"])
    data = {
        "format": FORMAT,
        "scorer": f"{scorer_manifest.get('name')}=={scorer_manifest.get('version')}",
        "calibration_set": {"source": source, "n": int(len(residual)), "not_scored": int(measured.get("not_scored", 0)),
                            "mae": round(float(residual.mean()), 4),
                            "spread_residual_spearman": _spearman(measured["spread"], residual)},
        "interval": interval.to_json(),
        "interval_selection": figures,
        "features": reference.to_json(),
    }
    if stability is not None:
        data["stability"] = stability.to_json()
        data["calibration_set"]["variant_spread_residual_spearman"] = _spearman(measured["variant_spread"], residual)
    return data


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Rank correlation, rounded for qc.json; None where it is undefined (a constant column)."""
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return round(float(spearmanr(a, b).statistic), 4)


def write_calibration(package, data: dict) -> None:
    """Store qc.json in a package folder, the manifest pinning it; every other file stays as it is."""
    from ..packages import write_package

    if not package.path.is_dir():
        raise AACScoreError(f"{package.path}: QC calibration is written into a package folder, not a zip")
    files: dict[str, Path | bytes] = {relpath: package.path / relpath for relpath in package.files
                                      if relpath != QC_FILE}
    files[QC_FILE] = (json.dumps(data, indent=1) + "\n").encode()
    manifest = {key: value for key, value in package.manifest.items() if key != "files"}
    write_package(package.path, manifest, files)


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "calibrate-qc",
        help="fit a scorer's prediction interval, feature reference and stability limit on held-out truth",
        description="Score held-out cases from their true label maps and fit the QC calibration (qc.json).")
    parser.add_argument("truth", nargs="+", help="truth CSVs with file, labels and aac24 (e.g. a phantom folder's "
                        "truth.csv, from seeds the scorer never trained on); each CSV is one calibration set, and "
                        "with three or more the interval method is the one that holds best on a set left out")
    parser.add_argument("--scorer", help="scorer package name, name==version or path (default: newest installed, "
                        "else the bundled demo)")
    parser.add_argument("--coverage", type=float, default=0.8, help="nominal interval coverage (default 0.8)")
    parser.add_argument("--end-to-end", action="store_true",
                        help="score each case from the segmenter's label map, as users' radiographs are scored, so "
                             "that the interval also covers what segmentation adds (cases not scored are left out)")
    parser.add_argument("--segmenter", help="with --end-to-end: segmenter package (default: newest installed, else "
                        "the bundled demo)")
    parser.add_argument("--write", action="store_true", help="store qc.json in the scorer package (else print)")
    parser.add_argument("--describe", help="how the cases were made, recorded in qc.json (default: the CSV paths)")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from ..packages import find_package
    from ..pipeline import Pipeline
    from ..scoring.data import read_score_csv
    from ..scoring.scorer import Scorer

    if not 0.5 <= args.coverage < 1.0:
        raise AACScoreError(f"--coverage must be in [0.5, 1), got {args.coverage}")
    package = find_package(args.scorer, "scorer")
    sets = [read_score_csv(path) for path in args.truth]
    records = [record for records_of_set in sets for record in records_of_set]
    groups = [k for k, records_of_set in enumerate(sets) for _ in records_of_set]
    segmenter = None
    if args.end_to_end:
        from ..segmentation.segmenter import Segmenter

        segmenter = Segmenter.from_package(find_package(args.segmenter, "segmenter"), device="cpu")
    pipeline = Pipeline(Scorer.from_package(package, device="cpu"), segmenter)
    started = time.perf_counter()
    measured = measure(pipeline, records, lambda done, total: print(f"\r{done}/{total}", end="", file=sys.stderr),
                       end_to_end=args.end_to_end, groups=groups)
    print(f"\nmeasured {len(records)} cases in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    data = calibration_file(measured, args.coverage, args.describe or " ".join(args.truth), package.manifest)
    summary = {key: value for key, value in data.items() if key != "features"}
    print(json.dumps(summary, indent=2))
    if args.write:
        write_calibration(package, data)
        print(f"written: {package.path / QC_FILE}")
    return 0

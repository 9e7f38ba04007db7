"""`aacscore demo`: score the bundled demo radiographs with the demo models and compare with their truth.

The demo radiographs are synthetic phantoms and the demo models were trained on phantoms: this shows the
software working end to end, nothing about clinical accuracy.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from .slicer.sample_data import SAMPLE_DATA_DIR


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="score the bundled demo radiographs (synthetic phantoms)")
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default: demo_out)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from .batch import _ProgressBar, score_cohort
    from .io.cohort import collect
    from .pipeline import Pipeline

    print("AACScore demo: synthetic phantoms scored with models trained on phantoms - not for clinical use.")
    pipeline = Pipeline.from_packages(device=args.device)
    print(f"models: {pipeline.scorer.manifest['name']} {pipeline.scorer.manifest['version']}, "
          f"{pipeline.segmenter.package.name} {pipeline.segmenter.package.version}")
    table = score_cohort(pipeline, collect([SAMPLE_DATA_DIR]), args.out, progress=_ProgressBar())
    print_comparison(table, SAMPLE_DATA_DIR / "truth.csv")
    print(f"\nresults: {table}\noverlays: {args.out / 'overlays'}\nlabel maps: {args.out / 'labels'}")
    return 0


def print_comparison(results_csv: Path, truth_csv: Path, stream=None) -> None:
    """Predicted next to true AAC-24 for each demo radiograph."""
    stream = stream or sys.stdout
    with open(truth_csv, newline="") as handle:
        truth = {row["file"]: row for row in csv.DictReader(handle)}
    with open(results_csv, newline="") as handle:
        results = list(csv.DictReader(handle))
    print(f"\n{'radiograph':32} {'AAC-24':>7} {'truth':>6}  {'category':9} {'truth':9} status", file=stream)
    for row in results:
        name = Path(row["file"]).name
        expected = truth.get(name, {})
        print(f"{name:32} {row['aac24'] or '-':>7} {expected.get('aac24', '?'):>6}  {row['category'] or '-':9} "
              f"{expected.get('category', '?'):9} {row['status']} {row['message']}", file=stream)

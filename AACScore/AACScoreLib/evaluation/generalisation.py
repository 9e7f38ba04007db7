"""`aacscore generalisation`: the paper's statistics per phantom family, from the true label maps and end to end.

For each family, `n` phantoms of a seed are written (once; a rerun reuses them and resumes the scoring), scored
twice with `aacscore score`'s batch runner - from their drawn label maps (the scorer alone) and from the
segmenter's (the whole pipeline) - and each run is judged by `aacscore evaluate`. A summary table sets every
family beside the paper's internal and external validation figures.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from ..errors import AACScoreError
from ..io.atomic import write_text_atomic
from ..phantoms.truth import DEFAULT_SIZE_RANGE

MODES = ("true-labels", "end-to-end")
# Shao et al. (2025), Table 3 and its text: the seed's figures to set ours beside.
PAPER = {"internal validation (n=471)": {"mae": 1.686, "icc_2_1": 0.913, "spearman_rho": 0.923, "within_4": 0.900},
         "external validation (n=733)": {"mae": 1.920, "icc_2_1": 0.874, "spearman_rho": 0.888, "within_4": 0.876}}


def family_phantoms(folder: Path, family: str, n: int, seed: int,
                    size_range: tuple[int, int] = DEFAULT_SIZE_RANGE) -> Path:
    """`folder/truth.csv` of phantoms 0..n-1 of `seed` in `family`, written unless all of them are there."""
    from ..phantoms.generator import phantom_name, write_phantoms

    names = [phantom_name(seed, index, family) for index in range(n)]
    truth = folder / "truth.csv"
    listed = set()
    if truth.is_file():
        with open(truth, newline="") as stream:
            listed = {row["file"] for row in csv.DictReader(stream)}
    if not all(f"{name}.dcm" in listed and (folder / f"{name}.dcm").is_file() for name in names):
        write_phantoms(folder, n, seed, style=family, size_range=size_range)
    return truth


def summary_row(results: dict) -> dict:
    """The figures of one evaluate run that the summary table shows."""
    m = results["metrics"]
    severe = results["categories"]["per_class"]["severe"]["sensitivity"]
    return {"n": results["n"], "excluded": len(results["excluded"]),
            "mae": m["mae"]["value"], "mae_ci": [m["mae"].get("ci_low"), m["mae"].get("ci_high")],
            "icc_2_1": m["icc_2_1"]["value"], "icc_ci": [m["icc_2_1"].get("ci_low"), m["icc_2_1"].get("ci_high")],
            "spearman_rho": m["spearman_rho"]["value"], "within_4": m["within_4"]["value"],
            "bias": results["bias"]["mean_difference"],
            "severe_sensitivity": severe["value"], "severe_n": severe["total"],
            "category_accuracy": results["categories"]["accuracy"]["value"],
            "dice_mean": (sum(v["mean"] for v in results["dice"]["per_vertebra"].values()) / 5
                          if "dice" in results else None)}


def run_generalisation(pipeline, families: list[str], n: int, seed: int, out_dir: Path, modes: list[str],
                       bootstrap: int = 1000, size_range: tuple[int, int] = DEFAULT_SIZE_RANGE) -> dict:
    """Write, score and evaluate every family in every mode; returns {family: {mode: summary row}}."""
    from ..batch import score_cohort
    from ..io.cohort import WorkItem, collect
    from .evaluate import evaluate

    table: dict[str, dict[str, dict]] = {}
    for family in families:
        folder = out_dir / family
        truth = family_phantoms(folder / "phantoms", family, n, seed, size_range)
        with_labels = collect([truth])  # truth.csv lists each phantom with its drawn label map
        table[family] = {}
        for mode in modes:
            runs = folder / mode
            items = with_labels if mode == "true-labels" else [WorkItem(item.image) for item in with_labels]
            print(f"{family}: scoring {len(items)} phantoms ({mode})", file=sys.stderr, flush=True)
            results_csv = score_cohort(pipeline, items, runs, heatmaps=False)
            labels = (folder / "phantoms", runs / "labels") if mode == "end-to-end" else (None, None)
            results = evaluate(truth, results_csv, runs / "evaluation", *labels, bootstrap=bootstrap)
            table[family][mode] = summary_row(results)
    return table


def _number(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def format_summary(table: dict, header: dict) -> str:
    """Markdown: one row per family and mode, then the paper's figures."""
    lines = [f"# Generalisation report: {header['scorer']} (segmenter {header['segmenter']})", "",
             f"Phantoms: n = {header['n']} per family, seed {header['seed']}; bootstrap 95% CIs of the test cases "
             f"({header['bootstrap']} resamples). 'true-labels' scores from the drawn label maps (the scorer alone); "
             "'end-to-end' from the segmenter's.", "",
             "| family | mode | n (excluded) | MAE (95% CI) | ICC(2,1) (95% CI) | Spearman | abs. error < 4 | bias | "
             "severe sensitivity (n) | category accuracy | Dice L1–L5 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for family, modes in table.items():
        for mode, r in modes.items():
            lines.append(
                f"| {family} | {mode} | {r['n']} ({r['excluded']}) | {_number(r['mae'], 2)} "
                f"({_number(r['mae_ci'][0], 2)}–{_number(r['mae_ci'][1], 2)}) | {_number(r['icc_2_1'])} "
                f"({_number(r['icc_ci'][0])}–{_number(r['icc_ci'][1])}) | {_number(r['spearman_rho'])} | "
                f"{_number(r['within_4'], 2)} | {r['bias']:+.2f} | {_number(r['severe_sensitivity'], 2)} "
                f"({r['severe_n']}) | {_number(r['category_accuracy'], 2)} | {_number(r['dice_mean'])} |")
    for name, figures in PAPER.items():
        lines.append(f"| Shao et al. 2025 | {name} | | {figures['mae']:.3f} | {figures['icc_2_1']:.3f} | "
                     f"{figures['spearman_rho']:.3f} | {figures['within_4']:.3f} | | | | |")
    return "\n".join(lines) + "\n"


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "generalisation", help="the paper's statistics per phantom family, from true label maps and end to end",
        description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="default,alt", help="phantom families, comma-separated")
    parser.add_argument("--n", type=int, default=200, help="phantoms per family")
    parser.add_argument("--seed", type=int, default=9300, help="phantom seed (keep it apart from training seeds)")
    parser.add_argument("--modes", default=",".join(MODES), help="true-labels, end-to-end or both (comma-separated)")
    parser.add_argument("--scorer")
    parser.add_argument("--segmenter")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")
    parser.add_argument("--out", type=Path, required=True, help="folder for phantoms, runs, reports and summary.md")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..phantoms.generator import parse_styles
    from ..pipeline import Pipeline

    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    if not modes or set(modes) - set(MODES):
        raise AACScoreError(f"--modes must be among {', '.join(MODES)}; got {args.modes!r}")
    if args.n < 2:
        raise AACScoreError(f"--n must be at least 2 (the statistics need two cases), got {args.n}")
    families = list(parse_styles(args.families))
    pipeline = Pipeline.from_packages(args.scorer, args.segmenter, args.device,
                                      need_segmenter="end-to-end" in modes)
    table = run_generalisation(pipeline, families, args.n, args.seed, args.out, modes, args.bootstrap)
    segmenter = pipeline.segmenter.manifest if pipeline.segmenter is not None else {}
    header = {"scorer": f"{pipeline.scorer.manifest.get('name')} {pipeline.scorer.manifest.get('version')}",
              "segmenter": f"{segmenter.get('name')} {segmenter.get('version')}" if segmenter else "not used",
              "n": args.n, "seed": args.seed, "bootstrap": args.bootstrap, "families": families, "modes": modes}
    summary = format_summary(table, header)
    write_text_atomic(args.out / "summary.json", json.dumps({**header, "table": table, "paper": PAPER}, indent=1))
    write_text_atomic(args.out / "summary.md", summary)
    print(summary, end="")
    return 0

"""`aacscore gradcam-report`: where a scorer's Grad-CAM heat lies on phantoms: on the aortic band, on the plaque.

Phantoms of a family are made in memory and scored from their drawn label maps (segmentation plays no part). For
each, the share of the heatmap's mass on the four Kauppila aortic segments (the band) and within a few millimetres
of the drawn calcified plaque is set beside those regions' share of the crop's area: a map that ignored the image
would put as much heat on a region as its area, so heat / area above 1 means the network looks there.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

from ..errors import AACScoreError
from ..io.atomic import write_atomic, write_text_atomic
from ..phantoms.truth import DEFAULT_SIZE_RANGE

CASE_COLUMNS = ("file", "family", "aac24_true", "aac24_pred", "all_zero", "band_heat", "band_area", "plaque_heat",
                "plaque_area")
MODERATE_OR_MORE = 5.0  # cases with at least this much plaque are summarised on their own


def phantom_heat_row(scorer, family: str, seed: int, index: int, tolerance_mm: float,
                     size_range: tuple[int, int] = DEFAULT_SIZE_RANGE) -> dict:
    """Score one phantom from its drawn labels and measure where its Grad-CAM heat lies (one CSV row)."""
    from ..geometry.spine import analyze_spine
    from ..phantoms.generator import generate_phantom, read_back
    from ..scoring.gradcam import band_mask, crop_mask, heat_shares, plaque_mask

    phantom = generate_phantom(seed, family, index, size_range=size_range)
    radiograph = read_back(phantom)
    geometry = analyze_spine(phantom.labels, radiograph.spacing, patient_orientation=radiograph.patient_orientation,
                             image=radiograph.pixels)
    crop = scorer.crop(radiograph.pixels, geometry)
    scored, heat = scorer.score_and_heatmap(crop)
    size = heat.crop_map.shape
    regions = {"band": crop_mask(band_mask(geometry, radiograph.pixels.shape), geometry, size),
               "plaque": crop_mask(plaque_mask(phantom, tolerance_mm), geometry, size)}
    row = {"file": f"{phantom.name}.dcm", "family": family, "aac24_true": float(phantom.truth["aac24"]),
           "aac24_pred": round(scored.aac24, 3), "all_zero": heat.all_zero}
    row.update({k: None if v is None else round(v, 4) for k, v in heat_shares(heat.crop_map, regions).items()})
    return row


def summarise(rows: list[dict]) -> dict:
    """Means of the shares over the cases whose map is not all zero; plaque figures over cases with plaque."""
    def mean(values) -> float | None:
        values = [v for v in values if v is not None]
        return round(float(np.mean(values)), 4) if values else None

    mapped = [r for r in rows if not r["all_zero"]]
    with_plaque = [r for r in mapped if r["aac24_true"] > 0 and r["plaque_area"] > 0]
    moderate = [r for r in mapped if r["aac24_true"] >= MODERATE_OR_MORE]
    errors = [abs(r["aac24_pred"] - r["aac24_true"]) for r in rows]
    summary = {
        "n": len(rows), "all_zero_maps": len(rows) - len(mapped),
        "score_mae": round(float(np.mean(errors)), 3) if errors else None,
        "band_heat_mean": mean(r["band_heat"] for r in mapped),
        "band_area_mean": mean(r["band_area"] for r in mapped),
        "n_with_plaque": len(with_plaque),
        "plaque_heat_mean": mean(r["plaque_heat"] for r in with_plaque),
        "plaque_area_mean": mean(r["plaque_area"] for r in with_plaque),
        f"n_aac24_at_least_{MODERATE_OR_MORE:g}": len(moderate),
        "band_heat_mean_moderate_or_more": mean(r["band_heat"] for r in moderate),
        "plaque_heat_mean_moderate_or_more": mean(r["plaque_heat"] for r in moderate),
        "plaque_area_mean_moderate_or_more": mean(r["plaque_area"] for r in moderate),
    }
    for region in ("band", "plaque"):
        heat, area = summary[f"{region}_heat_mean"], summary[f"{region}_area_mean"]
        summary[f"{region}_heat_over_area"] = round(heat / area, 3) if heat is not None and area else None
    return summary


def gradcam_report(scorer, families: list[str], n: int, seed: int, out_dir: Path | None,
                   tolerance_mm: float, size_range: tuple[int, int] = DEFAULT_SIZE_RANGE, progress=None) -> dict:
    """Rows and summaries of `n` phantoms (indices 0..n-1 of `seed`) per family; written to out_dir when given."""
    report = {"scorer": scorer.manifest.get("name"), "scorer_version": scorer.manifest.get("version"),
              "input_size": list(scorer.input_size), "seed": seed, "plaque_tolerance_mm": tolerance_mm,
              "families": {}}
    rows_all = []
    for family in families:
        rows = []
        for index in range(n):
            rows.append(phantom_heat_row(scorer, family, seed, index, tolerance_mm, size_range))
            if progress is not None:
                progress(family, index + 1, n)
        report["families"][family] = summarise(rows)
        rows_all += rows
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)

        def write_rows(stream) -> None:
            writer = csv.DictWriter(stream, fieldnames=CASE_COLUMNS)
            writer.writeheader()
            writer.writerows(rows_all)

        write_atomic(out_dir / "gradcam_cases.csv", write_rows)
        write_text_atomic(out_dir / "gradcam_summary.json", json.dumps(report, indent=1))
    return report


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "gradcam-report", help="share of a scorer's Grad-CAM heat on the aortic band and on drawn plaque",
        description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="alt", help="phantom families, comma-separated (default alt)")
    parser.add_argument("--n", type=int, default=50, help="phantoms per family")
    parser.add_argument("--seed", type=int, default=9400, help="phantom seed (keep it apart from training seeds)")
    parser.add_argument("--scorer", help="scorer package (default: the newest installed, else the demo scorer)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--tolerance-mm", type=float, default=None,
                        help="distance from a drawn deposit that counts as on the plaque (default 5)")
    parser.add_argument("--out", type=Path, help="folder for gradcam_cases.csv and gradcam_summary.json")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from ..phantoms.generator import parse_styles
    from ..scoring.gradcam import PLAQUE_TOLERANCE_MM
    from ..scoring.scorer import Scorer

    if args.n < 1:
        raise AACScoreError(f"--n must be at least 1, got {args.n}")
    families = list(parse_styles(args.families))
    scorer = Scorer.from_package(args.scorer, device=args.device)

    def progress(family: str, done: int, total: int) -> None:
        if done % 10 == 0 or done == total:
            print(f"  {family}: {done}/{total}", file=sys.stderr, flush=True)

    tolerance = PLAQUE_TOLERANCE_MM if args.tolerance_mm is None else args.tolerance_mm
    report = gradcam_report(scorer, families, args.n, args.seed, args.out, tolerance, progress=progress)
    print(json.dumps(report, indent=1))
    return 0

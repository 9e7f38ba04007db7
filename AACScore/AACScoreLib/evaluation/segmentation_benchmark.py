"""`aacscore segment-benchmark`: does a segmenter hold beyond what it was trained on?

Counting levels is what fails on radiographs from elsewhere, so the figure that matters is the share of images
with all five levels right, on a phantom family the segmenter never saw (one is held out of all training) and on
images whose sacrum is out of view (each phantom again, cut just below L5, as lumbar-only and DXA views are).
Phantoms are made in memory; per family and set it reports that share, Dice per vertebra, error rows, results
with a wrong level that still said "ok", how the levels were counted, and seconds per image. With the spacing
left unknown, every image is segmented without its pixel spacing, as a PNG or JPEG export comes; with the view
widened, every image is first padded to a wider field of view (a full-spine view, an export padded to landscape);
with a turn, every image is stored turned by that many quarter turns without its PatientOrientation (an export
on its side or upside down), so the segmenter's upright check has to find the turn.
With `--cases`, folders of images with their label maps take the phantoms' place (one row per folder), such as
the lateral radiographs `aacscore ct-radiographs` computes from segmented CT scans: real anatomy.
A benchmark is a command, not a test: its table goes in the README.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import AACScoreError
from ..io.atomic import write_text_atomic
from ..io.radiograph import Radiograph
from ..kauppila import VERTEBRAE
from .metrics import dice_per_label

LEVEL_DICE_RIGHT = 0.5  # a level is right when its Dice with the truth reaches this (a level shift gives ~0)
SACRUM_MARGIN_MM = 2.0  # the sacrum-cropped image ends this far below L5's lowest pixel (half a disc at most)
BENCHMARK_SEED = 9301  # other than the training (1000) and held-out evaluation (9001) seeds of the demo models
SETS = ("full", "sacrum cropped")


def crop_below_l5(radiograph: Radiograph, labels: np.ndarray, margin_mm: float = SACRUM_MARGIN_MM
                  ) -> tuple[Radiograph, np.ndarray]:
    """The radiograph and its label map cut along the image axis nearest the spine's direction, just below L5
    (the sacrum then lies out of view, or only its corner in a tilted spine, as in lumbar-only views)."""
    present = [value for value in range(1, len(VERTEBRAE) + 1) if (labels == value).any()]
    if len(present) < 2 or present[-1] != len(VERTEBRAE):
        raise AACScoreError(f"{radiograph.path}: L5 and another lumbar vertebra must be in view to crop below L5")
    centroids = [np.argwhere(labels == value).mean(axis=0) for value in (present[0], present[-1])]
    down = centroids[1] - centroids[0]
    axis = int(np.argmax(np.abs(down)))
    sign = 1 if down[axis] > 0 else -1
    along = np.argwhere(labels == len(VERTEBRAE))[:, axis]
    spacing = radiograph.spacing[axis] if radiograph.spacing else 0.15
    margin = int(round(margin_mm / spacing))
    size = labels.shape[axis]
    if sign > 0:
        keep = slice(0, min(size, int(along.max()) + margin + 1))
    else:
        keep = slice(max(0, int(along.min()) - margin), size)
    index = (keep, slice(None)) if axis == 0 else (slice(None), keep)
    cropped = replace(radiograph, pixels=np.ascontiguousarray(radiograph.pixels[index]),
                      path=f"{radiograph.path} (sacrum cropped)")
    return cropped, np.ascontiguousarray(labels[index])


def widen_view(radiograph: Radiograph, labels: np.ndarray, factor: float) -> tuple[Radiograph, np.ndarray]:
    """The radiograph and its label map padded on every side with a dark background (the image's 5th percentile)
    to `factor` times their size: a field of view wider than a lumbar view's, as full-spine views and exports padded
    to another shape have."""
    rows, cols = (int(round(size * (factor - 1) / 2)) for size in labels.shape)
    background = float(np.percentile(radiograph.pixels, 5))
    pixels = np.pad(radiograph.pixels, ((rows, rows), (cols, cols)), constant_values=background)
    return replace(radiograph, pixels=pixels, path=f"{radiograph.path} (view widened {factor:g}x)"), np.pad(
        labels, ((rows, rows), (cols, cols)))


def score_case(segmenter, radiograph: Radiograph, truth: np.ndarray) -> dict:
    """One image's outcome: Dice per vertebra, all five levels right, status, how levels were counted, seconds."""
    started = time.perf_counter()
    try:
        result = segmenter.segment(radiograph)
    except AACScoreError as error:
        return {"status": "error", "message": str(error), "dice": [0.0] * len(VERTEBRAE), "all_right": False,
                "levels": None, "turns": None, "seconds": time.perf_counter() - started}
    dice = dice_per_label(truth, result.labels, range(1, len(VERTEBRAE) + 1))
    dice = [0.0 if np.isnan(dice[v]) else round(dice[v], 4) for v in range(1, len(VERTEBRAE) + 1)]
    levels = result.levels
    return {
        "status": result.status, "message": result.message, "dice": dice, "turns": result.turns,
        "all_right": result.status != "error" and min(dice) >= LEVEL_DICE_RIGHT,
        "levels": None if levels is None else {"method": levels.method, "agree": levels.agree,
                                               "confidence": levels.confidence, "doubtful": levels.doubtful},
        "seconds": round(result.seconds, 4),
    }


def summarise(cases: Sequence[dict], stored_turns: int = 0) -> dict:
    """The figures of one set of images (`stored_turns`: the quarter turns every image was stored with)."""
    n = len(cases)
    dice = np.array([case["dice"] for case in cases], dtype=float).reshape(n, len(VERTEBRAE))
    methods: dict[str, int] = {}
    for case in cases:
        method = case["levels"]["method"] if case["levels"] else "none"
        methods[method] = methods.get(method, 0) + 1
    share = (lambda count: round(count / n, 4)) if n else (lambda count: None)
    return {
        "n": n,
        "all_levels_right": share(sum(case["all_right"] for case in cases)),
        "dice_mean": {name: round(float(dice[:, i].mean()), 4) if n else None for i, name in enumerate(VERTEBRAE)},
        "error_rows": share(sum(case["status"] == "error" for case in cases)),
        "warning_rows": share(sum(case["status"] == "warning" for case in cases)),
        "wrong_but_ok": share(sum(case["status"] == "ok" and not case["all_right"] for case in cases)),
        "levels_methods": dict(sorted(methods.items())),
        "segmented_upright": share(sum(case.get("turns") is not None and (case["turns"] + stored_turns) % 4 == 0
                                       for case in cases)),
        "seconds_per_image": round(float(np.mean([case["seconds"] for case in cases])), 3) if n else None,
    }


def run_segmentation_benchmark(segmenter, families: Sequence[str], n: int, seed: int = BENCHMARK_SEED,
                               sacrum_cropped: bool = True, spacing_known: bool = True, widen: float = 1.0,
                               turns: int | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Segment `n` phantoms of each family (made in memory) and, with `sacrum_cropped`, each again cut just below
    L5 (without `spacing_known`, each image without its pixel spacing; with `widen` above 1, each view first padded
    to that many times its size; with `turns`, each stored turned by that many quarter turns, untagged); returns
    the figures per family and set, and every case."""
    from ..phantoms.families import FAMILIES
    from ..phantoms.generator import check_styles, generate_phantom, read_back

    def phantoms(family: str):
        for index in range(n):
            phantom = generate_phantom(seed, family, index)
            yield phantom.name, read_back(phantom), phantom.labels, phantom.truth.get("transitional", "")

    families = check_styles(families)
    trained_on = segmenter.manifest.get("training_data", {}).get("phantoms", {}).get("styles", [])
    groups = {family: phantoms(family) for family in families}
    kinds = {family: {"held_out_family": FAMILIES[family].held_out, "seen_in_training": family in trained_on}
             for family in families}
    return _run_groups(segmenter, groups, kinds, sacrum_cropped, spacing_known, widen, turns, progress,
                       {"trained_on_families": trained_on, "seed": seed, "n_per_family": n})


def run_case_benchmark(segmenter, folders: Sequence[str | Path], sacrum_cropped: bool = True,
                       spacing_known: bool = True, widen: float = 1.0, turns: int | None = None,
                       progress: Callable[[str], None] | None = None) -> dict:
    """The same figures for image and label map pairs on disk (`<name>.<ext>` beside `<name>_labels.png` or
    `<name>.seg.nrrd`; e.g. written by `aacscore ct-radiographs`), one group per folder."""
    from ..segmentation.dataset import load_case, phantom_cases

    groups, sizes = {}, []
    for folder in map(Path, folders):
        cases = phantom_cases(folder) if folder.is_dir() else []
        if not cases:
            raise AACScoreError(f"{folder}: no image with a label map beside it (<name>_labels.png or <name>.seg.nrrd)")
        if folder.name in groups:
            raise AACScoreError(f"{folder}: another folder of the same name is given; rows are named by folder")
        groups[folder.name] = ((image.name, *load_case((image, labels), context=False), "") for image, labels in cases)
        sizes.append(len(cases))
    kinds = {name: {"held_out_family": False, "seen_in_training": False, "from_files": True} for name in groups}
    trained_on = segmenter.manifest.get("training_data", {}).get("phantoms", {}).get("styles", [])
    return _run_groups(segmenter, groups, kinds, sacrum_cropped, spacing_known, widen, turns, progress,
                       {"trained_on_families": trained_on, "seed": None, "n_per_family": sizes,
                        "folders": [str(f) for f in folders]})


def _run_groups(segmenter, groups: dict, kinds: dict, sacrum_cropped: bool, spacing_known: bool, widen: float,
                turns: int | None, progress: Callable[[str], None] | None, header: dict) -> dict:
    """Segment every (name, radiograph, truth, transitional) of every group in each set; the benchmark's figures."""
    from ..segmentation.segmenter import turned

    results, cases = {}, []
    for group, items in groups.items():
        by_set: dict[str, list[dict]] = {name: [] for name in (SETS if sacrum_cropped else SETS[:1])}
        for index, (name, radiograph, truth, transitional) in enumerate(items):
            if widen > 1:
                radiograph, truth = widen_view(radiograph, truth, widen)
            if not cases and index == 0:
                segmenter.segment(radiograph)  # warm-up: the first call pays for lazy initialisation
            images = {"full": (radiograph, truth)}
            if sacrum_cropped:
                images["sacrum cropped"] = crop_below_l5(radiograph, truth)
            for set_name, (image, labels) in images.items():
                image = image if spacing_known else replace(image, spacing=None, spacing_source="unknown")
                if turns is not None:
                    image, labels = turned(image, turns), np.rot90(labels, turns)
                case = {"family": group, "set": set_name, "name": name, "transitional": transitional,
                        **score_case(segmenter, image, labels)}
                by_set[set_name].append(case)
                cases.append(case)
            if progress:
                progress(f"{group} {index + 1}")
        results[group] = {**kinds[group],
                          **{set_name: summarise(items, turns or 0) for set_name, items in by_set.items()}}
    return {
        "segmenter": f"{segmenter.manifest.get('name')}=={segmenter.manifest.get('version')}",
        "classes": list(segmenter.classes), **header,
        "level_right_if_dice_at_least": LEVEL_DICE_RIGHT, "sacrum_margin_mm": SACRUM_MARGIN_MM,
        "spacing": "known" if spacing_known else "unknown", "view_widened": widen, "stored_turns": turns,
        "upright_check": None if segmenter.upright is None else
        f"{segmenter.upright.package.name}=={segmenter.upright.package.version}",
        "device": str(segmenter.device),
        "families": results,
        "cases": cases,
    }


def format_table(figures: dict) -> str:
    """The README table: one row per family and set."""
    turned = figures.get("stored_turns") is not None
    lines = [f"Segmenter {figures['segmenter']} (classes {', '.join(figures['classes'])}; trained on "
             f"{', '.join(figures['trained_on_families']) or 'no phantom family recorded'}), "
             + (f"images and label maps from {', '.join(figures['folders'])}" if figures.get("folders") else
                f"{figures['n_per_family']} phantoms per family, seed {figures['seed']}") + f", {figures['device']}"
             + (f", each view padded to {figures['view_widened']:g} times its size"
                if figures.get("view_widened", 1) > 1 else "")
             + (f", each image stored turned by {figures['stored_turns']} quarter turn(s) (numpy.rot90) without "
                f"PatientOrientation, upright check {figures.get('upright_check') or 'off'}"
                if figures.get("stored_turns") is not None else "")
             + (", pixel spacing withheld from the segmenter." if figures.get("spacing") == "unknown" else "."), "",
             "| family | set | n | all 5 levels right | Dice L1 / L2 / L3 / L4 / L5 | error rows | wrong but ok "
             "| levels counted by | s / image |" + (" segmented upright |" if turned else ""),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if turned else "")]
    for family, entry in figures["families"].items():
        label = family + (" (held out)" if entry["held_out_family"] else "" if entry["seen_in_training"] or
                          entry.get("from_files") else " (not trained on)")
        for name in SETS:
            if name not in entry:
                continue
            s = entry[name]
            dice = " / ".join(f"{s['dice_mean'][v]:.3f}" for v in VERTEBRAE)
            methods = ", ".join(f"{m} {c}" for m, c in s["levels_methods"].items())
            lines.append(f"| {label} | {name} | {s['n']} | {s['all_levels_right']:.0%} | {dice} | "
                         f"{s['error_rows']:.0%} | {s['wrong_but_ok']:.0%} | {methods} | "
                         f"{s['seconds_per_image']:.2f} |" + (f" {s['segmented_upright']:.0%} |" if turned else ""))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- command line


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "segment-benchmark", help="how a segmenter generalises: unseen phantom families, sacrum out of view",
        description="Segment phantoms of each family (made in memory), or the images of --cases folders, and the "
                    "same images cut just below L5; "
                    "write segment_benchmark.json and segment_benchmark.md (share with all five levels right, "
                    "Dice per vertebra, error rows, wrong-but-ok rows, how levels were counted, s/image) to --out.")
    parser.add_argument("--families", default=None,
                        help="comma-separated phantom families (default: all; see aacscore phantoms --list-families)")
    parser.add_argument("--cases", nargs="+", default=None, metavar="DIR",
                        help="instead of phantoms: folders of images with <name>_labels.png beside them (e.g. from "
                             "aacscore ct-radiographs), one row per folder")
    parser.add_argument("--n", type=int, default=100, help="phantoms per family")
    parser.add_argument("--seed", type=int, default=BENCHMARK_SEED)
    parser.add_argument("--model", default=None, help="segmenter package name or path (default: newest installed)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--no-sacrum-cropped", action="store_true", help="skip the sacrum-cropped set")
    parser.add_argument("--spacing", choices=("known", "unknown"), default="known",
                        help="unknown: segment every image without its pixel spacing, as PNG/JPEG exports come")
    parser.add_argument("--widen", type=float, default=1.0,
                        help="pad every view to this many times its size (a full-spine or padded export's wider view)")
    parser.add_argument("--turn", type=int, choices=range(4), default=None, metavar="K",
                        help="store every image turned by K quarter turns (numpy.rot90) without PatientOrientation; "
                             "0: upright but untagged")
    parser.add_argument("--no-upright-check", action="store_true",
                        help="segment without the upright check (untagged images are taken as upright)")
    parser.add_argument("--out", required=True, help="folder for the JSON and markdown table")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from ..phantoms.generator import STYLES, parse_styles
    from ..segmentation.segmenter import Segmenter

    if args.n < 1:
        raise AACScoreError(f"--n must be at least 1, not {args.n}")
    if not 1 <= args.widen <= 4:
        raise AACScoreError(f"--widen must be between 1 and 4, not {args.widen:g}")
    if args.cases and args.families:
        raise AACScoreError("give --cases or --families, not both")
    families = parse_styles(args.families) if args.families else STYLES
    segmenter = Segmenter.from_package(args.model, args.device, upright=None if args.no_upright_check else "auto")
    settings = dict(sacrum_cropped=not args.no_sacrum_cropped, spacing_known=args.spacing == "known",
                    widen=args.widen, turns=args.turn, progress=lambda text: print(text, end="\r", flush=True))
    if args.cases:
        figures = run_case_benchmark(segmenter, args.cases, **settings)
    else:
        figures = run_segmentation_benchmark(segmenter, families, args.n, args.seed, **settings)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "segment_benchmark.json", json.dumps(figures, indent=2) + "\n")
    table = format_table(figures)
    write_text_atomic(out / "segment_benchmark.md", table)
    print("\n" + table)
    return 0

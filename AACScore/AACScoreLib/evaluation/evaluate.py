"""`aacscore evaluate`: compare predicted AAC-24 scores (and label maps) with truth; print and save the report.

Reads the CSVs that `aacscore score` and `aacscore phantoms` write, pairs rows by file name, and hands the
numbers to `metrics`. Rows a run could not score are listed as excluded, never dropped silently; rows scored but
flagged for review count in the statistics. When the predictions carry QC columns, the report also says how
many wrong results QC flagged (wrong: |error| > 4, or a vertebra whose level is wrong, i.e. Dice < 0.5 against
the truth label map) and how many right ones, and how often the prediction interval held the truth.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import metrics
from ..io.atomic import atomic_path, write_text_atomic
from ..errors import AACScoreError, GeometryError, OutputError
from ..kauppila import CATEGORIES, CATEGORY_RANGES, MAX_SUBSCORE, MAX_TOTAL, SUBSCORE_COLUMNS, VERTEBRAE
from ..io.cohort import OUTPUT_HASH_DIGITS, csv_text
from ..io.labelmaps import read_label_map
from ..qc.verdict import SCORE_UNCERTAIN, SEGMENTER_NOTE, kinds_of, reason_codes

LABEL_MAP_SUFFIXES = (".png", ".nrrd")
METRIC_NAMES: dict[str, str] = {
    "mae": "MAE", "mse": "MSE", "rmse": "RMSE", "pearson_r": "Pearson r", "spearman_rho": "Spearman ρ",
    "r2": "R² (1 − SS_res/SS_tot)", "icc_2_1": "ICC(2,1)", "kappa_linear": "Weighted κ (linear)",
    "kappa_quadratic": "Weighted κ (quadratic)", "within_4": "Share with abs. error < 4",
}
PLOT_FILES = ("scatter.png", "bland_altman.png", "confusion_matrix.png")
WRONG_ERROR = 4.0  # |prediction - truth| above this makes a result wrong
WRONG_LEVEL_DICE = 0.5  # a vertebra below this Dice against the truth map is at the wrong level (or missing)
FLAGGED = ("review", "error")
MAX_LISTED = 20  # wrong results passed as ok named in the report (metrics.json lists them all)


@dataclass
class PairedScores:
    """Truth and prediction for the cases both CSVs scored, in truth-CSV order, plus what was left out and why."""
    files: list[str]
    truth: np.ndarray
    pred: np.ndarray
    excluded: list[dict[str, str]] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)  # the prediction's status per compared case
    truth_subscores: np.ndarray | None = None  # (n, 8) in SUBSCORE_COLUMNS order when both CSVs have them
    pred_subscores: np.ndarray | None = None
    subscore_note: str = ""


def read_scores_csv(path: str | Path) -> list[dict[str, str]]:
    """Rows of a score CSV as dicts; it must have `file` and `aac24` columns and unique file names."""
    path = Path(path)
    try:
        reader = csv.DictReader(io.StringIO(csv_text(path), newline=""))
        columns = [c.strip() for c in reader.fieldnames or []]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items() if not isinstance(v, list)}
                for row in reader]
    except (OSError, csv.Error) as error:
        raise AACScoreError(f"{path}: cannot read CSV: {error}") from error
    missing = [c for c in ("file", "aac24") if c not in columns]
    if missing:
        raise AACScoreError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(columns) or 'none'})")
    seen: set[str] = set()
    for row in rows:
        if row["file"] in seen:
            raise AACScoreError(f"{path}: file {row['file']!r} appears more than once")
        seen.add(row["file"])
    return rows


def _basename(name: str) -> str:
    return re.split(r"[\\/]", name)[-1]


def _listing(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "")


def _pair_rows(truth_rows: list[dict], pred_rows: list[dict], truth_path: Path, pred_path: Path) -> list[tuple]:
    """(truth row, pred row) for every file: exact `file` match first, then by base name; any leftover is an error."""
    pred_by_file = {row["file"]: row for row in pred_rows}
    pairs: dict[str, dict] = {}
    for row in truth_rows:
        if row["file"] in pred_by_file:
            pairs[row["file"]] = pred_by_file.pop(row["file"])
    by_base: dict[str, list[dict]] = {}
    for row in pred_by_file.values():
        by_base.setdefault(_basename(row["file"]), []).append(row)
    truth_left = [row for row in truth_rows if row["file"] not in pairs]
    truth_bases = Counter(_basename(row["file"]) for row in truth_left)
    for row in truth_left:
        base = _basename(row["file"])
        candidates = by_base.get(base, [])
        if len(candidates) > 1 or truth_bases[base] > 1:
            raise AACScoreError(f"file name {base!r} is ambiguous: it matches several rows in "
                                f"{truth_path} or {pred_path}")
        if candidates:
            pairs[row["file"]] = candidates.pop()
    unmatched_truth = [row["file"] for row in truth_rows if row["file"] not in pairs]
    unmatched_pred = [row["file"] for rows in by_base.values() for row in rows]
    if unmatched_truth or unmatched_pred:
        problems = []
        if unmatched_truth:
            problems.append(f"{len(unmatched_truth)} file(s) in {truth_path} have no row in {pred_path}: "
                            f"{_listing(unmatched_truth)}")
        if unmatched_pred:
            problems.append(f"{len(unmatched_pred)} file(s) in {pred_path} have no row in {truth_path}: "
                            f"{_listing(unmatched_pred)}")
        raise AACScoreError("the CSVs do not list the same files; " + "; ".join(problems))
    return [(row, pairs[row["file"]]) for row in truth_rows]


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _exclusion_reason(truth_row: dict, pred_row: dict) -> str | None:
    if _number(truth_row["aac24"]) is None:
        return f"no usable truth score ({truth_row['aac24']!r})"
    status = (pred_row.get("status") or "ok").lower()
    if status == "error":
        message = pred_row.get("message", "")
        return f"prediction status {status!r}" + (f": {message}" if message else "")
    if _number(pred_row["aac24"]) is None:
        return f"no usable predicted score ({pred_row['aac24']!r})"
    return None


def impossible_values(path: Path, rows: list[dict[str, str]], totals_are_sums: bool) -> None:
    """Refuse scores no reader could give: AAC-24 outside 0..24, a subscore outside 0..3, and (for truth) a
    total that is not the sum of its eight subscores; one line naming the file, the first cases and the values."""
    problems = []
    for row in rows:
        total = _number(row.get("aac24", ""))
        if total is not None and not 0 <= total <= MAX_TOTAL:
            problems.append(f"{row['file']}: aac24 {row['aac24']} is outside 0..{MAX_TOTAL}")
        subscores = [_number(row.get(column, "")) for column in SUBSCORE_COLUMNS]
        for column, value in zip(SUBSCORE_COLUMNS, subscores):
            if value is not None and not 0 <= value <= MAX_SUBSCORE:
                problems.append(f"{row['file']}: {column} {row[column]} is outside 0..{MAX_SUBSCORE}")
        if totals_are_sums and total is not None and all(v is not None for v in subscores) \
                and abs(sum(subscores) - total) > 0.01:
            problems.append(f"{row['file']}: aac24 {row['aac24']} is not the sum of its subscores ({sum(subscores):g})")
    if problems:
        raise AACScoreError(f"{path}: {len(problems)} impossible value(s): {_listing(problems, 3)}")


def match_scores(truth_path: str | Path, pred_path: str | Path) -> PairedScores:
    """Read both CSVs, pair their rows by file, and split off the rows that cannot be compared. Every scored row
    counts whatever its status (ok, warning, review); impossible values are refused."""
    truth_path, pred_path = Path(truth_path), Path(pred_path)
    truth_rows, pred_rows = read_scores_csv(truth_path), read_scores_csv(pred_path)
    impossible_values(truth_path, truth_rows, totals_are_sums=True)
    impossible_values(pred_path, pred_rows, totals_are_sums=False)  # a model's total comes from its own head
    files, truth, pred, excluded, kept, statuses = [], [], [], [], [], []
    for truth_row, pred_row in _pair_rows(truth_rows, pred_rows, truth_path, pred_path):
        reason = _exclusion_reason(truth_row, pred_row)
        if reason:
            excluded.append({"file": truth_row["file"], "reason": reason})
            continue
        files.append(truth_row["file"])
        truth.append(_number(truth_row["aac24"]))
        pred.append(_number(pred_row["aac24"]))
        kept.append((truth_row, pred_row))
        statuses.append((pred_row.get("status") or "ok").lower())
    paired = PairedScores(files, np.array(truth, dtype=float), np.array(pred, dtype=float), excluded, statuses)
    _attach_subscores(paired, kept)
    return paired


def _attach_subscores(paired: PairedScores, kept: list[tuple[dict, dict]]) -> None:
    """Per-wall subscores are compared only when both CSVs have all eight columns filled for every kept row."""
    if not kept or not all(c in kept[0][0] and c in kept[0][1] for c in SUBSCORE_COLUMNS):
        paired.subscore_note = "subscore columns L1A..L4P are not in both CSVs"
        return
    values = np.array([[[_number(row[c]) for c in SUBSCORE_COLUMNS] for row in pair] for pair in kept], dtype=object)
    incomplete = [paired.files[i] for i in range(len(kept)) if any(v is None for v in values[i].ravel())]
    if len(incomplete) == len(kept):
        paired.subscore_note = "subscore columns L1A..L4P are empty"
        return
    if incomplete:
        paired.subscore_note = f"subscores missing for {len(incomplete)} case(s), e.g. {_listing(incomplete, 3)}"
        return
    paired.truth_subscores = values[:, 0].astype(float)
    paired.pred_subscores = values[:, 1].astype(float)


def subscore_agreement(truth: np.ndarray, pred: np.ndarray) -> dict[str, dict]:
    """Per wall (L1A..L4P): MAE, and agreement on the 0..3 subscore scale (ICC(2,1), weighted kappas, exact)."""
    result = {}
    for index, column in enumerate(SUBSCORE_COLUMNS):
        t, p = truth[:, index], pred[:, index]
        result[column] = {"mae": float(np.mean(np.abs(p - t))), **metrics.agreement(t, p, labels=range(4))}
    return result


# ---------------------------------------------------------------- label maps

def _label_stem(path: Path) -> str:
    stem = path.name[: -len(path.suffix)]
    return re.sub(r"[_.\-]*labels?[_.\-]*", "_", stem, count=1).strip("_") or stem


def find_label_maps(folder: str | Path) -> dict[str, Path]:
    """Label maps in a folder (PNG or NRRD files whose names contain "labels"), keyed by their image's stem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AACScoreError(f"{folder}: label map folder does not exist")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in LABEL_MAP_SUFFIXES and "label" in path.name.lower():
            stem = _label_stem(path)
            if stem in found:
                raise AACScoreError(f"{folder}: two label maps for {stem!r}: {found[stem].name} and {path.name}")
            found[stem] = path
    return found


def _without_path_hashes(pred_maps: dict[str, Path], truth_maps: dict[str, Path]) -> dict[str, Path]:
    """`aacscore score` names its label maps `<name>-<8 hex digits of the input's path hash>_labels.png`: such a map
    is matched to the truth `<name>` when no map has that exact name and only one has that name and a hash."""
    bases: dict[str, list[str]] = {}
    for stem in pred_maps:
        match = re.fullmatch(rf"(.+)-[0-9a-f]{{{OUTPUT_HASH_DIGITS}}}", stem)
        if match and match.group(1) in truth_maps and match.group(1) not in pred_maps:
            bases.setdefault(match.group(1), []).append(stem)
    renamed = dict(pred_maps)
    for base, stems in bases.items():
        if len(stems) == 1:
            renamed[base] = renamed.pop(stems[0])
    return renamed


def dice_by_vertebra(truth_folder: str | Path, pred_folder: str | Path) -> dict:
    """Dice of L1..L5 for every label map present in both folders (matched by stem), with mean and SD."""
    truth_maps = find_label_maps(truth_folder)
    pred_maps = _without_path_hashes(find_label_maps(pred_folder), truth_maps)
    stems = sorted(set(truth_maps) & set(pred_maps))
    if not stems:
        raise AACScoreError(f"no label maps match by name between {truth_folder} ({len(truth_maps)} found) "
                            f"and {pred_folder} ({len(pred_maps)} found)")
    cases = {}
    for stem in stems:
        truth_map, pred_map = read_label_map(truth_maps[stem]), read_label_map(pred_maps[stem])
        if truth_map.shape != pred_map.shape:
            raise GeometryError(f"{pred_maps[stem]}: label map shape {pred_map.shape} differs from the truth "
                                f"{truth_maps[stem].name} {truth_map.shape}")
        scores = metrics.dice_per_label(truth_map, pred_map, range(1, len(VERTEBRAE) + 1))
        cases[stem] = {name: scores[i + 1] for i, name in enumerate(VERTEBRAE)}
    summary = {}
    for name in VERTEBRAE:
        values = np.array([case[name] for case in cases.values()], dtype=float)
        values = values[np.isfinite(values)]
        summary[name] = {"mean": float(values.mean()) if values.size else math.nan,
                         "sd": float(values.std(ddof=1)) if values.size > 1 else math.nan, "n": int(values.size)}
    return {"n": len(stems), "per_vertebra": summary, "cases": cases,
            "unmatched_truth": sorted(set(truth_maps) - set(pred_maps)),
            "unmatched_pred": sorted(set(pred_maps) - set(truth_maps))}


# ---------------------------------------------------------------- quality control

REASON_COUNTS = ("wrong", "right", "wrong_alone", "right_alone")  # results each kind of check flagged, and alone


def _fraction(part: int, whole: int) -> dict:
    return {"flagged": part, "n": whole, "share": part / whole if whole else math.nan}


def qc_figures(truth_csv: str | Path, pred_csv: str | Path, dice: dict | None = None) -> dict | None:
    """Which results were wrong, which QC flagged, and the interval's coverage; None without a `qc` column.

    A row QC could not score (qc "error") counts as a wrong result, flagged. With label maps (`dice` from
    dice_by_vertebra) a result is also wrong when any vertebra's Dice is below WRONG_LEVEL_DICE."""
    truth_path, pred_path = Path(truth_csv), Path(pred_csv)
    truth_rows, pred_rows = read_scores_csv(truth_path), read_scores_csv(pred_path)
    if not pred_rows or "qc" not in pred_rows[0] or not any(row["qc"] for row in pred_rows):
        return None
    cases = (dice or {}).get("cases", {})
    counts = {"wrong": [0, 0], "right": [0, 0]}
    why = Counter()
    covered = with_interval = unchecked = 0
    flagged_codes = Counter()
    by_reason: dict[str, Counter] = {}
    missed = []
    for truth_row, pred_row in _pair_rows(truth_rows, pred_rows, truth_path, pred_path):
        qc, truth, pred = pred_row["qc"].lower(), _number(truth_row["aac24"]), _number(pred_row["aac24"])
        if truth is None or not qc:
            unchecked += 1
            continue
        scores = cases.get(Path(_basename(truth_row["file"])).stem)
        level_wrong = scores is not None and any(not (v >= WRONG_LEVEL_DICE) for v in scores.values())
        score_wrong = pred is None or abs(pred - truth) > WRONG_ERROR
        kind = "wrong" if (qc == "error" or level_wrong or score_wrong) else "right"
        counts[kind][0] += qc in FLAGGED
        counts[kind][1] += 1
        if kind == "wrong":
            why.update(["not scored" if qc == "error" else "level wrong" if level_wrong else "|error| > 4"])
        if qc in FLAGGED:
            codes = reason_codes(pred_row.get("qc_reasons", "")) or ["(none given)"]
            flagged_codes.update(codes)
            kinds = kinds_of(codes)
            for code in kinds:
                by_reason.setdefault(code, Counter()).update([kind] + ([f"{kind}_alone"] if len(kinds) == 1 else []))
        elif kind == "wrong":
            missed.append({"file": _basename(truth_row["file"]), "error": round(pred - truth, 3),
                           "level_wrong": level_wrong})
        low, high = _number(pred_row.get("aac24_low", "")), _number(pred_row.get("aac24_high", ""))
        if low is not None and high is not None:
            with_interval += 1
            covered += low <= truth <= high
    return {"wrong": _fraction(*counts["wrong"]), "right": _fraction(*counts["right"]),
            "wrong_because": dict(why), "levels_checked": bool(cases), "reason_codes": dict(flagged_codes.most_common()),
            "by_reason": {code: {key: counts[key] for key in REASON_COUNTS}
                          for code, counts in sorted(by_reason.items(), key=lambda item: -sum(item[1].values()))},
            "wrong_not_flagged": missed,
            "interval": {"covered": covered, "n": with_interval,
                         "coverage": covered / with_interval if with_interval else math.nan},
            "without_qc": unchecked}


# ---------------------------------------------------------------- the whole evaluation

def evaluate(truth_csv: str | Path, pred_csv: str | Path, out_dir: str | Path | None = None,
             labels_truth: str | Path | None = None, labels_pred: str | Path | None = None,
             bootstrap: int = 1000, seed: int = 0) -> dict:
    """Compute every statistic; with `out_dir`, write metrics.json, report.md and the plots there. Returns the
    results dict (as saved in metrics.json) with the Markdown report under "report"."""
    if (labels_truth is None) != (labels_pred is None):
        raise AACScoreError("give both --labels-truth and --labels-pred, or neither")
    if bootstrap < 0:
        raise AACScoreError(f"--bootstrap must be 0 or more, got {bootstrap}")
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise OutputError(f"{out_dir}: exists and is not a folder; --out needs a folder")
    paired = match_scores(truth_csv, pred_csv)
    if paired.truth.size < 2:
        raise AACScoreError(f"only {paired.truth.size} case(s) can be compared after excluding "
                            f"{len(paired.excluded)}; need at least 2")
    results = {
        "truth_csv": str(truth_csv), "pred_csv": str(pred_csv),
        **metrics.evaluate_scores(paired.truth, paired.pred, bootstrap=bootstrap, seed=seed),
        "excluded": paired.excluded,
        "by_status": _by_status(paired),
        "cases": [{"file": f, "truth": t, "pred": p, "status": s}
                  for f, t, p, s in zip(paired.files, paired.truth, paired.pred, paired.statuses)],
    }
    if paired.truth_subscores is not None:
        results["subscores"] = subscore_agreement(paired.truth_subscores, paired.pred_subscores)
    else:
        results["subscores_note"] = paired.subscore_note
    if labels_truth is not None:
        results["dice"] = dice_by_vertebra(labels_truth, labels_pred)
    quality = qc_figures(truth_csv, pred_csv, results.get("dice"))
    if quality is not None:
        results["qc"] = quality
    if out_dir is not None:
        out = Path(out_dir)
        results["outputs"] = [str(out / name) for name in ("metrics.json", "report.md", *PLOT_FILES)]
    results["report"] = format_report(results)
    if out_dir is not None:
        numbers = {key: value for key, value in results.items() if key != "report"}
        try:
            out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(out / "metrics.json", json.dumps(_json_safe(numbers), indent=2, allow_nan=False) + "\n")
            write_text_atomic(out / "report.md", results["report"])
            write_plots(paired.truth, paired.pred, results, out)
        except OSError as error:
            where = error.filename or out
            raise OutputError(f"{where}: cannot write the evaluation there ({error.strerror or error})") from None
    return results


def _by_status(paired: PairedScores) -> dict[str, dict]:
    """Cases and MAE per prediction status, so that 'warning' or 'review' rows can be judged apart."""
    statuses = np.array(paired.statuses)
    return {status: {"n": int((statuses == status).sum()),
                     "mae": float(np.mean(np.abs(paired.pred - paired.truth)[statuses == status]))}
            for status in sorted(set(paired.statuses))}


def _json_safe(value):
    """NaN and infinity become null: JSON has no such numbers."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


# ---------------------------------------------------------------- report

def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _p(value: float | None) -> str:
    if value is None:
        return ""
    if not math.isfinite(value):
        return "n/a"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _percent(entry: dict) -> str:
    if not math.isfinite(entry["value"]):
        return "n/a"
    return (f"{100 * entry['value']:.1f} ({100 * entry['ci_low']:.1f}–{100 * entry['ci_high']:.1f}) "
            f"{entry['successes']}/{entry['total']}")


def _status_counts(results: dict) -> str:
    return ", ".join(f"{status} {entry['n']}, MAE {_fmt(entry['mae'], 2)}"
                     for status, entry in results.get("by_status", {}).items()) or "none"

def _qc_report(quality: dict) -> list[str]:
    wrong, right, interval = quality["wrong"], quality["right"], quality["interval"]

    def share(entry: dict) -> str:
        return f"{entry['flagged']}/{entry['n']}" + (f" ({100 * entry['share']:.1f}%)" if entry["n"] else "")

    definition = ("|error| > 4, a vertebra at the wrong level (Dice < 0.5 against the truth map), or not scored"
                  if quality["levels_checked"] else "|error| > 4 or not scored (give label maps to check levels)")
    lines = ["## Quality control", "", f"Wrong result: {definition}.", "",
             "| Results | Flagged review/error |", "|---|---|",
             f"| wrong | {share(wrong)} |", f"| right | {share(right)} |", ""]
    if quality["wrong_because"]:
        lines.append("Wrong because: " + ", ".join(f"{k} {v}" for k, v in quality["wrong_because"].items()) + ".  ")
    if quality["by_reason"]:  # which checks flag what: the ones that flag right results alone cost the most review
        lines += ["", "| Reason | wrong results it flagged | right results it flagged | wrong, no other reason | "
                      "right, no other reason |", "|---|---|---|---|---|"]
        lines += [f"| {code} | " + " | ".join(str(counts[key]) for key in REASON_COUNTS) + " |"
                  for code, counts in quality["by_reason"].items()]
        lines += ["", f"(`{SCORE_UNCERTAIN}` follows from the others and is left out; `{SEGMENTER_NOTE}` counts only "
                      "when it stands alone.)", ""]
    missed = quality["wrong_not_flagged"]
    if missed:
        named = ", ".join(f"{case['file']} ({case['error']:+.1f}{', level wrong' if case['level_wrong'] else ''})"
                          for case in missed[:MAX_LISTED])
        more = f" and {len(missed) - MAX_LISTED} more" if len(missed) > MAX_LISTED else ""
        lines.append(f"Wrong results passed as ok: {named}{more}.  ")
    lines.append(f"Prediction interval held the truth in {interval['covered']}/{interval['n']} "
                 + (f"({100 * interval['coverage']:.1f}%) " if interval["n"] else "") + "of the results that have one.")
    if quality["without_qc"]:
        lines[-1] += "  "
        lines.append(f"{quality['without_qc']} row(s) carry no QC verdict or no truth and are not counted.")
    return lines + [""]


def format_report(results: dict) -> str:
    """The Markdown report (also what the command prints): tables readable as plain text too."""
    n, m = results["n"], results["metrics"]
    boot = results["bootstrap"]
    lines = ["# AAC-24 evaluation", "",
             f"Truth: `{results['truth_csv']}`  ", f"Predictions: `{results['pred_csv']}`  ",
             f"Cases compared: {n} ({_status_counts(results)}); excluded: {len(results['excluded'])}", "",
             "## Total score", "",
             "| Metric | Value | 95% CI | p |", "|---|---|---|---|"]
    for key, label in METRIC_NAMES.items():
        entry = m[key]
        ci = f"{_fmt(entry.get('ci_low'))} – {_fmt(entry.get('ci_high'))}" if "ci_low" in entry else "—"
        lines.append(f"| {label} | {_fmt(entry['value'])} | {ci} | {_p(entry.get('p'))} |")
    icc = m["icc_2_1"]
    bias = results["bias"]
    lines += ["",
              f"ICC(2,1) analytic 95% CI (McGraw & Wong 1996): {_fmt(icc['analytic_ci_low'])} – "
              f"{_fmt(icc['analytic_ci_high'])} (F = {_fmt(icc['f'], 2)}).  ",
              f"Bias (prediction − truth): mean {_fmt(bias['mean_difference'], 2)}, "
              f"SD {_fmt(bias['sd_difference'], 2)}, "
              f"limits of agreement {_fmt(bias['loa_low'], 2)} to {_fmt(bias['loa_high'], 2)}.", ""]
    cats = results["categories"]
    names = [f"{c} ({CATEGORY_RANGES[c][0]}–{CATEGORY_RANGES[c][1]})" for c in CATEGORIES]
    lines += ["## Severity categories", "", "Rows: truth; columns: prediction.", "",
              "| truth \\ predicted | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {names[i]} | " + " | ".join(str(v) for v in row) + " |" for i, row in enumerate(cats["matrix"])]
    lines += ["", f"Overall accuracy: {_percent(cats['accuracy'])}", "",
              "Per category, % (95% Wilson CI) successes/total:", "",
              "| Category | n | Sensitivity | Specificity | PPV | NPV | Accuracy |", "|---|---|---|---|---|---|---|"]
    for name, entry in cats["per_class"].items():
        cells = [_percent(entry[k]) for k in ("sensitivity", "specificity", "ppv", "npv", "accuracy")]
        lines.append(f"| {name} | {entry['n_truth']} | " + " | ".join(cells) + " |")
    lines.append("")
    if "subscores" in results:
        lines += ["## Wall subscores (0–3)", "",
                  "| Wall | MAE | Exact agreement | Weighted κ (linear) | ICC(2,1) |", "|---|---|---|---|---|"]
        for column, entry in results["subscores"].items():
            lines.append(f"| {column} | {_fmt(entry['mae'])} | {_fmt(entry['exact_agreement'])} | "
                         f"{_fmt(entry['kappa_linear'])} | {_fmt(entry['icc_2_1'])} |")
        lines.append("")
    else:
        lines += [f"Wall subscores not compared: {results['subscores_note']}.", ""]
    if "dice" in results:
        dice = results["dice"]
        lines += ["## Vertebra segmentation (Dice)", "", f"Label maps compared: {dice['n']}", "",
                  "| Vertebra | Mean | SD | n |", "|---|---|---|---|"]
        lines += [f"| {v} | {_fmt(s['mean'])} | {_fmt(s['sd'])} | {s['n']} |" for v, s in dice["per_vertebra"].items()]
        for side in ("truth", "pred"):
            if dice[f"unmatched_{side}"]:
                lines.append(f"\nLabel maps only in the {side} folder: {_listing(dice[f'unmatched_{side}'])}")
        lines.append("")
    if "qc" in results:
        lines += _qc_report(results["qc"])
    if results["excluded"]:
        lines += ["## Excluded cases", "", "| File | Reason |", "|---|---|"]
        lines += [f"| {row['file']} | {row['reason'].replace('|', '/')} |" for row in results["excluded"]]
        lines.append("")
    ci_note = (f"percentile bootstrap, {boot['resamples']} resamples of the test cases with replacement, seed "
               f"{boot['seed']}. The paper's CIs come from retraining the model on resampled training sets; these "
               "reflect only which test cases were drawn, not training variability"
               if boot["resamples"] else "not computed (--bootstrap 0)")
    lines += ["## Notes", "",
              f"- 95% CIs of the total-score metrics: {ci_note}.",
              f"- Weighted κ uses the integer scores 0–{MAX_TOTAL} as its category set; predictions are rounded "
              f"(half to even) and clipped to 0–{MAX_TOTAL} for κ and the severity categories. MAE, MSE, "
              "correlations, R² and ICC use the unrounded values.",
              "- R² is 1 − SS_res/SS_tot of the predictions against the truth (not the squared correlation).",
              "- ICC(2,1): two-way random effects, absolute agreement, single rater (Shrout & Fleiss 1979).",
              "- Per-category metrics treat each category against the other two; their CIs are Wilson intervals."]
    if "outputs" in results:
        lines.append("- Files: " + ", ".join(f"`{Path(p).name}`" for p in results["outputs"]))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots

def write_plots(truth: np.ndarray, pred: np.ndarray, results: dict, out_dir: str | Path) -> list[Path]:
    """Scatter with identity line, Bland–Altman, and the confusion-matrix heatmap, as PNGs (Agg, no display).

    `results` is what `metrics.evaluate_scores` returned for these scores (its bias and confusion matrix)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def save(figure: Figure, name: str) -> Path:
        FigureCanvasAgg(figure)
        path = Path(out_dir) / name
        with atomic_path(path) as temporary:
            figure.savefig(temporary, format="png", dpi=120, bbox_inches="tight")
        return path

    low = min(0.0, float(truth.min()), float(pred.min())) - 1
    high = max(float(MAX_TOTAL), float(truth.max()), float(pred.max())) + 1
    figure = Figure(figsize=(5, 5))
    axes = figure.add_subplot()
    for boundary in (CATEGORY_RANGES["no/mild"][1] + 0.5, CATEGORY_RANGES["moderate"][1] + 0.5):
        axes.axvline(boundary, color="0.85", lw=0.8)
        axes.axhline(boundary, color="0.85", lw=0.8)
    axes.plot([low, high], [low, high], "k--", lw=1, label="identity")
    axes.scatter(truth, pred, s=14, alpha=0.6)
    axes.set(xlim=(low, high), ylim=(low, high), xlabel="truth AAC-24", ylabel="predicted AAC-24",
             title=f"Prediction vs truth (n = {truth.size})", aspect="equal")
    axes.legend(loc="upper left")
    paths = [save(figure, PLOT_FILES[0])]

    bias = results["bias"]
    figure = Figure(figsize=(6, 4))
    axes = figure.add_subplot()
    axes.scatter((truth + pred) / 2, pred - truth, s=14, alpha=0.6)
    axes.axhline(bias["mean_difference"], color="k", lw=1, label=f"mean {bias['mean_difference']:.2f}")
    for limit in (bias["loa_low"], bias["loa_high"]):
        axes.axhline(limit, color="k", ls="--", lw=1)
    axes.plot([], [], "k--", lw=1, label=f"±1.96 SD ({bias['loa_low']:.2f}, {bias['loa_high']:.2f})")
    axes.set(xlabel="mean of truth and prediction", ylabel="prediction − truth", title="Bland–Altman")
    axes.legend(loc="best", fontsize=8)
    paths.append(save(figure, PLOT_FILES[1]))

    matrix = np.array(results["categories"]["matrix"])
    figure = Figure(figsize=(5, 4.5))
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues")
    for (row, col), count in np.ndenumerate(matrix):
        axes.text(col, row, str(count), ha="center", va="center",
                  color="white" if count > matrix.max() / 2 else "black")
    ticks = range(len(CATEGORIES))
    axes.set(xticks=ticks, yticks=ticks, xticklabels=CATEGORIES, yticklabels=CATEGORIES,
             xlabel="predicted", ylabel="truth", title="Severity categories")
    figure.colorbar(image, ax=axes)
    paths.append(save(figure, PLOT_FILES[2]))
    return paths


# ---------------------------------------------------------------- command line

def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="compare predicted AAC-24 scores with truth (paper's statistics, Dice)",
        description="Compare predicted AAC-24 scores (and optionally vertebra label maps) with truth.")
    parser.add_argument("--truth", required=True, help="truth CSV with columns file, aac24 (and L1A..L4P)")
    parser.add_argument("--pred", required=True, help="prediction CSV (e.g. results.csv of `aacscore score`)")
    parser.add_argument("--out", help="folder for metrics.json, report.md and plots (default: print only)")
    parser.add_argument("--labels-truth", help="folder of truth label maps (<name>_labels.png/.nrrd)")
    parser.add_argument("--labels-pred", help="folder of predicted label maps, matched by name")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% CIs (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap random seed")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    results = evaluate(args.truth, args.pred, args.out, args.labels_truth, args.labels_pred,
                       bootstrap=args.bootstrap, seed=args.seed)
    print(results["report"], end="")
    return 0

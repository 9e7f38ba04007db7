"""Quality control: every check on its own, the interval's calibration, the calibration file, the QC report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from AACScoreLib.errors import ModelPackageError
from AACScoreLib.geometry.spine import analyze_spine
from AACScoreLib.io.results_file import COLUMNS, QC_COLUMNS, ResultsFile
from AACScoreLib.phantoms.generator import generate_phantom
from AACScoreLib.qc import anatomy, domain, interval, levels, stability
from AACScoreLib.qc.verdict import Reason, format_reasons, reason_codes, verdict_of, STATUS_OF_QC


@pytest.fixture(scope="module")
def phantom():
    return generate_phantom(11, index=2, size_range=(700, 800))


@pytest.fixture(scope="module")
def geometry(phantom):
    return analyze_spine(phantom.labels, phantom.truth["spacing"], image=phantom.pixels)


# ------------------------------------------------------------------------------------------------ verdict


def test_verdict_and_status_never_say_ok_for_a_result_to_review():
    reason = Reason("levels_disagree", "counts differ; by one")
    assert verdict_of([], scored=True) == "ok" and verdict_of([reason], scored=True) == "review"
    assert verdict_of([], scored=False) == "error"
    assert STATUS_OF_QC == {"ok": "ok", "review": "warning", "error": "error"}
    cell = format_reasons([reason, Reason("body_area", "L3 0.5")])
    assert cell == "levels_disagree: counts differ, by one; body_area: L3 0.5"
    assert reason_codes(cell) == ["levels_disagree", "body_area"] and reason_codes("") == []


# ------------------------------------------------------------------------------------------------ levels


def test_level_counting_is_flagged_when_counts_disagree_or_only_order_was_available():
    from AACScoreLib.segmentation.levels import LevelAssignment

    assert levels.level_counting_reasons(None) == []  # a user's label map
    sure = LevelAssignment("T12+S1", "T12", "S1", True, 0.95)
    assert levels.level_counting_reasons(sure) == []
    codes = [r.code for r in levels.level_counting_reasons(LevelAssignment("T12+S1", "T12", "S1", False, 0.45))]
    assert codes == ["levels_disagree"]
    codes = [r.code for r in levels.level_counting_reasons(LevelAssignment("ordering", None, None, None, 0.3, ("x",)))]
    assert codes == ["levels_order_only"]
    one_sided = levels.level_counting_reasons(LevelAssignment("L5", None, "L5", None, 0.7, ("only the network's L5",)))
    assert [r.code for r in one_sided] == ["levels_uncertain"] and "only the network's L5" in one_sided[0].text
    parted = levels.level_counting_reasons(LevelAssignment("T12+S1", "T12", "S1", True, 0.95, parted=1))
    assert [r.code for r in parted] == ["bodies_parted"] and "1 segmented piece(s)" in parted[0].text


def test_flip_dice_sees_a_level_shift_and_names_it_by_where_the_labels_came_from(phantom):
    labels = levels.nearest_resample(phantom.labels, (90, 80))
    assert labels.shape == (90, 80) and set(np.unique(labels)) == set(range(6))
    same = levels.dice_per_vertebra(labels, labels)
    assert same == {name: 1.0 for name in same} and levels.flip_reasons(same, "segmenter") == []
    shifted = np.where((labels > 0) & (labels < 5), labels + 1, 0)  # every body called one level lower
    dice = levels.dice_per_vertebra(labels, shifted)
    assert max(dice.values()) < levels.MIN_FLIP_DICE
    assert [r.code for r in levels.flip_reasons(dice, "user")] == ["levels_differ_from_segmenter"]
    assert [r.code for r in levels.flip_reasons(dice, "segmenter")] == ["segmenter_unstable"]


# ------------------------------------------------------------------------------------------------ anatomy


def test_phantom_spine_passes_the_shape_and_crop_checks(phantom, geometry):
    reasons, measured = anatomy.shape_reasons(phantom.labels, geometry)
    assert reasons == [], reasons
    assert measured["min_solidity"] > anatomy.MIN_SOLIDITY and 0.8 < measured["l5_to_l1_depth"] < 1.6
    reasons, measured = anatomy.crop_reasons(geometry, phantom.labels.shape)
    assert reasons == [] and measured["band_inside_min"] == 1.0


def test_malformed_bodies_are_flagged(phantom, geometry):
    labels = phantom.labels.copy()
    rows, cols = np.nonzero(labels == 3)
    notch = (rows > np.median(rows)) & (cols > np.percentile(cols, 30)) & (cols < np.percentile(cols, 70))
    labels[rows[notch], cols[notch]] = 0  # a deep bite out of L3
    assert [r.code for r in anatomy.shape_reasons(labels, geometry)[0]] == ["body_outline"]
    labels = phantom.labels.copy()
    lower = rows > np.percentile(rows, 45)
    labels[rows[lower], cols[lower]] = 0  # half of L3 lost: far smaller than its neighbours
    assert "body_area" in [r.code for r in anatomy.shape_reasons(labels, geometry)[0]]


def test_implausible_sizes_are_flagged(phantom):
    tiny_spacing = [s / 4 for s in phantom.truth["spacing"]]  # the same bodies at a quarter of their size in mm
    geometry = analyze_spine(phantom.labels, tiny_spacing)
    codes = [r.code for r in anatomy.shape_reasons(phantom.labels, geometry)[0]]
    assert codes == ["body_size"]


def test_band_outside_the_image_is_flagged(phantom, geometry):
    square = np.array([[-100.0, -100.0], [-100.0, 100.0], [100.0, 100.0], [100.0, -100.0]])
    assert anatomy.inside_fraction(square, (100, 100)) == pytest.approx(0.25, abs=0.03)
    shape = phantom.labels.shape
    cut = geometry.segments[0].polygon[:, 0].max()
    shifted = _shift_geometry(geometry, -(cut - 5))  # the image now starts inside the L1 segment
    assert [r.code for r in anatomy.crop_reasons(shifted, shape)[0]] == ["band_outside_image"]
    cut = geometry.segments[2].polygon[:, 0].max()
    shifted = _shift_geometry(geometry, -(cut - 5))  # ... inside the L3 segment
    assert [r.code for r in anatomy.crop_reasons(shifted, shape)[0]] == ["band_outside_image", "crop_outside_image"]


def test_the_room_beyond_l1_and_l5_is_measured(phantom, geometry):
    assert anatomy.room_to_border(np.array([10.0, 50.0]), np.array([1.0, 0.0]), (100, 100)) == pytest.approx(89.5)
    assert anatomy.room_to_border(np.array([10.0, 50.0]), np.array([-0.6, 0.8]), (100, 100)) == pytest.approx(17.5)
    lowest = max(point[0] for point in geometry.vertebrae[-1].corners.values())
    measured = anatomy.crop_reasons(geometry, phantom.labels.shape)[1]
    assert measured["room_below_l5"] > 1.0 and measured["room_above_l1"] > 1.0
    reasons, measured = anatomy.crop_reasons(geometry, (int(lowest) + 3, phantom.labels.shape[1]))
    assert reasons == [] and measured["room_below_l5"] < 0.8


def _shift_geometry(geometry, rows: float):
    import copy

    moved = copy.deepcopy(geometry)
    for segment in moved.segments:
        segment.polygon[:, 0] += rows
    moved.crop.affine[0, 2] += rows
    return moved


# ------------------------------------------------------------------------------------------------ interval


def test_conformal_quantile_is_the_finite_sample_rank():
    scores = np.arange(1, 11, dtype=float)  # 10 cases: ceil(11 * 0.8) = 9th smallest
    assert interval.conformal_quantile(scores, 0.8) == 9.0
    assert interval.conformal_quantile(scores, 0.95) == 10.0
    with pytest.raises(ValueError):
        interval.conformal_quantile(np.array([]), 0.8)


def _heteroscedastic(n: int, seed: int):
    rng = np.random.default_rng(seed)
    spread = rng.uniform(0.2, 3.0, n)
    truth = rng.uniform(2, 22, n)
    return truth, truth + rng.normal(0, 1, n) * spread, spread


def test_intervals_cover_new_cases_at_the_nominal_rate_and_the_spread_helps_when_it_tracks_the_error():
    truth, score, spread = _heteroscedastic(2000, 0)
    chosen, figures = interval.choose_interval(truth, score, spread, 0.8)
    assert chosen.method == figures["chosen"] == "mc_dropout_conformal"
    assert figures["mc_dropout_conformal"]["held_out_mean_width"] < figures["constant_conformal"]["held_out_mean_width"]
    new = _heteroscedastic(4000, 1)
    assert interval.evaluate_interval(chosen, *new)["coverage"] == pytest.approx(0.8, abs=0.03)
    flat = interval.fit_interval("constant_conformal", *_heteroscedastic(2000, 2), 0.8)
    assert interval.evaluate_interval(flat, *new)["coverage"] == pytest.approx(0.8, abs=0.03)
    same = interval.choose_interval(truth, score, np.ones_like(spread), 0.8)[0]  # a spread that says nothing
    assert same.method == "constant_conformal"


def test_with_calibration_sets_the_method_that_holds_on_a_set_left_out_is_kept():
    """Four sets; the last, unlike the others, misses by more, and only the variant spread says so."""
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(4), 150)
    variant = rng.uniform(0.2, 1.0, 600) * np.where(groups == 3, 3.0, 1.0)
    truth = rng.uniform(2, 22, 600)
    score = truth + rng.normal(0, 1, 600) * variant
    mc = rng.uniform(0.2, 1.0, 600)  # says nothing
    chosen, figures = interval.choose_interval(truth, score, mc, 0.8, variant_spread=variant, groups=groups)
    assert chosen.method == figures["chosen"] == interval.VARIANTS and figures["chosen_by"] == "sets left out"
    assert len(figures[interval.CONSTANT]["coverage_by_set_left_out"]) == 4
    assert figures[interval.CONSTANT]["coverage_by_set_left_out"][3] < 0.6  # the constant misses the odd set
    assert figures[interval.VARIANTS]["mean_coverage_error"] < figures[interval.CONSTANT]["mean_coverage_error"]
    assert chosen.spread_of(mc_spread=9.0, variant_spread=0.5) == 0.5
    assert interval.choose_interval(truth, score, mc, 0.8, groups=groups)[0].spread_of(9.0, 0.5) == 9.0
    two_sets = interval.choose_interval(truth, score, mc, 0.8, variant_spread=variant, groups=groups % 2)[1]
    assert two_sets["chosen_by"] == "2 random folds"


def _flagged_wider(n: int, seed: int, flagged_share: float):
    """Unflagged results miss by N(0, 1), flagged ones by N(0, 4): the spread says nothing."""
    rng = np.random.default_rng(seed)
    flagged = rng.random(n) < flagged_share
    truth = rng.uniform(4, 20, n)
    return truth, truth + rng.normal(0, 1, n) * np.where(flagged, 4.0, 1.0), np.ones(n), flagged


def test_flagged_results_get_their_own_wider_quantile_and_each_group_is_covered():
    truth, score, spread, flagged = _flagged_wider(600, 0, 0.3)
    chosen, figures = interval.choose_interval(truth, score, spread, 0.8, flagged=flagged)
    assert chosen.method == "constant_conformal" and figures["flagged_cases"] == int(flagged.sum())
    assert chosen.quantile == pytest.approx(1.28, abs=0.2) and chosen.review_quantile == pytest.approx(5.1, abs=0.8)
    assert chosen.interval(10.0, 1.0, flagged=True)[1] - 10.0 == pytest.approx(chosen.review_quantile)
    new = _flagged_wider(6000, 1, 0.6)  # a set from elsewhere: twice the share flagged, still covered
    for group in (new[3], ~new[3]):
        got = interval.evaluate_interval(chosen, *(a[group] for a in new[:3]), new[3][group])["coverage"]
        assert got == pytest.approx(0.8, abs=0.03)
    pooled = interval.fit_interval("constant_conformal", truth, score, spread, 0.8)
    assert interval.evaluate_interval(pooled, *new)["coverage"] < 0.7  # one quantile for all under-covers it
    few = flagged & (np.cumsum(flagged) <= interval.MIN_GROUP - 1)  # too few flagged cases: one quantile
    assert interval.choose_interval(truth, score, spread, 0.8, flagged=few)[0].review_quantile is None
    assert chosen.many_flags_quantile is None  # no result flagged twice: two groups
    assert chosen.interval(10.0, 1.0, flagged=3) == chosen.interval(10.0, 1.0, flagged=1)


def test_results_flagged_by_more_kinds_of_check_get_a_third_wider_quantile():
    rng = np.random.default_rng(0)
    kinds = rng.choice([0, 1, 2, 3], 900, p=[0.6, 0.2, 0.1, 0.1])
    truth = rng.uniform(4, 20, 900)
    score = truth + rng.normal(0, 1, 900) * np.array([1.0, 2.0, 5.0, 5.0])[kinds]
    chosen = interval.choose_interval(truth, score, np.ones(900), 0.8, flagged=kinds)[0]
    assert chosen.quantile < chosen.review_quantile < chosen.many_flags_quantile
    assert chosen.many_flags_quantile == pytest.approx(1.28 * 5, rel=0.2)
    assert chosen.interval(10.0, 1.0, flagged=3) == chosen.interval(10.0, 1.0, flagged=2) != \
        chosen.interval(10.0, 1.0, flagged=1)
    again = interval.IntervalCalibration.from_json(json.loads(json.dumps(chosen.to_json())))
    assert again == chosen
    many = kinds >= 2
    got = interval.evaluate_interval(chosen, truth[many], score[many], np.ones(int(many.sum())), kinds[many])
    assert got["coverage"] == pytest.approx(0.8, abs=0.06)
    kinds[kinds >= 2] = np.where(np.arange(int(many.sum())) < interval.MIN_GROUP - 1, 2, 1)  # too few: two groups
    assert interval.choose_interval(truth, score, np.ones(900), 0.8, flagged=kinds)[0].many_flags_quantile is None


def test_the_segmenters_note_counts_as_a_kind_of_flag_only_when_it_stands_alone():
    from AACScoreLib.qc.verdict import flag_kinds

    note, levels = Reason("segmenter_note", "levels doubtful"), Reason("levels_disagree", "T12 and S1 disagree")
    assert flag_kinds([]) == 0 and flag_kinds([note]) == 1 and flag_kinds([note, levels]) == 1
    assert flag_kinds([note, levels, Reason("body_outline", "ragged"), Reason("body_outline", "ragged L2")]) == 2


def test_interval_stays_on_the_scale_and_round_trips_through_json():
    calibration = interval.IntervalCalibration("mc_dropout_conformal", 0.8, 2.0, 0.5)
    assert calibration.interval(1.0, 1.0) == (0.0, 4.0) and calibration.interval(23.0, 1.0) == (20.0, 24.0)
    assert interval.IntervalCalibration.from_json(json.loads(json.dumps(calibration.to_json()))) == calibration
    mondrian = interval.IntervalCalibration("constant_conformal", 0.8, 1.5, 0.0, 3.5)
    assert interval.IntervalCalibration.from_json(json.loads(json.dumps(mondrian.to_json()))) == mondrian
    assert mondrian.interval(10.0, 0.0) == (8.5, 11.5) and mondrian.interval(10.0, 0.0, flagged=True) == (6.5, 13.5)
    with pytest.raises(ValueError):
        interval.IntervalCalibration.from_json({"method": "guess", "coverage": 0.8, "quantile": 1})


def test_mc_dropout_spread_is_deterministic_and_centred_on_the_score(tiny_scorer):
    crop = np.random.default_rng(0).random((80, 40)).astype(np.float32)
    first, second = (interval.score_uncertainty(tiny_scorer, crop) for _ in range(2))
    assert first.spread > 0 and first.spread == second.spread and first.features.shape == (512,)
    scored = tiny_scorer.score(crop).aac24
    assert scored == pytest.approx(float(np.clip(first.total, 0, 24)), abs=1e-4)
    assert first.variant_totals.shape == (0,)


def test_variants_are_scored_in_the_same_pass_as_the_scorer_scores_them_alone(tiny_scorer):
    crop = np.random.default_rng(1).random((80, 40)).astype(np.float32)
    variants = stability.crop_variants(crop)
    assert [v.shape for v in variants] == [crop.shape] * 2 and not np.allclose(variants[0], crop)
    both = interval.score_uncertainty(tiny_scorer, crop, variants)
    alone = interval.score_uncertainty(tiny_scorer, crop)
    assert both.total == pytest.approx(alone.total, abs=1e-4) and both.spread == pytest.approx(alone.spread, abs=1e-4)
    for variant, total in zip(variants, both.variant_totals):
        assert tiny_scorer.score(variant).aac24 == pytest.approx(float(np.clip(total, 0, 24)), abs=1e-4)


def test_a_score_that_moves_with_its_crop_variants_is_flagged_above_the_calibrated_limit():
    assert stability.variant_spread([30.0, 26.0, 24.0]) == 0.0  # clipped to the scale first
    assert stability.variant_spread([10.0, 12.0, 8.0]) == pytest.approx(np.std([10, 12, 8]))
    limit = stability.ScoreStability.fit(np.linspace(0.0, 2.0, 101))
    assert limit.max_spread == pytest.approx(1.8)
    assert stability.stability_reasons(limit, 1.7) == ([], {"variant_spread": 1.7})
    reasons, measured = stability.stability_reasons(limit, 2.5)
    assert [r.code for r in reasons] == ["score_unstable"] and "SD 2.50" in reasons[0].text
    assert stability.stability_reasons(None, 9.0)[0] == []
    again = stability.ScoreStability.from_json(json.loads(json.dumps(limit.to_json())))
    assert again == limit
    with pytest.raises(ValueError):
        stability.ScoreStability.from_json({"max_spread": 0})


# ------------------------------------------------------------------------------------------------ domain


def test_feature_distance_flags_an_image_unlike_the_reference():
    rng = np.random.default_rng(0)
    reference = domain.FeatureReference.fit(rng.normal(0, 1, (400, 16)))
    assert domain.domain_reasons(reference, rng.normal(0, 1, 16))[0] == []
    reasons, measured = domain.domain_reasons(reference, rng.normal(0, 1, 16) + 4.0)
    assert [r.code for r in reasons] == ["unfamiliar_image"] and measured["feature_distance"] > 3
    assert domain.domain_reasons(None, np.zeros(16)) == ([], {})
    again = domain.FeatureReference.from_json(json.loads(json.dumps(reference.to_json())))
    assert again.max_distance == reference.max_distance and np.allclose(again.mean, reference.mean, atol=1e-5)


# ------------------------------------------------------------------------------------------------ calibration file


def test_calibration_file_is_pinned_in_the_package_and_read_back(tiny_scorer, tmp_path):
    import shutil

    from AACScoreLib.packages import read_package, verify_package
    from AACScoreLib.qc.calibrate import calibration_file, write_calibration
    from AACScoreLib.qc.reference import QC_FILE, load_reference

    folder = tmp_path / "scorer"
    shutil.copytree(tiny_scorer.package.path, folder)
    package = read_package(folder)
    assert load_reference(package) == (None, None, None)
    truth, score, spread = _heteroscedastic(60, 3)
    measured = {"truth": truth, "score": score, "spread": spread,
                "features": np.random.default_rng(0).normal(size=(60, 512))}
    write_calibration(package, calibration_file(measured, 0.8, "test cases", package.manifest))
    package = verify_package(folder)
    assert load_reference(package)[2] is None  # measured without crop variants: the stability check is skipped
    measured["variant_spread"] = np.linspace(0.0, 2.0, 60)
    data = calibration_file(measured, 0.8, "test cases", package.manifest)
    assert data["interval_selection"]["flagged_cases"] >= 6  # the least stable tenth joins the flagged group
    write_calibration(package, data)
    package = verify_package(folder)
    assert QC_FILE in package.files and package.files["weights.safetensors"] == tiny_scorer.package.files[
        "weights.safetensors"]
    calibration, reference, limit = load_reference(package)
    assert calibration.coverage == 0.8 and reference.mean.shape == (512,)
    assert limit.max_spread == pytest.approx(np.quantile(measured["variant_spread"], 0.9))
    (folder / QC_FILE).write_text((folder / QC_FILE).read_text().replace('"format": 1', '"format": 1 '))
    with pytest.raises(ModelPackageError, match="checksum"):
        load_reference(package)


# ------------------------------------------------------------------------------------------------ results and report


def test_results_file_has_the_qc_columns_and_error_rows_say_error(tmp_path):
    assert set(QC_COLUMNS) <= set(COLUMNS) and COLUMNS[:5] == ("file", "aac24", "category", "status", "message")
    with ResultsFile(tmp_path / "results.csv") as results:
        results.add({"file": "bad.dcm", "status": "error", "message": "empty file"})
    assert next(iter(ResultsFile(tmp_path / "results.csv").values()))["qc"] == "error"


def _write(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_kinds_of_check_leave_out_the_interval_and_a_note_beside_other_reasons():
    from AACScoreLib.qc.verdict import kinds_of

    assert kinds_of(["segmenter_note", "bodies_parted", "score_uncertain", "bodies_parted"]) == {"bodies_parted"}
    assert kinds_of(["segmenter_note", "score_uncertain"]) == {"segmenter_note"}
    assert kinds_of(["levels_disagree", "score_unstable"]) == {"levels_disagree", "score_unstable"}
    assert kinds_of([]) == set()


def test_evaluate_reports_flagged_wrong_and_right_results_and_coverage(tmp_path):
    from AACScoreLib.evaluation.evaluate import evaluate

    truth = [{"file": f"c{i}.dcm", "aac24": 10} for i in range(6)]
    pred = [  # (score, qc, interval): right & ok covered, right & flagged, wrong & flagged, wrong & missed, error
        {"file": "c0.dcm", "aac24": 10.5, "status": "ok", "qc": "ok", "qc_reasons": "", "aac24_low": 9, "aac24_high": 12},
        {"file": "c1.dcm", "aac24": 11, "status": "warning", "qc": "review", "qc_reasons": "body_area: L3",
         "aac24_low": 8, "aac24_high": 13},
        {"file": "c2.dcm", "aac24": 16, "status": "warning", "qc": "review", "qc_reasons": "unfamiliar_image: far",
         "aac24_low": 12, "aac24_high": 20},
        {"file": "c3.dcm", "aac24": 3, "status": "ok", "qc": "ok", "qc_reasons": "", "aac24_low": 1, "aac24_high": 5},
        {"file": "c4.dcm", "aac24": 9, "status": "ok", "qc": "ok", "qc_reasons": "", "aac24_low": 8, "aac24_high": 9.5},
        {"file": "c5.dcm", "aac24": "", "status": "error", "qc": "error", "qc_reasons": "not_scored: x",
         "aac24_low": "", "aac24_high": ""},
    ]
    results = evaluate(_write(tmp_path / "truth.csv", truth), _write(tmp_path / "pred.csv", pred), bootstrap=0)
    quality = results["qc"]
    assert (quality["wrong"]["flagged"], quality["wrong"]["n"]) == (2, 3)
    assert (quality["right"]["flagged"], quality["right"]["n"]) == (1, 3)
    assert quality["interval"] == {"covered": 2, "n": 5, "coverage": 0.4}
    assert quality["reason_codes"] == {"body_area": 1, "unfamiliar_image": 1, "not_scored": 1}
    assert quality["by_reason"]["body_area"] == {"wrong": 0, "right": 1, "wrong_alone": 0, "right_alone": 1}
    assert quality["by_reason"]["unfamiliar_image"] == {"wrong": 1, "right": 0, "wrong_alone": 1, "right_alone": 0}
    assert quality["wrong_not_flagged"] == [{"file": "c3.dcm", "error": -7.0, "level_wrong": False}]
    assert "| body_area | 0 | 1 | 0 | 1 |" in results["report"]
    assert "Wrong results passed as ok: c3.dcm (-7.0)." in results["report"]
    assert results["n"] == 5  # rows to review are scored results: they count in the statistics
    assert "## Quality control" in results["report"] and "| wrong | 2/3 (66.7%) |" in results["report"]
    no_qc = [{k: v for k, v in row.items() if k not in QC_COLUMNS} for row in pred]
    assert "qc" not in evaluate(tmp_path / "truth.csv", _write(tmp_path / "old.csv", no_qc), bootstrap=0)

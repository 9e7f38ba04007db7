"""Statistics of `aacscore evaluate` checked against published values, scipy/scikit-learn, and hand counts."""

from __future__ import annotations

import argparse
import csv
import json

import nrrd
import numpy as np
import pytest
from PIL import Image
from scipy import stats
from sklearn.metrics import cohen_kappa_score, r2_score

from AACScoreLib.evaluation import evaluate
from AACScoreLib.evaluation import metrics
from AACScoreLib.errors import AACScoreError, GeometryError
from AACScoreLib.kauppila import SUBSCORE_COLUMNS

# Shrout & Fleiss (1979), Table 2: 6 targets (rows) rated by 4 judges (columns).
SHROUT_FLEISS = np.array([
    [9, 2, 5, 8],
    [6, 1, 3, 2],
    [8, 4, 6, 8],
    [7, 1, 2, 6],
    [10, 5, 6, 9],
    [6, 2, 4, 7],
], dtype=float)


def _icc_by_variance_components(ratings: np.ndarray) -> float:
    """ICC(2,1) re-derived independently: sums of squares from least-squares fits of nested linear models
    (dummy-coded targets and raters), then sigma²_target / (sigma²_target + sigma²_rater + sigma²_error)."""
    n, k = ratings.shape
    y = ratings.ravel()
    targets = np.kron(np.eye(n), np.ones((k, 1)))
    raters = np.kron(np.ones((n, 1)), np.eye(k))
    ones = np.ones((n * k, 1))

    def rss(design: np.ndarray) -> float:
        fitted = design @ np.linalg.lstsq(design, y, rcond=None)[0]
        return float(((y - fitted) ** 2).sum())

    rss_full = rss(np.hstack([targets, raters]))
    ms_target = (rss(np.hstack([ones, raters])) - rss_full) / (n - 1)
    ms_rater = (rss(np.hstack([ones, targets])) - rss_full) / (k - 1)
    ms_error = rss_full / ((n - 1) * (k - 1))
    var_target = (ms_target - ms_error) / k
    var_rater = (ms_rater - ms_error) / n
    return var_target / (var_target + var_rater + ms_error)


def test_icc_reproduces_shrout_fleiss_worked_example():
    result = metrics.icc_2_1(SHROUT_FLEISS)
    assert round(result["icc"], 2) == 0.29
    # Mean squares printed in the paper: BMS 11.24, JMS 32.49, EMS 1.02, WMS 6.26.
    assert result["MSR"] == pytest.approx(11.24, abs=0.005)
    assert result["MSC"] == pytest.approx(32.49, abs=0.005)
    assert result["MSE"] == pytest.approx(1.02, abs=0.005)
    assert result["MSW"] == pytest.approx(6.26, abs=0.005)
    # F test and McGraw & Wong CI as printed by R psych::ICC / DescTools::ICC for this table.
    assert result["f"] == pytest.approx(11.03, abs=0.005)
    assert (result["df1"], result["df2"]) == (5, 15)
    assert result["p"] == pytest.approx(0.000135, abs=0.000001)
    assert result["ci_low"] == pytest.approx(0.019, abs=0.001)
    assert result["ci_high"] == pytest.approx(0.76, abs=0.005)


@pytest.mark.parametrize("shape", [(6, 4), (40, 2), (25, 3)])
def test_icc_matches_variance_components_derivation(shape):
    rng = np.random.default_rng(sum(shape))
    if shape == (6, 4):
        ratings = SHROUT_FLEISS
    else:
        ratings = rng.normal(10, 4, size=(shape[0], 1)) + rng.normal(0, 1, size=(1, shape[1])) + rng.normal(0, 2, shape)
    assert metrics.icc_2_1(ratings)["icc"] == pytest.approx(_icc_by_variance_components(ratings), abs=1e-10)


def test_icc_is_absolute_agreement_not_consistency():
    a = np.arange(20, dtype=float)
    assert metrics.agreement(a, a)["icc_2_1"] == pytest.approx(1.0)
    shifted = metrics.agreement(a, a + 5)
    assert stats.pearsonr(a, a + 5)[0] == pytest.approx(1.0)
    assert shifted["icc_2_1"] < 0.8  # a constant offset is disagreement for ICC(2,1)
    assert shifted["mean_difference"] == pytest.approx(5.0)


@pytest.mark.parametrize("weights", ["linear", "quadratic"])
def test_weighted_kappa_matches_sklearn_on_the_full_0_to_24_scale(weights):
    rng = np.random.default_rng(7)
    truth = rng.integers(3, 20, 200)  # not every score occurs: the explicit 0..24 label set matters
    pred = np.clip(truth + rng.normal(0, 2.5, 200), -2, 27)
    expected = cohen_kappa_score(truth, np.clip(np.rint(pred), 0, 24).astype(int), weights=weights,
                                 labels=list(range(25)))
    assert metrics.weighted_kappa(truth, pred, weights) == pytest.approx(expected, abs=1e-12)
    result = metrics.evaluate_scores(truth, pred, bootstrap=0)
    assert result["metrics"][f"kappa_{weights}"]["value"] == pytest.approx(expected, abs=1e-12)


def test_weighted_kappa_weights_by_score_distance_not_by_rank_of_observed_scores():
    a = [0, 10, 20, 0, 10, 20, 5]
    b = [0, 10, 24, 4, 12, 20, 5]
    full_scale = cohen_kappa_score(a, b, weights="linear", labels=list(range(25)))
    observed_only = cohen_kappa_score(a, b, weights="linear")  # sklearn's default: distances between ranks
    assert metrics.weighted_kappa(a, b) == pytest.approx(full_scale, abs=1e-12)
    assert abs(full_scale - observed_only) > 0.01


def test_agreement_on_subscore_scale_matches_sklearn():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 4, 80)
    b = np.clip(a + rng.integers(-1, 2, 80), 0, 3)
    result = metrics.agreement(a, b, labels=range(4))
    assert result["kappa_linear"] == pytest.approx(cohen_kappa_score(a, b, weights="linear", labels=[0, 1, 2, 3]))
    assert result["kappa_quadratic"] == pytest.approx(
        cohen_kappa_score(a, b, weights="quadratic", labels=[0, 1, 2, 3]))
    assert result["exact_agreement"] == pytest.approx(np.mean(a == b))
    assert result["icc_ci_low"] <= result["icc_2_1"] <= result["icc_ci_high"]


def test_continuous_metrics_match_scipy_and_sklearn():
    rng = np.random.default_rng(11)
    truth = rng.integers(0, 25, 150).astype(float)  # many ties: Spearman must use average ranks
    pred = truth + rng.normal(0.3, 2.0, 150)
    m = metrics.evaluate_scores(truth, pred, bootstrap=0)["metrics"]
    error = pred - truth
    assert m["mae"]["value"] == pytest.approx(np.mean(np.abs(error)))
    assert m["mse"]["value"] == pytest.approx(np.mean(error ** 2))
    assert m["rmse"]["value"] == pytest.approx(np.sqrt(np.mean(error ** 2)))
    assert m["r2"]["value"] == pytest.approx(r2_score(truth, pred))
    assert m["within_4"]["value"] == pytest.approx(np.mean(np.abs(error) < 4))
    pearson, spearman = stats.pearsonr(truth, pred), stats.spearmanr(truth, pred)
    assert m["pearson_r"]["value"] == pytest.approx(pearson.statistic)
    assert m["pearson_r"]["p"] == pytest.approx(pearson.pvalue)
    assert m["spearman_rho"]["value"] == pytest.approx(spearman.statistic)
    assert m["spearman_rho"]["p"] == pytest.approx(spearman.pvalue)
    assert "ci_low" not in m["mae"]


def test_confusion_matrix_and_category_metrics_by_hand():
    truth = [0, 3, 4, 5, 10, 15, 16, 20, 24, 2]
    pred = [1, 6, 4.4, 4.6, 12, 16, 15.4, 24, 23, 2]  # 4.4 -> 4 (no/mild), 4.6 -> 5 (moderate), 15.4 -> 15
    matrix = metrics.confusion_matrix(truth, pred)
    assert matrix.tolist() == [[3, 1, 0], [0, 2, 1], [0, 1, 2]]
    result = metrics.category_metrics(matrix)
    assert result["accuracy"]["value"] == pytest.approx(0.7)
    expected = {  # (successes, total) for sensitivity, specificity, PPV, NPV, accuracy
        "no/mild": [(3, 4), (6, 6), (3, 3), (6, 7), (9, 10)],
        "moderate": [(2, 3), (5, 7), (2, 4), (5, 6), (7, 10)],
        "severe": [(2, 3), (6, 7), (2, 3), (6, 7), (8, 10)],
    }
    for name, counts in expected.items():
        entry = result["per_class"][name]
        for key, (successes, total) in zip(("sensitivity", "specificity", "ppv", "npv", "accuracy"), counts):
            assert (entry[key]["successes"], entry[key]["total"]) == (successes, total), (name, key)
            assert entry[key]["value"] == pytest.approx(successes / total)
            assert entry[key]["ci_low"] <= entry[key]["value"] <= entry[key]["ci_high"]


def test_wilson_interval_matches_paper_table5():
    # Internal validation sensitivities: 86/116 -> 65.4–81.2, 283/292 -> 94.2–98.4, 41/63 -> 52.8–75.7 (%).
    for (successes, total), (low, high) in {(86, 116): (0.654, 0.812), (283, 292): (0.942, 0.984),
                                            (41, 63): (0.528, 0.757)}.items():
        result = metrics.wilson_interval(successes, total)
        assert result[0] == pytest.approx(low, abs=0.0015)
        assert result[1] == pytest.approx(high, abs=0.0015)


def test_bootstrap_contains_estimate_and_is_reproducible():
    rng = np.random.default_rng(5)
    truth = rng.integers(0, 25, 120).astype(float)
    pred = truth + rng.normal(0, 2, 120)
    first = metrics.evaluate_scores(truth, pred, bootstrap=300, seed=1)
    again = metrics.evaluate_scores(truth, pred, bootstrap=300, seed=1)
    other = metrics.evaluate_scores(truth, pred, bootstrap=300, seed=2)
    assert first == again
    assert first["metrics"]["mae"]["ci_low"] != other["metrics"]["mae"]["ci_low"]
    for name in metrics.BOOTSTRAP_STATISTICS:
        entry = first["metrics"][name]
        assert entry["ci_low"] <= entry["value"] <= entry["ci_high"], name
        assert entry["ci_low"] < entry["ci_high"], name
        assert entry["valid"] == 300


def test_dice_per_label_small_arrays():
    truth = np.zeros((4, 4), np.uint8)
    pred = np.zeros((4, 4), np.uint8)
    truth[0, :] = 1          # 4 px
    pred[0, :2] = 1          # 2 px overlap -> 2*2/(4+2)
    truth[2, :2] = 2
    pred[3, :2] = 2          # no overlap -> 0
    result = metrics.dice_per_label(truth, pred)
    assert result[1] == pytest.approx(4 / 6)
    assert result[2] == 0.0
    assert np.isnan(result[3])  # absent from both: undefined, not perfect
    with pytest.raises(ValueError, match="shape"):
        metrics.dice_per_label(truth, pred[:3])


def test_dice_by_vertebra_reads_png_and_nrrd_label_maps(tmp_path):
    truth_dir, pred_dir = tmp_path / "truth", tmp_path / "pred"
    truth_dir.mkdir()
    pred_dir.mkdir()
    labels = np.zeros((20, 10), np.uint8)
    for value in range(1, 6):
        labels[4 * value - 4:4 * value - 1, 2:8] = value
    Image.fromarray(labels).save(truth_dir / "case1_labels.png")
    Image.fromarray(labels).save(truth_dir / "case2_labels.png")
    moved = np.roll(labels, 1, axis=1)
    nrrd.write(str(pred_dir / "case1_labels.nrrd"), moved, index_order="C")
    Image.fromarray(labels).save(pred_dir / "case2_labels.png")
    Image.fromarray(labels).save(pred_dir / "case3_labels.png")
    result = evaluate.dice_by_vertebra(truth_dir, pred_dir)
    assert result["n"] == 2
    assert result["cases"]["case1"]["L1"] == pytest.approx(2 * 15 / 36)  # 6-wide bands shifted by one column
    assert result["cases"]["case2"] == {name: 1.0 for name in ("L1", "L2", "L3", "L4", "L5")}
    assert result["per_vertebra"]["L3"]["mean"] == pytest.approx((2 * 15 / 36 + 1) / 2)
    assert result["unmatched_pred"] == ["case3"]
    Image.fromarray(labels[:10]).save(pred_dir / "case2_labels.png")
    with pytest.raises(GeometryError, match="case2_labels.png.*differs"):
        evaluate.dice_by_vertebra(truth_dir, pred_dir)


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        writer.writerows(rows)


def _cohort(tmp_path, n=30, seed=0):
    """Truth CSV (phantoms layout) and a prediction CSV (results.csv layout, full paths) with two unusable rows."""
    rng = np.random.default_rng(seed)
    subscores = rng.integers(0, 4, (n, 8))
    truth_rows, pred_rows = [], []
    for i in range(n):
        name = f"phantom_s0_{i:04d}.dcm"
        total = int(subscores[i].sum())
        truth_rows.append([name, total, "", *subscores[i]])
        predicted_sub = np.clip(subscores[i] + rng.integers(-1, 2, 8), 0, 3)
        status, score = "ok", f"{total + rng.normal(0, 1.5):.3f}"
        if i == 4:
            status, score = "error", ""
        if i == 9:
            score = ""
        pred_rows.append([f"/data/run/{name}", score, "", status, "boom" if status == "error" else "",
                          *predicted_sub])
    truth, pred = tmp_path / "truth.csv", tmp_path / "results.csv"
    _write_csv(truth, ["file", "aac24", "category", *SUBSCORE_COLUMNS], truth_rows)
    _write_csv(pred, ["file", "aac24", "category", "status", "message", *SUBSCORE_COLUMNS], pred_rows)
    return truth, pred


def _cli(argv):
    parser = argparse.ArgumentParser(prog="aacscore")
    evaluate.add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_end_to_end_writes_every_output(tmp_path, capsys):
    truth, pred = _cohort(tmp_path)
    out = tmp_path / "eval"
    assert _cli(["evaluate", "--truth", str(truth), "--pred", str(pred), "--out", str(out),
                 "--bootstrap", "200", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "MAE" in printed and "ICC(2,1)" in printed and "excluded: 2" in printed
    assert sorted(p.name for p in out.iterdir()) == sorted(["metrics.json", "report.md", *evaluate.PLOT_FILES])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["n"] == 28
    assert [row["file"] for row in saved["excluded"]] == ["phantom_s0_0004.dcm", "phantom_s0_0009.dcm"]
    assert "status 'error': boom" in saved["excluded"][0]["reason"]
    assert saved["bootstrap"] == {"resamples": 200, "seed": 3, "method": "percentile, resampling cases"}
    assert set(saved["subscores"]) == set(SUBSCORE_COLUMNS)
    assert saved["metrics"]["icc_2_1"]["ci_low"] <= saved["metrics"]["icc_2_1"]["value"]
    report = (out / "report.md").read_text()
    assert report == printed
    assert "retraining" in report and "phantom_s0_0009.dcm" in report
    for name in evaluate.PLOT_FILES:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 200
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left behind


def test_evaluate_without_out_writes_nothing(tmp_path):
    truth, pred = _cohort(tmp_path, n=12)
    before = set(tmp_path.iterdir())
    results = evaluate.evaluate(truth, pred, bootstrap=0)
    assert set(tmp_path.iterdir()) == before
    assert results["n"] == 10 and len(results["excluded"]) == 2
    assert "not computed (--bootstrap 0)" in results["report"]


def test_unmatched_files_are_an_error_naming_them(tmp_path):
    truth, pred = _cohort(tmp_path, n=8)
    rows = list(csv.reader(open(pred)))
    rows[2][0] = "/data/run/stranger.dcm"
    _write_csv(pred, rows[0], rows[1:])
    with pytest.raises(AACScoreError) as error:
        evaluate.evaluate(truth, pred, bootstrap=0)
    message = str(error.value)
    assert "phantom_s0_0001.dcm" in message and "stranger.dcm" in message


def test_missing_column_and_duplicate_rows_are_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    _write_csv(bad, ["file", "score"], [["a.dcm", 3]])
    with pytest.raises(AACScoreError, match="missing column.*aac24"):
        evaluate.read_scores_csv(bad)
    _write_csv(bad, ["file", "aac24"], [["a.dcm", 3], ["a.dcm", 4]])
    with pytest.raises(AACScoreError, match="more than once"):
        evaluate.read_scores_csv(bad)


def test_empty_predicted_subscores_are_reported_not_compared(tmp_path):
    truth, pred = _cohort(tmp_path, n=10)
    _write_csv(pred, ["file", "aac24", "status", *SUBSCORE_COLUMNS],
               [[f"phantom_s0_{i:04d}.dcm", i, "ok", *[""] * 8] for i in range(10)])
    results = evaluate.evaluate(truth, pred, bootstrap=0)
    assert "subscores" not in results and "empty" in results["subscores_note"]

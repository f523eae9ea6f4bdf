"""kdlib.bootstrap: per-patient sums against the metric functions, draws against a per-draw
loop, and intervals against scipy.stats.bootstrap."""

import warnings

import numpy as np
import pandas as pd
import pytest
from helpers_eval import synthetic_predictions
from scipy import stats as sps

from kdlib import bootstrap as B
from kdlib.errors import ConfigError, DataError
from kdlib.metrics import (
    arrays,
    check_predictions,
    patient_predictions,
    patient_scores,
    slice_scores,
)


def tables():
    """Made-up test sets: a usual one, a tiny one with one LGG patient, an ungraded subject."""
    usual = synthetic_predictions(16, 12, skill=1.0, seed=1)
    tiny = synthetic_predictions(5, 6, lgg_fraction=0.2, skill=0.4, seed=2)
    ungraded = synthetic_predictions(8, 6, skill=0.8, seed=3)
    ungraded.loc[ungraded["subject_id"] == "S007", "label"] = "healthy"
    return {"usual": usual, "tiny": tiny, "ungraded": ungraded}


def reference(pred: pd.DataFrame, draw: np.ndarray, by: str = "true") -> dict[str, float]:
    """The metrics of one patient draw, the slow way: the drawn patients' slices concatenated."""
    pred = check_predictions(pred).sort_values(["subject_id", "slice"]).reset_index(drop=True)
    y, P = arrays(pred)
    subjects = np.array(sorted(pred["subject_id"].unique()))
    rows = np.concatenate([np.flatnonzero(pred["subject_id"] == subjects[d]) for d in draw])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pt = patient_predictions(pred, by=by).set_index("subject_id")
    kept = [s for s in subjects[draw] if s in pt.index]
    return {**slice_scores(y[rows], P[rows]),
            **patient_scores(pt.loc[kept, "grade"].to_numpy(), pt.loc[kept, "pred_grade"].to_numpy())}


METRICS = sorted(reference(tables()["usual"], np.arange(16)))


@pytest.mark.parametrize("name", ["usual", "tiny", "ungraded"])
@pytest.mark.parametrize("by", ["true", "predicted"])
def test_every_metric_of_every_draw_equals_the_slow_way(name, by):
    pred = tables()[name]
    counts = B.run_counts(check_predictions(pred), by)
    n = len(counts.subjects)
    draws = np.r_[np.arange(n)[None], np.random.default_rng(0).integers(0, n, (12, n))]
    got = B.run_scores([counts], draws, METRICS)[0]  # (metrics, draws)
    for d, draw in enumerate(draws):
        want = reference(pred, draw, by)
        np.testing.assert_allclose(got[:, d], [want[m] for m in METRICS], rtol=1e-12, atol=1e-12,
                                   err_msg=f"draw {d}: {dict(zip(METRICS, got[:, d]))}")


def test_multiplicities_count_each_patient_of_each_draw():
    idx = np.array([[0, 0, 2], [1, 2, 2]])
    np.testing.assert_array_equal(B.multiplicities(idx, 4), [[2, 0, 1, 0], [0, 1, 2, 0]])
    assert B.multiplicities(np.array([3, 3, 1]), 4).tolist() == [0, 1, 0, 2]


def test_patient_grades_follow_patient_predictions():
    pred = check_predictions(tables()["ungraded"])
    counts = B.run_counts(pred)
    with pytest.warns(UserWarning, match="without a tumour slice"):
        pt = patient_predictions(pred)
    pair = counts.features[:, B._PATIENT]
    assert pair[-1].sum() == 0  # S007 has no tumour slice: no grade, no patient counts
    for row in pt.itertuples():
        i = list(counts.subjects).index(row.subject_id)
        assert pair[i, 2 * (row.grade == "LGG") + (row.pred_grade == "LGG")] == 1
    mixed = pred.copy()
    first_lgg = mixed.index[(mixed["subject_id"] == "S000") & (mixed["label"] == "LGG")][0]
    mixed.loc[first_lgg, "label"] = "HGG"  # S000 now has HGG and LGG slices
    with pytest.raises(DataError, match="both HGG and LGG"):
        B.run_counts(check_predictions(mixed))
    with pytest.raises(ConfigError, match="by='slices'"):
        B.run_counts(pred, by="slices")


@pytest.mark.parametrize("method, theirs", [("percentile", "percentile"), ("bca", "BCa")])
def test_intervals_are_scipys_with_the_patient_metric_as_statistic(method, theirs):
    a = check_predictions(synthetic_predictions(14, 8, skill=0.8, seed=4))
    b = check_predictions(synthetic_predictions(14, 8, skill=1.2, seed=5))
    b[["subject_id", "slice", "label"]] = a[["subject_id", "slice", "label"]]
    runs = [B.run_counts(a), B.run_counts(b)]
    metrics = ["macro_f1", "ece", "patient_balanced_accuracy"]

    def statistic(idx, axis=-1):  # mean of run 0 minus run 1, written independently
        s = B.run_scores(runs, idx, metrics)
        return s[0] - s[1]

    got = B.patient_bootstrap(runs, [([0], [1])], metrics, 300, 0.9, method, seed=8)
    want = sps.bootstrap((np.arange(14),), statistic, n_resamples=300, confidence_level=0.9,
                         method=theirs, vectorized=True, rng=np.random.default_rng(8))
    np.testing.assert_allclose(got["low"], want.confidence_interval.low, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got["high"], want.confidence_interval.high, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got["se"], want.standard_error, rtol=1e-12)
    assert (got["n_undefined"] == 0).all() and (got["n_patients"] == 14).all()


def test_undefined_draws_are_left_out_of_that_metric_only():
    pred = check_predictions(synthetic_predictions(6, 5, lgg_fraction=0.2, skill=0.6, seed=6))
    counts = B.run_counts(pred)
    out = B.patient_bootstrap([counts], [([0], [])], ["recall_LGG", "accuracy"], 400,
                              seed=1).set_index("metric")
    draws = np.random.default_rng(1).integers(0, 6, (400, 6))  # scipy's draws for this seed
    dist = B.run_scores([counts], draws, ["recall_LGG", "accuracy"])[0]
    ok = np.isfinite(dist[0])
    assert out.loc["recall_LGG", "n_undefined"] == (~ok).sum() > 0  # draws without the LGG one
    assert (out.loc["recall_LGG", "low"], out.loc["recall_LGG", "high"]) == pytest.approx(
        tuple(np.quantile(dist[0][ok], [0.025, 0.975])), abs=1e-12)
    assert out.loc["accuracy", "n_undefined"] == 0
    assert out.loc["accuracy", "high"] == pytest.approx(np.quantile(dist[1], 0.975), abs=1e-12)


def test_estimands_share_draws_and_a_constant_difference_has_no_spread():
    a = check_predictions(synthetic_predictions(10, 6, skill=1.0, seed=7))
    counts = B.run_counts(a)
    out = B.patient_bootstrap([counts, counts], [([0], []), ([0, 1], []), ([0], [1])],
                              ["macro_f1"], 200, method="bca", seed=2)
    assert out.loc[0, ["estimate", "low", "high"]].tolist() == pytest.approx(
        out.loc[1, ["estimate", "low", "high"]].tolist(), abs=1e-15)
    assert out.loc[2, ["estimate", "low", "high"]].tolist() == [0.0, 0.0, 0.0]


def test_ranking_metrics_take_the_per_draw_path():
    pred = check_predictions(synthetic_predictions(9, 6, skill=0.7, seed=8))
    counts = B.run_counts(pred)
    draws = np.random.default_rng(3).integers(0, 9, (5, 9))
    got = B.run_scores([counts], draws, ["auc_LGG", "macro_f1", "ap_HGG"])[0]
    for d, draw in enumerate(draws):
        want = reference(pred, draw)
        assert got[:, d] == pytest.approx([want["auc_LGG"], want["macro_f1"], want["ap_HGG"]],
                                          nan_ok=True)


def test_runs_on_different_test_sets_are_resampled_independently():
    a = check_predictions(synthetic_predictions(9, 6, skill=0.9, seed=11))
    b = check_predictions(synthetic_predictions(12, 6, skill=0.9, seed=12))
    b["subject_id"] = b["subject_id"].str.replace("S", "T")  # another fold's test subjects
    a2 = check_predictions(synthetic_predictions(9, 6, skill=1.5, seed=13))
    a2[["subject_id", "slice", "label"]] = a[["subject_id", "slice", "label"]]
    runs = [B.run_counts(p) for p in (a, b, a2)]
    assert B.test_sets(runs) == [[0, 2], [1]]

    def statistic(ia, ib, axis=-1):  # (run a + run b) / 2, each on its own test set
        return (B.run_scores(runs[:1], ia, ["macro_f1"])[0, 0]
                + B.run_scores(runs[1:2], ib, ["macro_f1"])[0, 0]) / 2

    got = B.patient_bootstrap(runs, [([0, 1], [])], ["macro_f1"], 300, seed=4).iloc[0]
    want = sps.bootstrap((np.arange(9), np.arange(12)), statistic, n_resamples=300,
                         method="percentile", vectorized=True, rng=np.random.default_rng(4))
    assert (got["low"], got["high"]) == pytest.approx(tuple(want.confidence_interval), abs=1e-12)
    assert got["n_patients"] == 21
    bad = a2.copy()
    bad.loc[bad.index[-1], "slice"] = 999  # same patients, another slice
    with pytest.raises(DataError, match="runs 0 and 2 were tested on the same patients"):
        B.test_sets([runs[0], runs[1], B.run_counts(bad)])

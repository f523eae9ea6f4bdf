"""kdlib.stats: patient bootstrap against scipy, corrected t-test and Holm against hand examples."""

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from helpers_eval import synthetic_predictions, synthetic_runs
from scipy import stats as sps

from kdlib.errors import ConfigError, DataError
from kdlib.metrics import patient_predictions, slice_metrics
from kdlib.stats import (
    bootstrap_difference,
    bootstrap_fold_mean,
    bootstrap_metrics,
    compare_to_baseline,
    corrected_resampled_ttest,
    few_folds_caveat,
    holm,
    summarize_runs,
    wilcoxon_signed_rank,
)


@pytest.mark.parametrize("ours, theirs", [("percentile", "percentile"), ("bca", "BCa")])
def test_patient_bootstrap_matches_scipy_on_mean_of_patient_values(ours, theirs):
    pred = synthetic_predictions(30, 9, skill=0.4, seed=3)
    pt = patient_predictions(pred)  # sorted by subject, as the bootstrap orders its units
    correct = (pt["grade"] == pt["pred_grade"]).to_numpy(float)
    assert 0 < correct.mean() < 1
    r = bootstrap_metrics(pred, ["patient_accuracy"], n_boot=400, method=ours, seed=11).iloc[0]
    s = sps.bootstrap((correct,), np.mean, n_resamples=400, method=theirs,
                      rng=np.random.default_rng(11))
    assert r["estimate"] == pytest.approx(correct.mean())
    assert r["low"] == pytest.approx(s.confidence_interval.low, abs=1e-9)
    assert r["high"] == pytest.approx(s.confidence_interval.high, abs=1e-9)
    assert r["se"] == pytest.approx(s.standard_error, rel=1e-9)


def test_bootstrap_resamples_patients_not_slices():
    # patient A: every slice right; patient B: every slice wrong -> accuracy per draw in {0, .5, 1}
    rows = [("A", z, "HGG", 0.1, 0.8, 0.1) for z in range(20)]
    rows += [("B", z, "LGG", 0.1, 0.8, 0.1) for z in range(20)]
    pred = pd.DataFrame(rows, columns=["subject_id", "slice", "label", "p_healthy", "p_HGG", "p_LGG"])
    with pytest.warns(UserWarning, match="undefined"):
        r = bootstrap_metrics(pred, ["accuracy", "recall_LGG"], n_boot=200, seed=0)
    acc = r.set_index("metric").loc["accuracy"]
    assert acc["estimate"] == 0.5 and acc["low"] == 0.0 and acc["high"] == 1.0
    assert acc["n_patients"] == 2


def test_bootstrap_estimates_equal_metrics_and_are_seeded():
    pred = synthetic_predictions(20, 9, seed=1)
    r1 = bootstrap_metrics(pred, n_boot=100, seed=4)
    r2 = bootstrap_metrics(pred, n_boot=100, seed=4)
    r3 = bootstrap_metrics(pred, n_boot=100, seed=5)
    pd.testing.assert_frame_equal(r1, r2)
    assert not np.allclose(r1["low"], r3["low"])
    m = slice_metrics(pred)
    est = r1.set_index("metric")["estimate"]
    assert est["macro_f1"] == pytest.approx(m["macro_f1"])
    assert (r1["low"] <= r1["estimate"] + 1e-12).all() and (r1["estimate"] <= r1["high"] + 1e-12).all()
    with pytest.raises(ConfigError, match="unknown metric"):
        bootstrap_metrics(pred, ["f1_tumour"], n_boot=10)


def test_paired_difference():
    a = synthetic_predictions(20, 9, skill=1.5, seed=1)
    b = synthetic_predictions(20, 9, skill=0.8, seed=2)
    same = bootstrap_difference(a, a, ["macro_f1"], n_boot=50)
    assert same.loc[0, "estimate"] == 0 and same.loc[0, "low"] == 0 and same.loc[0, "high"] == 0
    d = bootstrap_difference(a, b.sample(frac=1, random_state=0), ["macro_f1", "f1_LGG"],
                             n_boot=200, method="bca").set_index("metric")
    assert d.loc["macro_f1", "estimate"] == pytest.approx(
        slice_metrics(a)["macro_f1"] - slice_metrics(b)["macro_f1"])
    assert d.loc["macro_f1", "low"] < d.loc["macro_f1", "estimate"] < d.loc["macro_f1", "high"]


def test_paired_difference_needs_the_same_test_set():
    a = synthetic_predictions(20, 9, seed=1)
    b = a[~a["subject_id"].isin(["S000", "S001"])]
    with pytest.raises(DataError, match="2 subject\\(s\\) only in A.*18 slice\\(s\\) only in A"):
        bootstrap_difference(a, b, n_boot=10)
    c = a.copy()
    c.loc[0, "label"] = "LGG"
    with pytest.raises(DataError, match="disagree on the true label of 1 slice"):
        bootstrap_difference(a, c, n_boot=10)


def test_corrected_resampled_ttest_worked_example():
    d = [0.01, 0.02, -0.005]
    k, ratio = 3, 0.5
    mean = (0.01 + 0.02 - 0.005) / 3                                   # 0.008333
    s2 = ((0.01 - mean) ** 2 + (0.02 - mean) ** 2 + (-0.005 - mean) ** 2) / (k - 1)  # 1.5833e-4
    t = mean / math.sqrt((1 / k + ratio) * s2)                           # 0.7255
    p = 2 * sps.t.sf(abs(t), df=k - 1)
    r = corrected_resampled_ttest(d, ratio)
    assert s2 == pytest.approx(1.583333e-4, rel=1e-5)
    assert r["t"] == pytest.approx(t) and r["t"] == pytest.approx(0.72548, abs=1e-4)
    assert r["p"] == pytest.approx(p) and r["df"] == 2
    # without the correction term it is the ordinary one-sample t-test
    plain = sps.ttest_1samp(d, 0.0)
    assert corrected_resampled_ttest(d, 0.0)["p"] == pytest.approx(plain.pvalue)
    assert r["p"] > plain.pvalue


def test_corrected_ttest_degenerate_cases_are_nan_with_warning():
    with pytest.warns(UserWarning, match="all differences are equal"):
        assert np.isnan(corrected_resampled_ttest([0.01, 0.01, 0.01], 0.5)["p"])
    with pytest.warns(UserWarning, match="at least 2"):
        assert np.isnan(corrected_resampled_ttest([0.01], 0.5)["t"])
    with pytest.raises(ConfigError):
        corrected_resampled_ttest([0.1, 0.2], -1)


def test_wilcoxon_and_few_folds_caveat():
    r = wilcoxon_signed_rank([0.01, 0.02, 0.03, 0.04, 0.05])
    assert r["p"] == pytest.approx(0.0625) and r["min_p"] == pytest.approx(0.0625)
    assert "cannot reach p<0.05" in r["caveat"]
    r6 = wilcoxon_signed_rank([0.01, 0.02, 0.03, 0.04, 0.05, 0.06])
    assert r6["p"] == pytest.approx(0.03125) and r6["caveat"] == ""
    d = [0.01, -0.02, 0.03, 0.015, 0.04, -0.005, 0.02]
    assert r6["p"] < 0.05 and wilcoxon_signed_rank(d)["p"] == pytest.approx(sps.wilcoxon(d).pvalue)
    assert few_folds_caveat(1).startswith("1 pair")
    with pytest.warns(UserWarning, match="all differences are zero"):
        assert np.isnan(wilcoxon_signed_rank([0.0, 0.0, 0.0])["p"])


def test_holm_hand_example():
    # sorted 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> monotone 0.06
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.5, np.nan, 0.4]), [0.8, np.nan, 0.8])
    assert holm([0.9, 0.8]).max() == 1.0


def test_compare_to_baseline_by_hand():
    runs = synthetic_runs(folds=5)
    with pytest.warns(UserWarning, match="only 5 pairs"):
        out = compare_to_baseline(runs, "ce", "f1_LGG").set_index("method")
    assert list(out.index) == ["kd", "dkd", "bkd"]
    base = runs[runs.method == "ce"].set_index("fold")["f1_LGG"]
    d = runs[runs.method == "dkd"].set_index("fold")["f1_LGG"] - base
    tt = corrected_resampled_ttest(d.to_numpy(), 1000 / 2000)
    row = out.loc["dkd"]
    assert row["n_pairs"] == 5 and row["mean_diff"] == pytest.approx(d.mean())
    assert row["p_corrected_t"] == pytest.approx(tt["p"])
    half = sps.t.ppf(0.975, 4) * tt["se"]
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((d.mean() - half, d.mean() + half))
    assert row["p_wilcoxon"] == pytest.approx(sps.wilcoxon(d.to_numpy()).pvalue)
    np.testing.assert_allclose(out["p_holm"], holm(out["p_corrected_t"]))
    assert "Wilcoxon cannot reach" in row["caveat"]
    mask = (runs["method"] == "ce").to_numpy()
    with pytest.warns(UserWarning):
        by_mask = compare_to_baseline(runs, mask, "f1_LGG", test_train_ratio=0.5)
    pd.testing.assert_series_equal(by_mask["p_holm"], out["p_holm"].reset_index(drop=True))


@pytest.mark.filterwarnings("ignore:only 2 pairs")
def test_compare_to_baseline_pairs_on_ratio_and_student():
    runs = synthetic_runs(ratios=(1.0, 4.0, np.nan), folds=3)
    with pytest.warns(UserWarning):
        out = compare_to_baseline(runs, {"method": "ce"}, "macro_f1", by=("method", "ratio"))
    assert len(out) == 9 and (out["n_pairs"] == 3).all() and out["mean_diff"].notna().all()
    runs.loc[0, "macro_f1"] = np.nan  # a failed baseline run
    with pytest.warns(UserWarning, match="NaN macro_f1 are left out"):
        out = compare_to_baseline(runs, {"method": "ce"}, "macro_f1", by=("method", "ratio"))
    assert sorted(out["n_pairs"]) == [2, 2, 2] + [3] * 6
    with pytest.raises(DataError, match="share the same.*differ in \\['ratio'\\]"):
        compare_to_baseline(runs, "ce", "macro_f1", pair_on=("fold",))
    # column names as kdlib.results.load_runs writes them
    named = runs.rename(columns={"n_test": "n_test_slices", "n_train": "n_train_slices"})
    named.loc[:, "n_test_slices"] = 500
    with pytest.warns(UserWarning):
        out = compare_to_baseline(named, "ce", "macro_f1", by=("method", "ratio"))
    np.testing.assert_allclose(out["test_train_ratio"], 0.25)


@pytest.mark.filterwarnings("ignore:only 2 pairs")
def test_compare_to_baseline_errors_and_unpaired_runs():
    runs = synthetic_runs()
    with pytest.raises(ConfigError, match="test_train_ratio"):
        compare_to_baseline(runs.drop(columns=["n_test"]), "ce", "f1_LGG")
    with pytest.raises(ConfigError, match="matches no run"):
        compare_to_baseline(runs, "CE", "f1_LGG")
    with pytest.raises(ConfigError, match="not in the run table"):
        compare_to_baseline(runs, "ce", "f1_LGG", pair_on=("fold", "repeat"))
    fewer = runs[~((runs.method == "ce") & (runs.fold == 2))]
    with pytest.warns(UserWarning, match="without a baseline run"):
        out = compare_to_baseline(fewer, "ce", "f1_LGG")
    assert (out["n_pairs"] == 2).all()


def test_compare_to_baseline_rejects_duplicate_runs_in_a_method_group():
    runs = synthetic_runs(methods={"ce": 0.0, "kd": 0.01})
    kd = runs[runs.method == "kd"]
    other = kd.assign(teacher="cnn_m", **{c: kd[c] + 0.01 for c in kd.columns if "_LGG" in c or "f1" in c})
    twice = pd.concat([runs, other], ignore_index=True)  # two teachers per fold, one method name
    with pytest.raises(DataError, match=r"\{'method': 'kd'\}: 6 runs share the same "
                                        r"\['fold', 'ratio', 'seed'\].*differ in \['teacher'\]"):
        compare_to_baseline(twice, "ce", "f1_LGG")
    with pytest.warns(UserWarning):  # telling them apart by `by` pairs 3 folds each
        out = compare_to_baseline(twice, "ce", "f1_LGG", by=("method", "teacher"))
    assert list(out["n_pairs"]) == [3, 3]


@pytest.mark.filterwarnings("ignore:only 3 pairs")
def test_compare_to_baseline_test_train_ratio_per_group():
    runs = synthetic_runs(ratios=(1.0, 4.0), folds=3)
    runs["n_train"] = np.where(runs["ratio"] == 1.0, 1000, 4000)  # fewer runs at ratio 1
    out = compare_to_baseline(runs, "ce", "f1_LGG", by=("method", "ratio"))
    ttr = out.set_index(["method", "ratio"])["test_train_ratio"]
    assert ttr[("kd", 1.0)] == pytest.approx(1.0) and ttr[("kd", 4.0)] == pytest.approx(0.25)
    for ratio, r in ((1.0, 1.0), (4.0, 0.25)):
        at = runs[runs.ratio == ratio]
        d = (at[at.method == "kd"].set_index("fold")["f1_LGG"]
             - at[at.method == "ce"].set_index("fold")["f1_LGG"])
        tt = corrected_resampled_ttest(d.to_numpy(), r)
        row = out[(out.method == "kd") & (out.ratio == ratio)].iloc[0]
        assert row["p_corrected_t"] == pytest.approx(tt["p"])
        half = sps.t.ppf(0.975, 2) * tt["se"]
        assert row["ci_high"] - row["mean_diff"] == pytest.approx(half)
    fixed = compare_to_baseline(runs, "ce", "f1_LGG", by=("method", "ratio"), test_train_ratio=0.5)
    assert (fixed["test_train_ratio"] == 0.5).all()
    with pytest.raises(ConfigError, match="test_train_ratio=-1"):
        compare_to_baseline(runs, "ce", "f1_LGG", test_train_ratio=-1)
    runs.loc[runs.ratio == 4.0, "n_train"] = np.nan  # sizes missing for one group's runs
    with pytest.raises(ConfigError, match=r"'ratio': 4.0\}: n_test / n_train"):
        compare_to_baseline(runs, "ce", "f1_LGG", by=("method", "ratio"))


@pytest.mark.parametrize("kwargs, setting", [({"n_boot": 0}, "n_boot"), ({"n_boot": 2.5}, "n_boot"),
                                             ({"ci": 95}, "ci"), ({"ci": 0.0}, "ci"),
                                             ({"ci": float("nan")}, "ci")])
def test_bootstrap_settings_are_validated(kwargs, setting):
    pred = synthetic_predictions(6, 3, seed=0)
    match = f"{setting}="
    with pytest.raises(ConfigError, match=match):
        bootstrap_metrics(pred, ["accuracy"], **kwargs)
    with pytest.raises(ConfigError, match=match):
        bootstrap_difference(pred, pred, ["accuracy"], **kwargs)
    with pytest.raises(ConfigError, match=match):
        bootstrap_fold_mean([pred], metrics=["accuracy"], **kwargs)
    if setting == "ci":
        with pytest.raises(ConfigError, match=match):
            compare_to_baseline(synthetic_runs(), "ce", "f1_LGG", **kwargs)


def test_summarize_runs():
    runs = synthetic_runs()
    s = summarize_runs(runs, ["f1_LGG"]).set_index("method")
    kd = runs[runs.method == "kd"]["f1_LGG"]
    assert s.loc["kd", "f1_LGG_mean"] == pytest.approx(kd.mean())
    assert s.loc["kd", "f1_LGG_std"] == pytest.approx(kd.std(ddof=1))
    assert s.loc["kd", "n_runs"] == 3


def test_bootstrap_fold_mean_reduces_to_single_run_and_pairwise_forms():
    from kdlib.stats import bootstrap_difference, bootstrap_fold_mean, bootstrap_metrics

    a = synthetic_predictions(n_subjects=16, slices=6, seed=1)
    b = synthetic_predictions(n_subjects=16, slices=6, seed=2)
    b[["subject_id", "slice", "label"]] = a[["subject_id", "slice", "label"]]
    metrics = ["macro_f1", "f1_LGG"]
    kw = {"metrics": metrics, "n_boot": 200, "seed": 3}
    one = bootstrap_fold_mean([a], **kw)
    pd.testing.assert_frame_equal(one, bootstrap_metrics(a, **kw))
    pd.testing.assert_frame_equal(bootstrap_fold_mean([a], [b], **kw),
                                  bootstrap_difference(a, b, **kw))
    both = bootstrap_fold_mean([a, b], **kw).set_index("metric")
    single = {n: bootstrap_metrics(p, **kw).set_index("metric") for n, p in (("a", a), ("b", b))}
    for m in metrics:
        assert both.loc[m, "estimate"] == pytest.approx(
            (single["a"].loc[m, "estimate"] + single["b"].loc[m, "estimate"]) / 2)
    assert bootstrap_fold_mean([a, a], [a, a], **kw)["high"].abs().max() == 0


def test_compare_to_baseline_pairs_on_repeat_when_the_table_has_one():
    one = synthetic_runs(folds=3)
    two = pd.concat([one.assign(repeat=0), one.assign(repeat=1, f1_LGG=one["f1_LGG"] + 0.01)],
                    ignore_index=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = compare_to_baseline(two, "ce", "f1_LGG").set_index("method")
        ref = compare_to_baseline(one, "ce", "f1_LGG").set_index("method")
    assert (out["n_pairs"] == 6).all()
    assert out.loc["kd", "mean_diff"] == pytest.approx(ref.loc["kd", "mean_diff"])

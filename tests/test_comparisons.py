"""kdlib.comparisons: paired per-split differences, the corrected repeated k-fold t-test by hand,
the Bayesian correlated t-test against baycomp, the fixed-test-set interval by hand."""

import math

import numpy as np
import pandas as pd
import pytest
from helpers_eval import synthetic_predictions
from scipy import stats as sps

from kdlib.comparisons import (
    HOLDOUT_CAVEAT,
    bayes_correlated_ttest,
    bayes_decision,
    design_shape,
    holdout_interval,
    holdout_se_boot,
    repeated_cv_ttest,
    split_differences,
)
from kdlib.errors import ConfigError, DataError
from kdlib.stats import bootstrap_fold_mean


def _runs(values: dict, ratios=(np.nan,), repeats=2, folds=3, seeds=(0, 1)) -> pd.DataFrame:
    """One row per method x repeat x fold x ratio x seed; f1_LGG = values[method](r, f, s)."""
    rows = []
    for m, fn in values.items():
        for rep in range(repeats):
            for f in range(folds):
                for ratio in ratios:
                    for s in seeds:
                        rows.append({"method": m, "repeat": rep, "fold": f, "ratio": ratio,
                                     "seed": s, "f1_LGG": fn(rep, f, s), "n_test_slices": 100,
                                     "n_train_slices": 300 + 100 * s})
    return pd.DataFrame(rows)


def test_split_differences_average_seeds_within_a_split_by_hand():
    runs = _runs({"kd": lambda r, f, s: 0.5 + 0.1 * r + 0.01 * f + 0.002 * s,
                  "ce": lambda r, f, s: 0.4 + 0.1 * r + 0.03 * s})
    d = split_differences(runs, "kd", "ce", "f1_LGG")
    assert len(d) == 6 and list(d[["repeat", "fold"]].itertuples(index=False)) == [
        (r, f) for r in range(2) for f in range(3)]
    # method mean over seeds 0.5+0.1r+0.01f+0.001, baseline 0.4+0.1r+0.015
    np.testing.assert_allclose(d["diff"], [0.1 + 0.01 * f + 0.001 - 0.015
                                           for _ in range(2) for f in range(3)])
    assert (d["n_seeds"] == 2).all() and (d["n_seeds_baseline"] == 2).all()
    # per-seed differences 0.1+0.01f and 0.1+0.01f+0.002-0.03: variance (0.028)^2 / 2
    np.testing.assert_allclose(d["seed_var"], 0.028**2 / 2)
    # n_test/n_train: 100/300 and 100/400 in each arm
    np.testing.assert_allclose(d["test_train_ratio"], (1 / 3 + 1 / 4) / 2)
    assert design_shape(d) == {"k": 3, "r": 2, "n": 6, "s": 2}


def test_split_differences_pair_on_ratio_including_the_natural_one():
    runs = _runs({"kd": lambda r, f, s: 0.6, "ce": lambda r, f, s: 0.5}, ratios=(np.nan, 4.0),
                 seeds=(0,))
    runs.loc[(runs["method"] == "kd") & (runs["ratio"] == 4.0), "f1_LGG"] = 0.9
    d = split_differences(runs, "kd", "ce", "f1_LGG")
    assert len(d) == 12
    np.testing.assert_allclose(d.loc[d["ratio"].isna(), "diff"], 0.1)
    np.testing.assert_allclose(d.loc[d["ratio"] == 4.0, "diff"], 0.4)
    assert d["seed_var"].isna().all()  # one seed: no within-split variance


def test_split_differences_without_repeat_column_is_repeat_zero():
    runs = _runs({"kd": lambda r, f, s: 0.6 + f / 10, "ce": lambda r, f, s: 0.5}, repeats=1)
    d = split_differences(runs.drop(columns="repeat"), "kd", "ce", "f1_LGG")
    assert (d["repeat"] == 0).all() and len(d) == 3
    np.testing.assert_allclose(d["diff"], [0.1, 0.2, 0.3])


def test_split_differences_select_arms_by_mapping_and_warn_on_unpaired_splits():
    runs = _runs({"kd": lambda r, f, s: 0.6, "ce": lambda r, f, s: 0.5}, seeds=(0,))
    runs["model"] = "cnn_xs"
    other = runs[runs["method"] == "ce"].assign(model="cnn_s", f1_LGG=0.0)
    runs = pd.concat([runs, other], ignore_index=True)
    d = split_differences(runs, "kd", {"method": "ce", "model": "cnn_xs"}, "f1_LGG")
    np.testing.assert_allclose(d["diff"], 0.1)
    with pytest.raises(DataError, match="share a split and seed"):
        split_differences(runs, "kd", "ce", "f1_LGG")
    short = runs[~((runs["method"] == "kd") & (runs["fold"] == 2))]
    with pytest.warns(UserWarning, match="no partner"):
        d = split_differences(short, "kd", {"method": "ce", "model": "cnn_xs"}, "f1_LGG")
    assert len(d) == 4
    with pytest.raises(DataError, match="matches no run"):
        split_differences(runs, "dkd", "ce", "f1_LGG")
    with pytest.raises(ConfigError, match="not in the run table"):
        split_differences(runs, "kd", "ce", "f1_HGG")


def test_repeated_cv_ttest_worked_example():
    # k = 3 folds x r = 2 repeats, n_test/n_train = 1/(k-1) = 0.5
    d = [0.02, 0.05, -0.01, 0.03, 0.04, 0.00]
    mean = 0.13 / 6                                          # 0.021667
    s2 = sum((x - mean) ** 2 for x in d) / 5                 # 5.3667e-4
    se = math.sqrt((1 / 6 + 0.5) * s2)                       # 0.018915
    t = mean / se                                            # 1.1455
    r = repeated_cv_ttest(d, 0.5)
    assert s2 == pytest.approx(5.36667e-4, rel=1e-5) and se == pytest.approx(0.0189150, rel=1e-5)
    assert r["t"] == pytest.approx(t) and r["t"] == pytest.approx(1.14546, abs=1e-4)
    assert r["df"] == 5 and r["n"] == 6
    assert r["p"] == pytest.approx(2 * sps.t.sf(t, 5)) and r["p"] == pytest.approx(0.3039, abs=1e-3)
    half = sps.t.ppf(0.975, 5) * se                          # 2.5706 x se
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((mean - half, mean + half))
    assert r["ci_low"] == pytest.approx(-0.02696, abs=1e-4)
    # without the correction term: the ordinary one-sample t-test and its interval
    plain = sps.ttest_1samp(d, 0.0)
    r0 = repeated_cv_ttest(d, 0.0, ci=0.9)
    assert r0["p"] == pytest.approx(plain.pvalue)
    assert (r0["ci_low"], r0["ci_high"]) == pytest.approx(tuple(plain.confidence_interval(0.9)))


def test_repeated_cv_ttest_bad_input():
    with pytest.raises(ConfigError, match="test_train_ratio"):
        repeated_cv_ttest([0.1, 0.2], float("nan"))
    with pytest.raises(ConfigError, match="confidence level"):
        repeated_cv_ttest([0.1, 0.2], 0.25, ci=95)
    with pytest.warns(UserWarning, match="at least 2"):
        assert np.isnan(repeated_cv_ttest([0.1], 0.25)["ci_low"])


@pytest.mark.parametrize("k, r, rope, seed", [(5, 1, 0.02, 0), (5, 3, 0.02, 1), (10, 2, 0.01, 2),
                                              (3, 4, 0.05, 3), (5, 2, 0.0, 4)])
def test_bayes_correlated_ttest_equals_baycomp(k, r, rope, seed):
    baycomp = pytest.importorskip("baycomp")
    rng = np.random.default_rng(seed)
    x = 0.6 + rng.normal(0, 0.03, k * r)
    y = x - 0.015 + rng.normal(0, 0.02, k * r)
    ours = bayes_correlated_ttest(x - y, 1 / (k - 1), rope)
    theirs = baycomp.two_on_single(x, y, rope=rope, runs=r)  # (x better, rope, y better)
    if rope == 0:
        theirs = (theirs[0], 0.0, theirs[1])
    assert (ours["p_better"], ours["p_rope"], ours["p_worse"]) == pytest.approx(theirs, abs=1e-12)
    post = baycomp.CorrelatedTTest(y, x, rope=rope, runs=r)  # posterior of x - y
    assert ours["mean"] == pytest.approx(post.mean) and ours["df"] == post.df
    assert ours["scale"] ** 2 == pytest.approx(post.var, rel=1e-12)


def test_bayes_correlated_ttest_degenerate_and_settings():
    r = bayes_correlated_ttest([0.05, 0.05, 0.05], 0.25, rope=0.02)
    assert (r["p_better"], r["p_rope"], r["p_worse"]) == (1.0, 0.0, 0.0)
    assert bayes_correlated_ttest([0.01, 0.01], 0.25)["p_rope"] == 1.0
    with pytest.raises(ConfigError, match="rope"):
        bayes_correlated_ttest([0.1, 0.2], 0.25, rope=-0.1)
    with pytest.warns(UserWarning, match="at least 2"):
        assert np.isnan(bayes_correlated_ttest([0.1], 0.25)["p_better"])


def test_bayes_decision():
    assert bayes_decision(0.96, 0.04, 0.0) == "better"
    assert bayes_decision(0.02, 0.97, 0.01) == "equivalent"
    assert bayes_decision(0.0, 0.01, 0.99) == "worse"
    assert bayes_decision(0.5, 0.3, 0.2) == "undecided"
    assert bayes_decision(0.92, 0.08, 0.0, threshold=0.9) == "better"


def test_holdout_interval_by_hand():
    d = [0.03, 0.01, 0.05, 0.02]
    mean, s2 = 0.0275, np.var(d, ddof=1)                    # s2 = 2.9167e-4
    se_boot, q = 0.02, 0.3
    train_var = s2 * (1 / 4 + q)                             # 1.6042e-4
    se = math.sqrt(train_var + se_boot**2)                   # 0.023673
    df = (train_var + se_boot**2) ** 2 / (train_var**2 / 3)  # Welch-Satterthwaite
    h = holdout_interval(d, se_boot, q)
    assert h["se"] == pytest.approx(se) and h["se"] == pytest.approx(0.023673, abs=1e-6)
    assert h["df"] == pytest.approx(df)
    half = sps.t.ppf(0.975, df) * se
    assert (h["ci_low"], h["ci_high"]) == pytest.approx((mean - half, mean + half))
    assert h["p"] == pytest.approx(2 * sps.t.sf(mean / se, df))
    assert h["caveat"] == HOLDOUT_CAVEAT and "fixed held-out test set" in h["caveat"]
    # splits taken as independent: s^2/n, and the caveat says so
    plain = holdout_interval(d, se_boot, None)
    assert plain["se"] == pytest.approx(math.sqrt(s2 / 4 + se_boot**2))   # 0.021747
    assert plain["se"] == pytest.approx(0.021747, abs=1e-6) and "independent" in plain["caveat"]
    # without test-set sampling and correction it is the one-sample t interval over the splits
    h0 = holdout_interval(d, 0.0, None)
    assert h0["df"] == pytest.approx(3)
    assert (h0["ci_low"], h0["ci_high"]) == pytest.approx(
        tuple(sps.ttest_1samp(d, 0.0).confidence_interval(0.95)))
    # identical splits: only the bootstrap part remains, a normal interval
    h1 = holdout_interval([0.02, 0.02, 0.02], 0.01, q)
    assert h1["df"] == np.inf and h1["ci_low"] == pytest.approx(0.02 - 1.959964 * 0.01)
    with pytest.raises(ConfigError, match="se_boot"):
        holdout_interval(d, -1.0, q)


def test_holdout_se_boot_is_the_paired_bootstrap_se():
    base = synthetic_predictions(16, 6, skill=1.0, seed=0)
    preds = [synthetic_predictions(16, 6, skill=1.6, seed=s) for s in (1, 2)]
    bases = [base, synthetic_predictions(16, 6, skill=1.0, seed=3)]
    se = holdout_se_boot(preds, bases, "macro_f1", n_boot=200, seed=5)
    ref = bootstrap_fold_mean(preds, bases, ["macro_f1"], n_boot=200, seed=5)
    assert se == pytest.approx(float(ref["se"].iloc[0])) and se > 0

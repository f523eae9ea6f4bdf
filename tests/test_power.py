"""kdlib.power: the design's standard error by hand, the detectable gain against the noncentral t and
a simulation of the corrected t-test, monotonicity, and the smallest design."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from kdlib.comparisons import repeated_cv_ttest
from kdlib.errors import ConfigError
from kdlib.power import (
    design_se,
    design_table,
    exact_power,
    fold_test_train_ratio,
    min_detectable_gain,
    power_summary,
    smallest_design,
    variance_components,
)


def test_design_se_by_hand():
    # k = 5, r = 2, s = 2; n_test/n_train = 1/3 (one fold tests, one validates, three train)
    se = design_se(0.04, 5, 2, 2, sd_seed=0.06)
    assert se == pytest.approx(math.sqrt((1 / 10 + 1 / 3) * (0.04**2 + 0.06**2 / 2)))
    assert design_se(0.04, 5, 2, test_train_ratio=0.25) == pytest.approx(
        math.sqrt((0.1 + 0.25) * 0.04**2))
    assert fold_test_train_ratio(5) == pytest.approx(1 / 3)
    assert fold_test_train_ratio(10, val_folds=0) == pytest.approx(1 / 9)
    # an observed 0.30 at k = 5 scales with the training folds: 0.30 x 3/8 at k = 10
    assert fold_test_train_ratio(10, observed=0.30, observed_k=5) == pytest.approx(0.1125)


def test_min_detectable_gain_by_hand_and_against_the_noncentral_t():
    k, r = 5, 3
    se = math.sqrt((1 / 15 + 1 / 3) * 0.05**2)
    by_hand = (sps.t.ppf(0.975, 14) + sps.t.ppf(0.8, 14)) * se   # (2.145 + 0.868) x se
    mdg = min_detectable_gain(0.05, k, r)
    assert mdg == pytest.approx(by_hand) and mdg == pytest.approx(0.0952, abs=5e-4)
    for k, r, s in [(3, 2, 1), (5, 1, 1), (5, 2, 3), (10, 4, 1)]:
        g = min_detectable_gain(0.05, k, r, s, sd_seed=0.03)
        assert exact_power(g, 0.05, k, r, s, sd_seed=0.03) == pytest.approx(0.80, abs=0.015)
    assert exact_power(0.0, 0.05, 5, 2) == pytest.approx(0.05)


def test_power_simulation_of_the_corrected_ttest_matches_exact_power():
    # equicorrelated normal differences with the correlation the correction assumes:
    # rho/(1-rho) = n_test/n_train, so var(mean) = (1/n + q) x E[s^2]
    k, r, q, sd = 5, 2, 1 / 3, 0.05
    n = k * r
    gain = min_detectable_gain(sd, k, r, test_train_ratio=q)
    rho = q / (1 + q)
    sigma = sd / math.sqrt(1 - rho)          # total SD so that E[s^2] = sd^2
    rng = np.random.default_rng(0)
    sims = 2000
    shared = rng.normal(0, sigma * math.sqrt(rho), (sims, 1))
    own = rng.normal(0, sigma * math.sqrt(1 - rho), (sims, n))
    d = gain + shared + own
    rejected = [repeated_cv_ttest(x, q)["p"] < 0.05 for x in d]
    assert np.mean(rejected) == pytest.approx(exact_power(gain, sd, k, r, test_train_ratio=q),
                                              abs=0.025)
    null = [repeated_cv_ttest(x, q)["p"] < 0.05 for x in d - gain]
    assert np.mean(null) == pytest.approx(0.05, abs=0.012)


def test_detectable_gain_is_monotone():
    g = [min_detectable_gain(0.05, 5, r) for r in range(1, 8)]
    assert all(a > b for a, b in itertools.pairwise(g))
    assert min_detectable_gain(0.05, 10, 2) < min_detectable_gain(0.05, 5, 2) \
        < min_detectable_gain(0.05, 3, 2)
    seeds = [min_detectable_gain(0.03, 5, 2, s, sd_seed=0.05) for s in (1, 2, 4)]
    assert seeds[0] > seeds[1] > seeds[2]
    assert min_detectable_gain(0.03, 5, 2, 4) == pytest.approx(min_detectable_gain(0.03, 5, 2, 1))
    assert min_detectable_gain(0.06, 5, 2) == pytest.approx(2 * min_detectable_gain(0.03, 5, 2))
    assert min_detectable_gain(0.05, 5, 2, power=0.9) > min_detectable_gain(0.05, 5, 2)
    assert min_detectable_gain(0.05, 5, 2, alpha=0.01) > min_detectable_gain(0.05, 5, 2)


def test_smallest_design_detects_and_one_repeat_less_does_not():
    best = smallest_design(0.04, 0.05, ks=(5, 10), max_repeats=10, seeds=(1, 2), sd_seed=0.03,
                           arms=3)
    k, r, s = int(best["k"]), int(best["r"]), int(best["s"])
    assert best["design"] == f"{k} folds x {r} repeats x {s} seeds"
    assert best["min_detectable_gain"] <= 0.05 and best["runs"] == 3 * k * r * s
    assert best["power_at_target"] >= 0.8
    table = design_table(0.04, 0.05, ks=(5, 10), max_repeats=10, seeds=(1, 2), sd_seed=0.03,
                         arms=3)
    cheaper = table[(table["runs"] < best["runs"])]
    assert not cheaper["detects"].any()
    if r > 1:
        assert min_detectable_gain(0.04, k, r - 1, s, sd_seed=0.03) > 0.05
    none = smallest_design(0.2, 0.01, ks=(5,), max_repeats=3)
    assert none["design"] is None and "no design" in none["reason"]


def test_variance_components_from_split_differences():
    d = pd.DataFrame({"diff": [0.01, 0.05, 0.03, 0.07], "n_seeds": 2,
                      "seed_var": [0.0004, 0.0006, 0.0004, 0.0006]})
    v = variance_components(d)
    sd_obs2 = np.var([0.01, 0.05, 0.03, 0.07], ddof=1)       # 6.6667e-4
    assert v["sd_observed"] == pytest.approx(math.sqrt(sd_obs2))
    assert v["sd_seed"] == pytest.approx(math.sqrt(0.0005))
    assert v["sd"] == pytest.approx(math.sqrt(sd_obs2 - 0.0005 / 2))
    one = variance_components(d.assign(n_seeds=1, seed_var=np.nan))
    assert one["sd_seed"] == 0 and one["sd"] == pytest.approx(math.sqrt(sd_obs2))


def test_power_settings_are_checked():
    with pytest.raises(ConfigError, match="k="):
        min_detectable_gain(0.05, 1, 3)
    with pytest.raises(ConfigError, match="sd="):
        design_se(-0.1, 5, 2)
    with pytest.raises(ConfigError, match="power="):
        min_detectable_gain(0.05, 5, 2, power=80)
    with pytest.raises(ConfigError, match="target_gain"):
        design_table(0.05, 0.0)


def test_power_summary_of_a_run_comparison():
    d = pd.DataFrame({"repeat": [0] * 5 + [1] * 5, "fold": list(range(5)) * 2,
                      "diff": [0.02, 0.08, -0.01, 0.05, 0.03, 0.06, 0.0, 0.04, 0.07, 0.01],
                      "n_seeds": 1, "seed_var": np.nan, "test_train_ratio": 1 / 3})
    p = power_summary(d, target_gain=0.05, ks=(5, 10), max_repeats=6, seeds=(1,))
    sd = float(np.std(d["diff"], ddof=1))
    assert (p["k"], p["r"], p["s"]) == (5, 2, 1) and p["sd"] == pytest.approx(sd)
    assert p["min_detectable_gain"] == pytest.approx(min_detectable_gain(sd, 5, 2))
    best = p["smallest_design"]
    assert best == smallest_design(sd, 0.05, (5, 10), 6, (1,), observed_ratio=1 / 3,
                                   observed_k=5)

"""kdlib.hypotheses: declared families, Holm within each family, exploratory rows, the guard's
non-inferiority check, the holdout path, question 2 cells and the correlation interval."""

import numpy as np
import pandas as pd
import pytest
from helpers_eval import synthetic_predictions

from kdlib.comparisons import (
    bayes_correlated_ttest,
    holdout_interval,
    holdout_se_boot,
    repeated_cv_ttest,
    split_differences,
)
from kdlib.errors import ConfigError, DataError
from kdlib.hypotheses import (
    EXPLORATORY,
    Family,
    cell_arms,
    cell_family,
    effect_table,
    family,
    gain_correlation,
)
from kdlib.stats import holm

# gain in f1_LGG and in macro_f1 per method
GAINS = {"ce": (0.0, 0.0), "logit_adjusted": (0.05, 0.0), "kd": (0.02, 0.0),
         "bkd": (0.25, -0.10), "dkd": (0.12, 0.005)}


def _runs(gains=GAINS, ratios=(np.nan, 16.0), repeats=2, folds=5, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    split = rng.normal(0, 0.03, (repeats, folds, len(ratios)))
    rows = []
    for m, (g, guard) in gains.items():
        for rep in range(repeats):
            for f in range(folds):
                for i, ratio in enumerate(ratios):
                    rows.append({"method": m, "repeat": rep, "fold": f, "ratio": ratio, "seed": 0,
                                 "f1_LGG": 0.4 + g + split[rep, f, i] + rng.normal(0, noise),
                                 "macro_f1": 0.7 + guard + split[rep, f, i] / 3
                                 + rng.normal(0, noise / 3),
                                 "n_test_slices": 200, "n_train_slices": 600})
    return pd.DataFrame(rows)


def test_family_validation_and_cross_product():
    f = family("Q1", ["kd", "dkd", "ce"], ["ce", "logit_adjusted"], ratios=[None, 16])
    assert ("ce", "ce") not in f.pairs and len(f.pairs) == 5 and f.size == 10
    assert f.covers("kd", "ce", float("nan"), "f1_LGG") and f.covers("dkd", "ce", 16.0, "f1_LGG")
    assert not f.covers("kd", "ce", 4.0, "f1_LGG") and not f.covers("kd", "ce", None, "macro_f1")
    with pytest.raises(ConfigError, match="two different arms"):
        Family("x", (("kd", "kd"),))
    with pytest.raises(ConfigError, match="ratio"):
        Family("x", (("kd", "ce"),), ratios=(0.5,))
    with pytest.raises(ConfigError, match="other than"):
        Family(EXPLORATORY, (("kd", "ce"),))


def test_effect_table_holm_within_the_family_and_exploratory_rows():
    runs = _runs()
    fam = family("Q1 primary", ["kd", "dkd", "bkd"], ["ce", "logit_adjusted"], ratios=[None, 16])
    t = effect_table(runs, [fam], rope=0.02)
    prim = t[t["family"] == "Q1 primary"]
    assert len(prim) == fam.size == 12 and (prim["family_size"] == 12).all()
    np.testing.assert_allclose(prim["p_holm"], holm(prim["p"]))
    expl = t[t["family"] == EXPLORATORY]
    # the other arms against the declared baselines: logit_adjusted vs ce at two ratios
    assert set(zip(expl["method"], expl["baseline"])) == {("logit_adjusted", "ce")}
    assert len(expl) == 2 and expl["p_holm"].isna().all()
    assert not ((t["method"] == t["baseline"]).any())
    # every number is the comparison functions' own
    row = prim[(prim["method"] == "dkd") & (prim["baseline"] == "logit_adjusted")
               & (prim["ratio"] == 16)].iloc[0]
    d = split_differences(runs[runs["ratio"] == 16], "dkd", "logit_adjusted", "f1_LGG")
    tt = repeated_cv_ttest(d["diff"], 1 / 3)
    by = bayes_correlated_ttest(d["diff"], 1 / 3, 0.02)
    assert (row["k"], row["r"], row["s"], row["n_splits"]) == (5, 2, 1, 10)
    for ours, ref in (("gain", "mean"), ("ci_low", "ci_low"), ("ci_high", "ci_high"),
                      ("p", "p"), ("se", "se")):
        assert row[ours] == pytest.approx(tt[ref])
    assert (row["p_better"], row["p_rope"], row["p_worse"]) == pytest.approx(
        (by["p_better"], by["p_rope"], by["p_worse"]))
    assert row["test_train_ratio"] == pytest.approx(1 / 3)


def test_guard_non_inferiority_decides_what_counts_as_a_fix():
    t = effect_table(_runs(), [family("Q1", ["kd", "dkd", "bkd"], ["ce"], ratios=[16])],
                     margin=0.02)
    t = t[t["family"] == "Q1"].set_index("method")
    # bkd buys LGG F1 with macro-F1: a significant gain, the guard clearly worse
    assert t.loc["bkd", "gain"] > 0.2 and t.loc["bkd", "p_holm"] < 0.05
    assert t.loc["bkd", "guard_ci_high"] < 0 and not t.loc["bkd", "guard_noninferior"]
    assert t.loc["bkd", "verdict"] == "gain, guard worse"
    # dkd gains and keeps macro-F1 within the margin: a fix
    assert t.loc["dkd", "guard_ci_low"] > -0.02 and t.loc["dkd", "verdict"] == "fix"
    assert t.loc["dkd", "bayes"] == "better"
    # kd's small gain is not detectable with this design
    assert t.loc["kd", "verdict"] == "no detectable difference"
    # with a margin of zero, dkd's guard is no longer shown non-inferior
    strict = effect_table(_runs(), [family("Q1", ["dkd"], ["ce"], ratios=[16])], margin=0.0)
    assert strict.iloc[0]["verdict"] in ("fix", "gain, guard not shown non-inferior")
    assert strict.iloc[0]["guard_noninferior"] == (strict.iloc[0]["guard_ci_low"] > 0)


def test_effect_table_refuses_undeclarable_families_and_bad_settings():
    runs = _runs()
    with pytest.raises(DataError, match="no runs"):
        effect_table(runs, [family("Q1", ["kd"], ["focal"])])
    with pytest.raises(DataError, match="no runs"):
        effect_table(runs, [family("Q1", ["kd"], ["ce"], ratios=[4])])
    with pytest.raises(ConfigError, match="design"):
        effect_table(runs, [family("Q1", ["kd"], ["ce"])], design="bootstrap")
    with pytest.raises(ConfigError, match="predictions"):
        effect_table(runs, [family("Q1", ["kd"], ["ce"])], design="holdout")
    with pytest.raises(ConfigError, match="share a name"):
        effect_table(runs, [family("Q", ["kd"], ["ce"]), family("Q", ["dkd"], ["ce"])])


def test_effect_table_holdout_design_uses_the_combined_interval():
    base_test = synthetic_predictions(16, 6, seed=0)[["subject_id", "slice", "label"]]
    rows, preds = [], {}
    for m, skill in (("ce", 0.8), ("kd", 1.4)):
        for f in range(3):
            rid = f"{m}-{f}"
            preds[rid] = synthetic_predictions(16, 6, skill=skill, seed=10 * f + len(m))
            preds[rid][["subject_id", "slice", "label"]] = base_test
            from kdlib.metrics import slice_metrics
            sm = slice_metrics(preds[rid])
            rows.append({"run_id": rid, "method": m, "repeat": 0, "fold": f, "ratio": np.nan,
                         "seed": 0, "f1_LGG": sm["f1_LGG"], "macro_f1": sm["macro_f1"],
                         "n_test_slices": 96, "n_train_slices": 300})
    runs = pd.DataFrame(rows)
    t = effect_table(runs, [family("Q1", ["kd"], ["ce"])], design="holdout",
                     predictions=lambda row: preds[row["run_id"]], n_boot=200, seed=3)
    row = t.iloc[0]
    d = split_differences(runs, "kd", "ce", "f1_LGG")
    se_boot = holdout_se_boot([preds[f"kd-{f}"] for f in range(3)],
                              [preds[f"ce-{f}"] for f in range(3)], "f1_LGG", 200, 3)
    h = holdout_interval(d["diff"], se_boot, 96 / 300)
    assert (row["ci_low"], row["ci_high"], row["p"]) == pytest.approx(
        (h["ci_low"], h["ci_high"], h["p"]))
    assert "fixed held-out test set" in row["caveat"]
    assert row["p_better"] + row["p_rope"] + row["p_worse"] == pytest.approx(1)


def _q2_runs():
    rng = np.random.default_rng(1)
    params = {"cnn_xs": 6e3, "cnn_s": 5e4, "cnn_m": 3e5, "cnn_l": 2e6, "resnet18": 1.1e7}
    teachers, students = ["cnn_m", "cnn_l", "resnet18"], ["cnn_xs", "cnn_s"]
    rows = []
    for rep in range(2):
        for f in range(5):
            split = rng.normal(0, 0.03)
            for s in students:
                rows.append({"model": s, "method": "ce", "teacher_model": None, "role":
                             "student alone", "repeat": rep, "fold": f, "ratio": 4.0, "seed": 0,
                             "f1_LGG": 0.4 + split, "macro_f1": 0.7,
                             "n_test_slices": 200, "n_train_slices": 600})
                for t in teachers:
                    gain = 0.02 * np.log10(params[t] / params[s])
                    rows.append({"model": s, "method": "kd", "teacher_model": t,
                                 "role": "distilled", "repeat": rep, "fold": f, "ratio": 4.0,
                                 "seed": 0, "f1_LGG": 0.4 + split + gain + rng.normal(0, 0.005),
                                 "macro_f1": 0.7, "n_test_slices": 200, "n_train_slices": 600})
            for t in teachers:
                rows.append({"model": t, "method": "ce", "teacher_model": None, "role": "teacher",
                             "repeat": rep, "fold": f, "ratio": 4.0, "seed": 0, "f1_LGG": 0.5,
                             "macro_f1": 0.75, "n_test_slices": 200, "n_train_slices": 600})
    return pd.DataFrame(rows), params


def test_question_2_cells_against_the_students_own_baseline():
    runs, _ = _q2_runs()
    arms = cell_arms(runs, "kd")
    assert "teacher" not in set(arms["role"])
    fam = cell_family(arms, ratio=4.0)
    assert fam.size == 6 and ("cnn_l->cnn_s", "cnn_s") in fam.pairs
    t = effect_table(arms, [fam], column="arm", baselines=())  # no cross-student rows
    assert (t["family"] == fam.name).all() and len(t) == 6
    assert len(effect_table(arms, [fam], column="arm")) > 6  # cells against the other student
    row = t[t["method"] == "resnet18->cnn_xs"].iloc[0]
    assert row["baseline"] == "cnn_xs"
    assert row["gain"] == pytest.approx(0.02 * np.log10(1.1e7 / 6e3), abs=0.01)


def test_gain_correlation_interval_and_too_few_cells():
    runs, params = _q2_runs()
    arms = cell_arms(runs, "kd")
    fam = cell_family(arms, ratio=4.0)
    ratio_x = {c: params[c.split("->")[0]] / params[c.split("->")[1]] for c, _ in fam.pairs}
    c = gain_correlation(arms, fam, ratio_x, n_boot=500, seed=1)
    # the gain grows with log(teacher/student size) by construction: rank correlation 1
    assert c["rho"] == pytest.approx(1.0) and c["n_cells"] == 6 and c["n_splits"] == 10
    assert c["ci_low"] <= c["rho"] <= c["ci_high"] and c["ci_low"] > 0.5
    assert gain_correlation(arms, fam, ratio_x, n_boot=500, seed=1) == c
    teacher_x = {cell: params[cell.split("->")[0]] for cell, _ in fam.pairs}
    few = Family("two cells", fam.pairs[:3], ratios=(4.0,))
    out = gain_correlation(arms, few, teacher_x)
    assert out["rho"] is None and "at least 4 cells" in out["reason"]
    with pytest.raises(ConfigError, match="no value"):
        gain_correlation(arms, fam, {})

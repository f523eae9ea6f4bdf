"""kdlib.calibration: the pseudo-patient data set, the seeded model, and a reduced calibration
(fixed seed, a few dozen replicates) with loose but meaningful bounds."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from kdlib import CLASSES
from kdlib.calibration import (
    DIGITS,
    CalibrationConfig,
    calibrate,
    pseudo_patients,
    replicate_runs,
    summary,
    train_softmax,
)
from kdlib.errors import ConfigError


def test_pseudo_patients_have_the_task_shape():
    x, table = pseudo_patients(np.random.default_rng(0), (4, 4), hgg_per_lgg=2.0)
    assert x.shape == (len(table), 64) and 0 <= x.min() and x.max() <= 1
    grades = table.drop_duplicates("subject_id").set_index("subject_id")["grade"]
    n_hgg, n_lgg = (grades == "HGG").sum(), (grades == "LGG").sum()
    assert n_lgg < n_hgg and n_hgg / n_lgg == pytest.approx(2.0, abs=0.1)
    # every patient: 4 healthy images and 4 of its own grade, never of the other grade
    per = table.groupby("subject_id")["label"].value_counts().unstack(fill_value=0)
    assert (per["healthy"] == 4).all()
    assert (per.loc[grades[grades == "HGG"].index, "HGG"] == 4).all()
    assert (per.loc[grades[grades == "LGG"].index, "LGG"] == 4).all()
    assert (per.loc[grades[grades == "HGG"].index, "LGG"] == 0).all()
    assert set(table["label"]) == set(CLASSES) and table["slice"].is_unique
    # images are not reused and a new generator regroups them
    assert len(np.unique(x, axis=0)) >= len(x) - 10  # load_digits holds a few duplicates
    x2, _ = pseudo_patients(np.random.default_rng(1))
    assert not np.array_equal(x, x2)


def test_train_softmax_is_seeded_and_learns():
    x, table = pseudo_patients(np.random.default_rng(0))
    y = table["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    tr, va = np.arange(len(y)) % 3 != 0, np.arange(len(y)) % 3 == 0
    w1 = train_softmax(x[tr], y[tr], x[va], y[va], seed=5)
    w2 = train_softmax(x[tr], y[tr], x[va], y[va], seed=5)
    w3 = train_softmax(x[tr], y[tr], x[va], y[va], seed=6)
    assert np.array_equal(w1, w2) and not np.array_equal(w1, w3)
    acc = ((np.c_[x[va], np.ones(va.sum())] @ w1).argmax(axis=1) == y[va]).mean()
    assert acc > 0.8  # three classes, chance about 0.5 (the healthy share)


def test_replicate_runs_table_has_the_run_table_columns():
    cfg = CalibrationConfig(k_folds=3, repeats=2, seeds=2, replicates=1)
    runs, preds = replicate_runs(cfg, 0)
    assert set(runs["method"]) == {"A", "B", "A+LA"} and not preds
    assert len(runs) == 3 * 3 * 2 * 2  # methods x folds x repeats x seeds
    for c in ("repeat", "fold", "ratio", "seed", "f1_LGG", "macro_f1", "n_test_slices",
              "n_train_slices"):
        assert c in runs.columns
    # cv design: every image is tested once per repeat
    _, table = pseudo_patients(np.random.default_rng([cfg.seed, 0]))
    per_repeat = runs[(runs["method"] == "A") & (runs["seed"] == 0)].groupby("repeat")
    assert (per_repeat["n_test_slices"].sum() == len(table)).all()
    with pytest.raises(ConfigError, match="design"):
        CalibrationConfig(design="bootstrap")


def test_reduced_calibration_cv():
    """30 A/A replicates of 5 folds x 2 repeats: the corrected test neither rejects everything
    (as the uncorrected one does) nor nothing, and the real logit-adjustment gain is found."""
    cfg = CalibrationConfig(k_folds=5, repeats=2, replicates=30, seed=11)
    out = calibrate(cfg)
    assert len(out) == 30 and (out["aa_n"] == 10).all()
    t2 = (out["aa_mean"] / out["aa_se"]) ** 2
    # calibrated: E[t^2] = df/(df-2) = 1.29; the bounds are loose (SE of the mean about 0.4)
    assert 0.3 < t2.mean() < 3.0
    naive = (out["aa_mean"] / (out["aa_sd"] / np.sqrt(out["aa_n"]))) ** 2
    assert naive.mean() > 2 * t2.mean()  # without the correction the spread is understated
    assert (out["aa_p"] < 0.05).mean() <= 0.2
    assert (out["la_p"] < 0.05).mean() >= 0.8 and out["la_mean"].mean() > 0
    s = summary(out, None)
    fp = s[s["what"].str.startswith("corrected repeated")].iloc[0]
    assert fp["rate"] == pytest.approx((out["aa_p"] < 0.05).mean())
    assert fp["binomial_se"] == pytest.approx(np.sqrt(fp["rate"] * (1 - fp["rate"]) / 30))


def test_reduced_calibration_holdout_bootstrap_measures_test_sampling():
    """On a fixed test set the patient bootstrap's SE predicts how much two independent halves of
    the test set disagree for one pair of models (z about N(0, 1)); the combined interval is wider
    than the bootstrap alone."""
    cfg = CalibrationConfig(design="holdout", k_folds=3, repeats=1, replicates=12, n_boot=100,
                            seed=5)
    out = calibrate(cfg)
    assert 0.3 < (out["half_z"] ** 2).mean() < 3.0
    assert (out["aa_se"] >= out["boot_se"]).all()
    lo, hi = out["boot_low"], out["boot_high"]
    assert ((hi - lo) < 2 * sps.t.ppf(0.975, out["aa_df"]) * out["aa_se"]).all()
    assert isinstance(summary(None, out), pd.DataFrame)
    assert set(DIGITS) == set(CLASSES)

"""kdlib.sizing: the power section's tables agree with kdlib.power on the observed per-split
differences of each primary comparison, and the family's design detects the target."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from helpers_eval import experiment_runs, quiet

from kdlib import analysis as A
from kdlib import power as PW
from kdlib import sizing as S
from kdlib.comparisons import split_differences
from kdlib.errors import DataError
from kdlib.experiment import Experiment

EXP = Experiment(ratios=(None, 4), grid_ratio=4)


@pytest.fixture(scope="module")
def tables():
    runs = experiment_runs(EXP, {"kd": 0.1, "bkd": 0.2}, folds=5, repeats=2)
    q1 = A.q1_runs(runs, EXP)
    return runs, q1, quiet(A.q1_effects, q1, EXP)


def test_runs_per_split_counts_trained_runs_only(tables):
    runs, _, _ = tables
    n = len(runs) // 10  # 5 folds x 2 repeats x 1 seed
    assert S.runs_per_split(runs) == n
    derived = runs.iloc[:10].assign(derived_posthoc_tau=1.0)
    assert S.runs_per_split(pd.concat([runs.assign(derived_posthoc_tau=np.nan), derived])) == n


def test_power_table_matches_kdlib_power(tables):
    _, q1, effects = tables
    table = quiet(S.power_table, q1, effects, target=0.05, alpha=0.05, arms=7)
    assert len(table) == 20 and (table["m"] == 20).all()
    row = table[(table["method"] == "kd") & (table["baseline"] == "ce")
                & (table["ratio"] == 4.0)].iloc[0]
    d = quiet(split_differences, q1[q1["ratio"] == 4.0], "kd", "ce", "f1_LGG")
    assert row["sd"] == pytest.approx(d["diff"].std(ddof=1)) and row["sd_seed"] == 0
    assert (row["k"], row["r"], row["s"]) == (5, 2, 1)
    q = 100 / 300
    assert row["mdg"] == pytest.approx(PW.min_detectable_gain(row["sd"], 5, 2, 1, 0.05, 0.8, q))
    assert row["mdg_family"] == pytest.approx(
        PW.min_detectable_gain(row["sd"], 5, 2, 1, 0.05 / 20, 0.8, q))
    assert row["mdg_family"] > row["mdg"]
    with pytest.raises(DataError, match="no comparison of family"):
        S.power_table(q1, effects, family_name="nope")


def test_family_design_detects_the_target(tables):
    _, q1, effects = tables
    table = quiet(S.power_table, q1, effects)
    d = S.family_design(table, target=0.05, alpha=0.05, arms=7)
    assert d["sd"] == pytest.approx(np.sqrt((table["sd"] ** 2).mean()))
    assert (d["k"], d["r"], d["s"], d["m"]) == (5, 2, 1, 20)
    assert d["mdg"] == pytest.approx(PW.min_detectable_gain(d["sd"], 5, 2, 1, 0.05, 0.8, 1 / 3))
    for key, level in (("needed", 0.05), ("needed_family", 0.05 / 20)):
        if d[key] is None:
            assert "no design" in d[f"{key}_reason"]
            continue
        k, r, s = (int(x.split()[0]) for x in d[key].split(" x "))
        q = PW.fold_test_train_ratio(k, 1 / 3, 5)
        assert PW.min_detectable_gain(d["sd"], k, r, s, level, 0.8, q) <= 0.05
        assert d[f"{key}_runs"] == k * r * s * 7
    assert S.family_design(table.drop(columns=["sd"]))["sd"] is None

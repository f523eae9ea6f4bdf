"""Patient-level splits: no leakage, stratification, ratio control, determinism, errors."""

from __future__ import annotations

import logging
import math

import pandas as pd
import pytest

from kdlib.data.splits import (
    SplitConfig,
    achieved_ratio,
    check_no_leakage,
    fold_subjects,
    load_splits,
    make_splits,
    save_splits,
    split_table,
)
from kdlib.errors import ConfigError, DataError


def subjects(n_hgg: int = 60, n_lgg: int = 16) -> pd.DataFrame:
    grades = ["HGG"] * n_hgg + ["LGG"] * n_lgg
    ids = [f"BraTS20_Training_{i:03d}" for i in range(1, len(grades) + 1)]
    return pd.DataFrame({"subject_id": ids, "grade": grades}).sample(frac=1, random_state=1)


def test_every_subject_once_and_no_leakage():
    splits = make_splits(subjects(), SplitConfig())
    assert list(splits.columns) == ["subject_id", "grade", "fold"]
    assert splits["subject_id"].is_unique and len(splits) == 76
    assert set(splits["fold"]) == {-1, 0, 1, 2}
    for k in range(3):
        for ratio in (None, 1, 4, 8, 16):
            sets = fold_subjects(splits, k, ratio)
            check_no_leakage(sets)
            assert set(sets["val"]) == set(splits.loc[splits["fold"] == k, "subject_id"])
            assert set(sets["test"]) == set(splits.loc[splits["fold"] == -1, "subject_id"])


def test_stratified_test_and_folds_keep_grade_proportions():
    splits = make_splits(subjects(60, 16), SplitConfig(test_fraction=0.25, k_folds=4))
    test = splits[splits["fold"] == -1]
    assert (test["grade"] == "LGG").sum() == 4 and (test["grade"] == "HGG").sum() == 15
    for k in range(4):
        n_lgg = ((splits["fold"] == k) & (splits["grade"] == "LGG")).sum()
        assert n_lgg == 3  # 12 LGG left over 4 folds


def test_balanced_test_set():
    splits = make_splits(subjects(60, 16), SplitConfig(test_mode="balanced", n_test_per_grade=5))
    assert splits[splits["fold"] == -1]["grade"].value_counts().to_dict() == {"HGG": 5, "LGG": 5}
    default = make_splits(subjects(60, 16), SplitConfig(test_mode="balanced", test_fraction=0.125))
    assert default[default["fold"] == -1]["grade"].value_counts().to_dict() == {"HGG": 5, "LGG": 5}


def test_deterministic_and_seeded():
    a = make_splits(subjects(), SplitConfig(seed=3))
    b = make_splits(subjects().sample(frac=1, random_state=7), SplitConfig(seed=3))
    pd.testing.assert_frame_equal(a, b)  # input order does not matter
    c = make_splits(subjects(), SplitConfig(seed=4))
    assert not a["fold"].equals(c["fold"])
    assert fold_subjects(a, 1, 8, seed=2) == fold_subjects(a, 1, 8, seed=2)


def test_ratio_control_is_nested_and_keeps_one_lgg():
    splits = make_splits(subjects(60, 16), SplitConfig(test_fraction=0.2, k_folds=3))
    lgg_ids = set(splits.loc[splits["grade"] == "LGG", "subject_id"])
    natural = fold_subjects(splits, 0)
    n_hgg = sum(s not in lgg_ids for s in natural["train"])
    kept = {}
    for ratio in (4, 8, 16, 1000):
        sets = fold_subjects(splits, 0, ratio, seed=5)
        kept[ratio] = {s for s in sets["train"] if s in lgg_ids}
        assert len(kept[ratio]) == max(1, math.floor(n_hgg / ratio + 0.5))
        assert sum(s not in lgg_ids for s in sets["train"]) == n_hgg  # HGG untouched
        assert sets["val"] == natural["val"] and sets["test"] == natural["test"]
    assert kept[16] <= kept[8] <= kept[4]
    assert len(kept[1000]) == 1
    assert achieved_ratio(splits, fold_subjects(splits, 0, 8)["train"]) == pytest.approx(8, rel=0.2)


def test_ratio_below_natural_keeps_all_lgg(caplog):
    splits = make_splits(subjects(60, 16), SplitConfig())
    natural = fold_subjects(splits, 0)
    with caplog.at_level(logging.WARNING, logger="kdlib.data.splits"):
        sets = fold_subjects(splits, 0, ratio=1)
    assert sets == natural
    assert "keeping all" in caplog.text
    assert achieved_ratio(splits, sets["train"]) == achieved_ratio(splits, natural["train"]) > 1


def test_ratio_below_one_and_bad_fold():
    splits = make_splits(subjects(), SplitConfig())
    with pytest.raises(ConfigError, match="ratio"):
        fold_subjects(splits, 0, ratio=0.5)
    with pytest.raises(ConfigError, match="fold=7"):
        fold_subjects(splits, 7)


def test_too_few_subjects_or_lgg_for_k_folds():
    with pytest.raises(DataError, match="LGG.*lower k_folds"):
        make_splits(subjects(60, 4), SplitConfig(k_folds=5))
    with pytest.raises(DataError, match="k_folds=3"):
        make_splits(subjects(2, 2), SplitConfig(k_folds=3))
    with pytest.raises(DataError, match="HGG"):
        make_splits(subjects(10, 10), SplitConfig(test_mode="balanced", n_test_per_grade=9))


def test_fold_without_lgg_is_an_error():
    splits = make_splits(subjects(), SplitConfig())
    lgg_fold1 = (splits["fold"] == 1) & (splits["grade"] == "LGG")
    splits.loc[lgg_fold1, "fold"] = 0
    with pytest.raises(DataError, match="fold 1 has no LGG subject; lower k_folds"):
        fold_subjects(splits, 0)


def test_save_load_roundtrip_and_leak_check(tmp_path):
    splits = make_splits(subjects(), SplitConfig())
    path = save_splits(splits, tmp_path / "splits.csv")
    pd.testing.assert_frame_equal(load_splits(path), splits)
    leaky = pd.concat([splits, splits.iloc[:2].assign(fold=-1)])
    with pytest.raises(DataError, match="leak"):
        save_splits(leaky, tmp_path / "leaky.csv")
    leaky.to_csv(tmp_path / "leaky.csv", index=False)
    with pytest.raises(DataError, match=splits.iloc[0]["subject_id"]):
        load_splits(tmp_path / "leaky.csv")
    splits.drop(columns="fold").to_csv(tmp_path / "nofold.csv", index=False)
    with pytest.raises(DataError, match=r"lacks column\(s\) \['fold'\]"):
        load_splits(tmp_path / "nofold.csv")
    with pytest.raises(DataError, match="not found"):
        load_splits(tmp_path / "missing.csv")


def test_check_no_leakage_names_subjects():
    check_no_leakage({"train": ["a", "b"], "val": ["c"], "test": ["d"]})
    with pytest.raises(DataError, match=r"b in \['train', 'test'\]"):
        check_no_leakage({"train": ["a", "b"], "val": ["c"], "test": ["b"]})


def test_bad_subject_tables():
    with pytest.raises(DataError, match="grade"):
        make_splits(pd.DataFrame({"subject_id": ["a"]}), SplitConfig())
    with pytest.raises(DataError, match="two different grades"):
        make_splits(
            pd.DataFrame({"subject_id": ["a", "a"], "grade": ["HGG", "LGG"]}), SplitConfig()
        )
    with pytest.raises(DataError, match="unknown grade"):
        make_splits(pd.DataFrame({"subject_id": ["a"], "grade": ["GBM"]}), SplitConfig())


@pytest.mark.parametrize(
    "bad",
    [
        {"test_fraction": 1.0},
        {"test_mode": "random"},
        {"k_folds": 1},
        {"n_test_per_grade": 3},
        {"test_mode": "balanced", "n_test_per_grade": 0},
    ],
)
def test_split_config_validation(bad):
    with pytest.raises(ConfigError):
        SplitConfig(**bad)


def test_split_table_counts_slices():
    subj = subjects(12, 6)
    splits = make_splits(subj, SplitConfig(k_folds=2))
    slices = pd.concat(
        [
            pd.DataFrame({"subject_id": s, "grade": g, "label": ["healthy", "healthy", g]})
            for s, g in zip(subj["subject_id"], subj["grade"])
        ]
    )
    table = split_table(splits, slices)
    assert list(table.index) == ["test", "fold 0", "fold 1", "total"]
    assert table.loc["total", "healthy"] == 36 and table.loc["total", "slices"] == 54
    assert table.loc["total", "subjects_LGG"] == 6
    test = splits[splits["fold"] == -1]
    assert table.loc["test", "LGG"] == (test["grade"] == "LGG").sum()
    # make_splits accepts the slice table itself (one row per slice)
    pd.testing.assert_frame_equal(make_splits(slices, SplitConfig(k_folds=2)), splits)

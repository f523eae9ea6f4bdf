"""Patient-level splits: repeated partitions (cv and holdout), no leakage in any repeat, each
subject tested once per repeat, stratification, ratio control, determinism, old files, errors."""

from __future__ import annotations

import logging
import math

import pandas as pd
import pytest

from kdlib.data.splits import (
    SplitConfig,
    achieved_ratio,
    check_no_leakage,
    check_splits,
    design_of,
    fold_grades,
    fold_subjects,
    load_splits,
    make_splits,
    repeat_summary,
    save_splits,
    split_pairs,
    split_table,
)
from kdlib.errors import ConfigError, DataError


def subjects(n_hgg: int = 60, n_lgg: int = 16) -> pd.DataFrame:
    grades = ["HGG"] * n_hgg + ["LGG"] * n_lgg
    ids = [f"BraTS20_Training_{i:03d}" for i in range(1, len(grades) + 1)]
    return pd.DataFrame({"subject_id": ids, "grade": grades}).sample(frac=1, random_state=1)


HOLDOUT = {"design": "holdout", "k_folds": 3}


def test_holdout_every_subject_once_and_no_leakage():
    splits = make_splits(subjects(), SplitConfig(**HOLDOUT))
    assert list(splits.columns) == ["subject_id", "grade", "repeat", "fold"]
    assert set(splits["repeat"]) == {0} and design_of(splits) == "holdout"
    assert splits["subject_id"].is_unique and len(splits) == 76
    assert set(splits["fold"]) == {-1, 0, 1, 2}
    for k in range(3):
        for ratio in (None, 1, 4, 8, 16):
            sets = fold_subjects(splits, k, ratio)
            check_no_leakage(sets)
            assert set(sets["val"]) == set(splits.loc[splits["fold"] == k, "subject_id"])
            assert set(sets["test"]) == set(splits.loc[splits["fold"] == -1, "subject_id"])


def test_stratified_test_and_folds_keep_grade_proportions():
    splits = make_splits(subjects(60, 16), SplitConfig(design="holdout", test_fraction=0.25, k_folds=4))
    test = splits[splits["fold"] == -1]
    assert (test["grade"] == "LGG").sum() == 4 and (test["grade"] == "HGG").sum() == 15
    for k in range(4):
        n_lgg = ((splits["fold"] == k) & (splits["grade"] == "LGG")).sum()
        assert n_lgg == 3  # 12 LGG left over 4 folds


def test_balanced_test_set():
    splits = make_splits(subjects(60, 16), SplitConfig(**HOLDOUT, test_mode="balanced", n_test_per_grade=5))
    assert splits[splits["fold"] == -1]["grade"].value_counts().to_dict() == {"HGG": 5, "LGG": 5}
    default = make_splits(subjects(60, 16), SplitConfig(**HOLDOUT, test_mode="balanced",
                                                          test_fraction=0.125))
    assert default[default["fold"] == -1]["grade"].value_counts().to_dict() == {"HGG": 5, "LGG": 5}


def test_deterministic_and_seeded():
    a = make_splits(subjects(), SplitConfig(seed=3))
    b = make_splits(subjects().sample(frac=1, random_state=7), SplitConfig(seed=3))
    pd.testing.assert_frame_equal(a, b)  # input order does not matter
    c = make_splits(subjects(), SplitConfig(seed=4))
    assert not a["fold"].equals(c["fold"])
    assert fold_subjects(a, 1, 8, seed=2) == fold_subjects(a, 1, 8, seed=2)


def test_ratio_control_is_nested_and_keeps_one_lgg():
    splits = make_splits(subjects(60, 16), SplitConfig(**HOLDOUT, test_fraction=0.2))
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
    splits = make_splits(subjects(60, 16), SplitConfig(**HOLDOUT))
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
    with pytest.raises(ConfigError, match=r"fold=7 .*\[0, 1, 2, 3, 4\]"):
        fold_subjects(splits, 7)
    with pytest.raises(ConfigError, match=r"repeat=2 .*\[0\]"):
        fold_subjects(splits, 0, repeat=2)


def test_too_few_subjects_or_lgg_for_k_folds():
    with pytest.raises(DataError, match="LGG.*lower k_folds"):
        make_splits(subjects(60, 4), SplitConfig(k_folds=5))
    with pytest.raises(DataError, match="k_folds=3"):
        make_splits(subjects(2, 2), SplitConfig(k_folds=3))
    with pytest.raises(DataError, match="HGG.*or the test size"):
        make_splits(subjects(10, 10), SplitConfig(**HOLDOUT, test_mode="balanced",
                                                  n_test_per_grade=9))


def test_fold_without_lgg_is_an_error():
    splits = make_splits(subjects(), SplitConfig(repeats=2))
    lgg_fold1 = (splits["fold"] == 1) & (splits["grade"] == "LGG") & (splits["repeat"] == 1)
    splits.loc[lgg_fold1, "fold"] = 0
    with pytest.raises(DataError, match="fold 1 of repeat 1 has no LGG subject; lower k_folds"):
        fold_subjects(splits, 0, repeat=1)
    fold_subjects(splits, 0, repeat=0)  # the other repeat is fine


def test_save_load_roundtrip_and_leak_check(tmp_path):
    splits = make_splits(subjects(), SplitConfig(**HOLDOUT))
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
        {"design": "holdout", "test_fraction": 1.0},
        {"design": "holdout", "test_fraction": 0.0},
        {"design": "holdout", "test_mode": "random"},
        {"design": "holdout", "k_folds": 1},
        {"design": "holdout", "n_test_per_grade": 3},
        {"design": "holdout", "test_mode": "balanced", "n_test_per_grade": 0},
        {"design": "nested"},
        {"k_folds": 2},
        {"k_folds": 4.0},
        {"repeats": 0},
        {"repeats": True},
    ],
)
def test_split_config_validation(bad):
    with pytest.raises(ConfigError):
        SplitConfig(**bad)


def test_split_table_counts_slices():
    subj = subjects(12, 6)
    splits = make_splits(subj, SplitConfig(design="holdout", k_folds=2))
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
    pd.testing.assert_frame_equal(make_splits(slices, SplitConfig(design="holdout", k_folds=2)),
                                  splits)


RATIOS = (None, 4, 8, 16)


def test_cv_each_subject_tested_once_per_repeat_and_no_leakage():
    splits = make_splits(subjects(60, 16), SplitConfig(k_folds=5, repeats=3))
    assert list(splits.columns) == ["subject_id", "grade", "repeat", "fold"]
    assert design_of(splits) == "cv" and len(splits) == 3 * 76
    assert split_pairs(splits) == [(r, f) for r in range(3) for f in range(5)]
    for r in range(3):
        tested, validated = [], []
        for f in range(5):
            for ratio in RATIOS:
                sets = fold_subjects(splits, f, ratio, seed=1, repeat=r)
                check_no_leakage(sets)
                assert len(sets["train"]) + len(sets["val"]) + len(sets["test"]) <= 76
            sets = fold_subjects(splits, f, repeat=r)
            assert len(sets["train"]) + len(sets["val"]) + len(sets["test"]) == 76
            tested += sets["test"]
            validated += sets["val"]
            in_fold = splits[(splits["repeat"] == r) & (splits["fold"] == f)]["subject_id"]
            assert sets["test"] == sorted(in_fold)
        assert sorted(tested) == sorted(validated) == sorted(subjects(60, 16)["subject_id"])
    summary = repeat_summary(splits)
    assert list(summary.index) == [0, 1, 2]
    assert (summary["tested_min"] == 1).all() and (summary["tested_max"] == 1).all()


def test_cv_validation_is_the_next_outer_fold():
    splits = make_splits(subjects(), SplitConfig(k_folds=4, repeats=2))
    part = splits[splits["repeat"] == 1]
    for f in range(4):
        nxt = part.loc[part["fold"] == (f + 1) % 4, "subject_id"]
        assert fold_subjects(splits, f, repeat=1)["val"] == sorted(nxt)


def test_repeats_redraw_the_membership_and_stay_stratified():
    splits = make_splits(subjects(60, 16), SplitConfig(k_folds=5, repeats=4, seed=2))
    folds = splits.pivot(index="subject_id", columns="repeat", values="fold")
    for r in range(1, 4):
        together = lambda c: {frozenset(g.index) for _, g in folds.groupby(c)}
        assert together(0) != together(r)  # different fold membership, not relabelled folds
    grades = fold_grades(splits)
    assert list(grades.columns) == ["HGG", "LGG"] and len(grades) == 20
    assert set(grades["HGG"]) == {12} and set(grades["LGG"]) <= {3, 4}  # 60 / 5, 16 / 5
    assert (repeat_summary(splits).loc[1:, "rand_vs_first"].abs() < 0.2).all()


def test_more_repeats_keep_the_earlier_ones():
    few = make_splits(subjects(), SplitConfig(repeats=2, seed=4))
    more = make_splits(subjects(), SplitConfig(repeats=4, seed=4))
    pd.testing.assert_frame_equal(more[more["repeat"] < 2].reset_index(drop=True), few)


def test_holdout_test_set_is_shared_and_the_rest_redrawn():
    splits = make_splits(subjects(60, 16), SplitConfig(**HOLDOUT, repeats=3))
    tests = [set(splits[(splits["repeat"] == r) & (splits["fold"] == -1)]["subject_id"])
             for r in range(3)]
    assert tests[0] == tests[1] == tests[2] and len(tests[0]) == 15
    one = make_splits(subjects(60, 16), SplitConfig(**HOLDOUT))  # the splits before repeats
    pd.testing.assert_frame_equal(splits[splits["repeat"] == 0].reset_index(drop=True), one)
    for r in range(3):
        for f in range(3):
            sets = fold_subjects(splits, f, 8, repeat=r)
            check_no_leakage(sets)
            assert set(sets["test"]) == tests[0]
    assert not splits[splits["repeat"] == 1]["fold"].equals(splits[splits["repeat"] == 0]["fold"])
    summary = repeat_summary(splits)
    assert (summary["tested_min"] == 0).all() and (summary["tested_max"] == 3).all()


def test_ratio_subsampling_nested_per_repeat_and_seeded_by_repeat():
    splits = make_splits(subjects(60, 16), SplitConfig(repeats=3))
    lgg = set(splits.loc[splits["grade"] == "LGG", "subject_id"])
    drawn = {}
    for r in range(3):
        natural = fold_subjects(splits, 0, repeat=r)
        kept = {ratio: set(fold_subjects(splits, 0, ratio, seed=5, repeat=r)["train"]) & lgg
                for ratio in (4, 8, 16)}
        assert kept[16] <= kept[8] <= kept[4] <= set(natural["train"])
        for ratio in (4, 8, 16):
            sets = fold_subjects(splits, 0, ratio, seed=5, repeat=r)
            assert sets["val"] == natural["val"] and sets["test"] == natural["test"]
        drawn[r] = kept[16]
    # same outer-training LGG, two repeats: the subsample is drawn with the repeat in its seed
    same = splits.copy()
    same.loc[same["repeat"] == 1, "fold"] = same.loc[same["repeat"] == 0, "fold"].to_numpy()
    a = fold_subjects(same, 0, 8, seed=5, repeat=0)["train"]
    b = fold_subjects(same, 0, 8, seed=5, repeat=1)["train"]
    assert fold_subjects(same, 0, repeat=0) == fold_subjects(same, 0, repeat=1) and a != b


def test_old_csv_without_repeat_column_is_repeat_zero(tmp_path):
    splits = make_splits(subjects(), SplitConfig(**HOLDOUT))
    splits.drop(columns="repeat").to_csv(tmp_path / "old.csv", index=False)
    loaded = load_splits(tmp_path / "old.csv")
    pd.testing.assert_frame_equal(loaded, splits)
    assert fold_subjects(loaded, 1, 4) == fold_subjects(splits, 1, 4, repeat=0)


def test_repeated_roundtrip_and_broken_repeats_are_caught(tmp_path):
    splits = make_splits(subjects(), SplitConfig(repeats=2))
    pd.testing.assert_frame_equal(load_splits(save_splits(splits, tmp_path / "s.csv")), splits)
    twice = pd.concat([splits, splits[splits["repeat"] == 1].iloc[:1].assign(fold=3)])
    with pytest.raises(DataError, match="leak.*in repeat 1"):
        check_splits(twice)
    missing = splits.drop(index=splits.index[splits["repeat"] == 1][:1])
    with pytest.raises(DataError, match="repeat 1 lacks 1 subject"):
        save_splits(missing, tmp_path / "m.csv")
    held = make_splits(subjects(), SplitConfig(**HOLDOUT, repeats=2))
    moved = held.copy()
    first_test = moved.index[(moved["repeat"] == 1) & (moved["fold"] == -1)][0]
    first_fold = moved.index[(moved["repeat"] == 1) & (moved["fold"] == 0)][0]
    moved.loc[[first_test, first_fold], "fold"] = [0, -1]
    with pytest.raises(DataError, match="test set .* differs between repeats"):
        check_splits(moved)
    mixed = pd.concat([splits[splits["repeat"] == 0], held[held["repeat"] == 1]])
    with pytest.raises(DataError, match="different folds"):
        check_splits(mixed)
    splits.assign(repeat="x").to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match="column repeat must hold integers"):
        load_splits(tmp_path / "bad.csv")


def test_cv_rejects_holdout_settings():
    with pytest.raises(ConfigError, match=r"\['test_fraction'\].*design: holdout"):
        SplitConfig(test_fraction=0.2)
    with pytest.raises(ConfigError, match="test_mode"):
        SplitConfig(test_mode="balanced", n_test_per_grade=3)
    assert SplitConfig(design="holdout").test_fraction == 0.2


def test_smoke_phantom_splits_with_the_default_design():
    cfg = SplitConfig()
    assert (cfg.design, cfg.k_folds, cfg.repeats) == ("cv", 5, 1)
    splits = make_splits(subjects(12, 12), cfg)  # the smoke profile's 24 subjects
    for f in range(5):
        for ratio in (1, 4):
            sets = fold_subjects(splits, f, ratio)
            assert achieved_ratio(splits, sets["train"]) > 0


def test_split_table_per_repeat():
    subj = subjects(12, 6)
    splits = make_splits(subj, SplitConfig(k_folds=3, repeats=2))
    slices = subj.assign(label="healthy")
    a, b = split_table(splits, slices, repeat=0), split_table(splits, slices, repeat=1)
    assert list(a.index) == ["fold 0", "fold 1", "fold 2", "total"]
    assert a.loc["total"].equals(b.loc["total"]) and a.loc["total", "slices"] == 18
    with pytest.raises(ConfigError, match=r"repeat=2 .*\[0, 1\]"):
        split_table(splits, slices, repeat=2)

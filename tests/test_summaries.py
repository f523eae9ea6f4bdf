"""kdlib.summaries: the per-fold overview, split labels, example rows, intensity statistics and
tumour sub-regions, checked by hand on a tiny slice table and its splits."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from helpers_train import make_cache, write_splits

from kdlib import CLASSES, MODALITIES, summaries
from kdlib.data.splits import SplitConfig, fold_subjects, load_splits, make_splits, subject_table
from kdlib.errors import ConfigError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 subjects (6 HGG, 6 LGG) x 4 slices; holdout splits: 2 test subjects per grade, the rest
    in 2 folds."""
    root = tmp_path_factory.mktemp("cache")
    cache = make_cache(root, n_hgg=6, n_lgg=6, slices=4, size=16)
    return {"table": pd.read_csv(cache.with_suffix(".csv")),
            "splits": load_splits(write_splits(cache, root / "splits.csv"))}


def test_fold_overview_one_row_per_fold_and_ratio(data):
    splits, table = data["splits"], data["table"]
    ratios = [None, 1, 4]
    ov = summaries.fold_overview(splits, table, ratios, seed=0)
    assert len(ov) == 2 * len(ratios)
    assert list(zip(ov["fold"], ov["target_ratio"])) == [
        (f, r) for f in (0, 1) for r in ("natural", 1, 4)]
    assert (ov["leakage"] == "none").all()
    for _, row in ov.iterrows():
        train = splits[~splits["fold"].isin([row["fold"], -1])]
        n_hgg, n_lgg = int((train["grade"] == "HGG").sum()), int((train["grade"] == "LGG").sum())
        target = None if row["target_ratio"] == "natural" else row["target_ratio"]
        keep = n_lgg if target is None else min(n_lgg, max(1, math.floor(n_hgg / target + 0.5)))
        assert row["train_subjects"] == n_hgg + keep
        assert row["achieved_ratio"] == round(n_hgg / keep, 2)
        assert row["achieved_ratio"] >= round(n_hgg / n_lgg, 2)  # LGG only removed
        assert row["val_subjects"] == int((splits["fold"] == row["fold"]).sum())
        assert row["test_subjects"] == int((splits["fold"] == -1).sum())
        hgg_train = table[table["subject_id"].isin(train["subject_id"])
                          & (table["grade"] == "HGG")]
        assert row["train_HGG"] == int((hgg_train["label"] == "HGG").sum())  # HGG never dropped
        if target is None:
            part = table[table["subject_id"].isin(train["subject_id"])]
            assert [row[f"train_{c}"] for c in CLASSES] == [
                int((part["label"] == c).sum()) for c in CLASSES]
    natural = ov[ov["target_ratio"] == "natural"].set_index("fold")["train_LGG"]
    for ratio in (1, 4):
        sub = ov[ov["target_ratio"] == ratio].set_index("fold")["train_LGG"]
        assert (sub <= natural).all()


def test_split_labels_names_every_slice_split(data):
    splits, table = data["splits"], data["table"]
    out = summaries.split_labels(splits, table)
    assert len(out) == len(table)
    fold = splits.set_index("subject_id")["fold"]
    want = ["test" if fold[s] == -1 else f"fold {fold[s]}" for s in out["subject_id"]]
    assert out["split"].tolist() == want
    assert set(out["split"]) == {"test", "fold 0", "fold 1"}
    pd.testing.assert_frame_equal(out[table.columns].reset_index(drop=True),
                                  table.reset_index(drop=True))


def test_fold_overview_and_split_labels_cover_every_repeat(data):
    table = data["table"]
    splits = make_splits(subject_table(table), SplitConfig(k_folds=3, repeats=2))
    ov = summaries.fold_overview(splits, table, [None, 4], seed=0)
    assert list(zip(ov["repeat"], ov["fold"], ov["target_ratio"])) == [
        (r, f, t) for r in (0, 1) for f in (0, 1, 2) for t in ("natural", 4)]
    for _, row in ov.iterrows():
        sets = fold_subjects(splits, row["fold"], None, 0, row["repeat"])
        assert (row["val_subjects"], row["test_subjects"]) == (len(sets["val"]), len(sets["test"]))
    assert (ov["leakage"] == "none").all()
    for r in (0, 1):
        out = summaries.split_labels(splits, table, repeat=r)
        fold = splits[splits["repeat"] == r].set_index("subject_id")["fold"]
        assert out["split"].tolist() == [f"fold {fold[s]}" for s in out["subject_id"]]
    with pytest.raises(ConfigError, match=r"repeat=5 .*\[0, 1\]"):
        summaries.split_labels(splits, table, repeat=5)


def test_sample_rows_caps_each_class(data):
    table = data["table"]
    counts = table["label"].value_counts()
    small = int(counts.min())
    out = summaries.sample_rows(table, per_class=small - 1, seed=3)
    assert out["label"].value_counts().to_dict() == {c: small - 1 for c in CLASSES}
    assert out["row"].is_monotonic_increasing and not out["row"].duplicated().any()
    pd.testing.assert_frame_equal(out, table.loc[out.index])  # whole rows of the table
    pd.testing.assert_frame_equal(out, summaries.sample_rows(table, per_class=small - 1, seed=3))
    big = summaries.sample_rows(table, per_class=10_000)
    assert len(big) == len(table)
    assert big["label"].value_counts().to_dict() == counts.to_dict()
    assert len(summaries.sample_rows(table.iloc[:0], per_class=3)) == 0


def test_intensity_stats_by_hand():
    images = np.zeros((3, 4, 2, 2), np.float32)
    images[0, 0] = [[1, 2], [3, 0]]  # healthy flair: 1, 2, 3 (0 = background, left out)
    images[2, 0] = [[5, 0], [0, 0]]  # healthy flair: 5
    images[1, 0] = [[4, 4], [0, 0]]  # HGG flair: 4, 4
    images[:, 3] = 2.0  # t2 constant
    labels = np.array(["healthy", "HGG", "healthy"])
    st = summaries.intensity_stats(images, labels)
    assert st.shape == (4, 6)
    assert list(st.index) == sorted(MODALITIES)
    assert st.loc["flair", ("mean", "healthy")] == pytest.approx(np.mean([1, 2, 3, 5]))
    assert st.loc["flair", ("std", "healthy")] == pytest.approx(np.std([1, 2, 3, 5]))
    assert st.loc["flair", ("mean", "HGG")] == pytest.approx(4.0)
    assert st.loc["flair", ("std", "HGG")] == pytest.approx(0.0)
    assert st.loc["t2", ("mean", "healthy")] == pytest.approx(2.0)
    assert np.isnan(st.loc["flair", ("mean", "LGG")])  # no LGG slice
    assert np.isnan(st.loc["t1", ("mean", "healthy")])  # all zero


def test_tumour_regions_shares_and_slices_per_subject():
    table = pd.DataFrame({
        "subject_id": ["a", "a", "a", "b", "b"], "grade": ["HGG", "HGG", "HGG", "LGG", "LGG"],
        "label": ["healthy", "HGG", "HGG", "LGG", "healthy"],
        "ncr_pixels": [0, 1, 1, 6, 0], "ed_pixels": [0, 4, 2, 2, 0], "et_pixels": [0, 2, 0, 0, 0]})
    r = summaries.tumour_regions(table)
    assert r.loc["HGG"].tolist() == pytest.approx([0.2, 0.6, 0.2, 2.0])
    assert r.loc["LGG"].tolist() == pytest.approx([0.75, 0.25, 0.0, 1.0])

"""kdlib.workbook: manifest, dataset/cache/splits steps on a tiny phantom, and the table helpers."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import kdlib.data.phantom_files
from kdlib import CLASSES, MODALITIES
from kdlib import workbook as wb
from kdlib.data.cache import load_slice_table
from kdlib.data.splits import SplitConfig, fold_subjects, load_splits, make_splits, subject_table
from kdlib.errors import ConfigError, DataError

PHANTOM = {"n_hgg": 4, "n_lgg": 4, "shape": [32, 32, 24]}
SPLIT = {"design": "holdout", "k_folds": 2, "test_fraction": 0.25}
PROFILE = "wb"


def fake_make_phantom(out, cfg, progress=True):
    """Stands in for make_phantom where only the folder choice matters."""
    return out / "MICCAI_BraTS2020_TrainingData"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """One tiny workspace for the module: phantom (4 HGG + 4 LGG), 16 px cache, 2-fold splits."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDLIB_HOME", str(home))
        ds = wb.get_dataset(PROFILE, "phantom", phantom=PHANTOM, progress=False)
        cache = wb.build_cache(PROFILE, {"image_size": 16}, progress=False)
        splits = wb.build_splits(PROFILE, SPLIT)
        yield {"home": home, "dataset": ds["dataset"], "cache": cache, "splits": splits,
               "table": load_slice_table(cache), "split_df": load_splits(splits)}


# ---------------------------------------------------------------- manifest


def test_manifest_round_trip_and_merge(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLIB_HOME", str(tmp_path))
    first = wb.update_manifest("p", a=1, b={"x": [1, 2]})
    assert first == {"a": 1, "b": {"x": [1, 2]}}
    assert wb.read_manifest("p") == first
    merged = wb.update_manifest("p", b="new", c=None)
    assert merged == wb.read_manifest("p") == {"a": 1, "b": "new", "c": None}
    runs = tmp_path / "runs" / "p"
    assert yaml.safe_load((runs / "manifest.yaml").read_text()) == merged
    assert sorted(p.name for p in runs.iterdir() if p.is_file()) == ["manifest.yaml"]  # no tmp
    assert (tmp_path / "figures" / "p").is_dir() and (runs / "notebooks").is_dir()


def test_read_manifest_of_a_fresh_profile_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLIB_HOME", str(tmp_path))
    with pytest.raises(DataError) as err:
        wb.read_manifest("fresh")
    msg = str(err.value)
    assert "notebooks 00 and 01" in msg and "--only 00 01" in msg and "'fresh'" in msg
    assert str(tmp_path / "runs" / "fresh" / "manifest.yaml") in msg


# ---------------------------------------------------------------- dataset, cache, splits


def test_phantom_dataset_written_under_data_synthetic_and_recorded(ws):
    ds, home = ws["dataset"], ws["home"]
    root = ds["root"]
    assert ds["source"] == "phantom" and ds["fmt"] == "nifti" and ds["reader"] == {}
    parent = home / "data" / "synthetic"
    assert root.startswith(str(parent) + "/") and root.endswith("/MICCAI_BraTS2020_TrainingData")
    folder = root[len(str(parent)) + 1:].split("/")[0]
    assert len(folder) == 10 and all(ch in "0123456789abcdef" for ch in folder)
    subjects = sorted(p.name for p in (parent / folder / "MICCAI_BraTS2020_TrainingData").iterdir()
                      if p.is_dir())
    assert len(subjects) == 8
    assert wb.read_manifest(PROFILE)["dataset"] == ds


def test_phantom_dataset_is_reused(ws, monkeypatch):
    monkeypatch.setenv("KDLIB_HOME", str(ws["home"]))

    def boom(*a, **k):
        raise AssertionError("the phantom was generated again")

    monkeypatch.setattr(kdlib.data.phantom_files, "_write_subject", boom)
    again = wb.get_dataset("other", "phantom", phantom=PHANTOM, progress=False)
    assert again["dataset"] == ws["dataset"]
    # different settings -> another folder
    monkeypatch.setattr(wb, "make_phantom", fake_make_phantom)
    other = wb.get_dataset("other", "phantom", phantom={**PHANTOM, "seed": 1}, progress=False)
    assert other["dataset"]["root"] != ws["dataset"]["root"]


def test_phantom_folder_does_not_depend_on_workers(tmp_path, monkeypatch):
    """workers only changes speed: the same dataset folder for any number of workers."""
    monkeypatch.setenv("KDLIB_HOME", str(tmp_path))
    monkeypatch.setattr(wb, "make_phantom", fake_make_phantom)
    one = wb.get_dataset("w", "phantom", phantom={**PHANTOM, "workers": 1})["dataset"]["root"]
    two = wb.get_dataset("w", "phantom", phantom={**PHANTOM, "workers": 2})["dataset"]["root"]
    assert one == two


def test_real_data_sources_need_an_existing_data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLIB_HOME", str(tmp_path))
    monkeypatch.delenv("KDLIB_TEST_UNSET", raising=False)
    for root in ("", "$KDLIB_TEST_UNSET"):
        with pytest.raises(ConfigError, match="needs data_root.*BRATS_ROOT"):
            wb.get_dataset("real", "nifti", data_root=root)
    with pytest.raises(DataError, match="does not exist") as err:
        wb.get_dataset("real", "nifti", data_root=str(tmp_path / "nope"))
    assert str(tmp_path / "nope") in str(err.value)
    with pytest.raises(ConfigError, match="source='kaggle'"):
        wb.get_dataset("real", "kaggle")
    assert not (tmp_path / "runs" / "real" / "manifest.yaml").exists()


def test_real_data_root_is_resolved_and_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLIB_HOME", str(tmp_path))
    (tmp_path / "brats").mkdir()
    monkeypatch.setenv("KDLIB_TEST_ROOT", str(tmp_path / "brats"))
    ds = wb.get_dataset("real", "nifti", data_root="brats")["dataset"]
    assert ds == {"source": "nifti", "root": str(tmp_path / "brats"), "fmt": "nifti", "reader": {}}
    ds = wb.get_dataset("real", "h5", data_root="$KDLIB_TEST_ROOT", volume_map="map.csv")["dataset"]
    assert ds["fmt"] == "h5" and ds["root"] == str(tmp_path / "brats")
    assert ds["reader"] == {"channel_order": ["flair", "t1", "t1ce", "t2"],
                            "volume_map": str(tmp_path / "map.csv")}
    assert wb.read_manifest("real")["dataset"] == ds


def test_cache_and_splits_need_the_earlier_steps(ws, monkeypatch):
    monkeypatch.setenv("KDLIB_HOME", str(ws["home"]))
    with pytest.raises(DataError, match="notebooks 00 and 01"):
        wb.build_cache("nothing", {"image_size": 16})
    wb.update_manifest("half", note="no dataset")
    with pytest.raises(DataError, match="no dataset yet.*get_dataset"):
        wb.build_cache("half", {"image_size": 16})
    with pytest.raises(DataError, match="no slice cache yet"):
        wb.build_splits("half", SPLIT)
    with pytest.raises(DataError, match="no splits yet"):
        wb.data_settings("half")
    with pytest.raises(ConfigError, match="image_sise"):
        wb.build_cache(PROFILE, {"image_sise": 16})


def test_cache_recorded_and_consistent(ws):
    man = wb.read_manifest(PROFILE)
    assert man["cache"] == str(ws["cache"]) and man["prep"]["image_size"] == 16
    assert str(ws["cache"]).startswith(str(ws["home"] / "data" / "cache"))
    table = ws["table"]
    assert table["subject_id"].nunique() == 8 and set(table["label"]) == set(CLASSES)
    with h5py.File(ws["cache"], "r") as f:
        assert f["images"].shape == (len(table), len(MODALITIES), 16, 16)


def test_build_splits_reuse_and_new_settings(ws, monkeypatch):
    monkeypatch.setenv("KDLIB_HOME", str(ws["home"]))
    path = ws["splits"]
    assert path.parent == ws["home"] / "runs" / PROFILE and path.name.startswith("splits_")
    stamp = path.stat().st_mtime_ns
    assert wb.build_splits(PROFILE, SPLIT) == path and path.stat().st_mtime_ns == stamp
    other = wb.build_splits(PROFILE, {**SPLIT, "seed": 1})
    try:
        assert other != path and other.is_file() and path.is_file()
        assert wb.read_manifest(PROFILE)["splits"] == str(other)
        assert wb.read_manifest(PROFILE)["split"]["seed"] == 1
        assert set(load_splits(other)["subject_id"]) == set(ws["split_df"]["subject_id"])
    finally:
        assert wb.build_splits(PROFILE, SPLIT) == path  # back to the module's splits
    assert wb.read_manifest(PROFILE)["splits"] == str(path)


def test_data_settings_and_split_folds(ws, monkeypatch):
    monkeypatch.setenv("KDLIB_HOME", str(ws["home"]))
    assert wb.data_settings(PROFILE) == {"cache": str(ws["cache"]), "splits": str(ws["splits"])}
    assert wb.split_folds(PROFILE) == {"repeats": [0], "folds": [0, 1]}
    assert wb.paths(PROFILE).runs == ws["home"] / "runs" / PROFILE
    cv = wb.build_splits(PROFILE, {"k_folds": 3, "repeats": 2})
    try:
        assert wb.split_folds(PROFILE) == {"repeats": [0, 1], "folds": [0, 1, 2]}
        assert wb.read_manifest(PROFILE)["split"]["design"] == "cv"
        assert set(load_splits(cv)["repeat"]) == {0, 1}
        with pytest.raises(ConfigError, match="test_fraction"):
            wb.build_splits(PROFILE, {"test_fraction": 0.25})
    finally:
        wb.build_splits(PROFILE, SPLIT)
    assert wb.split_folds(PROFILE) == {"repeats": [0], "folds": [0, 1]}


# ---------------------------------------------------------------- tables


def test_fold_overview_one_row_per_fold_and_ratio(ws):
    splits, table = ws["split_df"], ws["table"]
    ratios = [None, 1, 4]
    ov = wb.fold_overview(splits, table, ratios, seed=0)
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


def test_fold_overview_and_split_labels_cover_every_repeat(ws):
    table = ws["table"]
    splits = make_splits(subject_table(table), SplitConfig(k_folds=3, repeats=2))
    ov = wb.fold_overview(splits, table, [None, 4], seed=0)
    assert list(zip(ov["repeat"], ov["fold"], ov["target_ratio"])) == [
        (r, f, t) for r in (0, 1) for f in (0, 1, 2) for t in ("natural", 4)]
    for _, row in ov.iterrows():
        sets = fold_subjects(splits, row["fold"], None, 0, row["repeat"])
        assert (row["val_subjects"], row["test_subjects"]) == (len(sets["val"]), len(sets["test"]))
    assert (ov["leakage"] == "none").all()
    for r in (0, 1):
        out = wb.split_labels(splits, table, repeat=r)
        fold = splits[splits["repeat"] == r].set_index("subject_id")["fold"]
        assert out["split"].tolist() == [f"fold {fold[s]}" for s in out["subject_id"]]
    with pytest.raises(ConfigError, match=r"repeat=5 .*\[0, 1\]"):
        wb.split_labels(splits, table, repeat=5)


def test_split_labels_names_every_slice_split(ws):
    splits, table = ws["split_df"], ws["table"]
    out = wb.split_labels(splits, table)
    assert len(out) == len(table)
    fold = splits.set_index("subject_id")["fold"]
    want = ["test" if fold[s] == -1 else f"fold {fold[s]}" for s in out["subject_id"]]
    assert out["split"].tolist() == want
    assert set(out["split"]) == {"test", "fold 0", "fold 1"}
    pd.testing.assert_frame_equal(out[table.columns].reset_index(drop=True),
                                  table.reset_index(drop=True))


def test_read_slices_in_the_order_given(ws):
    rows = [7, 0, 12, 3, 5]
    images, masks = wb.read_slices(ws["cache"], rows)
    with h5py.File(ws["cache"], "r") as f:
        want_i = np.stack([f["images"][r] for r in rows]).astype(np.float32)
        want_m = np.stack([f["masks"][r] for r in rows])
    assert images.dtype == np.float32 and images.shape == (5, 4, 16, 16)
    np.testing.assert_array_equal(images, want_i)
    np.testing.assert_array_equal(masks, want_m)
    i2, _ = wb.read_slices(ws["cache"], np.array([3, 7]))
    np.testing.assert_array_equal(i2, want_i[[3, 0]])
    empty, _ = wb.read_slices(ws["cache"], [])
    assert empty.shape == (0, 4, 16, 16)


def test_read_slices_with_a_repeated_row(ws):
    images, _ = wb.read_slices(ws["cache"], [4, 2, 4])
    with h5py.File(ws["cache"], "r") as f:
        want = np.stack([f["images"][r] for r in (4, 2, 4)]).astype(np.float32)
    np.testing.assert_array_equal(images, want)


def test_sample_rows_caps_each_class(ws):
    table = ws["table"]
    counts = table["label"].value_counts()
    small = int(counts.min())
    out = wb.sample_rows(table, per_class=small - 1, seed=3)
    assert out["label"].value_counts().to_dict() == {c: small - 1 for c in CLASSES}
    assert out["row"].is_monotonic_increasing and not out["row"].duplicated().any()
    pd.testing.assert_frame_equal(out, table.loc[out.index])  # whole rows of the table
    pd.testing.assert_frame_equal(out, wb.sample_rows(table, per_class=small - 1, seed=3))
    big = wb.sample_rows(table, per_class=10_000)
    assert len(big) == len(table)
    assert big["label"].value_counts().to_dict() == counts.to_dict()
    assert len(wb.sample_rows(table.iloc[:0], per_class=3)) == 0


def test_intensity_stats_by_hand():
    images = np.zeros((3, 4, 2, 2), np.float32)
    images[0, 0] = [[1, 2], [3, 0]]  # healthy flair: 1, 2, 3 (0 = background, left out)
    images[2, 0] = [[5, 0], [0, 0]]  # healthy flair: 5
    images[1, 0] = [[4, 4], [0, 0]]  # HGG flair: 4, 4
    images[:, 3] = 2.0  # t2 constant
    labels = np.array(["healthy", "HGG", "healthy"])
    st = wb.intensity_stats(images, labels)
    assert st.shape == (4, 6)
    assert list(st.index) == sorted(MODALITIES)
    assert st.loc["flair", ("mean", "healthy")] == pytest.approx(np.mean([1, 2, 3, 5]))
    assert st.loc["flair", ("std", "healthy")] == pytest.approx(np.std([1, 2, 3, 5]))
    assert st.loc["flair", ("mean", "HGG")] == pytest.approx(4.0)
    assert st.loc["flair", ("std", "HGG")] == pytest.approx(0.0)
    assert st.loc["t2", ("mean", "healthy")] == pytest.approx(2.0)
    assert np.isnan(st.loc["flair", ("mean", "LGG")])  # no LGG slice
    assert np.isnan(st.loc["t1", ("mean", "healthy")])  # all zero


def test_grid_devices(monkeypatch):
    assert wb.grid_devices("cpu", 2) == ["cpu", "cpu"]
    assert wb.grid_devices("cpu", 1) is None
    assert wb.grid_devices("cuda", 4) is None
    with pytest.raises(ConfigError, match="workers=0"):
        wb.grid_devices("cpu", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert wb.grid_devices("auto", 3) == ["cpu"] * 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert wb.grid_devices("auto", 3) is None


def test_phantom_h5_channel_order_is_recorded_for_the_reader(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLIB_HOME", str(tmp_path))
    order = ["t2", "t1", "t1ce", "flair"]
    ds = wb.get_dataset("h5order", "phantom", phantom={"n_hgg": 1, "n_lgg": 1, "shape": (24, 24, 16),
                                                       "write_h5": True, "h5_channel_order": order},
                        progress=False)["dataset"]
    assert ds["fmt"] == "h5" and ds["reader"] == {"channel_order": order}


def test_grid_devices_keeps_an_explicit_gpu():
    assert wb.grid_devices("cuda:1", 2) == ["cuda:1"]


def test_manifest_survives_moving_the_output_root(tmp_path, monkeypatch):
    import shutil

    old, new = tmp_path / "old", tmp_path / "new"
    monkeypatch.setenv("KDLIB_HOME", str(old))
    (old / "data").mkdir(parents=True)
    wb.update_manifest("moved", cache=str(old / "data" / "c.h5"), splits="/elsewhere/s.csv",
                       dataset={"root": str(old / "data" / "x"), "fmt": "nifti"})
    shutil.move(old, new)
    monkeypatch.setenv("KDLIB_HOME", str(new))
    man = wb.read_manifest("moved")
    assert man["cache"] == str(new / "data" / "c.h5")
    assert man["dataset"]["root"] == str(new / "data" / "x")
    assert man["splits"] == "/elsewhere/s.csv"


def test_tumour_regions_shares_and_slices_per_subject():
    table = pd.DataFrame({
        "subject_id": ["a", "a", "a", "b", "b"], "grade": ["HGG", "HGG", "HGG", "LGG", "LGG"],
        "label": ["healthy", "HGG", "HGG", "LGG", "healthy"],
        "ncr_pixels": [0, 1, 1, 6, 0], "ed_pixels": [0, 4, 2, 2, 0], "et_pixels": [0, 2, 0, 0, 0]})
    r = wb.tumour_regions(table)
    assert r.loc["HGG"].tolist() == pytest.approx([0.2, 0.6, 0.2, 2.0])
    assert r.loc["LGG"].tolist() == pytest.approx([0.75, 0.25, 0.0, 1.0])

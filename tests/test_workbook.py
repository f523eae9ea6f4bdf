"""kdlib.workbook: manifest, dataset/cache/splits steps on a tiny phantom, device choice."""

from __future__ import annotations

import h5py
import pytest
import yaml

import kdlib.data.phantom_files
from kdlib import CLASSES, MODALITIES
from kdlib import workbook as wb
from kdlib.data.cache import load_slice_table
from kdlib.data.splits import load_splits
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


def test_a_new_dataset_or_cache_drops_the_entries_made_from_the_old_one(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLIB_HOME", str(tmp_path))
    everything = {"dataset": {"source": "nifti", "root": "/a", "fmt": "nifti", "reader": {}},
                  "cache": "data/cache/c1.h5", "prep": {"image_size": 16},
                  "splits": "runs/d/s1.csv", "split": {"k_folds": 2}, "note": "kept"}
    wb.update_manifest("d", **everything)
    wb.update_manifest("d", dataset=everything["dataset"], cache=str(tmp_path / "data/cache/c1.h5"))
    assert set(wb.read_manifest("d")) == set(everything)  # the same entries: nothing dropped
    wb.update_manifest("d", cache="data/cache/c2.h5", prep={"image_size": 32})
    assert set(wb.read_manifest("d")) == {"dataset", "cache", "prep", "note"}
    wb.update_manifest("d", splits="runs/d/s2.csv", split={"k_folds": 2})
    wb.update_manifest("d", dataset={**everything["dataset"], "root": "/b"})
    assert set(wb.read_manifest("d")) == {"dataset", "note"}
    with pytest.raises(DataError, match="no slice cache yet"):
        wb.build_splits("d", SPLIT)  # never the splits of the old data


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


def test_phantom_h5_channel_order_is_recorded_for_the_reader(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLIB_HOME", str(tmp_path))
    order = ["t2", "t1", "t1ce", "flair"]
    ds = wb.get_dataset("h5order", "phantom", phantom={"n_hgg": 1, "n_lgg": 1, "shape": (24, 24, 16),
                                                       "write_h5": True, "h5_channel_order": order},
                        progress=False)["dataset"]
    assert ds["fmt"] == "h5" and ds["reader"] == {"channel_order": order}


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

"""The notebooks' data steps: get a dataset, build its slice cache and splits, and record them in
the profile's manifest (`runs/<profile>/manifest.yaml`) so later notebooks find them."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from kdlib import MODALITIES
from kdlib.config import check_choice, from_dict, to_dict
from kdlib.data.cache import PrepConfig, load_slice_table, prepare_cache
from kdlib.data.phantom import PhantomConfig
from kdlib.data.phantom_files import make_phantom
from kdlib.data.splits import SplitConfig, load_splits, make_splits, save_splits, subject_table
from kdlib.errors import ConfigError, DataError
from kdlib.paths import ProfilePaths, profile_paths, resolve
from kdlib.runs import portable_path, write_yaml

SOURCES = ("phantom", "nifti", "h5")
MANIFEST = "manifest.yaml"


def _map_paths(data: dict[str, Any], fn) -> dict[str, Any]:
    """`data` with fn applied to its path entries: cache, splits and dataset.root."""
    out = {k: (fn(v) if k in ("cache", "splits") and v else v) for k, v in data.items()}
    if isinstance(out.get("dataset"), dict) and out["dataset"].get("root"):
        out["dataset"] = {**out["dataset"], "root": fn(out["dataset"]["root"])}
    return out


def _read(path: Path) -> dict[str, Any]:
    return _map_paths(yaml.safe_load(path.read_text()) or {}, lambda p: str(resolve(p)))


def read_manifest(profile: str) -> dict[str, Any]:
    """The profile's manifest (dataset, cache, splits) with absolute paths; a clear error when
    00/01 have not run."""
    path = profile_paths(profile).runs / MANIFEST
    if not path.is_file():
        raise DataError(f"{path} does not exist: run notebooks 00 and 01 for profile {profile!r} "
                        f"first (kdlib run --profile {profile} --only 00 01)")
    return _read(path)


def update_manifest(profile: str, **entries: Any) -> dict[str, Any]:
    """Merge `entries` into the profile's manifest, written atomically; returns the whole manifest.
    Paths under the output root are stored relative to it, so the project can move."""
    paths = profile_paths(profile).make()
    path = paths.runs / MANIFEST
    data = _read(path) if path.is_file() else {}
    data.update(entries)
    write_yaml(path, _map_paths(data, portable_path))
    return data


def _short_hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def get_dataset(
    profile: str,
    source: str = "phantom",
    data_root: str = "",
    phantom: dict[str, Any] | None = None,
    volume_map: str = "",
    channel_order: list[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate the synthetic dataset (source="phantom") or locate real BraTS2020 files; record it.

    The phantom goes to data/synthetic/<hash of its settings>/ and is reused when complete.
    Real data: `data_root` (env vars expand, e.g. $BRATS_ROOT) holding the NIfTI or H5 layout;
    for H5, `channel_order` is the order of the image channels (default FLAIR, T1, T1ce, T2).
    """
    check_choice("source", source, SOURCES)
    if source == "phantom":
        cfg = from_dict(PhantomConfig, phantom or {}, "phantom settings")
        settings = {k: v for k, v in to_dict(cfg).items() if k != "workers"}  # speed only
        out = profile_paths(profile).data / "synthetic" / _short_hash(settings)
        root = make_phantom(out, cfg, progress=progress)
        fmt = "nifti"
        reader: dict[str, Any] = {}
        if cfg.write_h5:
            root, fmt = out / "BraTS2020_training_data", "h5"
            reader["channel_order"] = list(cfg.h5_channel_order)
    else:
        if not data_root or "$" in os.path.expandvars(data_root):
            raise ConfigError(f"source={source!r} needs data_root: the folder with the BraTS2020 files "
                              "(set the parameter or the BRATS_ROOT environment variable)")
        root = resolve(data_root)
        if not root.exists():
            raise DataError(f"data_root {root} does not exist; see data/README.md for where the "
                            "Kaggle files go")
        fmt = source
        reader = {}
        if fmt == "h5":
            reader["channel_order"] = list(channel_order or MODALITIES)
            if volume_map:
                reader["volume_map"] = str(resolve(volume_map))
    return update_manifest(profile, dataset={"source": source, "root": str(root), "fmt": fmt,
                                             "reader": reader})


def build_cache(profile: str, prep: dict[str, Any] | None = None, progress: bool = True) -> Path:
    """Build (or reuse) the slice cache of the profile's dataset; records it in the manifest."""
    man = read_manifest(profile)
    if "dataset" not in man:
        raise DataError(f"profile {profile!r} has no dataset yet: run get_dataset (notebook 00) first")
    ds = man["dataset"]
    cfg = from_dict(PrepConfig, prep or {}, "preprocessing settings")
    cache = prepare_cache(ds["root"], profile_paths(profile).data / "cache", cfg, fmt=ds["fmt"],
                          progress=progress, **ds.get("reader", {}))
    update_manifest(profile, cache=str(cache), prep=to_dict(cfg))
    return cache


def build_splits(profile: str, split: dict[str, Any] | None = None) -> Path:
    """Make the subject-level splits of the profile's cache (reused when saved with the same
    settings and subjects) and record them in the manifest."""
    man = read_manifest(profile)
    if "cache" not in man:
        raise DataError(f"profile {profile!r} has no slice cache yet: run build_cache (notebook 00)")
    cfg = from_dict(SplitConfig, split or {}, "split settings")
    subjects = subject_table(load_slice_table(man["cache"]))
    key = _short_hash({"split": to_dict(cfg), "subjects": subjects.values.tolist()})
    path = profile_paths(profile).runs / f"splits_{key}.csv"
    if path.is_file():
        load_splits(path)  # re-checks leakage
    else:
        save_splits(make_splits(subjects, cfg), path)
    update_manifest(profile, splits=str(path), split=to_dict(cfg))
    return path


def data_settings(profile: str) -> dict[str, str]:
    """The cache and splits paths that every TrainConfig of this profile uses."""
    man = read_manifest(profile)
    if "splits" not in man:
        raise DataError(f"profile {profile!r} has no splits yet: run notebook 01 first")
    return {"cache": man["cache"], "splits": man["splits"]}


def paths(profile: str) -> ProfilePaths:
    """The profile's folders, created."""
    return profile_paths(profile).make()


def read_slices(cache_h5: str | Path, rows: list[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, 4, S, S) float32 and masks (n, S, S) of the given cache rows, in the order given."""
    import h5py

    unique, back = np.unique(np.asarray(rows, dtype=int), return_inverse=True)  # h5py: increasing
    with h5py.File(cache_h5, "r") as f:
        images = f["images"][unique].astype(np.float32)
        masks = f["masks"][unique]
    return images[back], masks[back]


def sample_rows(table: pd.DataFrame, per_class: int, seed: int = 0) -> pd.DataFrame:
    """Up to `per_class` random slices of each class of a slice table (for plots)."""
    parts = [g.sample(min(per_class, len(g)), random_state=seed) for _, g in table.groupby("label")]
    return pd.concat(parts).sort_values("row") if parts else table.iloc[:0]


def fold_overview(splits: pd.DataFrame, table: pd.DataFrame, ratios: list[float | None],
                  seed: int = 0) -> pd.DataFrame:
    """Per repeat, fold and training ratio: subjects per set, achieved HGG:LGG ratio, training
    slices per class, and the leakage check (every set pair disjoint) as it runs for training."""
    from kdlib import CLASSES
    from kdlib.data.splits import achieved_ratio, check_no_leakage, fold_subjects, split_pairs

    rows = []
    for repeat, fold in split_pairs(splits):
        for ratio in ratios:
            sets = fold_subjects(splits, fold, ratio, seed, repeat)
            check_no_leakage(sets)  # raises DataError naming the subjects if any leak
            train = table[table["subject_id"].isin(sets["train"])]
            counts = train["label"].value_counts()
            rows.append({"repeat": repeat, "fold": fold,
                         "target_ratio": "natural" if ratio is None else ratio,
                         "achieved_ratio": round(achieved_ratio(splits, sets["train"]), 2),
                         "train_subjects": len(sets["train"]), "val_subjects": len(sets["val"]),
                         "test_subjects": len(sets["test"]),
                         **{f"train_{c}": int(counts.get(c, 0)) for c in CLASSES},
                         "leakage": "none"})
    return pd.DataFrame(rows)


def split_labels(splits: pd.DataFrame, table: pd.DataFrame, repeat: int = 0) -> pd.DataFrame:
    """The slice table with a `split` column, `test` or `fold k`, as repeat `repeat` of the splits
    assigns the subjects (for class-distribution plots)."""
    from kdlib.data.splits import TEST_FOLD, split_table

    split_table(splits, table.iloc[:0], repeat)  # a clear error for a repeat not in the splits
    part = splits[splits["repeat"] == repeat]
    name = {f: ("test" if f == TEST_FOLD else f"fold {f}") for f in part["fold"].unique()}
    merged = table.merge(part[["subject_id", "fold"]], on="subject_id")
    return merged.assign(split=merged["fold"].map(name))


def intensity_stats(images: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    """Mean and std of brain (non-zero) pixel intensities per modality and slice class."""
    from kdlib import CLASSES, MODALITIES

    rows = []
    for c in CLASSES:
        for i, m in enumerate(MODALITIES):
            v = images[labels == c, i]
            v = v[v != 0]
            rows.append({"modality": m, "class": c, "mean": v.mean() if v.size else np.nan,
                         "std": v.std() if v.size else np.nan})
    return pd.DataFrame(rows).pivot(index="modality", columns="class", values=["mean", "std"])


def split_folds(profile: str) -> dict[str, list[int]]:
    """The repeats and folds of the profile's splits (the holdout test set excluded), as
    `Experiment.configs(..., folds=, repeats=)` takes them."""
    from kdlib.data.splits import split_pairs

    pairs = split_pairs(load_splits(data_settings(profile)["splits"]))
    return {"repeats": sorted({r for r, _ in pairs}), "folds": sorted({f for _, f in pairs})}


def grid_devices(device: str = "auto", workers: int = 1) -> list[str] | None:
    """The `devices` of run_grid: on a GPU machine (device auto/cuda) None, i.e. one process per
    GPU; on the CPU `workers` single-threaded processes (small CNNs train faster that way than
    with one multi-threaded process), or None for one in-process run at a time."""
    import torch

    if workers < 1:
        raise ConfigError(f"workers={workers!r} must be >= 1")
    if device.startswith("cuda:"):
        return [device]  # that GPU only, not every GPU of the machine
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    return ["cpu"] * workers if on_cpu and workers > 1 else None


def tumour_regions(table: pd.DataFrame) -> pd.DataFrame:
    """Per grade: each BraTS sub-region's share of the tumour pixels of the tumour slices, and the
    number of tumour slices per subject (from a slice table)."""
    tumour = table[table["label"] != "healthy"]
    regions = tumour.groupby("grade")[["ncr_pixels", "ed_pixels", "et_pixels"]].sum()
    regions = regions.div(regions.sum(axis=1), axis=0)
    regions.columns = ["NCR/NET (1)", "edema (2)", "enhancing (4)"]
    regions["tumour slices / subject"] = (tumour.groupby("grade").size()
                                          / table.groupby("grade")["subject_id"].nunique())
    return regions

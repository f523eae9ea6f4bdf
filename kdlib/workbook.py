"""The notebooks' data steps and the profile's manifest: get a dataset, build its slice cache and
splits, and record them in `runs/<profile>/manifest.yaml` so later notebooks find them (what the
data look like: kdlib.summaries)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from kdlib import MODALITIES
from kdlib.config import check_choice, from_dict, load_yaml, to_dict, write_yaml
from kdlib.data.cache import PrepConfig, load_slice_table, prepare_cache
from kdlib.data.phantom import PhantomConfig
from kdlib.data.phantom_files import make_phantom
from kdlib.data.splits import (
    SplitConfig,
    load_splits,
    make_splits,
    save_splits,
    split_pairs,
    subject_table,
)
from kdlib.errors import ConfigError, DataError
from kdlib.paths import ProfilePaths, portable_path, profile_paths, resolve

SOURCES = ("phantom", "nifti", "h5")
MANIFEST = "manifest.yaml"
DEPENDENTS = {"dataset": ("cache", "prep", "splits", "split"), "cache": ("splits", "split")}
"""Manifest entries made from another: dropped when that one changes, so no step uses stale data."""


def _map_paths(data: dict[str, Any], fn) -> dict[str, Any]:
    """`data` with fn applied to its path entries: cache, splits and dataset.root."""
    out = {k: (fn(v) if k in ("cache", "splits") and v else v) for k, v in data.items()}
    if isinstance(out.get("dataset"), dict) and out["dataset"].get("root"):
        out["dataset"] = {**out["dataset"], "root": fn(out["dataset"]["root"])}
    return out


def _read(path: Path) -> dict[str, Any]:
    return _map_paths(load_yaml(path.read_text()) or {}, lambda p: str(resolve(p)))


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
    A changed dataset or cache drops the entries made from the old one (DEPENDENTS). Paths under
    the output root are stored relative to it, so the project can move."""
    paths = profile_paths(profile).make()
    path = paths.runs / MANIFEST
    data = _read(path) if path.is_file() else {}
    for key, value in entries.items():
        old = _map_paths({key: data.get(key)}, portable_path)
        if key in data and old != _map_paths({key: value}, portable_path):
            for stale in DEPENDENTS.get(key, ()):
                data.pop(stale, None)
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
    """Generate the synthetic dataset (source="phantom") or locate real BraTS2020 files, and record
    it in the manifest (see `locate_dataset`); returns the manifest."""
    dataset = locate_dataset(profile, source, data_root, phantom, volume_map, channel_order,
                             progress)
    return update_manifest(profile, dataset=dataset)


def locate_dataset(
    profile: str,
    source: str = "phantom",
    data_root: str = "",
    phantom: dict[str, Any] | None = None,
    volume_map: str = "",
    channel_order: list[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The manifest's `dataset` entry (source, root, fmt, reader settings), recording nothing.

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
    return {"source": source, "root": str(root), "fmt": fmt, "reader": reader}


def build_cache(profile: str, prep: dict[str, Any] | None = None, progress: bool = True) -> Path:
    """Build (or reuse) the slice cache of the profile's dataset; records it in the manifest."""
    man = read_manifest(profile)
    if "dataset" not in man:
        raise DataError(f"profile {profile!r} has no dataset yet: run get_dataset (notebook 00) first")
    entries = make_cache(profile, man["dataset"], prep, progress)
    update_manifest(profile, **entries)
    return Path(entries["cache"])


def make_cache(profile: str, dataset: dict[str, Any], prep: dict[str, Any] | None = None,
               progress: bool = True) -> dict[str, Any]:
    """Build (or reuse) the slice cache of `dataset`; returns the manifest entries `cache` and
    `prep`, recording nothing."""
    cfg = from_dict(PrepConfig, prep or {}, "preprocessing settings")
    cache = prepare_cache(dataset["root"], profile_paths(profile).data / "cache", cfg,
                          fmt=dataset["fmt"], progress=progress, **dataset.get("reader", {}))
    return {"cache": str(cache), "prep": to_dict(cfg)}


def build_splits(profile: str, split: dict[str, Any] | None = None) -> Path:
    """Make the subject-level splits of the profile's cache (reused when saved with the same
    settings and subjects) and record them in the manifest."""
    man = read_manifest(profile)
    if "cache" not in man:
        raise DataError(f"profile {profile!r} has no slice cache yet: run build_cache (notebook 00)")
    entries = make_split_file(profile, man["cache"], split)
    update_manifest(profile, **entries)
    return Path(entries["splits"])


def make_split_file(profile: str, cache: str | Path, split: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """Make (or reuse) the splits of the subjects in `cache`; returns the manifest entries
    `splits` and `split`, recording nothing."""
    cfg = from_dict(SplitConfig, split or {}, "split settings")
    subjects = subject_table(load_slice_table(cache))
    key = _short_hash({"split": to_dict(cfg), "subjects": subjects.values.tolist()})
    path = profile_paths(profile).runs / f"splits_{key}.csv"
    if path.is_file():
        load_splits(path)  # re-checks leakage
    else:
        save_splits(make_splits(subjects, cfg), path)
    return {"splits": str(path), "split": to_dict(cfg)}


def data_settings(profile: str) -> dict[str, str]:
    """The cache and splits paths that every TrainConfig of this profile uses."""
    man = read_manifest(profile)
    if "splits" not in man:
        raise DataError(f"profile {profile!r} has no splits yet: run notebook 01 first")
    return {"cache": man["cache"], "splits": man["splits"]}


def paths(profile: str) -> ProfilePaths:
    """The profile's folders, created."""
    return profile_paths(profile).make()


def split_folds(profile: str) -> dict[str, list[int]]:
    """The repeats and folds of the profile's splits (the holdout test set excluded), as
    `Experiment.configs(..., folds=, repeats=)` takes them."""
    pairs = split_pairs(load_splits(data_settings(profile)["splits"]))
    return {"repeats": sorted({r for r, _ in pairs}), "folds": sorted({f for _, f in pairs})}

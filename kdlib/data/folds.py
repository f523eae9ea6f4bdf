"""The data of one run: the train/val/test slice tables of its fold and ratio, and their tensors."""

from __future__ import annotations

from typing import Any

import torch

from kdlib.data.cache import load_slice_table
from kdlib.data.loader import load_tensors
from kdlib.data.splits import fold_subjects, load_splits
from kdlib.errors import DataError
from kdlib.paths import resolve
from kdlib.train_config import TrainConfig


def fold_data(cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """`cache` and `splits` (resolved paths) and, for each of `train`, `val`, `test`, the slice
    table, images and labels (loader.load_tensors on `device`) of the config's repeat, fold and
    ratio."""
    cache, splits_path = resolve(cfg.cache), resolve(cfg.splits)
    if not cache.is_file():
        raise DataError(f"cache={cfg.cache!r}: {cache} does not exist; prepare the slice cache "
                        "first (kdlib.data.cache.prepare_cache) or fix the path")
    if not splits_path.is_file():
        raise DataError(f"splits={cfg.splits!r}: {splits_path} does not exist; write the splits "
                        "first (kdlib.data.splits.save_splits) or fix the path")
    table = load_slice_table(cache)
    splits = load_splits(splits_path)
    sets = fold_subjects(splits, cfg.fold, ratio=cfg.ratio, seed=cfg.seed, repeat=cfg.repeat)
    missing = sorted(set(splits["subject_id"]) - set(table["subject_id"]))
    if missing:
        raise DataError(f"{len(missing)} subject(s) of {splits_path} (e.g. {missing[0]}) have no "
                        f"slice in {cache}; the splits were made for another dataset")
    data: dict[str, Any] = {"cache": cache, "splits": splits_path}
    for part, subjects in sets.items():
        t = table[table["subject_id"].isin(set(subjects))].reset_index(drop=True)
        data[part] = (t, *load_tensors(cache, t, cfg.modalities, device))
    return data

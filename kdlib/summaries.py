"""Summaries of a slice cache and its splits for notebooks 00 and 01: example slices, intensity
statistics, tumour sub-regions per grade, the slices of each split, and the per-fold overview."""

from __future__ import annotations

import numpy as np
import pandas as pd

from kdlib import CLASSES, MODALITIES
from kdlib.data.splits import (
    TEST_FOLD,
    achieved_ratio,
    check_no_leakage,
    fold_subjects,
    split_pairs,
    split_table,
)


def sample_rows(table: pd.DataFrame, per_class: int, seed: int = 0) -> pd.DataFrame:
    """Up to `per_class` random slices of each class of a slice table (for plots)."""
    parts = [g.sample(min(per_class, len(g)), random_state=seed) for _, g in table.groupby("label")]
    return pd.concat(parts).sort_values("row") if parts else table.iloc[:0]


def fold_overview(splits: pd.DataFrame, table: pd.DataFrame, ratios: list[float | None],
                  seed: int = 0) -> pd.DataFrame:
    """Per repeat, fold and training ratio: subjects per set, achieved HGG:LGG ratio, training
    slices per class, and the leakage check (every set pair disjoint) as it runs for training."""
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
    split_table(splits, table.iloc[:0], repeat)  # a clear error for a repeat not in the splits
    part = splits[splits["repeat"] == repeat]
    name = {f: ("test" if f == TEST_FOLD else f"fold {f}") for f in part["fold"].unique()}
    merged = table.merge(part[["subject_id", "fold"]], on="subject_id")
    return merged.assign(split=merged["fold"].map(name))


def intensity_stats(images: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    """Mean and std of brain (non-zero) pixel intensities per modality and slice class."""
    rows = []
    for c in CLASSES:
        for i, m in enumerate(MODALITIES):
            v = images[labels == c, i]
            v = v[v != 0]
            rows.append({"modality": m, "class": c, "mean": v.mean() if v.size else np.nan,
                         "std": v.std() if v.size else np.nan})
    return pd.DataFrame(rows).pivot(index="modality", columns="class", values=["mean", "std"])


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

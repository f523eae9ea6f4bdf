"""Patient-level splits: a held-out test set, stratified group k-fold, LGG subsampling to a ratio.

Every split is over subjects, never slices, so no subject's slices reach two sets.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kdlib import CLASSES, GRADES, MINORITY
from kdlib.config import check_choice, check_range
from kdlib.errors import ConfigError, DataError

log = logging.getLogger(__name__)

TEST_FOLD = -1
MAJORITY = "HGG"


@dataclass(frozen=True)
class SplitConfig:
    """Held-out test set and cross-validation folds, all at subject level.

    test_mode "stratified": test_fraction of each grade; "balanced": the original project's test
    set with as many HGG as LGG subjects (n_test_per_grade each, default test_fraction * n / 2).
    """

    test_fraction: float = 0.2
    test_mode: str = "stratified"
    n_test_per_grade: int | None = None
    k_folds: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("test_fraction", self.test_fraction, 0.0, 0.9)
        check_choice("test_mode", self.test_mode, ("stratified", "balanced"))
        if self.n_test_per_grade is not None:
            if self.test_mode != "balanced":
                raise ConfigError(
                    "n_test_per_grade is only used with test_mode='balanced'; remove it or switch"
                )
            if not isinstance(self.n_test_per_grade, int) or self.n_test_per_grade < 1:
                raise ConfigError(
                    f"n_test_per_grade={self.n_test_per_grade!r} must be an integer >= 1"
                )
        if not isinstance(self.k_folds, int) or self.k_folds < 2:
            raise ConfigError(f"k_folds={self.k_folds!r} must be an integer >= 2")
        if not isinstance(self.seed, int):
            raise ConfigError(f"seed={self.seed!r} must be an integer")


def _round(x: float) -> int:
    return math.floor(x + 0.5)


def subject_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per subject (subject_id, grade) from any table with those columns, checked."""
    missing = [c for c in ("subject_id", "grade") if c not in table.columns]
    if missing:
        raise DataError(f"subject table lacks column(s) {missing}; it needs subject_id and grade")
    subjects = table[["subject_id", "grade"]].drop_duplicates()
    twice = subjects["subject_id"][subjects["subject_id"].duplicated()].tolist()
    if twice:
        raise DataError(f"subjects with two different grades: {twice[:10]}; fix name_mapping.csv")
    bad = sorted(set(subjects["grade"]) - set(GRADES))
    if bad:
        raise DataError(f"unknown grade(s) {bad}; grades must be in {list(GRADES)}")
    return subjects.sort_values("subject_id").reset_index(drop=True)


def make_splits(subjects: pd.DataFrame, cfg: SplitConfig) -> pd.DataFrame:
    """Columns subject_id, grade, fold: fold -1 is the held-out test set, 0..k-1 the CV folds."""
    from sklearn.model_selection import StratifiedKFold

    subjects = subject_table(subjects)
    rng = np.random.default_rng(cfg.seed)
    counts = subjects["grade"].value_counts()
    if cfg.test_mode == "balanced":
        n_each = cfg.n_test_per_grade or max(1, _round(cfg.test_fraction * len(subjects) / 2))
        n_test = {g: n_each for g in GRADES}
    else:
        n_test = {
            g: (
                max(1, _round(cfg.test_fraction * counts.get(g, 0))) if cfg.test_fraction > 0 else 0
            )
            for g in GRADES
        }
    fold = pd.Series(0, index=subjects.index)
    for g in GRADES:
        ids = subjects.index[subjects["grade"] == g].to_numpy()
        left = len(ids) - n_test[g]
        if left < cfg.k_folds:
            raise DataError(
                f"{len(ids)} {g} subject(s) cannot give {n_test[g]} to the test set and still "
                f"put one in each of k_folds={cfg.k_folds} folds (no {g} subject in some fold); "
                f"lower k_folds or the test size, or add {g} subjects"
            )
        fold[rng.permutation(ids)[: n_test[g]]] = TEST_FOLD
    rest = subjects.index[fold != TEST_FOLD]
    skf = StratifiedKFold(n_splits=cfg.k_folds, shuffle=True, random_state=cfg.seed)
    for k, (_, val) in enumerate(skf.split(np.zeros(len(rest)), subjects.loc[rest, "grade"])):
        fold[rest[val]] = k
    out = subjects.assign(fold=fold.astype(int))
    _check_folds(out)
    return out


def _check_folds(splits: pd.DataFrame) -> None:
    for k in sorted(set(splits["fold"]) - {TEST_FOLD}):
        grades = set(splits.loc[splits["fold"] == k, "grade"])
        if MINORITY not in grades:
            raise DataError(
                f"fold {k} has no {MINORITY} subject; lower k_folds or add {MINORITY} subjects"
            )


def _split_sets(splits: pd.DataFrame) -> dict[str, list[str]]:
    return {
        ("test" if k == TEST_FOLD else f"fold{k}"): g["subject_id"].tolist()
        for k, g in splits.groupby("fold")
    }


def _validate(splits: pd.DataFrame, where: str) -> pd.DataFrame:
    missing = [c for c in ("subject_id", "grade", "fold") if c not in splits.columns]
    if missing:
        raise DataError(
            f"{where} lacks column(s) {missing}; a split table has subject_id, grade, fold"
        )
    splits = splits[["subject_id", "grade", "fold"]].copy()
    try:
        splits["fold"] = splits["fold"].astype(int)
    except (TypeError, ValueError):
        raise DataError(f"{where}: column fold must hold integers (-1 = test, 0..k-1)") from None
    if (splits["fold"] < TEST_FOLD).any():
        raise DataError(f"{where}: fold must be -1 (test) or 0..k-1")
    check_no_leakage(_split_sets(splits))
    subject_table(splits)
    return splits


def save_splits(splits: pd.DataFrame, path: str | Path) -> Path:
    """Write the split table as CSV (atomically), after checking it for leakage."""
    splits = _validate(splits, "split table")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    splits.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return path


def load_splits(path: str | Path) -> pd.DataFrame:
    """Read a split table written by `save_splits`, checking columns and leakage."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file {path} not found; create it with make_splits + save_splits")
    return _validate(pd.read_csv(path, dtype={"subject_id": str, "grade": str}), str(path))


def check_no_leakage(sets: dict[str, Sequence[str]], fix: str = "rebuild the splits") -> None:
    """Raise DataError naming every subject that appears in more than one set (or twice in one),
    ending with `fix`, what the reader should do about it."""
    seen: dict[str, list[str]] = {}
    for name, ids in sets.items():
        for s in ids:
            seen.setdefault(s, []).append(name)
    leaks = {s: names for s, names in seen.items() if len(names) > 1}
    if leaks:
        shown = "; ".join(f"{s} in {names}" for s, names in sorted(leaks.items())[:10])
        raise DataError(f"{len(leaks)} subject(s) leak across sets: {shown}; {fix}")


def fold_subjects(
    splits: pd.DataFrame, fold: int, ratio: float | None = None, seed: int = 0
) -> dict[str, list[str]]:
    """train/val/test subject ids for CV fold `fold`; training LGG subsampled to HGG:LGG ~= ratio.

    Only the training LGG subjects are subsampled (val and test untouched), keeping at least one;
    the choice is deterministic and nested (ratio 8 keeps a subset of ratio 4's LGG, same seed).
    A target below the natural ratio cannot be reached this way: all LGG are kept, a warning is
    logged, and `achieved_ratio(splits, sets["train"])` reports the ratio actually reached.
    """
    folds = sorted(set(splits["fold"]) - {TEST_FOLD})
    if fold not in folds:
        raise ConfigError(f"fold={fold!r} is not a fold of these splits; choose one of {folds}")
    if ratio is not None and not ratio >= 1:
        raise ConfigError(
            f"ratio={ratio!r} must be >= 1 (HGG:LGG; only LGG subjects are subsampled)"
        )
    _check_folds(splits)
    val = splits[splits["fold"] == fold]
    train = splits[(splits["fold"] != fold) & (splits["fold"] != TEST_FOLD)]
    hgg = sorted(train.loc[train["grade"] == MAJORITY, "subject_id"])
    lgg = sorted(train.loc[train["grade"] == MINORITY, "subject_id"])
    if not lgg or not hgg:
        raise DataError(f"training part of fold {fold} lacks HGG or LGG subjects; lower k_folds")
    keep = len(lgg) if ratio is None else max(1, _round(len(hgg) / ratio))
    if keep > len(lgg):
        log.warning(
            "fold %d: natural HGG:LGG ratio %.2f is above the target %g, which subsampling LGG "
            "cannot reach; keeping all %d LGG subjects",
            fold,
            len(hgg) / len(lgg),
            ratio,
            len(lgg),
        )
    elif keep < len(lgg):
        order = np.random.default_rng([seed, fold]).permutation(len(lgg))
        lgg = sorted(lgg[i] for i in order[:keep])
    sets = {
        "train": sorted(hgg + lgg),
        "val": sorted(val["subject_id"]),
        "test": sorted(splits.loc[splits["fold"] == TEST_FOLD, "subject_id"]),
    }
    check_no_leakage(sets)
    return sets


def achieved_ratio(splits: pd.DataFrame, subjects: Sequence[str]) -> float:
    """HGG:LGG ratio among `subjects` (e.g. fold_subjects(...)["train"]); inf without LGG."""
    grades = splits.set_index("subject_id").loc[list(subjects), "grade"]
    n_lgg = int((grades == MINORITY).sum())
    return float((grades == MAJORITY).sum() / n_lgg) if n_lgg else math.inf


def split_table(splits: pd.DataFrame, slice_table: pd.DataFrame) -> pd.DataFrame:
    """Subjects per grade and slices per class for the test set and each fold (for reporting).

    Slices of subjects that are not in `splits` are left out.
    """
    merged = slice_table[["subject_id", "label"]].merge(
        splits[["subject_id", "fold"]], on="subject_id"
    )
    rows = {}
    for k in sorted(set(splits["fold"])):
        name = "test" if k == TEST_FOLD else f"fold {k}"
        subj = splits[splits["fold"] == k]
        counts = merged.loc[merged["fold"] == k, "label"].value_counts()
        rows[name] = {
            **{f"subjects_{g}": int((subj["grade"] == g).sum()) for g in GRADES},
            **{c: int(counts.get(c, 0)) for c in CLASSES},
        }
    out = pd.DataFrame.from_dict(rows, orient="index")
    out["slices"] = out[list(CLASSES)].sum(axis=1)
    out.loc["total"] = out.sum()
    out.index.name = "split"
    return out

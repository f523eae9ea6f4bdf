"""Patient-level splits: repeated, grade-stratified partitions of the subjects into folds, and LGG
subsampling of a training set to a target HGG:LGG ratio.

Two designs (`SplitConfig.design`). "cv", the default: repeated stratified k-fold cross-validation
(Bouckaert & Frank 2004). Each repeat re-draws the partition; outer fold f of a repeat is the test
set, so every subject is tested exactly once per repeat, and the validation set that picks the best
epoch is the next outer fold (f+1 mod k) of the same repeat. That inner split is itself stratified,
needs no further seed or setting, keeps every test subject out of model selection, and lets every
subject validate exactly once per repeat; with k = 5 a run trains on 3/5 of the subjects, validates
on 1/5 and tests on 1/5. "holdout", the original project's: one fixed test set (fold -1) shared by
every repeat and k folds of the other subjects re-drawn per repeat (fold f validates, the others
train). Repeat 0 draws exactly what the splits did before repeats existed, so older split files
and their runs are reproduced.

Every split is over subjects, never slices, so no subject's slices reach two sets. The split table
has one row per subject and repeat: subject_id, grade, repeat, fold.
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
DESIGNS = ("cv", "holdout")
COLUMNS = ["subject_id", "grade", "repeat", "fold"]


@dataclass(frozen=True)
class SplitConfig:
    """Repeated, grade-stratified partitions of the subjects (all splits at subject level).

    design "cv" (repeated k-fold cross-validation): in each of `repeats` re-drawn partitions every
    subject is in exactly one of `k_folds` outer folds; outer fold f is the test set, the next fold
    (f+1 mod k) the validation set, the rest the training set. design "holdout" (the original
    project's): one fixed test set (fold -1, the same in every repeat) and `k_folds` folds of the
    other subjects, re-drawn per repeat; fold f is the validation set, the other folds train.
    test_fraction (default 0.2), test_mode ("stratified": that fraction of each grade; "balanced":
    as many HGG as LGG, n_test_per_grade each) size the holdout test set and apply to it only.
    """

    design: str = "cv"
    k_folds: int = 5
    repeats: int = 1
    seed: int = 0
    test_fraction: float | None = None
    test_mode: str | None = None
    n_test_per_grade: int | None = None

    def __post_init__(self) -> None:
        check_choice("design", self.design, DESIGNS)
        for name in ("k_folds", "repeats", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name}={value!r} must be an integer")
        holdout_only = [k for k in ("test_fraction", "test_mode", "n_test_per_grade")
                        if getattr(self, k) is not None]
        if self.design == "cv":
            if holdout_only:
                raise ConfigError(f"{holdout_only} size the fixed test set of design='holdout'; "
                                  "with design='cv' every outer fold is the test set once: remove "
                                  "them or set design: holdout")
            if self.k_folds < 3:
                raise ConfigError(f"k_folds={self.k_folds} is too few for design='cv': one outer "
                                  "fold tests, the next validates and the rest train; use >= 3")
        else:
            if self.test_fraction is None:
                object.__setattr__(self, "test_fraction", 0.2)
            if self.test_mode is None:
                object.__setattr__(self, "test_mode", "stratified")
            if (isinstance(self.test_fraction, bool) or not isinstance(self.test_fraction, (int, float))
                    or not 0 < self.test_fraction <= 0.9):
                raise ConfigError(f"test_fraction={self.test_fraction!r} must lie in (0, 0.9] "
                                  "for design='holdout' (without a test set, use design='cv')")
            check_choice("test_mode", self.test_mode, ("stratified", "balanced"))
            if self.k_folds < 2:
                raise ConfigError(f"k_folds={self.k_folds!r} must be an integer >= 2")
        if self.n_test_per_grade is not None:
            if self.test_mode != "balanced":
                raise ConfigError(
                    "n_test_per_grade is only used with test_mode='balanced'; remove it or switch"
                )
            if not isinstance(self.n_test_per_grade, int) or self.n_test_per_grade < 1:
                raise ConfigError(
                    f"n_test_per_grade={self.n_test_per_grade!r} must be an integer >= 1"
                )
        check_range("repeats", self.repeats, 1)


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


def _test_sizes(subjects: pd.DataFrame, cfg: SplitConfig) -> dict[str, int]:
    counts = subjects["grade"].value_counts()
    if cfg.design == "cv":
        return {g: 0 for g in GRADES}
    if cfg.test_mode == "balanced":
        n_each = cfg.n_test_per_grade or max(1, _round(cfg.test_fraction * len(subjects) / 2))
        return {g: n_each for g in GRADES}
    return {g: max(1, _round(cfg.test_fraction * counts.get(g, 0))) for g in GRADES}


def make_splits(subjects: pd.DataFrame, cfg: SplitConfig) -> pd.DataFrame:
    """Columns subject_id, grade, repeat, fold: per repeat, each subject's outer fold 0..k-1, or -1
    for the fixed test set of design "holdout"; folds are stratified by grade."""
    from sklearn.model_selection import RepeatedStratifiedKFold

    subjects = subject_table(subjects)
    n_test = _test_sizes(subjects, cfg)
    fold = pd.Series(0, index=subjects.index)
    rng = np.random.default_rng(cfg.seed)
    for g in GRADES:
        ids = subjects.index[subjects["grade"] == g].to_numpy()
        if len(ids) - n_test[g] < cfg.k_folds:
            test = f"give {n_test[g]} to the test set and still " if n_test[g] else ""
            raise DataError(
                f"{len(ids)} {g} subject(s) cannot {test}put one in each of "
                f"k_folds={cfg.k_folds} folds (no {g} subject in some fold); lower k_folds"
                f"{' or the test size' if n_test[g] else ''}, or add {g} subjects"
            )
        fold[rng.permutation(ids)[: n_test[g]]] = TEST_FOLD
    rest = subjects.index[fold != TEST_FOLD]
    # repeat 0 is StratifiedKFold(shuffle=True, random_state=seed): the splits before repeats
    folds = RepeatedStratifiedKFold(n_splits=cfg.k_folds, n_repeats=cfg.repeats,
                                    random_state=cfg.seed)
    held = folds.split(np.zeros(len(rest)), subjects.loc[rest, "grade"])
    parts = []
    for r in range(cfg.repeats):
        this = fold.copy()
        for k in range(cfg.k_folds):
            this[rest[next(held)[1]]] = k
        parts.append(subjects.assign(repeat=r, fold=this.astype(int)))
    out = pd.concat(parts, ignore_index=True)[COLUMNS]
    check_splits(out)
    return out


def design_of(splits: pd.DataFrame) -> str:
    """"holdout" when the split table has a fixed test set (fold -1), else "cv"."""
    return "holdout" if (splits["fold"] == TEST_FOLD).any() else "cv"


def split_pairs(splits: pd.DataFrame) -> list[tuple[int, int]]:
    """The (repeat, fold) pairs of a split table's folds, sorted (the test set excluded): one
    training run per pair and per ratio and seed."""
    folds = splits.loc[splits["fold"] != TEST_FOLD, ["repeat", "fold"]].drop_duplicates()
    return sorted((int(r), int(f)) for r, f in folds.itertuples(index=False))


def _repeat(splits: pd.DataFrame, repeat: int) -> pd.DataFrame:
    repeats = sorted(int(r) for r in splits["repeat"].unique())
    if isinstance(repeat, bool) or repeat not in repeats:
        raise ConfigError(f"repeat={repeat!r} is not a repeat of these splits; choose one of "
                          f"{repeats}")
    return splits[splits["repeat"] == repeat]


def _check_folds(part: pd.DataFrame, repeat: int) -> None:
    for k in sorted(set(part["fold"]) - {TEST_FOLD}):
        if MINORITY not in set(part.loc[part["fold"] == k, "grade"]):
            raise DataError(f"fold {k} of repeat {repeat} has no {MINORITY} subject; lower "
                            f"k_folds or add {MINORITY} subjects")


def check_splits(splits: pd.DataFrame, fix: str = "rebuild the splits") -> None:
    """DataError unless, in every repeat, each subject is in exactly one fold (so no subject leaks
    and, in design "cv", each is tested exactly once), every repeat holds the same subjects and
    folds, every fold has an LGG subject, and the "holdout" test set is the same in every repeat."""
    for r, part in splits.groupby("repeat"):
        sets = {("test" if k == TEST_FOLD else f"fold {k}"): g["subject_id"].tolist()
                for k, g in part.groupby("fold")}
        check_no_leakage(sets, fix=f"in repeat {r}: {fix}")
    subjects = set(splits["subject_id"])
    for r, part in splits.groupby("repeat"):
        missing = sorted(subjects - set(part["subject_id"]))
        if missing:
            raise DataError(f"repeat {r} lacks {len(missing)} subject(s) of the other repeats "
                            f"(e.g. {missing[0]}): in a repeat every subject must be in one fold; "
                            f"{fix}")
    folds = {r: sorted(set(p["fold"])) for r, p in splits.groupby("repeat")}
    if len({tuple(f) for f in folds.values()}) > 1:
        raise DataError(f"the repeats have different folds {folds}; {fix}")
    tests = {r: frozenset(p.loc[p["fold"] == TEST_FOLD, "subject_id"])
             for r, p in splits.groupby("repeat")}
    if len(set(tests.values())) > 1:
        raise DataError(f"the fixed test set (fold -1) differs between repeats; {fix}")
    for r, part in splits.groupby("repeat"):
        _check_folds(part, int(r))


def _validate(splits: pd.DataFrame, where: str) -> pd.DataFrame:
    missing = [c for c in ("subject_id", "grade", "fold") if c not in splits.columns]
    if missing:
        raise DataError(
            f"{where} lacks column(s) {missing}; a split table has subject_id, grade, repeat, fold"
        )
    if "repeat" not in splits.columns:  # a table from before repeats: one repeat
        splits = splits.assign(repeat=0)
    splits = splits[COLUMNS].copy()
    for col, what in (("fold", "-1 = test, 0..k-1"), ("repeat", "0..r-1")):
        try:
            splits[col] = splits[col].astype(int)
        except (TypeError, ValueError):
            raise DataError(f"{where}: column {col} must hold integers ({what})") from None
    if (splits["fold"] < TEST_FOLD).any():
        raise DataError(f"{where}: fold must be -1 (test) or 0..k-1")
    if (splits["repeat"] < 0).any():
        raise DataError(f"{where}: repeat must be 0..r-1")
    subject_table(splits)
    check_splits(splits, fix=f"{where} is corrupt; rebuild the splits")
    return splits.reset_index(drop=True)


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
    """Read a split table written by `save_splits`, checking columns and leakage; a file without
    a repeat column (written before repeats existed) is read as repeat 0."""
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
    splits: pd.DataFrame, fold: int, ratio: float | None = None, seed: int = 0, repeat: int = 0
) -> dict[str, list[str]]:
    """train/val/test subject ids of fold `fold` of repeat `repeat`; training LGG subsampled to
    HGG:LGG ~= ratio.

    Design "cv": test = outer fold `fold`, val = the next outer fold (fold+1 mod k), train = the
    others. Design "holdout": val = fold `fold`, test = fold -1, train = the other folds.
    Only the training LGG subjects are subsampled (val and test untouched), keeping at least one;
    the choice is deterministic given (seed, repeat, fold) and nested (ratio 8 keeps a subset of
    ratio 4's LGG). A target below the natural ratio cannot be reached this way: all LGG are kept,
    a warning is logged, and `achieved_ratio(splits, sets["train"])` reports the ratio reached.
    """
    part = _repeat(splits, repeat)
    folds = sorted(int(f) for f in set(part["fold"]) - {TEST_FOLD})
    if isinstance(fold, bool) or fold not in folds:
        raise ConfigError(f"fold={fold!r} is not a fold of these splits; choose one of {folds}")
    if ratio is not None and not ratio >= 1:
        raise ConfigError(
            f"ratio={ratio!r} must be >= 1 (HGG:LGG; only LGG subjects are subsampled)"
        )
    _check_folds(part, repeat)
    if design_of(splits) == "cv":
        test = part[part["fold"] == fold]
        val = part[part["fold"] == folds[(folds.index(fold) + 1) % len(folds)]]
    else:
        test = part[part["fold"] == TEST_FOLD]
        val = part[part["fold"] == fold]
    train = part[~part["subject_id"].isin(set(test["subject_id"]) | set(val["subject_id"]))]
    hgg = sorted(train.loc[train["grade"] == MAJORITY, "subject_id"])
    lgg = sorted(train.loc[train["grade"] == MINORITY, "subject_id"])
    if not lgg or not hgg:
        raise DataError(f"training part of fold {fold} (repeat {repeat}) lacks HGG or LGG "
                        "subjects; lower k_folds")
    keep = len(lgg) if ratio is None else max(1, _round(len(hgg) / ratio))
    if keep > len(lgg):
        log.warning(
            "fold %d (repeat %d): natural HGG:LGG ratio %.2f is above the target %g, which "
            "subsampling LGG cannot reach; keeping all %d LGG subjects",
            fold,
            repeat,
            len(hgg) / len(lgg),
            ratio,
            len(lgg),
        )
    elif keep < len(lgg):
        # [seed, fold, repeat]: numpy seeds [seed, fold, 0] as [seed, fold], the draw before repeats
        order = np.random.default_rng([seed, fold, repeat]).permutation(len(lgg))
        lgg = sorted(lgg[i] for i in order[:keep])
    sets = {
        "train": sorted(hgg + lgg),
        "val": sorted(val["subject_id"]),
        "test": sorted(test["subject_id"]),
    }
    check_no_leakage(sets)
    return sets


def achieved_ratio(splits: pd.DataFrame, subjects: Sequence[str]) -> float:
    """HGG:LGG ratio among `subjects` (e.g. fold_subjects(...)["train"]); inf without LGG."""
    grades = splits.drop_duplicates("subject_id").set_index("subject_id").loc[list(subjects),
                                                                              "grade"]
    n_lgg = int((grades == MINORITY).sum())
    return float((grades == MAJORITY).sum() / n_lgg) if n_lgg else math.inf


def split_table(splits: pd.DataFrame, slice_table: pd.DataFrame, repeat: int = 0) -> pd.DataFrame:
    """Subjects per grade and slices per class of the test set and each fold of one repeat (for
    reporting). Slices of subjects that are not in `splits` are left out."""
    part = _repeat(splits, repeat)
    merged = slice_table[["subject_id", "label"]].merge(
        part[["subject_id", "fold"]], on="subject_id"
    )
    rows = {}
    for k in sorted(set(part["fold"])):
        name = "test" if k == TEST_FOLD else f"fold {k}"
        subj = part[part["fold"] == k]
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


def fold_grades(splits: pd.DataFrame) -> pd.DataFrame:
    """Subjects per grade in each fold of each repeat: index (repeat, fold), columns the grades."""
    counts = splits.groupby(["repeat", "fold", "grade"]).size().unstack(fill_value=0)
    return counts.reindex(columns=list(GRADES), fill_value=0).rename_axis(columns=None)


def repeat_summary(splits: pd.DataFrame) -> pd.DataFrame:
    """One row per repeat: subjects, folds, how often each subject is tested (min and max over
    subjects), LGG subjects per fold (min, max), and the adjusted Rand index of the fold partition
    against repeat 0 (1 = the same partition, about 0 = unrelated, as re-drawn repeats should be)."""
    from sklearn.metrics import adjusted_rand_score

    check_splits(splits)
    design = design_of(splits)
    first = splits[splits["repeat"] == splits["repeat"].min()].set_index("subject_id")["fold"]
    rows = []
    for r, part in splits.groupby("repeat"):
        folds = part[part["fold"] != TEST_FOLD]
        # "cv": a subject is tested in its outer fold; "holdout": every run tests the fixed set
        tested = (part.groupby("subject_id")["fold"].size() if design == "cv" else
                  (part.set_index("subject_id")["fold"] == TEST_FOLD).astype(int)
                  * folds["fold"].nunique())
        lgg = folds[folds["grade"] == MINORITY].groupby("fold").size()
        fold = part.set_index("subject_id")["fold"].loc[first.index]
        rows.append({"repeat": int(r), "subjects": len(part), "folds": folds["fold"].nunique(),
                     "tested_min": int(tested.min()), "tested_max": int(tested.max()),
                     "lgg_per_fold_min": int(lgg.min()), "lgg_per_fold_max": int(lgg.max()),
                     "rand_vs_first": round(float(adjusted_rand_score(first, fold)), 3)})
    return pd.DataFrame(rows).set_index("repeat")

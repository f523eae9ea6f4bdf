"""Metrics of one run's test predictions: per slice, per patient, calibration.

Input everywhere is a predictions DataFrame with columns subject_id, slice, label (class name in
CLASSES) and p_healthy, p_HGG, p_LGG (probabilities that sum to 1 per row).

Conventions (the thesis methods chapter can quote them):
- The predicted class is argmax of the probabilities; ties go to the earlier class in CLASSES.
- A class absent from the test set (no true slice) gets NaN for every metric named after it, with a
  warning; macro-F1 and balanced accuracy average over the classes present in the test set only.
- A present class that is never predicted has precision 0 (and so F1 0), as in scikit-learn with
  zero_division=0: a model that ignores the minority class must not look better than one that tries.
- ECE (Guo et al., ICML 2017): 15 equal-width bins (lo, hi] of the max probability,
  ECE = sum_b n_b/N |accuracy_b - mean confidence_b|.
  `ece_LGG` is the one-vs-rest (class-wise) ECE of the minority class (Kull et al., NeurIPS 2019):
  the same bins over p_LGG for every slice, comparing mean p_LGG with the fraction of LGG slices.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from kdlib import CLASSES, GRADES, MINORITY
from kdlib.errors import ConfigError, DataError

PROB_COLUMNS: tuple[str, ...] = tuple(f"p_{c}" for c in CLASSES)
REQUIRED_COLUMNS: tuple[str, ...] = ("subject_id", "slice", "label", *PROB_COLUMNS)
N_BINS = 15
SUM_TOLERANCE = 1e-3
K = len(CLASSES)
_LGG = CLASSES.index(MINORITY)


def check_predictions(pred: pd.DataFrame, where: str = "predictions") -> pd.DataFrame:
    """Validate a predictions table and return a clean copy (str subject_id, int slice, float probs).

    Raises DataError for an empty table, missing columns, unknown labels, duplicated slices, NaN or
    out-of-range probabilities, or rows whose probabilities do not sum to 1 (tolerance 1e-3).
    """
    if not isinstance(pred, pd.DataFrame):
        raise DataError(f"{where}: expected a pandas DataFrame, got {type(pred).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in pred.columns]
    if missing:
        raise DataError(
            f"{where}: missing column(s) {missing}; a predictions table needs {list(REQUIRED_COLUMNS)}"
        )
    if len(pred) == 0:
        raise DataError(f"{where}: no rows; the run wrote empty predictions (was the test set empty?)")
    out = pred.loc[:, list(REQUIRED_COLUMNS)].copy()
    out["subject_id"] = out["subject_id"].astype(str)
    out["label"] = out["label"].astype(str)
    unknown = sorted(set(out["label"]) - set(CLASSES))
    if unknown:
        raise DataError(f"{where}: unknown label(s) {unknown[:5]}; labels must be class names {CLASSES}")
    dup = out.duplicated(["subject_id", "slice"])
    if dup.any():
        raise DataError(f"{where}: {int(dup.sum())} duplicated (subject_id, slice) rows, e.g. "
                        f"{tuple(out.loc[dup, ['subject_id', 'slice']].iloc[0])}")
    try:
        probs = out.loc[:, list(PROB_COLUMNS)].to_numpy(dtype=float)
    except (TypeError, ValueError):
        raise DataError(f"{where}: probability columns {list(PROB_COLUMNS)} must be numeric") from None
    bad = ~np.isfinite(probs).all(axis=1) | (probs < -1e-6).any(axis=1) | (probs > 1 + 1e-6).any(axis=1)
    if bad.any():
        raise DataError(f"{where}: {int(bad.sum())} row(s) with NaN or probabilities outside [0, 1]")
    dev = np.abs(probs.sum(axis=1) - 1.0)
    if (dev > SUM_TOLERANCE).any():
        raise DataError(
            f"{where}: {int((dev > SUM_TOLERANCE).sum())} row(s) whose probabilities do not sum to 1 "
            f"(largest deviation {dev.max():.3g}); write softmax probabilities, not logits"
        )
    out[list(PROB_COLUMNS)] = probs
    return out.reset_index(drop=True)


def arrays(pred: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(y, P): true class indices (n,) and the probability matrix (n, 3) of a checked table."""
    y = pred["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy(dtype=np.int64)
    return y, pred.loc[:, list(PROB_COLUMNS)].to_numpy(dtype=float)


def _auc(pos: np.ndarray, score: np.ndarray) -> float:
    """One-vs-rest ROC-AUC via the Mann-Whitney U statistic (ties count one half)."""
    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    if n_pos == 0 or n_neg == 0:
        return np.nan
    ranks = average_ranks(score)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank: scipy.stats.rankdata's default, without the
    0.6 s import of scipy.stats in every training process."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2.0)[inverse.reshape(-1)]


def _average_precision(pos: np.ndarray, score: np.ndarray) -> float:
    """Average precision as scikit-learn defines it: sum_n (R_n - R_{n-1}) P_n over distinct scores."""
    n_pos = int(pos.sum())
    if n_pos == 0:
        return np.nan
    order = np.argsort(-score, kind="mergesort")
    s, t = score[order], pos[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(t)[last]
    precision = tps / (last + 1)
    recall = tps / n_pos
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def _bins(score: np.ndarray, target: np.ndarray, n_bins: int) -> tuple[np.ndarray, ...]:
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    b = np.clip(np.digitize(score, edges[1:-1], right=True), 0, n_bins - 1)
    count = np.bincount(b, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(b, weights=score, minlength=n_bins) / count
        acc = np.bincount(b, weights=target.astype(float), minlength=n_bins) / count
    return edges, count, conf, acc


def binned_calibration(score: np.ndarray, target: np.ndarray, n_bins: int = N_BINS) -> pd.DataFrame:
    """Equal-width bins (lo, hi] of `score`: count, mean score (confidence) and mean target per bin."""
    edges, count, conf, acc = _bins(score, target, n_bins)
    return pd.DataFrame({"lo": edges[:-1], "hi": edges[1:], "count": count,
                         "confidence": conf, "accuracy": acc})


def _ece(score: np.ndarray, target: np.ndarray, n_bins: int = N_BINS) -> float:
    _, count, conf, acc = _bins(score, target, n_bins)
    ok = count > 0
    return float(np.sum(count[ok] * np.abs(acc[ok] - conf[ok])) / count.sum())


def reliability_table(pred: pd.DataFrame, cls: str | None = None, n_bins: int = N_BINS) -> pd.DataFrame:
    """Reliability-diagram bins: of the max probability (cls=None) or one-vs-rest of class `cls`."""
    y, P = arrays(check_predictions(pred))
    if cls is None:
        return binned_calibration(P.max(axis=1), P.argmax(axis=1) == y, n_bins)
    if cls not in CLASSES:
        raise ConfigError(f"cls={cls!r} is not a class; choose one of {CLASSES} or None")
    i = CLASSES.index(cls)
    return binned_calibration(P[:, i], y == i, n_bins)


def slice_scores(y: np.ndarray, P: np.ndarray, ranking: bool = True) -> dict[str, float]:
    """All per-slice metrics from index labels and probabilities, without checks or warnings.

    `ranking=False` skips ROC-AUC and average precision (the slow part of a bootstrap draw).
    """
    yhat = P.argmax(axis=1)
    cm = np.bincount(y * K + yhat, minlength=K * K).reshape(K, K)
    support, predicted, tp = cm.sum(axis=1), cm.sum(axis=0), np.diag(cm)
    present = support > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(present, tp / support, np.nan)
        precision = np.where(present, np.where(predicted > 0, tp / predicted, 0.0), np.nan)
        f1 = np.where(present, 2 * tp / (support + predicted), np.nan)
    out = {
        "accuracy": float(tp.sum() / len(y)),
        "balanced_accuracy": float(np.mean(recall[present])),
        "macro_f1": float(np.mean(f1[present])),
    }
    for i, c in enumerate(CLASSES):
        out[f"precision_{c}"] = float(precision[i])
        out[f"recall_{c}"] = float(recall[i])
        out[f"f1_{c}"] = float(f1[i])
        out[f"support_{c}"] = float(support[i])
        if ranking:
            out[f"auc_{c}"] = _auc(y == i, P[:, i]) if present[i] else np.nan
            out[f"ap_{c}"] = _average_precision(y == i, P[:, i]) if present[i] else np.nan
    out["ece"] = _ece(P.max(axis=1), yhat == y)
    out[f"ece_{MINORITY}"] = _ece(P[:, _LGG], y == _LGG) if present[_LGG] else np.nan
    return out


def _warn_absent(y: np.ndarray, where: str) -> None:
    absent = [c for i, c in enumerate(CLASSES) if not (y == i).any()]
    if absent:
        warnings.warn(f"{where}: class(es) {absent} absent from the test set: their metrics are NaN "
                      "and macro averages use the present classes only", stacklevel=3)
    if len(absent) == K - 1:
        warnings.warn(f"{where}: only one class present: ROC-AUC and AP are NaN", stacklevel=3)


def slice_metrics(pred: pd.DataFrame) -> dict[str, float]:
    """Per-slice metrics: accuracy, balanced_accuracy, macro_f1, precision/recall/f1/support/auc/ap
    per class (one-vs-rest AUC and AP), ece and ece_LGG (see the module docstring)."""
    pred = check_predictions(pred)
    y, P = arrays(pred)
    _warn_absent(y, "slice_metrics")
    return slice_scores(y, P)


def confusion(pred: pd.DataFrame, normalize: str | None = None) -> pd.DataFrame:
    """Confusion matrix (rows: true class, columns: predicted class, both in CLASSES order).

    normalize="true" divides each row by its class count; a class absent from the test set gets a
    NaN row (with a warning).
    """
    if normalize not in (None, "true"):
        raise ConfigError(f"normalize={normalize!r} is not valid; choose None or 'true'")
    y, P = arrays(check_predictions(pred))
    cm = np.bincount(y * K + P.argmax(axis=1), minlength=K * K).reshape(K, K).astype(float)
    if normalize == "true":
        _warn_absent(y, "confusion")
        with np.errstate(invalid="ignore"):
            cm = cm / cm.sum(axis=1, keepdims=True)
    else:
        cm = cm.astype(int)
    return pd.DataFrame(cm, index=pd.Index(CLASSES, name="true"),
                        columns=pd.Index(CLASSES, name="predicted"))


def patient_predictions(pred: pd.DataFrame, by: str = "true") -> pd.DataFrame:
    """One row per subject: true grade, mean p_HGG / p_LGG over its tumour slices, predicted grade.

    by="true": the slices whose TRUE label is HGG or LGG (the grade is read from the tumour the
    radiologist segmented). by="predicted": the slices predicted as tumour (argmax HGG or LGG),
    falling back to all the subject's slices when none is. The predicted grade is LGG when mean
    p_LGG > mean p_HGG, else HGG (ties go to HGG). A subject without a true tumour slice has no known
    grade and is left out with a warning; one with both HGG and LGG slices raises DataError.
    """
    if by not in ("true", "predicted"):
        raise ConfigError(f"by={by!r} is not valid; choose 'true' or 'predicted'")
    pred = check_predictions(pred)
    tumour_true = pred["label"] != CLASSES[0]
    grades = pred.loc[tumour_true].groupby("subject_id", sort=False)["label"].unique()
    mixed = grades[grades.map(len) > 1]
    if len(mixed):
        raise DataError(f"subject(s) {list(mixed.index[:3])} have slices labelled both HGG and LGG; "
                        "a subject has one grade: check the slice table")
    subjects = pd.unique(pred["subject_id"])
    ungraded = [s for s in subjects if s not in grades.index]
    if ungraded:
        warnings.warn(f"{len(ungraded)} subject(s) without a tumour slice in the test set (e.g. "
                      f"{ungraded[0]}) have no known grade and are left out of patient metrics",
                      stacklevel=2)
    if by == "true":
        use = tumour_true
    else:
        use = pred[list(PROB_COLUMNS)].to_numpy().argmax(axis=1) > 0
        has = pred.assign(u=use).groupby("subject_id", sort=False)["u"].transform("any")
        use = use | ~has.to_numpy()
    g = pred.loc[use].groupby("subject_id", sort=False)
    out = pd.DataFrame({"p_HGG": g["p_HGG"].mean(), "p_LGG": g["p_LGG"].mean(),
                        "n_slices": g.size()})
    out = out.loc[[s for s in subjects if s in grades.index]]
    out.insert(0, "grade", [grades[s][0] for s in out.index])
    out["pred_grade"] = np.where(out["p_LGG"] > out["p_HGG"], "LGG", "HGG")
    return out.rename_axis("subject_id").reset_index()


def patient_scores(grade: np.ndarray, pred_grade: np.ndarray) -> dict[str, float]:
    """Patient-level metrics from true and predicted grade arrays, without checks or warnings."""
    out: dict[str, float] = {"patient_accuracy": float(np.mean(grade == pred_grade))
                             if len(grade) else np.nan}
    recalls = []
    for g in GRADES:
        n = int(np.sum(grade == g))
        r = float(np.sum((grade == g) & (pred_grade == g)) / n) if n else np.nan
        out[f"patient_recall_{g}"] = r
        if n:
            recalls.append(r)
    out["patient_balanced_accuracy"] = float(np.mean(recalls)) if recalls else np.nan
    m = MINORITY
    tp = np.sum((grade == m) & (pred_grade == m))
    n_true, n_pred = np.sum(grade == m), np.sum(pred_grade == m)
    out[f"patient_precision_{m}"] = float(tp / n_pred) if n_pred else (0.0 if n_true else np.nan)
    out[f"patient_f1_{m}"] = float(2 * tp / (n_true + n_pred)) if n_true else np.nan
    out["n_patients"] = float(len(grade))
    out[f"n_patients_{m}"] = float(n_true)
    return out


def patient_metrics(pred: pd.DataFrame, by: str = "true") -> dict[str, float]:
    """Patient-level grade metrics (see `patient_predictions`): patient_accuracy,
    patient_balanced_accuracy (mean recall over the grades present), patient_recall_HGG/_LGG,
    patient_precision_LGG, patient_f1_LGG, n_patients, n_patients_LGG."""
    pt = patient_predictions(pred, by=by)
    missing = [g for g in GRADES if not (pt["grade"] == g).any()]
    if missing:
        warnings.warn(f"patient_metrics: no {missing} patient in the test set: its recall is NaN and "
                      "balanced accuracy uses the present grade only", stacklevel=2)
    return patient_scores(pt["grade"].to_numpy(), pt["pred_grade"].to_numpy())


def run_metrics(pred: pd.DataFrame, by: str = "true") -> dict[str, float]:
    """slice_metrics and patient_metrics in one flat dict (what metrics.json holds)."""
    return {**slice_metrics(pred), **patient_metrics(pred, by=by)}

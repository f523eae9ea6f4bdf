"""The patient bootstrap, vectorised: every draw of every run from one matrix product.

A run's test predictions are reduced once to per-patient sums (its `RunCounts`): the confusion
counts of the patient's slices, their calibration-bin sums (for ECE) and the patient's true and
predicted grade. A bootstrap draw of patients is then a row of multiplicities W (how often each
patient was drawn), and the sums of every draw of every run are W @ counts: F1, recall,
precision, balanced accuracy, ECE and the patient-level metrics of all draws follow without a
loop. Ranking metrics (ROC-AUC, AP) are not sums over patients; they keep a per-draw loop.

The intervals are `scipy.stats.bootstrap`'s (percentile or BCa, Efron & Tibshirani 1993), with
the test patients' indices as the data and these scores as its vectorised statistic: the draws
are scipy's, so a seed gives scipy's resamples. Draws where a metric is undefined (e.g. no LGG
patient drawn) are left out of that metric's interval.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pandas as pd
from scipy import stats as sps

from kdlib import CLASSES, GRADES, MINORITY
from kdlib.errors import ConfigError, DataError
from kdlib.metrics import N_BINS, arrays, slice_scores

K = len(CLASSES)
_LGG = CLASSES.index(MINORITY)
_CONF = slice(0, K * K)  # feature columns: confusion counts (true * K + predicted)
_ECE = slice(K * K, K * K + 3 * N_BINS)  # max-probability bins: count, confidence, correct
_ECE_LGG = slice(K * K + 3 * N_BINS, K * K + 6 * N_BINS)  # p_LGG bins: count, p_LGG, is LGG
_PATIENT = slice(K * K + 6 * N_BINS, K * K + 6 * N_BINS + 4)  # (true, predicted) grade pairs
N_FEATURES = K * K + 6 * N_BINS + 4
MAX_FLOATS = 20_000_000  # per statistic call: bounds the memory of W @ counts


@dataclass(frozen=True)
class RunCounts:
    """One run's test set reduced per patient (patients sorted by subject id): `features`
    (patients, N_FEATURES) sums, and the sorted slice arrays for the ranking metrics."""

    subjects: np.ndarray
    features: np.ndarray
    keys: np.ndarray  # (slices,) "subject/slice/label": two runs share a test set when equal
    y: np.ndarray
    P: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray


def _bin_sums(codes: np.ndarray, n_patients: int, score: np.ndarray,
              target: np.ndarray) -> np.ndarray:
    """Per patient and equal-width bin (lo, hi] of `score`: count, sum of score, sum of target."""
    edges = np.linspace(0.0, 1.0, N_BINS + 1)
    b = np.clip(np.digitize(score, edges[1:-1], right=True), 0, N_BINS - 1)
    cell, size = codes * N_BINS + b, n_patients * N_BINS
    return np.concatenate([np.bincount(cell, weights=w, minlength=size).reshape(n_patients, N_BINS)
                           for w in (None, score, target.astype(float))], axis=1)


def patient_grades(codes: np.ndarray, y: np.ndarray, P: np.ndarray, n: int, subjects: np.ndarray,
                   by: str = "true") -> np.ndarray:
    """(n, 4) one-hot (true grade, predicted grade) per patient, as metrics.patient_predictions
    decides them (zeros for a patient without a tumour slice, whose grade is unknown)."""
    if by not in ("true", "predicted"):
        raise ConfigError(f"by={by!r} is not valid; choose 'true' or 'predicted'")
    hgg, lgg = CLASSES.index("HGG"), CLASSES.index("LGG")
    has = [np.bincount(codes[y == c], minlength=n) > 0 for c in (hgg, lgg)]
    mixed = has[0] & has[1]
    if mixed.any():
        raise DataError(f"subject(s) {list(subjects[mixed][:3])} have slices labelled both HGG and "
                        "LGG; a subject has one grade: check the slice table")
    use = y > 0
    if by == "predicted":
        use = P.argmax(axis=1) > 0
        use = use | (np.bincount(codes[use], minlength=n) == 0)[codes]
    count = np.bincount(codes[use], minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = [np.bincount(codes[use], weights=P[use, c], minlength=n) / count for c in (hgg, lgg)]
    true_lgg, pred_lgg = has[1], mean[1] > mean[0]
    pair = np.zeros((n, 4))
    graded = has[0] | has[1]
    pair[graded, 2 * true_lgg[graded] + pred_lgg[graded]] = 1
    return pair


def run_counts(pred: pd.DataFrame, by: str = "true") -> RunCounts:
    """Per-patient sums of a checked predictions table (metrics.check_predictions); `by` picks the
    slices that grade a patient, as in metrics.patient_predictions."""
    pred = pred.sort_values(["subject_id", "slice"], kind="mergesort").reset_index(drop=True)
    y, P = arrays(pred)
    codes, subjects = pd.factorize(pred["subject_id"], sort=True)
    subjects = np.asarray(subjects)
    n = len(subjects)
    lengths = np.bincount(codes, minlength=n)
    yhat = P.argmax(axis=1)
    conf = np.bincount(codes * K * K + y * K + yhat, minlength=n * K * K).reshape(n, K * K)
    features = np.concatenate([conf, _bin_sums(codes, n, P.max(axis=1), yhat == y),
                               _bin_sums(codes, n, P[:, _LGG], y == _LGG),
                               patient_grades(codes, y, P, n, subjects, by)], axis=1)
    keys = (pred["subject_id"] + "/" + pred["slice"].astype(str) + "/" + pred["label"]).to_numpy()
    return RunCounts(subjects, features.astype(float), keys, y, P,
                     np.r_[0, np.cumsum(lengths)[:-1]], lengths)


def _ece(sums: np.ndarray) -> np.ndarray:
    """ECE from (..., 3 * N_BINS) bin sums, as metrics' ECE (Guo et al., ICML 2017)."""
    count, conf, acc = sums[..., :N_BINS], sums[..., N_BINS:2 * N_BINS], sums[..., 2 * N_BINS:]
    with np.errstate(invalid="ignore", divide="ignore"):
        gap = np.where(count > 0, count * np.abs(acc / count - conf / count), 0.0)
        return gap.sum(axis=-1) / count.sum(axis=-1)


def scores(totals: np.ndarray) -> dict[str, np.ndarray]:
    """Every decomposable metric of slice_scores and patient_scores from summed features
    (..., N_FEATURES); each value has the leading shape of `totals`."""
    cm = totals[..., _CONF].reshape(*totals.shape[:-1], K, K)
    support, predicted = cm.sum(axis=-1), cm.sum(axis=-2)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    present = support > 0
    out: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(present, tp / support, np.nan)
        precision = np.where(present, np.where(predicted > 0, tp / predicted, 0.0), np.nan)
        f1 = np.where(present, 2 * tp / (support + predicted), np.nan)
        out["accuracy"] = tp.sum(axis=-1) / support.sum(axis=-1)
        out["balanced_accuracy"] = np.nansum(recall, axis=-1) / present.sum(axis=-1)
        out["macro_f1"] = np.nansum(f1, axis=-1) / present.sum(axis=-1)
        for i, c in enumerate(CLASSES):
            out[f"precision_{c}"], out[f"recall_{c}"] = precision[..., i], recall[..., i]
            out[f"f1_{c}"], out[f"support_{c}"] = f1[..., i], support[..., i]
        out["ece"] = _ece(totals[..., _ECE])
        out[f"ece_{MINORITY}"] = np.where(present[..., _LGG], _ece(totals[..., _ECE_LGG]), np.nan)
        pair = totals[..., _PATIENT]  # HGG->HGG, HGG->LGG, LGG->HGG, LGG->LGG
        n_grade = np.stack([pair[..., 0] + pair[..., 1], pair[..., 2] + pair[..., 3]], axis=-1)
        hit = np.stack([pair[..., 0], pair[..., 3]], axis=-1)
        n = n_grade.sum(axis=-1)
        out["patient_accuracy"] = np.where(n > 0, hit.sum(axis=-1) / n, np.nan)
        grade_recall = np.where(n_grade > 0, hit / n_grade, np.nan)
        for i, g in enumerate(GRADES):
            out[f"patient_recall_{g}"] = grade_recall[..., i]
        n_has = (n_grade > 0).sum(axis=-1)
        out["patient_balanced_accuracy"] = np.where(
            n_has > 0, np.nansum(grade_recall, axis=-1) / n_has, np.nan)
        tp_lgg, n_true, n_pred = pair[..., 3], n_grade[..., 1], pair[..., 1] + pair[..., 3]
        out[f"patient_precision_{MINORITY}"] = np.where(
            n_pred > 0, tp_lgg / n_pred, np.where(n_true > 0, 0.0, np.nan))
        out[f"patient_f1_{MINORITY}"] = np.where(n_true > 0, 2 * tp_lgg / (n_true + n_pred), np.nan)
    out["n_patients"], out[f"n_patients_{MINORITY}"] = n, n_true
    return out


def is_ranking(metric: str) -> bool:
    """ROC-AUC and average precision: not sums over patients, computed draw by draw."""
    return metric.startswith(("auc_", "ap_"))


def multiplicities(idx: np.ndarray, n: int) -> np.ndarray:
    """(..., m) patient indices -> (..., n) float counts of each patient in each draw."""
    flat = idx.reshape(-1, idx.shape[-1])
    rows = np.arange(len(flat))[:, None] * n
    w = np.bincount((rows + flat).ravel(), minlength=len(flat) * n).reshape(len(flat), n)
    return w.reshape(*idx.shape[:-1], n).astype(float)


def _ranking_scores(run: RunCounts, idx: np.ndarray, metrics: Sequence[str]) -> np.ndarray:
    """(len(metrics), ...) ranking metrics of one run, draw by draw (the slow path)."""
    flat = idx.reshape(-1, idx.shape[-1])
    out = np.empty((len(metrics), len(flat)))
    for d, draw in enumerate(flat):
        ln = run.lengths[draw]
        rows = np.repeat(run.starts[draw] - np.cumsum(ln) + ln, ln) + np.arange(ln.sum())
        s = slice_scores(run.y[rows], run.P[rows], ranking=True)
        out[:, d] = [s[m] for m in metrics]
    return out.reshape(len(metrics), *idx.shape[:-1])


def run_scores(runs: Sequence[RunCounts], idx: np.ndarray, metrics: Sequence[str],
               stacked: np.ndarray | None = None) -> np.ndarray:
    """(len(runs), len(metrics), ...) scores of every run on the patient draws `idx` (..., m);
    `stacked` is np.stack([r.features for r in runs], axis=1), when the caller has it."""
    w = multiplicities(idx, len(runs[0].subjects))
    if stacked is None:
        stacked = np.stack([r.features for r in runs], axis=1)  # (patients, runs, features)
    totals = np.tensordot(w, stacked, axes=(-1, 0))  # (..., runs, features)
    fast = scores(totals)
    out = np.empty((len(runs), len(metrics), *idx.shape[:-1]))
    rank = [m for m in metrics if is_ranking(m)]
    for j, m in enumerate(metrics):
        if m not in rank:
            out[:, j] = np.moveaxis(fast[m], -1, 0)
    if rank:
        at = [metrics.index(m) for m in rank]
        for r, run in enumerate(runs):
            out[r, at] = _ranking_scores(run, idx, rank)
    return out


def test_sets(runs: Sequence[RunCounts]) -> list[list[int]]:
    """The runs grouped by test set (the same patients), in order of first appearance; DataError
    when two runs on the same patients were not tested on the same slices with the same labels."""
    sets: dict[tuple, list[int]] = {}
    for i, run in enumerate(runs):
        members = sets.setdefault(tuple(run.subjects), [])
        if members and not np.array_equal(run.keys, runs[members[0]].keys):
            raise DataError(f"runs {members[0]} and {i} were tested on the same patients but not "
                            "on the same slices with the same labels (different caches?)")
        members.append(i)
    return list(sets.values())


def patient_bootstrap(runs: Sequence[RunCounts], estimands: Sequence[tuple[list[int], list[int]]],
                      metrics: Sequence[str], n_boot: int, ci: float = 0.95,
                      method: str = "percentile", seed: int = 0) -> pd.DataFrame:
    """Patient-bootstrap CIs of several estimands over runs, from one set of draws.

    Estimand e = (a, b): mean over runs a of each metric, minus the mean over runs b (b may be
    empty). Runs on the same test set share every draw (paired); distinct test sets (e.g. the
    outer folds of cross-validation) are resampled independently (scipy's multi-sample
    bootstrap). Rows: estimand, metric, estimate, low, high, se, n_undefined (draws where the
    metric is undefined), n_boot, n_patients (of the estimand's test sets), ci_method, ci.
    """
    sets = test_sets(runs)
    data = tuple(np.arange(len(runs[m[0]].subjects)) for m in sets)
    stacked = [np.stack([runs[i].features for i in m], axis=1) for m in sets]

    def statistic(*idx: np.ndarray, axis: int = -1) -> np.ndarray:
        per_run = np.empty((len(runs), len(metrics), *idx[0].shape[:-1]))
        for k, members in enumerate(sets):
            per_run[members] = run_scores([runs[i] for i in members], idx[k], metrics, stacked[k])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an estimand over a NaN run is NaN
            return np.stack([per_run[a].mean(axis=0) - (per_run[b].mean(axis=0) if b else 0.0)
                             for a, b in estimands])

    n_all = sum(len(d) for d in data)
    batch = max(1, MAX_FLOATS // (len(runs) * N_FEATURES + n_all))
    est = statistic(*data)
    with warnings.catch_warnings():  # undefined or constant draws: handled below
        warnings.simplefilter("ignore", sps.DegenerateDataWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        res = sps.bootstrap(data, statistic, n_resamples=n_boot, batch=batch, vectorized=True,
                            confidence_level=ci, method=method, rng=np.random.default_rng(seed))
    dist = res.bootstrap_distribution  # (estimands, metrics, n_boot)
    low, high = res.confidence_interval.low, res.confidence_interval.high
    set_of = {i: k for k, members in enumerate(sets) for i in members}
    rows = []
    for e, (a, b) in enumerate(estimands):
        n = sum(len(data[k]) for k in {set_of[i] for i in a + b})
        for j, m in enumerate(metrics):
            theta = dist[e, j]
            ok = np.isfinite(theta)
            lo, hi = float(low[e, j]), float(high[e, j])
            if not np.isfinite(est[e, j]) or not ok.any():
                lo = hi = np.nan
            elif (theta[ok] == theta[ok][0]).all():
                lo = hi = float(theta[ok][0])  # every draw the same: no spread (BCa would be NaN)
            elif not ok.all():
                lo, hi = _interval_of_defined(data, statistic, e, j, theta[ok], ci, method, batch)
            rows.append({"estimand": e, "metric": m, "estimate": float(est[e, j]), "low": lo,
                         "high": hi, "se": float(np.std(theta[ok], ddof=1)) if ok.sum() > 1
                         else np.nan, "n_undefined": int((~ok).sum()), "n_boot": n_boot,
                         "n_patients": n, "ci_method": method, "ci": ci})
    return pd.DataFrame(rows)


def _interval_of_defined(data: tuple[np.ndarray, ...], statistic, e: int, j: int,
                         theta: np.ndarray, ci: float, method: str, batch: int
                         ) -> tuple[float, float]:
    """scipy's interval of estimand e, metric j from its defined draws only (no new draws)."""
    def one(*idx: np.ndarray, axis: int = -1) -> np.ndarray:
        return statistic(*idx)[e, j]

    with warnings.catch_warnings():  # an undefined BCa interval is NaN, reported by the caller
        warnings.simplefilter("ignore", sps.DegenerateDataWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        r = sps.bootstrap(data, one, n_resamples=0, batch=batch, vectorized=True,
                          confidence_level=ci, method=method,
                          bootstrap_result=SimpleNamespace(bootstrap_distribution=theta))
    return float(r.confidence_interval.low), float(r.confidence_interval.high)

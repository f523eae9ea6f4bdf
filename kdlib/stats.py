"""Uncertainty: patient bootstrap of one run's metrics, and paired tests of runs across folds.

Two sources of noise, two tools:
- test-set sampling (which patients happen to be in the test set): `bootstrap_metrics` and the
  paired `bootstrap_difference` resample PATIENTS with replacement (slices of one patient are
  correlated, so resampling slices would give too narrow intervals); kdlib.bootstrap computes
  every draw at once and takes the intervals from scipy.stats.bootstrap;
- training variability (fold, subsample, seed): `compare_to_baseline` pairs runs of a method with
  the baseline run of the same fold/ratio/seed and tests the differences with the corrected
  resampled t-test (Nadeau & Bengio, Machine Learning 2003) and the Wilcoxon signed-rank test
  (Demsar, JMLR 2006), Holm-adjusted over the methods compared (Holm, Scand. J. Stat. 1979).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from kdlib.bootstrap import RunCounts, patient_bootstrap, run_counts
from kdlib.errors import ConfigError, DataError
from kdlib.metrics import check_predictions, patient_scores, slice_scores

HEADLINE: tuple[str, ...] = ("macro_f1", "balanced_accuracy", "f1_LGG", "recall_LGG",
                             "precision_LGG", "ece", "patient_balanced_accuracy",
                             "patient_recall_LGG")
WILCOXON_MIN_PAIRS = 6
CI_METHODS: tuple[str, ...] = ("percentile", "bca")
BOOT_COLUMNS: tuple[str, ...] = ("metric", "estimate", "low", "high", "se", "n_boot", "n_patients",
                                 "ci_method", "ci")


def check_boot_settings(n_boot: int | None = None, ci: float | None = None) -> None:
    """Raise ConfigError unless n_boot is an integer >= 1 and ci a level strictly between 0 and 1."""
    if n_boot is not None and (isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer))
                               or n_boot < 1):
        raise ConfigError(f"n_boot={n_boot!r} must be an integer >= 1 (e.g. 2000)")
    if ci is not None and (isinstance(ci, bool) or not isinstance(ci, (int, float, np.number))
                           or not 0 < ci < 1):
        raise ConfigError(f"ci={ci!r} must be a confidence level strictly between 0 and 1 "
                          "(e.g. 0.95, not 95)")


def check_ci_method(method: str) -> None:
    """Raise ConfigError unless `method` is an interval method of the patient bootstrap."""
    if method not in CI_METHODS:
        raise ConfigError(f"method={method!r} is not valid; choose 'percentile' or 'bca'")


def check_metrics(metrics: Sequence[str]) -> list[str]:
    """The metric names as a list; ConfigError for a name that no metric function gives."""
    known = set(slice_scores(np.arange(3), np.eye(3))) | set(
        patient_scores(np.array(["HGG"]), np.array(["HGG"])))
    bad = [m for m in metrics if m not in known]
    if bad:
        raise ConfigError(f"unknown metric(s) {bad}; choose from {sorted(known)}")
    return list(metrics)


def _bootstrap(runs: list[RunCounts], n_runs: int, metrics: list[str], n_boot: int, ci: float,
               method: str, seed: int) -> pd.DataFrame:
    """mean_k f(run_k) over runs[:n_runs], minus the mean over runs[n_runs:] when there are any."""
    smallest = min(len(r.subjects) for r in runs)
    if smallest < 2:
        raise DataError(f"the patient bootstrap needs at least 2 test patients, a test set has "
                        f"{smallest}")
    ours, base = list(range(n_runs)), list(range(n_runs, len(runs)))
    out = patient_bootstrap(runs, [(ours, base)], metrics, n_boot, ci, method, seed)
    defined = np.isfinite(out["estimate"])
    for _, row in out[defined & (out["n_undefined"] > 0)].iterrows():
        warnings.warn(f"{row['metric']}: {row['n_undefined']} of {n_boot} bootstrap resamples were "
                      "undefined (e.g. no LGG patient drawn); the interval uses the others",
                      stacklevel=3)
    for m in out.loc[defined & out["low"].isna() & (out["n_undefined"] < n_boot), "metric"]:
        warnings.warn(f"{m}: the BCa interval is undefined (the metric is undefined without one "
                      "of the patients, e.g. the only LGG patient); use method='percentile'",
                      stacklevel=3)
    return out[list(BOOT_COLUMNS)]


def bootstrap_metrics(pred: pd.DataFrame, metrics: Sequence[str] = HEADLINE, n_boot: int = 2000,
                      ci: float = 0.95, method: str = "percentile", seed: int = 0,
                      by: str = "true") -> pd.DataFrame:
    """Patient-bootstrap CIs of one run's metrics (names from slice_metrics / patient_metrics).

    Returns one row per metric: metric, estimate, low, high, se, n_boot, n_patients, ci_method, ci.
    Each draw resamples the test subjects with replacement; slice and patient metrics of a draw
    use the same subjects. The intervals are scipy.stats.bootstrap's (kdlib.bootstrap).
    """
    check_boot_settings(n_boot, ci)
    check_ci_method(method)
    metrics = check_metrics(metrics)
    return _bootstrap([run_counts(check_predictions(pred), by)], 1, metrics, n_boot, ci, method,
                      seed)


def check_same_test_set(a: pd.DataFrame, b: pd.DataFrame, names: tuple[str, str] = ("A", "B")) -> None:
    """Raise DataError when two prediction tables do not cover the same slices with the same labels."""
    ka = set(zip(a["subject_id"].astype(str), a["slice"]))
    kb = set(zip(b["subject_id"].astype(str), b["slice"]))
    if ka != kb:
        sa, sb = {k[0] for k in ka}, {k[0] for k in kb}
        raise DataError(
            f"runs {names[0]} and {names[1]} were tested on different sets: "
            f"{len(sa - sb)} subject(s) only in {names[0]}, {len(sb - sa)} only in {names[1]}; "
            f"{len(ka - kb)} slice(s) only in {names[0]}, {len(kb - ka)} only in {names[1]}. "
            "Paired comparisons need the same test split (same splits file and cache settings)"
        )
    m = a.merge(b, on=["subject_id", "slice"], suffixes=("_a", "_b"))
    diff = int((m["label_a"].astype(str) != m["label_b"].astype(str)).sum())
    if diff:
        raise DataError(f"runs {names[0]} and {names[1]} disagree on the true label of {diff} "
                        "slice(s); they were built from different caches (min_tumor_pixels?)")


def bootstrap_difference(pred_a: pd.DataFrame, pred_b: pd.DataFrame,
                         metrics: Sequence[str] = HEADLINE, n_boot: int = 2000, ci: float = 0.95,
                         method: str = "percentile", seed: int = 0, by: str = "true") -> pd.DataFrame:
    """Paired patient-bootstrap CI of metric(A) - metric(B) for two runs on the same test set:
    every draw uses the same resampled patients for both runs. Columns as bootstrap_metrics."""
    check_boot_settings(n_boot, ci)
    check_ci_method(method)
    metrics = check_metrics(metrics)
    a, b = check_predictions(pred_a, "predictions A"), check_predictions(pred_b, "predictions B")
    check_same_test_set(a, b)
    return _bootstrap([run_counts(a, by), run_counts(b, by)], 1, metrics, n_boot, ci, method, seed)


def bootstrap_fold_mean(preds: Sequence[pd.DataFrame],
                        baselines: Sequence[pd.DataFrame] | None = None,
                        metrics: Sequence[str] = HEADLINE, n_boot: int = 2000, ci: float = 0.95,
                        method: str = "percentile", seed: int = 0, by: str = "true") -> pd.DataFrame:
    """Patient-bootstrap CI of a metric averaged over several runs (e.g. the folds of one method),
    or of that mean minus the baselines' mean. Runs on the same test set share every draw
    (paired); different test sets (the outer folds of cross-validation) are resampled
    independently. Columns as bootstrap_metrics (n_patients: over the distinct test sets)."""
    check_boot_settings(n_boot, ci)
    check_ci_method(method)
    metrics = check_metrics(metrics)
    runs = [check_predictions(p, f"predictions {i}") for i, p in enumerate(preds)]
    base = [check_predictions(p, f"baseline predictions {i}") for i, p in enumerate(baselines or [])]
    if not runs:
        raise DataError("bootstrap_fold_mean needs at least one prediction table")
    counts = [run_counts(p, by) for p in runs + base]
    return _bootstrap(counts, len(runs), metrics, n_boot, ci, method, seed)


# ---------------------------------------------------------------- across folds / runs


def few_folds_caveat(n_pairs: int) -> str:
    """The warning a reader needs when there are too few paired runs for the tests to say much."""
    if n_pairs < 2:
        return f"{n_pairs} pair(s): no test possible"
    if n_pairs < WILCOXON_MIN_PAIRS:
        return (f"only {n_pairs} pairs: Wilcoxon cannot reach p<0.05 (smallest two-sided p = "
                f"{2 / 2**n_pairs:.3g}); lean on the corrected t-test and the CIs")
    return ""


def corrected_resampled_ttest(diffs: Sequence[float], test_train_ratio: float) -> dict[str, float]:
    """Corrected resampled t-test (Nadeau & Bengio 2003) of paired per-fold differences d:
    t = mean(d) / sqrt((1/k + n_test/n_train) s^2), df = k - 1, two-sided p. Given the k x r
    differences of repeated k-fold cross-validation it is the corrected repeated k-fold t-test
    (Bouckaert & Frank 2004; kdlib.comparisons.repeated_cv_ttest adds its interval).

    Returns mean, std (s, ddof=1), se (the corrected standard error), t, df, p, n. With fewer than
    two differences or zero variance, t and p are NaN (with a warning), never 0 or infinity.
    """
    d = np.asarray(diffs, dtype=float)
    if not np.isfinite(test_train_ratio) or test_train_ratio < 0:
        raise ConfigError(f"test_train_ratio={test_train_ratio!r} must be a number >= 0 "
                          "(n_test / n_train, e.g. 1/(k-1) for k-fold cross-validation)")
    k = len(d)
    out = {"mean": float(d.mean()) if k else np.nan, "std": np.nan, "se": np.nan,
           "t": np.nan, "df": float(k - 1), "p": np.nan, "n": float(k)}
    if k < 2:
        warnings.warn(f"corrected t-test needs at least 2 paired differences, got {k}", stacklevel=2)
        return out
    s2 = d.var(ddof=1)
    se = float(np.sqrt((1 / k + test_train_ratio) * s2))
    out.update(std=float(np.sqrt(s2)), se=se)
    if se == 0:
        warnings.warn("corrected t-test: all differences are equal, t is undefined", stacklevel=2)
        return out
    t = out["mean"] / se
    out.update(t=float(t), p=float(2 * sps.t.sf(abs(t), k - 1)))
    return out


def wilcoxon_signed_rank(diffs: Sequence[float]) -> dict[str, float | str]:
    """Two-sided Wilcoxon signed-rank test of paired differences (scipy; exact for small n; zero
    differences dropped). Returns statistic, p, n, min_p (the smallest p n pairs can give), caveat."""
    d = np.asarray(diffs, dtype=float)
    n = int(np.sum(d != 0))
    out: dict[str, float | str] = {"statistic": np.nan, "p": np.nan, "n": float(len(d)),
                                   "min_p": 2 / 2**n if n else np.nan,
                                   "caveat": few_folds_caveat(len(d))}
    if n == 0:
        warnings.warn("Wilcoxon: all differences are zero, p is undefined", stacklevel=2)
        return out
    res = sps.wilcoxon(d, alternative="two-sided")
    out.update(statistic=float(res.statistic), p=float(res.pvalue))
    return out


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm step-down adjusted p-values (Holm 1979), in the input order; NaNs stay NaN and do not
    count as tests."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    order = ok[np.argsort(p[ok], kind="mergesort")]
    adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out[order] = adj
    return out


def _check_columns(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ConfigError(f"{what}: column(s) {missing} not in the run table; "
                          f"available: {list(df.columns)}")


def summarize_runs(runs: pd.DataFrame, metrics: Sequence[str], by: Sequence[str] = ("method",)
                   ) -> pd.DataFrame:
    """Mean and std (ddof=1) of each metric over the runs of each group: <m>_mean, <m>_std, n_runs."""
    by = list(by)
    _check_columns(runs, [*by, *metrics], "summarize_runs")
    g = runs.groupby(by, dropna=False, sort=False)
    out = g.size().rename("n_runs").to_frame()
    for m in metrics:
        out[f"{m}_mean"] = g[m].mean()
        out[f"{m}_std"] = g[m].std(ddof=1)
    return out.reset_index()


def _baseline_mask(runs: pd.DataFrame, baseline, by: list[str]) -> np.ndarray:
    if isinstance(baseline, str):
        mask = (runs[by[0]] == baseline).to_numpy()
    elif isinstance(baseline, Mapping):
        _check_columns(runs, list(baseline), "baseline")
        mask = np.logical_and.reduce([(runs[c] == v).to_numpy() for c, v in baseline.items()])
    else:
        mask = np.asarray(baseline, dtype=bool)
        if mask.shape != (len(runs),):
            raise ConfigError(f"baseline mask has shape {mask.shape}, the run table {len(runs)} rows")
    if not mask.any():
        where = f" in column {by[0]!r}" if isinstance(baseline, str) else ""
        raise ConfigError(f"baseline {baseline!r} matches no run{where}; pass a value of by[0], "
                          "a {column: value} dict (e.g. {'method': 'ce'}) or a boolean mask")
    return mask


def _check_unique(rows: pd.DataFrame, pair_on: list[str], skip: list[str], what: str) -> None:
    """DataError when several runs of `rows` share a pair_on key (they would count as extra folds)."""
    dup = rows.duplicated(pair_on, keep=False).to_numpy()
    if dup.any():
        d = rows.loc[dup]
        varying = [c for c in d.columns if c not in (*pair_on, *skip)  # config-like columns
                   and 1 < d[c].astype(str).nunique() < len(d)]
        raise DataError(f"{what}: {int(dup.sum())} runs share the same {pair_on}; add the column "
                        f"that tells them apart to pair_on or by (they differ in {varying[:6]}), "
                        "or filter the table")


def compare_to_baseline(runs: pd.DataFrame, baseline, metric: str,
                        pair_on: Sequence[str] = ("fold", "ratio", "seed"),
                        by: Sequence[str] = ("method",), test_train_ratio: float | None = None,
                        ci: float = 0.95) -> pd.DataFrame:
    """Per group of `by` (a method): paired differences metric(method) - metric(baseline) over the
    runs matched on `pair_on`, with the corrected-t CI and p, Wilcoxon p, Holm-adjusted p.

    `baseline` is a value of by[0] (e.g. "ce"), a {column: value} dict or a boolean mask.
    Every group and the baseline must have at most one run per `pair_on` key (DataError otherwise).
    `test_train_ratio` = n_test / n_train; when None it is, per group, the mean ratio of the
    columns n_test_slices / n_train_slices (as kdlib.results.load_runs gives them) or n_test / n_train
    over the group's and the baseline's runs of its pairs (groups such as imbalance ratios train
    on different numbers of slices). Columns of the result: by..., metric, n_pairs,
    test_train_ratio, baseline_mean, method_mean, mean_diff, std_diff, ci_low, ci_high, t,
    p_corrected_t, p_wilcoxon, p_holm (corrected-t p, Holm over the groups of this call), caveat.
    A run table with a `repeat` column is paired on it too. kdlib.hypotheses.effect_table is the
    per-split analysis of the repeated design (seeds averaged within a split, declared families).
    """
    check_boot_settings(ci=ci)
    by, pair_on = list(by), list(pair_on)
    if "repeat" in runs.columns and "repeat" not in (*pair_on, *by):
        pair_on.append("repeat")  # repeated cross-validation: fold f of two repeats differs
    _check_columns(runs, [*by, *pair_on, metric], "compare_to_baseline")
    ttr = "__test_train_ratio"
    if test_train_ratio is None:
        pair = next((p for p in (("n_test_slices", "n_train_slices"), ("n_test", "n_train"))
                     if set(p) <= set(runs.columns)), None)
        if pair is None:
            raise ConfigError("pass test_train_ratio=n_test/n_train (e.g. 1/(k-1) for k folds) or "
                              "give the run table columns n_test_slices and n_train_slices")
        runs = runs.assign(**{ttr: (runs[pair[0]] / runs[pair[1]]).astype(float)})
    else:
        if isinstance(test_train_ratio, bool) or not isinstance(test_train_ratio, (int, float, np.number)) \
                or not (np.isfinite(test_train_ratio) and test_train_ratio >= 0):
            raise ConfigError(f"test_train_ratio={test_train_ratio!r} must be a number >= 0 "
                              "(n_test / n_train, e.g. 1/(k-1) for k-fold cross-validation)")
        runs = runs.assign(**{ttr: float(test_train_ratio)})
    mask = _baseline_mask(runs, baseline, by)
    base = runs.loc[mask, [*pair_on, metric, ttr]]
    _check_unique(runs.loc[mask], pair_on, [metric, ttr], "baseline")
    rows = []
    for key, grp in runs.loc[~mask].groupby(by, dropna=False, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        _check_unique(grp, pair_on, [metric, ttr], str(dict(zip(by, key))))
        m = grp[[*pair_on, metric, ttr]].merge(base, on=pair_on, suffixes=("", "_base"))
        if len(m) < len(grp):
            warnings.warn(f"{dict(zip(by, key))}: {len(grp) - len(m)} run(s) without a baseline "
                          f"run of the same {pair_on} are left out", stacklevel=2)
        d = (m[metric] - m[f"{metric}_base"]).to_numpy(float)
        if np.isnan(d).any():
            warnings.warn(f"{dict(zip(by, key))}: {int(np.isnan(d).sum())} pair(s) with a NaN "
                          f"{metric} are left out", stacklevel=2)
            m, d = m[~np.isnan(d)], d[~np.isnan(d)]
        ratio = float(pd.concat([m[ttr], m[f"{ttr}_base"]]).mean()) if len(m) else np.nan
        if len(d) > 1 and not (np.isfinite(ratio) and ratio >= 0):
            raise ConfigError(f"{dict(zip(by, key))}: n_test / n_train of its runs is {ratio}; "
                              "pass test_train_ratio=n_test/n_train or fix the run table")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tt = corrected_resampled_ttest(d, ratio if len(d) > 1 else 0.0)
            wx = wilcoxon_signed_rank(d)
        half = sps.t.ppf(0.5 + ci / 2, len(d) - 1) * tt["se"] if len(d) > 1 else np.nan
        rows.append({**dict(zip(by, key)), "metric": metric, "n_pairs": len(d),
                     "test_train_ratio": ratio,
                     "baseline_mean": m[f"{metric}_base"].mean(), "method_mean": m[metric].mean(),
                     "mean_diff": tt["mean"], "std_diff": tt["std"],
                     "ci_low": tt["mean"] - half, "ci_high": tt["mean"] + half,
                     "t": tt["t"], "p_corrected_t": tt["p"], "p_wilcoxon": wx["p"],
                     "caveat": few_folds_caveat(len(d))})
    out = pd.DataFrame(rows)
    if out.empty:
        raise DataError("no run outside the baseline to compare")
    out.insert(out.columns.get_loc("caveat"), "p_holm", holm(out["p_corrected_t"]))
    caveats = sorted(set(out["caveat"]) - {""})
    if caveats:
        warnings.warn("; ".join(caveats), stacklevel=2)
    return out

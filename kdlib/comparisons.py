"""Comparing a method with a baseline over repeated cross-validation.

A split is one (repeat, fold, ratio) of the design. A method and its baseline are paired on the
split, their seeds averaged within it, and the k x r per-split differences are tested with:
- the corrected repeated k-fold t-test (Bouckaert & Frank, PAKDD 2004; Nadeau & Bengio, Machine
  Learning 2003 for one repeat), whose interval is the effect-size interval of the cv design: it
  carries training variability and test-set sampling;
- the Bayesian correlated t-test (Corani & Benavoli, Machine Learning 2015; Benavoli et al., JMLR
  2017) with a region of practical equivalence (ROPE);
- for a fixed held-out test set (the holdout design), an interval that adds the training variance
  across splits (with the same correction) to the patient-bootstrap variance of that test set.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from kdlib.errors import ConfigError, DataError
from kdlib.stats import bootstrap_fold_mean, check_boot_settings, corrected_resampled_ttest

PAIR_ON: tuple[str, ...] = ("repeat", "fold", "ratio")
ROPE = 0.02
"""Default half-width of the region of practical equivalence (e.g. +-0.02 LGG F1)."""
DECISION = 0.95
"""Posterior probability above which the Bayesian test decides (Benavoli et al. 2017)."""
HOLDOUT_CAVEAT = (
    "fixed held-out test set: the interval adds the patient-bootstrap variance of this one test "
    "set to the training variance across splits; it speaks for new patients only as far as this "
    "test set represents them")
UNCORRECTED_CAVEAT = (
    ", and it treats the splits as independent although they share training subjects and seeds "
    "(too narrow when a seed's effect persists across splits)")
RATIO_COLUMNS = (("n_test_slices", "n_train_slices"), ("n_test", "n_train"))


def _selector_mask(runs: pd.DataFrame, which: str | Mapping, column: str) -> np.ndarray:
    """Rows of `runs` selected by a value of `column` or a {column: value} mapping (NaN matches
    NaN, so {"ratio": None} selects the natural ratio)."""
    spec = which if isinstance(which, Mapping) else {column: which}
    missing = [c for c in spec if c not in runs.columns]
    if missing:
        raise ConfigError(f"column(s) {missing} not in the run table; available: "
                          f"{list(runs.columns)}")
    masks = [(runs[c].isna() if v is None or (isinstance(v, float) and np.isnan(v))
              else runs[c] == v).to_numpy() for c, v in spec.items()]
    return np.logical_and.reduce(masks)


def _per_split(rows: pd.DataFrame, metric: str, pair_on: list[str], what: str) -> pd.DataFrame:
    """Seed-averaged metric and n_test/n_train per split of one arm."""
    if "seed" in rows.columns:
        dup = rows.duplicated([*pair_on, "seed"], keep=False)
        if dup.any():
            first = rows.loc[dup, [*pair_on, "seed"]].iloc[0].to_dict()
            raise DataError(f"{what}: {int(dup.sum())} runs share a split and seed (e.g. {first}); "
                            "filter the run table to one configuration per arm, or select the arm "
                            "with a {column: value} mapping")
    ratio = next((p for p in RATIO_COLUMNS if set(p) <= set(rows.columns)), None)
    rows = rows.assign(_ttr=(rows[ratio[0]] / rows[ratio[1]]).astype(float) if ratio else np.nan)
    g = rows.groupby(pair_on, dropna=False, sort=True)
    out = g[[metric, "_ttr"]].mean().rename(columns={metric: "value", "_ttr": "ttr"})
    out["n_seeds"] = g.size()
    return out.reset_index()


def split_differences(runs: pd.DataFrame, method: str | Mapping, baseline: str | Mapping,
                      metric: str, column: str = "method",
                      pair_on: Sequence[str] = PAIR_ON) -> pd.DataFrame:
    """Paired per-split differences metric(method) - metric(baseline), seeds averaged within each
    split (Bouckaert & Frank 2004). `method`/`baseline`: a value of `column` or a {column: value}
    mapping. Runs without a `repeat` column count as repeat 0.

    Columns: the pair_on columns, method_value, baseline_value, diff, n_seeds, n_seeds_baseline,
    seed_var (variance over seeds of the per-seed differences within the split when both arms
    have the same two or more seeds, else NaN), test_train_ratio (mean n_test/n_train of the
    split's runs, from n_test_slices/n_train_slices or n_test/n_train; NaN without them).
    """
    pair_on = list(pair_on)
    if "repeat" in pair_on and "repeat" not in runs.columns:
        runs = runs.assign(repeat=0)
    missing = [c for c in [*pair_on, metric] if c not in runs.columns]
    if missing:
        raise ConfigError(f"column(s) {missing} not in the run table; available: "
                          f"{list(runs.columns)}")
    ours, base = runs[_selector_mask(runs, method, column)], runs[_selector_mask(runs, baseline,
                                                                              column)]
    for rows, which in ((ours, method), (base, baseline)):
        if rows.empty:
            raise DataError(f"{which!r} matches no run in column {column!r}; values there: "
                            f"{sorted(map(str, runs[column].dropna().unique()))[:12]}")
    a = _per_split(ours, metric, pair_on, f"method {method!r}")
    b = _per_split(base, metric, pair_on, f"baseline {baseline!r}")
    m = a.merge(b, on=pair_on, suffixes=("", "_b"))
    if len(m) < max(len(a), len(b)):
        warnings.warn(f"{method!r} vs {baseline!r}: {len(a) - len(m)} split(s) of the method and "
                      f"{len(b) - len(m)} of the baseline have no partner and are left out",
                      stacklevel=2)
    out = m[pair_on].copy()
    out["method_value"], out["baseline_value"] = m["value"], m["value_b"]
    out["diff"] = m["value"] - m["value_b"]
    out["n_seeds"], out["n_seeds_baseline"] = m["n_seeds"], m["n_seeds_b"]
    several = "seed" in runs.columns and bool((m["n_seeds"] > 1).any())
    out["seed_var"] = _seed_var(ours, base, m, metric, pair_on) if several else np.nan
    out["test_train_ratio"] = (m["ttr"] * m["n_seeds"] + m["ttr_b"] * m["n_seeds_b"]) / (
        m["n_seeds"] + m["n_seeds_b"])
    bad = out["diff"].isna()
    if bad.any():
        warnings.warn(f"{method!r} vs {baseline!r}: {int(bad.sum())} split(s) with a NaN {metric} "
                      "are left out", stacklevel=2)
        out = out[~bad]
    return out.reset_index(drop=True)


def _seed_var(ours: pd.DataFrame, base: pd.DataFrame, m: pd.DataFrame, metric: str,
              pair_on: list[str]) -> np.ndarray:
    """Per split: variance over seeds of the per-seed differences, where both arms ran the same
    two or more seeds (NaN elsewhere)."""
    per_seed = ours[[*pair_on, "seed", metric]].merge(base[[*pair_on, "seed", metric]],
                                                      on=[*pair_on, "seed"], suffixes=("", "_b"))
    g = (per_seed[metric] - per_seed[f"{metric}_b"]).groupby(
        [per_seed[c] for c in pair_on], dropna=False, sort=True)
    stats = pd.DataFrame({"_v": g.var(ddof=1), "_n": g.size()}).reset_index()
    v = m[pair_on].merge(stats, on=pair_on, how="left")
    same = (v["_n"].to_numpy() == m["n_seeds"].to_numpy()) & (
        m["n_seeds"].to_numpy() == m["n_seeds_b"].to_numpy()) & (m["n_seeds"].to_numpy() > 1)
    return np.where(same, v["_v"].to_numpy(float), np.nan)


def design_shape(diffs: pd.DataFrame) -> dict[str, int]:
    """k (folds), r (repeats), n (splits) and the largest seed count of a split_differences table."""
    r = int(diffs["repeat"].nunique()) if "repeat" in diffs else 1
    return {"k": int(diffs["fold"].nunique()) if "fold" in diffs else len(diffs), "r": r,
            "n": len(diffs), "s": int(diffs["n_seeds"].max()) if len(diffs) else 0}


def _check_ratio(test_train_ratio: float) -> float:
    if isinstance(test_train_ratio, bool) or not isinstance(
            test_train_ratio, (int, float, np.number)) or not test_train_ratio >= 0 \
            or not np.isfinite(test_train_ratio):
        raise ConfigError(f"test_train_ratio={test_train_ratio!r} must be a number >= 0 (n_test / "
                          "n_train of a split, e.g. 1/(k-1) for k-fold cross-validation); give "
                          "the run table n_test_slices and n_train_slices")
    return float(test_train_ratio)


def repeated_cv_ttest(diffs: Sequence[float], test_train_ratio: float, ci: float = 0.95
                      ) -> dict[str, float]:
    """Corrected repeated k-fold cv t-test (Bouckaert & Frank 2004; Nadeau & Bengio 2003 for r = 1)
    of the n = k r per-split differences: t = mean / sqrt((1/(k r) + n_test/n_train) s^2),
    df = k r - 1, two-sided p, and the interval mean +- t_{df} SE of the mean gain.

    Returns mean, sd, se, t, df, p, ci_low, ci_high, n (NaN where fewer than 2 differences or all
    equal, with a warning).
    """
    check_boot_settings(ci=ci)
    ratio = _check_ratio(test_train_ratio)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tt = corrected_resampled_ttest(np.asarray(diffs, dtype=float), ratio)
    for w in caught:
        warnings.warn(str(w.message), stacklevel=2)
    n = int(tt["n"])
    half = sps.t.ppf(0.5 + ci / 2, n - 1) * tt["se"] if n > 1 else np.nan
    return {"mean": tt["mean"], "sd": tt["std"], "se": tt["se"], "t": tt["t"], "df": tt["df"],
            "p": tt["p"], "ci_low": tt["mean"] - half, "ci_high": tt["mean"] + half, "n": n}


def bayes_correlated_ttest(diffs: Sequence[float], test_train_ratio: float, rope: float = ROPE
                           ) -> dict[str, float]:
    """Bayesian correlated t-test (Corani & Benavoli 2015; Benavoli et al. 2017): the posterior of
    the mean gain is Student t with df = n - 1, location mean(d) and scale
    sqrt((1/n + rho/(1-rho)) s^2), rho = n_test/(n_test + n_train). Returns p_better
    (gain > rope), p_rope (|gain| <= rope), p_worse (gain < -rope), mean, scale, df."""
    if isinstance(rope, bool) or not isinstance(rope, (int, float, np.number)) or not rope >= 0:
        raise ConfigError(f"rope={rope!r} must be a number >= 0 (half-width of the region of "
                          "practical equivalence, in the metric's units, e.g. 0.02)")
    ratio = _check_ratio(test_train_ratio)
    d = np.asarray(diffs, dtype=float)
    n = len(d)
    out = {"p_better": np.nan, "p_rope": np.nan, "p_worse": np.nan,
           "mean": float(d.mean()) if n else np.nan, "scale": np.nan, "df": float(n - 1)}
    if n < 2:
        warnings.warn(f"Bayesian correlated t-test needs at least 2 differences, got {n}",
                      stacklevel=2)
        return out
    rho = ratio / (1 + ratio)
    scale = float(np.sqrt((1 / n + rho / (1 - rho)) * d.var(ddof=1))) if np.ptp(d) > 0 else 0.0
    mean = out["mean"]
    if scale == 0:  # a point mass at the mean, as baycomp treats it
        worse, better = float(mean < -rope), float(mean > rope)
    else:
        worse = float(sps.t.cdf(-rope, n - 1, mean, scale))
        better = float(sps.t.sf(rope, n - 1, mean, scale))
    return {**out, "p_better": better, "p_rope": max(0.0, 1.0 - better - worse),
            "p_worse": worse, "scale": scale}


def bayes_decision(p_better: float, p_rope: float, p_worse: float,
                   threshold: float = DECISION) -> str:
    """'better', 'equivalent' or 'worse' when that posterior probability exceeds `threshold`
    (Benavoli et al. 2017 use 0.95), else 'undecided'."""
    for name, p in (("better", p_better), ("equivalent", p_rope), ("worse", p_worse)):
        if p > threshold:
            return name
    return "undecided"


def holdout_interval(diffs: Sequence[float], se_boot: float, test_train_ratio: float | None,
                     ci: float = 0.95) -> dict[str, float | str]:
    """Interval of the mean gain on a fixed held-out test set: SE^2 = SE_boot^2 + V_train, the
    paired patient-bootstrap variance of that test set plus the training variance of the mean over
    the n splits, V_train = (1/n + n_test/n_train) s^2 with the Nadeau & Bengio (2003) correction
    for splits that share training subjects and seeds (s^2/n, splits taken as independent, when
    test_train_ratio is None). Welch-Satterthwaite df (Satterthwaite 1946). Returns mean, se, df,
    t, p, ci_low, ci_high, n, caveat."""
    check_boot_settings(ci=ci)
    d = np.asarray(diffs, dtype=float)
    if not np.isfinite(se_boot) or se_boot < 0:
        raise ConfigError(f"se_boot={se_boot!r} must be a standard error >= 0 from the paired "
                          "patient bootstrap (kdlib.stats.bootstrap_fold_mean, column se)")
    q = 0.0 if test_train_ratio is None else _check_ratio(test_train_ratio)
    n = len(d)
    out: dict[str, float | str] = {"mean": float(d.mean()) if n else np.nan, "se": np.nan,
                                   "df": np.nan, "t": np.nan, "p": np.nan, "ci_low": np.nan,
                                   "ci_high": np.nan, "n": n,
                                   "caveat": HOLDOUT_CAVEAT if test_train_ratio is not None
                                   else HOLDOUT_CAVEAT + UNCORRECTED_CAVEAT}
    if n < 2:
        warnings.warn(f"holdout interval needs at least 2 splits, got {n}", stacklevel=2)
        return out
    train_var = d.var(ddof=1) * (1 / n + q) if np.ptp(d) > 0 else 0.0
    se = float(np.sqrt(train_var + se_boot**2))
    df = float((train_var + se_boot**2) ** 2 / (train_var**2 / (n - 1))) if train_var > 0 \
        else np.inf
    out.update(se=se, df=df)
    if se == 0:
        warnings.warn("holdout interval: no variance at all, the interval is undefined",
                      stacklevel=2)
        return out
    half = sps.t.ppf(0.5 + ci / 2, df) * se
    t = out["mean"] / se
    out.update(t=t, p=float(2 * sps.t.sf(abs(t), df)), ci_low=out["mean"] - half,
               ci_high=out["mean"] + half)
    return out


def holdout_se_boot(preds: Sequence[pd.DataFrame], baselines: Sequence[pd.DataFrame],
                    metric: str, n_boot: int = 1000, seed: int = 0) -> float:
    """Paired patient-bootstrap SE of mean(metric of `preds`) - mean(metric of `baselines`) on
    their shared fixed test set (kdlib.stats.bootstrap_fold_mean): the test-sampling part of
    holdout_interval."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = bootstrap_fold_mean(list(preds), list(baselines), [metric], n_boot=n_boot, seed=seed)
    return float(b["se"].iloc[0])

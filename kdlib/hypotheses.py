"""Declared hypotheses and the effect-size table: families tested with Holm's correction within
each family (Holm, Scand. J. Stat. 1979), every other comparison marked exploratory.

Every comparison reports the mean gain with its interval first, then the corrected-t p, the Holm
p within its family and the Bayesian probabilities, and beside it the gain of a guard metric
(macro-F1 or balanced accuracy). A minority gain counts as a fix only when the guard is shown
non-inferior: the lower end of its interval lies above -margin (the usual two-sided 95 %
interval against a margin, as in non-inferiority trials: Piaggio et al., JAMA 2012), so a method
that buys LGG F1 by labelling healthy and HGG slices LGG is not called a fix.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps

from kdlib import MINORITY
from kdlib.comparisons import (
    DECISION,
    ROPE,
    bayes_correlated_ttest,
    bayes_decision,
    design_shape,
    holdout_interval,
    holdout_se_boot,
    repeated_cv_ttest,
    split_differences,
)
from kdlib.errors import ConfigError, DataError
from kdlib.ratios import ratio_key, same_ratio
from kdlib.stats import check_boot_settings, holm

EXPLORATORY = "exploratory"
GUARD = "macro_f1"
MARGIN = 0.02
"""Default non-inferiority margin of the guard metric (the ROPE's half-width)."""
MIN_CELLS = 4
MIN_DISTINCT_X = 3
DESIGNS = ("cv", "holdout")


@dataclass(frozen=True)
class Family:
    """A declared family of primary hypotheses: each (method, baseline) pair at each ratio
    (None = natural) on `metric`; Holm's correction runs within it."""

    name: str
    pairs: tuple[tuple[str, str], ...]
    metric: str = f"f1_{MINORITY}"
    ratios: tuple[float | None, ...] = (None,)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or self.name == EXPLORATORY:
            raise ConfigError(f"family name {self.name!r} must be a non-empty string other than "
                              f"{EXPLORATORY!r}")
        pairs = tuple(tuple(p) for p in self.pairs)
        if not pairs or any(len(p) != 2 or p[0] == p[1] for p in pairs):
            raise ConfigError(f"family {self.name!r}: pairs must be (method, baseline) pairs of two "
                              f"different arms, got {self.pairs!r}")
        ratios = tuple(self.ratios) if isinstance(self.ratios, (list, tuple)) else (self.ratios,)
        for r in ratios:
            if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float))
                                  or not r >= 1):
                raise ConfigError(f"family {self.name!r}: ratio {r!r} must be >= 1 or None "
                                  "(the natural ratio)")
        if not ratios:
            raise ConfigError(f"family {self.name!r} needs at least one ratio (None = natural)")
        object.__setattr__(self, "pairs", pairs)
        object.__setattr__(self, "ratios", ratios)

    @property
    def size(self) -> int:
        """Number of hypotheses (pairs x ratios): the m of Holm's correction."""
        return len(self.pairs) * len(self.ratios)

    def covers(self, method: str, baseline: str, ratio, metric: str) -> bool:
        """True when (method, baseline) at `ratio` on `metric` is one of this family's hypotheses."""
        return metric == self.metric and (method, baseline) in self.pairs and any(
            same_ratio(ratio, r) for r in self.ratios)


def family(name: str, methods: Sequence[str], baselines: Sequence[str],
           metric: str = f"f1_{MINORITY}", ratios: Sequence[float | None] = (None,)) -> Family:
    """A family of every method against every baseline (e.g. each distiller against CE and
    against logit adjustment) at each ratio."""
    return Family(name, tuple((m, b) for b in baselines for m in methods if m != b), metric,
                  tuple(ratios))


def cell_arms(runs: pd.DataFrame, distiller: str) -> pd.DataFrame:
    """Question 2 runs with an `arm` column: '<teacher>-><student>' for a student distilled with
    `distiller`, '<student>' for a student trained alone (method 'ce', no teacher); teachers'
    own runs (role 'teacher') are dropped."""
    need = [c for c in ("model", "method", "teacher_model") if c not in runs.columns]
    if need:
        raise ConfigError(f"question 2 runs need column(s) {need}")
    r = runs[runs["role"] != "teacher"] if "role" in runs.columns else runs
    alone = r["teacher_model"].isna() & (r["method"] == "ce")
    distilled = r["teacher_model"].notna() & (r["method"] == distiller)
    arm = np.where(alone, r["model"].astype(str),
                   r["teacher_model"].astype(str) + "->" + r["model"].astype(str))
    out = r.assign(arm=arm)[alone | distilled]
    return out.drop_duplicates(subset=[c for c in out.columns if c != "role"]).reset_index(
        drop=True)


def cell_family(runs: pd.DataFrame, name: str = "Q2: teacher x student",
                metric: str = f"f1_{MINORITY}", ratio: float | None = None) -> Family:
    """The question 2 family from cell_arms runs: each teacher x student cell against the
    student's own baseline (the student trained alone), at `ratio`."""
    cells = sorted(a for a in runs["arm"].unique() if "->" in a)
    if not cells:
        raise DataError("no distilled teacher x student cell in the runs; build them with cell_arms")
    return Family(name, tuple((c, c.split("->", 1)[1]) for c in cells), metric, (ratio,))


def _comparisons(runs: pd.DataFrame, families: Sequence[Family], column: str,
                 baselines: Sequence[str] | None) -> list[tuple[str, str, str, object, str]]:
    """(family or exploratory, method, baseline, ratio, metric) for every comparison to report."""
    arms = list(dict.fromkeys(runs[column].dropna()))
    ratios = list(dict.fromkeys(ratio_key(r) for r in runs["ratio"]))
    base = list(baselines) if baselines is not None else list(dict.fromkeys(
        b for f in families for _, b in f.pairs))
    out, seen = [], set()

    def key(m, b, r, metric):  # a pair and its reverse are one comparison
        return frozenset((m, b)), "nan" if np.isnan(r) else r, metric

    for f in families:
        for (m, b) in f.pairs:
            for r in f.ratios:
                if m not in arms or b not in arms or not any(same_ratio(r, x) for x in ratios):
                    raise DataError(f"family {f.name!r}: {m!r} against {b!r} at ratio {r} has no "
                                    f"runs in column {column!r} (arms: {arms[:12]}); run them or "
                                    "declare the family from the experiment's methods")
                out.append((f.name, m, b, ratio_key(r), f.metric))
                seen.add(key(m, b, ratio_key(r), f.metric))
    for metric in dict.fromkeys(f.metric for f in families):
        for b in base:
            for m in arms:
                for r in ratios:
                    if m != b and b in arms and key(m, b, r, metric) not in seen:
                        out.append((EXPLORATORY, m, b, r, metric))
                        seen.add(key(m, b, r, metric))
    return out


def _at_ratio(runs: pd.DataFrame, ratio) -> pd.DataFrame:
    r = ratio_key(ratio)
    return runs[runs["ratio"].isna()] if np.isnan(r) else runs[runs["ratio"] == r]


def _estimate(d: pd.DataFrame, design: str, ci: float, rope: float, se_boot: float | None
              ) -> dict:
    ttr = float(d["test_train_ratio"].mean())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if design == "cv":
            tt = repeated_cv_ttest(d["diff"], ttr, ci)
            bayes = bayes_correlated_ttest(d["diff"], ttr, rope)
            return {**tt, **{k: bayes[k] for k in ("p_better", "p_rope", "p_worse")}, "ttr": ttr}
        h = holdout_interval(d["diff"], se_boot, ttr, ci)
    post = (h["df"], h["mean"], h["se"]) if h["se"] > 0 else None
    worse = float(sps.t.cdf(-rope, *post)) if post else np.nan
    better = float(sps.t.sf(rope, *post)) if post else np.nan
    return {**h, "p_better": better, "p_rope": 1 - better - worse, "p_worse": worse, "ttr": ttr}


def _verdict(row: dict, alpha: float) -> str:
    p = row["p"] if row["family"] == EXPLORATORY else row["p_holm"]
    if not np.isfinite(p) or p >= alpha:
        return "no detectable difference"
    if row["gain"] < 0:
        return "worse"
    if row["guard_noninferior"]:
        return "fix"
    return "gain, guard worse" if row["guard_ci_high"] < 0 else "gain, guard not shown non-inferior"


def effect_table(runs: pd.DataFrame, families: Sequence[Family], guard: str = GUARD,
                 column: str = "method", baselines: Sequence[str] | None = None,
                 design: str = "cv", rope: float = ROPE, margin: float = MARGIN,
                 ci: float = 0.95, alpha: float = 0.05,
                 predictions: Callable[[pd.Series], pd.DataFrame] | None = None,
                 n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per comparison: every declared family's hypotheses, then every other arm against
    each baseline (default: the families' baselines; () for none, as in question 2, where each
    cell has its own baseline) at each ratio, marked 'exploratory'.

    Columns: family, family_size, method, baseline, ratio, metric, k, r, s, n_splits,
    baseline_mean, method_mean, gain, ci_low, ci_high, se, t, df, p, p_holm (within the family;
    NaN for exploratory rows), p_better, p_rope, p_worse, bayes (decision at posterior > 0.95),
    guard, guard_gain, guard_ci_low, guard_ci_high, guard_noninferior (guard_ci_low > -margin),
    verdict ('fix' only with a significant gain and a non-inferior guard), test_train_ratio,
    caveat. design 'cv': repeated_cv_ttest and bayes_correlated_ttest; 'holdout': the
    holdout_interval, which needs `predictions(row)` to load a run's test predictions.
    """
    if design not in DESIGNS:
        raise ConfigError(f"design={design!r} is not valid; choose one of {list(DESIGNS)}")
    if design == "holdout" and predictions is None:
        raise ConfigError("design='holdout' needs predictions=<function of a run-table row> "
                          "(e.g. kdlib.analysis.run_predictions) for the patient bootstrap")
    check_boot_settings(n_boot, ci)
    if not families:
        raise ConfigError("declare at least one Family (e.g. hypotheses.family(...))")
    if not (isinstance(margin, (int, float)) and margin >= 0):
        raise ConfigError(f"margin={margin!r} must be a number >= 0 (in the guard's units)")
    for c in (column, "ratio", guard):
        if c not in runs.columns:
            raise ConfigError(f"column {c!r} not in the run table; available: {list(runs.columns)}")
    sizes = {f.name: f.size for f in families}
    if len(sizes) < len(families):
        raise ConfigError("two families share a name; give each family its own name")
    rows = []
    for fam, method, baseline, ratio, metric in _comparisons(runs, families, column, baselines):
        at = _at_ratio(runs, ratio)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            d = split_differences(at, method, baseline, metric, column)
            g = split_differences(at, method, baseline, guard, column)
        se_boot = g_boot = None
        if design == "holdout" and len(d):
            preds = [predictions(x) for _, x in at[at[column] == method].iterrows()]
            base = [predictions(x) for _, x in at[at[column] == baseline].iterrows()]
            se_boot = holdout_se_boot(preds, base, metric, n_boot, seed)
            g_boot = se_boot if guard == metric else holdout_se_boot(preds, base, guard, n_boot,
                                                                     seed)
        est, gest = _estimate(d, design, ci, rope, se_boot), _estimate(g, design, ci, rope, g_boot)
        shape = design_shape(d)
        rows.append({
            "family": fam, "family_size": sizes.get(fam, np.nan), "method": method,
            "baseline": baseline, "ratio": ratio, "metric": metric, "k": shape["k"],
            "r": shape["r"], "s": shape["s"], "n_splits": shape["n"],
            "baseline_mean": d["baseline_value"].mean(), "method_mean": d["method_value"].mean(),
            "gain": est["mean"], "ci_low": est["ci_low"], "ci_high": est["ci_high"],
            "se": est["se"], "t": est["t"], "df": est["df"], "p": est["p"], "p_holm": np.nan,
            "p_better": est["p_better"], "p_rope": est["p_rope"], "p_worse": est["p_worse"],
            "bayes": bayes_decision(est["p_better"], est["p_rope"], est["p_worse"], DECISION),
            "guard": guard, "guard_gain": gest["mean"], "guard_ci_low": gest["ci_low"],
            "guard_ci_high": gest["ci_high"],
            "guard_noninferior": bool(gest["ci_low"] > -margin),
            "test_train_ratio": est["ttr"],
            "caveat": est.get("caveat", "") if design == "holdout" else
            (f"{shape['n']} split(s): no test possible" if shape["n"] < 2 else "")})
    out = pd.DataFrame(rows)
    for name in sizes:
        rows_f = out["family"] == name
        out.loc[rows_f, "p_holm"] = holm(out.loc[rows_f, "p"].to_numpy(float))
    out["verdict"] = [_verdict(r, alpha) for r in out.to_dict("records")]
    cols = [c for c in out.columns if c not in ("test_train_ratio", "caveat")]
    return out[[*cols, "test_train_ratio", "caveat"]]


def gain_correlation(runs: pd.DataFrame, fam: Family, x: Mapping[str, float],
                     column: str = "arm", n_boot: int = 2000, ci: float = 0.95, seed: int = 0
                     ) -> dict[str, float | int | str | None]:
    """Spearman correlation between `x` (e.g. teacher parameter count per cell) and the mean gain
    of each of the family's comparisons, with a percentile interval from a bootstrap over splits
    (the same resampled splits for every cell). Returns rho, ci_low, ci_high, n_cells, n_splits,
    reason; rho is None, with the reason, below 4 cells or 3 distinct x values."""
    check_boot_settings(n_boot, ci)
    missing = [m for m, _ in fam.pairs if m not in x]
    if missing:
        raise ConfigError(f"x has no value for cell(s) {missing}; give one per family method")
    ratio = fam.ratios[0]
    at = _at_ratio(runs, ratio)
    series = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m, b in fam.pairs:
            d = split_differences(at, m, b, fam.metric, column)
            series[m] = d.set_index(["repeat", "fold"])["diff"]
    mat = pd.DataFrame(series).dropna()
    xs = np.array([float(x[m]) for m in mat.columns])
    out: dict[str, float | int | str | None] = {
        "rho": None, "ci_low": None, "ci_high": None, "n_cells": mat.shape[1],
        "n_splits": len(mat), "reason": ""}
    if mat.shape[1] < MIN_CELLS or len(np.unique(xs)) < MIN_DISTINCT_X:
        out["reason"] = (f"{mat.shape[1]} cell(s) with {len(np.unique(xs))} distinct x value(s): "
                         f"a rank correlation needs at least {MIN_CELLS} cells and "
                         f"{MIN_DISTINCT_X} distinct values; compare the cells' gains instead")
        return out
    if len(mat) < 2:
        out["reason"] = "fewer than 2 splits shared by every cell: no interval possible"
        return out
    gains = mat.to_numpy(float)
    out["rho"] = float(sps.spearmanr(xs, gains.mean(axis=0)).statistic)
    idx = np.random.default_rng(seed).integers(0, len(mat), (n_boot, len(mat)))
    boot = np.array([sps.spearmanr(xs, gains[i].mean(axis=0)).statistic for i in idx])
    boot = boot[np.isfinite(boot)]
    lo, hi = np.quantile(boot, [(1 - ci) / 2, (1 + ci) / 2]) if len(boot) else (np.nan, np.nan)
    out.update(ci_low=float(lo), ci_high=float(hi))
    return out

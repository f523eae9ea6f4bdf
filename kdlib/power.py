"""Power of the corrected repeated k-fold t-test: the smallest gain a design detects, and the
smallest design (folds x repeats x seeds) that detects a given gain.

The standard error of the mean gain over k folds x r repeats x s seeds follows the corrected
repeated k-fold t-test (Bouckaert & Frank 2004):

    SE = sqrt((1/(k r) + n_test/n_train) (sd_between^2 + sd_seed^2 / s))

where sd_between is the per-split SD of the seed-averaged differences that more seeds do not
reduce and sd_seed the SD of one seed's difference within a split (variance_components estimates
both from a split_differences table). The minimum detectable gain at two-sided level alpha and
the given power is (t_{1-alpha/2, df} + t_{power, df}) SE with df = k r - 1 (the usual normal
approximation with t quantiles, e.g. Cohen 1988); exact_power gives the noncentral-t power.
n_test/n_train follows k: 1/(k-2) by default (kdlib's cv design: one outer fold tests, the next
validates, the other k-2 train), or an observed ratio scaled from the k it was measured at. The per-split SD is taken as observed; with more folds
each test fold is smaller and that SD grows, so a projection to more folds than observed is
optimistic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from kdlib.errors import ConfigError


def _check_design(k: int, r: int, s: int) -> None:
    for name, v, low in (("k", k, 2), ("r", r, 1), ("s", s, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise ConfigError(f"{name}={v!r} must be an integer >= {low}")
    if k * r < 2:
        raise ConfigError("a design needs at least 2 splits (k x r >= 2)")


def _check_sd(sd: float, sd_seed: float) -> None:
    for name, v in (("sd", sd), ("sd_seed", sd_seed)):
        if not isinstance(v, (int, float, np.number)) or not np.isfinite(v) or v < 0:
            raise ConfigError(f"{name}={v!r} must be a standard deviation >= 0")


def fold_test_train_ratio(k: int, observed: float | None = None, observed_k: int | None = None,
                         val_folds: int = 1) -> float:
    """n_test/n_train of a k-fold split with one test fold and `val_folds` validation folds:
    1/(k - 1 - val_folds); or an observed ratio at observed_k folds scaled by the same rule."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k - 1 - val_folds < 1:
        raise ConfigError(f"k={k!r} folds leave no training fold with {val_folds} validation "
                          f"fold(s); use k >= {val_folds + 2}")
    if observed is None:
        return 1.0 / (k - 1 - val_folds)
    if observed_k is None:
        raise ConfigError("an observed test/train ratio needs the observed_k it was measured at")
    return float(observed) * (observed_k - 1 - val_folds) / (k - 1 - val_folds)


def design_se(sd: float, k: int, r: int, s: int = 1, test_train_ratio: float | None = None,
              sd_seed: float = 0.0) -> float:
    """Corrected standard error of the mean gain of a k x r x s design (module docstring)."""
    _check_design(k, r, s)
    _check_sd(sd, sd_seed)
    q = fold_test_train_ratio(k) if test_train_ratio is None else test_train_ratio
    return float(np.sqrt((1 / (k * r) + q) * (sd**2 + sd_seed**2 / s)))


def _alpha_power(alpha: float, power: float) -> None:
    for name, v in (("alpha", alpha), ("power", power)):
        if not isinstance(v, (int, float)) or not 0 < v < 1:
            raise ConfigError(f"{name}={v!r} must be a probability strictly between 0 and 1")


def min_detectable_gain(sd: float, k: int, r: int, s: int = 1, alpha: float = 0.05,
                        power: float = 0.8, test_train_ratio: float | None = None,
                        sd_seed: float = 0.0) -> float:
    """Smallest true gain the k x r x s design detects with probability `power` at two-sided
    level `alpha`: (t_{1-alpha/2, df} + t_{power, df}) x design_se, df = k r - 1."""
    _alpha_power(alpha, power)
    df = k * r - 1
    se = design_se(sd, k, r, s, test_train_ratio, sd_seed)
    return float((sps.t.ppf(1 - alpha / 2, df) + sps.t.ppf(power, df)) * se)


def exact_power(gain: float, sd: float, k: int, r: int, s: int = 1, alpha: float = 0.05,
                test_train_ratio: float | None = None, sd_seed: float = 0.0) -> float:
    """Power of the two-sided corrected t-test for a true `gain`: P(|T| > t_{1-alpha/2, df}) with T
    noncentral t (df = k r - 1, noncentrality gain / design_se), exact when the per-split
    differences are equicorrelated normal as the correction assumes."""
    _alpha_power(alpha, 0.5)
    df = k * r - 1
    se = design_se(sd, k, r, s, test_train_ratio, sd_seed)
    if se == 0:
        return float(gain != 0)
    crit = sps.t.ppf(1 - alpha / 2, df)
    nc = gain / se
    return float(sps.nct.sf(crit, df, nc) + sps.nct.cdf(-crit, df, nc))


def variance_components(diffs: pd.DataFrame) -> dict[str, float]:
    """sd (between splits, not reduced by seeds) and sd_seed (one seed's difference within a
    split) from a split_differences table; with one seed per split sd_seed is 0 and sd the whole
    per-split SD (more seeds are then not credited). Also returns sd_observed and s_observed."""
    if len(diffs) < 2:
        raise ConfigError(f"variance_components needs at least 2 splits, got {len(diffs)}")
    sd_obs = float(diffs["diff"].std(ddof=1))
    s_obs = float(diffs["n_seeds"].mean())
    seed_var = diffs["seed_var"].dropna() if "seed_var" in diffs else pd.Series(dtype=float)
    within = float(seed_var.mean()) if len(seed_var) else 0.0
    between = max(0.0, sd_obs**2 - within / s_obs)
    return {"sd": float(np.sqrt(between)), "sd_seed": float(np.sqrt(within)),
            "sd_observed": sd_obs, "s_observed": s_obs}


def design_table(sd: float, target_gain: float, ks: Sequence[int] = (3, 5, 10),
                 max_repeats: int = 10, seeds: Sequence[int] = (1,), alpha: float = 0.05,
                 power: float = 0.8, sd_seed: float = 0.0, observed_ratio: float | None = None,
                 observed_k: int | None = None, arms: int = 1, val_folds: int = 1
                 ) -> pd.DataFrame:
    """Every design k in `ks`, r = 1..max_repeats, s in `seeds`: se, min_detectable_gain,
    power_at_target (noncentral t), detects (min_detectable_gain <= target_gain) and runs
    (k r s x `arms`, e.g. the arms of the experiment), sorted by runs, then by detectable gain."""
    if not isinstance(target_gain, (int, float)) or not target_gain > 0:
        raise ConfigError(f"target_gain={target_gain!r} must be a positive gain in the metric's "
                          "units (e.g. 0.05 LGG F1)")
    if isinstance(max_repeats, bool) or not isinstance(max_repeats, int) or max_repeats < 1:
        raise ConfigError(f"max_repeats={max_repeats!r} must be an integer >= 1")
    rows = []
    for k in ks:
        q = fold_test_train_ratio(k, observed_ratio, observed_k, val_folds)
        for r in range(1, max_repeats + 1):
            for s in seeds:
                if k * r < 2:
                    continue
                mdg = min_detectable_gain(sd, k, r, s, alpha, power, q, sd_seed)
                rows.append({"k": k, "r": r, "s": s, "runs": k * r * s * arms,
                             "test_train_ratio": q, "se": design_se(sd, k, r, s, q, sd_seed),
                             "min_detectable_gain": mdg,
                             "power_at_target": exact_power(target_gain, sd, k, r, s, alpha, q,
                                                            sd_seed),
                             "detects": mdg <= target_gain})
    return pd.DataFrame(rows).sort_values(["runs", "min_detectable_gain"]).reset_index(drop=True)


def smallest_design(sd: float, target_gain: float, ks: Sequence[int] = (3, 5, 10),
                    max_repeats: int = 10, seeds: Sequence[int] = (1,), alpha: float = 0.05,
                    power: float = 0.8, sd_seed: float = 0.0,
                    observed_ratio: float | None = None, observed_k: int | None = None,
                    arms: int = 1, val_folds: int = 1) -> dict:
    """The design of design_table with the fewest runs that detects `target_gain` (ties: the
    smaller detectable gain), as a dict; or {'design': None, 'reason': ...} when none does."""
    t = design_table(sd, target_gain, ks, max_repeats, seeds, alpha, power, sd_seed,
                     observed_ratio, observed_k, arms, val_folds)
    ok = t[t["detects"]]
    if ok.empty:
        best = t.sort_values("min_detectable_gain").iloc[0]
        return {"design": None, "reason": (
            f"no design with k in {list(ks)}, r <= {max_repeats}, s in {list(seeds)} detects "
            f"{target_gain:g} with power {power:g}; the best, {int(best['k'])} x "
            f"{int(best['r'])} x {int(best['s'])}, detects {best['min_detectable_gain']:.3g}")}
    return {"design": f"{int(ok.iloc[0]['k'])} folds x {int(ok.iloc[0]['r'])} repeats x "
            f"{int(ok.iloc[0]['s'])} seeds", "reason": "", **ok.iloc[0].to_dict()}


def power_summary(diffs: pd.DataFrame, target_gain: float = 0.05, ks: Sequence[int] = (3, 5, 10),
                  max_repeats: int = 10, seeds: Sequence[int] = (1, 2, 3), alpha: float = 0.05,
                  power: float = 0.8, arms: int = 1) -> dict:
    """From one comparison's split_differences table: the design it ran (k, r, s), its variance
    components, the gain it can detect, and the smallest design that detects `target_gain`
    (n_test/n_train scaled from the observed one). For a Holm family of m tests, pass alpha/m
    (the first, strictest step)."""
    k = int(diffs["fold"].nunique())
    r = int(diffs["repeat"].nunique()) if "repeat" in diffs else 1
    s = round(float(diffs["n_seeds"].mean()))
    v = variance_components(diffs)
    q = float(diffs["test_train_ratio"].mean())
    if not np.isfinite(q):
        raise ConfigError("the differences lack test_train_ratio; give the run table "
                          "n_test_slices and n_train_slices")
    best = smallest_design(v["sd"], target_gain, ks, max_repeats, seeds, alpha, power,
                           v["sd_seed"], q, k, arms)
    return {"k": k, "r": r, "s": s, "test_train_ratio": q, **v,
            "min_detectable_gain": min_detectable_gain(v["sd"], k, r, s, alpha, power, q,
                                                       v["sd_seed"]),
            "target_gain": target_gain, "smallest_design": best}

"""Notebook 04's power section: from the observed per-split variance of a family's differences,
the gain the current folds x repeats x seeds design detects and the design that detects a target
gain (kdlib.power, after the corrected repeated k-fold t-test of Bouckaert & Frank 2004)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from kdlib.analysis import PRIMARY
from kdlib.answers import design_phrase
from kdlib.comparisons import split_differences
from kdlib.errors import DataError
from kdlib.power import min_detectable_gain, power_summary, smallest_design
from kdlib.ratios import in_ratios

TARGET_GAIN = 0.05
"""The gain the power section sizes the design for (e.g. +0.05 LGG F1)."""


def runs_per_split(runs: pd.DataFrame) -> int:
    """Training runs per (repeat, fold, seed) of a run table, derived post-hoc rows left out:
    the cost of one more split of the design."""
    trained = runs[runs["derived_posthoc_tau"].isna()] if "derived_posthoc_tau" in runs else runs
    keys = [c for c in ("repeat", "fold", "seed") if c in trained.columns]
    return round(float(trained.groupby(keys).size().mean())) if len(trained) else 0


def power_table(runs: pd.DataFrame, effects: pd.DataFrame, family_name: str = PRIMARY,
                target: float = TARGET_GAIN, alpha: float = 0.05, power: float = 0.8,
                column: str = "method", arms: int = 1) -> pd.DataFrame:
    """For each comparison of a family: the design it ran (k, r, s), the variance components of
    its per-split differences (kdlib.power), the gain it detects with `power` at `alpha` (mdg)
    and at Holm's first step alpha/m (mdg_family), and the smallest folds x repeats x seeds design
    that detects `target` at alpha/m (needed_family, needed_family_runs = k r s x `arms`)."""
    fam = effects[effects["family"] == family_name]
    if fam.empty:
        raise DataError(f"no comparison of family {family_name!r} in the effect table")
    m = int(fam["family_size"].iloc[0])
    rows = []
    for _, e in fam.iterrows():
        at = runs[in_ratios(runs["ratio"], [e["ratio"]])]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            d = split_differences(at, e["method"], e["baseline"], e["metric"], column)
        row = {"method": e["method"], "baseline": e["baseline"], "ratio": e["ratio"],
               "metric": e["metric"], "m": m, "k": e["k"], "r": e["r"], "s": e["s"]}
        if len(d) < 2 or not np.isfinite(d["test_train_ratio"]).all():
            rows.append({**row, "reason": "fewer than 2 splits or no test/train sizes"})
            continue
        ps = power_summary(d, target, alpha=alpha / m, power=power, arms=arms)
        best = ps["smallest_design"]
        name = design_phrase(best["k"], best["r"], best["s"]) if best["design"] else None
        rows.append({**row, "test_train_ratio": ps["test_train_ratio"], "sd": ps["sd"],
                     "sd_seed": ps["sd_seed"],
                     "sd_observed": ps["sd_observed"],
                     "mdg": min_detectable_gain(ps["sd"], ps["k"], ps["r"], ps["s"], alpha, power,
                                                ps["test_train_ratio"], ps["sd_seed"]),
                     "mdg_family": ps["min_detectable_gain"], "needed_family": name,
                     "needed_family_runs": best.get("runs"), "reason": best["reason"]})
    return pd.DataFrame(rows)


def family_design(power: pd.DataFrame, target: float = TARGET_GAIN, alpha: float = 0.05,
                  power_level: float = 0.8, arms: int = 1, max_repeats: int = 20) -> dict:
    """The design for a whole family from a power_table: the root-mean-square of its comparisons'
    SDs (sd, sd_seed), the gain the current design detects at alpha (mdg) and at alpha/m
    (mdg_family; m the family's size, Holm's first step), and the smallest folds x repeats x seeds
    design (kdlib.power.smallest_design) that detects `target` at alpha (needed, needed_runs)
    and at alpha/m (needed_family, needed_family_runs; runs = k r s x `arms`), or the reason."""
    ok = power.dropna(subset=["sd"]) if "sd" in power else power.iloc[:0]
    if ok.empty:
        return {"sd": None, "reason": "no comparison of the family has 2 or more splits"}
    sd, sd_seed = (float(np.sqrt((ok[c] ** 2).mean())) for c in ("sd", "sd_seed"))
    k, r, s, m = (int(ok[c].max()) for c in ("k", "r", "s", "m"))
    q = float(ok["test_train_ratio"].mean())
    out = {"sd": sd, "sd_seed": sd_seed, "k": k, "r": r, "s": s, "m": m, "test_train_ratio": q,
           "mdg": min_detectable_gain(sd, k, r, s, alpha, power_level, q, sd_seed),
           "mdg_family": min_detectable_gain(sd, k, r, s, alpha / m, power_level, q, sd_seed)}
    for key, level in (("needed", alpha), ("needed_family", alpha / m)):
        best = smallest_design(sd, target, max_repeats=max_repeats, seeds=(1, 2, 3), alpha=level,
                               power=power_level, sd_seed=sd_seed, observed_ratio=q,
                               observed_k=k, arms=arms)
        name = design_phrase(best["k"], best["r"], best["s"]) if best["design"] else None
        out.update({key: name, f"{key}_runs": best.get("runs"),
                    f"{key}_reason": best["reason"]})
    return out

"""Notebook 04's analyses: the runs of each question, their summaries, the declared families and
their effect-size tables (kdlib.hypotheses), question 2's correlation, and the patient bootstrap,
which measures the test-set sampling of one model and is not an interval of a method's gain.
kdlib.sizing gives the design's power, kdlib.answers turns the tables into the answers' text."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from kdlib import CLASSES, MINORITY, criterion
from kdlib.bootstrap import RunCounts, patient_bootstrap, run_counts
from kdlib.data.splits import design_of, load_splits
from kdlib.errors import DataError
from kdlib.experiment import Experiment
from kdlib.hypotheses import Family, cell_arms, cell_family, effect_table, family, gain_correlation
from kdlib.metrics import check_predictions, run_metrics
from kdlib.paths import resolve
from kdlib.predictions import class_probabilities
from kdlib.ratios import in_ratios
from kdlib.results import load_predictions
from kdlib.stats import check_boot_settings, check_metrics, check_same_test_set, summarize_runs

Q_METRICS: tuple[str, ...] = (f"f1_{MINORITY}", f"recall_{MINORITY}", f"precision_{MINORITY}",
                              "macro_f1", "balanced_accuracy", "patient_balanced_accuracy")
"""The metrics both questions are judged on (minority F1 first)."""

PER_CLASS_F1: tuple[str, ...] = tuple(f"f1_{c}" for c in CLASSES)
"""F1 of each class (the per-class figure)."""

BASELINE = "ce"
POSTHOC = "ce+posthoc"
PRIMARY = "Q1 primary"
Q2_FAMILY = "Q2 teacher x student"


def posthoc_predictions(pred: pd.DataFrame, class_counts: Sequence[int], tau: float = 1.0
                        ) -> pd.DataFrame:
    """A run's predictions after post-hoc logit adjustment z - tau log(pi) (Menon et al., ICLR
    2021), from its stored logits z_<class> and training class counts."""
    z = torch.tensor(pred[[f"z_{c}" for c in CLASSES]].to_numpy(np.float32))
    p = class_probabilities(z, list(class_counts), tau).numpy().astype(np.float64)
    return pred.assign(**{f"p_{c}": p[:, i] for i, c in enumerate(CLASSES)})


def run_predictions(row: pd.Series) -> pd.DataFrame:
    """The test predictions of a run-table row (adjusted for derived post-hoc rows)."""
    pred = load_predictions(row["path"])
    tau = row.get("derived_posthoc_tau")
    if tau is not None and not pd.isna(tau):
        pred = posthoc_predictions(pred, [row[f"train_n_{c}"] for c in CLASSES], float(tau))
    return pred


def add_posthoc(runs: pd.DataFrame, tau: float = 1.0, of: str = BASELINE) -> pd.DataFrame:
    """Append one `ce+posthoc` row per plain `ce` run: the same model, predictions adjusted post
    hoc (it costs no training), with its metrics recomputed; `derived_posthoc_tau` marks them."""
    if "derived_posthoc_tau" in runs.columns:  # idempotent: derived rows are made afresh
        runs = runs[runs["derived_posthoc_tau"].isna()]
    plain = runs[(runs["method"] == of) & runs["distiller"].isna()
                 & runs.get("posthoc_tau", pd.Series(np.nan, index=runs.index)).isna()]
    rows = []
    for _, row in plain.iterrows():
        new = row.copy()
        new["method"], new["derived_posthoc_tau"] = POSTHOC, tau
        new["run_id"] = f"{row['run_id']}+posthoc"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for k, v in run_metrics(run_predictions(new)).items():
                new[k] = v
        rows.append(new)
    return pd.concat([runs, pd.DataFrame(rows)], ignore_index=True) if rows else runs


def q1_runs(runs: pd.DataFrame, exp: Experiment) -> pd.DataFrame:
    """Question 1: the student's runs (baselines and distilled from `exp.teacher`) at `exp.ratios`."""
    r = runs[(runs["model"] == exp.student) & in_ratios(runs["ratio"], exp.ratios)]
    return r[r["distiller"].isna() | (r["teacher_model"] == exp.teacher)].reset_index(drop=True)


def q2_runs(runs: pd.DataFrame, exp: Experiment) -> pd.DataFrame:
    """Question 2 at `grid_ratio`, one row per run and role: `teacher` (grid teachers alone),
    `student alone` (grid students, CE) and `distilled` (grid students with `grid_distiller` from a
    grid teacher). A CE run of a model in both lists appears twice, once per role."""
    r = runs[in_ratios(runs["ratio"], [exp.grid_ratio])]
    alone = r["distiller"].isna()
    roles = {
        "teacher": alone & r["model"].isin(exp.grid_teachers) & (r["method"] == exp.teacher_loss),
        "student alone": alone & r["model"].isin(exp.grid_students) & (r["method"] == BASELINE),
        "distilled": r["model"].isin(exp.grid_students) & (r["method"] == exp.grid_distiller)
        & r["teacher_model"].isin(exp.grid_teachers),
    }
    return pd.concat([r[mask].assign(role=role) for role, mask in roles.items()],
                     ignore_index=True)


def method_order(methods: Sequence[str]) -> list[str]:
    """Baselines first (ce, ce+posthoc, the imbalance losses), then the distillers."""
    first = [BASELINE, POSTHOC]
    rest = sorted(set(methods) - set(first), key=lambda m: (is_distilled(m), m))
    return [m for m in first if m in set(methods)] + rest


def summary_table(runs: pd.DataFrame, metrics: Sequence[str] = Q_METRICS,
                  by: Sequence[str] = ("ratio", "method")) -> pd.DataFrame:
    """Mean and std over folds/seeds per group (stats.summarize_runs), methods in reading order."""
    s = summarize_runs(runs, list(metrics), by)
    if "method" in s.columns:
        s["method"] = pd.Categorical(s["method"], method_order(s["method"].unique()), ordered=True)
        s = s.sort_values(list(by)).reset_index(drop=True)
        s["method"] = s["method"].astype(str)
    return s


@functools.lru_cache(maxsize=4096)
def _counts(path: str, tau: float | None, class_counts: tuple, stamp: tuple) -> RunCounts:
    """The bootstrap's per-patient sums of one run's (post-hoc adjusted) predictions; `stamp`
    (size and mtime of predictions.csv) makes a rewritten file a new entry."""
    pred = load_predictions(path)
    if tau is not None:
        pred = posthoc_predictions(pred, class_counts, tau)
    return run_counts(check_predictions(pred, f"{path}/predictions.csv"))


def run_counts_of(row: pd.Series) -> RunCounts:
    """kdlib.bootstrap.RunCounts of a run-table row (as run_predictions), computed once per file."""
    tau = row.get("derived_posthoc_tau")
    tau = None if tau is None or pd.isna(tau) else float(tau)
    counts = tuple(int(row[f"train_n_{c}"]) for c in CLASSES) if tau is not None else ()
    st = (Path(row["path"]) / "predictions.csv").stat()
    return _counts(str(row["path"]), tau, counts, (st.st_size, st.st_mtime_ns))


def _tests_per_fold(runs: pd.DataFrame) -> bool:
    """True when the runs' splits are of design "cv" (each fold tests other subjects)."""
    if "splits" not in runs.columns or runs.empty:
        return False
    return design_of(load_splits(resolve(runs["splits"].iloc[0]))) == "cv"


def _pool_folds(runs: pd.DataFrame, keys: list[str]) -> tuple[pd.DataFrame, dict[str, RunCounts]]:
    """Design "cv": the k folds of a repeat test every subject once, so the fold predictions of each
    split (keys without fold, plus repeat) pool into one out-of-fold table on a shared test set."""
    keys = [k for k in dict.fromkeys([*keys, "repeat"]) if k != "fold" and k in runs.columns]
    rows, pooled = [], {}
    for key, grp in runs.groupby(keys, dropna=False, sort=False):
        rid = "+".join(grp["run_id"])
        pred = pd.concat([run_predictions(row) for _, row in grp.iterrows()], ignore_index=True)
        pooled[rid] = run_counts(check_predictions(pred, f"the pooled folds {rid}"))
        rows.append({**dict(zip(keys, key)), "run_id": rid})
    return pd.DataFrame(rows), pooled


def bootstrap_table(runs: pd.DataFrame, metrics: Sequence[str] = Q_METRICS,
                    by: Sequence[str] = ("method", "ratio"),
                    pair_on: Sequence[str] = ("fold", "ratio", "seed"),
                    n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per group: the fold-mean of each metric with a patient-bootstrap CI, and its difference to
    the CE baseline of the same folds with a paired patient-bootstrap CI (estimate/low/high and
    diff/diff_low/diff_high). With "cv" splits the folds of each repeat are first pooled into
    out-of-fold predictions (every subject once), the mean then runs over repeats and seeds. One
    pass over all groups: runs on the same test set share every draw; different test sets are
    resampled independently."""
    check_boot_settings(n_boot)
    metrics = list(dict.fromkeys(check_metrics(metrics)))  # each metric once
    if "fold" in pair_on and _tests_per_fold(runs):
        runs, counts = _pool_folds(runs, [*by, "method", *pair_on])
        pair_on = [c for c in dict.fromkeys([*pair_on, "repeat"])
                   if c != "fold" and c in runs.columns]
    else:
        counts = {row["run_id"]: run_counts_of(row) for _, row in runs.iterrows()}
    _check_same_slices(runs, counts)
    ids = list(dict.fromkeys(runs["run_id"]))
    at = {r: i for i, r in enumerate(ids)}
    base = runs[runs["method"] == BASELINE].set_index(list(pair_on))
    groups, estimands = [], []
    for key, grp in runs.groupby(list(by), dropna=False, sort=False):
        ours = [at[r] for r in grp["run_id"]]
        matched = [base.loc[tuple(k)]["run_id"] for k in grp[list(pair_on)].itertuples(index=False)
                   if tuple(k) in base.index]
        has_diff = len(matched) == len(grp) and grp["method"].iloc[0] != BASELINE
        groups.append((key if isinstance(key, tuple) else (key,), len(ours), has_diff))
        estimands.append((ours, []))
        if has_diff:
            estimands.append((ours, [at[r] for r in matched]))
    out = patient_bootstrap([counts[r] for r in ids], estimands, metrics, n_boot, seed=seed)
    parts = iter([part.set_index("metric") for _, part in out.groupby("estimand", sort=True)])
    rows = []
    for key, n_runs, has_diff in groups:
        level = next(parts)
        gain = next(parts) if has_diff else None
        for m, lv in level.iterrows():
            d = gain.loc[m] if gain is not None else None
            rows.append({**dict(zip(by, key)), "metric": m, "estimate": lv["estimate"],
                         "low": lv["low"], "high": lv["high"],
                         "diff": np.nan if d is None else d["estimate"],
                         "diff_low": np.nan if d is None else d["low"],
                         "diff_high": np.nan if d is None else d["high"],
                         "n_runs": n_runs, "n_patients": lv["n_patients"]})
    return pd.DataFrame(rows)


def _check_same_slices(runs: pd.DataFrame, counts: dict[str, RunCounts]) -> None:
    """DataError (naming the runs) when two runs on the same test patients were not tested on
    the same slices with the same labels."""
    first: dict[tuple, str] = {}
    for rid, c in counts.items():
        other = first.setdefault(tuple(c.subjects), rid)
        if other != rid and not np.array_equal(c.keys, counts[other].keys):
            a, b = (runs[runs["run_id"] == r].iloc[0] for r in (other, rid))
            if "path" in runs.columns:
                check_same_test_set(run_predictions(a), run_predictions(b), (other, rid))
            raise DataError(f"runs {other} and {rid} were tested on the same patients but not on "
                            "the same slices with the same labels (different caches?)")


def teacher_scores(runs: pd.DataFrame, exp: Experiment, metric: str = f"f1_{MINORITY}"
                   ) -> pd.Series:
    """Question 1's teacher: mean `metric` over folds/seeds per training ratio (NaN = natural)."""
    t = runs[(runs["model"] == exp.teacher) & runs["distiller"].isna()
             & (runs["method"] == exp.teacher_loss) & in_ratios(runs["ratio"], exp.ratios)]
    return t.groupby("ratio", dropna=False)[metric].mean()


def example_runs(runs: pd.DataFrame, exp: Experiment, ratio: float | None,
                 methods: Sequence[str]) -> dict[str, pd.Series]:
    """One run per method of question 1's student (first fold and seed) at `ratio`, plus the
    teacher's run of that fold, keyed by display name (for confusion, ROC and calibration plots)."""
    q1 = q1_runs(runs, exp)
    at = q1[in_ratios(q1["ratio"], [ratio])]
    fold, seed = at["fold"].min(), at["seed"].min()
    at = at[(at["fold"] == fold) & (at["seed"] == seed)]
    out = {m: at[at["method"] == m].iloc[0] for m in dict.fromkeys(methods)
           if (at["method"] == m).any()}
    t = runs[(runs["model"] == exp.teacher) & runs["distiller"].isna()
             & (runs["method"] == exp.teacher_loss) & in_ratios(runs["ratio"], [ratio])
             & (runs["fold"] == fold) & (runs["seed"] == seed)]
    if len(t):
        out[f"teacher {exp.teacher}"] = t.iloc[0]
    return out


def is_distilled(method: str) -> bool:
    """True for the distillation methods: a kdlib.criterion.DISTILLERS name or kd_original,
    alone or with a task loss (kd+<loss>)."""
    return method.split("+")[0] in {*criterion.DISTILLERS, "kd_original"}


def ratio_axis(table: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """`table` with a numeric `ratio_axis` column for plots: the target ratio, or for the natural
    ratio (NaN) the HGG:LGG ratio its training sets actually had (mean `train_ratio`, 1 decimal)."""
    natural = runs.loc[runs["ratio"].isna(), "train_ratio"]
    fill = round(float(natural.mean()), 1) if len(natural) else np.nan
    return table.assign(ratio_axis=table["ratio"].astype(float).fillna(fill))




def best_method(effects: pd.DataFrame, ratio: float | None, metric: str = f"f1_{MINORITY}") -> str:
    """The method with the largest mean gain over CE in `metric` at `ratio` (q1_effects rows)."""
    at = effects[(effects["metric"] == metric) & (effects["baseline"] == BASELINE)
                 & in_ratios(effects["ratio"], [ratio])]
    if at.empty:
        raise DataError(f"no comparison with {BASELINE} on {metric} at ratio {ratio}")
    return str(at.sort_values("gain").iloc[-1]["method"])


def split_design(runs: pd.DataFrame) -> str:
    """The runs' evaluation design, "cv" or "holdout", from their split file ("cv" without one)."""
    if "splits" not in runs.columns or runs.empty:
        return "cv"
    return design_of(load_splits(resolve(runs["splits"].iloc[0])))


def primary_family(exp: Experiment) -> Family:
    """Question 1's declared family: each distillation method of the experiment against each
    primary baseline (default CE and logit adjustment) on `primary_metric` at the family's ratios
    (default: the natural or least imbalanced ratio and the strongest imbalance)."""
    if not exp.distilled_methods:
        raise DataError("the experiment has no distillation method: question 1's primary family "
                        "is empty; list distillers, kd_task_losses or kd_original")
    return family(PRIMARY, exp.distilled_methods, exp.family_baselines, exp.primary_metric,
                  exp.family_ratios)


def _effects(runs: pd.DataFrame, fam: Family, exp: Experiment, design: str | None, alpha: float,
             n_boot: int, seed: int, **kw) -> pd.DataFrame:
    design = design or split_design(runs)
    return effect_table(runs, [fam], guard=exp.guard_metric, design=design, rope=exp.rope,
                        margin=exp.rope, alpha=alpha, n_boot=n_boot, seed=seed,
                        predictions=run_predictions if design == "holdout" else None, **kw)


def q1_effects(q1: pd.DataFrame, exp: Experiment, design: str | None = None, alpha: float = 0.05,
               n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Question 1's effect-size table (hypotheses.effect_table): the primary family with Holm
    within it, then every other method against each primary baseline at each ratio, marked
    exploratory. The guard is `guard_metric`, non-inferior within `rope`; `design` defaults to
    the splits' own (the holdout design bootstraps patients, `n_boot` resamples)."""
    return _effects(q1, primary_family(exp), exp, design, alpha, n_boot, seed)


def q2_cells(q2: pd.DataFrame, exp: Experiment) -> pd.DataFrame:
    """Question 2's students (q2_runs) with an `arm` column: '<teacher>-><student>' distilled with
    `grid_distiller`, '<student>' trained alone (hypotheses.cell_arms)."""
    return cell_arms(q2, exp.grid_distiller)


def q2_effects(cells: pd.DataFrame, exp: Experiment, design: str | None = None,
               alpha: float = 0.05, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Question 2's own family: each teacher x student cell against the same student alone on
    `primary_metric` at `grid_ratio`, Holm within it; with teacher_model, model and their
    parameter counts for the heatmap."""
    fam = cell_family(cells, Q2_FAMILY, exp.primary_metric, exp.grid_ratio)
    out = _effects(cells, fam, exp, design, alpha, n_boot, seed, column="arm", baselines=())
    params = model_params(cells)
    out["teacher_model"] = out["method"].str.split("->").str[0]
    out["model"] = out["baseline"]
    out["teacher_model_params"] = out["teacher_model"].map(params)
    out["model_params"] = out["model"].map(params)
    return out


def model_params(runs: pd.DataFrame) -> pd.Series:
    """Parameter count per model name, from the runs' `params` and `teacher_params` columns."""
    parts = [runs.groupby("model")["params"].first()] if "params" in runs else []
    if "teacher_params" in runs and "teacher_model" in runs:
        parts.append(runs.dropna(subset=["teacher_params"]).groupby("teacher_model")[
            "teacher_params"].first())
    out = pd.concat(parts) if parts else pd.Series(dtype=float)
    return out[~out.index.duplicated()].astype(float)


def q2_correlations(cells: pd.DataFrame, exp: Experiment, n_boot: int = 1000, seed: int = 0
                    ) -> pd.DataFrame:
    """Spearman correlation of each cell's gain with the teacher's parameter count and with the
    teacher/student size ratio, with a bootstrap-over-splits interval (hypotheses.gain_correlation):
    one row per x with rho, ci_low, ci_high, n_cells, n_splits and reason; rho is NaN, with the
    reason, where there are too few cells or every cell gained the same."""
    fam = cell_family(cells, Q2_FAMILY, exp.primary_metric, exp.grid_ratio)
    params = model_params(cells)
    pairs = [m.split("->", 1) for m, _ in fam.pairs]
    missing = sorted({n for pair in pairs for n in pair} - set(params.index))
    if missing:
        raise DataError(f"no parameter count for model(s) {missing}: the runs need a `params` "
                        "(and `teacher_params`) column")
    rows = []
    for name, size in (("teacher parameters", lambda t, s: params[t]),
                       ("teacher/student size ratio", lambda t, s: params[t] / params[s])):
        x = {f"{t}->{s}": float(size(t, s)) for t, s in pairs}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant gains: scipy warns, rho is NaN
            corr = gain_correlation(cells, fam, x, n_boot=n_boot, seed=seed)
        if corr["rho"] is not None and not np.isfinite(corr["rho"]):
            corr.update(rho=None, ci_low=None, ci_high=None,
                        reason="every cell has the same mean gain: a rank correlation is undefined")
        rows.append({"x": name, **corr})
    return pd.DataFrame(rows)

"""Notebook 04's answers: the runs of each question, their summaries, paired tests, patient
bootstraps, and the sentences that report them (every number comes from the run table)."""

from __future__ import annotations

import functools
import math
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
from kdlib.metrics import check_predictions, run_metrics
from kdlib.paths import resolve
from kdlib.predictions import class_probabilities
from kdlib.results import load_predictions
from kdlib.stats import (
    check_boot_settings,
    check_metrics,
    check_same_test_set,
    compare_to_baseline,
    summarize_runs,
)

Q_METRICS: tuple[str, ...] = (f"f1_{MINORITY}", f"recall_{MINORITY}", f"precision_{MINORITY}",
                              "macro_f1", "balanced_accuracy", "patient_balanced_accuracy")
"""The metrics both questions are judged on (minority F1 first)."""

PER_CLASS_F1: tuple[str, ...] = tuple(f"f1_{c}" for c in CLASSES)
"""F1 of each class (the per-class figure)."""

BASELINE = "ce"
POSTHOC = "ce+posthoc"


def _ratio_key(value) -> float:
    """Ratios as floats with the natural ratio (None/NaN) as NaN, for matching table rows."""
    return float("nan") if value is None or (isinstance(value, float) and math.isnan(value)) \
        else float(value)


def in_ratios(col: pd.Series, ratios: Sequence) -> pd.Series:
    """Rows of a ratio column that are in `ratios`, None/NaN standing for the natural ratio."""
    keys = [_ratio_key(r) for r in ratios]
    natural = any(math.isnan(k) for k in keys)
    return col.isin([k for k in keys if not math.isnan(k)]) | (col.isna() & natural)


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


def paired_tests(runs: pd.DataFrame, metrics: Sequence[str] = Q_METRICS,
                 by: Sequence[str] = ("method", "ratio"),
                 pair_on: Sequence[str] = ("fold", "ratio", "seed")) -> pd.DataFrame:
    """compare_to_baseline against CE for each metric: per-fold paired differences, corrected
    resampled t-test, Wilcoxon, Holm over the methods (and ratios) of each metric."""
    parts = []
    for m in metrics:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parts.append(compare_to_baseline(runs, {"method": BASELINE}, m, pair_on, by))
    return pd.concat(parts, ignore_index=True)


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


def _fmt_ratio(r) -> str:
    return "the natural ratio" if pd.isna(r) else f"{float(r):g}:1"


def _p(value: float) -> str:
    """A p-value for prose; NaN means every fold gave the same difference (no test possible)."""
    return "n/a (identical in every fold)" if pd.isna(value) else f"{value:.3f}"


def _side_effects(tests: pd.DataFrame, method: str, ratio) -> str:
    """What a minority gain cost elsewhere: the method's macro-F1 and LGG precision vs CE's."""
    row = tests[(tests["method"] == method) & in_ratios(tests["ratio"], [ratio])]
    parts = []
    for metric, name in (("macro_f1", "macro-F1"), (f"precision_{MINORITY}", "LGG precision")):
        r = row[row["metric"] == metric]
        if len(r):
            parts.append(f"{name} {r['method_mean'].iloc[0]:.3f} against CE's "
                         f"{r['baseline_mean'].iloc[0]:.3f}")
    return f" ({'; '.join(parts)})" if parts else ""


def teacher_scores(runs: pd.DataFrame, exp: Experiment, metric: str = f"f1_{MINORITY}"
                   ) -> pd.Series:
    """Question 1's teacher: mean `metric` over folds/seeds per training ratio (NaN = natural)."""
    t = runs[(runs["model"] == exp.teacher) & runs["distiller"].isna()
             & (runs["method"] == exp.teacher_loss) & in_ratios(runs["ratio"], exp.ratios)]
    return t.groupby("ratio", dropna=False)[metric].mean()


def answer_q1(tests: pd.DataFrame, boot: pd.DataFrame, metric: str = f"f1_{MINORITY}",
              alpha: float = 0.05, teacher: pd.Series | None = None) -> str:
    """Markdown paragraphs answering question 1 from the paired tests and bootstrap of `metric`
    (and, when given, the teacher's own score per ratio from `teacher_scores`)."""
    t = tests[tests["metric"] == metric]
    b = boot[(boot["metric"] == metric)]
    lines = []
    for ratio, grp in t.groupby("ratio", dropna=False, sort=True):
        best = grp.sort_values("mean_diff", ascending=False).iloc[0]
        base = grp["baseline_mean"].iloc[0]
        sig = grp[grp["p_holm"] < alpha]
        kd_like = grp[grp["method"].map(is_distilled)].sort_values("mean_diff", ascending=False)
        bb = b[(b["method"] == best["method"]) & (in_ratios(b["ratio"], [ratio]))]
        ci = (f" (paired patient-bootstrap 95% CI of the fold-mean gain "
              f"[{bb['diff_low'].iloc[0]:+.3f}, {bb['diff_high'].iloc[0]:+.3f}])") if len(bb) else ""
        text = f"- **At {_fmt_ratio(ratio)}**, the CE student reaches {metric} = {base:.3f}"
        if teacher is not None:
            own = teacher[[k for k in teacher.index if _ratio_key(k) == _ratio_key(ratio)
                           or (pd.isna(k) and pd.isna(ratio))]]
            text += f" and its teacher {own.iloc[0]:.3f}" if len(own) else ""
        text += (f". The largest mean gain over CE is **{best['method']}**: "
                 f"{best['mean_diff']:+.3f} over {int(best['n_pairs'])} folds{ci}, corrected-t "
                 f"p = {_p(best['p_corrected_t'])}, Holm-adjusted p = {_p(best['p_holm'])}"
                 f"{_side_effects(tests, best['method'], ratio)}.")
        if len(kd_like):
            kd_txt = ", ".join(f"{r['method']} {r['mean_diff']:+.3f}" for _, r in kd_like.iterrows())
            text += f" Distillation methods, gain over CE: {kd_txt}."
        text += (f" {len(sig)} of {len(grp)} methods differ from CE at Holm-adjusted p < {alpha}"
                 + (f": {', '.join(sig['method'])}." if len(sig) else "."))
        lines.append(text)
    caveat = sorted(set(t["caveat"]) - {""})
    if caveat:
        lines.append(f"\n*Caveat:* {caveat[0]}")
    return "\n".join(lines)


def q2_gains(runs: pd.DataFrame, metrics: Sequence[str] = (f"f1_{MINORITY}", "macro_f1")
             ) -> pd.DataFrame:
    """Teacher x student gain of the distilled student over the same student trained alone
    (paired on fold/seed), with the corrected t-test and Holm over the grid's cells."""
    students = runs[runs["role"] != "teacher"]
    params = runs.groupby("model")["params"].first()
    parts = []
    for m in metrics:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = compare_to_baseline(students, {"method": BASELINE}, m,
                                    ("model", "fold", "ratio", "seed"), ("teacher_model", "model"))
        parts.append(g)
    out = pd.concat(parts, ignore_index=True)
    out["teacher_model_params"] = out["teacher_model"].map(params)
    out["model_params"] = out["model"].map(params)
    return out


def answer_q2(gains: pd.DataFrame, runs: pd.DataFrame, metric: str = f"f1_{MINORITY}",
              alpha: float = 0.05) -> str:
    """Markdown paragraphs answering question 2 from the teacher x student gains of `metric`."""
    g = gains[gains["metric"] == metric].copy()
    if g.empty:
        return "No teacher x student runs were found."
    best, worst = g.loc[g["mean_diff"].idxmax()], g.loc[g["mean_diff"].idxmin()]
    sig = g[g["p_holm"] < alpha]
    teachers = runs[runs["role"] == "teacher"].groupby("model")[metric].mean()
    rho = g[["teacher_model_params", "mean_diff"]].corr(method="spearman").iloc[0, 1] \
        if len(g) > 2 else float("nan")
    size_ratio = g["teacher_model_params"] / g["model_params"]
    rho_ratio = pd.Series(size_ratio).corr(g["mean_diff"], method="spearman") \
        if len(g) > 2 else float("nan")
    teacher_txt = ", ".join(f"{m} {v:.3f}" for m, v in teachers.sort_values().items())
    return "\n".join([
        f"- Teachers alone reach {metric}: {teacher_txt}.",
        (f"- Best pair: **{best['teacher_model']} -> {best['model']}**, {best['mean_diff']:+.3f} "
        f"over the student alone (Holm p = {_p(best['p_holm'])}); worst: {worst['teacher_model']} "
        f"-> {worst['model']}, {worst['mean_diff']:+.3f} (Holm p = {_p(worst['p_holm'])})."),
        (f"- {len(sig)} of {len(g)} teacher x student cells differ from the student alone at "
        f"Holm-adjusted p < {alpha}."),
        (f"- Spearman correlation of the gain with the teacher's parameter count: {rho:+.2f}; with "
        f"the teacher/student size ratio: {rho_ratio:+.2f} (over {len(g)} cells)."),
    ])


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


def best_method(tests: pd.DataFrame, ratio: float | None, metric: str = f"f1_{MINORITY}") -> str:
    """The method with the largest mean gain over CE in `metric` at `ratio` (paired_tests rows)."""
    at = tests[(tests["metric"] == metric) & in_ratios(tests["ratio"], [ratio])]
    return str(at.sort_values("mean_diff").iloc[-1]["method"])

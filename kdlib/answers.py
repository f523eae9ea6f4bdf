"""The answers of notebook 04, generated from the effect-size tables (kdlib.analysis) and the power
section (kdlib.sizing): the declared family and its size, the design as folds x repeats x seeds,
effect sizes with their intervals first, then p-values (corrected repeated k-fold t-test,
Bouckaert & Frank 2004; Holm within the family), the Bayesian correlated t-test's probabilities
(Corani & Benavoli 2015) and the guard metric beside every minority gain."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from kdlib.analysis import PRIMARY
from kdlib.hypotheses import EXPLORATORY
from kdlib.ratios import in_ratios


def plural(n: int, word: str) -> str:
    """'1 fold', '3 folds'."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def design_phrase(k: int, r: int, s: int) -> str:
    """The design as 'k folds x r repeats x s seeds' (singular where 1)."""
    return f"{plural(int(k), 'fold')} x {plural(int(r), 'repeat')} x {plural(int(s), 'seed')}"


def fmt_ratio(r) -> str:
    """'the natural ratio' or '16:1'."""
    return "the natural ratio" if r is None or pd.isna(r) else f"{float(r):g}:1"


def fmt_p(value: float) -> str:
    """A p-value for prose; NaN means no test was possible (e.g. the same difference in every
    split)."""
    return "n/a" if value is None or pd.isna(value) else f"{value:.3f}"


def _num(v: float) -> str:
    return "n/a" if v is None or pd.isna(v) else f"{v:+.3f}"


def gain_ci(row: Mapping, prefix: str = "") -> str:
    """'+0.050 [-0.020, +0.120]' from gain/ci_low/ci_high (or guard_gain/...)."""
    g = row[f"{prefix}gain"]
    return f"{_num(g)} [{_num(row[f'{prefix}ci_low'])}, {_num(row[f'{prefix}ci_high'])}]"


def bayes_text(row: Mapping) -> str:
    """'P(better / equivalent / worse) = 0.80 / 0.15 / 0.05'."""
    ps = [row["p_better"], row["p_rope"], row["p_worse"]]
    if any(pd.isna(p) for p in ps):
        return "P(better / equivalent / worse) n/a"
    return "P(better / equivalent / worse) = " + " / ".join(f"{p:.2f}" for p in ps)


def comparison_text(row: Mapping) -> str:
    """One comparison: gain [CI]; p and Holm p; the Bayesian probabilities; the guard; verdict."""
    holm = "" if row["family"] == EXPLORATORY else f", Holm p = {fmt_p(row['p_holm'])}"
    same = " (the same difference in every split)" if pd.isna(row["p"]) and row["se"] == 0 else ""
    return (f"{row['method']} vs {row['baseline']}: **{gain_ci(row)}**; p = {fmt_p(row['p'])}"
            f"{holm}{same}; {bayes_text(row)}; guard {row['guard']} {gain_ci(row, 'guard_')} "
            f"-> *{row['verdict']}*")


def _shape(rows: pd.DataFrame) -> tuple[int, int, int]:
    return tuple(int(rows[c].mode().iloc[0]) for c in ("k", "r", "s"))  # type: ignore[return-value]


def family_text(effects: pd.DataFrame, name: str, alpha: float, rope: float,
                what: str | None = None) -> str:
    """The family's statement: its hypotheses (`what`, by default methods x baselines x ratios),
    size, design, Holm, the ROPE and how many comparisons are exploratory."""
    fam = effects[effects["family"] == name]
    k, r, s = _shape(fam)
    methods = list(dict.fromkeys(fam["method"]))
    baselines = list(dict.fromkeys(fam["baseline"]))
    ratios = list(dict.fromkeys(fmt_ratio(x) for x in fam["ratio"]))
    what = what or (f"{plural(len(methods), 'method')} x {plural(len(baselines), 'baseline')} "
                    f"({', '.join(baselines)}) x {plural(len(ratios), 'ratio')} "
                    f"({', '.join(ratios)})")
    n_expl = int((effects["family"] == EXPLORATORY).sum())
    return (f"Declared family *{name}*: {len(fam)} hypotheses ({what} on "
            f"{fam['metric'].iloc[0]}), "
            f"Holm-adjusted within the family at alpha = {alpha:g}"
            + (f"; the other {n_expl} comparisons are exploratory (unadjusted p, no claim)"
               if n_expl else "")
            + f". Design: {design_phrase(k, r, s)} ({plural(k * r, 'paired split')} per "
            f"comparison, seeds averaged within a split). Intervals are 95 % corrected-t "
            f"intervals of the mean gain; the Bayesian correlated t-test uses a region of practical "
            f"equivalence of +-{rope:g}; a gain is a *fix* only when the guard "
            f"({fam['guard'].iloc[0]}) is non-inferior within {rope:g}.")


def _verdict_summary(fam: pd.DataFrame, alpha: float) -> str:
    sig = fam[fam["p_holm"] < alpha]
    out = [f"{len(sig)} of {len(fam)} hypotheses reject at Holm p < {alpha:g}"
           + (": " + "; ".join(f"{r['method']} vs {r['baseline']} at {fmt_ratio(r['ratio'])} "
                               f"({r['verdict']})" for _, r in sig.iterrows()) if len(sig) else "")
           + "."]
    eq = fam[fam["bayes"] == "equivalent"]
    if len(eq):
        out.append("Practically equivalent (P(equivalent) > 0.95): " + "; ".join(
            f"{r['method']} vs {r['baseline']} at {fmt_ratio(r['ratio'])}"
            for _, r in eq.iterrows()) + ".")
    fixes = fam[fam["verdict"] == "fix"]
    out.append(("Fixes (a significant gain with a non-inferior guard): "
                + ", ".join(f"{r['method']} vs {r['baseline']} at {fmt_ratio(r['ratio'])}"
                            for _, r in fixes.iterrows())) if len(fixes)
               else "No method is shown to be a fix.")
    return " ".join(out)


def answer_q1(effects: pd.DataFrame, alpha: float = 0.05, rope: float = 0.02,
              teacher: pd.Series | None = None, family_name: str = PRIMARY) -> str:
    """Markdown answer to question 1 from q1_effects: the family, per ratio the baselines' (and
    the teacher's) score and each hypothesis, the verdicts, and the largest exploratory gain."""
    fam = effects[effects["family"] == family_name]
    if fam.empty:
        return "No comparison of the declared family was found."
    metric = fam["metric"].iloc[0]
    lines = [family_text(effects, family_name, alpha, rope), ""]
    for ratio in pd.unique(fam["ratio"]):
        at = fam[in_ratios(fam["ratio"], [ratio])]
        bases = at.drop_duplicates("baseline")
        scores = ", ".join(f"{b['baseline']} {b['baseline_mean']:.3f}" for _, b in bases.iterrows())
        if teacher is not None:
            own = teacher[in_ratios(pd.Series(teacher.index, index=teacher.index), [ratio])]
            scores += f", its teacher {own.iloc[0]:.3f}" if len(own) else ""
        lines.append(f"- **At {fmt_ratio(ratio)}** the student reaches {metric} = {scores}.")
        lines += [f"  - {comparison_text(r)}" for _, r in at.iterrows()]
    lines += ["", f"**Result.** {_verdict_summary(fam, alpha)}"]
    expl = effects[(effects["family"] == EXPLORATORY) & (effects["metric"] == metric)]
    expl = expl[np.isfinite(expl["gain"].astype(float))]
    if len(expl):
        best = expl.loc[expl["gain"].astype(float).idxmax()]
        lines.append(f"Largest exploratory gain (unadjusted, not part of the claim), at "
                     f"{fmt_ratio(best['ratio'])}: {comparison_text(best)}.")
    caveats = sorted(set(fam["caveat"]) - {""})
    if caveats:
        lines.append(f"\n*Caveat:* {caveats[0]}")
    return "\n".join(lines)


def correlation_text(corr: pd.DataFrame) -> str:
    """Each q2_correlations row as 'rho [interval] over n cells' or the reason there is none."""
    parts = []
    for _, c in corr.iterrows():
        if c["rho"] is None or pd.isna(c["rho"]):
            parts.append(f"with the {c['x']}: no correlation reported ({c['reason']})")
        else:
            parts.append(f"with the {c['x']}: rho = {c['rho']:+.2f} (95 % bootstrap-over-splits "
                         f"interval [{c['ci_low']:+.2f}, {c['ci_high']:+.2f}], "
                         f"{plural(int(c['n_cells']), 'cell')}, "
                         f"{plural(int(c['n_splits']), 'split')})")
    return "Spearman correlation of the gain " + "; ".join(parts) + "."


def answer_q2(effects: pd.DataFrame, corr: pd.DataFrame, teachers: pd.Series | None = None,
              alpha: float = 0.05, rope: float = 0.02) -> str:
    """Markdown answer to question 2 from q2_effects and q2_correlations (and the teachers' own
    scores, a Series by model)."""
    if effects.empty:
        return "No teacher x student runs were found."
    name = effects["family"].iloc[0]
    what = (f"each teacher x student cell against the same student trained alone, at "
            f"{fmt_ratio(effects['ratio'].iloc[0])}")
    lines = [family_text(effects, name, alpha, rope, what), ""]
    if teachers is not None and len(teachers):
        lines.append("- Teachers alone reach " + ", ".join(
            f"{m} {v:.3f}" for m, v in teachers.sort_values().items()) + ".")
    lines += [f"- {comparison_text(r)}" for _, r in effects.iterrows()]
    lines += ["", f"**Result.** {_verdict_summary(effects, alpha)}", "", correlation_text(corr)]
    return "\n".join(lines)


def _needed(design: Mapping, key: str, target: float, power: float) -> str:
    if design[key] is None:
        return design[f"{key}_reason"]
    return (f"detecting +{target:g} with {power:.0%} power there needs {design[key]} "
            f"({int(design[f'{key}_runs'])} training runs)")


def design_support(effects: pd.DataFrame, design: Mapping, target: float, alpha: float = 0.05,
                   power: float = 0.8, split_design: str = "cv") -> str:
    """What the design supports (from sizing.family_design): the gain it detects in one test and
    at Holm's first step, the design needed for `target` at both levels, and what a
    non-significant result does and does not mean."""
    if design.get("sd") is None:
        return f"The power of this design cannot be estimated: {design['reason']}."
    fam = effects[effects["family"] == PRIMARY]
    how = ("each outer fold is a test set once per repeat, so the intervals carry training "
           "variability and test-set sampling" if split_design == "cv" else
           "all runs share one fixed test set, so the conclusions speak for new patients only as "
           "far as that test set represents them")
    n_sig = int((fam["p_holm"] < alpha).sum()) if len(fam) else 0
    verb = "is a supported claim" if n_sig == 1 else "are supported claims"
    claims = (f"So the family's {plural(n_sig, 'rejection')} {verb}." if n_sig else
              "No hypothesis of the family is rejected, which by itself does not show that there "
              "is no effect.")
    return (f"With {design_phrase(design['k'], design['r'], design['s'])} ({how}), the per-split "
            f"SD of the primary differences is {design['sd']:.3f} (root mean square over the "
            f"family). In one test at alpha = {alpha:g} this design detects a gain of "
            f"{design['mdg']:.3f} with {power:.0%} power; "
            f"{_needed(design, 'needed', target, power)}. At Holm's first step "
            f"(alpha/{design['m']}) it detects {design['mdg_family']:.3f}; "
            f"{_needed(design, 'needed_family', target, power)}. "
            f"{claims} A 'no detectable difference' says little about gains smaller than about "
            f"{design['mdg_family']:.3f} "
            f"(the design misses them more than {1 - power:.0%} of the time), and only a Bayesian "
            "P(equivalent) > 0.95 supports 'no practical difference'. Exploratory rows suggest "
            "what to test next; they are not conclusions.")

"""kdlib.answers: the generated answers state the family and its size, the design as folds x
repeats x seeds, effect sizes with intervals before p-values, the Bayesian probabilities, the guard,
and the question 2 correlation or why there is none; every number is the tables' own."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from helpers_eval import experiment_runs

from kdlib import analysis as A
from kdlib import answers as W
from kdlib import sizing as S
from kdlib.experiment import Experiment

EXP = Experiment(ratios=(None, 4), grid_ratio=4)
GAINS = {"bkd": 0.25, "kd": 0.12, "logit_adjusted": 0.05, "cnn_m->cnn_xs": 0.12,
         "cnn_s->cnn_xs": 0.08, "cnn_s->cnn_s": 0.0, "cnn_m->cnn_s": 0.03}


def quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


@pytest.fixture(scope="module")
def tables():
    runs = experiment_runs(EXP, GAINS, folds=3, repeats=3, guard={"bkd": -0.1})
    q1 = A.q1_runs(runs, EXP)
    effects = quiet(A.q1_effects, q1, EXP)
    cells = A.q2_cells(A.q2_runs(runs, EXP), EXP)
    return runs, q1, effects, cells


def test_design_phrase_counts_folds_repeats_and_seeds():
    assert W.design_phrase(3, 3, 1) == "3 folds x 3 repeats x 1 seed"
    assert W.design_phrase(5, 1, 2) == "5 folds x 1 repeat x 2 seeds"
    assert W.fmt_ratio(np.nan) == "the natural ratio" and W.fmt_ratio(16.0) == "16:1"
    assert W.fmt_p(np.nan) == "n/a" and W.fmt_p(0.01234) == "0.012"


def test_answer_q1_states_the_family_design_and_every_hypothesis(tables):
    runs, _, effects, _ = tables
    teacher = A.teacher_scores(runs, EXP)
    text = W.answer_q1(effects, alpha=0.05, rope=0.02, teacher=teacher)
    prim = effects[effects["family"] == A.PRIMARY]
    n_expl = int((effects["family"] == "exploratory").sum())
    assert text.startswith("Declared family *Q1 primary*: 20 hypotheses (5 methods x 2 baselines "
                           "(ce, logit_adjusted) x 2 ratios (the natural ratio, 4:1) on f1_LGG)")
    assert f"the other {n_expl} comparisons are exploratory" in text
    assert "Design: 3 folds x 3 repeats x 1 seed (9 paired splits per comparison" in text
    assert "9 folds" not in text
    for _, r in prim.iterrows():
        line = next(x for x in text.splitlines()
                    if x.startswith(f"  - {r['method']} vs {r['baseline']}:")
                    and f"{r['gain']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]" in x)
        assert line.index(f"{r['gain']:+.3f}") < line.index("p = ")  # effect size first
        assert f"p = {r['p']:.3f}, Holm p = {r['p_holm']:.3f}" in line
        assert (f"P(better / equivalent / worse) = {r['p_better']:.2f} / {r['p_rope']:.2f} / "
                f"{r['p_worse']:.2f}") in line
        assert (f"guard macro_f1 {r['guard_gain']:+.3f} [{r['guard_ci_low']:+.3f}, "
                f"{r['guard_ci_high']:+.3f}] -> *{r['verdict']}*") in line
    at4 = prim[prim["ratio"] == 4.0].drop_duplicates("baseline").set_index("baseline")
    assert (f"**At 4:1** the student reaches f1_LGG = ce {at4.loc['ce', 'baseline_mean']:.3f}, "
            f"logit_adjusted {at4.loc['logit_adjusted', 'baseline_mean']:.3f}, its teacher "
            f"{teacher.loc[4.0]:.3f}.") in text
    n_sig = int((prim["p_holm"] < 0.05).sum())
    assert f"**Result.** {n_sig} of 20 hypotheses reject at Holm p < 0.05" in text
    # bkd lifts LGG F1 but costs macro-F1: never called a fix
    bkd = prim[prim["method"] == "bkd"]
    assert (bkd["verdict"] != "fix").all() and "bkd vs ce at 4:1 (gain, guard worse)" in text
    assert "Largest exploratory gain (unadjusted, not part of the claim)" in text


def test_answer_q1_calls_a_fix_only_with_a_non_inferior_guard():
    runs = experiment_runs(EXP, {"kd": 0.3}, folds=5, repeats=2, noise=0.005)
    effects = quiet(A.q1_effects, A.q1_runs(runs, EXP), EXP)
    text = W.answer_q1(effects)
    kd = effects[(effects["family"] == A.PRIMARY) & (effects["method"] == "kd")]
    assert (kd["verdict"] == "fix").all() and (kd["guard_ci_low"] > -0.02).all()
    assert "Fixes (a significant gain with a non-inferior guard): kd vs ce at the natural ratio" \
        in text
    assert W.answer_q1(effects[effects["family"] != A.PRIMARY]).startswith("No comparison")


def test_answer_q2_reports_the_correlation_or_why_there_is_none(tables):
    _, _, _, cells = tables
    gains = quiet(A.q2_effects, cells, EXP)
    corr = quiet(A.q2_correlations, cells, EXP, n_boot=200)
    teachers = pd.Series({"cnn_s": 0.41, "cnn_m": 0.44})
    text = W.answer_q2(gains, corr, teachers, alpha=0.05)
    assert text.startswith("Declared family *Q2 teacher x student*: 4 hypotheses (each teacher x "
                           "student cell against the same student trained alone, at 4:1 on "
                           "f1_LGG)")
    assert "Design: 3 folds x 3 repeats x 1 seed" in text
    assert "- Teachers alone reach cnn_s 0.410, cnn_m 0.440." in text
    for _, r in gains.iterrows():
        assert f"- {r['method']} vs {r['baseline']}: **{r['gain']:+.3f} [" in text
    ratio = corr.set_index("x").loc["teacher/student size ratio"]
    assert (f"with the teacher/student size ratio: rho = {ratio['rho']:+.2f} (95 % "
            f"bootstrap-over-splits interval [{ratio['ci_low']:+.2f}, {ratio['ci_high']:+.2f}], "
            "4 cells, 9 splits)") in text
    assert "with the teacher parameters: no correlation reported (4 cell(s) with 2 distinct" in text
    assert W.answer_q2(gains.iloc[:0], corr) == "No teacher x student runs were found."


def test_design_support_quotes_the_power_section(tables):
    runs, q1, effects, _ = tables
    arms = S.runs_per_split(runs)
    design = S.family_design(quiet(S.power_table, q1, effects, arms=arms), 0.05, arms=arms)
    text = W.design_support(effects, design, 0.05)
    assert text.startswith("With 3 folds x 3 repeats x 1 seed (each outer fold is a test set")
    assert f"SD of the primary differences is {design['sd']:.3f}" in text
    assert f"detects a gain of {design['mdg']:.3f} with 80% power" in text
    assert f"(alpha/20) it detects {design['mdg_family']:.3f}" in text
    if design["needed"]:
        assert f"needs {design['needed']} ({design['needed_runs']} training runs)" in text
    n_sig = int((effects.loc[effects["family"] == A.PRIMARY, "p_holm"] < 0.05).sum())
    verb = "is a supported claim" if n_sig == 1 else "are supported claims"
    assert (f"So the family's {W.plural(n_sig, 'rejection')} {verb}." in text
            if n_sig else "No hypothesis of the family is rejected" in text)
    none = effects.assign(p_holm=1.0)
    assert "No hypothesis of the family is rejected" in W.design_support(none, design, 0.05)
    holdout = W.design_support(effects, design, 0.05, split_design="holdout")
    assert "share one fixed test set" in holdout
    assert W.design_support(effects, {"sd": None, "reason": "why"}, 0.05).endswith("why.")


def test_comparison_text_says_when_every_split_gave_the_same_difference(tables):
    _, _, effects, _ = tables
    row = effects.iloc[0].copy()
    row[["gain", "ci_low", "ci_high", "se", "p", "p_holm"]] = [0.0, 0.0, 0.0, 0.0, np.nan, np.nan]
    text = W.comparison_text(row)
    assert "**+0.000 [+0.000, +0.000]**; p = n/a, Holm p = n/a (the same difference in every " \
        "split)" in text

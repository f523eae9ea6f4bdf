"""kdlib.analysis: post-hoc rows, the runs of each question, the declared families and their
effect tables, question 2's correlation, and the patient bootstrap, on made-up run tables, fake
run folders and a tiny trained run set."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers_eval import experiment_runs, synthetic_predictions, synthetic_runs
from helpers_train import make_cache, tiny_config, write_splits
from scipy import stats as sps

from kdlib import CLASSES
from kdlib import analysis as A
from kdlib.comparisons import split_differences
from kdlib.errors import DataError
from kdlib.experiment import Experiment
from kdlib.grid import run_grid
from kdlib.hypotheses import EXPLORATORY
from kdlib.identity import method_name, run_id
from kdlib.metrics import run_metrics
from kdlib.results import load_predictions, load_runs
from kdlib.stats import holm
from kdlib.train_config import TrainConfig

PARAMS = {"cnn_xs": 6_000, "cnn_s": 40_000, "cnn_m": 150_000, "cnn_l": 600_000}


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


# ---------------------------------------------------------------- post-hoc adjustment


def test_posthoc_predictions_by_hand():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(7, 3)) * 2
    pred = pd.DataFrame({"subject_id": "S1", "slice": range(7), "label": "HGG",
                         **{f"p_{c}": 1 / 3 for c in CLASSES},
                         **{f"z_{c}": z[:, i] for i, c in enumerate(CLASSES)}})
    counts, tau = [50, 30, 20], 0.7
    out = A.posthoc_predictions(pred, counts, tau)
    want = softmax(z - tau * np.log(np.array(counts) / 100))
    np.testing.assert_allclose(out[[f"p_{c}" for c in CLASSES]].to_numpy(), want, atol=1e-6)
    pd.testing.assert_frame_equal(out.drop(columns=[f"p_{c}" for c in CLASSES]),
                                  pred.drop(columns=[f"p_{c}" for c in CLASSES]))
    assert (pred["p_HGG"] == 1 / 3).all()  # the input is not modified
    same = A.posthoc_predictions(pred, counts, 0.0)
    np.testing.assert_allclose(same[[f"p_{c}" for c in CLASSES]].to_numpy(), softmax(z), atol=1e-6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """cnn_s CE, cnn_xs CE, cnn_xs KD from the cnn_s run, cnn_xs CE trained with posthoc_tau."""
    root = tmp_path_factory.mktemp("analysis")
    cache = make_cache(root, n_hgg=6, n_lgg=6, slices=4, size=16)
    splits = write_splits(cache, root / "splits.csv")
    base = tiny_config(cache, splits, epochs=1)
    teacher = TrainConfig.from_dict({**base, "model": "cnn_s"})
    configs = [teacher, TrainConfig.from_dict(base),
               TrainConfig.from_dict({**base, "distiller": "kd", "teacher": run_id(teacher)}),
               TrainConfig.from_dict({**base, "posthoc_tau": 1.0})]
    run_grid(configs, root / "runs", progress=False)
    return load_runs(root / "runs")


def test_add_posthoc_one_row_per_plain_ce_run(trained):
    runs = trained
    assert sorted(runs["method"]) == ["ce", "ce", "ce+posthoc", "kd"]
    out = A.add_posthoc(runs, tau=0.5)
    assert len(out) == len(runs) + 2
    pd.testing.assert_frame_equal(out.iloc[:len(runs)][runs.columns], runs, check_dtype=False)
    assert out.iloc[:len(runs)]["derived_posthoc_tau"].isna().all()
    new = out.iloc[len(runs):]
    plain = runs[(runs["method"] == "ce") & runs["posthoc_tau"].isna()]
    assert new["run_id"].tolist() == [f"{r}+posthoc" for r in plain["run_id"]]
    assert (new["method"] == "ce+posthoc").all() and (new["derived_posthoc_tau"] == 0.5).all()
    assert new["model"].tolist() == plain["model"].tolist()
    for (_, row), (_, src) in zip(new.iterrows(), plain.iterrows()):
        counts = [src[f"train_n_{c}"] for c in CLASSES]
        adjusted = A.posthoc_predictions(load_predictions(src["path"]), counts, 0.5)
        want = quiet(run_metrics, adjusted)
        for k, v in want.items():
            assert row[k] == pytest.approx(v, nan_ok=True), k
        pred = A.run_predictions(row)
        z = pred[[f"z_{c}" for c in CLASSES]].to_numpy()
        pi = np.array(counts, float) / sum(counts)
        np.testing.assert_allclose(pred[[f"p_{c}" for c in CLASSES]].to_numpy(),
                                   softmax(z - 0.5 * np.log(pi)), atol=1e-6)
    # a table without plain CE runs is returned as it is
    kd_only = runs[runs["method"] == "kd"]
    assert A.add_posthoc(kd_only) is kd_only


def test_training_and_analysis_posthoc_agree(trained):
    row = trained[trained["method"] == "ce+posthoc"].iloc[0]
    pred = load_predictions(row["path"])
    again = A.posthoc_predictions(pred, [row[f"train_n_{c}"] for c in CLASSES], 1.0)
    cols = [f"p_{c}" for c in CLASSES]
    np.testing.assert_allclose(again[cols].to_numpy(), pred[cols].to_numpy(), atol=1e-5)


# ---------------------------------------------------------------- the runs of each question

EXP = Experiment(ratios=(None, 4), grid_ratio=4, teacher="cnn_m", student="cnn_xs",
                 grid_teachers=("cnn_s", "cnn_m"), grid_students=("cnn_xs", "cnn_s"), epochs=1)
GAIN = {"ce": 0.0, "ce+posthoc": 0.02, "weighted_ce": 0.03, "kd": 0.04, "dkd": 0.06}
PAIR_GAIN = {("cnn_s", "cnn_xs"): 0.05, ("cnn_m", "cnn_xs"): 0.08, ("cnn_s", "cnn_s"): -0.01,
             ("cnn_m", "cnn_s"): 0.02}


def run_rows(exp=EXP, folds=(0, 1, 2), seed=0):
    """A run table like load_runs + add_posthoc gives, from the experiment's configs."""
    configs = exp.configs("c.h5", "s.csv", list(folds))
    by_id = {run_id(c): c for c in configs}
    rng = np.random.default_rng(seed)
    fold_effect = rng.normal(0, 0.03, len(folds))
    rows = []
    for c in configs:
        t = by_id[c.teacher].model if c.teacher else None
        method = method_name(c)
        gain = PAIR_GAIN.get((t, c.model), 0.0) if c.ratio == exp.grid_ratio and t else \
            GAIN.get(method, 0.01)
        base = 0.4 + 0.1 * (c.model != "cnn_xs") + fold_effect[folds.index(c.fold)]
        f1 = base + gain + rng.normal(0, 0.01)
        rows.append({"run_id": run_id(c), "method": method, "model": c.model,
                     "teacher_model": t, "distiller": c.distiller,
                     "ratio": np.nan if c.ratio is None else c.ratio, "fold": c.fold,
                     "seed": c.seed, "params": PARAMS[c.model], "n_test": 100, "n_train": 300,
                     "f1_LGG": f1, "macro_f1": f1 + 0.2})
    runs = pd.DataFrame(rows)
    extra = runs[(runs["method"] == "ce") & (runs["model"] == "cnn_xs")].assign(
        method="ce+posthoc", derived_posthoc_tau=1.0, f1_LGG=lambda d: d["f1_LGG"] + 0.02)
    extra["run_id"] = extra["run_id"] + "+posthoc"
    decoys = runs[(runs["method"] == "ce") & (runs["model"] == "cnn_xs")].iloc[:1].assign(
        ratio=8.0, run_id="decoy-ratio8")
    return pd.concat([runs, extra, decoys], ignore_index=True)


def test_q1_runs_selects_the_student_at_the_ratios():
    runs = run_rows()
    q1 = A.q1_runs(runs, EXP)
    F = 3
    per = 6 + 3 + 1 + 1 + 1  # baselines, distillers, kd+LA, kd_original, ce+posthoc
    assert len(q1) == per * F * 2 and list(q1.index) == list(range(len(q1)))
    assert (q1["model"] == "cnn_xs").all() and "decoy-ratio8" not in set(q1["run_id"])
    assert set(q1.loc[q1["distiller"].notna(), "teacher_model"]) == {"cnn_m"}  # not cnn_s
    counts = q1.groupby(["method", q1["ratio"].fillna(0)]).size()
    assert (counts == F).all() and len(counts) == per * 2
    # a natural-ratio-only experiment keeps the NaN rows only
    only_nat = A.q1_runs(runs, Experiment(ratios=(None,), teacher="cnn_m", student="cnn_xs"))
    assert only_nat["ratio"].isna().all() and len(only_nat) == per * F


def test_q2_runs_roles_and_a_model_in_both_lists():
    runs = run_rows()
    q2 = A.q2_runs(runs, EXP)
    assert (q2["ratio"] == 4.0).all()
    roles = q2.groupby("role").size().to_dict()
    F = 3
    assert roles == {"teacher": 2 * F, "student alone": 2 * F, "distilled": 4 * F}
    t = q2[q2["role"] == "teacher"]
    assert set(t["model"]) == {"cnn_s", "cnn_m"} and (t["method"] == "ce").all()
    alone = q2[q2["role"] == "student alone"]
    assert set(alone["model"]) == {"cnn_xs", "cnn_s"} and alone["distiller"].isna().all()
    d = q2[q2["role"] == "distilled"]
    assert set(zip(d["teacher_model"], d["model"])) == set(PAIR_GAIN)
    assert (d["method"] == "kd").all()
    # cnn_s's CE run is the same run in two roles
    cnn_s_ce = q2[(q2["model"] == "cnn_s") & (q2["method"] == "ce")]
    assert cnn_s_ce.groupby("run_id")["role"].apply(sorted).tolist() == \
        [["student alone", "teacher"]] * F
    assert "ce+posthoc" not in set(q2["method"])


def test_example_runs_pick_one_run_per_method_and_the_teacher():
    runs = run_rows()
    picked = A.example_runs(runs, EXP, 4, ["ce", "dkd", "ce", "nosuch"])
    assert list(picked) == ["ce", "dkd", "teacher cnn_m"]
    assert all(r["fold"] == 0 and r["seed"] == 0 and r["ratio"] == 4.0 for r in picked.values())
    assert picked["teacher cnn_m"]["model"] == "cnn_m" and picked["dkd"]["model"] == "cnn_xs"
    nat = A.example_runs(runs, EXP, None, ["kd"])
    assert np.isnan(nat["kd"]["ratio"]) and nat["kd"]["teacher_model"] == "cnn_m"


# ---------------------------------------------------------------- tables and tests


def test_method_order():
    methods = ["kd", "dkd", "ce", "focal", "kd_original", "ce+posthoc", "kd+logit_adjusted",
               "weighted_ce", "bkd", "ldam_drw"]
    assert A.method_order(methods) == ["ce", "ce+posthoc", "focal", "ldam_drw", "weighted_ce",
                                       "bkd", "dkd", "kd", "kd+logit_adjusted", "kd_original"]
    assert A.method_order(["kd", "focal"]) == ["focal", "kd"]
    assert A.method_order([]) == []


def test_method_order_keeps_sampler_baselines_with_the_baselines():
    assert A.method_order(["kd", "ce+oversample", "focal", "ce"]) == [
        "ce", "ce+oversample", "focal", "kd"]


def synthetic(folds=5):
    runs = synthetic_runs({"ce": 0.0, "weighted_ce": 0.06, "kd": 0.01, "dkd": 0.03}, folds=folds,
                          ratios=(float("nan"), 4.0), noise=0.005, seed=1)
    return runs.assign(patient_balanced_accuracy=runs["macro_f1"] + 0.1)


def test_summary_table_order_and_values():
    runs = synthetic()
    s = A.summary_table(runs, metrics=["f1_LGG", "macro_f1"])
    assert s["method"].tolist() == ["ce", "weighted_ce", "dkd", "kd"] * 2
    assert s["ratio"].iloc[:4].eq(4.0).all() and s["ratio"].iloc[4:].isna().all()
    assert (s["n_runs"] == 5).all() and s["method"].map(type).eq(str).all()
    for _, row in s.iterrows():
        same = runs["ratio"].isna() if pd.isna(row["ratio"]) else runs["ratio"] == row["ratio"]
        part = runs[(runs["method"] == row["method"]) & same]
        assert row["f1_LGG_mean"] == pytest.approx(part["f1_LGG"].mean())
        assert row["macro_f1_std"] == pytest.approx(part["macro_f1"].std(ddof=1))
    by_method = A.summary_table(runs, metrics=["f1_LGG"], by=["method"])
    assert by_method["method"].tolist() == ["ce", "weighted_ce", "dkd", "kd"]
    assert (by_method["n_runs"] == 10).all()


# ---------------------------------------------------------------- bootstrap over fake run folders


@pytest.fixture(scope="module")
def fake_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake_runs")
    rows = []
    spec = [("ce", np.nan, f) for f in range(3)] + [("kd", np.nan, f) for f in range(3)] + \
        [("ce", 4.0, 0), ("kd", 4.0, 0), ("kd", 4.0, 1)]  # kd fold 1 at 4:1 has no CE partner
    for i, (method, ratio, fold) in enumerate(spec):
        rid = f"{method}-f{fold}-r{ratio}-{i}"
        (root / rid).mkdir()
        skill = 1.0 + (0.6 if method == "kd" else 0.0)
        synthetic_predictions(12, 6, skill=skill, seed=i).to_csv(root / rid / "predictions.csv",
                                                                 index=False)
        rows.append({"run_id": rid, "method": method, "fold": fold, "ratio": ratio, "seed": 0,
                     "path": str(root / rid)})
    return pd.DataFrame(rows)


def test_bootstrap_table_estimates_are_fold_means(fake_runs):
    metrics = ["f1_LGG", "macro_f1", "patient_balanced_accuracy"]
    boot = A.bootstrap_table(fake_runs, metrics=metrics, n_boot=40, seed=0)
    assert len(boot) == 4 * len(metrics)  # (ce, kd) x (natural, 4:1) groups
    per_run = {r["run_id"]: quiet(run_metrics, load_predictions(r["path"]))
               for _, r in fake_runs.iterrows()}

    def mean_of(method, natural, metric):
        sel = fake_runs[(fake_runs["method"] == method)
                        & (fake_runs["ratio"].isna() if natural else fake_runs["ratio"] == 4.0)]
        return np.mean([per_run[r][metric] for r in sel["run_id"]]), len(sel)

    for _, row in boot.iterrows():
        natural = pd.isna(row["ratio"])
        est, n = mean_of(row["method"], natural, row["metric"])
        assert row["estimate"] == pytest.approx(est) and row["n_runs"] == n
        assert row["n_patients"] == 12 and row["low"] <= row["high"]
        if row["method"] == "kd" and natural:
            base, _ = mean_of("ce", True, row["metric"])
            assert row["diff"] == pytest.approx(est - base)
            assert row["diff_low"] <= row["diff_high"]
        else:  # CE itself, or kd at 4:1 where one fold lacks its CE run
            assert np.isnan(row["diff"]) and np.isnan(row["diff_low"])
    kd_nat = boot[(boot["method"] == "kd") & boot["ratio"].isna() & (boot["metric"] == "macro_f1")]
    assert kd_nat["diff"].iloc[0] > 0  # the more skilful runs win
    again = A.bootstrap_table(fake_runs, metrics=metrics, n_boot=40, seed=0)
    pd.testing.assert_frame_equal(boot, again)


def test_bootstrap_table_is_one_fold_mean_bootstrap_per_group(fake_runs, monkeypatch, tmp_path):
    from kdlib.stats import bootstrap_fold_mean

    fake_runs = fake_runs.assign(path=[shutil.copytree(p, tmp_path / Path(p).name)
                                       for p in fake_runs["path"]])  # files not read before
    reads = []
    real = A.load_predictions
    monkeypatch.setattr(A, "load_predictions", lambda path: reads.append(path) or real(path))
    metrics = ["f1_LGG", "ece", "patient_recall_LGG"]
    boot = A.bootstrap_table(fake_runs, metrics=metrics + ["f1_LGG"], n_boot=60, seed=2)
    assert len(reads) == len(fake_runs)  # each run's predictions read once
    assert A.bootstrap_table(fake_runs, metrics=metrics, n_boot=60, seed=2).equals(boot)
    assert len(reads) == len(fake_runs)  # and not again for the second table
    preds = {r["run_id"]: load_predictions(r["path"]) for _, r in fake_runs.iterrows()}
    natural = fake_runs[fake_runs["ratio"].isna()]
    kd, ce = (natural[natural["method"] == m].sort_values("fold")["run_id"] for m in ("kd", "ce"))
    level = quiet(bootstrap_fold_mean, [preds[r] for r in kd], None, metrics, 60, seed=2)
    diff = quiet(bootstrap_fold_mean, [preds[r] for r in kd], [preds[r] for r in ce], metrics, 60,
                 seed=2)
    got = boot[(boot["method"] == "kd") & boot["ratio"].isna()].set_index("metric")
    assert list(got.index) == metrics  # the repeated metric is bootstrapped once
    for m in metrics:
        lv, d = level.set_index("metric").loc[m], diff.set_index("metric").loc[m]
        assert got.loc[m, ["estimate", "low", "high"]].tolist() == pytest.approx(
            [lv["estimate"], lv["low"], lv["high"]], abs=1e-12)
        assert got.loc[m, ["diff", "diff_low", "diff_high"]].tolist() == pytest.approx(
            [d["estimate"], d["low"], d["high"]], abs=1e-12)


def test_bootstrap_table_resamples_each_outer_fold_on_its_own(tmp_path):
    rows = []  # cross-validation: each fold tests other subjects (renamed S -> F<fold>)
    for fold in range(2):
        for method, skill in (("ce", 0.8), ("kd", 1.4)):
            folder = tmp_path / f"{method}-{fold}"
            folder.mkdir()
            pred = synthetic_predictions(8 + 2 * fold, 6, skill=skill, seed=10 * fold + len(rows))
            pred["subject_id"] = pred["subject_id"].str.replace("S", f"F{fold}-")
            pred.to_csv(folder / "predictions.csv", index=False)
            rows.append({"run_id": folder.name, "method": method, "fold": fold, "ratio": 4.0,
                         "seed": 0, "path": str(folder)})
    runs = pd.DataFrame(rows)
    boot = A.bootstrap_table(runs, metrics=["macro_f1"], n_boot=200, seed=1).set_index("method")
    per_run = {r["run_id"]: quiet(run_metrics, load_predictions(r["path"]))["macro_f1"]
               for r in rows}
    kd = (per_run["kd-0"] + per_run["kd-1"]) / 2
    assert boot.loc["kd", "estimate"] == pytest.approx(kd)
    assert boot.loc["kd", "diff"] == pytest.approx(kd - (per_run["ce-0"] + per_run["ce-1"]) / 2)
    assert boot.loc["kd", "n_patients"] == 8 + 10  # both folds' test subjects
    assert boot.loc["kd", "low"] < kd < boot.loc["kd", "high"]
    assert boot.loc["kd", "diff_low"] < boot.loc["kd", "diff"] < boot.loc["kd", "diff_high"]
    wrong = tmp_path / "ce-0" / "predictions.csv"  # the same subjects with another label
    pred = pd.read_csv(wrong)
    pred.loc[0, "label"] = "LGG" if pred.loc[0, "label"] != "LGG" else "HGG"
    pred.to_csv(wrong, index=False)
    with pytest.raises(DataError, match="ce-0 and kd-0|kd-0 and ce-0"):
        A.bootstrap_table(runs, metrics=["macro_f1"], n_boot=10)


def test_bootstrap_table_pools_the_folds_of_cv_splits(tmp_path):
    from kdlib.data.splits import SplitConfig, make_splits, save_splits

    full = {(m, r): synthetic_predictions(12, 6, skill=1.0 + 0.6 * (m == "kd"), seed=3 * r + i)
            for i, m in enumerate(("ce", "kd")) for r in range(2)}
    grades = full["ce", 0].query("label != 'healthy'").drop_duplicates("subject_id")
    splits = make_splits(grades.rename(columns={"label": "grade"}),
                         SplitConfig(k_folds=3, repeats=2))
    path = save_splits(splits, tmp_path / "splits.csv")
    rows = []
    for (method, repeat), pred in full.items():
        for fold in range(3):
            test = splits[(splits["repeat"] == repeat) & (splits["fold"] == fold)]["subject_id"]
            rid = f"{method}-r{repeat}-f{fold}"
            (tmp_path / rid).mkdir()
            pred[pred["subject_id"].isin(test)].to_csv(tmp_path / rid / "predictions.csv",
                                                      index=False)
            rows.append({"run_id": rid, "method": method, "repeat": repeat, "fold": fold,
                         "ratio": 4.0, "seed": 0, "splits": str(path), "path": str(tmp_path / rid)})
    boot = A.bootstrap_table(pd.DataFrame(rows), metrics=["f1_LGG", "macro_f1"], n_boot=40)
    for _, row in boot.iterrows():
        want = np.mean([quiet(run_metrics, full[row["method"], r])[row["metric"]] for r in (0, 1)])
        assert row["estimate"] == pytest.approx(want)  # each repeat's folds pooled: all 12 subjects
        assert row["n_runs"] == 2 and row["n_patients"] == 12 and row["low"] <= row["high"]
    kd = boot[boot["method"] == "kd"].set_index("metric")
    ce = boot[boot["method"] == "ce"].set_index("metric")
    assert kd["diff"].to_dict() == pytest.approx((kd["estimate"] - ce["estimate"]).to_dict())


def test_teacher_scores_average_the_teachers_runs_per_ratio():
    runs = run_rows()
    scores = A.teacher_scores(runs, EXP)
    t = runs[(runs["model"] == "cnn_m") & runs["distiller"].isna() & (runs["method"] == "ce")]
    assert scores.loc[4.0] == pytest.approx(t.loc[t["ratio"] == 4.0, "f1_LGG"].mean())
    natural = scores[scores.index.isna()]
    assert natural.iloc[0] == pytest.approx(t.loc[t["ratio"].isna(), "f1_LGG"].mean())
    assert len(scores) == 2


def test_ratio_axis_places_the_natural_ratio_at_its_achieved_value():
    runs = pd.DataFrame({"ratio": [4.0, np.nan, np.nan], "train_ratio": [4.0, 3.84, 4.02]})
    table = pd.DataFrame({"ratio": [np.nan, 8.0]})
    assert A.ratio_axis(table, runs)["ratio_axis"].tolist() == [3.9, 8.0]  # mean 3.93 -> 3.9
    assert A.ratio_axis(table, runs.iloc[:1])["ratio_axis"].isna().tolist() == [True, False]


def test_is_distilled_follows_the_distiller_registry(monkeypatch):
    from kdlib import criterion

    for m in ("kd", "dkd", "bkd", "kd_original", "kd+logit_adjusted", "dkd+focal"):
        assert A.is_distilled(m)
    for m in ("ce", "focal", "ce+posthoc", "ce+oversample", "teacher", "kdx"):
        assert not A.is_distilled(m)
    monkeypatch.setitem(criterion.DISTILLERS, "crd", criterion.DISTILLERS["kd"])
    assert A.is_distilled("crd") and A.is_distilled("crd+focal")


# ---------------------------------------------------------------- the declared families

DISTILLED = ("kd", "dkd", "bkd", "kd+logit_adjusted", "kd_original")
Q1_GAINS = {"bkd": 0.25, "kd": 0.12, "logit_adjusted": 0.05, "cnn_m->cnn_xs": 0.12,
            "cnn_s->cnn_xs": 0.08, "cnn_s->cnn_s": 0.0, "cnn_m->cnn_s": 0.03}


def test_primary_family_composition_and_size():
    fam = A.primary_family(EXP)  # ratios natural and 4
    assert fam.name == A.PRIMARY and fam.metric == "f1_LGG"
    assert set(fam.pairs) == {(m, b) for m in DISTILLED for b in ("ce", "logit_adjusted")}
    assert len(fam.ratios) == 2 and fam.ratios[0] is None and fam.ratios[1] == 4.0
    assert fam.size == 5 * 2 * 2
    # no natural ratio: the least imbalanced and the strongest
    three = Experiment(ratios=(1, 4, 16))
    assert A.primary_family(three).ratios == (1.0, 16.0)
    assert A.primary_family(Experiment(ratios=(None,))).ratios == (None,)
    declared = Experiment(ratios=(1, 4, 16), primary_ratios=(4,), primary_baselines=("ce",),
                          distillers=("kd",), kd_task_losses=(), kd_original=False,
                          primary_metric="recall_LGG")
    fam = A.primary_family(declared)
    assert fam.pairs == (("kd", "ce"),) and fam.ratios == (4,) and fam.size == 1
    assert fam.metric == "recall_LGG"
    with pytest.raises(DataError, match="no distillation method"):
        A.primary_family(Experiment(distillers=(), kd_task_losses=(), kd_original=False))


def test_q1_effects_holm_within_the_primary_family_the_rest_exploratory():
    runs = experiment_runs(EXP, Q1_GAINS, guard={"bkd": -0.1})
    q1 = A.q1_runs(runs, EXP)
    t = quiet(A.q1_effects, q1, EXP)
    prim = t[t["family"] == A.PRIMARY]
    assert len(prim) == 20 and (prim["family_size"] == 20).all()
    assert set(zip(prim["method"], prim["baseline"])) == {
        (m, b) for m in DISTILLED for b in ("ce", "logit_adjusted")}
    np.testing.assert_allclose(prim["p_holm"], holm(prim["p"].to_numpy()))
    assert ((prim["k"] == 5) & (prim["r"] == 2) & (prim["s"] == 1)).all()
    expl = t[t["family"] == EXPLORATORY]
    assert expl["p_holm"].isna().all() and len(expl) > 0
    assert not set(zip(expl["method"], expl["baseline"], expl["ratio"].fillna(0))) & set(
        zip(prim["method"], prim["baseline"], prim["ratio"].fillna(0)))
    # each gain is the mean of the paired per-split differences
    row = prim[(prim["method"] == "bkd") & (prim["baseline"] == "logit_adjusted")
               & (prim["ratio"] == 4.0)].iloc[0]
    d = quiet(split_differences, q1[q1["ratio"] == 4.0], "bkd", "logit_adjusted", "f1_LGG")
    assert row["gain"] == pytest.approx(d["diff"].mean()) and row["n_splits"] == 10
    assert row["verdict"] == "gain, guard worse"  # macro-F1 is 0.1 lower
    assert row["guard"] == "macro_f1" and row["guard_ci_high"] < 0
    assert A.best_method(t, 4.0) == "bkd"
    with pytest.raises(DataError, match="no comparison"):
        A.best_method(t, 16.0)


def test_q1_effects_follow_the_declared_rope_guard_and_metric():
    exp = Experiment(ratios=(None, 4), rope=0.5, guard_metric="f1_LGG", primary_ratios=(4,),
                     primary_baselines=("ce",))
    runs = experiment_runs(exp, Q1_GAINS)
    t = quiet(A.q1_effects, A.q1_runs(runs, exp), exp)
    prim = t[t["family"] == A.PRIMARY]
    assert len(prim) == 5 and (prim["ratio"] == 4.0).all() and (prim["baseline"] == "ce").all()
    assert (prim["guard"] == "f1_LGG").all()
    assert (prim["p_rope"] > 0.9).all()  # every gain is well inside +-0.5


def test_q2_effects_family_and_correlations():
    runs = experiment_runs(EXP, Q1_GAINS)
    cells = A.q2_cells(A.q2_runs(runs, EXP), EXP)
    g = quiet(A.q2_effects, cells, EXP)
    assert set(g["family"]) == {A.Q2_FAMILY} and len(g) == 4 and (g["family_size"] == 4).all()
    np.testing.assert_allclose(g["p_holm"], holm(g["p"].to_numpy()))
    assert set(zip(g["teacher_model"], g["model"])) == {
        ("cnn_s", "cnn_xs"), ("cnn_m", "cnn_xs"), ("cnn_s", "cnn_s"), ("cnn_m", "cnn_s")}
    assert (g["teacher_model_params"] == g["teacher_model"].map(PARAMS)).all()
    assert (g["model_params"] == g["model"].map(PARAMS)).all()
    best = g.loc[g["gain"].idxmax()]
    assert (best["teacher_model"], best["model"]) == ("cnn_m", "cnn_xs")
    corr = quiet(A.q2_correlations, cells, EXP, n_boot=200).set_index("x")
    # two teachers: two distinct parameter counts, too few for a rank correlation
    assert pd.isna(corr.loc["teacher parameters", "rho"])
    assert "2 distinct x value(s)" in corr.loc["teacher parameters", "reason"]
    ratio = corr.loc["teacher/student size ratio"]
    want = sps.spearmanr([PARAMS[t] / PARAMS[s] for t, s in zip(g["teacher_model"], g["model"])],
                         g["gain"]).statistic
    assert ratio["rho"] == pytest.approx(want) and ratio["n_cells"] == 4
    assert ratio["ci_low"] <= ratio["rho"] <= ratio["ci_high"]


def test_q2_correlation_with_too_few_cells():
    exp = Experiment(ratios=(None, 4), grid_teachers=("cnn_m",), grid_students=("cnn_xs",))
    runs = experiment_runs(exp, Q1_GAINS)
    cells = A.q2_cells(A.q2_runs(runs, exp), exp)
    corr = quiet(A.q2_correlations, cells, exp, n_boot=50)
    assert corr["rho"].isna().all() and len(corr) == 2
    assert corr["reason"].str.contains("1 cell").all()
    with pytest.raises(DataError, match="parameter count"):
        A.q2_correlations(cells.drop(columns=["params", "teacher_params"]), exp)


def test_q2_correlation_of_equal_gains_is_undefined_not_nan():
    runs = experiment_runs(EXP, {}, noise=0.0)  # every cell gains exactly 0
    cells = A.q2_cells(A.q2_runs(runs, EXP), EXP)
    corr = A.q2_correlations(cells, EXP, n_boot=50).set_index("x")
    ratio = corr.loc["teacher/student size ratio"]
    assert pd.isna(ratio["rho"]) and "same mean gain" in ratio["reason"]

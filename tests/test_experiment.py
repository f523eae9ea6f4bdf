"""kdlib.experiment: validation, the profiles' experiments, the experiment recorded in the manifest
and the profile's plan, the runs of both questions counted by hand, the planned-run table (the
results helpers of notebooks 02-03: test_results.py)."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from helpers_train import make_cache, write_splits

from kdlib.errors import ConfigError, DataError
from kdlib.experiment import (
    Experiment,
    load_experiment,
    plan_path,
    profile_plan,
    read_profile_plan,
    record_experiment,
    run_table,
)
from kdlib.identity import method_name, run_id
from kdlib.paths import project_root
from kdlib.plan import make_plan, read_plan
from kdlib.profiles import load_profile
from kdlib.workbook import read_manifest, update_manifest

CACHE, SPLITS = "data/cache/c.h5", "runs/x/splits.csv"  # never opened by configs()


# ---------------------------------------------------------------- validation


def test_defaults_and_list_coercion():
    exp = Experiment(ratios=[1, 4], seeds=[0, 1], folds=[], baseline_losses=["ce"], modalities="t1",
                     train_repeats=[])
    assert exp.ratios == (1, 4) and exp.seeds == (0, 1) and exp.baseline_losses == ("ce",)
    assert exp.folds is None and exp.train_repeats is None and exp.modalities == ("t1",)
    assert Experiment(train_repeats=[2, 0]).train_repeats == (2, 0)
    assert Experiment(ratios=None).ratios == (None,)


@pytest.mark.parametrize("kw, match", [
    ({"baseline_losses": ("focal", "weighted_ce")}, "must include 'ce'"),
    ({"ratios": (None, 0.5)}, r"ratio=0.5 must lie in \[1.0"),
    ({"grid_ratio": 0.9}, r"ratio=0.9 must lie in \[1.0"),
    ({"weights": ""}, "weights=''"),
])
def test_validation(kw, match):
    with pytest.raises(ConfigError, match=match):
        Experiment(**kw)


@pytest.mark.parametrize("kw, match", [
    ({"epochs": "3"}, "epochs='3' should be int"), ({"epochs": 2.5}, "epochs=2.5 should be int"),
    ({"lr": True}, "lr=True should be float"), ({"kd_original": "yes"}, "kd_original='yes'"),
    ({"seeds": ["a"]}, r"seeds=\('a',\) should be list\[int\]"),
    ({"folds": [0.5]}, "folds=.* should be Optional"), ({"teacher": 3}, "teacher=3 should be str"),
    ({"patience": "2"}, "patience='2' should be Optional"), ({"epochs": 0}, r"epochs=0 must lie"),
    ({"batch_size": 1}, r"batch_size=1 must lie"),
    ({"teacher": "cnn_q"}, "unknown model 'cnn_q'"),
    ({"grid_students": ["cnn_xs", "resnet1"]}, "unknown model 'resnet1'"),
    ({"baseline_losses": ["ce", "focall"]}, "baseline_losses='focall' is not valid"),
    ({"teacher_loss": "kd"}, "teacher_loss='kd' is not valid"),
    ({"distillers": ["kd", "dkdd"]}, "distillers='dkdd' is not valid"),
    ({"grid_distiller": "ce"}, "grid_distiller='ce' is not valid"),
])
def test_types_and_names_are_checked_on_construction(kw, match):
    """Settings reach the experiment from YAML and `-p`: a wrong type or name fails at once."""
    with pytest.raises(ConfigError, match=match):
        Experiment(**kw)


@pytest.mark.parametrize("kw", [{"seeds": []}, {"ratios": []}])
def test_empty_seeds_or_ratios_are_rejected(kw):
    with pytest.raises(ConfigError, match=next(iter(kw))):
        Experiment(**kw)


# ---------------------------------------------------------------- configs counted by hand


def kinds(configs):
    return Counter((c.model, method_name(c), c.ratio) for c in configs)


def check_structure(exp, configs, folds, repeats=(0,)):
    """Teachers first, students matched to a teacher of the same repeat/fold/ratio/seed, no
    duplicates."""
    ids = [run_id(c) for c in configs]
    assert len(set(ids)) == len(ids)
    by_id = dict(zip(ids, configs))
    first_student = next(i for i, c in enumerate(configs) if c.distiller)
    assert all(c.distiller is None for c in configs[:first_student])
    for i, c in enumerate(configs):
        assert c.epochs == exp.epochs and c.modalities == exp.modalities and c.cache == CACHE
        assert c.fold in folds and c.seed in exp.seeds and c.repeat in repeats
        if c.distiller:
            t = by_id[c.teacher]  # a run id of this experiment
            assert ids.index(c.teacher) < first_student <= i
            assert t.distiller is None and t.task_loss == exp.teacher_loss
            assert (t.repeat, t.fold, t.ratio, t.seed) == (c.repeat, c.fold, c.ratio, c.seed)
            assert c.cache_teacher_logits is exp.cache_teacher_logits
            q1 = c.model == exp.student and c.ratio in exp.ratios and t.model == exp.teacher
            assert q1 or (c.model in exp.grid_students and t.model in exp.grid_teachers
                          and c.ratio == exp.grid_ratio and c.distiller == exp.grid_distiller)
        else:
            assert not c.cache_teacher_logits


def test_configs_with_overlapping_questions():
    # the q1 teacher is a grid teacher, the q1 student a grid student, grid_ratio one of ratios:
    # the shared runs must appear once
    exp = Experiment(ratios=(None, 4), grid_ratio=4, teacher="cnn_l", student="cnn_xs",
                     grid_teachers=("cnn_m", "cnn_l"), grid_students=("cnn_xs", "cnn_s"),
                     epochs=1)
    configs = exp.configs(CACHE, SPLITS, [0, 1])
    F, R, S = 2, 2, 1
    teachers = F * R * S + 2 * F * S - F * S  # cnn_l at both ratios; cnn_m, cnn_l at 4 (one shared)
    q1 = (6 + 3 + 1 + 1) * F * R * S  # 6 baselines, 3 distillers, kd+logit_adjusted, kd_original
    grid_alone = 2 * F * S - F * S  # cnn_xs/ce at 4 is a q1 baseline
    grid_kd = 2 * 2 * F * S - F * S  # cnn_l -> cnn_xs kd at 4 is a q1 run
    assert len(configs) == teachers + q1 + grid_alone + grid_kd == 58
    n = kinds(configs)
    assert n["cnn_l", "ce", None] == n["cnn_l", "ce", 4.0] == n["cnn_m", "ce", 4.0] == F
    assert n["cnn_xs", "kd", 4.0] == 2 * F  # from cnn_l (q1 and grid) and from cnn_m (grid)
    assert n["cnn_xs", "kd", None] == F and n["cnn_s", "kd", 4.0] == 2 * F
    assert n["cnn_s", "ce", 4.0] == F and n["cnn_s", "ce", None] == 0
    for m in ("ce", "weighted_ce", "ldam_drw", "dkd", "bkd", "kd+logit_adjusted", "kd_original"):
        assert n["cnn_xs", m, None] == n["cnn_xs", m, 4.0] == F, m
    check_structure(exp, configs, [0, 1])


def test_configs_with_separate_questions_and_a_shared_model():
    # cnn_s is both a grid teacher and a grid student (its CE run is one config); q1 at ratios
    # 1 and 8, the grid at the natural ratio; two folds chosen by the experiment, two seeds
    exp = Experiment(folds=(0, 2), ratios=(1, 8), seeds=(0, 1), grid_ratio=None, teacher="cnn_l",
                     student="cnn_xs", grid_teachers=("cnn_s", "cnn_m"),
                     grid_students=("cnn_xs", "cnn_s"), cache_teacher_logits=True, epochs=1)
    configs = exp.configs(CACHE, SPLITS, [0, 1, 2])
    FRS, FS = 2 * 2 * 2, 2 * 2
    teachers = FRS + 2 * FS
    q1 = (6 + 3 + 1 + 1) * FRS
    grid_alone = 2 * FS - FS  # cnn_s/ce at natural is already a grid teacher
    grid_kd = 2 * 2 * FS
    assert len(configs) == teachers + q1 + grid_alone + grid_kd == 124
    assert {c.fold for c in configs} == {0, 2} and {c.seed for c in configs} == {0, 1}
    n = kinds(configs)
    assert n["cnn_s", "ce", None] == FS and n["cnn_m", "ce", None] == FS
    assert n["cnn_xs", "ce", None] == FS and n["cnn_xs", "ce", 1.0] == n["cnn_xs", "ce", 8.0] == FS
    check_structure(exp, configs, [0, 2])
    # the grid: every teacher x student cell once per fold and seed
    by_id = {run_id(c): c for c in configs}
    for fold, seed in itertools.product((0, 2), (0, 1)):
        cells = sorted((by_id[c.teacher].model, c.model) for c in configs if c.distiller == "kd"
                       and c.ratio is None and (c.fold, c.seed) == (fold, seed))
        assert cells == sorted(itertools.product(("cnn_s", "cnn_m"), ("cnn_xs", "cnn_s")))
    original = [c for c in configs if c.distill_params.get("original")]
    assert len(original) == FRS
    assert all(c.distiller == "kd" and c.task_loss == "ce" and c.model == "cnn_xs"
               and by_id[c.teacher].model == "cnn_l" and method_name(c) == "kd_original"
               for c in original)
    assert all(c.cache_teacher_logits for c in configs if c.distiller)


def test_configs_without_distillation_or_grid():
    exp = Experiment(baseline_losses=("ce", "focal"), distillers=(), kd_task_losses=(),
                     kd_original=False, grid_teachers=(), ratios=(4,), teacher="cnn_l")
    configs = exp.configs(CACHE, SPLITS, [0, 1, 2])
    assert [(c.model, c.task_loss) for c in configs[:3]] == [("cnn_l", "ce")] * 3
    assert Counter((c.model, c.task_loss, c.fold) for c in configs[3:]) == Counter(
        (m, loss, f) for m, loss, f in itertools.product(["cnn_xs"], ["ce", "focal"], [0, 1, 2]))
    assert all(c.distiller is None and c.ratio == 4.0 for c in configs)


def test_configs_cross_repeats_folds_ratios_and_seeds():
    exp = Experiment(ratios=(None, 4), seeds=(0, 1), grid_ratio=4, teacher="cnn_l", epochs=1)
    one = exp.configs(CACHE, SPLITS, [0, 1, 2])
    configs = exp.configs(CACHE, SPLITS, [0, 1, 2], repeats=[0, 1])
    assert len(configs) == 2 * len(one) and len(one) % (3 * 2) == 0
    per_split = Counter((c.repeat, c.fold, c.seed) for c in configs)
    assert set(per_split) == set(itertools.product((0, 1), (0, 1, 2), (0, 1)))
    assert len(set(per_split.values())) == 1  # every split gets every run of the experiment
    check_structure(exp, configs, [0, 1, 2], repeats=(0, 1))
    assert {run_id(c) for c in one} == {run_id(c) for c in configs if c.repeat == 0}
    chosen = Experiment(ratios=(None, 4), seeds=(0, 1), grid_ratio=4, teacher="cnn_l", epochs=1,
                        train_repeats=[1], folds=[2]).configs(CACHE, SPLITS, [0, 1, 2],
                                                              repeats=[0, 1])
    assert {(c.repeat, c.fold) for c in chosen} == {(1, 2)} and len(chosen) == len(one) // 3


def test_run_table_columns_and_values():
    exp = Experiment(ratios=(None, 4), grid_ratio=4, teacher="cnn_l", epochs=1)
    configs = exp.configs(CACHE, SPLITS, [0])
    t = run_table(configs)
    assert list(t.columns) == ["run_id", "model", "method", "teacher", "repeat", "fold", "ratio",
                               "seed"]
    assert t["run_id"].tolist() == [run_id(c) for c in configs]
    assert t["method"].tolist() == [method_name(c) for c in configs]
    kd = t[t["method"] == "kd_original"]
    assert len(kd) == 2 and kd["teacher"].str.startswith("cnn_l-ce-f0-").all()
    assert t.loc[t["teacher"].isna(), "method"].isin(exp.baseline_losses).all()


def test_strongest_ratio():
    assert Experiment(ratios=[1, 16, 4]).strongest_ratio == 16.0
    assert Experiment(ratios=[None, 8]).strongest_ratio == 8.0
    assert Experiment(ratios=[None]).strongest_ratio is None


def test_ratio_must_be_a_number_or_null():
    with pytest.raises(ConfigError, match="null for the natural ratio"):
        Experiment(ratios=["natural"])


# ---------------------------------------------------------------- profiles and the manifest

PROFILES = sorted(p.stem for p in (project_root() / "profiles").glob("*.yaml"))


@pytest.mark.parametrize("name", PROFILES)
def test_every_profile_spells_out_a_valid_experiment(name):
    section = load_profile(name)["experiment"]
    assert sorted(section) == sorted(Experiment.__dataclass_fields__), "list every setting"
    exp = Experiment.from_profile(name)
    assert exp.to_dict() == Experiment(**section).to_dict()
    assert exp.configs("c.h5", "s.csv", [0, 1, 2])  # its runs expand


def test_from_profile_applies_overrides_and_round_trips():
    exp = Experiment.from_profile("demo", {"epochs": 5, "ratios": [None, 8]})
    demo = Experiment.from_profile("demo")
    assert exp.epochs == 5 and exp.ratios == (None, 8) and exp.teacher == demo.teacher
    assert Experiment(**exp.to_dict()) == exp
    assert Experiment.from_profile(load_profile("demo")) == demo  # a loaded profile works too
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['epoch'\] in the experiment "
                                          "of profile 'demo'.*valid settings"):
        Experiment.from_profile("demo", {"epoch": 5})


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """The `smoke` profile under a temporary output root, with a tiny cache and splits recorded
    (what notebooks 00-01 leave)."""
    monkeypatch.setenv("KDLIB_HOME", str(tmp_path))
    cache = make_cache(tmp_path / "data", n_hgg=6, n_lgg=6, slices=4, size=16)
    splits = write_splits(cache, tmp_path / "splits.csv")
    update_manifest("smoke", cache=str(cache), splits=str(splits))
    return tmp_path


def test_load_experiment_falls_back_to_the_profile_file_and_records_it(workspace):
    assert "experiment" not in read_manifest("smoke")
    exp = load_experiment("smoke")  # a notebook opened in JupyterLab without the runner
    assert exp == Experiment.from_profile("smoke")
    man = read_manifest("smoke")
    assert man["experiment"] == exp.to_dict() and man["experiment_source"].endswith("smoke.yaml")


def test_load_experiment_prefers_the_recorded_one_and_says_how_the_file_differs(workspace, capsys):
    recorded = Experiment.from_profile("smoke", {"epochs": 5})
    record_experiment("smoke", recorded, "profiles/smoke.yaml with -p {'epochs': 5}")
    assert load_experiment("smoke") == recorded
    out = capsys.readouterr().out
    assert "with -p {'epochs': 5}" in out and "epochs: 5 -> 3" in out
    record_experiment("smoke", Experiment.from_profile("smoke"), "profiles/smoke.yaml")
    load_experiment("smoke")
    assert capsys.readouterr().out == ""  # nothing to say when they agree


def test_profile_plan_written_recorded_and_checked_by_the_analysis(workspace):
    exp = Experiment.from_profile("smoke", {"epochs": 1, "ratios": [None], "seeds": [0]})
    record_experiment("smoke", exp, "test")
    plan = profile_plan("smoke")
    man = read_manifest("smoke")
    expected = make_plan(exp.configs(man["cache"], man["splits"], [0, 1]))
    assert plan == expected and read_plan(plan_path("smoke")) == expected
    assert man["plan"]["runs"] == len(plan) and man["plan"]["made_from"]["experiment"]["epochs"] == 1
    assert read_profile_plan("smoke") == plan  # what notebook 04 reads
    # the recorded experiment changed (e.g. `kdlib run --only 04 -p epochs=2`): the plan is stale
    record_experiment("smoke", Experiment.from_profile("smoke", {"epochs": 2, "ratios": [None]}),
                      "test")
    with pytest.raises(DataError, match=r"made for another experiment.*epochs: 1 -> 2"):
        read_profile_plan("smoke")


def test_read_profile_plan_without_a_plan_says_what_to_run(workspace):
    with pytest.raises(DataError, match=r"no run plan yet.*notebooks 02 and 03, or `kdlib plan "
                                        r"--profile smoke`"):
        read_profile_plan("smoke")


# ---------------------------------------------------------------- the declared primary family


def test_primary_family_declaration_defaults_and_coercion():
    exp = Experiment()
    assert exp.primary_metric == "f1_LGG" and exp.guard_metric == "macro_f1"
    assert exp.family_baselines == ("ce", "logit_adjusted") and exp.rope == 0.02
    assert Experiment(baseline_losses=["ce", "focal"]).family_baselines == ("ce",)
    assert exp.distilled_methods == ("kd", "dkd", "bkd", "kd+logit_adjusted", "kd_original")
    assert exp.family_ratios == (1.0, 4.0)  # no natural ratio: the least imbalanced, strongest
    assert Experiment(ratios=[4, None, 16]).family_ratios == (None, 16.0)
    assert Experiment(ratios=[None]).family_ratios == (None,)
    assert Experiment(ratios=[4]).family_ratios == (4.0,)
    given = Experiment(ratios=[1, 4, 16], primary_ratios=[16, 4], primary_baselines="ce")
    assert given.family_ratios == (16, 4) and given.family_baselines == ("ce",)
    assert Experiment(ratios=[None, 4], primary_ratios=[None]).family_ratios == (None,)
    assert Experiment(kd_task_losses=[], kd_original=False).distilled_methods == (
        "kd", "dkd", "bkd")
    assert Experiment(primary_baselines=["ce+posthoc"]).family_baselines == ("ce+posthoc",)


@pytest.mark.parametrize("kw, match", [
    ({"primary_baselines": ("focal",), "baseline_losses": ("ce",)}, "primary_baselines"),
    ({"primary_baselines": ()}, "primary_baselines"),
    ({"primary_ratios": (8,)}, "primary_ratios"),
    ({"primary_ratios": (None,)}, "primary_ratios"),  # the natural ratio is not trained
    ({"primary_ratios": ()}, "primary_ratios"),
    ({"primary_ratios": ("4",)}, "primary_ratios"),
    ({"rope": -0.1}, "rope"),
    ({"rope": True}, "rope"),
    ({"rope": 1.5}, "rope"),
    ({"primary_metric": ""}, "primary_metric"),
    ({"guard_metric": None}, "guard_metric"),
])
def test_primary_family_declaration_validation(kw, match):
    with pytest.raises(ConfigError, match=match):
        Experiment(**kw)


def test_analysis_settings_leave_the_plan_valid(workspace):
    small = {"epochs": 1, "ratios": [None], "seeds": [0]}
    record_experiment("smoke", Experiment.from_profile("smoke", small), "test")
    plan = profile_plan("smoke")
    analysis_only = {"rope": 0.05, "guard_metric": "balanced_accuracy", "primary_ratios": [None],
                     "primary_baselines": ["ce"], "primary_metric": "recall_LGG"}
    record_experiment("smoke", Experiment.from_profile("smoke", {**small, **analysis_only}), "t")
    assert read_profile_plan("smoke") == plan  # no run changed: notebook 04 reads the same plan
    assert load_experiment("smoke", verbose=False).rope == 0.05

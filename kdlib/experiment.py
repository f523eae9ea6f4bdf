"""The thesis experiment: question 1 (methods x imbalance ratios) and question 2 (teacher x student
sizes) as one grid of training runs. A profile's `experiment:` section defines it; `kdlib run`
and `kdlib plan` record it (with any `-p` overrides) in the profile's manifest, and notebooks 02-04
read it from there (`load_experiment`) and train or analyse the runs of its plan
(`profile_plan`, written as `runs/<profile>/plan.jsonl`), so they always agree."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from kdlib import MINORITY, MODALITIES, criterion, models
from kdlib.config import check_choice, check_range, from_dict, to_dict
from kdlib.errors import ConfigError, DataError
from kdlib.grid import expand_grid
from kdlib.identity import method_name, run_id
from kdlib.paths import portable_path, profile_paths
from kdlib.plan import PLAN_FILE, PlanEntry, make_plan, read_plan, write_plan
from kdlib.profiles import load_profile, profile_file
from kdlib.train_config import TrainConfig
from kdlib.workbook import MANIFEST, data_settings, read_manifest, split_folds, update_manifest

NAME_LISTS = ("baseline_losses", "distillers", "kd_task_losses", "grid_teachers", "grid_students")
SETTING_TYPES = {
    "modalities": "list[str]", "train_repeats": "Optional[list[int]]",
    "folds": "Optional[list[int]]", "seeds": "list[int]",
    "epochs": "int", "batch_size": "int", "lr": "float", "weights": "Optional[str]",
    "patience": "Optional[int]", "teacher": "str", "teacher_loss": "str", "student": "str",
    **{name: "list[str]" for name in NAME_LISTS}, "kd_original": "bool",
    "grid_distiller": "str", "cache_teacher_logits": "bool",
    "primary_metric": "str", "rope": "float", "guard_metric": "str",
}
"""The type of each setting whose type __post_init__ does not check otherwise (ratios are
checked as numbers or null)."""
ANALYSIS_SETTINGS = ("primary_metric", "primary_baselines", "primary_ratios", "rope",
                     "guard_metric")
"""Settings of the analysis only: changing them changes no run, so a plan stays valid."""


def _tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _ratio_key(value: Any) -> float | None:
    return None if value is None else float(value)


def _is(value: Any, kind: str) -> bool:
    """`value` matches a type name of SETTING_TYPES (bool is no int, int is a float)."""
    if kind.startswith("Optional["):
        return value is None or _is(value, kind[len("Optional["):-1])
    if kind.startswith("list["):
        return isinstance(value, tuple) and all(_is(v, kind[5:-1]) for v in value)
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    return isinstance(value, {"int": int, "float": (int, float), "str": str}[kind])


@dataclass(frozen=True)
class Experiment:
    """Which runs answer the two questions of the README. The defaults are the smoke profile's
    experiment; every profile lists its own in its `experiment:` section.

    Question 1: `student` trained with each of `baseline_losses`, and distilled from `teacher` with
    each of `distillers` (task loss CE), with `kd` on top of each of `kd_task_losses`, and (if
    `kd_original`) with the original project's KD weighting; every one of them at each training
    HGG:LGG ratio in `ratios` (None = natural), repeat and fold of the splits (`train_repeats`,
    `folds`: None = all; how many there are is the splits' setting), and seed. Question 2: each of
    `grid_students` without a teacher (CE) and distilled with `grid_distiller` from each of
    `grid_teachers`, at `grid_ratio`. Teachers are trained with `teacher_loss` on the same repeat, fold, ratio and seed
    as their students. Where the runs train (device, workers) is no part of the experiment: the
    launcher decides it.

    The primary family of question 1 (Holm within it, everything else exploratory): each
    distillation method against each of `primary_baselines` (null: ce and logit_adjusted) on
    `primary_metric` at `primary_ratios` (null: the natural or least imbalanced ratio and the
    strongest), with the Bayesian test's region of practical equivalence +-`rope` and the guard
    `guard_metric`, non-inferior within `rope`.
    """

    modalities: tuple[str, ...] = MODALITIES
    train_repeats: tuple[int, ...] | None = None
    folds: tuple[int, ...] | None = None
    ratios: tuple[float | None, ...] = (1, 4)
    seeds: tuple[int, ...] = (0,)
    epochs: int = 3
    batch_size: int = 64
    lr: float = 3e-3
    weights: str | None = None
    patience: int | None = None
    teacher: str = "cnn_m"
    teacher_loss: str = "ce"
    student: str = "cnn_xs"
    baseline_losses: tuple[str, ...] = ("ce", "weighted_ce", "class_balanced", "focal",
                                        "logit_adjusted", "ldam_drw")
    distillers: tuple[str, ...] = ("kd", "dkd", "bkd")
    kd_task_losses: tuple[str, ...] = ("logit_adjusted",)
    kd_original: bool = True
    grid_teachers: tuple[str, ...] = ("cnn_s", "cnn_m")
    grid_students: tuple[str, ...] = ("cnn_xs", "cnn_s")
    grid_ratio: float | None = 4.0
    grid_distiller: str = "kd"
    primary_metric: str = f"f1_{MINORITY}"
    primary_baselines: tuple[str, ...] | None = None
    primary_ratios: tuple[float | None, ...] | None = None
    rope: float = 0.02
    guard_metric: str = "macro_f1"
    cache_teacher_logits: bool = False

    def __post_init__(self) -> None:
        for name in ("modalities", "ratios", "seeds", *NAME_LISTS):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        for name in ("train_repeats", "folds"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _tuple(getattr(self, name)) or None)
        self._check_types()
        for name in ("ratios", "seeds", "modalities"):
            if not getattr(self, name):
                raise ConfigError(f"{name} must list at least one value")
        if "ce" not in self.baseline_losses:
            raise ConfigError("baseline_losses must include 'ce': every gain is measured against it")
        for r in self.ratios + (self.grid_ratio,):
            if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float))):
                raise ConfigError(f"ratio {r!r} must be a number >= 1 (HGG:LGG), or null for the "
                                  "natural ratio")
            if r is not None:
                check_range("ratio", float(r), 1.0)
        self._check_primary()
        check_choice("weights", self.weights, (None, "imagenet"))
        check_range("epochs", self.epochs, 1)
        check_range("batch_size", self.batch_size, 2)
        check_range("lr", self.lr, 1e-12)
        if self.patience is not None:
            check_range("patience", self.patience, 1)
        for name in ("teacher", "student", "grid_teachers", "grid_students"):
            for m in _tuple(getattr(self, name)):
                models.check_model_name(m)
        for name in ("teacher_loss", "baseline_losses", "kd_task_losses"):
            for loss in _tuple(getattr(self, name)):
                check_choice(name, loss, sorted(criterion.LOSSES))
        for name in ("distillers", "grid_distiller"):
            for d in _tuple(getattr(self, name)):
                check_choice(name, d, sorted(criterion.DISTILLERS))

    def _check_types(self) -> None:
        """ConfigError naming the setting whose value has the wrong type (e.g. from `-p`)."""
        for name, kind in SETTING_TYPES.items():
            value = getattr(self, name)
            if not _is(value, kind):
                raise ConfigError(f"experiment setting {name}={value!r} should be {kind}")

    @classmethod
    def from_profile(cls, profile: str | Mapping[str, Any],
                     overrides: Mapping[str, Any] | None = None) -> Experiment:
        """The experiment of a profile (a name, a .yaml path or a loaded profile): its
        `experiment:` section with `overrides` (e.g. `kdlib run -p epochs=5`) on top, validated."""
        prof = load_profile(profile) if isinstance(profile, str) else profile
        values = {**(prof.get("experiment") or {}), **(overrides or {})}
        return from_dict(cls, values, f"the experiment of profile {prof['name']!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (what a profile's `experiment:` section and the manifest hold)."""
        return to_dict(self)

    @property
    def strongest_ratio(self) -> float | None:
        """The most imbalanced training ratio of question 1 (None when only the natural one)."""
        given = [float(r) for r in self.ratios if r is not None]
        return max(given) if given else None

    def _check_primary(self) -> None:
        """Validate the declared primary family (question 1's confirmatory hypotheses)."""
        for name in ("primary_metric", "guard_metric"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be a metric name, e.g. "
                                  f"'f1_{MINORITY}' or 'macro_f1'")
        if self.primary_baselines is not None:
            base = _tuple(self.primary_baselines)
            known = [*self.baseline_losses, "ce+posthoc"]
            if not base or any(b not in known for b in base):
                raise ConfigError(f"primary_baselines={list(base)} must name one or more of "
                                  f"baseline_losses or ce+posthoc: {known} (null: ce and "
                                  "logit_adjusted)")
            object.__setattr__(self, "primary_baselines", base)
        if self.primary_ratios is not None:
            ratios = _tuple(self.primary_ratios)
            keys = {_ratio_key(r) for r in self.ratios}
            bad = [r for r in ratios if r is not None and (
                isinstance(r, bool) or not isinstance(r, (int, float))
                or float(r) not in keys)]
            bad += [None] if None in ratios and None not in keys else []
            if not ratios or bad:
                raise ConfigError(f"primary_ratios={list(ratios)} must list ratios of `ratios` "
                                  f"({list(self.ratios)}; null = natural), or be null for the "
                                  "natural (or least imbalanced) and the strongest ratio")
            object.__setattr__(self, "primary_ratios", ratios)
        if isinstance(self.rope, bool) or not isinstance(self.rope, (int, float)) \
                or not 0 <= self.rope < 1:
            raise ConfigError(f"rope={self.rope!r} must be a number in [0, 1): the half-width of "
                              "the region of practical equivalence in the metric's units (e.g. "
                              "0.02)")

    @property
    def distilled_methods(self) -> tuple[str, ...]:
        """Question 1's distillation methods as the run table names them: each distiller, kd on
        each imbalance-aware loss (kd+<loss>) and kd_original."""
        return (*self.distillers, *(f"kd+{loss}" for loss in self.kd_task_losses),
                *(("kd_original",) if self.kd_original else ()))

    @property
    def family_baselines(self) -> tuple[str, ...]:
        """The primary family's baselines: `primary_baselines`, or by default CE and logit
        adjustment (the latter when it is one of `baseline_losses`)."""
        if self.primary_baselines is not None:
            return self.primary_baselines
        return tuple(b for b in ("ce", "logit_adjusted") if b in self.baseline_losses)

    @property
    def family_ratios(self) -> tuple[float | None, ...]:
        """The primary family's ratios: `primary_ratios`, or by default the natural ratio (else
        the least imbalanced one) and the strongest imbalance."""
        if self.primary_ratios is not None:
            return self.primary_ratios
        given = sorted(float(r) for r in self.ratios if r is not None)
        first = None if None in self.ratios or not given else given[0]
        return tuple(dict.fromkeys([first, self.strongest_ratio]))

    def configs(self, cache: str, splits: str, folds: list[int],
                repeats: list[int] | tuple[int, ...] = (0,)) -> list[TrainConfig]:
        """Every TrainConfig of the experiment (teachers first), for the given data and the splits'
        repeats and folds (as `kdlib.workbook.split_folds` gives them): repeat x fold x ratio x
        seed for every method."""
        base = {"cache": cache, "splits": splits, "modalities": list(self.modalities),
                "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
                "weights": self.weights, "patience": self.patience}
        folds, repeats = list(self.folds or folds), list(self.train_repeats or repeats)
        ratios = list(self.ratios)
        kd_extra = {"cache_teacher_logits": self.cache_teacher_logits}
        teachers = [{"model": self.teacher, "task_loss": self.teacher_loss, "ratio": ratios}]
        students: list[dict[str, Any]] = [
            {"model": self.student, "task_loss": list(self.baseline_losses), "ratio": ratios},
        ]
        if self.distillers:
            students.append({"model": self.student, "task_loss": "ce", "ratio": ratios, **kd_extra,
                             "distiller": list(self.distillers), "teacher": {"model": self.teacher}})
        if self.kd_task_losses:
            students.append({"model": self.student, "task_loss": list(self.kd_task_losses),
                             "ratio": ratios, "distiller": "kd", **kd_extra,
                             "teacher": {"model": self.teacher}})
        if self.kd_original:
            students.append({"model": self.student, "task_loss": "ce", "ratio": ratios, **kd_extra,
                             "distiller": "kd", "distill_params": {"original": True},
                             "teacher": {"model": self.teacher}})
        if self.grid_teachers and self.grid_students:
            teachers.append({"model": list(self.grid_teachers), "task_loss": self.teacher_loss,
                             "ratio": self.grid_ratio})
            students.append({"model": list(self.grid_students), "task_loss": "ce",
                             "ratio": self.grid_ratio})
            students.append({"model": list(self.grid_students), "task_loss": "ce", **kd_extra,
                             "ratio": self.grid_ratio, "distiller": self.grid_distiller,
                             "teacher": {"model": list(self.grid_teachers)}})
        spec = {"base": base, "grid": {"repeat": repeats, "fold": folds, "seed": list(self.seeds)},
                "teachers": teachers, "students": students}
        return expand_grid(spec)


def _manifest(profile: str) -> dict[str, Any]:
    path = profile_paths(profile).runs / MANIFEST
    return read_manifest(profile) if path.is_file() else {}


def _diff(then: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    return [f"{k}: {then.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(then) | set(now))
            if then.get(k) != now.get(k)]


def record_experiment(profile: str, exp: Experiment, source: str) -> None:
    """Record `exp` as the profile's experiment in its manifest; `source` says where it came
    from (e.g. "profiles/demo.yaml with -p epochs=5")."""
    update_manifest(profile, experiment=exp.to_dict(), experiment_source=source)


def load_experiment(profile: str, verbose: bool = True) -> Experiment:
    """The profile's experiment: the one recorded in its manifest (by `kdlib run` or `kdlib plan`,
    with their `-p` overrides), else the profile file's, which is then recorded (a notebook opened
    in JupyterLab). Says so when the recorded one and the file differ."""
    man = _manifest(profile)
    if "experiment" not in man:
        exp = Experiment.from_profile(profile)
        record_experiment(profile, exp, str(profile_file(profile)))
        return exp
    where = profile_paths(profile).runs / MANIFEST
    exp = from_dict(Experiment, man["experiment"], f"the experiment recorded in {where}")
    try:
        in_file = Experiment.from_profile(profile).to_dict()
    except ConfigError:
        in_file = None  # a profile given as a path, or a broken file: the record stands
    if verbose and in_file is not None and in_file != exp.to_dict():
        print(f"Experiment recorded in {where} (from {man.get('experiment_source', '?')}); the "
              f"profile file differs: {'; '.join(_diff(exp.to_dict(), in_file))}. "
              f"`kdlib plan --profile {profile}` records the file's.")
    return exp


def plan_path(profile: str) -> Path:
    """runs/<profile>/plan.jsonl."""
    return profile_paths(profile).runs / PLAN_FILE


def _plan_source(exp: Experiment, data: Mapping[str, str]) -> dict[str, Any]:
    trained = {k: v for k, v in exp.to_dict().items() if k not in ANALYSIS_SETTINGS}
    return {"experiment": trained, "cache": portable_path(data["cache"]),
            "splits": portable_path(data["splits"])}


def profile_plan(profile: str) -> list[PlanEntry]:
    """The run plan of the profile's experiment on its cache and splits (`load_experiment`,
    notebooks 00-01), written to runs/<profile>/plan.jsonl and recorded in the manifest."""
    exp = load_experiment(profile)
    data = data_settings(profile)
    entries = make_plan(exp.configs(**data, **split_folds(profile)))
    write_plan(entries, plan_path(profile))
    update_manifest(profile, plan={"file": PLAN_FILE, "runs": len(entries),
                                   "made_from": _plan_source(exp, data)})
    return entries


def read_profile_plan(profile: str) -> list[PlanEntry]:
    """The plan that notebooks 02-03 (or `kdlib plan`) wrote for the profile; DataError when there
    is none, or when it was made for another experiment or data than the recorded ones."""
    man = read_manifest(profile)
    path = plan_path(profile)
    if "plan" not in man or not path.is_file():
        raise DataError(f"profile {profile!r} has no run plan yet ({path}): run notebooks 02 and "
                        f"03, or `kdlib plan --profile {profile}`")
    then = man["plan"]["made_from"]
    now = _plan_source(load_experiment(profile, verbose=False), data_settings(profile))
    diffs = _diff(then["experiment"], now["experiment"]) + _diff(
        {k: then[k] for k in ("cache", "splits")}, {k: now[k] for k in ("cache", "splits")})
    if diffs:
        raise DataError(f"{path} was made for another experiment or data than the recorded one "
                        f"({'; '.join(diffs)}): train its runs first (notebooks 02 and 03 with "
                        "the same settings), or rerun with the settings the plan was made with")
    return read_plan(path)


def run_table(configs: list[TrainConfig]) -> pd.DataFrame:
    """One row per planned run: run_id, model, method, teacher, repeat, fold, ratio, seed (for
    display)."""
    return pd.DataFrame([{"run_id": run_id(c), "model": c.model, "method": method_name(c),
                          "teacher": c.teacher, "repeat": c.repeat, "fold": c.fold,
                          "ratio": c.ratio, "seed": c.seed}
                         for c in configs])

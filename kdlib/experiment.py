"""The thesis experiment: question 1 (methods x imbalance ratios) and question 2 (teacher x student
sizes) as one grid of training runs. Notebooks 02-04 build the same `Experiment` from their
parameters, so they always agree on which runs answer which question."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from kdlib import MODALITIES
from kdlib.config import check_choice, check_range
from kdlib.errors import ConfigError
from kdlib.grid import expand_grid
from kdlib.identity import method_name, run_id
from kdlib.train_config import TrainConfig


def _tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


@dataclass(frozen=True)
class Experiment:
    """Which runs answer the two questions of the README. The defaults are
    the notebooks' own (the smoke profile); a test keeps the two equal.

    Question 1: `student` trained with each of `baseline_losses`, and distilled from `teacher` with
    each of `distillers` (task loss CE), with `kd` on top of each of `kd_task_losses`, and (if
    `kd_original`) with the original project's KD weighting; every one of them at each training
    HGG:LGG ratio in `ratios` (None = natural), repeat and fold of the splits (`repeats`, `folds`:
    None = all), and seed. Question 2: each of `grid_students`
    without a teacher (CE) and distilled with `grid_distiller` from each of `grid_teachers`, at
    `grid_ratio`. Teachers are trained with `teacher_loss` on the same repeat, fold, ratio and seed
    as their students.
    """

    modalities: tuple[str, ...] = MODALITIES
    repeats: tuple[int, ...] | None = None
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
    cache_teacher_logits: bool = False
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("modalities", "ratios", "seeds", "baseline_losses", "distillers",
                     "kd_task_losses", "grid_teachers", "grid_students"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        for name in ("repeats", "folds"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _tuple(getattr(self, name)) or None)
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
        check_choice("weights", self.weights, (None, "imagenet"))

    @property
    def strongest_ratio(self) -> float | None:
        """The most imbalanced training ratio of question 1 (None when only the natural one)."""
        given = [float(r) for r in self.ratios if r is not None]
        return max(given) if given else None

    def configs(self, cache: str, splits: str, folds: list[int],
                repeats: list[int] | tuple[int, ...] = (0,)) -> list[TrainConfig]:
        """Every TrainConfig of the experiment (teachers first), for the given data and the splits'
        repeats and folds (as `kdlib.workbook.split_folds` gives them): repeat x fold x ratio x
        seed for every method."""
        base = {"cache": cache, "splits": splits, "modalities": list(self.modalities), "epochs": self.epochs,
                    "batch_size": self.batch_size, "lr": self.lr, "weights": self.weights,
                    "patience": self.patience, "device": self.device}
        folds, repeats = list(self.folds or folds), list(self.repeats or repeats)
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


def run_table(configs: list[TrainConfig]) -> pd.DataFrame:
    """One row per planned run: run_id, model, method, teacher, repeat, fold, ratio, seed (for
    display)."""
    return pd.DataFrame([{"run_id": run_id(c), "model": c.model, "method": method_name(c),
                          "teacher": c.teacher, "repeat": c.repeat, "fold": c.fold,
                          "ratio": c.ratio, "seed": c.seed}
                         for c in configs])

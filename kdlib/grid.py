"""Grids of runs: expand a spec (models x methods x folds x ratios x seeds, each student matched
to its teachers) into TrainConfigs, and train them (kdlib.launch).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kdlib.config import read_yaml, to_dict
from kdlib.errors import ConfigError
from kdlib.identity import canonical, run_id
from kdlib.launch import run_configs
from kdlib.train_config import TrainConfig, load_train_config

GRID_KEYS = ("base", "grid", "teachers", "students", "match")
DEFAULT_MATCH = ("cache", "splits", "repeat", "fold", "ratio", "seed", "modalities")


def _is_sweep(key: str, value: Any) -> bool:
    if not isinstance(value, list):
        return False
    if key == "modalities":  # a list of names is one value; a list of lists is a sweep
        return bool(value) and all(isinstance(v, (list, tuple)) for v in value)
    return True


def _cross(entry: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Cartesian product of an entry's list values (see `_is_sweep`)."""
    keys = list(entry)
    choices = [entry[k] if _is_sweep(k, entry[k]) else [entry[k]] for k in keys]
    return [dict(zip(keys, combo)) for combo in itertools.product(*choices)]


def _entries(spec: Mapping[str, Any], section: str) -> list[dict[str, Any]]:
    value = spec.get(section) or []
    value = [value] if isinstance(value, Mapping) else value
    if not all(isinstance(e, Mapping) for e in value):
        raise ConfigError(f"grid section {section!r} must be a mapping or a list of mappings")
    return [dict(e) for e in value]


def expand_grid(spec: Mapping[str, Any]) -> list[TrainConfig]:
    """The runs of a grid spec, teachers first (duplicates dropped).

    spec keys: `base` (settings for every run), `grid` (settings crossed with every entry, e.g.
    fold: [0, 1, 2], seed: [0], ratio: [1, 4, 8]), `teachers` and `students` (a mapping or a list of
    mappings; list values are crossed; `modalities` is swept only as a list of lists), `match`
    (settings a teacher must share with its student; default cache, splits, repeat, fold, ratio,
    seed, modalities). A student with a distiller gets one run per teacher run that matches it and
    its optional `teacher` selector (a mapping of settings, lists = any of; or a run id / folder).
    A student with distiller null is a baseline (selector ignored), so `distiller: [null, kd, dkd]`
    gives the baseline and the distilled runs in one entry. Example:

        base: {cache: data/x.h5, splits: runs/demo/splits.csv, epochs: 10}
        grid: {fold: [0, 1, 2], ratio: [4]}
        teachers: {model: [resnet18, cnn_l]}
        students: {model: [cnn_xs, cnn_s], distiller: [null, kd, dkd], teacher: {model: resnet18}}
    """
    unknown = sorted(set(spec) - set(GRID_KEYS))
    if unknown:
        raise ConfigError(f"unknown grid key(s) {unknown}; valid keys: {list(GRID_KEYS)}")
    base, match = dict(spec.get("base") or {}), list(spec.get("match") or DEFAULT_MATCH)
    fields = list(TrainConfig.__dataclass_fields__)
    for k in match:
        if k not in fields:
            raise ConfigError(f"grid match key {k!r} is not a setting; valid settings: {fields}")
    grid = _cross(spec.get("grid") or {})

    def build(entry: dict[str, Any], where: str) -> list[tuple[dict[str, Any], TrainConfig | None]]:
        out = []
        for e in _cross(entry):
            for g in grid:
                values = {**base, **g, **e}
                plain = {**values, "distiller": None, "teacher": None, "distill_params": {},
                         "cache_teacher_logits": False}
                try:
                    out.append((values, load_train_config(plain)))
                except ConfigError as err:
                    raise ConfigError(f"grid {where}: {err}") from None
        return out

    teachers = []
    for i, entry in enumerate(_entries(spec, "teachers")):
        teachers += [load_train_config(v) for v, _ in build(entry, f"teachers[{i}]")]
    students = []
    for i, entry in enumerate(_entries(spec, "students")):
        selector = entry.pop("teacher", None)
        for values, plain in build(entry, f"students[{i}]"):
            if not values.get("distiller"):
                students.append(plain)
                continue
            if isinstance(selector, str):
                students.append(load_train_config({**values, "teacher": selector}))
                continue
            chosen = _match_teachers(teachers, plain, selector or {}, match)
            if not chosen:
                raise ConfigError(f"grid students[{i}]: no teacher matches {selector or {}} with "
                                  f"the same {match} as student {run_id(plain)}; add it to "
                                  "`teachers`")
            students += [load_train_config({**values, "teacher": run_id(t)}) for t in chosen]
    out: dict[str, TrainConfig] = {}
    for cfg in teachers + students:
        out.setdefault(run_id(cfg), cfg)
    return list(out.values())


def _match_teachers(teachers: Sequence[TrainConfig], student: TrainConfig,
                    selector: Mapping[str, Any], match: Sequence[str]) -> list[TrainConfig]:
    s = to_dict(student)
    wanted = {k: [canonical(x) for x in (v if _is_sweep(k, v) else [v])]
              for k, v in selector.items()}
    found = []
    for t in teachers:
        d = canonical(to_dict(t))
        if all(d.get(k) == canonical(s[k]) for k in match if k not in wanted) and \
                all(d.get(k) in vals for k, vals in wanted.items()):
            found.append(t)
    return found


def grid_from_yaml(path: str | Path) -> list[TrainConfig]:
    """expand_grid of a YAML grid spec file."""
    return expand_grid(read_yaml(path))


def load_grid(source: str | Path | Mapping[str, Any]) -> list[TrainConfig]:
    """The runs of a grid: a YAML spec file or a spec mapping (see expand_grid)."""
    return expand_grid(source) if isinstance(source, Mapping) else grid_from_yaml(source)


def run_grid(configs: Iterable[TrainConfig | Mapping[str, Any]], runs_dir: str | Path,
             devices: Sequence[str] | None = None, progress: bool = True) -> list[Path]:
    """Train every run not finished yet, each student as soon as its teacher is finished; returns
    the run folders in the order given (kdlib.launch.run_configs: devices None = every GPU when
    there are several, else this process; a list = one worker process per entry). A failed run
    does not stop the others (its students are skipped); the failures are raised together at the
    end as a RunError."""
    return run_configs(configs, runs_dir, devices=devices, progress=progress)

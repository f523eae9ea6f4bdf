"""Grids of runs: expand a spec (models x methods x folds x ratios x seeds, each student matched
to its teachers) into TrainConfigs, and train them in dependency order, one process per device.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import queue
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from tqdm.auto import tqdm

from kdlib.config import read_yaml, to_dict
from kdlib.errors import ConfigError, KdlibError, RunError
from kdlib.identity import canonical, run_id
from kdlib.runs import is_finished
from kdlib.train import fit
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


def grid_levels(configs: Sequence[TrainConfig]) -> list[list[int]]:
    """Indices of `configs` grouped so that every run comes after the grid runs it distils from."""
    ids = [run_id(c) for c in configs]
    index = {rid: i for i, rid in enumerate(ids)}
    level: dict[int, int] = {}

    def depth(i: int, seen: tuple[int, ...] = ()) -> int:
        if i not in level:
            if i in seen:
                raise ConfigError(f"runs {[ids[j] for j in seen]} distil from each other in a "
                                  "cycle")
            t = configs[i].teacher
            j = index.get(Path(t).name) if t else None
            level[i] = 0 if j is None else depth(j, (*seen, i)) + 1
        return level[i]

    for i in range(len(configs)):
        depth(i)
    depths = range(max(level.values(), default=-1) + 1)
    return [[i for i in range(len(configs)) if level[i] == d] for d in depths]


def run_grid(configs: Iterable[TrainConfig | Mapping[str, Any]], runs_dir: str | Path,
             devices: Sequence[str] | None = None, progress: bool = True) -> list[Path]:
    """Train every run not finished yet, teachers before their students; returns the run folders.

    devices: None = every CUDA device when there are several, else in this process; a list of
    devices (e.g. ["cuda:0", "cuda:1"]) runs one worker process per device (spawned: a script
    that calls this needs `if __name__ == "__main__":`), fed from a shared queue, one dependency
    level at a time; a single device runs in this process. A failed run does not stop the others
    (its students are skipped); the failures are raised together at the end as a RunError.
    """
    configs = list({run_id(c): c for c in map(load_train_config, configs)}.values())
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    if devices is None:
        n = torch.cuda.device_count()
        devices = [f"cuda:{i}" for i in range(n)] if n > 1 else []
    ids = [run_id(c) for c in configs]
    paths: dict[int, Path] = {}
    failed: dict[str, str] = {}
    pool = _Pool(list(devices), runs_dir) if len(devices) > 1 else None
    bar = tqdm(total=len(configs), desc="grid", unit="run", disable=not progress)
    try:
        for level in grid_levels(configs):
            todo = []
            for i in level:
                t = configs[i].teacher
                if t and Path(t).name in failed:
                    failed[ids[i]] = f"skipped: teacher {Path(t).name} failed"
                    bar.update()
                elif is_finished(runs_dir / ids[i]):
                    paths[i] = runs_dir / ids[i]
                    bar.update()
                else:
                    todo.append(i)
            if pool is not None:
                results = pool.map([configs[i] for i in todo], bar)
            else:
                results = []
                for i in todo:
                    cfg = configs[i] if not devices else _with_device(configs[i], devices[0])
                    try:
                        results.append((fit(cfg, runs_dir, progress=progress), None))
                    except KdlibError as err:
                        results.append((None, f"{type(err).__name__}: {err}"))
                    bar.update()
            for i, (path, error) in zip(todo, results):
                if error:
                    failed[ids[i]] = error
                else:
                    paths[i] = Path(path)
    finally:
        bar.close()
        if pool is not None:
            pool.close()
    if failed:
        lines = "\n".join(f"  {rid}: {msg}" for rid, msg in failed.items())
        raise RunError(f"{len(failed)} of {len(configs)} grid run(s) failed:\n{lines}")
    return [paths[i] for i in range(len(configs))]


def _with_device(cfg: TrainConfig, device: str) -> TrainConfig:
    return dataclasses.replace(cfg, device=device)


def _worker(device: str, tasks: Any, results: Any, runs_dir: str, threads: int) -> None:
    """Grid worker process: fit every config it is handed on its device until it gets None."""
    if device == "cpu":
        torch.set_num_threads(threads)
    while (task := tasks.get()) is not None:
        i, values = task
        try:
            cfg = TrainConfig.from_dict({**values, "device": device})
            path = fit(cfg, runs_dir, progress=False)
            results.put((i, str(path), None))
        except Exception as err:  # noqa: BLE001 (reported to the parent, which raises)
            results.put((i, None, f"{type(err).__name__}: {err}"))


class _Pool:
    """One worker process per device; a CUDA device is the only one its process sees."""

    def __init__(self, devices: list[str], runs_dir: Path) -> None:
        ctx = mp.get_context("spawn")
        self.tasks, self.results, self.procs = ctx.Queue(), ctx.Queue(), []
        threads = max(1, (os.cpu_count() or 1) // len(devices))
        for dev in devices:
            old = os.environ.get("CUDA_VISIBLE_DEVICES")
            if dev.startswith("cuda"):  # cuda:N is the N-th device this process sees
                index = int(dev.partition(":")[2] or 0)
                visible = old.split(",") if old else [str(i) for i in range(index + 1)]
                os.environ["CUDA_VISIBLE_DEVICES"] = visible[index]
            try:
                p = ctx.Process(target=_worker, daemon=True, args=(
                    "cuda" if dev.startswith("cuda") else dev, self.tasks, self.results,
                    str(runs_dir), threads))
                p.start()
            finally:
                if old is None:
                    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = old
            self.procs.append(p)

    def map(self, configs: list[TrainConfig], bar: Any) -> list[tuple[str | None, str | None]]:
        """(path, None) or (None, error) per config, trained by whichever worker is free."""
        for i, cfg in enumerate(configs):
            self.tasks.put((i, to_dict(cfg)))
        out: dict[int, tuple[str | None, str | None]] = {}
        while len(out) < len(configs):
            try:
                i, path, error = self.results.get(timeout=5)
            except queue.Empty:
                dead = [p.exitcode for p in self.procs if p.exitcode is not None]
                if dead:
                    raise RunError(f"a grid worker process died (exit code {dead[0]}), e.g. out of "
                                   "memory; rerun the grid: finished runs are skipped") from None
                continue
            out[i] = (path, error)
            bar.update()
        return [out[i] for i in range(len(configs))]

    def close(self) -> None:
        for _ in self.procs:
            self.tasks.put(None)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()

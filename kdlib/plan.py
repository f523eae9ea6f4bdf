"""A run plan: every training run of an experiment, with the run ids it depends on (a student
needs its teacher), in dependency order. Written as `plan.jsonl`, one run per line, so that any
scheduler (kdlib.launch, Slurm) can train the runs without rebuilding the experiment."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdlib.errors import ConfigError, KdlibError
from kdlib.identity import run_id
from kdlib.train_config import TrainConfig, load_train_config

PLAN_FILE = "plan.jsonl"
LINE_KEYS = ("index", "run_id", "depends_on", "config")


@dataclass(frozen=True)
class PlanEntry:
    """One run of a plan: its id, its config, and the ids of the plan's runs it needs first."""

    run_id: str
    config: TrainConfig
    depends_on: tuple[str, ...] = ()


def _teacher_id(cfg: TrainConfig) -> str | None:
    return Path(cfg.teacher).name if cfg.teacher else None


def make_plan(configs: Iterable[TrainConfig | Mapping[str, Any]]) -> list[PlanEntry]:
    """The plan of `configs`: duplicates dropped, each run after the plan runs it distils from
    (sorted by dependency depth, stable within a depth). A teacher outside the plan (a finished
    run folder) is no dependency."""
    unique: dict[str, TrainConfig] = {}
    for c in map(load_train_config, configs):
        unique.setdefault(run_id(c), c)
    depth: dict[str, int] = {}

    def level(rid: str) -> int:  # a run id hashes its teacher's id: the graph has no cycle
        if rid not in depth:
            t = _teacher_id(unique[rid])
            depth[rid] = 0 if t not in unique else level(t) + 1
        return depth[rid]

    order = sorted(unique, key=lambda rid: level(rid))  # sorted() is stable
    return [PlanEntry(rid, unique[rid], tuple(t for t in [_teacher_id(unique[rid])] if t in unique))
            for rid in order]


def plan_levels(entries: list[PlanEntry]) -> list[range]:
    """Index ranges of the plan's dependency levels (level 0: runs without a plan teacher), for a
    plan in `make_plan` order."""
    depth: dict[str, int] = {}
    for e in entries:
        depth[e.run_id] = 1 + max((depth[d] for d in e.depends_on), default=-1)
    out: list[range] = []
    start = 0
    for i in range(1, len(entries) + 1):
        if i == len(entries) or depth[entries[i].run_id] != depth[entries[start].run_id]:
            out.append(range(start, i))
            start = i
    return out


def write_plan(entries: list[PlanEntry], path: str | Path) -> Path:
    """Write the plan as JSON lines {index, run_id, depends_on, config}, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"index": i, "run_id": e.run_id, "depends_on": list(e.depends_on),
                         "config": e.config.to_dict()}) for i, e in enumerate(entries)]
    tmp = path.with_name(path.name + ".part")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)
    return path


def read_plan(path: str | Path) -> list[PlanEntry]:
    """Read and check a plan.jsonl: every config valid, every run id equal to its config's, every
    dependency an earlier line; ConfigError naming the line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"plan {path} does not exist; write it with `kdlib plan --profile NAME`")
    entries: list[PlanEntry] = []
    seen: set[str] = set()
    for n, text in enumerate(path.read_text().splitlines(), 1):
        where = f"{path} line {n}"
        try:
            line = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{where} is not JSON ({err.msg}); write the plan again") from None
        if not isinstance(line, dict) or sorted(line) != sorted(LINE_KEYS):
            raise ConfigError(f"{where} must hold exactly the keys {list(LINE_KEYS)}")
        try:
            cfg = TrainConfig.from_dict(line["config"])
        except KdlibError as err:
            raise ConfigError(f"{where}: {err}") from None
        rid = run_id(cfg)
        if line["run_id"] != rid or line["index"] != n - 1:
            raise ConfigError(f"{where}: run {line['run_id']} (index {line['index']}) does not match "
                              f"its config (run id {rid}, index {n - 1}): the plan was edited, or "
                              "written by another kdlib version or with another KDLIB_HOME; write "
                              "it again with `kdlib plan`")
        missing = [d for d in line["depends_on"] if d not in seen]
        if missing:
            raise ConfigError(f"{where}: depends on {missing}, which no earlier line trains")
        seen.add(rid)
        entries.append(PlanEntry(rid, cfg, tuple(line["depends_on"])))
    return entries


def plan_entry(path: str | Path, index: int) -> PlanEntry:
    """Line `index` (from 0, e.g. $SLURM_ARRAY_TASK_ID) of a plan file."""
    entries = read_plan(path)
    if not 0 <= index < len(entries):
        raise ConfigError(f"--index {index} is outside the plan {path}: it has {len(entries)} runs "
                          f"(0..{len(entries) - 1})")
    return entries[index]

"""Where the time of a profile's notebook chain goes: per phase, per training part, per run part.

Three tables, from what a chain already writes plus one instrumented run:
1. phases: each executed notebook's time (papermill's cell timings) with its phantom, cache,
   splits, training and bootstrap cells, and the rest (kernel start-up, plots, tables);
2. training: from the run folders (config.yaml is written when a run starts training,
   metrics.json when it ends, history.csv holds each epoch's time): worker time in training
   epochs, in the rest of a run (checkpoints, test predictions, files) and between runs
   (process start-up, data and teacher loading, waiting for a teacher or a free worker);
3. one run again, instrumented with timers: data loading, model build, teacher loading,
   augmentation, student forward/backward/step, teacher forward, validation, checkpoints,
   files; plus the start-up of a fresh worker process (Python, torch and kdlib imports).

    python benchmarks/profile_demo.py --profile smoke          # run the chain in a temp folder
    python benchmarks/profile_demo.py --profile demo --existing  # profile runs/demo as it is

`--home DIR` chooses the output root (KDLIB_HOME) to run in or to read. Timings measured on a
busy machine are inflated: run it on a quiet one for before/after figures. Prints, asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nbformat
import pandas as pd
import yaml

PHASES = (("phantom / dataset", r"get_dataset\("), ("slice cache", r"build_cache\("),
          ("splits", r"build_splits\("), ("training", r"run_grid\(|launch\w*\(|\.launch\("),
          ("bootstrap", r"bootstrap_table\("))
"""Cells of interest, by what their source calls (first match wins)."""

WORKER_IMPORTS = ("kdlib.train", "kdlib.criterion", "kdlib.losses", "kdlib.models", "kdlib.metrics",
                  "kdlib.data.cache", "kdlib.data.splits", "kdlib.data.folds", "kdlib.teachers",
                  "kdlib.predictions", "kdlib.device", "kdlib.identity")
"""The modules a training run imports (those that exist)."""

PARTS = (  # label, candidate "module:attribute" targets (the first that exists is timed)
    ("fit: setup and the rest", ("kdlib.train:fit",)),
    ("data: read the slice cache", ("kdlib.data.loader:load_tensors",)),
    ("data: slice table and splits", ("kdlib.data.folds:fold_data", "kdlib.train:_split_data")),
    ("model: build", ("kdlib.teachers:build_model", "kdlib.train:build_model")),
    ("teacher: load", ("kdlib.teachers:load_teacher", "kdlib.train:load_teacher")),
    ("train: augmentation", ("kdlib.data.loader:augment_batch",)),
    ("train: teacher forward", ("kdlib.teachers:FrozenTeacher.forward",
                                "kdlib.train:FrozenTeacher.forward")),
    ("train: student forward/backward/step", ("kdlib.train:train_one_epoch",)),
    ("validation and test: forward", ("kdlib.train:evaluate",)),
    ("validation: metrics", ("kdlib.predictions:validation_scores",
                             "kdlib.train:validation_scores")),
    ("checkpoints and model file", ("kdlib.runs:save_atomic",)),
    ("finish: metrics and files", ("kdlib.runs:finish_run",)),
)
"""A function is timed wherever kdlib bound it (its module and every `from ... import` of it)."""


# ---------------------------------------------------------------- 1. phases


def notebook_phases(notebooks_dir: Path) -> pd.DataFrame:
    """Rows notebook, phase, seconds from executed notebooks (papermill metadata): one row per
    notebook ('total'), per phase cell, and 'rest' (other cells, kernel start-up)."""
    rows = []
    for path in sorted(Path(notebooks_dir).glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        total = nb.metadata.get("papermill", {}).get("duration")
        if total is None:
            continue
        found = defaultdict(float)
        for cell in nb.cells:
            took = cell.metadata.get("papermill", {}).get("duration") or 0.0
            phase = next((p for p, pat in PHASES if re.search(pat, cell.source)), None)
            if cell.cell_type == "code" and phase:
                found[phase] += took
        rows.append({"notebook": path.stem, "phase": "total", "seconds": float(total)})
        rows += [{"notebook": path.stem, "phase": p, "seconds": s} for p, s in found.items()]
        rows.append({"notebook": path.stem, "phase": "rest (other cells, kernel start-up)",
                     "seconds": float(total) - sum(found.values())})
    return pd.DataFrame(rows, columns=["notebook", "phase", "seconds"])


# ---------------------------------------------------------------- 2. training from run folders


def run_timeline(runs_dir: Path) -> pd.DataFrame:
    """One row per finished run: run_id, model, distilled, start (config.yaml written), end
    (metrics.json written), epochs_s (history.csv time_s summed), epochs, worker (host:pid from
    env.json; empty for runs of code that did not record it)."""
    rows = []
    for folder in sorted(Path(runs_dir).iterdir()) if Path(runs_dir).is_dir() else []:
        files = [folder / n for n in ("config.yaml", "metrics.json", "history.csv")]
        if folder.name.startswith(".") or not all(f.is_file() for f in files):
            continue
        cfg = yaml.safe_load(files[0].read_text()) or {}
        hist = pd.read_csv(files[2])
        env = json.loads((folder / "env.json").read_text()) if (folder / "env.json").is_file() \
            else {}
        rows.append({"run_id": folder.name, "model": cfg.get("model"),
                     "distilled": bool(cfg.get("distiller")), "start": files[0].stat().st_mtime,
                     "end": files[1].stat().st_mtime,
                     "epochs_s": float(hist["time_s"].sum()) if "time_s" in hist else float("nan"),
                     "epochs": len(hist),
                     "worker": f"{env['hostname']}:{env['pid']}" if "pid" in env else ""})
    return pd.DataFrame(rows, columns=["run_id", "model", "distilled", "start", "end",
                                       "epochs_s", "epochs", "worker"])


def worker_tasks(timeline: pd.DataFrame) -> pd.DataFrame:
    """One row per task a worker ran: a run alone, or the runs one worker process trained
    together (kdlib.stacked: overlapping in time in the same process); columns worker, start,
    end, epochs_s (summed), runs. Runs without a worker are tasks of their own."""
    rows = []
    for worker, part in timeline.sort_values("start").groupby("worker", sort=False):
        for run in part.itertuples():
            if worker and rows and rows[-1]["worker"] == worker and run.start < rows[-1]["end"]:
                task = rows[-1]
                task.update(end=max(task["end"], run.end), epochs_s=task["epochs_s"] + run.epochs_s,
                            runs=task["runs"] + 1)
            else:
                rows.append({"worker": worker, "start": run.start, "end": run.end,
                             "epochs_s": run.epochs_s, "runs": 1})
    return pd.DataFrame(rows, columns=["worker", "start", "end", "epochs_s", "runs"])


def concurrency(timeline: pd.DataFrame) -> int:
    """The number of workers used: distinct recorded workers, else the largest number of tasks
    training at the same time."""
    if len(timeline) and (timeline["worker"] != "").all():
        return int(timeline["worker"].nunique())
    tasks = worker_tasks(timeline)
    events = sorted([(t, 1) for t in tasks["start"]] + [(t, -1) for t in tasks["end"]],
                    key=lambda e: (e[0], e[1]))
    now = best = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return max(best, 1)


PARTS_OF_GRID = ("training epochs (forward/backward, validation)",
                 "rest of each run (checkpoints, test predictions, files)",
                 "before a worker's first run (start-up, imports, loading)",
                 "between runs (data and teacher loading, waiting)",
                 "after a worker's last run (waiting for the others, the cell's rest)")


def training_parts(timeline: pd.DataFrame, windows: list[tuple[float, float]] | None = None,
                   workers: int | None = None) -> pd.DataFrame:
    """Worker-seconds of the training windows (the training cells' start and end; default: first
    run start to last run end) by part, with `workers` per window (default: the window's own, as
    each training cell starts its own). Tasks (`worker_tasks`) go to their recorded worker, else
    in start order to the worker that became free last before the task started."""
    windows = windows or [(float(timeline["start"].min()), float(timeline["end"].max()))]
    first, between, after = PARTS_OF_GRID[2:]
    parts = dict.fromkeys(PARTS_OF_GRID, 0.0)
    tasks = worker_tasks(timeline)
    total = 0.0
    for lo, hi in windows:
        now = tasks[(tasks["start"] >= lo) & (tasks["start"] <= hi)].sort_values("start")
        names = list(dict.fromkeys(w for w in now["worker"] if w))
        slots = max(workers or concurrency(now), len(names))
        total += slots * (hi - lo)
        free, started = [lo] * slots, [False] * slots
        for task in now.itertuples():
            if task.worker:
                w = names.index(task.worker)
            else:
                ready = [k for k in range(slots) if free[k] <= task.start] or list(range(slots))
                w = max(ready, key=lambda k: free[k])
            parts[between if started[w] else first] += max(task.start - free[w], 0.0)
            parts[PARTS_OF_GRID[0]] += task.epochs_s
            parts[PARTS_OF_GRID[1]] += task.end - task.start - task.epochs_s
            free[w], started[w] = task.end, True
        parts[after] += sum(max(hi - f, 0.0) if s else hi - lo for f, s in zip(free, started))
    out = pd.DataFrame({"part": list(parts), "worker_s": list(parts.values())})
    out["share"] = out["worker_s"] / total if total > 0 else float("nan")
    return out


def per_model(timeline: pd.DataFrame) -> pd.DataFrame:
    """Runs and mean seconds per run (epochs; start to end, shared out among the runs a worker
    trained together) per model and distilled or not."""
    together = [1 if not r.worker else int(((timeline["worker"] == r.worker)
                                            & (timeline["start"] < r.end)
                                            & (timeline["end"] > r.start)).sum())
                for r in timeline.itertuples()]
    t = timeline.assign(run_s=(timeline["end"] - timeline["start"]) / together)
    g = t.groupby(["model", "distilled"])
    return pd.DataFrame({"runs": g.size(), "epochs_s_per_run": g["epochs_s"].mean(),
                         "run_s_per_run": g["run_s"].mean()}).reset_index()


def training_windows(notebooks_dir: Path) -> list[tuple[float, float]]:
    """(start, end) epoch seconds of the training cells of the executed notebooks (papermill)."""
    out = []
    for path in sorted(Path(notebooks_dir).glob("[0-9][0-9]_*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            meta = cell.metadata.get("papermill", {})
            if cell.cell_type == "code" and re.search(dict(PHASES)["training"], cell.source) \
                    and meta.get("start_time") and meta.get("end_time"):
                out.append(tuple(pd.Timestamp(meta[k]).timestamp()
                                 for k in ("start_time", "end_time")))
    return out


# ---------------------------------------------------------------- 3. one run, instrumented


class Timers:
    """Wall time per label of the wrapped calls, exclusive of wrapped calls nested inside."""

    def __init__(self) -> None:
        self.own: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.stack: list[float] = []

    def wrap(self, label: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.stack.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                took = time.perf_counter() - start
                self.own[label] += took - self.stack.pop()
                self.calls[label] += 1
                if self.stack:
                    self.stack[-1] += took
        return timed


def _target(spec: str) -> tuple[Any, str] | None:
    """(object holding the attribute, attribute name) of "module:attr" or "module:Class.attr"."""
    module, _, attr = spec.partition(":")
    try:
        owner = importlib.import_module(module)
    except ImportError:
        return None
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part, None)
    return (owner, name) if owner is not None and hasattr(owner, name) else None


@contextlib.contextmanager
def instrumented(timers: Timers) -> Iterator[list[str]]:
    """Wrap the first existing target of each part of PARTS, in its class or in every kdlib
    module that holds it; yields the targets wrapped."""
    undo, used = [], []
    for label, candidates in PARTS:
        found = next((t for t in map(_target, candidates) if t is not None), None)
        if found is None:
            continue
        owner, name = found
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        wrapped = timers.wrap(label, original)
        holders = [owner] if isinstance(owner, type) else [
            m for k, m in list(sys.modules.items())
            if k.split(".")[0] == "kdlib" and getattr(m, name, None) is original]
        for holder in holders:
            setattr(holder, name, wrapped)
            undo.append((holder, name, original))
        used.append(f"{getattr(owner, '__name__', owner)}.{name}")
    try:
        yield used
    finally:
        for holder, name, original in reversed(undo):
            setattr(holder, name, original)


def warm_imports() -> None:
    """Import what a run imports, so that the timed parts are a worker's steady state (the
    imports are part of process_startup)."""
    for name in WORKER_IMPORTS:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def time_one_run(cfg: Any, runs_dir: Path) -> tuple[pd.DataFrame, float]:
    """Train `cfg` into runs_dir with timers; (part, seconds, calls) rows and the total."""
    import kdlib.train

    warm_imports()  # before wrapping: every module that binds a timed function is loaded
    timers = Timers()
    with instrumented(timers):
        start = time.perf_counter()
        kdlib.train.fit(cfg, runs_dir, progress=False)  # looked up here: the timed fit
        total = time.perf_counter() - start
    out = pd.DataFrame({"part": list(timers.own), "seconds": list(timers.own.values()),
                        "calls": [timers.calls[k] for k in timers.own]})
    return out.sort_values("seconds", ascending=False, ignore_index=True), total


def process_startup() -> float:
    """Seconds a fresh Python process takes to start and import what a run imports (a spawned
    worker's start-up)."""
    code = ("import contextlib, importlib\n"
            f"for name in {WORKER_IMPORTS!r}:\n"
            "    with contextlib.suppress(ImportError):\n"
            "        importlib.import_module(name)\n")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    return time.perf_counter() - start


def pick_run(runs_dir: Path, timeline: pd.DataFrame, run_id: str | None = None) -> str:
    """The run to instrument: `run_id`, else the distilled run whose epochs took the median time."""
    if run_id:
        return run_id
    pool = timeline[timeline["distilled"]] if timeline["distilled"].any() else timeline
    pool = pool.sort_values("epochs_s", ignore_index=True)
    return str(pool.loc[len(pool) // 2, "run_id"])


def retrain(runs_dir: Path, run_id: str) -> tuple[pd.DataFrame, float]:
    """Train run `run_id` of runs_dir again in a temporary folder (its teacher copied there)."""
    from kdlib.train import load_train_config

    cfg = load_train_config(runs_dir / run_id / "config.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.teacher:
            teacher = Path(cfg.teacher).name
            shutil.copytree(runs_dir / teacher, Path(tmp) / teacher)
        return time_one_run(cfg, Path(tmp))


# ---------------------------------------------------------------- printing


def _print(title: str, table: pd.DataFrame) -> None:
    print(f"\n== {title}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:9.2f}"))


def report(home: Path, profile: str, instrument: bool = True, run_id: str | None = None,
           workers: int | None = None) -> None:
    """Print the three tables for the profile's output under `home`."""
    runs_dir, nbs = home / "runs" / profile, home / "runs" / profile / "notebooks"
    phases = notebook_phases(nbs)
    if len(phases):
        total = phases.loc[phases["phase"] == "total", "seconds"].sum()
        _print(f"phases of {profile} ({nbs}): notebook chain {total:.1f} s", phases)
    else:
        print(f"no executed notebooks with papermill timings in {nbs}")
    timeline = run_timeline(runs_dir)
    if timeline.empty:
        print(f"no finished runs in {runs_dir}")
        return
    windows = training_windows(nbs)
    n = workers or concurrency(timeline)
    span = sum(hi - lo for lo, hi in windows) if windows else \
        timeline["end"].max() - timeline["start"].min()
    _print(f"training: {len(timeline)} runs on {n} worker process(es) in all, {span:.1f} s wall "
           f"({'the training cells' if windows else 'first run start to last run end'})",
           training_parts(timeline, windows, workers))
    _print("per model (a group's time is shared out equally among its runs, whatever their "
           "model: with the CPU launcher's mixed groups this is not a model's own cost)",
           per_model(timeline))
    if instrument:
        rid = pick_run(runs_dir, timeline, run_id)
        parts, total = retrain(runs_dir, rid)
        parts["share"] = parts["seconds"] / total
        _print(f"one run again, instrumented: {rid} ({total:.2f} s)", parts)
        print(f"\nworker process start-up (python, torch, kdlib): {process_startup():.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--home", help="output root (KDLIB_HOME); default: a temporary folder for a "
                                   "new run, the project root with --existing")
    ap.add_argument("--existing", action="store_true", help="profile runs/<profile> as it is")
    ap.add_argument("--no-instrument", action="store_true", help="skip the instrumented run")
    ap.add_argument("--run-id", help="the run to instrument (default: a median distilled run)")
    ap.add_argument("--workers", type=int, help="workers of the grid (default: from the runs)")
    args = ap.parse_args()
    if args.existing:
        from kdlib.paths import output_root

        home = Path(args.home).resolve() if args.home else output_root()
    else:
        home = Path(args.home or tempfile.mkdtemp(prefix=f"kdlib-{args.profile}-")).resolve()
        start = time.perf_counter()
        env = {**os.environ, "KDLIB_HOME": str(home)}
        subprocess.run([sys.executable, "-m", "kdlib", "run", "--profile", args.profile],
                       env=env, check=True)
        print(f"\n{args.profile} chain: {time.perf_counter() - start:.1f} s wall in {home}")
    os.environ["KDLIB_HOME"] = str(home)  # the runs' relative cache and splits paths
    report(home, args.profile, not args.no_instrument, args.run_id, args.workers)
    print(json.dumps({"home": str(home), "profile": args.profile}))


if __name__ == "__main__":
    main()

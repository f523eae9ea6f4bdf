"""Launcher speed: one run plan trained level by level (the order of the old `kdlib.grid.run_grid`:
every run of a dependency level, then wait for the whole level before the next) and by
`kdlib.launch`'s dependency-graph scheduler (a student starts as soon as its own teacher is
finished), each run alone (`group=1`) and with the runs that share their data trained together
(the default `group`, kdlib.stacked), on the same kind of local worker processes. Prints, for
each, the wall time and the
idle worker-seconds (workers x wall time minus the time the workers spent in runs: start-up,
and the waits the level barrier adds).

    python benchmarks/bench_launcher.py [--profile smoke] [--workers 2] [--folds 3] [--repeats 3]
                                        [-p epochs=3]
    # the demo's data and experiment (its runs last 5-30 s, where the barrier costs most):
    python benchmarks/bench_launcher.py --profile demo --subjects 40 --shape 96 96 32 \
        --image-size 40 --folds 5 --repeats 3

The data is a small synthetic dataset written under a temporary KDLIB_HOME; the plan is the
profile's experiment (with `-p` overrides of its settings) on --folds cross-validation folds. Measure on a quiet machine: other load
stretches both wall times and hides the difference (on this project's shared 2-core machine,
back-to-back runs of the same order differed by up to 2x); --repeats alternates the order and
prints the median of each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from kdlib.device import GROUP_SIZE
from kdlib.experiment import Experiment
from kdlib.launch import RunResult, TrainTask, launch, local_executor
from kdlib.plan import PlanEntry, make_plan, plan_levels
from kdlib.profiles import parse_overrides
from kdlib.workbook import build_cache, build_splits, data_settings, get_dataset, split_folds


def launch_by_level(entries: list[PlanEntry], runs_dir: Path, workers: int) -> dict[str, RunResult]:
    """The old order, kept only for this comparison: submit every run of a dependency level to
    the workers, wait for all of them, then the next level."""
    executor = local_executor(["cpu"] * workers, threads=1)
    results: dict[str, RunResult] = {}
    try:
        for rows in plan_levels(entries):
            futures = [executor.submit(TrainTask(entries[i].config.to_dict(), str(runs_dir)))
                       for i in rows]
            for f in futures:
                r = f.result()
                results[r.run_id] = r
    finally:
        executor.shutdown()
    return results


def by_graph(entries: list[PlanEntry], runs_dir: Path, workers: int, group: int = 1
             ) -> dict[str, RunResult]:
    """kdlib.launch on the same workers, at most `group` runs trained together."""
    executor = local_executor(["cpu"] * workers, threads=1)
    try:
        return launch(entries, runs_dir, executor, group=group, progress=False)
    finally:
        executor.shutdown()


def grouped(entries: list[PlanEntry], runs_dir: Path, workers: int) -> dict[str, RunResult]:
    """kdlib.launch with its default group size."""
    return by_graph(entries, runs_dir, workers, GROUP_SIZE)


def measure(name: str, fn: Callable[[list[PlanEntry], Path, int], dict[str, RunResult]],
            entries: list[PlanEntry], runs_dir: Path, workers: int) -> float:
    """Run `fn` and print its wall time, the time spent in runs and the idle worker-seconds."""
    start = time.time()
    results = fn(entries, runs_dir, workers)
    wall = time.time() - start
    failed = [r for r in results.values() if r.status != "trained"]
    tasks = {(r.worker, r.started, r.ended) for r in results.values() if r.started is not None}
    busy = sum(end - start for _, start, end in tasks)  # runs trained together count once
    print(f"{name:<22} wall {wall:7.1f} s   in runs {busy:7.1f} worker-s   idle "
          f"{workers * wall - busy:7.1f} worker-s   ({len(results)} runs, {len(failed)} failed)")
    return wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="smoke", help="whose experiment (default smoke)")
    p.add_argument("--workers", type=int, default=2, help="CPU worker processes (default 2)")
    p.add_argument("-p", "--param", action="append", metavar="KEY=VALUE",
                   help="override an experiment setting, e.g. -p epochs=1 -p 'ratios=[4]'")
    p.add_argument("--folds", type=int, default=3, help="cross-validation folds (default 3)")
    p.add_argument("--subjects", type=int, default=12, help="synthetic subjects per grade")
    p.add_argument("--shape", type=int, nargs=3, default=[64, 64, 40], help="volume shape")
    p.add_argument("--image-size", type=int, default=32, help="slice size in the cache")
    p.add_argument("--repeats", type=int, default=1,
                   help="measure each order this many times, alternating which goes first")
    p.add_argument("--orders", nargs="+", choices=["level", "graph", "grouped"],
                   default=["level", "graph", "grouped"],
                   help="which to measure, in this order (default all)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as home:
        os.environ["KDLIB_HOME"] = home
        get_dataset("bench", phantom={"n_hgg": args.subjects, "n_lgg": args.subjects,
                                      "shape": tuple(args.shape)}, progress=False)
        build_cache("bench", {"image_size": args.image_size}, progress=False)
        build_splits("bench", {"k_folds": args.folds})
        exp = Experiment.from_profile(args.profile, parse_overrides(args.param))
        entries = make_plan(exp.configs(**data_settings("bench"), **split_folds("bench")))
        levels = [len(r) for r in plan_levels(entries)]
        print(f"plan: {len(entries)} runs ({' then '.join(map(str, levels))} by level), "
              f"{exp.epochs} epochs, {args.workers} CPU workers of 1 thread, "
              f"{os.cpu_count()} cores")
        orders = [("level", "level by level (old)", launch_by_level),
                  ("graph", "graph, each run alone", by_graph),
                  ("grouped", f"graph, groups <= {GROUP_SIZE}", grouped)]
        orders = [next(o for o in orders if o[0] == key) for key in args.orders]  # in that order
        walls: dict[str, list[float]] = {key: [] for key, _, _ in orders}
        for i in range(args.repeats):
            for key, name, fn in orders[::-1] if i % 2 else orders:
                walls[key].append(measure(name, fn, entries, Path(home) / f"{key}{i}",
                                          args.workers))
        old = statistics.median(walls[orders[0][0]])
        print(f"median wall of {args.repeats} repeat(s), relative to the first: " + ", ".join(
            f"{name} {statistics.median(walls[key]):.1f} s "
            f"({statistics.median(walls[key]) / old:.2f})" for key, name, _ in orders))


if __name__ == "__main__":
    main()

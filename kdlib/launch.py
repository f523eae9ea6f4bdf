"""Train a run plan on any `concurrent.futures`-style executor, in dependency order.

`launch(entries, runs_dir, executor)` is a dependency-graph scheduler: a run is handed to the
executor as soon as the plan runs it depends on (its teacher) are finished, without waiting for
the rest of their level; with a pool of workers, the ready runs that others wait for go first,
then the larger groups, and at the end the last group is cut so that no worker waits while another
trains it. Runs that share their data (the baselines and distillers of one student on one fold;
on the launcher's own CPU workers, the students of every size) are trained together in one task
(`kdlib.stacked.fit_group`: one batch and one teacher pass for all). Executors: local worker
processes (`local_executor`: one pinned worker per listed device, or N single-threaded CPU
workers; long-lived, so a worker's caches serve many runs), this process (`InlineExecutor`), or Slurm through submitit (kdlib.slurm), whose preempted
or timed-out jobs are requeued by `TrainTask.checkpoint` and resume from the run's checkpoint.
A failed run (any exception, e.g. CUDA out of memory) is reported as that run's failure; the runs
that depend on it are skipped and the others go on.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import multiprocessing
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kdlib.device import GROUP_SIZE
from kdlib.errors import ConfigError, RunError
from kdlib.identity import run_id
from kdlib.plan import PlanEntry, make_plan
from kdlib.runs import is_finished
from kdlib.stacked import fit_group, group_configs
from kdlib.train import fit
from kdlib.train_config import TrainConfig, load_train_config

try:  # optional: pip install kdlib[cluster]
    from submitit.helpers import DelayedSubmission
except ImportError:  # pragma: no cover - exercised only without the extra
    DelayedSubmission = None

log = logging.getLogger(__name__)
_WORKER: dict[str, Any] = {"device": None}
WHY_NOT = {"failed": "failed", "skipped": "was skipped",
           "missing": "is neither in this launch nor finished"}  # set once per local worker process by _init_worker


@dataclass(frozen=True)
class RunResult:
    """What became of one run: status `trained`, `done` (finished before), `failed` or `skipped`
    (a run it depends on failed); error says why; started/ended are wall-clock seconds."""

    run_id: str
    status: str
    path: str | None = None
    error: str | None = None
    started: float | None = None
    ended: float | None = None
    worker: str = ""


@dataclass(frozen=True)
class TrainTask:
    """One run as a picklable callable: `fit(config, runs_dir)` in whichever process runs it.

    device: None = the worker's pinned device, else the config's; threads: torch threads to use
    (None = leave the process's setting). Exceptions become a `failed` RunResult.
    """

    config: dict[str, Any]
    runs_dir: str
    progress: bool = False
    device: str | None = None
    threads: int | None = None

    def __call__(self) -> RunResult:
        started, worker, rid = time.time(), _worker_name(), "?"
        try:
            cfg = _configured(self.config, self.device, self.threads)
            rid = run_id(cfg)
            path = fit(cfg, self.runs_dir, progress=self.progress)
        except Exception as err:  # noqa: BLE001 - reported as this run's failure, the rest go on
            return RunResult(rid, "failed", None, _failure(err), started, time.time(), worker)
        return RunResult(rid, "trained", str(path), None, started, time.time(), worker)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit calls this when the job is preempted or near its time limit: requeue the same
        task, which resumes from the run's last epoch checkpoint."""
        return DelayedSubmission(self, *args, **kwargs)


@dataclass(frozen=True)
class GroupTask:
    """Runs that share their data trained together (`kdlib.stacked.fit_group`) as a picklable
    callable; one RunResult per run, in the order of `configs`. Should the group fail before any
    of its runs finished (a run's teacher missing, out of memory), each run is trained alone, as
    a TrainTask, so that a failure is only that run's; if some finished (fit_group ends the
    others before it raises, e.g. for a loss gone non-finite), the unfinished ones are `failed`
    with the group's error rather than trained again."""

    configs: tuple[dict[str, Any], ...]
    runs_dir: str
    progress: bool = False
    device: str | None = None
    threads: int | None = None

    def __call__(self) -> list[RunResult]:
        started, worker, error = time.time(), _worker_name(), None
        alone = [TrainTask(c, self.runs_dir, self.progress, self.device, self.threads)
                 for c in self.configs]
        try:
            cfgs = [_configured(c, self.device, self.threads) for c in self.configs]
        except Exception:  # noqa: BLE001 - a bad config: each run reports its own
            return [task() for task in alone]
        try:
            fit_group(cfgs, self.runs_dir, progress=self.progress)
        except Exception as err:  # noqa: BLE001 - reported per run below
            error = _failure(err)
        ended, root = time.time(), Path(self.runs_dir)
        done = [is_finished(root / run_id(c)) for c in cfgs]
        if error and not any(done):
            log.warning("%d runs trained together failed (%s); training each alone",
                        len(cfgs), error)
            return [task() for task in alone]
        return [RunResult(run_id(c), "trained", str(root / run_id(c)), None, started, ended,
                          worker) if ok else
                RunResult(run_id(c), "failed", None, error, started, ended, worker)
                for c, ok in zip(cfgs, done)]

    checkpoint = TrainTask.checkpoint


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _configured(config: dict[str, Any], device: str | None, threads: int | None) -> TrainConfig:
    """A task's TrainConfig on its device (None: the worker's pinned one, else the config's),
    with this process's torch threads set to `threads` (None: left as they are)."""
    cfg = TrainConfig.from_dict(config)
    device = device or _WORKER["device"]
    if device:
        cfg = dataclasses.replace(cfg, device=device)
    if threads:
        torch.set_num_threads(threads)
    return cfg


def _failure(err: BaseException) -> str:
    """A failed task's error text; frees the CUDA cache (e.g. after out of memory) so that the
    worker's next task starts clean."""
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    return f"{type(err).__name__}: {err}"


class InlineExecutor(cf.Executor):
    """Runs each submitted call at once in this process (one device, no worker start-up)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        future: cf.Future = cf.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as err:  # noqa: BLE001 - delivered through the future, as executors do
            future.set_exception(err)
        return future


def _pin(device: str) -> tuple[str, str | None]:
    """(the device a pinned worker trains on, its CUDA_VISIBLE_DEVICES or None)."""
    if not device.startswith("cuda"):
        return device, None
    index = int(device.partition(":")[2] or 0)  # cuda:N is the N-th device this process sees
    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = old.split(",") if old else [str(i) for i in range(index + 1)]
    if index >= len(visible):
        raise RunError(f"device {device!r}: only {len(visible)} CUDA device(s) are visible "
                       f"(CUDA_VISIBLE_DEVICES={old!r})")
    return "cuda", visible[index]


def _init_worker(slots: Any, threads: int) -> None:
    """Start-up of a local worker process: take one device slot and pin the process to it."""
    device, visible = slots.get()
    if visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible  # before CUDA starts in this process
    _WORKER["device"] = device
    torch.set_num_threads(threads)


def local_executor(devices: Sequence[str], threads: int | None = None) -> cf.Executor:
    """One long-lived worker process per entry of `devices` (spawned; a device listed twice gets
    two workers): "cpu" workers use `threads` torch threads (default: the cores shared out), a
    "cuda:N" worker sees only GPU N. One device: an InlineExecutor on it."""
    if len(devices) == 1:
        return _InlineOn(devices[0])
    threads = threads or max(1, (os.cpu_count() or 1) // len(devices))
    ctx = multiprocessing.get_context("spawn")
    slots = ctx.Queue()
    for dev in devices:
        slots.put(_pin(dev))
    return cf.ProcessPoolExecutor(len(devices), mp_context=ctx, initializer=_init_worker,
                                  initargs=(slots, threads))


class _InlineOn(InlineExecutor):
    """InlineExecutor whose runs train on one given device."""

    def __init__(self, device: str) -> None:
        self.device = device

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        if isinstance(fn, (TrainTask, GroupTask)) and fn.device is None:
            fn = dataclasses.replace(fn, device=self.device)
        return super().submit(fn, *args, **kwargs)


def default_devices() -> list[str]:
    """Every CUDA device when there are several (one worker each), else none (this process)."""
    n = torch.cuda.device_count()
    return [f"cuda:{i}" for i in range(n)] if n > 1 else []


def _error_text(err: BaseException) -> str:
    if isinstance(err, BrokenProcessPool):
        return ("a worker process died without a result (e.g. killed for lack of memory); run "
                "again: finished runs are skipped, unfinished ones resume")
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"


def _outcomes(job: Any, rids: list[str]) -> list[RunResult]:
    """The RunResults of a finished job that trained the runs `rids` (all failed if it died)."""
    try:
        result = job.result()
    except Exception as err:  # noqa: BLE001 - a job that died or was cancelled
        stderr = getattr(getattr(job, "paths", None), "stderr", None)
        text = _error_text(err) + (f" (log: {stderr})" if stderr else "")
        return [RunResult(rid, "failed", error=text, ended=time.time()) for rid in rids]
    results = result if isinstance(result, list) else [result]
    if len(results) != len(rids) or not all(isinstance(r, RunResult) for r in results):
        raise RunError(f"runs {rids}: the executor returned {result!r:.200}, not one RunResult "
                       "per run; submit kdlib.launch.TrainTask or GroupTask objects")
    return [dataclasses.replace(r, run_id=rid) for r, rid in zip(results, rids)]


def _wait_any(running: dict[Any, str], poll_s: float) -> list[Any]:
    """The jobs among `running` that are done, waiting until there is at least one."""
    jobs = list(running)
    if all(isinstance(j, cf.Future) for j in jobs):
        return list(cf.wait(jobs, return_when=cf.FIRST_COMPLETED).done)
    while True:
        done = [j for j in jobs if j.done()]
        if done:
            return done
        time.sleep(poll_s)


def _submit(executor: Any, tasks: list[TrainTask | GroupTask]) -> list[Any]:
    """Submit tasks; a submitit executor gets them as one job array."""
    if len(tasks) > 1 and hasattr(executor, "submit_array"):
        return list(executor.submit_array(tasks))
    return [executor.submit(t) for t in tasks]


def _units(entries: list[PlanEntry], runs_dir: Path, group: int, mix_models: bool = False
           ) -> list[list[PlanEntry]]:
    """The plan cut into what one task trains, in plan order: with group > 1, the unfinished
    runs that can share their data in groups of at most `group` (kdlib.stacked.group_configs;
    mix_models: students of several architectures together), every other run alone."""
    todo = [e for e in entries if not is_finished(runs_dir / e.run_id)]
    if group <= 1 or len(todo) < 2:
        return [[e] for e in entries]
    by_id = {e.run_id: e for e in todo}
    units = [[by_id[run_id(c)] for c in g]
             for g in group_configs([e.config for e in todo], group, mix_models)]
    grouped = {e.run_id for u in units for e in u}
    first = {e.run_id: i for i, e in enumerate(entries)}
    units += [[e] for e in entries if e.run_id not in grouped]
    return sorted(units, key=lambda u: min(first[e.run_id] for e in u))


def _spread(ready: list[list[PlanEntry]], workers: int) -> list[list[PlanEntry]]:
    """The last units cut so that each of `workers` gets one: while there are fewer units than
    workers, the largest group is halved in place. Otherwise one worker trains the last group
    while the others wait; a run gives the same numbers in any group (kdlib.stacked)."""
    units = list(ready)
    while 0 < len(units) < workers:
        i = max(range(len(units)), key=lambda k: len(units[k]))
        if len(units[i]) < 2:
            break
        half = (len(units[i]) + 1) // 2
        units[i:i + 1] = [units[i][:half], units[i][half:]]
    return units


def summary(results: Mapping[str, RunResult]) -> str:
    """One line of counts per status, then one line per failed or skipped run."""
    counts = {s: sum(r.status == s for r in results.values())
              for s in ("trained", "done", "failed", "skipped")}
    lines = [", ".join(f"{n} {s}" for s, n in counts.items()) + f" (of {len(results)} runs)"]
    lines += [f"  {r.run_id}: {r.status}: {r.error}" for r in results.values()
              if r.status in ("failed", "skipped")]
    return "\n".join(lines)


def launch(entries: Iterable[PlanEntry], runs_dir: str | Path, executor: Any = None,
           devices: Sequence[str] | None = None, *, threads: int | None = None,
           slots: int | None = None, group: int = GROUP_SIZE, progress: bool = True,
           poll_s: float = 1.0, check: bool = True) -> dict[str, RunResult]:
    """Train every unfinished run of the plan `entries`, each as soon as its dependencies are
    finished; returns a RunResult per run id, in plan order.

    executor: anything with `submit(fn)` returning a future or a submitit job; None = a
    `local_executor(devices)` made and shut down here (devices None: `default_devices()`; empty
    or one device: this process). group: runs that share their data (one student architecture
    on one fold, ratio and seed: baselines and distillers; on CPU workers of this launch, the
    students of every architecture) are trained together, at most this many per task, by
    `kdlib.stacked.fit_group` (a GroupTask; the same numbers as alone, see there); 1 trains each
    run alone (a TrainTask). A group starts when all its members' teachers
    are finished. slots: at most this many tasks handed over at once (default: twice a process
    pool's workers, one queued behind each so that none waits for this loop; else no limit: a
    cluster queues them itself); the ready tasks that others wait for go first, so that students
    become ready early, then the larger groups. check: raise RunError with the `summary` when a
    run failed.
    """
    entries = list(entries)
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ConfigError(f"group={group!r} must be a whole number >= 1 (1: each run alone)")
    own = executor is None
    if own:
        devices = default_devices() if devices is None else list(devices)
        executor = local_executor(devices, threads) if devices else InlineExecutor()
    # CPU workers train a group's runs one after the other: its models may differ, and students
    # of several sizes then share each teacher pass
    mix_models = own and bool(devices) and all(d == "cpu" for d in devices)
    inline = isinstance(executor, InlineExecutor)
    workers = getattr(executor, "_max_workers", None)  # a ProcessPoolExecutor's
    slots = slots or (2 * workers if workers else None)
    needed_by = Counter(d for e in entries for d in e.depends_on)
    order = {e.run_id: i for i, e in enumerate(entries)}
    results: dict[str, RunResult] = {}
    waiting = dict(enumerate(_units(entries, runs_dir, group, mix_models)))
    ready: list[list[PlanEntry]] = []
    for d in {d for e in entries for d in e.depends_on} - set(order):  # a teacher not given
        results[d] = RunResult(d, "done" if is_finished(runs_dir / d) else "missing")
    running: dict[Any, list[str]] = {}
    spread = False  # the last groups were cut for the workers (once: halves are not cut again)
    bar = tqdm(total=len(entries), desc="runs", unit="run", disable=not progress)

    def settle(result: RunResult) -> None:
        results[result.run_id] = result
        bar.update()
        if result.status in ("failed", "skipped"):
            bar.write(f"{result.run_id}: {result.status}: {result.error}")

    def priority(unit: list[PlanEntry]) -> tuple[int, int, int]:
        """Runs others wait for first, then larger groups (the longest tasks first: Graham's
        LPT rule keeps the end of a launch short), then plan order."""
        return (-sum(needed_by[e.run_id] for e in unit), -len(unit),
                min(order[e.run_id] for e in unit))

    try:
        while waiting or ready or running:
            for key, unit in list(waiting.items()):
                for e in list(unit):
                    bad = [d for d in e.depends_on if d in results
                           and results[d].status in ("failed", "skipped", "missing")]
                    if bad:
                        unit.remove(e)
                        settle(RunResult(e.run_id, "skipped", error=f"needs run {bad[0]}, "
                                         f"which {WHY_NOT[results[bad[0]].status]}"))
                if all(d in results for e in unit for d in e.depends_on):
                    del waiting[key]
                    for e in [e for e in unit if is_finished(runs_dir / e.run_id)]:
                        unit.remove(e)
                        settle(RunResult(e.run_id, "done", str(runs_dir / e.run_id)))
                    if unit:
                        ready.append(unit)
            ready.sort(key=priority)
            if workers and not spread and not waiting and 0 < len(ready) < workers:
                ready, spread = _spread(ready, workers), True  # the launch's tail, cut once
            free = len(ready) if slots is None else max(0, slots - len(running))
            batch, ready = ready[:free], ready[free:]
            tasks = [_task(unit, runs_dir, progress and inline, threads) for unit in batch]
            try:
                jobs = _submit(executor, tasks)
            except BrokenProcessPool as err:
                for e in (e for unit in batch for e in unit):
                    settle(RunResult(e.run_id, "failed", error=_error_text(err)))
                continue
            running.update(zip(jobs, ([e.run_id for e in unit] for unit in batch)))
            if not running:
                continue
            for job in _wait_any(running, poll_s):
                for result in _outcomes(job, running.pop(job)):
                    settle(result)
    except BaseException:
        if own:
            _stop(executor)
        raise
    finally:
        bar.close()
    if own:  # every task is done: the workers exit (0.8 s of torch's teardown) while we go on
        executor.shutdown(wait=False)
    results = {e.run_id: results[e.run_id] for e in entries}  # without teachers not given
    if check and any(r.status in ("failed", "skipped") for r in results.values()):
        raise RunError(summary(results))
    return results


def _task(unit: list[PlanEntry], runs_dir: Path, progress: bool, threads: int | None
          ) -> TrainTask | GroupTask:
    """A TrainTask for one run, a GroupTask for several."""
    if len(unit) == 1:
        return TrainTask(unit[0].config.to_dict(), str(runs_dir), progress, threads=threads)
    return GroupTask(tuple(e.config.to_dict() for e in unit), str(runs_dir), progress,
                     threads=threads)


def _stop(executor: cf.Executor) -> None:
    """Shut a local executor down now: queued runs cancelled, worker processes ended (a run
    stopped mid-epoch resumes from its last checkpoint next time)."""
    processes = list(getattr(executor, "_processes", {}).values())  # ProcessPoolExecutor's
    executor.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        p.terminate()


def run_configs(configs: Iterable[TrainConfig | Mapping[str, Any]], runs_dir: str | Path,
                devices: Sequence[str] | None = None, progress: bool = True) -> list[Path]:
    """Plan and launch `configs` locally; the finished run folders in the order given (RunError
    listing every failure when one failed)."""
    configs = [load_train_config(c) for c in configs]
    results = launch(make_plan(configs), runs_dir, devices=devices, progress=progress)
    return [Path(results[run_id(c)].path) for c in configs]

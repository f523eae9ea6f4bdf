"""kdlib.launch: the dependency-graph scheduler (ordering with a hand-driven executor, failure
isolation), local worker processes, and submitit's DebugExecutor and LocalExecutor running a
reduced plan of the experiment to the same run folders and metrics, including a preempted job
requeued and a killed job resubmitted, both resuming from the run's checkpoint."""

from __future__ import annotations

import concurrent.futures as cf
import os
import queue
import signal
import threading
import time
from concurrent.futures.process import BrokenProcessPool

import psutil
import pytest
import submitit
import torch
from helpers_train import tiny_config, tiny_train_data

import kdlib.stacked
from kdlib import launch as L
from kdlib.errors import ConfigError, RunError
from kdlib.experiment import Experiment
from kdlib.identity import run_id
from kdlib.launch import GroupTask, RunResult, TrainTask, launch, summary
from kdlib.plan import make_plan
from kdlib.results import load_history, load_metrics
from kdlib.train import TrainConfig, fit

FAKE = ("data/c.h5", "runs/x/splits.csv")  # configs of the hand-driven tests: never trained


def cfg(*data, **over) -> TrainConfig:
    return TrainConfig.from_dict(tiny_config(*(data or FAKE), **over))


class HandExecutor:
    """Futures the test completes by hand; records the order in which runs are submitted."""

    def __init__(self) -> None:
        self.submitted: list[str] = []
        self.futures: dict[str, cf.Future] = {}
        self.cond = threading.Condition()

    def submit(self, task: TrainTask | GroupTask) -> cf.Future:
        configs = task.configs if isinstance(task, GroupTask) else [task.config]
        rid = "+".join(run_id(TrainConfig.from_dict(c)) for c in configs)
        with self.cond:
            self.submitted.append(rid)
            self.futures[rid] = cf.Future()
            self.cond.notify_all()
        return self.futures[rid]

    def wait_for(self, n: int) -> list[str]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.submitted) >= n, timeout=30), \
                self.submitted
            time.sleep(0.05)  # and nothing more comes
            return list(self.submitted)

    def finish(self, rid: str, status: str = "trained", error: str | None = None) -> None:
        self.futures[rid].set_result(RunResult(rid, status, None, error))


def in_thread(fn):
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(result=fn()), daemon=True)
    thread.start()
    return thread, out


@pytest.fixture
def grid():
    """Teachers t1, t2; their students s1, s2; a baseline b."""
    t1, t2 = cfg(model="cnn_s"), cfg(model="cnn_m")
    s1 = cfg(distiller="kd", teacher=run_id(t1))
    s2 = cfg(distiller="kd", teacher=run_id(t2))
    b = cfg(task_loss="focal")
    runs = {"t1": t1, "t2": t2, "s1": s1, "s2": s2, "b": b}
    return {k: (v, run_id(v)) for k, v in runs.items()}


def test_a_student_is_submitted_as_soon_as_its_teacher_finishes(grid, tmp_path):
    ids = {k: rid for k, (_, rid) in grid.items()}
    plan = make_plan([grid[k][0] for k in ("s1", "s2", "t1", "t2", "b")])
    ex = HandExecutor()
    thread, out = in_thread(lambda: launch(plan, tmp_path, ex, group=1, progress=False,
                                           poll_s=0.01))
    assert ex.wait_for(3) == [ids["t1"], ids["t2"], ids["b"]]  # every run without a teacher
    ex.finish(ids["t2"])
    # s2 goes while t1 still trains: no barrier at the end of the teachers' level
    assert ex.wait_for(4)[3] == ids["s2"] and not ex.futures[ids["t1"]].done()
    ex.finish(ids["s2"])
    ex.finish(ids["t1"])
    assert ex.wait_for(5)[4] == ids["s1"]
    ex.finish(ids["s1"])
    ex.finish(ids["b"])
    thread.join(30)
    assert list(out["result"]) == [e.run_id for e in plan]
    assert {r.status for r in out["result"].values()} == {"trained"}


def test_with_few_slots_the_runs_others_need_go_first(grid, tmp_path):
    """Two runs at a time (a pool of two workers): teachers before the baseline, and a student
    as soon as its teacher is done and a slot is free, while the other teacher still trains."""
    ids = {k: rid for k, (_, rid) in grid.items()}
    plan = make_plan([grid[k][0] for k in ("b", "s1", "s2", "t1", "t2")])
    assert [e.run_id for e in plan][:3] == [ids["b"], ids["t1"], ids["t2"]]
    ex = HandExecutor()
    thread, out = in_thread(lambda: launch(plan, tmp_path, ex, slots=2, group=1, progress=False,
                                           poll_s=0.01))
    assert ex.wait_for(2) == [ids["t1"], ids["t2"]]  # not b: s1 and s2 wait for the teachers
    ex.finish(ids["t2"])
    assert ex.wait_for(3)[2] == ids["b"]  # b before s2: the plan's order among equals
    ex.finish(ids["b"])
    assert ex.wait_for(4)[3] == ids["s2"] and not ex.futures[ids["t1"]].done()
    ex.finish(ids["t1"])
    assert ex.wait_for(5)[4] == ids["s1"]
    ex.finish(ids["s1"])
    ex.finish(ids["s2"])
    thread.join(30)
    assert {r.status for r in out["result"].values()} == {"trained"}


def test_runs_sharing_their_data_go_as_one_group_after_all_their_teachers(grid, tmp_path):
    ids = {k: rid for k, (_, rid) in grid.items()}
    plan = make_plan([grid[k][0] for k in ("s1", "s2", "t1", "t2", "b")])
    ex = HandExecutor()
    thread, out = in_thread(lambda: launch(plan, tmp_path, ex, progress=False, poll_s=0.01))
    assert ex.wait_for(2) == [ids["t1"], ids["t2"]]  # b waits with its group for the teachers
    ex.finish(ids["t2"])
    time.sleep(0.1)
    assert len(ex.submitted) == 2  # s1 still needs t1
    ex.finish(ids["t1"])
    students = [e.run_id for e in plan if e.run_id in (ids["s1"], ids["s2"], ids["b"])]
    key = "+".join(students)
    assert ex.wait_for(3)[2] == key  # one GroupTask, in plan order
    ex.futures[key].set_result([RunResult(rid, "trained") for rid in students])
    thread.join(30)
    assert [r.status for r in out["result"].values()] == ["trained"] * 5


class PoolHandExecutor(HandExecutor):
    _max_workers = 2  # seen by launch as a pool of two workers

    def shutdown(self, wait: bool = True, **kwargs) -> None:
        self.waited = wait


def test_the_last_group_is_shared_out_to_the_idle_workers(grid, tmp_path):
    """With a pool of two, the students' group (the last task of the launch) goes as two halves:
    one worker would otherwise train all three while the other waits."""
    ids = {k: rid for k, (_, rid) in grid.items()}
    plan = make_plan([grid[k][0] for k in ("s1", "s2", "t1", "t2", "b")])
    ex = PoolHandExecutor()
    thread, out = in_thread(lambda: launch(plan, tmp_path, ex, progress=False, poll_s=0.01))
    assert ex.wait_for(2) == [ids["t1"], ids["t2"]]
    ex.finish(ids["t1"])
    ex.finish(ids["t2"])
    students = [e.run_id for e in plan if e.run_id in (ids["s1"], ids["s2"], ids["b"])]
    halves = ["+".join(students[:2]), students[2]]
    assert ex.wait_for(4)[2:] == halves
    ex.futures[halves[0]].set_result([RunResult(rid, "trained") for rid in students[:2]])
    ex.finish(halves[1])
    thread.join(30)
    assert [r.status for r in out["result"].values()] == ["trained"] * 5


def test_the_tail_is_cut_once_not_again_when_slots_hold_a_half_back(grid, tmp_path):
    """One slot: the four students' group goes as two halves, one after the other; the half left
    waiting for the slot is not cut again."""
    b2 = cfg(task_loss="weighted_ce")
    plan = make_plan([*(grid[k][0] for k in ("s1", "s2", "t1", "t2", "b")), b2])
    ex = PoolHandExecutor()
    thread, out = in_thread(lambda: launch(plan, tmp_path, ex, slots=1, progress=False,
                                           poll_s=0.01))
    for n, rid in enumerate((grid["t1"][1], grid["t2"][1]), 1):
        assert ex.wait_for(n)[-1] == rid
        ex.finish(rid)
    first = ex.wait_for(3)[2]
    ex.futures[first].set_result([RunResult(rid, "trained") for rid in first.split("+")])
    second = ex.wait_for(4)[3]
    ex.futures[second].set_result([RunResult(rid, "trained") for rid in second.split("+")])
    thread.join(30)
    assert [len(k.split("+")) for k in (first, second)] == [2, 2]
    assert len(ex.submitted) == 4 and len(out["result"]) == 6


def test_spread_halves_the_largest_group_until_each_worker_has_one(grid):
    plan = {e.run_id: e for e in make_plan([v for v, _ in grid.values()])}
    a, b, c, d, e = plan.values()
    sizes = lambda units: [len(u) for u in units]
    assert sizes(L._spread([[a, b, c, d, e]], 2)) == [3, 2]
    assert sizes(L._spread([[a, b, c, d, e]], 4)) == [1, 1, 1, 2]
    assert sizes(L._spread([[a], [b, c, d]], 3)) == [1, 2, 1]
    assert sizes(L._spread([[a], [b, c]], 2)) == [1, 2]  # as many units as workers: kept
    assert sizes(L._spread([[a], [b]], 4)) == [1, 1]  # single runs cannot be cut
    assert L._spread([], 2) == []
    assert L._spread([[a, b, c, d, e]], 5)[0] == [a]  # halves keep the plan's order


def test_cpu_workers_train_students_of_several_models_in_one_group(grid, tmp_path, monkeypatch):
    """The launcher's own CPU workers: the cnn_s student joins the cnn_xs students' group (they
    share each batch and each teacher pass); not so on the devices of another executor."""
    ids = {k: rid for k, (_, rid) in grid.items()}
    s3 = cfg(model="cnn_s", distiller="kd", teacher=ids["t1"])
    plan = make_plan([*(grid[k][0] for k in ("s1", "s2", "t1", "t2", "b")), s3])
    students = {ids["s1"], ids["s2"], ids["b"], run_id(s3)}
    assert sorted(len(u) for u in L._units(plan, tmp_path, 8)) == [1, 1, 1, 3]
    mixed = L._units(plan, tmp_path, 8, mix_models=True)
    assert {e.run_id for u in mixed if len(u) == 4 for e in u} == students
    ex = PoolHandExecutor()
    monkeypatch.setattr(L, "local_executor", lambda devices, threads: ex)
    thread, out = in_thread(lambda: launch(plan, tmp_path, devices=["cpu", "cpu"], slots=4,
                                           progress=False, poll_s=0.01))
    for rid in ex.wait_for(2):
        ex.finish(rid)
    halves = ex.wait_for(4)[2:]  # the tail cut for the two workers: two halves of one group
    assert {rid for h in halves for rid in h.split("+")} == students
    for h in halves:
        ex.futures[h].set_result([RunResult(rid, "trained") for rid in h.split("+")])
    thread.join(30)
    assert {r.status for r in out["result"].values()} == {"trained"}
    assert ex.waited is False  # its own workers exit in the background once all is done


def test_larger_groups_go_first_among_runs_nobody_waits_for(tmp_path):
    small = cfg(fold=0)  # first in the plan
    large = [cfg(fold=1), cfg(fold=1, task_loss="focal"), cfg(fold=1, task_loss="weighted_ce")]
    plan = make_plan([small, *large])
    ex = HandExecutor()
    thread, out = in_thread(lambda: launch(plan, tmp_path, ex, progress=False, poll_s=0.01))
    first, second = ex.wait_for(2)
    assert first == "+".join(e.run_id for e in plan if e.run_id != run_id(small))
    assert second == run_id(small)
    ex.futures[first].set_result([RunResult(rid, "trained") for rid in first.split("+")])
    ex.finish(second)
    thread.join(30)
    assert {r.status for r in out["result"].values()} == {"trained"}


def test_groups_are_cut_to_the_group_size(grid, tmp_path):
    ids = {k: rid for k, (_, rid) in grid.items()}
    plan = make_plan([grid[k][0] for k in ("s1", "s2", "t1", "t2", "b")])
    units = L._units(plan, tmp_path, 2)
    assert sorted(map(len, units)) == [1, 1, 1, 2]  # t1, t2, and s1 s2 b in groups of <= 2
    assert {e.run_id for u in units if len(u) == 2 for e in u} < {ids["s1"], ids["s2"], ids["b"]}
    assert all(len(u) == 1 for u in L._units(plan, tmp_path, 1))
    (tmp_path / ids["b"]).mkdir()
    (tmp_path / ids["b"] / "metrics.json").write_text("{}")  # finished: never in a group
    assert [ids["b"]] in [[e.run_id for e in u] for u in L._units(plan, tmp_path, 8)]
    with pytest.raises(ConfigError, match="group=0 must be a whole number >= 1"):
        launch(plan, tmp_path, HandExecutor(), group=0)


def test_a_failed_group_trains_each_run_alone(tiny, tmp_path, caplog):
    """A run whose teacher is missing fails alone; the run grouped with it is trained; an
    executor that returns the wrong number of results is an error that names the runs."""
    good = cfg(*tiny["data"], epochs=1)
    orphan = cfg(*tiny["data"], epochs=1, distiller="kd", teacher="missing-run")
    results = GroupTask((good.to_dict(), orphan.to_dict()), str(tmp_path))()
    assert [(r.run_id, r.status) for r in results] == [(run_id(good), "trained"),
                                                       (run_id(orphan), "failed")]
    assert "teacher 'missing-run' not found" in results[1].error
    assert "2 runs trained together failed (RunError: teacher 'missing-run'" in caplog.text
    future = cf.Future()
    future.set_result([results[0]])
    with pytest.raises(RunError, match="not one RunResult per run"):
        L._outcomes(future, ["a", "b"])


def test_a_group_that_finished_some_runs_does_not_train_the_others_again(tiny, tmp_path,
                                                                         monkeypatch):
    """A loss gone non-finite in one run: fit_group finishes the other and raises; the run that
    failed is reported failed with that error, not trained a second time alone."""
    fits = []
    monkeypatch.setattr(L, "fit", lambda *a, **k: fits.append(a) or pytest.fail("trained again"))
    real = kdlib.stacked.build_criterion

    def build(task_loss, *args, **kw):
        crit = real(task_loss, *args, **kw)
        if task_loss != "focal":
            return crit
        return lambda zs, y, zt=None, epoch=0: {**crit(zs, y, zt, epoch=epoch),
                                               "loss": torch.tensor(float("nan"))}

    monkeypatch.setattr(kdlib.stacked, "build_criterion", build)
    ok, bad = cfg(*tiny["data"], epochs=1), cfg(*tiny["data"], epochs=1, task_loss="focal")
    results = GroupTask((ok.to_dict(), bad.to_dict()), str(tmp_path))()
    assert [(r.run_id, r.status) for r in results] == [(run_id(ok), "trained"),
                                                       (run_id(bad), "failed")]
    assert "RunError" in results[1].error and "nan" in results[1].error and not fits


def test_a_failure_skips_its_dependents_only(grid, tmp_path):
    ids = {k: rid for k, (_, rid) in grid.items()}
    (tmp_path / ids["b"]).mkdir()
    (tmp_path / ids["b"] / "metrics.json").write_text("{}")  # finished before: not submitted
    plan = make_plan([grid[k][0] for k in ("t1", "t2", "s1", "s2", "b")])
    ex = HandExecutor()
    thread, out = in_thread(lambda: launch(plan, tmp_path, ex, progress=False, poll_s=0.01,
                                           check=False))
    assert ex.wait_for(2) == [ids["t1"], ids["t2"]]
    ex.futures[ids["t1"]].set_exception(RuntimeError("CUDA out of memory.\nTried 2 GiB"))
    ex.finish(ids["t2"])
    assert ex.wait_for(3)[2] == ids["s2"]
    ex.finish(ids["s2"], "failed", "RunError: the loss became nan")
    thread.join(30)
    res = out["result"]
    assert {k: res[rid].status for k, rid in ids.items()} == {
        "t1": "failed", "t2": "trained", "s1": "skipped", "s2": "failed", "b": "done"}
    assert res[ids["t1"]].error == "RuntimeError: Tried 2 GiB"
    assert res[ids["s1"]].error == f"needs run {ids['t1']}, which failed"
    ex.futures.clear()
    for k in ("t2", "s2"):
        (tmp_path / ids[k]).mkdir()
        (tmp_path / ids[k] / "metrics.json").write_text("{}")
    again = launch(plan[3:], tmp_path, ex, progress=False, check=False)  # s1, s2 without teachers
    assert [r.status for r in again.values()] == ["skipped", "done"] and not ex.futures
    assert again[ids["s1"]].error == f"needs run {ids['t1']}, which is neither in this launch nor " \
        "finished"
    text = summary(res)
    assert text.splitlines()[0] == "1 trained, 1 done, 2 failed, 1 skipped (of 5 runs)"
    assert f"  {ids['s2']}: failed: RunError: the loss became nan" in text
    with pytest.raises(RunError) as err:  # check=True: the same summary as the error
        launch(plan, tmp_path, FailingExecutor(), progress=False)
    assert "0 trained, 3 done, 1 failed, 1 skipped" in str(err.value)  # t2, s2, b finished


class FailingExecutor:
    """An executor whose worker processes are gone."""

    def submit(self, task):
        raise BrokenProcessPool("gone")


def test_a_dead_worker_pool_fails_the_runs_with_advice(grid, tmp_path):
    plan = make_plan([grid["t1"][0], grid["s1"][0]])
    res = launch(plan, tmp_path, FailingExecutor(), progress=False, check=False)
    assert [r.status for r in res.values()] == ["failed", "skipped"]
    assert "worker process died" in res[plan[0].run_id].error
    future = cf.Future()
    future.set_exception(BrokenProcessPool("x"))
    assert "run again: finished runs are skipped" in L._outcomes(future, ["r"])[0].error


def test_train_task_reports_an_exception_as_the_runs_failure(tmp_path):
    bad = cfg(tmp_path / "missing.h5", tmp_path / "splits.csv")
    result = TrainTask(bad.to_dict(), str(tmp_path))()
    assert result.status == "failed" and result.run_id == run_id(bad)
    assert result.error.startswith("DataError: cache=") and "missing.h5" in result.error
    assert result.worker.endswith(f":{os.getpid()}") and result.ended >= result.started
    wrong = TrainTask({**bad.to_dict(), "epochs": 0}, str(tmp_path))()
    assert wrong.status == "failed" and "epochs=0" in wrong.error


def test_devices_are_pinned_one_per_worker(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert L._pin("cpu") == ("cpu", None)
    assert L._pin("cuda") == ("cuda", "0") and L._pin("cuda:2") == ("cuda", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert L._pin("cuda:1") == ("cuda", "6")  # the second device this process sees
    with pytest.raises(RunError, match=r"'cuda:2': only 2 CUDA device\(s\) are visible"):
        L._pin("cuda:2")
    slots = queue.Queue()
    slots.put(("cuda", "6"))
    threads = torch.get_num_threads()
    try:
        L._init_worker(slots, threads)  # what a worker process runs at its start
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "6" and L._WORKER["device"] == "cuda"
    finally:
        L._WORKER["device"] = None
    assert isinstance(L.local_executor(["cuda:0"]), L.InlineExecutor)  # one device: in-process
    if torch.cuda.device_count() < 2:
        assert L.default_devices() == []


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny data, a reduced plan of the experiment (a teacher, the student's CE baseline and its
    KD run, fold 0), and that plan trained by the launcher in this process (the reference)."""
    root = tmp_path_factory.mktemp("launch")
    cache, splits = tiny_train_data(root)
    exp = Experiment(modalities=("flair", "t1"), folds=(0,), ratios=(None,), epochs=2,
                     batch_size=8, teacher="cnn_s", student="cnn_xs", baseline_losses=("ce",),
                     distillers=("kd",), kd_task_losses=(), kd_original=False, grid_teachers=())
    plan = make_plan(exp.configs(str(cache), str(splits), [0, 1]))
    res = launch(plan, root / "inline", group=1, progress=False, threads=1)  # each run alone
    return {"root": root, "data": (cache, splits), "plan": plan, "reference": res}


def same_runs(a: dict[str, RunResult], b: dict[str, RunResult]) -> None:
    assert list(a) == list(b)
    for rid, ours in a.items():
        assert ours.status == b[rid].status == "trained"
        assert load_metrics(ours.path) == load_metrics(b[rid].path), rid


def test_local_worker_processes_match_this_process(tiny, tmp_path):
    res = launch(tiny["plan"], tmp_path, devices=["cpu", "cpu"], threads=1, progress=False)
    same_runs(res, tiny["reference"])
    workers = {r.worker for r in res.values()}
    assert len(workers) <= 2 and f":{os.getpid()}" not in " ".join(workers)  # 3 runs, 2 workers
    assert {r.worker for r in tiny["reference"].values()} == {next(iter(
        tiny["reference"].values())).worker}  # inline: all in this process
    again = launch(tiny["plan"], tmp_path, devices=["cpu", "cpu"], progress=False)
    assert {r.status for r in again.values()} == {"done"}


def test_submitit_debug_executor_gives_the_same_runs(tiny, tmp_path):
    ex = submitit.DebugExecutor(tmp_path / "submitit")
    res = launch(tiny["plan"], tmp_path / "runs", ex, threads=1, progress=False, poll_s=0.01)
    same_runs(res, tiny["reference"])


@pytest.mark.slow
def test_submitit_local_executor_gives_the_same_runs(tiny, tmp_path):
    ex = submitit.LocalExecutor(tmp_path / "submitit")
    ex.update_parameters(timeout_min=30)
    res = launch(tiny["plan"], tmp_path / "runs", ex, threads=1, progress=False, poll_s=0.2)
    same_runs(res, tiny["reference"])
    assert all(r.worker.split(":")[1] != str(os.getpid()) for r in res.values())


@pytest.fixture(scope="module")
def long_run(tiny):
    """A run long enough to be stopped mid-way, and its straight (uninterrupted) result."""
    config = TrainConfig.from_dict(tiny_config(*tiny["data"], epochs=40))
    torch.set_num_threads(1)
    return config, fit(config, tiny["root"] / "straight", progress=False)


def _started(job, ckpt, timeout=600) -> list[dict]:
    """Wait for the job's first epoch checkpoint; the history it holds."""
    deadline = time.monotonic() + timeout
    while not ckpt.is_file():
        assert time.monotonic() < deadline and not job.done(), job.stderr()
        time.sleep(0.02)
    return torch.load(ckpt, weights_only=True)["state"]["history"]


def _resumed(final, early, straight) -> None:
    """The run finished with the straight run's numbers, and kept the epochs trained before it
    was stopped (their measured times included: it resumed rather than restarted)."""
    assert 1 <= len(early) < 40
    hist = load_history(final)
    assert hist["time_s"].tolist()[:len(early)] == [row["time_s"] for row in early]
    assert load_metrics(final) == load_metrics(straight)
    assert hist.drop(columns="time_s").equals(load_history(straight).drop(columns="time_s"))


def _submitted(config, tmp_path):
    """The run as a submitit LocalExecutor job, once its first epoch checkpoint is written:
    (executor, job, the job's Python process, the history in that checkpoint)."""
    ex = submitit.LocalExecutor(tmp_path / "submitit")
    ex.update_parameters(timeout_min=30)
    job = ex.submit(TrainTask(config.to_dict(), str(tmp_path / "runs"), threads=1))
    early = _started(job, tmp_path / "runs" / f".tmp-{run_id(config)}" / "checkpoint.pt")
    return ex, job, psutil.Process(job._process.pid).children()[0], early


@pytest.mark.slow
def test_a_preempted_submitit_job_is_requeued_and_resumes(long_run, tmp_path):
    config, straight = long_run
    runs = tmp_path / "runs"
    _, job, task, early = _submitted(config, tmp_path)
    task.send_signal(signal.SIGUSR2)  # how Slurm (and submitit) announce preemption
    result = job.result()
    assert result.status == "trained", result.error
    assert "Requeued job" in job.stderr() or "Requeued job" in job.stdout()
    _resumed(runs / run_id(config), early, straight)


@pytest.mark.slow
def test_a_killed_job_resubmitted_resumes(long_run, tmp_path):
    config, straight = long_run
    runs, tmp = tmp_path / "runs", tmp_path / "runs" / f".tmp-{run_id(config)}"
    ex, job, task, early = _submitted(config, tmp_path)
    task.send_signal(signal.SIGKILL)  # killed mid-run at once (a cancel may come too late)
    deadline = time.monotonic() + 120
    while not job.done():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert (tmp / "checkpoint.pt").is_file() and not (runs / run_id(config)).exists()
    res = launch(make_plan([config]), runs, ex, threads=1, progress=False, poll_s=0.2)
    assert res[run_id(config)].status == "trained"
    _resumed(runs / run_id(config), early, straight)

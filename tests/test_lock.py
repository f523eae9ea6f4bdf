"""kdlib.lock: one holder at a time (two real processes), bounded waits that name the holder,
locks of killed processes taken over, and the fallback for file systems without flock."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from helpers_train import tiny_config, tiny_train_data

from kdlib import lock
from kdlib.errors import RunError
from kdlib.identity import run_id
from kdlib.lock import lock_path, read_holder, run_lock
from kdlib.results import load_history, load_metrics, load_predictions
from kdlib.runs import RUN_FILES
from kdlib.train import TrainConfig, fit

ROOT = Path(__file__).resolve().parent.parent
HOLD = """
import sys, time
from kdlib.lock import run_lock
with run_lock(sys.argv[1], "r1", wait_s=60):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""
TURNS = """
import os, sys, time
from kdlib.lock import run_lock
for _ in range(4):
    with run_lock(sys.argv[1], "r1", wait_s=60, poll_s=0.01):
        with open(sys.argv[2], "a") as f:
            f.write(f"in {os.getpid()}\\n")
        time.sleep(0.05)
        with open(sys.argv[2], "a") as f:
            f.write(f"out {os.getpid()}\\n")
"""


def python(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, text=True,
                            stdout=subprocess.PIPE)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_the_lock_file_names_its_holder_and_goes_away(tmp_path):
    with run_lock(tmp_path / "runs", "r1") as path:
        assert path == lock_path(tmp_path / "runs", "r1") == tmp_path / "runs" / ".lock-r1"
        holder = read_holder(path)
        assert holder["pid"] == str(os.getpid()) and holder["host"] == socket.gethostname()
        assert holder["since"].endswith("+00:00")
    assert not path.exists()
    with run_lock(tmp_path / "runs", "r1"):  # free again
        pass


def test_a_second_holder_waits_then_stops_naming_the_first(tmp_path, monkeypatch):
    with run_lock(tmp_path, "r1"):
        start = time.monotonic()
        with pytest.raises(RunError) as err, run_lock(tmp_path, "r1", wait_s=0.3, poll_s=0.05):
            pass
        assert 0.3 <= time.monotonic() - start < 5
        msg = str(err.value)
        assert f"run r1 is being trained by pid {os.getpid()} on host {socket.gethostname()}" in msg
        assert "KDLIB_LOCK_WAIT_S" in msg and str(tmp_path / ".lock-r1") in msg
        monkeypatch.setenv(lock.WAIT_ENV, "0.1")
        with pytest.raises(RunError, match=r"waited 0.\d s"), run_lock(tmp_path, "r1"):
            pass
        with run_lock(tmp_path, "other-run", wait_s=0):  # another run is not blocked
            pass
    monkeypatch.setenv(lock.WAIT_ENV, "soon")
    with pytest.raises(RunError, match=r"KDLIB_LOCK_WAIT_S='soon' must be a number"), \
            run_lock(tmp_path, "r1"):
        pass


def test_a_waiter_gets_the_lock_when_the_holder_finishes(tmp_path):
    holder = python(HOLD, str(tmp_path), "1.0")
    assert holder.stdout.readline().strip() == "locked"
    start = time.monotonic()
    with run_lock(tmp_path, "r1", wait_s=60, poll_s=0.05) as path:
        assert time.monotonic() - start > 0.2  # it waited for the holder
        assert read_holder(path)["pid"] == str(os.getpid())
    assert holder.wait(60) == 0


def test_two_processes_never_hold_it_together(tmp_path):
    log = tmp_path / "log.txt"
    procs = [python(TURNS, str(tmp_path), str(log)) for _ in range(2)]
    assert [p.wait(120) for p in procs] == [0, 0]
    lines = log.read_text().splitlines()
    assert len(lines) == 16
    for enter, leave in zip(lines[::2], lines[1::2]):  # every "in" is followed by its own "out"
        assert enter.startswith("in ") and leave == "out " + enter[3:]
    assert {line.split()[1] for line in lines} == {str(p.pid) for p in procs}


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path, capfd):
    holder = python(HOLD, str(tmp_path), "60")
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)
    holder.wait(30)
    path = lock_path(tmp_path, "r1")
    assert read_holder(path)["pid"] == str(holder.pid)  # the file outlives its process
    with run_lock(tmp_path, "r1", wait_s=0):  # but not its lock
        assert read_holder(path)["pid"] == str(os.getpid())
    err = capfd.readouterr().err
    assert f"run r1: taking over the lock left by pid {holder.pid}" in err


@pytest.fixture
def no_flock(monkeypatch):
    """A file system without flock (some NFS mounts)."""
    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(lock.fcntl, "flock", refuse)


def test_without_flock_an_exclusive_file_does_the_job(tmp_path, no_flock, capfd):
    with run_lock(tmp_path, "r1") as path:
        assert path.name == ".lockfile-r1" and read_holder(path)["pid"] == str(os.getpid())
        assert not lock_path(tmp_path, "r1").exists()
        with pytest.raises(RunError, match="being trained by pid"), \
                run_lock(tmp_path, "r1", wait_s=0.2, poll_s=0.05):
            pass
    assert not path.exists()
    # a leftover of a dead process on this host is taken over
    path.write_text(f"pid {dead_pid()} host {socket.gethostname()} since 2024-01-01T00:00:00\n")
    with run_lock(tmp_path, "r1", wait_s=0):
        assert read_holder(path)["pid"] == str(os.getpid())
    assert "taking over the lock left by pid" in capfd.readouterr().err
    # one of another host cannot be checked: wait, then say which file to delete
    path.write_text("pid 1 host some-other-node since 2024-01-01T00:00:00\n")
    with pytest.raises(RunError, match=r"pid 1 on host some-other-node.*delete .*\.lockfile-r1"), \
            run_lock(tmp_path, "r1", wait_s=0.1, poll_s=0.05):
        pass


@pytest.mark.slow
def test_two_train_processes_on_one_run_do_not_corrupt_it(tmp_path):
    """`fit` holds the run's lock: the second `kdlib train` waits, then finds the run finished."""
    cache, splits = tiny_train_data(tmp_path / "data")
    cfg = tiny_config(cache, splits, epochs=20)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    runs = tmp_path / "runs"
    rid = run_id(TrainConfig.from_dict(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    cmd = [sys.executable, "-m", "kdlib", "train", "--config", str(tmp_path / "run.yaml"),
           "--runs-dir", str(runs)]

    def start() -> subprocess.Popen:
        return subprocess.Popen(cmd, env=env, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)

    first = start()
    deadline = time.monotonic() + 300
    while not lock_path(runs, rid).exists() and first.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    second = start()  # started while the first trains
    outs = [p.communicate(timeout=600) for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outs
    assert [out.strip().splitlines()[-1] for out, _ in outs] == [str(runs / rid)] * 2
    assert sum(rid in err for _, err in outs) == 1  # one of them trained (its progress bar)
    assert sorted(p.name for p in runs.iterdir()) == [rid]  # no .tmp-* or .lock-* left
    assert sorted(p.name for p in (runs / rid).iterdir()) == sorted(RUN_FILES)
    assert load_history(runs / rid)["epoch"].tolist() == list(range(1, 21))
    reference = fit(TrainConfig.from_dict(cfg), tmp_path / "ref", progress=False)
    assert load_metrics(runs / rid) == load_metrics(reference)
    pd.testing.assert_frame_equal(load_predictions(runs / rid), load_predictions(reference))

    # a process that cannot get the lock in time stops with a message naming the holder
    other = {**cfg, "seed": 1}
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    cmd[5] = str(tmp_path / "other.yaml")
    with run_lock(runs, run_id(TrainConfig.from_dict(other))):
        res = subprocess.run(cmd, env={**env, lock.WAIT_ENV: "0.5"}, capture_output=True,
                             text=True, timeout=600, check=False)
    assert res.returncode == 2
    assert res.stderr.startswith("kdlib train: error: run ") and \
        f"is being trained by pid {os.getpid()} on host {socket.gethostname()}" in res.stderr

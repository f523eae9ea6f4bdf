"""kdlib.data.processes: liveness of process ids and removal of stale temporary files."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from kdlib.data.processes import pid_alive, remove_stale_temps, temp_name


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_pid_alive():
    assert pid_alive(os.getpid())
    assert not pid_alive(_dead_pid())
    assert not pid_alive(0) and not pid_alive(-5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="zombies are read from /proc")
def test_a_zombie_is_dead():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while pid_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(proc.pid)  # exited, not reaped yet: a zombie
        os.kill(proc.pid, 0)  # the id still exists
    finally:
        proc.wait()


def test_temp_name_holds_host_and_pid(tmp_path):
    tmp = temp_name(tmp_path / "cache_0123456789ab.h5")
    assert tmp.name == f"cache_0123456789ab.h5.tmp-{socket.gethostname()}-{os.getpid()}"


def test_remove_stale_temps_only_of_dead_local_processes(tmp_path, caplog):
    host, dead = socket.gethostname(), _dead_pid()
    names = {
        "dead": f"cache_0123456789ab.h5.tmp-{host}-{dead}",
        "dead_csv": f"cache_0123456789ab.csv.tmp-{host}-{dead}",
        "old_format": f"cache_0123456789ab.h5.tmp-{dead}",
        "alive": temp_name(tmp_path / "cache_0123456789ab.h5").name,
        "other_host": f"cache_0123456789ab.h5.tmp-not-{host}-{dead}",
        "other_file": f"splits.csv.tmp-{host}-{dead}",
        "final": "cache_0123456789ab.h5",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"x" * 1000)
    removed = remove_stale_temps(tmp_path, "cache_*")
    assert sorted(p.name for p in removed) == sorted(names[k] for k in ("dead", "dead_csv",
                                                                        "old_format"))
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(names[k] for k in ("alive", "other_host", "other_file", "final"))
    assert sum("left by a build that was killed" in m for m in caplog.messages) == 3
    assert remove_stale_temps(tmp_path / "absent", "cache_*") == []

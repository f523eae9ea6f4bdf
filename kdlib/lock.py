"""The run lock: one process at a time trains a run.

`run_lock(runs_dir, run_id)` holds an exclusive `fcntl.flock` on `runs_dir/.lock-<run_id>` (next
to the run's `.tmp-<run_id>` folder) with the holder's pid, host and start time written in it. A
second process waits (bounded) and then stops with a message naming the holder. The kernel drops
a flock when its process dies, so a killed run never blocks the next one; the file it leaves
behind is taken over. Where the file system has no flock (some NFS mounts), an exclusively
created file does the same job, and a leftover one is taken over when its process, on this host,
is gone.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from kdlib.errors import RunError

WAIT_ENV = "KDLIB_LOCK_WAIT_S"
"""Environment variable: seconds a process waits for a run that another process trains."""

DEFAULT_WAIT_S = 60.0
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS)


def lock_path(runs_dir: str | Path, rid: str) -> Path:
    """The lock file of run `rid`."""
    return Path(runs_dir) / f".lock-{rid}"


def _wait_s() -> float:
    value = os.environ.get(WAIT_ENV, "")
    try:
        return float(value) if value else DEFAULT_WAIT_S
    except ValueError:
        raise RunError(f"{WAIT_ENV}={value!r} must be a number of seconds") from None


def _holder_text() -> str:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return f"pid {os.getpid()} host {socket.gethostname()} since {now}\n"


def read_holder(path: str | Path) -> dict[str, str]:
    """The pid, host and start time written in a lock file ({} when empty or unreadable)."""
    try:
        words = Path(path).read_text().split()
    except OSError:
        return {}
    return dict(zip(words[::2], words[1::2]))


def _alive_here(holder: dict[str, str]) -> bool | None:
    """Whether the holder process still runs: None when it ran on another host (unknown)."""
    if holder.get("host") != socket.gethostname() or not holder.get("pid", "").isdigit():
        return None
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _busy(rid: str, path: Path, holder: dict[str, str], waited: float) -> RunError:
    who = (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since "
           f"{holder.get('since', '?')}") if holder else "another process"
    return RunError(f"run {rid} is being trained by {who} (lock {path}); waited {waited:g} s. Wait "
                    f"for it to finish and run again (finished runs are skipped), or set {WAIT_ENV} "
                    "to wait longer. If that process is gone and its machine no longer holds the "
                    f"lock (e.g. a crashed node on NFS), delete {path}")


def _took_over(rid: str, holder: dict[str, str]) -> None:
    if holder and holder.get("pid") != str(os.getpid()):
        print(f"run {rid}: taking over the lock left by pid {holder.get('pid')} on "
              f"{holder.get('host')} (no longer running); resuming from its checkpoint if any",
              file=sys.stderr)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


@contextmanager
def run_lock(runs_dir: str | Path, rid: str, wait_s: float | None = None,
             poll_s: float = 0.2) -> Iterator[Path]:
    """Hold the exclusive lock of run `rid` in `runs_dir` for the `with` block; wait up to
    `wait_s` seconds (default $KDLIB_LOCK_WAIT_S or 60) for another holder, then RunError."""
    path = lock_path(runs_dir, rid)
    path.parent.mkdir(parents=True, exist_ok=True)
    wait = _wait_s() if wait_s is None else wait_s
    start = time.monotonic()
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
        except OSError as err:
            os.close(fd)
            if err.errno not in NO_FLOCK:
                raise
            path.unlink(missing_ok=True)  # never locked on this file system
            with _file_lock(path.with_name(f".lockfile-{rid}"), rid, wait, poll_s) as held:
                yield held
            return
        else:
            if _same_file(fd, path):  # not a file that its releasing holder just removed
                break
            os.close(fd)
            continue
        waited = time.monotonic() - start
        if waited >= wait:
            raise _busy(rid, path, read_holder(path), round(waited, 1))
        time.sleep(poll_s)
    try:
        _took_over(rid, read_holder(path))
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_text().encode(), 0)
        yield path
    finally:
        if _same_file(fd, path):
            path.unlink()  # while still locked: a waiter that opened it retries on the new file
        os.close(fd)


@contextmanager
def _file_lock(path: Path, rid: str, wait: float, poll_s: float) -> Iterator[Path]:
    """The same lock without flock: a file created exclusively; a leftover of a dead process on
    this host is taken over."""
    start = time.monotonic()
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            holder = read_holder(path)
            if holder and _alive_here(holder) is False:
                _took_over(rid, holder)
                path.unlink(missing_ok=True)
                continue
            waited = time.monotonic() - start
            if waited >= wait:
                raise _busy(rid, path, holder, round(waited, 1)) from None
            time.sleep(poll_s)
    try:
        os.write(fd, _holder_text().encode())
        yield path
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)

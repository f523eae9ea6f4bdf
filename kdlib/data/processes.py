"""Process hygiene for the data steps: pool workers that exit with their parent, and temporary
files of killed builds removed at the next build."""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.5
"""How often a pool worker checks that its parent is still alive."""
_TMP_RE = re.compile(r"^(?P<final>.+)\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)$")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (any user's; a zombie counts as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    stat = Path(f"/proc/{pid}/stat")  # Linux: state is the field after "(command)"
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:  # re-parented: the parent died
            os._exit(1)
        time.sleep(WATCH_INTERVAL_S)


def exit_with_parent() -> None:
    """Pool-worker initializer: exit as soon as the parent process dies (a killed notebook or
    `kdlib prepare` must not leave its workers computing for minutes)."""
    watcher = threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True,
                               name="exit-with-parent")
    watcher.start()


def temp_name(final: Path) -> Path:
    """Where a process writes `final` before renaming it: `<name>.tmp-<host>-<pid>`."""
    return final.with_name(f"{final.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def remove_stale_temps(folder: Path, pattern: str) -> list[Path]:
    """Delete temporary files `<pattern>.tmp-<host>-<pid>` in `folder` whose writer, a process of
    this machine, is dead; files of live processes and of other hosts stay. Returns the removed."""
    host, removed = socket.gethostname(), []
    for path in sorted(Path(folder).glob(f"{pattern}.tmp-*")) if Path(folder).is_dir() else []:
        m = _TMP_RE.match(path.name)
        if not m or m["host"] not in (None, host) or pid_alive(int(m["pid"])):
            continue
        size = path.stat().st_size if path.is_file() else 0
        path.unlink(missing_ok=True)
        removed.append(path)
        log.warning("removed %s (%.1f MB) left by a build that was killed (process %s)",
                    path, size / 1e6, m["pid"])
    return removed

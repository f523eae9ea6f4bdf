"""Run folders: where a run lives, atomic writes, resume checks and the environment record.

A run lives in `runs_dir/<run_id>` (finished, never rewritten) or `runs_dir/.tmp-<run_id>` (in
progress, with `checkpoint.pt`). The id is kdlib.identity.run_id; kdlib.results reads finished
folders back as one table; kdlib.grid trains grids of runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import torch

import kdlib
from kdlib.config import replace_atomically, write_text_atomic
from kdlib.errors import RunError
from kdlib.paths import resolve

RUN_FILES: tuple[str, ...] = ("config.yaml", "history.csv", "predictions.csv", "metrics.json",
                              "model.pt", "env.json")


def is_finished(folder: Path) -> bool:
    """A finished run folder: renamed from .tmp-*, holding metrics.json."""
    return (folder.is_dir() and not folder.name.startswith(".")
            and (folder / "metrics.json").is_file())


def teacher_dir(teacher: str, runs_dir: Path) -> Path:
    """The finished run folder of `teacher`: a run id in `runs_dir`, or a path to a run folder."""
    name = Path(teacher).name
    candidates = [Path(runs_dir) / teacher] if len(Path(teacher).parts) == 1 else []
    candidates.append(resolve(teacher))
    for folder in candidates:
        if is_finished(folder):
            return folder
    if (Path(runs_dir) / f".tmp-{name}").exists():
        raise RunError(f"teacher run {name} is unfinished ({Path(runs_dir) / ('.tmp-' + name)}); "
                       "finish it first (fit the teacher's config again to resume it)")
    raise RunError(f"teacher {teacher!r} not found: no finished run folder at "
                   f"{[str(c) for c in candidates]}; train the teacher first (run_grid trains "
                   "teachers before their students) or fix the path")


def data_fingerprint(cache_h5: Path, splits_csv: Path) -> dict[str, Any]:
    """Hashes of the slice table and the splits file plus the cache size: a resumed run must see
    the same data."""
    def sha(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]

    return {"slice_table": sha(Path(cache_h5).with_suffix(".csv")), "splits": sha(Path(splits_csv)),
            "cache_bytes": Path(cache_h5).stat().st_size}


def execution_identity(device: torch.device) -> dict[str, Any]:
    """What of the device changes a run's numbers: its type, whether it trains under bf16
    autocast (CUDA), and on the CPU the torch thread count (it changes how sums are split)."""
    return {"device_type": device.type, "autocast": device.type == "cuda",
            "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None}


def _describe(execution: Mapping[str, Any]) -> str:
    if "autocast" not in execution:
        return "a device it did not record (an older kdlib)"
    return f"{execution['device_type']} ({'bf16 autocast' if execution['autocast'] else 'float32'})"


def check_resume(current: dict[str, Any], saved: dict[str, Any], folder: Path) -> None:
    """RunError naming the settings (or data files) that differ from the checkpoint's, or when the
    run would continue with(out) autocast after starting without (with) it, or on the CPU with
    another thread count."""
    now, then = current.get("execution", {}), saved.get("execution", {})
    if now.get("autocast") != then.get("autocast"):
        raise RunError(f"cannot resume {folder}: it was started on {_describe(then)} and would "
                       f"continue on {_describe(now)}, mixing precisions in one run; resume it on "
                       f"the same kind of device (set device accordingly) or delete {folder} to "
                       "start over")
    if "cpu_threads" in then and now.get("cpu_threads") != then["cpu_threads"]:
        raise RunError(f"cannot resume {folder}: it was started with {then['cpu_threads']} CPU "
                       f"thread(s) and would continue with {now.get('cpu_threads')}, which gives "
                       "numbers matching neither; resume it with the same count (torch."
                       f"set_num_threads({then['cpu_threads']}), or the same workers setting of "
                       f"the grid) or delete {folder} to start over")
    diffs = []
    for part in ("config", "data"):
        now, then = current[part], saved.get(part, {})
        diffs += [f"{k}: {then.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(now) | set(then))
                  if now.get(k) != then.get(k)]
    if diffs:
        raise RunError(f"cannot resume {folder}: the settings or data changed since it started "
                       f"({'; '.join(diffs)}); delete the folder to start over")


def save_atomic(path: Path, obj: Any) -> None:
    """torch.save atomically (kdlib.config.replace_atomically)."""
    replace_atomically(path, lambda tmp: torch.save(obj, tmp))


def env_info(device: str = "cpu") -> dict[str, Any]:
    """Versions, git commit, device, host and time of a run (env.json)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], check=False, capture_output=True,
                                cwd=Path(__file__).parent, text=True, timeout=5).stdout.strip()
        commit = commit or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    dev = torch.device(device)
    return {
        "python": sys.version.split()[0], "torch": torch.__version__,
        "torchvision": metadata.version("torchvision"), "kdlib": kdlib.__version__,
        "git_commit": commit,
        "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda"
        else platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "hostname": socket.gethostname(), "pid": os.getpid(), "platform": platform.platform(),
        "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def finish_run(tmp: Path, final: Path, pred: pd.DataFrame, metrics: Mapping[str, Any],
               history: pd.DataFrame, model_state: Mapping[str, torch.Tensor],
               env: Mapping[str, Any]) -> Path:
    """Write predictions, metrics, history, model and env into `tmp`, drop the checkpoint, and
    rename `tmp` to `final` (atomic)."""
    pred.to_csv(tmp / "predictions.csv", index=False)
    history.to_csv(tmp / "history.csv", index=False)
    save_atomic(tmp / "model.pt", dict(model_state))
    env = {**env_info(env.get("device", "cpu")), **env}
    write_text_atomic(tmp / "env.json", json.dumps(env, indent=1))
    write_text_atomic(tmp / "metrics.json", json.dumps(dict(metrics), indent=1))
    (tmp / "checkpoint.pt").unlink(missing_ok=True)
    try:
        os.rename(tmp, final)
    except OSError:
        if not is_finished(final):
            raise
        shutil.rmtree(tmp)  # another process finished the same run first
    return final

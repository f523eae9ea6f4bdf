"""Run folders: ids, atomic writes, resume checks, and the tidy results table (grids: kdlib.grid).

A run lives in `runs_dir/<run_id>` (finished, never rewritten) or `runs_dir/.tmp-<run_id>` (in
progress, with `checkpoint.pt`). The run id is a readable prefix plus a hash of the normalised
config, e.g. `cnn_s-kd-f0-r4-s0-1a2b3c4d`, so the same settings always map to the same folder and
any grid can be stopped and started again.
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
import yaml

from kdlib.config import read_yaml, to_dict
from kdlib.errors import RunError
from kdlib.paths import output_root, resolve

if TYPE_CHECKING:
    from kdlib.train import TrainConfig

RUN_VERSION = 1
"""Version of the training code's results, part of every run id: bump it when a change to kdlib
makes the same config give other numbers, so such runs are retrained instead of reused."""

EXECUTION_SETTINGS: tuple[str, ...] = ("device", "deterministic")
"""Settings that say where/how a run executes, not what it is: left out of the run id."""

RUN_FILES: tuple[str, ...] = ("config.yaml", "history.csv", "predictions.csv", "metrics.json",
                              "model.pt", "env.json")


def canonical(value: Any) -> Any:
    """Plain data with whole floats as ints, so `gamma: 2` and `gamma: 2.0` hash alike."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    return value


def portable_path(path: str | Path) -> str:
    """A data path as the run id sees it: relative to the output root (posix) when it lies under
    it, so moving the project or KDLIB_HOME keeps the ids; else absolute."""
    full, root = resolve(path).resolve(), output_root().resolve()
    return full.relative_to(root).as_posix() if full.is_relative_to(root) else full.as_posix()


def config_identity(cfg: TrainConfig) -> dict[str, Any]:
    """The normalised settings that define a run: all but EXECUTION_SETTINGS, cache and splits as
    `portable_path`s, the teacher reduced to its folder name (a run id), whole floats as ints, plus
    `run_version` (RUN_VERSION)."""
    d = {k: v for k, v in to_dict(cfg).items() if k not in EXECUTION_SETTINGS}
    d["cache"], d["splits"] = portable_path(d["cache"]), portable_path(d["splits"])
    if d.get("teacher"):
        d["teacher"] = Path(d["teacher"]).name
    if d.get("repeat") == 0:  # runs from before repeats (all repeat 0) keep their id
        del d["repeat"]
    d["run_version"] = RUN_VERSION
    return canonical(d)


def method_name(cfg: TrainConfig | Mapping[str, Any]) -> str:
    """`ce`, `logit_adjusted`, `kd`, `kd_original`, `kd+logit_adjusted`, `ce+oversample`,
    `ce+posthoc`, ...: the distiller (if any), the task loss, a sampler and post-hoc adjustment."""
    get = cfg.get if isinstance(cfg, Mapping) else lambda k: getattr(cfg, k)
    distiller, task = get("distiller"), get("task_loss")
    if distiller == "kd" and (get("distill_params") or {}).get("original"):
        distiller = "kd_original"
    name = task if not distiller else distiller if task == "ce" else f"{distiller}+{task}"
    if get("sampler") not in (None, "none"):
        name += f"+{get('sampler')}"
    if get("posthoc_tau") is not None:
        name += "+posthoc"
    return name


def run_id(cfg: TrainConfig) -> str:
    """Readable prefix + 8 hex digits of the hash of `config_identity(cfg)`."""
    digest = hashlib.sha256(json.dumps(config_identity(cfg), sort_keys=True).encode()).hexdigest()
    ratio = "rnat" if cfg.ratio is None else f"r{cfg.ratio:g}"
    return f"{cfg.model}-{method_name(cfg)}-f{cfg.fold}-{ratio}-s{cfg.seed}-{digest[:8]}"


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
    """What of the device changes a run's numbers: its type, and whether it trains under bf16
    autocast (CUDA)."""
    return {"device_type": device.type, "autocast": device.type == "cuda"}


def _describe(execution: Mapping[str, Any]) -> str:
    if "autocast" not in execution:
        return "a device it did not record (an older kdlib)"
    return f"{execution['device_type']} ({'bf16 autocast' if execution['autocast'] else 'float32'})"


def check_resume(current: dict[str, Any], saved: dict[str, Any], folder: Path) -> None:
    """RunError naming the settings (or data files) that differ from the checkpoint's, or when the
    run would continue with(out) autocast after starting without (with) it."""
    now, then = current.get("execution", {}), saved.get("execution", {})
    if now.get("autocast") != then.get("autocast"):
        raise RunError(f"cannot resume {folder}: it was started on {_describe(then)} and would "
                       f"continue on {_describe(now)}, mixing precisions in one run; resume it on "
                       f"the same kind of device (set device accordingly) or delete {folder} to "
                       "start over")
    diffs = []
    for part in ("config", "data"):
        now, then = current[part], saved.get(part, {})
        diffs += [f"{k}: {then.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(now) | set(then))
                  if now.get(k) != then.get(k)]
    if diffs:
        raise RunError(f"cannot resume {folder}: the settings or data changed since it started "
                       f"({'; '.join(diffs)}); delete the folder to start over")


def save_atomic(path: Path, obj: Any) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".part")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_yaml(path: Path, data: Mapping[str, Any]) -> None:
    """Write a mapping as YAML (keys in the given order), atomically."""
    _write_text(path, yaml.safe_dump(dict(data), sort_keys=False))


def env_info(device: str = "cpu") -> dict[str, Any]:
    """Versions, git commit, device, host and time of a run (env.json)."""
    import torchvision

    import kdlib

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], check=False, capture_output=True,
                                cwd=Path(__file__).parent, text=True, timeout=5).stdout.strip()
        commit = commit or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    dev = torch.device(device)
    return {
        "python": sys.version.split()[0], "torch": torch.__version__,
        "torchvision": torchvision.__version__, "kdlib": kdlib.__version__, "git_commit": commit,
        "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda"
        else platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "hostname": socket.gethostname(), "platform": platform.platform(),
        "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def finish_run(tmp: Path, final: Path, pred: pd.DataFrame, extras: Mapping[str, Any],
               history: pd.DataFrame, model_state: Mapping[str, torch.Tensor],
               env: Mapping[str, Any]) -> Path:
    """Write predictions, metrics, history, model and env into `tmp`, drop the checkpoint, and
    rename `tmp` to `final` (atomic)."""
    from kdlib.metrics import run_metrics

    metrics = {**run_metrics(pred), **extras}
    pred.to_csv(tmp / "predictions.csv", index=False)
    history.to_csv(tmp / "history.csv", index=False)
    save_atomic(tmp / "model.pt", dict(model_state))
    env = {**env_info(env.get("device", "cpu")), **env}
    _write_text(tmp / "env.json", json.dumps(env, indent=1))
    _write_text(tmp / "metrics.json", json.dumps(metrics, indent=1))
    (tmp / "checkpoint.pt").unlink(missing_ok=True)
    try:
        os.rename(tmp, final)
    except OSError:
        if not is_finished(final):
            raise
        shutil.rmtree(tmp)  # another process finished the same run first
    return final


def _read(run_dir: str | Path, name: str) -> Path:
    path = Path(run_dir) / name
    if not path.is_file():
        raise RunError(f"{path} not found; is {run_dir} a finished run folder?")
    return path


def load_predictions(run_dir: str | Path) -> pd.DataFrame:
    """predictions.csv of a finished run."""
    return pd.read_csv(_read(run_dir, "predictions.csv"), dtype={"subject_id": str})


def load_history(run_dir: str | Path) -> pd.DataFrame:
    """history.csv of a run: one row per epoch."""
    return pd.read_csv(_read(run_dir, "history.csv"))


def load_metrics(run_dir: str | Path) -> dict[str, Any]:
    """metrics.json of a finished run."""
    return json.loads(_read(run_dir, "metrics.json").read_text())


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, (list, tuple)):
            out[prefix + k] = "+".join(map(str, v))
        else:
            out[prefix + k] = v
    return out


def load_runs(runs_dir: str | Path) -> pd.DataFrame:
    """One row per finished run: run_id, method, teacher_model, the config flattened
    (`augment.flip`, `loss_params.gamma`; modalities joined by `+`; ratio NaN = natural), every
    metric (teacher_params NaN without a teacher), `env.device` (where it trained, from env.json:
    CPU and GPU runs differ in precision) and path."""
    runs_dir = Path(runs_dir)
    rows = []
    for folder in sorted(runs_dir.iterdir()) if runs_dir.is_dir() else []:
        if not is_finished(folder):
            continue
        cfg = read_yaml(folder / "config.yaml")
        teacher_model = None
        if cfg.get("teacher"):
            try:
                teacher_model = read_yaml(teacher_dir(cfg["teacher"], runs_dir)
                                          / "config.yaml").get("model")
            except RunError:
                pass
        env = folder / "env.json"
        device = json.loads(env.read_text()).get("device") if env.is_file() else None
        rows.append({"run_id": folder.name, "method": method_name(cfg),
                     "teacher_model": teacher_model, **_flatten(cfg), **load_metrics(folder),
                     "env.device": device, "path": str(folder)})
    if not rows:
        return pd.DataFrame(columns=["run_id", "method", "teacher_model", "env.device", "path"])
    df = pd.DataFrame(rows)
    if "teacher_params" not in df:
        df["teacher_params"] = float("nan")
    df["ratio"] = pd.to_numeric(df["ratio"], errors="coerce")
    return df

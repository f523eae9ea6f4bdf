"""The results table: finished run folders read back as one tidy DataFrame, per-epoch histories,
and the rows that belong to an experiment."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from kdlib.config import read_yaml
from kdlib.errors import RunError
from kdlib.identity import method_name, run_id
from kdlib.runs import is_finished, teacher_dir
from kdlib.train_config import TrainConfig


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


def select_runs(runs: pd.DataFrame, configs: list[TrainConfig]) -> pd.DataFrame:
    """The rows of `load_runs(...)` that belong to `configs` (finished runs only)."""
    ids = {run_id(c) for c in configs}
    return runs[runs["run_id"].isin(ids)].reset_index(drop=True)


def histories(runs: pd.DataFrame) -> pd.DataFrame:
    """All per-epoch histories of `runs`, with run_id, method, model, ratio, repeat and fold
    attached."""
    keep = [c for c in ("run_id", "method", "model", "teacher_model", "ratio", "repeat", "fold",
                        "seed")
            if c in runs.columns]
    parts = [load_history(row["path"]).assign(**{c: row[c] for c in keep})
             for _, row in runs.iterrows()]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=keep)


def best_validation(runs: pd.DataFrame, hist: pd.DataFrame, by: list[str],
                    metrics: tuple[str, ...] = ("val_macro_f1", "val_f1_LGG", "val_recall_LGG")
                    ) -> pd.DataFrame:
    """Validation scores at each run's best epoch, as mean and std over folds/seeds per `by`."""
    best = runs[["run_id", "best_epoch"]].rename(columns={"best_epoch": "epoch"})
    at_best = hist.merge(best, on=["run_id", "epoch"])
    agg = at_best.groupby(by, dropna=False)[list(metrics)].agg(["mean", "std"])
    agg.columns = [f"{m}_{s}" for m, s in agg.columns]
    return agg.reset_index()

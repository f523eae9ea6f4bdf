"""Made-up predictions and run tables for the evaluation-layer tests."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from kdlib import CLASSES
from kdlib.metrics import PROB_COLUMNS, K


def synthetic_predictions(n_subjects: int = 20, slices: int = 12, lgg_fraction: float = 0.3,
                          skill: float = 1.5, seed: int = 0) -> pd.DataFrame:
    """A made-up predictions table for tests and demos: the first third of each subject's slices
    healthy, the rest its grade; logits = skill * one-hot(label) + Gaussian noise."""
    rng = np.random.default_rng(seed)
    rows = []
    n_lgg = max(1, round(lgg_fraction * n_subjects)) if lgg_fraction > 0 else 0
    for s in range(n_subjects):
        grade = "LGG" if s < n_lgg else "HGG"
        for z in range(slices):
            rows.append((f"S{s:03d}", z, "healthy" if z < slices // 3 else grade))
    df = pd.DataFrame(rows, columns=["subject_id", "slice", "label"])
    y = df["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    z = skill * np.eye(K)[y] + rng.normal(size=(len(df), K))
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    for i, c in enumerate(PROB_COLUMNS):
        df[c] = p[:, i]
    return df


def synthetic_runs(methods: Mapping[str, float] | None = None, folds: int = 3,
                   ratios: Sequence[float] = (4.0,), seeds: Sequence[int] = (0,),
                   noise: float = 0.02, seed: int = 0) -> pd.DataFrame:
    """A made-up run table (one row per method x fold x ratio x seed) for tests and demos:
    metric = 0.6 + per-method gain + shared per-fold effect + noise."""
    methods = dict(methods or {"ce": 0.0, "kd": 0.01, "dkd": 0.02, "bkd": 0.03})
    rng = np.random.default_rng(seed)
    fold_effect = rng.normal(0, 0.03, size=(folds, len(ratios), len(seeds)))
    rows = []
    for name, gain in methods.items():
        for f in range(folds):
            for r, ratio in enumerate(ratios):
                for s, sd in enumerate(seeds):
                    hard = np.log2(ratio) if np.isfinite(ratio) else 2.0
                    base = 0.6 + fold_effect[f, r, s] - 0.01 * hard + gain
                    row = {"method": name, "distiller": None if name == "ce" else name,
                           "task_loss": "ce", "student": "cnn_s", "teacher": None if name == "ce"
                           else "cnn_l", "fold": f, "ratio": ratio, "seed": sd,
                           "student_params": 50_000, "teacher_params": 2_000_000,
                           "n_test": 1000, "n_train": 2000}
                    for c in CLASSES:
                        row[f"f1_{c}"] = base + rng.normal(0, noise) - 0.2 * (c == "LGG")
                    row["macro_f1"] = float(np.mean([row[f"f1_{c}"] for c in CLASSES]))
                    row["recall_LGG"] = row["f1_LGG"] + rng.normal(0, noise)
                    rows.append(row)
    return pd.DataFrame(rows)


PARAMS = {"cnn_xs": 6_000, "cnn_s": 40_000, "cnn_m": 150_000, "cnn_l": 600_000}


def experiment_runs(exp, gains: Mapping[str, float], folds: int = 5, repeats: int = 2,
                    guard: Mapping[str, float] | None = None, noise: float = 0.02,
                    seed: int = 0) -> pd.DataFrame:
    """A made-up run table of every run of `exp` (a kdlib.experiment.Experiment) over
    folds x repeats, as load_runs gives it: f1_LGG = 0.4 + the gain of 'teacher->student' (for
    the grid distiller) or of the method (0 when not given) + a shared per-split effect + noise;
    macro_f1 = 0.6 + guard[method] + a third of the split effect and of the noise."""
    from kdlib.identity import method_name, run_id

    configs = exp.configs("c.h5", "s.csv", list(range(folds)), list(range(repeats)))
    by_id = {run_id(c): c for c in configs}
    rng = np.random.default_rng(seed)
    split = rng.normal(0, 0.03, (repeats, folds))
    rows = []
    for c in configs:
        t = by_id[c.teacher].model if c.teacher else None
        method = method_name(c)
        key = f"{t}->{c.model}" if t and method == exp.grid_distiller else method
        f1 = 0.4 + gains.get(key, gains.get(method, 0.0)) + split[c.repeat, c.fold] \
            + rng.normal(0, noise)
        rows.append({"run_id": run_id(c), "method": method, "model": c.model,
                     "teacher_model": t, "distiller": c.distiller,
                     "ratio": np.nan if c.ratio is None else float(c.ratio),
                     "repeat": c.repeat, "fold": c.fold, "seed": c.seed,
                     "params": PARAMS[c.model], "teacher_params": PARAMS[t] if t else np.nan,
                     "n_test_slices": 100, "n_train_slices": 300, "f1_LGG": f1,
                     "macro_f1": 0.6 + (guard or {}).get(method, 0.0) + split[c.repeat, c.fold] / 3
                     + rng.normal(0, noise / 3)})
    return pd.DataFrame(rows)


def quiet(fn, *a, **k):
    """fn(*a, **k) with warnings silenced (the made-up tables trigger expected ones)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)

"""Made-up predictions and run tables for the evaluation-layer tests."""

from __future__ import annotations

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

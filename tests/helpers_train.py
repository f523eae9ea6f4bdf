"""Tiny fixtures for the training-engine tests: a slice cache and splits in the contract formats."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from kdlib import CLASSES, MODALITIES

TABLE_COLUMNS = ["row", "subject_id", "grade", "slice", "brain_pixels", "brain_fraction",
                 "ncr_pixels", "ed_pixels", "et_pixels", "tumor_pixels", "label"]


def make_cache(folder: Path, n_hgg: int = 6, n_lgg: int = 6, slices: int = 4, size: int = 16,
               seed: int = 0, name: str = "cache") -> Path:
    """Write `folder/<name>.h5` (images float16 (N,4,S,S), masks) and the slice table beside it.

    Each subject gets `slices` slices: half healthy, half tumour slices of the subject's grade.
    A tumour is a bright square whose channel depends on the grade, so tiny models can learn it.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    images, masks, rows = [], [], []
    subjects = [(f"BraTS20_Training_{i + 1:03d}", "HGG" if i < n_hgg else "LGG")
                for i in range(n_hgg + n_lgg)]
    for sid, grade in subjects:
        for z in range(slices):
            img = rng.normal(0, 0.3, (len(MODALITIES), size, size)).astype(np.float32)
            mask = np.zeros((size, size), np.uint8)
            tumour = z >= slices // 2
            if tumour:
                a, b = rng.integers(2, size // 2, 2)
                w = size // 4
                mask[a:a + w, b:b + w] = 2
                img[0 if grade == "HGG" else 1, a:a + w, b:b + w] += 2.0
                img[3, a:a + w, b:b + w] += 1.0
            tp = int((mask > 0).sum())
            rows.append({
                "row": len(images), "subject_id": sid, "grade": grade, "slice": 60 + z,
                "brain_pixels": size * size, "brain_fraction": 1.0, "ncr_pixels": 0,
                "ed_pixels": tp, "et_pixels": 0, "tumor_pixels": tp,
                "label": grade if tumour else "healthy",
            })
            images.append(img)
            masks.append(mask)
    path = folder / f"{name}.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=np.stack(images).astype(np.float16))
        f.create_dataset("masks", data=np.stack(masks))
        f.attrs["image_size"] = size
        f.attrs["complete"] = True
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    table.to_csv(path.with_suffix(".csv"), index=False)
    assert set(table.label) <= set(CLASSES)
    return path


def make_splits(cache_h5: Path, k_folds: int = 2, n_test_per_grade: int = 2) -> pd.DataFrame:
    """A splits table (subject_id, grade, fold): per grade the first subjects are the test set (-1),
    the rest are dealt round-robin into `k_folds` folds."""
    table = pd.read_csv(Path(cache_h5).with_suffix(".csv"))
    subjects = table.drop_duplicates("subject_id")[["subject_id", "grade"]]
    out = []
    for grade, group in subjects.groupby("grade"):
        for i, sid in enumerate(group.subject_id):
            fold = -1 if i < n_test_per_grade else (i - n_test_per_grade) % k_folds
            out.append({"subject_id": sid, "grade": grade, "fold": fold})
    return pd.DataFrame(out).sort_values("subject_id").reset_index(drop=True)


def write_splits(cache_h5: Path, path: Path, **kw: Any) -> Path:
    """Write make_splits(...) as CSV to `path`."""
    make_splits(cache_h5, **kw).to_csv(path, index=False)
    return path


def tiny_config(cache: Path, splits: Path, **over: Any) -> dict[str, Any]:
    """Settings of a tiny, fast run (cnn_xs, 2 epochs, 16 px) as a plain dict."""
    cfg: dict[str, Any] = {
        "cache": str(cache), "splits": str(splits), "fold": 0, "model": "cnn_xs",
        "modalities": ["flair", "t1"], "epochs": 2, "batch_size": 8, "lr": 3e-3,
        "warmup_epochs": 0, "seed": 0, "device": "cpu",
    }
    cfg.update(over)
    return cfg


def tiny_train_data(root: Path) -> tuple[Path, Path]:
    """The tiny cache (12 subjects x 4 slices, 16 px) and its splits that the engine tests share."""
    cache = make_cache(root, n_hgg=6, n_lgg=6, slices=4, size=16)
    return cache, write_splits(cache, root / "splits.csv")

"""Shared test fixtures: tiny BraTS2020 datasets written exactly like the real files.

`nifti_tree(...)` writes a MICCAI_BraTS2020_TrainingData folder (nibabel, int16 images, uint8
seg, name_mapping.csv, survival_info.csv); `h5_tree(...)` writes the Kaggle slice layout
(volume_N_slice_M.h5 with `image` (X, Y, 4) float64 z-scored per slice and `mask` (X, Y, 3)
uint8, plus meta_data.csv). Both return a FakeTree with the folder and the ground-truth arrays.
The plain writer functions need no pytest and are reused by benchmarks/bench_cache.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

MODALITIES = ("flair", "t1", "t1ce", "t2")
NAME_MAPPING_HEADER = [
    "Grade",
    "BraTS_2017_subject_ID",
    "BraTS_2018_subject_ID",
    "TCGA_TCIA_subject_ID",
    "BraTS_2019_subject_ID",
    "BraTS_2020_subject_ID",
]


@dataclass
class FakeSubject:
    """Ground truth of a written subject: image int16 (4, X, Y, Z), MODALITIES order; seg uint8."""

    subject_id: str
    grade: str
    image: np.ndarray
    seg: np.ndarray


@dataclass
class FakeTree:
    """A written dataset: its folder (what discover() gets) and the subjects written into it."""

    root: Path
    subjects: list[FakeSubject] = field(default_factory=list)

    def __getitem__(self, subject_id: str) -> FakeSubject:
        return next(s for s in self.subjects if s.subject_id == subject_id)


def synth_subjects(
    n_hgg: int = 2, n_lgg: int = 1, shape=(32, 32, 16), seed: int = 0, first: int = 1
) -> list[FakeSubject]:
    """Ellipsoid brains, a spherical tumour (HGG: enhancing rim; LGG: none), ids from `first`."""
    rng = np.random.default_rng(seed)
    xx, yy, zz = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    brain = (xx / 0.85) ** 2 + (yy / 0.9) ** 2 + (zz / 0.75) ** 2 <= 1
    out = []
    for i, grade in enumerate(["HGG"] * n_hgg + ["LGG"] * n_lgg):
        c = rng.uniform(-0.3, 0.3, 3)
        r = rng.uniform(0.25, 0.4)
        d = np.sqrt((xx - c[0]) ** 2 + (yy - c[1]) ** 2 + (zz - c[2]) ** 2) / r
        seg = np.zeros(shape, np.uint8)
        seg[(d < 1) & brain] = 2
        seg[(d < 0.55) & brain] = 1
        if grade == "HGG":
            seg[(d >= 0.35) & (d < 0.55) & brain] = 4
        image = np.zeros((4, *shape), np.int16)
        for k, base in enumerate((300, 500, 450, 700)):
            v = base + 80 * xx + 40 * yy + rng.normal(0, 15, shape) + 250 * (seg > 0) * (k != 1)
            image[k][brain] = np.clip(np.rint(v[brain]), 1, 3000).astype(np.int16)
        out.append(FakeSubject(f"BraTS20_Training_{first + i:03d}", grade, image, seg))
    return out


def write_name_mapping(folder: Path, subjects: list[FakeSubject]) -> Path:
    """name_mapping.csv with the exact BraTS2020 header."""
    rows = [[s.grade, "NA", "NA", "NA", "NA", s.subject_id] for s in subjects]
    path = folder / "name_mapping.csv"
    pd.DataFrame(rows, columns=NAME_MAPPING_HEADER).to_csv(path, index=False)
    return path


def write_nifti_tree(parent: Path, subjects: list[FakeSubject], gz: bool = False) -> Path:
    """Write MICCAI_BraTS2020_TrainingData under `parent`; returns that folder."""
    import nibabel as nib

    root = Path(parent) / "MICCAI_BraTS2020_TrainingData"
    ext = ".nii.gz" if gz else ".nii"
    for s in subjects:
        sub = root / s.subject_id
        sub.mkdir(parents=True, exist_ok=True)
        for k, m in enumerate(MODALITIES):
            nib.save(nib.Nifti1Image(s.image[k], np.eye(4)), sub / f"{s.subject_id}_{m}{ext}")
        seg_name = (
            "W39_1998.09.19_Segm.nii"
            if s.subject_id.endswith("_355")
            else f"{s.subject_id}_seg{ext}"
        )
        nib.save(nib.Nifti1Image(s.seg, np.eye(4)), sub / seg_name)
    write_name_mapping(root, subjects)
    survival = pd.DataFrame({"Brats20ID": [s.subject_id for s in subjects if s.grade == "HGG"]})
    survival.assign(
        Age=60.0, Survival_days="ALIVE (361 days later)", Extent_of_Resection="GTR"
    ).to_csv(root / "survival_info.csv", index=False)
    return root


def write_h5_tree(
    parent: Path, subjects: list[FakeSubject], channel_order=MODALITIES, meta: bool = True
) -> Path:
    """Write BraTS2020_training_data/content/data (Kaggle layout) under `parent`; returns it."""
    import h5py

    root = Path(parent) / "BraTS2020_training_data" / "content" / "data"
    root.mkdir(parents=True, exist_ok=True)
    order = [MODALITIES.index(m) for m in channel_order]
    rows = []
    for s in subjects:
        vol = int(re.search(r"(\d+)$", s.subject_id)[1])
        for z in range(s.seg.shape[2]):
            x = s.image[order, :, :, z].astype(np.float64).transpose(1, 2, 0)
            std = x.std(axis=(0, 1))
            x = (x - x.mean(axis=(0, 1))) / np.where(std > 0, std, 1.0)
            seg = s.seg[:, :, z]
            mask = np.stack([seg == 1, seg == 2, seg == 4], axis=-1).astype(np.uint8)
            name = f"volume_{vol}_slice_{z}.h5"
            with h5py.File(root / name, "w") as f:
                f["image"], f["mask"] = x, mask
            rows.append((f"/content/data/{name}", int(mask.any()), vol, z))
    if meta:
        pd.DataFrame(rows, columns=["slice_path", "target", "volume", "slice"]).to_csv(
            root / "meta_data.csv", index=False
        )
    write_name_mapping(root, subjects)
    return root


@pytest.fixture
def nifti_tree(tmp_path):
    """Factory: nifti_tree(n_hgg=2, n_lgg=1, shape=(32, 32, 16), gz=False, subjects=None)."""

    def make(n_hgg=2, n_lgg=1, shape=(32, 32, 16), gz=False, seed=0, subjects=None, parent=None):
        subjects = subjects if subjects is not None else synth_subjects(n_hgg, n_lgg, shape, seed)
        return FakeTree(write_nifti_tree(parent or tmp_path / "nifti", subjects, gz), subjects)

    return make


@pytest.fixture
def h5_tree(tmp_path):
    """Factory: h5_tree(n_hgg=2, n_lgg=1, shape, channel_order, subjects=None) (Kaggle H5)."""

    def make(
        n_hgg=2,
        n_lgg=1,
        shape=(32, 32, 16),
        seed=0,
        subjects=None,
        channel_order=MODALITIES,
        meta=True,
        parent=None,
    ):
        subjects = subjects if subjects is not None else synth_subjects(n_hgg, n_lgg, shape, seed)
        return FakeTree(
            write_h5_tree(parent or tmp_path / "h5", subjects, channel_order, meta), subjects
        )

    return make

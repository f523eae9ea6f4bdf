"""Write the synthetic BraTS2020 dataset in the real layouts (NIfTI, Kaggle H5 slices, CSV tables)
behind a completion marker, so a complete dataset is reused. The layouts are those of the README,
"The real BraTS2020"."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from kdlib import MODALITIES
from kdlib.config import to_dict
from kdlib.data.phantom import PhantomConfig, phantom_subject
from kdlib.data.processes import exit_with_parent
from kdlib.errors import DataError

VERSION = 1  # bump when the generated data (phantom.py too) changes, so old markers stop matching
NIFTI_DIR = "MICCAI_BraTS2020_TrainingData"
H5_DIR = "BraTS2020_training_data"
H5_META = "BraTS20 Training Metadata.csv"
MARKER = ".phantom_complete.json"
MISNAMED_SEG = "W39_1998.09.19_Segm"  # subject 355's segmentation in the real release
NAME_MAPPING_HEADER = (
    "Grade",
    "BraTS_2017_subject_ID",
    "BraTS_2018_subject_ID",
    "TCGA_TCIA_subject_ID",
    "BraTS_2019_subject_ID",
    "BraTS_2020_subject_ID",
)
META_HEADER = ("slice_path", "target", "volume", "slice")
H5_META_HEADER = (
    *META_HEADER,
    "label0_pxl_cnt",
    "label1_pxl_cnt",
    "label2_pxl_cnt",
    "background_ratio",
)
SURVIVAL_HEADER = ("Brats20ID", "Age", "Survival_days", "Extent_of_Resection")


def _grades(cfg: PhantomConfig) -> list[str]:
    """Grade of subjects 1..N: HGG and LGG interleaved at random (fixed by the seed)."""
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(0,)))
    return [str(g) for g in rng.permutation(["HGG"] * cfg.n_hgg + ["LGG"] * cfg.n_lgg)]


def _nifti_bytes(data: np.ndarray, compress: bool) -> bytes:

    affine = np.array(
        [[-1.0, 0, 0, 0], [0, -1.0, 0, data.shape[1] - 1], [0, 0, 1.0, 0], [0, 0, 0, 1]]
    )
    img = nib.Nifti1Image(data, affine)  # 1 mm, LPS-stored like the BraTS release
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    raw = img.to_bytes()
    return (
        gzip.compress(raw, compresslevel=6, mtime=0) if compress else raw
    )  # mtime=0: byte-identical


def _write_subject(root: str, index: int, grade: str, cfg: PhantomConfig) -> np.ndarray:
    """Write one subject (NIfTI, and H5 slices if asked); return its (Z, 3) mask-plane pixel counts."""
    image, seg = phantom_subject(index, grade, cfg)
    sid = f"BraTS20_Training_{index:03d}"
    folder = Path(root) / NIFTI_DIR / sid
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".nii.gz" if cfg.compress else ".nii"
    for m, mod in enumerate(MODALITIES):
        (folder / f"{sid}_{mod}{ext}").write_bytes(
            _nifti_bytes(image[m].astype(np.int16), cfg.compress)
        )
    seg_name = MISNAMED_SEG if (index == 355 and cfg.misnamed_seg_355) else f"{sid}_seg"
    (folder / f"{seg_name}{ext}").write_bytes(_nifti_bytes(seg, cfg.compress))
    planes = np.stack([seg == lab for lab in (1, 2, 4)], axis=-2)  # (X, Y, 3, Z)
    if cfg.write_h5:
        _write_h5_slices(Path(root) / H5_DIR / "content" / "data", index, image, planes, cfg)
    return planes.sum(axis=(0, 1)).T.astype(np.int64)


def _write_h5_slices(
    data_dir: Path, index: int, image: np.ndarray, planes: np.ndarray, cfg: PhantomConfig
) -> None:
    """Kaggle layout: volume_{index}_slice_{z}.h5 with image (X, Y, 4) float64 z-scored per
    slice/channel over the full frame, and mask (X, Y, 3) uint8 one-hot planes for labels 1, 2, 4."""

    data_dir.mkdir(parents=True, exist_ok=True)
    order = [MODALITIES.index(m) for m in cfg.h5_channel_order]
    for z in range(image.shape[3]):
        x = image[order, :, :, z].astype(np.float64).transpose(1, 2, 0)
        mean, std = x.mean(axis=(0, 1)), x.std(axis=(0, 1))
        x = np.where(std > 0, (x - mean) / np.where(std > 0, std, 1.0), 0.0)
        with h5py.File(data_dir / f"volume_{index}_slice_{z}.h5", "w") as f:
            f.create_dataset(
                "image", data=x, compression="gzip", compression_opts=1, track_times=False
            )
            f.create_dataset(
                "mask",
                data=planes[:, :, :, z].astype(np.uint8),
                compression="gzip",
                compression_opts=1,
                track_times=False,
            )


def _write_csv(path: Path, header, rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _tables(cfg: PhantomConfig, grades: list[str]) -> tuple[list, list]:
    """Plausible name_mapping.csv and survival_info.csv rows (ids, ages, survival), fixed by the seed."""
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(2,)))
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    names, survival = [], []
    for n, grade in enumerate(grades, start=1):
        sid = f"BraTS20_Training_{n:03d}"
        site = rng.choice(["CBICA", "TCIA", "2013"], p=[0.5, 0.4, 0.1])
        if site == "CBICA":
            core, tcga = f"CBICA_{''.join(rng.choice(letters, 3))}", "NA"
        elif site == "TCIA":
            num = rng.integers(100, 700)
            core = f"TCIA{rng.integers(1, 14):02d}_{num}"
            tcga = f"TCGA-{rng.choice(['02', '06', '08', '12', 'CS', 'DU', 'HT'])}-{rng.integers(1000, 9999)}"
        else:
            core, tcga = f"2013_{rng.integers(0, 30)}", "NA"
        new_in_2019 = rng.random() < 0.15
        old = ("NA", "NA") if new_in_2019 else (f"Brats17_{core}_1", f"Brats18_{core}_1")
        names.append((grade, *old, tcga, f"BraTS19_{core}_1", sid))
        if grade == "HGG" and rng.random() < 0.8:
            days = int(np.clip(rng.lognormal(np.log(380), 0.7), 5, 1800))
            status = f"ALIVE ({days} days later)" if rng.random() < 0.04 else str(days)
            resection = rng.choice(["GTR", "STR", "NA"], p=[0.5, 0.05, 0.45])
            survival.append((sid, f"{rng.uniform(20, 86):.3f}", status, resection))
    return names, survival


def _config_key(cfg: PhantomConfig) -> dict:
    key = to_dict(cfg)
    key.pop("workers")
    return {"generator": "kdlib.data.phantom", "version": VERSION, "config": key}


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def make_phantom(
    out_dir: str | Path, cfg: PhantomConfig | None = None, progress: bool = True
) -> Path:
    """Write the synthetic dataset under `out_dir` and return the NIfTI root
    (`out_dir/MICCAI_BraTS2020_TrainingData`); a complete dataset of the same config is reused.

    Subjects are built in a temporary folder and moved into place; the marker file is written
    last, so an interrupted run never looks complete. One writer per `out_dir` at a time.
    """

    cfg = cfg or PhantomConfig()
    out = Path(out_dir).expanduser()
    key = _config_key(cfg)
    marker = out / MARKER
    owned = [NIFTI_DIR, H5_DIR, H5_META]
    wanted = owned if cfg.write_h5 else owned[:1]
    found = _read_marker(marker)
    if (
        found is not None
        and found.get("complete")
        and found.get("key") == key
        and all((out / name).exists() for name in wanted)
    ):
        return out / NIFTI_DIR
    if found is None and any((out / name).exists() for name in owned):
        raise DataError(
            f"{out} already holds {[n for n in owned if (out / n).exists()]} that "
            f"make_phantom did not write (no {MARKER}); choose another out_dir or "
            "delete those files"
        )
    out.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    for stale in out.glob(".phantom-tmp-*"):  # left by crashed runs
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out / f".phantom-tmp-{digest}"
    grades = _grades(cfg)
    names, survival = _tables(cfg, grades)
    nifti = tmp / NIFTI_DIR
    nifti.mkdir(parents=True)
    jobs = [(str(tmp), n, g, cfg) for n, g in enumerate(grades, start=1)]
    bar = {
        "total": len(jobs),
        "desc": "phantom subjects",
        "unit": "subject",
        "disable": not progress,
    }
    if cfg.workers == 1:
        counts = [_write_subject(*job) for job in tqdm(jobs, **bar)]
    else:  # each worker holds one subject at a time: memory ~ workers x one subject
        with ProcessPoolExecutor(cfg.workers, mp_context=get_context("spawn"),
                                 initializer=exit_with_parent) as pool:
            counts = list(tqdm(pool.map(_write_subject, *zip(*jobs)), **bar))
    _write_csv(nifti / "name_mapping.csv", NAME_MAPPING_HEADER, names)
    _write_csv(nifti / "survival_info.csv", SURVIVAL_HEADER, survival)
    if cfg.write_h5:
        _write_h5_tables(tmp, counts, names, survival, cfg)
    marker.write_text(json.dumps({"key": key, "complete": False}))  # claims the names below
    for name in owned:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        if (tmp / name).exists():
            os.replace(tmp / name, target)
    shutil.rmtree(tmp)
    partial = out / (MARKER + ".tmp")
    partial.write_text(json.dumps({"key": key, "complete": True}, indent=1))
    os.replace(partial, marker)
    return out / NIFTI_DIR


def _write_h5_tables(
    tmp: Path, counts: list[np.ndarray], names: list, survival: list, cfg: PhantomConfig
) -> None:
    """meta_data.csv, name_mapping.csv and survival_info.csv beside the slices, and the
    `BraTS20 Training Metadata.csv` (pixel counts per mask plane) at the dataset root."""
    data_dir = tmp / H5_DIR / "content" / "data"
    frame = cfg.shape[0] * cfg.shape[1]
    meta, extra = [], []
    for n, c in enumerate(counts, start=1):
        for z, (c1, c2, c4) in enumerate(c.tolist()):
            row = (f"/content/data/volume_{n}_slice_{z}.h5", int(c1 + c2 + c4 > 0), n, z)
            meta.append(row)
            extra.append((*row, c1, c2, c4, f"{1 - (c1 + c2 + c4) / frame:.6f}"))
    _write_csv(data_dir / "meta_data.csv", META_HEADER, meta)
    _write_csv(data_dir / "name_mapping.csv", NAME_MAPPING_HEADER, names)
    _write_csv(data_dir / "survival_info.csv", SURVIVAL_HEADER, survival)
    _write_csv(tmp / H5_META, H5_META_HEADER, extra)

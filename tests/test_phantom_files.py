"""The phantom dataset writer: the real file layouts (NIfTI, H5, CSV), determinism, reuse of a
complete dataset, and atomicity."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from kdlib import MODALITIES
from kdlib.data import phantom_files
from kdlib.data.phantom import PhantomConfig, phantom_subject
from kdlib.data.phantom_files import (
    H5_DIR,
    H5_META,
    MARKER,
    NAME_MAPPING_HEADER,
    NIFTI_DIR,
    make_phantom,
)
from kdlib.errors import DataError

SHAPE = (64, 64, 40)


def tiny(**kw) -> PhantomConfig:
    return PhantomConfig(**{"n_hgg": 2, "n_lgg": 2, "shape": SHAPE, **kw})


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom")
    make_phantom(out, tiny(write_h5=True), progress=False)
    return out


# ---------------------------------------------------------------- files


def test_nifti_tree_names_headers_dtypes(dataset):
    root = dataset / NIFTI_DIR
    names = pd.read_csv(root / "name_mapping.csv", dtype=str, keep_default_na=False)
    assert tuple(names.columns) == NAME_MAPPING_HEADER
    assert names["BraTS_2020_subject_ID"].tolist() == [
        f"BraTS20_Training_{i:03d}" for i in range(1, 5)
    ]
    assert sorted(names["Grade"]) == ["HGG", "HGG", "LGG", "LGG"]
    survival = pd.read_csv(root / "survival_info.csv", dtype=str)
    assert list(survival.columns) == ["Brats20ID", "Age", "Survival_days", "Extent_of_Resection"]
    hgg = set(names.loc[names["Grade"] == "HGG", "BraTS_2020_subject_ID"])
    assert set(survival["Brats20ID"]) <= hgg
    for sid in names["BraTS_2020_subject_ID"]:
        files = sorted(p.name for p in (root / sid).iterdir())
        assert files == sorted(f"{sid}_{m}.nii" for m in (*MODALITIES, "seg"))
        for m in (*MODALITIES, "seg"):
            img = nib.load(root / sid / f"{sid}_{m}.nii")
            assert img.shape == SHAPE
            assert img.get_data_dtype() == (np.uint8 if m == "seg" else np.int16)
            assert np.allclose(np.abs(np.diag(img.affine)[:3]), 1.0)  # 1 mm
            assert img.header.get_zooms() == (1.0, 1.0, 1.0)


def test_labels_and_exact_zero_background(dataset):
    root = dataset / NIFTI_DIR
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        seg = np.asarray(nib.load(sub / f"{sub.name}_seg.nii").dataobj)
        images = [np.asarray(nib.load(sub / f"{sub.name}_{m}.nii").dataobj) for m in MODALITIES]
        assert set(np.unique(seg)) <= {0, 1, 2, 4} and (seg > 0).any()
        brain = images[0] > 0
        for x in images:
            assert (x >= 0).all() and np.array_equal(x > 0, brain)  # one skull-stripped mask
        assert not seg[~brain].any()
        assert 0.05 < brain.mean() < 0.5  # brain inside a zero frame


def test_misnamed_seg_of_subject_355(tmp_path):
    from kdlib.data.brats import discover

    phantom_files._write_subject(str(tmp_path), 355, "HGG", tiny())
    phantom_files._write_subject(str(tmp_path), 356, "LGG", tiny(misnamed_seg_355=False))
    folder = tmp_path / NIFTI_DIR
    assert (folder / "BraTS20_Training_355" / "W39_1998.09.19_Segm.nii").is_file()
    assert not (folder / "BraTS20_Training_355" / "BraTS20_Training_355_seg.nii").exists()
    rows = [
        ("HGG", "NA", "NA", "NA", "NA", "BraTS20_Training_355"),
        ("LGG", "NA", "NA", "NA", "NA", "BraTS20_Training_356"),
    ]
    phantom_files._write_csv(folder / "name_mapping.csv", NAME_MAPPING_HEADER, rows)
    records = discover(folder)
    assert "W39_1998.09.19_Segm.nii" in records[0].notes[0]
    phantom_files._write_subject(str(tmp_path / "b"), 355, "HGG", tiny(misnamed_seg_355=False))
    assert (
        tmp_path / "b" / NIFTI_DIR / "BraTS20_Training_355" / "BraTS20_Training_355_seg.nii"
    ).is_file()


def test_h5_layout_and_normalisation(dataset):
    data = dataset / H5_DIR / "content" / "data"
    meta = pd.read_csv(data / "meta_data.csv")
    assert list(meta.columns) == ["slice_path", "target", "volume", "slice"]
    assert (
        len(meta) == 4 * SHAPE[2] and meta["slice_path"][0] == "/content/data/volume_1_slice_0.h5"
    )
    assert (data / "name_mapping.csv").is_file() and (data / "survival_info.csv").is_file()
    extra = pd.read_csv(dataset / H5_META)
    assert {"label0_pxl_cnt", "label1_pxl_cnt", "label2_pxl_cnt", "background_ratio"} <= set(
        extra.columns
    )
    sid = "BraTS20_Training_002"
    image, seg = (
        np.asarray(nib.load(dataset / NIFTI_DIR / sid / f"{sid}_{k}.nii").dataobj)
        for k in ("flair", "seg")
    )
    z = int(np.argmax((seg > 0).sum((0, 1))))
    with h5py.File(data / f"volume_2_slice_{z}.h5", "r") as f:
        x, mask = f["image"][()], f["mask"][()]
    assert x.shape == SHAPE[:2] + (4,) and x.dtype == np.float64
    assert mask.shape == SHAPE[:2] + (3,) and mask.dtype == np.uint8
    np.testing.assert_allclose(x.mean((0, 1)), 0, atol=1e-9)
    np.testing.assert_allclose(x.std((0, 1)), 1, atol=1e-9)
    flair = image[:, :, z].astype(np.float64)
    np.testing.assert_allclose(x[..., 0], (flair - flair.mean()) / flair.std())  # channel 0 = FLAIR
    assert mask.sum(-1).max() == 1
    for k, lab in enumerate((1, 2, 4)):
        assert np.array_equal(mask[..., k] == 1, seg[:, :, z] == lab)
    row = extra[(extra["volume"] == 2) & (extra["slice"] == z)].iloc[0]
    assert row["label1_pxl_cnt"] == (seg[:, :, z] == 2).sum() and row["target"] == 1


def test_readers_accept_both_layouts(dataset):
    from kdlib.data.brats import discover, load_subject

    nifti, h5 = discover(dataset, fmt="nifti"), discover(dataset, fmt="h5")
    assert [r.subject_id for r in nifti] == [r.subject_id for r in h5]
    assert [r.grade for r in nifti] == [r.grade for r in h5]
    image, seg = load_subject(nifti[0])
    truth_image, truth_seg = phantom_subject(1, nifti[0].grade, tiny(write_h5=True))
    np.testing.assert_array_equal(image, truth_image)
    np.testing.assert_array_equal(seg, truth_seg)
    h5_image, h5_seg = load_subject(h5[0])
    np.testing.assert_array_equal(h5_seg, truth_seg)
    assert np.array_equal(h5_image > 0, truth_image > 0)  # zero background restored


# ---------------------------------------------------------------- determinism, reuse, atomicity


def test_same_seed_gives_byte_identical_files(dataset, tmp_path):
    make_phantom(tmp_path / "again", tiny(write_h5=True), progress=False)
    assert file_hashes(dataset) == file_hashes(tmp_path / "again")
    gz = [
        file_hashes(
            make_phantom(tmp_path / f"gz{k}", tiny(n_hgg=1, n_lgg=0, compress=True), progress=False)
        )
        for k in range(2)
    ]
    assert gz[0] == gz[1] and all(name.endswith(".nii.gz") for name in gz[0] if "Training" in name)


def test_subjects_do_not_depend_on_count_or_workers(tmp_path):
    a = phantom_subject(2, "LGG", tiny(n_hgg=1, n_lgg=1))
    b = phantom_subject(2, "LGG", tiny(n_hgg=30, n_lgg=9))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], phantom_subject(2, "LGG", tiny(seed=1))[0])
    serial = make_phantom(tmp_path / "w1", tiny(n_hgg=1, n_lgg=1), progress=False)
    parallel = make_phantom(tmp_path / "w2", tiny(n_hgg=1, n_lgg=1, workers=2), progress=False)
    assert file_hashes(serial) == file_hashes(parallel)


def test_complete_dataset_is_reused(dataset, monkeypatch):
    def fail(*args):
        raise AssertionError("regenerated a complete dataset")

    monkeypatch.setattr(phantom_files, "_write_subject", fail)
    assert make_phantom(dataset, tiny(write_h5=True, workers=3)) == dataset / NIFTI_DIR


def test_interrupted_runs_never_look_complete(tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out / ".phantom-tmp-0123456789" / NIFTI_DIR / "BraTS20_Training_001").mkdir(parents=True)
    real = phantom_files._write_subject

    def crash(root, index, grade, cfg):
        if index == 2:
            raise KeyboardInterrupt
        return real(root, index, grade, cfg)

    monkeypatch.setattr(phantom_files, "_write_subject", crash)
    with pytest.raises(KeyboardInterrupt):
        make_phantom(out, tiny(), progress=False)
    assert not (out / MARKER).exists() and not (out / NIFTI_DIR).exists()
    monkeypatch.setattr(phantom_files, "_write_subject", real)
    root = make_phantom(out, tiny(), progress=False)
    assert json.loads((out / MARKER).read_text())["complete"] is True
    assert len(list(root.glob("BraTS20_Training_*"))) == 4
    assert not list(out.glob(".phantom-tmp-*"))
    # a marker left half-way through the final moves is redone, not trusted
    (out / MARKER).write_text(
        json.dumps({"key": phantom_files._config_key(tiny()), "complete": False})
    )
    (root / "BraTS20_Training_003" / "BraTS20_Training_003_t1.nii").unlink()
    make_phantom(out, tiny(), progress=False)
    assert (root / "BraTS20_Training_003" / "BraTS20_Training_003_t1.nii").is_file()


def test_a_new_config_replaces_the_old_dataset(tmp_path):
    make_phantom(tmp_path, tiny(n_hgg=1, n_lgg=0, write_h5=True), progress=False)
    root = make_phantom(tmp_path, tiny(n_hgg=1, n_lgg=1), progress=False)
    assert len(list(root.glob("BraTS20_Training_*"))) == 2
    assert not (tmp_path / H5_DIR).exists() and not (tmp_path / H5_META).exists()
    marker = json.loads((tmp_path / MARKER).read_text())
    assert marker["complete"] and marker["key"]["config"]["n_lgg"] == 1


def test_foreign_data_is_not_overwritten(tmp_path):
    (tmp_path / NIFTI_DIR / "BraTS20_Training_001").mkdir(parents=True)
    with pytest.raises(DataError, match="did not write"):
        make_phantom(tmp_path, tiny(), progress=False)
    assert (tmp_path / NIFTI_DIR / "BraTS20_Training_001").is_dir()

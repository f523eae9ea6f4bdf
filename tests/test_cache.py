"""Slice cache: labels, filters, resizing, reuse, atomicity."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import FakeSubject

import kdlib
from kdlib import MODALITIES
from kdlib.data import cache
from kdlib.data.cache import (
    PrepConfig,
    cache_summary,
    load_slice_table,
    normalise,
    prepare_cache,
    resize_slices,
)
from kdlib.data.processes import pid_alive
from kdlib.errors import ConfigError, DataError

SHAPE = (32, 32, 12)
# slice -> (ncr, ed, et) tumour pixels written into the hand-made segmentation
TUMOUR = {3: (2, 2, 1), 5: (0, 20, 0), 7: (3, 3, 3), 8: (4, 4, 2)}


def hand_made(subject_id: str, grade: str, seed: int = 0) -> FakeSubject:
    """Brain = box x 4:28, y 6:26 on slices 1..9; slice 10 holds 4 brain pixels; 0 and 11 empty."""
    rng = np.random.default_rng(seed)
    brain = np.zeros(SHAPE, bool)
    brain[4:28, 6:26, 1:10] = True
    brain[15:17, 15:17, 10] = True
    image = np.zeros((4, *SHAPE), np.int16)
    image[:, brain] = rng.integers(100, 1000, size=(4, brain.sum()))
    seg = np.zeros(SHAPE, np.uint8)
    for z, counts in TUMOUR.items():
        block = seg[8:20, 8:20, z].copy()  # inside the brain
        labels = np.repeat([1, 2, 4], counts)
        block.flat[: len(labels)] = labels
        seg[8:20, 8:20, z] = block
    return FakeSubject(subject_id, grade, image, seg)


@pytest.fixture
def hand_tree(nifti_tree):
    return nifti_tree(
        subjects=[
            hand_made("BraTS20_Training_001", "HGG", 1),
            hand_made("BraTS20_Training_002", "LGG", 2),
        ]
    )


def test_labels_and_counts_from_known_tumour_pixels(hand_tree, tmp_path):
    path = prepare_cache(
        hand_tree.root,
        tmp_path / "c",
        PrepConfig(image_size=16, min_tumor_pixels=10),
        progress=False,
    )
    table = load_slice_table(path)
    assert list(table.columns) == list(cache.TABLE_COLUMNS)
    one = table[table["subject_id"] == "BraTS20_Training_001"].set_index("slice")
    assert list(one.index) == list(range(1, 10))  # empty slices 0, 11 and 4-pixel slice 10 dropped
    for z, (ncr, ed, et) in TUMOUR.items():
        assert tuple(one.loc[z, ["ncr_pixels", "ed_pixels", "et_pixels"]]) == (ncr, ed, et)
        assert one.loc[z, "tumor_pixels"] == ncr + ed + et
    labels = table.set_index(["subject_id", "slice"])["label"]
    for sid, grade in [("BraTS20_Training_001", "HGG"), ("BraTS20_Training_002", "LGG")]:
        assert labels[sid, 3] == "healthy" and labels[sid, 7] == "healthy"  # 5 and 9 pixels < 10
        assert labels[sid, 5] == grade and labels[sid, 8] == grade  # 20 and 10 pixels
        assert labels[sid, 1] == "healthy"
    np.testing.assert_allclose(one["brain_fraction"], 24 * 20 / 24**2)  # square 24x24 brain crop
    assert (one["brain_pixels"] == 480).all()
    assert table["row"].tolist() == list(range(len(table)))


def test_brain_fraction_threshold_and_frame(hand_tree, tmp_path):
    prep = PrepConfig(image_size=16, min_brain_fraction=0.0, crop="none")
    table = load_slice_table(prepare_cache(hand_tree.root, tmp_path, prep, progress=False))
    one = table[table["subject_id"] == "BraTS20_Training_001"].set_index("slice")
    assert list(one.index) == list(range(1, 11))  # only empty slices dropped
    assert one.loc[10, "brain_fraction"] == pytest.approx(4 / 32**2)
    assert one.loc[5, "brain_fraction"] == pytest.approx(480 / 32**2)


def test_cache_file_layout(hand_tree, tmp_path):
    path = prepare_cache(hand_tree.root, tmp_path, PrepConfig(image_size=16), progress=False)
    assert path.name.startswith("cache_") and len(path.stem) == len("cache_") + 12
    assert path.with_suffix(".csv").is_file()
    with h5py.File(path) as f:
        images, masks = f["images"], f["masks"]
        assert images.dtype == np.float16 and images.shape == (18, 4, 16, 16)
        assert images.chunks == (1, 4, 16, 16)
        assert masks.dtype == np.uint8 and masks.shape == (18, 16, 16)
        assert set(np.unique(masks[()])) <= {0, 1, 2, 4}
        assert f.attrs["image_size"] == 16 and f.attrs["crop"] == "brain"
        assert f.attrs["complete"]
        x = images[()].astype(np.float32)
    assert np.isfinite(x).all() and abs(x[x != 0].mean()) < 0.3


def test_normalise_clips_and_zscores_over_brain():
    rng = np.random.default_rng(0)
    v = np.zeros((20, 20, 10), np.float32)
    v[5:15, 5:15] = rng.normal(500, 50, (10, 10, 10))
    v[6, 6, 6] = 1e6  # an outlier the clipping removes
    out = normalise(v)
    brain = v != 0
    assert (out[~brain] == 0).all()
    assert abs(out[brain].mean()) < 1e-4 and abs(out[brain].std() - 1) < 1e-4
    assert out.max() < 4


def test_resize_is_real_interpolation():
    xx, yy = np.meshgrid(np.linspace(0, 1, 90), np.linspace(0, 2, 70), indexing="ij")
    image = np.repeat((xx + yy)[None, :, :, None], 4, axis=0).astype(np.float32)
    seg = np.zeros((90, 70, 1), np.uint8)
    seg[30:60, 20:50] = 4
    x, m = resize_slices(image, seg, 37)
    assert x.shape == (1, 4, 37, 37) and m.shape == (1, 37, 37)
    assert (np.diff(x[0, 0], axis=0) > 0).all() and (np.diff(x[0, 0], axis=1) > 0).all()
    assert x.min() >= 0 and x.max() <= 3
    assert set(np.unique(m)) == {0, 4}
    # np.resize (the original project's bug) tiles the array instead: not monotone
    assert not (np.diff(np.resize(image[0, :, :, 0], (37, 37)), axis=0) > 0).all()


def test_reuse_is_fast_and_settings_change_the_file(hand_tree, tmp_path):
    prep = PrepConfig(image_size=16)
    first = prepare_cache(hand_tree.root, tmp_path, prep, progress=False)
    t0 = time.perf_counter()
    again = prepare_cache(hand_tree.root, tmp_path, prep, progress=False)
    assert again == first and time.perf_counter() - t0 < 0.5
    same = PrepConfig(image_size=16, workers=2, modalities=("t1ce", "flair"))
    assert prepare_cache(hand_tree.root, tmp_path, same, progress=False) == first
    other = prepare_cache(hand_tree.root, tmp_path, PrepConfig(image_size=24), progress=False)
    assert other != first and other.is_file()
    sub = hand_tree.root / "BraTS20_Training_002" / "BraTS20_Training_002_t2.nii"
    os.utime(sub, ns=(1, 1))  # the source changed: a new cache
    assert prepare_cache(hand_tree.root, tmp_path, prep, progress=False) not in (first, other)


def _cache_files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_interrupted_build_leaves_no_complete_looking_cache(hand_tree, tmp_path, monkeypatch):
    real_write, calls = cache._write_subject, []

    def failing_write(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the user stopped it mid-write
        real_write(*args)

    monkeypatch.setattr(cache, "_write_subject", failing_write)
    out = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        prepare_cache(hand_tree.root, out, PrepConfig(image_size=16), progress=False)
    assert _cache_files(out) == []
    monkeypatch.setattr(cache, "_write_subject", real_write)

    # killed between the two renames: the CSV exists but the H5 does not, so it is no cache
    real_replace = os.replace

    def replace_once(src, dst):
        if str(dst).endswith(".h5"):
            raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(cache.os, "replace", replace_once)
    with pytest.raises(OSError):
        prepare_cache(hand_tree.root, out, PrepConfig(image_size=16), progress=False)
    assert [n.endswith(".csv") for n in _cache_files(out)] == [True]
    monkeypatch.setattr(cache.os, "replace", real_replace)

    path = prepare_cache(hand_tree.root, out, PrepConfig(image_size=16), progress=False)
    assert len(load_slice_table(path)) == 18
    assert _cache_files(out) == [path.with_suffix(".csv").name, path.name]


KILLED_BUILD = """
import os, sys, time
from pathlib import Path
from kdlib.data import cache


def slow(record, prep):  # a pool worker that says who it is, then works for two minutes
    Path(sys.argv[3], f"worker-{os.getpid()}").touch()
    time.sleep(120)


if __name__ == "__main__":
    cache.process_subject = slow
    cache.prepare_cache(sys.argv[1], sys.argv[2], cache.PrepConfig(image_size=16, workers=2),
                        progress=False)
"""


def _wait_until(condition, seconds: float, proc=None) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
            return False
        time.sleep(0.1)
    return True


def test_killed_parallel_build_leaves_no_workers_and_no_temp_files(hand_tree, tmp_path):
    """SIGKILL a real `prepare_cache(workers=2)` process mid-build: its pool workers exit at
    once, and the next build removes the temporary files it left."""
    script, out, marks = tmp_path / "build.py", tmp_path / "c", tmp_path / "marks"
    script.write_text(KILLED_BUILD)
    marks.mkdir()
    root = str(Path(kdlib.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script), str(hand_tree.root), str(out),
                             str(marks)], env=env)
    workers: list[int] = []
    try:
        assert _wait_until(lambda: len(list(marks.iterdir())) == 2, 120, proc), "no busy workers"
        workers = [int(p.name.split("-")[1]) for p in marks.iterdir()]
        assert _cache_files(out) and all(".tmp-" in n for n in _cache_files(out))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        assert _wait_until(lambda: not any(pid_alive(w) for w in workers), 15), (
            "pool workers outlived their killed parent")
    finally:
        for pid in [proc.pid] * (proc.poll() is None) + [w for w in workers if pid_alive(w)]:
            os.kill(pid, signal.SIGKILL)
        proc.wait()
    assert all(".tmp-" in n for n in _cache_files(out))
    path = prepare_cache(hand_tree.root, out, PrepConfig(image_size=16), progress=False)
    assert _cache_files(out) == [path.with_suffix(".csv").name, path.name]


def test_parallel_workers_give_the_same_cache(nifti_tree, tmp_path):
    tree = nifti_tree(n_hgg=3, n_lgg=2)
    a = prepare_cache(tree.root, tmp_path / "a", PrepConfig(image_size=16), progress=False)
    b = prepare_cache(
        tree.root, tmp_path / "b", PrepConfig(image_size=16, workers=2), progress=False
    )
    pd.testing.assert_frame_equal(load_slice_table(a), load_slice_table(b))
    with h5py.File(a) as fa, h5py.File(b) as fb:
        np.testing.assert_array_equal(fa["images"][()], fb["images"][()])
        np.testing.assert_array_equal(fa["masks"][()], fb["masks"][()])


def test_h5_source_gives_the_same_table_and_masks(nifti_tree, h5_tree, tmp_path):
    nifti = nifti_tree()
    h5 = h5_tree(subjects=nifti.subjects)
    prep = PrepConfig(image_size=16)
    a = prepare_cache(nifti.root, tmp_path / "a", prep, progress=False)
    b = prepare_cache(h5.root, tmp_path / "b", prep, progress=False)
    ta, tb = load_slice_table(a), load_slice_table(b)
    cols = ["subject_id", "grade", "slice", "brain_pixels", "tumor_pixels", "label"]
    pd.testing.assert_frame_equal(ta[cols], tb[cols])
    with h5py.File(a) as fa, h5py.File(b) as fb:
        np.testing.assert_array_equal(fa["masks"][()], fb["masks"][()])
        assert fb.attrs["fmt"] == "h5"


def test_empty_after_filtering(hand_tree, tmp_path):
    with pytest.raises(DataError, match="lower min_brain_fraction"):
        prepare_cache(
            hand_tree.root,
            tmp_path / "c",
            PrepConfig(image_size=16, min_brain_fraction=0.95),
            progress=False,
        )
    assert _cache_files(tmp_path / "c") == []


def test_summary_counts(hand_tree, tmp_path):
    table = load_slice_table(
        prepare_cache(
            hand_tree.root, tmp_path, PrepConfig(image_size=16, min_tumor_pixels=10), progress=False
        )
    )
    summary = cache_summary(table)
    assert summary.loc["HGG"].to_dict() == {
        "subjects": 1,
        "slices": 9,
        "healthy": 7,
        "HGG": 2,
        "LGG": 0,
    }
    assert summary.loc["LGG"].to_dict() == {
        "subjects": 1,
        "slices": 9,
        "healthy": 7,
        "HGG": 0,
        "LGG": 2,
    }
    assert summary.loc["total", "slices"] == 18


def test_load_slice_table_rejects_incomplete(hand_tree, tmp_path):
    path = prepare_cache(hand_tree.root, tmp_path, PrepConfig(image_size=16), progress=False)
    csv = path.with_suffix(".csv")
    pd.read_csv(csv).iloc[:-1].to_csv(csv, index=False)
    with pytest.raises(DataError, match="does not match"):
        load_slice_table(path)
    csv.unlink()
    with pytest.raises(DataError, match="not a complete slice cache"):
        load_slice_table(path)


@pytest.mark.parametrize(
    "bad",
    [
        {"image_size": 4},
        {"modalities": ("flair", "dwi")},
        {"modalities": ()},
        {"modalities": ("t1", "t1")},
        {"min_tumor_pixels": 0},
        {"min_brain_fraction": 1.5},
        {"crop": "centre"},
        {"workers": 0},
        {"clip_percentiles": (99, 1)},
    ],
)
def test_prep_config_validation(bad):
    with pytest.raises(ConfigError):
        PrepConfig(**bad)


def test_prep_config_defaults():
    prep = PrepConfig()
    assert prep.image_size == 64 and prep.modalities == MODALITIES and prep.crop == "brain"
    assert PrepConfig(modalities=["t2", "flair"]).modalities == ("t2", "flair")

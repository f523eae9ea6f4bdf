"""kdlib.data.loader: tensors and masks from the cache, batched augmentation, epoch samplers."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from helpers_train import make_cache

from kdlib import CLASSES
from kdlib.data.loader import (
    augment_batch,
    class_counts,
    epoch_indices,
    epoch_length,
    host_to_device,
    load_masks,
    load_tensors,
)
from kdlib.errors import DataError


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("cache"), n_hgg=3, n_lgg=2, slices=4, size=16)


def test_load_tensors_reads_requested_rows_and_channels_in_table_order(cache):
    table = pd.read_csv(cache.with_suffix(".csv"))
    pick = table.iloc[[7, 2, 15, 2, 0, 11]]  # unsorted, with a duplicate
    x, y = load_tensors(cache, pick, ["t2", "flair"], "cpu")
    with h5py.File(cache) as f:
        want = f["images"][:][pick["row"].to_numpy()][:, [3, 0]]
    assert x.shape == (6, 2, 16, 16) and x.dtype == torch.float16
    assert np.array_equal(x.numpy(), want)
    assert y.dtype == torch.long
    assert [CLASSES[i] for i in y.tolist()] == pick["label"].tolist()


def test_load_tensors_whole_table_float32(cache):
    table = pd.read_csv(cache.with_suffix(".csv"))
    x, y = load_tensors(cache, table, ["flair", "t1", "t1ce", "t2"], "cpu", dtype=torch.float32)
    with h5py.File(cache) as f:
        assert np.array_equal(x.numpy(), f["images"][:].astype(np.float32))
    assert class_counts(y) == [table.label.eq(c).sum() for c in CLASSES]


def test_load_tensors_errors(cache, tmp_path):
    table = pd.read_csv(cache.with_suffix(".csv"))
    with pytest.raises(DataError, match="does not exist"):
        load_tensors(tmp_path / "nope.h5", table, ["flair"])
    with pytest.raises(DataError, match="subset of"):
        load_tensors(cache, table, ["dwi"])
    with pytest.raises(DataError, match="do not belong together"):
        load_tensors(cache, table.assign(row=table.row + 1000), ["flair"])
    with pytest.raises(DataError, match="labels"):
        load_tensors(cache, table.assign(label="tumour"), ["flair"])


def test_a_process_reads_a_cache_file_once_and_again_when_it_changes(tmp_path, monkeypatch):
    from kdlib.data import loader

    path = make_cache(tmp_path, n_hgg=3, n_lgg=2, slices=4, size=8)
    table = pd.read_csv(path.with_suffix(".csv"))
    opened = []
    real = h5py.File
    monkeypatch.setattr(loader.h5py, "File", lambda *a, **k: opened.append(a[0]) or real(*a, **k))
    loader.forget_kept()
    x1, _ = load_tensors(path, table, ["t1", "flair"])  # a training set: read and kept
    part = table.iloc[[9, 3, 3, 0]]  # then a small validation part of the same file
    x2, y2 = load_tensors(path, part, ["t1", "flair"], dtype=torch.float32)
    assert len(opened) == 1  # the second call did not open the file
    with h5py.File(path) as f:
        images = f["images"][:]
    assert np.array_equal(x1.numpy(), images[:, [1, 0]])
    assert np.array_equal(x2.numpy(), images[part["row"].to_numpy()][:, [1, 0]].astype(np.float32))
    assert [CLASSES[i] for i in y2.tolist()] == part["label"].tolist()
    with h5py.File(path, "r+") as f:  # the cache is rebuilt in place: new size or mtime
        f["images"][0] = -7
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    opened.clear()
    x3, _ = load_tensors(path, table, ["t1"])
    assert len(opened) == 1 and (x3[0] == -7).all()
    other = make_cache(tmp_path / "b", n_hgg=2, n_lgg=2, slices=4, size=8, seed=1)
    load_tensors(other, pd.read_csv(other.with_suffix(".csv")), ["t1"])
    assert len(loader._KEPT) == 1 and str(other.resolve()) in next(iter(loader._KEPT))[0]
    opened.clear()
    load_tensors(path, table.iloc[:2], ["t1"])  # a few rows of a file not kept: read, not kept
    assert len(opened) == 1 and str(other.resolve()) == next(iter(loader._KEPT))[0]
    loader.forget_kept()
    assert not loader._KEPT


def test_load_masks_in_table_order_with_repeats(cache):
    table = pd.read_csv(cache.with_suffix(".csv"))
    pick = table.iloc[[7, 0, 12, 3, 12]]  # unsorted, with a duplicate
    with h5py.File(cache, "r") as f:
        want = np.stack([f["masks"][r] for r in pick["row"]])
    masks = load_masks(cache, pick)
    assert masks.dtype == np.uint8 and masks.shape == (5, 16, 16)
    np.testing.assert_array_equal(masks, want)
    assert masks[0].any() and masks[3].any() and not masks[1].any()  # tumour, healthy slices
    assert load_masks(cache, table.iloc[:0]).shape == (0, 16, 16)
    with pytest.raises(DataError, match="does not exist"):
        load_masks(cache.with_name("none.h5"), pick)


def _x(n=6, c=2, s=8):
    return torch.arange(n * c * s * s, dtype=torch.float32).reshape(n, c, s, s) / 100


def test_augment_shapes_dtype_and_determinism():
    x = _x().half()
    a = augment_batch(x, torch.Generator().manual_seed(3))
    b = augment_batch(x, torch.Generator().manual_seed(3))
    c = augment_batch(x, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and a.dtype == torch.float16
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("rotation", [0.0, 1e-6])
def test_augment_flip_only_gives_one_of_the_four_flips(rotation):
    x = _x(n=32)
    out = augment_batch(x, torch.Generator().manual_seed(0), flip=True, max_rotation_deg=rotation,
                        intensity_jitter=0)
    kinds = set()
    for i in range(len(x)):
        options = [x[i], x[i].flip(-1), x[i].flip(-2), x[i].flip(-1).flip(-2)]
        match = [k for k, o in enumerate(options) if torch.allclose(out[i], o, atol=1e-4)]
        assert match, f"sample {i} is not a flip of its input"
        kinds.add(match[0])
    assert kinds == {0, 1, 2, 3}


def test_augment_off_is_identity_and_jitter_is_affine_per_channel():
    x = _x()
    g = torch.Generator().manual_seed(0)
    assert torch.equal(augment_batch(x, g, flip=False, max_rotation_deg=0, intensity_jitter=0), x)
    out = augment_batch(x, g, flip=False, max_rotation_deg=0, intensity_jitter=0.1)
    for i in range(len(x)):
        for c in range(x.shape[1]):
            a, b = np.polyfit(x[i, c].flatten().numpy(), out[i, c].flatten().numpy(), 1)
            assert 0.9 - 1e-4 <= a <= 1.1 + 1e-4 and -0.1 - 1e-4 <= b <= 0.1 + 1e-4


def test_augment_rotation_is_small_and_keeps_the_centre():
    x = torch.zeros(4, 1, 17, 17)
    x[:, :, 8, 8] = 1.0
    out = augment_batch(x, torch.Generator().manual_seed(0), flip=False, max_rotation_deg=10,
                        intensity_jitter=0)
    assert out.shape == x.shape
    assert torch.allclose(out[:, 0, 8, 8], torch.ones(4), atol=1e-4)  # centre pixel stays put
    y = torch.zeros(4, 1, 17, 17)
    y[:, :, 8, 16] = 1.0
    rot = augment_batch(y, torch.Generator().manual_seed(0), flip=False, max_rotation_deg=10,
                        intensity_jitter=0)
    assert not torch.equal(rot, y)
    assert rot[:, 0, :, 14:].sum() > 0.5 * rot.sum()  # an edge pixel moves only a little


def test_samplers_balance_and_length():
    y = torch.tensor([0] * 300 + [1] * 60 + [2] * 15)
    g = torch.Generator().manual_seed(0)
    none = epoch_indices(y, "none", g)
    assert sorted(none.tolist()) == list(range(len(y)))
    over = epoch_indices(y, "oversample", g)
    assert len(over) == len(y) == epoch_length(y, "oversample")
    frac = torch.bincount(y[over], minlength=3).float() / len(over)
    assert torch.all((frac - 1 / 3).abs() < 0.06), frac
    under = epoch_indices(y, "undersample", g)
    assert torch.bincount(y[under]).tolist() == [15, 15, 15]
    assert len(set(under.tolist())) == 45 == epoch_length(y, "undersample")
    a = epoch_indices(y, "oversample", torch.Generator().manual_seed(5))
    b = epoch_indices(y, "oversample", torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    with pytest.raises(DataError, match="oversample"):
        epoch_indices(y, "smote", g)


class _FakeTensor:
    """Records how host_to_device moves it."""

    def __init__(self, calls):
        self.calls = calls

    def pin_memory(self):
        self.calls.append("pin_memory")
        return self

    def to(self, device, non_blocking=False):
        self.calls.append(("to", str(device), non_blocking))
        return self


def test_host_to_device_pins_and_does_not_block_for_cuda_only():
    calls = []
    host_to_device(_FakeTensor(calls), torch.device("cuda:0"))
    assert calls == ["pin_memory", ("to", "cuda:0", True)]
    calls.clear()
    host_to_device(_FakeTensor(calls), torch.device("cpu"))
    assert calls == [("to", "cpu", False)]


def test_augment_moves_its_random_numbers_with_host_to_device(monkeypatch):
    import kdlib.data.loader as L

    moved = []
    monkeypatch.setattr(L, "host_to_device", lambda t, dev: moved.append(t.shape) or t.to(dev))
    augment_batch(_x(n=4, c=2), torch.Generator().manual_seed(0))
    assert moved == [(4, 2, 3), (2, 4, 2, 1, 1)]  # the affine matrices, the jitter

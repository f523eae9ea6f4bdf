"""Slices as tensors in memory (on the GPU when there is one), batched augmentation, epoch samplers.

The whole training set is one tensor on the device; a batch is an index into it, augmented on the
device as one batch. There is no per-sample Dataset/DataLoader: the GPU never waits for the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from kdlib import CLASSES, MODALITIES
from kdlib.errors import DataError

SAMPLERS: tuple[str, ...] = ("none", "oversample", "undersample")
READ_CHUNK = 1024  # rows per HDF5 read: bounds the host memory used while loading
KEEP_FRACTION = 0.25  # a request for this share of a cache's slices reads and keeps all of it
KEEP_BYTES = 8 * 2**30  # the largest cache kept in memory (BraTS2020 at 128 px: about 5 GB)
_KEPT: dict[tuple[str, int, int], np.ndarray] = {}  # (path, size, mtime) -> images; one entry


def load_tensors(
    cache_h5: str | Path,
    table: pd.DataFrame,
    modalities: Sequence[str] = MODALITIES,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the slices `table.row` and channels `modalities` of a cache: x (N,C,S,S), y (N,).

    Rows are read in increasing order (what HDF5 fancy indexing needs), in chunks, then put back in
    table order; `y` holds the index of `table.label` in CLASSES. Both tensors live on `device`.
    A request for at least KEEP_FRACTION of a cache's slices reads the whole cache once and keeps
    it in this process's memory (one cache file, at most KEEP_BYTES), so a worker that trains many
    runs reads the file once; a rewritten file (other size or mtime) is read again.
    """
    path = Path(cache_h5)
    if not path.is_file():
        raise DataError(f"slice cache {path} does not exist; build it with "
                        "kdlib.data.cache.prepare_cache")
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown or not modalities:
        raise DataError(f"modalities {list(modalities)} must be a non-empty subset of "
                        f"{list(MODALITIES)}")
    bad = sorted(set(table["label"]) - set(CLASSES))
    if bad:
        raise DataError(f"slice table of {path} has labels {bad}; valid labels: {list(CLASSES)}")
    channels = [MODALITIES.index(m) for m in modalities]
    rows = table["row"].to_numpy(dtype=np.int64)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    images = _KEPT.get(key)
    if images is None:
        with h5py.File(path, "r") as f:
            if "images" not in f:
                raise DataError(f"{path} has no 'images' dataset; rebuild the cache")
            dataset = f["images"]
            _check_rows(path, rows, len(dataset))
            if len(rows) < KEEP_FRACTION * len(dataset) or dataset.nbytes > KEEP_BYTES:
                x = _read_rows(dataset, rows, channels, device, dtype)
            else:
                _KEPT.clear()  # one cache file at a time
                images = _KEPT[key] = dataset[()]
    else:
        _check_rows(path, rows, len(images))
    if images is not None:
        x = torch.empty((len(rows), len(channels), *images.shape[2:]), dtype=dtype, device=device)
        for start in range(0, len(rows), READ_CHUNK):
            block = images[np.ix_(rows[start:start + READ_CHUNK], channels)]
            x[start:start + len(block)] = torch.from_numpy(block).to(device=device, dtype=dtype)
    labels = table["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy(dtype=np.int64)
    return x, torch.tensor(labels, device=device)


def _check_rows(path: Path, rows: np.ndarray, n: int) -> None:
    if len(rows) and (rows.min() < 0 or rows.max() >= n):
        raise DataError(f"slice table rows reach {rows.max()} but {path} holds {n} images; "
                        "the table and the cache do not belong together, rebuild the cache")


def forget_kept() -> None:
    """Free the slice cache kept in memory by load_tensors (it is read again when needed)."""
    _KEPT.clear()


def _read_rows(images: h5py.Dataset, rows: np.ndarray, channels: list[int],
               device: str | torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Read the rows of an HDF5 dataset in chunks of increasing rows, put back in table order."""
    unique_rows, inverse = np.unique(rows, return_inverse=True)
    # table positions grouped by unique row: unique row u goes to dest[bounds[u]:bounds[u + 1]]
    dest = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[dest], np.arange(len(unique_rows) + 1))
    x = torch.empty((len(rows), len(channels), *images.shape[2:]), dtype=dtype, device=device)
    for start in range(0, len(unique_rows), READ_CHUNK):
        chunk = unique_rows[start:start + READ_CHUNK]
        lo, hi = int(chunk[0]), int(chunk[-1]) + 1
        if hi - lo <= 2 * len(chunk):  # dense: one contiguous read beats fancy indexing
            block = images[lo:hi][chunk - lo]
        else:
            block = images[chunk]
        block = torch.from_numpy(np.ascontiguousarray(block[:, channels]))
        a, b = bounds[start], bounds[start + len(chunk)]
        src = torch.as_tensor(inverse[dest[a:b]] - start)
        x[torch.as_tensor(dest[a:b], device=device)] = block[src].to(device=device, dtype=dtype)
    return x


def load_masks(cache_h5: str | Path, table: pd.DataFrame) -> np.ndarray:
    """The segmentation masks (N, S, S) uint8 of the slices `table.row` of a cache, in table order
    (for plots; training reads only the images, load_tensors)."""
    path = Path(cache_h5)
    if not path.is_file():
        raise DataError(f"slice cache {path} does not exist; build it with "
                        "kdlib.data.cache.prepare_cache")
    rows = table["row"].to_numpy(dtype=np.int64)
    unique_rows, inverse = np.unique(rows, return_inverse=True)  # HDF5 reads increasing rows
    with h5py.File(path, "r") as f:
        masks = f["masks"][unique_rows]
    return masks[inverse]


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a CPU tensor to `device`; to CUDA through pinned memory, without blocking the host.

    A copy from pageable memory makes the host wait for the GPU stream (a sync per batch). Pinned
    memory comes from PyTorch's caching host allocator, which keeps the block until the copy ran.
    """
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def augment_batch(
    x: torch.Tensor,
    generator: torch.Generator,
    flip: bool = True,
    max_rotation_deg: float = 10.0,
    intensity_jitter: float = 0.1,
) -> torch.Tensor:
    """Augment a batch (N,C,H,W) at once: random horizontal/vertical flips (p=0.5 each), a rotation
    by U(-max, max) degrees (bilinear, zero padding), and per-sample per-channel x*(1+a)+b with
    a, b ~ U(-jitter, jitter).

    Flips and rotation are one affine resampling (one grid_sample, so a flip is exact up to float
    rounding of the sampling grid). The random numbers come from `generator` (a CPU
    torch.Generator): the result depends only on its state, on every device. They reach a GPU by
    `host_to_device` (no host-device sync). Computed in float32, returned in x's dtype.
    """
    n, c = x.shape[:2]
    dev = x.device
    out = x.float()
    if flip or max_rotation_deg > 0:
        sign = torch.ones(2, n)
        if flip:
            sign = torch.where(torch.rand(2, n, generator=generator) < 0.5, -1.0, 1.0)
        angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(max_rotation_deg)
        cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros(n)
        # output -> input coordinates: the rotation after the flips diag(sign_x, sign_y)
        theta = torch.stack([torch.stack([cos * sign[0], -sin * sign[1], zero], 1),
                             torch.stack([sin * sign[0], cos * sign[1], zero], 1)], 1)
        grid = F.affine_grid(host_to_device(theta, dev), list(out.shape), align_corners=False)
        out = F.grid_sample(out, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if intensity_jitter > 0:
        ab = host_to_device((torch.rand(2, n, c, 1, 1, generator=generator) * 2 - 1)
                            * intensity_jitter, dev)
        out = torch.addcmul(ab[1], out, 1 + ab[0]) if out is x else out.mul_(1 + ab[0]).add_(ab[1])
    return out.to(x.dtype)


def class_counts(y: torch.Tensor, num_classes: int = len(CLASSES)) -> list[int]:
    """Number of samples of each class index 0..num_classes-1."""
    return torch.bincount(y.detach().cpu(), minlength=num_classes).tolist()


def epoch_indices(y: torch.Tensor, sampler: str, generator: torch.Generator) -> torch.Tensor:
    """The sample order of one epoch (CPU LongTensor).

    none: a permutation of all samples. oversample: N draws with replacement, weights 1/n_c (classes
    equally likely, same epoch length). undersample: every class cut to the smallest class count
    (without replacement), shuffled.
    """
    if sampler not in SAMPLERS:
        raise DataError(f"sampler={sampler!r} is not valid; choose one of {list(SAMPLERS)}")
    y = y.detach().cpu()
    n = len(y)
    if sampler == "none":
        return torch.randperm(n, generator=generator)
    counts = torch.bincount(y)
    if sampler == "oversample":
        weights = 1.0 / counts[y].double()
        return torch.multinomial(weights, n, replacement=True, generator=generator)
    smallest = int(counts[counts > 0].min())
    parts = []
    for c in torch.nonzero(counts).flatten().tolist():
        members = torch.nonzero(y == c).flatten()
        parts.append(members[torch.randperm(len(members), generator=generator)[:smallest]])
    chosen = torch.cat(parts)
    return chosen[torch.randperm(len(chosen), generator=generator)]


def epoch_length(y: torch.Tensor, sampler: str) -> int:
    """Number of samples epoch_indices(y, sampler, ...) returns (fixed for a given y)."""
    if sampler != "undersample":
        return len(y)
    counts = torch.bincount(y.detach().cpu())
    return int(counts[counts > 0].min()) * int((counts > 0).sum())

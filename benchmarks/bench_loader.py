"""Loader throughput: kdlib's in-memory tensors + batched augmentation vs a per-sample pipeline.

Both produce the same thing: augmented float32 batches (64, 4, 64, 64) with a random flip, a
rotation of up to 10 degrees and per-channel intensity jitter, one epoch over N slices.
- kdlib: `load_tensors` from an HDF5 slice cache once, then per batch an index into the tensor and
  `augment_batch` on the whole batch;
- per sample (the original project's way): one .npy file per slice, read in `__getitem__`, PIL
  flips/rotation per channel, torch DataLoader with 0 and 2 worker processes.

Prints figures, asserts nothing. `python benchmarks/bench_loader.py [--n 2048]`
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from kdlib import CLASSES
from kdlib.data.loader import augment_batch, epoch_indices, load_tensors

SIZE, CHANNELS, BATCH = 64, 4, 64


def write_data(folder: Path, n: int, npy: bool = True) -> tuple[Path, pd.DataFrame, list[Path]]:
    """The same n random slices as an HDF5 cache (+ table) and as one .npy file per slice."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(n, CHANNELS, SIZE, SIZE)).astype(np.float16)
    labels = rng.choice(CLASSES, size=n, p=[0.5, 0.35, 0.15])
    cache = folder / "cache.h5"
    with h5py.File(cache, "w") as f:
        f.create_dataset("images", data=images, chunks=(1, CHANNELS, SIZE, SIZE))
    table = pd.DataFrame({"row": np.arange(n), "label": labels})
    files = []
    for i in range(n if npy else 0):
        files.append(folder / f"slice_{i:05d}.npy")
        np.save(files[-1], images[i])
    return cache, table, files


class PerSlice(Dataset):
    """One .npy file per slice, augmented per sample with PIL (one random draw for all channels)."""

    def __init__(self, files: list[Path], labels: list[int]) -> None:
        self.files, self.labels = files, labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        a = np.load(self.files[i]).astype(np.float32)
        hflip, vflip = random.random() < 0.5, random.random() < 0.5
        angle = random.uniform(-10, 10)
        out = []
        for ch in a:
            img = Image.fromarray(ch, mode="F")
            img = TF.hflip(img) if hflip else img
            img = TF.vflip(img) if vflip else img
            img = TF.rotate(img, angle, interpolation=TF.InterpolationMode.BILINEAR)
            out.append(np.asarray(img))
        x = torch.from_numpy(np.stack(out))
        jitter = (torch.rand(2, CHANNELS, 1, 1) * 2 - 1) * 0.1
        return x * (1 + jitter[0]) + jitter[1], self.labels[i]


def per_sample(files: list[Path], labels: list[int], workers: int, device: str = "cpu",
               batch: int = BATCH) -> float:
    """Images/s of the second epoch of a DataLoader over PerSlice (workers kept alive), the
    batches moved to `device`."""
    cuda = device.startswith("cuda")
    loader = DataLoader(PerSlice(files, labels), batch_size=batch, shuffle=True,
                        num_workers=workers, persistent_workers=workers > 0, pin_memory=cuda)
    for _ in loader:  # first epoch: page cache, worker start-up
        pass
    t = time.perf_counter()
    n = sum(len(xb.to(device, non_blocking=True)) for xb, _ in loader)
    if cuda:
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def in_memory(cache: Path, table: pd.DataFrame, threads: int, device: str = "cpu",
              batch: int = BATCH) -> tuple[float, float]:
    """(seconds to load the cache into a tensor on `device`, images/s of the second augmented
    epoch)."""
    torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    t = time.perf_counter()
    x, y = load_tensors(cache, table, ("flair", "t1", "t1ce", "t2"), device)
    sync()
    load_s = time.perf_counter() - t
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        t = time.perf_counter()
        n = 0
        for idx in torch.split(epoch_indices(y, "none", g), batch):
            n += len(augment_batch(x[idx.to(x.device)].float(), g))
        sync()
    return load_s, n / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048, help="number of slices")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache, table, files = write_data(Path(tmp), args.n)
        labels = table["label"].map(CLASSES.index).tolist()
        threads = torch.get_num_threads()
        print(f"{args.n} slices, {CHANNELS} x {SIZE} x {SIZE}, batch {BATCH}, flips + rotation "
              f"+ intensity jitter, {os.cpu_count()} cores")
        for n in sorted({1, threads}):
            load_s, ips = in_memory(cache, table, n)
            print(f"{f'kdlib in-memory + augment_batch, {n} thread(s)':<44} {ips:9.0f} img/s"
                  f"   (load_tensors once: {load_s:.2f} s)", flush=True)
        torch.set_num_threads(threads)
        for workers in (0, 2):
            ips_ps = per_sample(files, labels, workers)
            name = f"per-sample .npy + PIL, DataLoader {workers} workers"
            print(f"{name:<44} {ips_ps:9.0f} img/s", flush=True)


if __name__ == "__main__":
    main()

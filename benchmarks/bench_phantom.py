"""Throughput of the synthetic BraTS2020 generator: seconds per subject and for a demo dataset.

Run: python benchmarks/bench_phantom.py   (set OMP_NUM_THREADS=1 for numbers that match one core)
"""

from __future__ import annotations

import tempfile
import time

from kdlib.data.phantom import PhantomConfig, _templates, phantom_subject
from kdlib.data.phantom_files import make_phantom


def per_subject(shape: tuple[int, int, int], n: int) -> float:
    """Mean seconds of phantom_subject at `shape` (templates cached beforehand)."""
    cfg = PhantomConfig(shape=shape)
    t = time.perf_counter()
    _templates(shape)
    print(f"  templates for {shape}: {time.perf_counter() - t:.2f} s (once per process and shape)")
    t = time.perf_counter()
    for i in range(1, n + 1):
        phantom_subject(i, "HGG" if i % 2 else "LGG", cfg)
    return (time.perf_counter() - t) / n


def dataset(cfg: PhantomConfig) -> float:
    """Seconds to write a whole dataset with make_phantom (files included)."""
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        make_phantom(out, cfg, progress=False)
        return time.perf_counter() - t


def main() -> None:
    demo, real = (96, 96, 64), (240, 240, 155)
    print(f"phantom_subject at {demo}: {per_subject(demo, 10):.3f} s/subject")
    print(f"phantom_subject at {real}: {per_subject(real, 3):.2f} s/subject")
    cfg = PhantomConfig(n_hgg=48, n_lgg=12, shape=demo)
    print(f"make_phantom 48 HGG + 12 LGG at {demo} (NIfTI): {dataset(cfg):.1f} s")
    cfg = PhantomConfig(n_hgg=48, n_lgg=12, shape=demo, write_h5=True)
    print(f"make_phantom 48 HGG + 12 LGG at {demo} (NIfTI + H5): {dataset(cfg):.1f} s")
    cfg = PhantomConfig(n_hgg=1, n_lgg=1, shape=real, write_h5=True)
    print(f"make_phantom 2 subjects at {real} (NIfTI + H5): {dataset(cfg) / 2:.1f} s/subject")


if __name__ == "__main__":
    main()

"""Time the data layer on the phantom: prepare_cache cold and reused, the cache size, and how fast
the cache loads into tensors (what every training run does first).

    .venv/bin/python benchmarks/bench_cache.py [--subjects 60] [--shape 96 96 64]
        [--image-size 64] [--workers 1] [--fmt nifti|h5]

Everything lives in a temporary folder.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from kdlib import MODALITIES
from kdlib.data.cache import PrepConfig, load_slice_table, prepare_cache
from kdlib.data.loader import load_tensors
from kdlib.data.phantom import PhantomConfig
from kdlib.data.phantom_files import make_phantom


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=60)
    ap.add_argument("--shape", type=int, nargs=3, default=(96, 96, 64))
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--fmt", choices=("nifti", "h5"), default="nifti")
    args = ap.parse_args()
    n, shape = args.subjects, tuple(args.shape)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n_lgg = max(1, round(n / 4.9))  # the BraTS ratio 293:76
        cfg = PhantomConfig(n_hgg=n - n_lgg, n_lgg=n_lgg, shape=shape, write_h5=args.fmt == "h5")
        t0 = time.perf_counter()
        root = make_phantom(tmp / "data", cfg, progress=False)
        t_data = time.perf_counter() - t0
        root = root.parent if args.fmt == "h5" else root
        prep = PrepConfig(image_size=args.image_size, workers=args.workers)
        t0 = time.perf_counter()
        path = prepare_cache(root, tmp / "cache", prep, fmt=args.fmt, progress=False)
        t_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert prepare_cache(root, tmp / "cache", prep, fmt=args.fmt, progress=False) == path
        t_reuse = time.perf_counter() - t0
        table = load_slice_table(path)
        t0 = time.perf_counter()
        x, _ = load_tensors(path, table, MODALITIES, "cpu")
        t_load = time.perf_counter() - t0
        mb = (path.stat().st_size + path.with_suffix(".csv").stat().st_size) / 2**20
    print(f"phantom ({args.fmt}): {n} subjects of {shape} written in {t_data:.1f} s "
          f"({t_data / n:.2f} s per subject)")
    print(f"prepare_cache (image_size={args.image_size}, workers={args.workers}): "
          f"{t_build:.2f} s total, {t_build / n * 1000:.0f} ms per subject, {len(table)} slices")
    print(f"reuse: {t_reuse * 1000:.1f} ms")
    print(f"cache size: {mb:.1f} MB ({mb / len(table) * 1024:.1f} KB per slice)")
    print(f"load into tensors: {len(table)} slices {tuple(x.shape[1:])} float16 in {t_load:.3f} s "
          f"= {len(table) / t_load:,.0f} slices/s")


if __name__ == "__main__":
    main()

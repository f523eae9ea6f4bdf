"""Time prepare_cache: a cold build, a reuse, and the cache size.

    .venv/bin/python benchmarks/bench_cache.py [--subjects 60] [--shape 96 96 64]
        [--image-size 64] [--workers 1] [--source auto|phantom|fixture] [--fmt nifti|h5]

The dataset comes from kdlib.data.phantom.make_phantom when it exists (source auto/phantom),
else from the test fixture writer in tests/conftest.py. Everything lives in a temporary folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

from kdlib.data.cache import PrepConfig, load_slice_table, prepare_cache

HERE = Path(__file__).resolve().parent


def write_fixture(out: Path, n: int, shape: tuple[int, int, int], fmt: str) -> Path:
    spec = importlib.util.spec_from_file_location(
        "kd_conftest", HERE.parent / "tests" / "conftest.py"
    )
    fx = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = fx  # dataclasses look their module up there
    spec.loader.exec_module(fx)
    n_lgg = max(1, round(n / 4.9))
    subjects = fx.synth_subjects(n - n_lgg, n_lgg, shape, seed=0)
    if fmt == "h5":
        return fx.write_h5_tree(out, subjects)
    return fx.write_nifti_tree(out, subjects)


def write_phantom(out: Path, n: int, shape: tuple[int, int, int], fmt: str) -> Path:
    from kdlib.data.phantom import PhantomConfig, make_phantom

    n_lgg = max(1, round(n / 4.9))
    cfg = PhantomConfig(n_hgg=n - n_lgg, n_lgg=n_lgg, shape=shape, seed=0, write_h5=fmt == "h5")
    root = make_phantom(out, cfg, progress=False)
    return root.parent if fmt == "h5" else root


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--subjects", type=int, default=60)
    ap.add_argument("--shape", type=int, nargs=3, default=(96, 96, 64))
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--source", choices=("auto", "phantom", "fixture"), default="auto")
    ap.add_argument("--fmt", choices=("nifti", "h5"), default="nifti")
    args = ap.parse_args()
    source = args.source
    if source == "auto":
        try:
            from kdlib.data.phantom import make_phantom  # noqa: F401

            source = "phantom"
        except ImportError:
            source = "fixture"
    shape = tuple(args.shape)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        write = write_phantom if source == "phantom" else write_fixture
        root = write(tmp / "data", args.subjects, shape, args.fmt)
        t_data = time.perf_counter() - t0
        prep = PrepConfig(image_size=args.image_size, workers=args.workers)
        t0 = time.perf_counter()
        path = prepare_cache(root, tmp / "cache", prep, fmt=args.fmt, progress=False)
        t_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert prepare_cache(root, tmp / "cache", prep, fmt=args.fmt, progress=False) == path
        t_reuse = time.perf_counter() - t0
        table = load_slice_table(path)
        mb = (path.stat().st_size + path.with_suffix(".csv").stat().st_size) / 2**20
    n = args.subjects
    print(f"data: {source} {args.fmt}, {n} subjects of {shape}, written in {t_data:.1f} s")
    print(
        f"prepare_cache (image_size={args.image_size}, workers={args.workers}): "
        f"{t_build:.2f} s total, {t_build / n * 1000:.0f} ms per subject, {len(table)} slices"
    )
    print(f"reuse: {t_reuse * 1000:.1f} ms")
    print(f"cache size: {mb:.1f} MB ({mb / len(table) * 1024:.1f} KB per slice)")


if __name__ == "__main__":
    main()

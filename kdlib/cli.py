"""`kdlib` / `python -m kdlib`: phantom, prepare, train, grid, run, strip (see `kdlib SUB --help`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kdlib import workbook
from kdlib.data.cache import cache_summary, load_slice_table
from kdlib.data.phantom import PhantomConfig
from kdlib.data.phantom_files import make_phantom
from kdlib.data.splits import load_splits, split_table
from kdlib.errors import KdlibError
from kdlib.grid import load_grid, run_grid
from kdlib.paths import profile_paths
from kdlib.pipeline import parse_overrides, run_profile, strip_outputs
from kdlib.train import fit
from kdlib.train_config import load_train_config


def _phantom(args: argparse.Namespace) -> None:
    cfg = PhantomConfig(n_hgg=args.hgg, n_lgg=args.lgg, shape=tuple(args.shape),
                        difficulty=args.difficulty, seed=args.seed, compress=args.compress,
                        write_h5=args.h5, workers=args.workers)
    print(make_phantom(args.out, cfg))


def _prepare(args: argparse.Namespace) -> None:
    phantom = {"n_hgg": args.hgg, "n_lgg": args.lgg, "shape": tuple(args.shape),
                   "difficulty": args.difficulty, "seed": args.seed, "workers": args.workers}
    ds = workbook.get_dataset(args.profile, args.source, args.data_root, phantom, args.volume_map)
    print(f"dataset: {ds['dataset']['root']} ({ds['dataset']['fmt']})")
    cache = workbook.build_cache(args.profile, {"image_size": args.image_size, "workers": args.workers})
    splits = workbook.build_splits(args.profile, {"design": args.design, "k_folds": args.folds,
                                                  "repeats": args.repeats, "seed": args.seed,
                                                  "test_fraction": args.test_fraction})
    table = load_slice_table(cache)
    print(f"cache:  {cache}\nsplits: {splits}\n")
    print("Subjects per grade and slices per class:")
    print(cache_summary(table).to_string())
    print("\nSlices per class per split of repeat 0 (cv: fold k = test set of the runs of fold k; "
          "holdout: validation fold k, test = held-out subjects):")
    print(split_table(load_splits(splits), table).to_string())


def _runs_dir(args: argparse.Namespace) -> Path:
    return args.runs_dir or profile_paths("cli").runs


def _train(args: argparse.Namespace) -> None:
    print(fit(load_train_config(args.config), _runs_dir(args)))


def _grid(args: argparse.Namespace) -> None:
    for path in run_grid(load_grid(args.config), _runs_dir(args), devices=args.devices):
        print(path)


def _run(args: argparse.Namespace) -> None:
    done = run_profile(args.profile, only=args.only, overrides=parse_overrides(args.param),
                       log_output=not args.quiet)
    print("\nexecuted notebooks:\n" + "\n".join(f"  {p}" for p in done))


def _strip(args: argparse.Namespace) -> None:
    for path in args.notebooks:
        print(f"{'stripped' if strip_outputs(path) else 'clean   '} {path}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `kdlib` command."""
    p = argparse.ArgumentParser(prog="kdlib", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def phantom_args(q: argparse.ArgumentParser, hgg: int, lgg: int, shape: list[int]) -> None:
        q.add_argument("--hgg", type=int, default=hgg, help="HGG subjects (default %(default)s)")
        q.add_argument("--lgg", type=int, default=lgg, help="LGG subjects (default %(default)s)")
        q.add_argument("--shape", type=int, nargs=3, default=shape, metavar=("X", "Y", "Z"),
                       help="volume shape (default %(default)s; the real one is 240 240 155)")
        q.add_argument("--difficulty", type=float, default=0.5,
                       help="grade overlap, 0 easy .. 1 hard (default %(default)s)")
        q.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
        q.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")

    q = sub.add_parser("phantom", help="write a synthetic BraTS2020 dataset in the real formats",
                       description="Write a synthetic BraTS2020 dataset (NIfTI tree, optionally the "
                                   "Kaggle H5 slices) built from the MNI152 anatomy.")
    q.add_argument("out", type=Path, help="output folder")
    phantom_args(q, 293, 76, [240, 240, 155])
    q.add_argument("--h5", action="store_true", help="also write the Kaggle H5 slice layout")
    q.add_argument("--compress", action="store_true", help="write .nii.gz instead of .nii")
    q.set_defaults(func=_phantom)

    q = sub.add_parser("prepare", help="dataset -> slice cache -> splits, and print the summary",
                       description="Generate (or locate) the dataset, build the slice cache and the "
                                   "subject-level splits of a profile, and print class tables.")
    q.add_argument("--profile", default="cli", help="output folder name (default %(default)s)")
    q.add_argument("--source", default="phantom", choices=["phantom", "nifti", "h5"])
    q.add_argument("--data-root", default="$BRATS_ROOT", help="real data folder (nifti/h5)")
    q.add_argument("--volume-map", default="", help="H5 only: CSV volume,subject_id")
    phantom_args(q, 48, 48, [96, 96, 64])
    q.add_argument("--image-size", type=int, default=64, help="slice size in the cache")
    q.add_argument("--design", default="cv", choices=["cv", "holdout"],
                   help="repeated cross-validation, or a fixed held-out test set")
    q.add_argument("--folds", type=int, default=5, help="cross-validation folds")
    q.add_argument("--repeats", type=int, default=1, help="re-drawn partitions into folds")
    q.add_argument("--test-fraction", type=float, default=None,
                   help="holdout only: held-out test subjects (default 0.2)")
    q.set_defaults(func=_prepare)

    q = sub.add_parser("train", help="train one run from a YAML TrainConfig",
                       description="Train (or resume, or skip if finished) one run.")
    q.add_argument("--config", required=True, type=Path, help="YAML file of TrainConfig settings")
    q.add_argument("--runs-dir", type=Path, default=None, help="(default: runs/cli/)")
    q.set_defaults(func=_train)

    q = sub.add_parser("grid", help="train a grid of runs from a YAML grid spec",
                       description="Expand a grid spec (see kdlib.grid.expand_grid) and train every "
                                   "unfinished run, teachers first.")
    q.add_argument("--config", required=True, type=Path, help="YAML grid spec")
    q.add_argument("--runs-dir", type=Path, default=None, help="(default: runs/cli/)")
    q.add_argument("--devices", nargs="+", default=None,
                   help="e.g. cuda:0 cuda:1 (default: every GPU when there are several)")
    q.set_defaults(func=_grid)

    q = sub.add_parser("run", help="run the numbered notebooks of a profile with papermill",
                       description="Execute notebooks/NN_*.ipynb in order with the profile's "
                                   "parameters; executed copies go to runs/<profile>/notebooks/.")
    q.add_argument("--profile", required=True, help="profile name in profiles/ or a .yaml path")
    q.add_argument("--only", nargs="+", metavar="NN", help="run only these notebooks, e.g. 02 03")
    q.add_argument("-p", "--param", action="append", metavar="KEY=VALUE",
                   help="override a notebook parameter (YAML value), e.g. -p epochs=5")
    q.add_argument("--quiet", action="store_true", help="do not stream cell outputs")
    q.set_defaults(func=_run)

    q = sub.add_parser("strip", help="strip outputs from notebooks (for committing)")
    q.add_argument("notebooks", nargs="+", type=Path)
    q.set_defaults(func=_strip)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the subcommand; a KdlibError prints its message and exits with status 2."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KdlibError as err:
        print(f"kdlib {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kdlib {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0

"""`kdlib` / `python -m kdlib`: phantom, prepare, train, grid, plan, launch, run, strip (see
`kdlib SUB --help`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kdlib import MODALITIES, workbook
from kdlib.data.brats import discover
from kdlib.data.cache import cache_summary, load_slice_table
from kdlib.data.phantom import PhantomConfig
from kdlib.data.phantom_files import make_phantom
from kdlib.data.splits import load_splits, split_table
from kdlib.data.subjects import reader_notes
from kdlib.device import GROUP_SIZE, grid_devices
from kdlib.errors import ConfigError, KdlibError
from kdlib.experiment import Experiment, plan_path, profile_plan, record_experiment
from kdlib.grid import load_grid, run_grid
from kdlib.launch import launch, summary
from kdlib.paths import profile_paths
from kdlib.pipeline import parse_overrides, run_profile, split_overrides, strip_outputs
from kdlib.plan import PlanEntry, plan_entry, plan_levels
from kdlib.profiles import load_profile, profile_file
from kdlib.slurm import SlurmSettings, slurm_executor, write_array_scripts
from kdlib.train import fit
from kdlib.train_config import load_train_config


def _phantom(args: argparse.Namespace) -> None:
    cfg = PhantomConfig(n_hgg=args.hgg, n_lgg=args.lgg, shape=tuple(args.shape),
                        difficulty=args.difficulty, seed=args.seed, compress=args.compress,
                        write_h5=args.h5, workers=args.workers)
    print(make_phantom(args.out, cfg))


def _prepare(args: argparse.Namespace) -> None:
    """Dataset, cache and splits; the manifest is written once all three have succeeded."""
    phantom = {"n_hgg": args.hgg, "n_lgg": args.lgg, "shape": tuple(args.shape),
                   "difficulty": args.difficulty, "seed": args.seed, "workers": args.workers}
    ds = workbook.locate_dataset(args.profile, args.source, args.data_root, phantom,
                                 args.volume_map, args.channel_order)
    print(f"dataset: {ds['root']} ({ds['fmt']})")
    notes = reader_notes(discover(ds["root"], fmt=ds["fmt"], **ds["reader"]))
    if notes:
        print("reader's notes:\n" + "\n".join(f"  {n}" for n in notes))
    cache = workbook.make_cache(args.profile, ds, {"image_size": args.image_size,
                                                   "workers": args.workers})
    splits = workbook.make_split_file(args.profile, cache["cache"], {
        "design": args.design, "k_folds": args.folds, "repeats": args.repeats,
        "seed": args.seed, "test_fraction": args.test_fraction})
    workbook.update_manifest(args.profile, dataset=ds, **cache, **splits)
    cache, splits = cache["cache"], splits["splits"]
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
    if args.plan is None:
        print(fit(load_train_config(args.config), _runs_dir(args)))
        return
    index = args.index
    if index is None:
        task = os.environ.get("SLURM_ARRAY_TASK_ID", "")
        if not task.isdigit():
            raise ConfigError("--plan needs --index N (or $SLURM_ARRAY_TASK_ID in a job array)")
        index = int(task)
    entry = plan_entry(args.plan, index)
    print(fit(entry.config, args.runs_dir or args.plan.parent))


def _experiment_plan(args: argparse.Namespace) -> tuple[str, list[PlanEntry]]:
    """Record the profile's experiment (with -p overrides) and write its plan; (name, entries)."""
    profile = load_profile(args.profile)
    exp_overrides, other = split_overrides(parse_overrides(args.param))
    if other:
        raise ConfigError(f"-p {sorted(other)}: not experiment settings; the experiment takes "
                          f"{sorted(Experiment.__dataclass_fields__)}")
    exp = Experiment.from_profile(profile, exp_overrides)
    source = str(profile_file(args.profile)) + (f" with -p {exp_overrides}" if exp_overrides
                                                 else "")
    record_experiment(profile["name"], exp, source)
    return profile["name"], profile_plan(profile["name"])


def _slurm_settings(args: argparse.Namespace) -> SlurmSettings:
    return SlurmSettings(partition=args.partition, gpus_per_node=args.gpus_per_node,
                         cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb,
                         time_min=args.time, account=args.account, qos=args.qos,
                         constraint=args.constraint, max_parallel=args.max_parallel,
                         signal_delay_s=args.signal_delay)


def _plan(args: argparse.Namespace) -> None:
    name, entries = _experiment_plan(args)
    levels = plan_levels(entries)
    train, submit = write_array_scripts(entries, plan_path(name),
                                        profile_paths(name).runs / "slurm", _slurm_settings(args),
                                        name=f"kdlib-{name}", kdlib_cmd=args.kdlib_cmd)
    print(f"{plan_path(name)}: {len(entries)} runs, "
          f"{' then '.join(str(len(r)) for r in levels)} by dependency level")
    print(f"Slurm job array: {train}\nsubmit it with: bash {submit}")


def _launch(args: argparse.Namespace) -> None:
    name, entries = _experiment_plan(args)
    runs_dir = profile_paths(name).runs
    if args.executor == "slurm":
        settings = _slurm_settings(args)
        executor = slurm_executor(runs_dir / "slurm" / "submitit", settings, f"kdlib-{name}")
        results = launch(entries, runs_dir, executor, threads=settings.cpus_per_task,
                         group=args.group, poll_s=args.poll, check=False)
    else:
        workers = args.workers or load_profile(args.profile)["parameters"].get("workers", 1)
        devices = args.devices or grid_devices(args.device, workers, args.runs_per_device,
                                               configs=[e.config for e in entries],
                                               group=args.group)
        results = launch(entries, runs_dir, devices=devices, group=args.group, check=False)
    print(summary(results))
    if any(r.status in ("failed", "skipped") for r in results.values()):
        raise KdlibError("some runs failed (listed above); fix the cause and run the same "
                         "command again: finished runs are skipped, unfinished ones resume")


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
                       description="Generate (or locate) the dataset, print the readers' notes, "
                                   "build the slice cache and the subject-level splits of a "
                                   "profile, record them in its manifest once all succeeded, and "
                                   "print class tables.")
    q.add_argument("--profile", default="cli", help="output folder name (default %(default)s)")
    q.add_argument("--source", default="phantom", choices=["phantom", "nifti", "h5"])
    q.add_argument("--data-root", default="$BRATS_ROOT", help="real data folder (nifti/h5)")
    q.add_argument("--volume-map", default="", help="H5 only: CSV volume,subject_id")
    q.add_argument("--channel-order", nargs=4, default=list(MODALITIES), choices=MODALITIES,
                   metavar="MOD", help="H5 only: the modality of each image channel (default "
                   "%(default)s, as measured on the Kaggle files)")
    phantom_args(q, 48, 48, [96, 96, 64])
    q.add_argument("--image-size", type=int, default=64, help="slice size in the cache")
    q.add_argument("--design", default="cv", choices=["cv", "holdout"],
                   help="repeated cross-validation, or a fixed held-out test set")
    q.add_argument("--folds", type=int, default=5, help="cross-validation folds")
    q.add_argument("--repeats", type=int, default=1, help="re-drawn partitions into folds")
    q.add_argument("--test-fraction", type=float, default=None,
                   help="holdout only: held-out test subjects (default 0.2)")
    q.set_defaults(func=_prepare)

    q = sub.add_parser("train", help="train one run: a YAML TrainConfig, or line N of a plan",
                       description="Train (or resume, or skip if finished) one run: --config "
                                   "run.yaml, or --plan runs/<profile>/plan.jsonl --index N (what "
                                   "each task of the Slurm job array written by `kdlib plan` "
                                   "runs).")
    which = q.add_mutually_exclusive_group(required=True)
    which.add_argument("--config", type=Path, help="YAML file of TrainConfig settings")
    which.add_argument("--plan", type=Path, help="a plan.jsonl written by `kdlib plan`")
    q.add_argument("--index", type=int, default=None,
                   help="with --plan: the line to train, from 0 (default $SLURM_ARRAY_TASK_ID)")
    q.add_argument("--runs-dir", type=Path, default=None,
                   help="(default: the plan's folder; with --config runs/cli/)")
    q.set_defaults(func=_train)

    q = sub.add_parser("grid", help="train a grid of runs from a YAML grid spec",
                       description="Expand a grid spec (see kdlib.grid.expand_grid) and train every "
                                   "unfinished run, teachers first.")
    q.add_argument("--config", required=True, type=Path, help="YAML grid spec")
    q.add_argument("--runs-dir", type=Path, default=None, help="(default: runs/cli/)")
    q.add_argument("--devices", nargs="+", default=None,
                   help="e.g. cuda:0 cuda:1 (default: every GPU when there are several)")
    q.set_defaults(func=_grid)

    def profile_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--profile", required=True, help="profile name in profiles/ or a .yaml path")
        q.add_argument("-p", "--param", action="append", metavar="KEY=VALUE",
                       help="override an experiment setting (YAML value), e.g. -p epochs=5")

    def slurm_args(q: argparse.ArgumentParser) -> None:
        g = q.add_argument_group("Slurm resources of each training job")
        g.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's)")
        g.add_argument("--gpus-per-node", type=int, default=1, help="GPUs per job (default 1)")
        g.add_argument("--cpus-per-task", type=int, default=4, help="CPU cores per job (default 4)")
        g.add_argument("--mem-gb", type=int, default=None, help="memory per job in GB")
        g.add_argument("--time", type=int, default=120,
                       help="time limit per job in minutes (default 120); a run that needs longer "
                            "is requeued and resumes from its checkpoint")
        g.add_argument("--account", default=None)
        g.add_argument("--qos", default=None)
        g.add_argument("--constraint", default=None, help="e.g. a GPU type, as the cluster names it")
        g.add_argument("--max-parallel", type=int, default=None,
                       help="at most this many jobs at once (array throttle)")
        g.add_argument("--signal-delay", type=int, default=120,
                       help="seconds before the time limit at which a job requeues itself")

    q = sub.add_parser("plan", help="write a profile's run plan and its Slurm job-array scripts",
                       description="Record the profile's experiment (with -p overrides) in its "
                                   "manifest and write runs/<profile>/plan.jsonl (one line per "
                                   "run: id, config, the runs it depends on) and "
                                   "runs/<profile>/slurm/{train.sbatch,submit.sh}: `bash "
                                   "submit.sh` submits the teachers as one job array and their "
                                   "students as a second one after it (afterok). Needs the "
                                   "profile's cache and splits (notebooks 00 and 01).")
    profile_args(q)
    slurm_args(q)
    q.add_argument("--kdlib-cmd", default=None,
                   help="how a job starts kdlib (default: this Python with -m kdlib)")
    q.set_defaults(func=_plan)

    q = sub.add_parser("launch", help="train a profile's run plan locally or on Slurm",
                       description="Write the profile's plan (as `kdlib plan`) and train every "
                                   "unfinished run, each as soon as its teacher is finished: in "
                                   "local worker processes, or as Slurm jobs through submitit "
                                   "(jobs requeue themselves when preempted or near their time "
                                   "limit and resume from the run's checkpoint). Runs land in "
                                   "runs/<profile>/.")
    profile_args(q)
    q.add_argument("--executor", choices=["local", "slurm"], default="local")
    q.add_argument("--group", type=int, default=GROUP_SIZE,
                   help="train at most this many runs that share their data (one student on one "
                        "fold, ratio and seed) together in one task, one batch and one teacher "
                        "pass for all (default %(default)s; 1: each run alone)")
    g = q.add_argument_group("local executor")
    g.add_argument("--devices", nargs="+", default=None,
                   help="one worker process per entry, e.g. cuda:0 cuda:1 (a device listed twice "
                        "gets two workers) or cpu cpu")
    g.add_argument("--device", default="auto", help="without --devices: auto, cpu, cuda or cuda:N")
    g.add_argument("--workers", type=int, default=None,
                   help="without --devices, on the CPU: parallel worker processes (default: the "
                        "profile's `workers`, else 1)")
    g.add_argument("--runs-per-device", type=int, default=None,
                   help="without --devices, on GPUs: runs trained at once per GPU (default: "
                        "from its free memory and the largest run)")
    slurm_args(q)
    q.add_argument("--poll", type=float, default=30.0,
                   help="slurm: seconds between checks of the running jobs (default 30)")
    q.set_defaults(func=_launch)

    q = sub.add_parser("run", help="run the numbered notebooks of a profile with papermill",
                       description="Execute notebooks/NN_*.ipynb in order with the profile's "
                                   "parameters; executed copies go to runs/<profile>/notebooks/. "
                                   "The profile's experiment (with -p overrides) is recorded in "
                                   "its manifest first, and every notebook reads it there.")
    q.add_argument("--profile", required=True, help="profile name in profiles/ or a .yaml path")
    q.add_argument("--only", nargs="+", metavar="NN", help="run only these notebooks, e.g. 02 03")
    q.add_argument("-p", "--param", action="append", metavar="KEY=VALUE",
                   help="override an experiment setting or a notebook parameter (YAML value), "
                        "e.g. -p epochs=5")
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

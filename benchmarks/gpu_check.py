"""The one prepared device check: whoever gets a CUDA GPU runs `bash benchmarks/gpu_check.sh` and
pastes the summary block it prints at the end into the README.

In under 8 minutes on one GPU it
1. prints the benchmark table (bench_cuda.py: images/s per model, projected hours per real-data
   profile, several runs per GPU against one);
2. trains a small grid (a phantom dataset at 64 px; the profile's student mobilenet_v3_small
   with and without a resnet18 teacher) twice, one run at a time, in deterministic mode, and
   checks that both give identical predictions, metrics, histories and weights;
3. trains the same grid again with several runs on the GPU at once: same results, wall time;
4. kills a run with SIGKILL in its second epoch, resumes it, and checks it equals the straight run;
5. prints one summary block (also written to runs/gpu_check/summary.md).
`--dry-run` does all of it on the CPU with tiny settings, so that a first GPU run does not fail on
a typo; the tests run it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch

from kdlib.config import write_yaml
from kdlib.data.cache import PrepConfig, prepare_cache
from kdlib.data.phantom import PhantomConfig
from kdlib.data.phantom_files import make_phantom
from kdlib.data.splits import SplitConfig, make_splits, save_splits, subject_table
from kdlib.device import default_runs_per_device, grid_devices, resolve_device, run_footprint
from kdlib.grid import expand_grid, run_grid
from kdlib.identity import run_id
from kdlib.results import load_history
from kdlib.train import fit
from kdlib.train_config import load_train_config

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_cuda", ROOT / "benchmarks" / "bench_cuda.py")
bench_cuda = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_cuda)

GPU = {"phantom": (8, 8, (96, 96, 64)), "image_size": 64, "epochs": 3, "batch_size": 32,
       "folds": [0, 1],
       "teacher": "resnet18", "student": "mobilenet_v3_small", "seconds": 1.5, "warmup": 5,
       "processes": [1, 2, 4]}
DRY = {"phantom": (6, 6, (48, 48, 32)), "image_size": 24, "epochs": 2, "batch_size": 8,
       "folds": [0],
       "teacher": "cnn_s", "student": "cnn_xs", "seconds": 0.2, "warmup": 1, "processes": [1, 2]}

KILL_IN_SECOND_EPOCH = """
import glob, os, signal, sys
import kdlib.data.loader
from kdlib.train import fit
augment = kdlib.data.loader.augment_batch
def augment_or_die(*args, **kw):
    if glob.glob(os.path.join(sys.argv[2], ".tmp-*", "checkpoint.pt")):  # epoch 1 is saved
        os.kill(os.getpid(), signal.SIGKILL)
    return augment(*args, **kw)
kdlib.data.loader.augment_batch = augment_or_die
fit(sys.argv[1], sys.argv[2], progress=False)
"""


def train_grid(configs: list, runs_dir: Path, devices: list[str] | None) -> list[Path]:
    """Train the configs, teachers first (switch to the launcher here when it lands)."""
    return run_grid(configs, runs_dir, devices=devices, progress=False)


def same_run(a: Path, b: Path) -> bool:
    """Identical predictions, metrics, history (but its times) and weights."""
    if (a / "predictions.csv").read_bytes() != (b / "predictions.csv").read_bytes():
        return False
    if (a / "metrics.json").read_bytes() != (b / "metrics.json").read_bytes():
        return False
    ha, hb = load_history(a).drop(columns="time_s"), load_history(b).drop(columns="time_s")
    if not ha.equals(hb):
        return False
    sa, sb = (torch.load(p / "model.pt", weights_only=True) for p in (a, b))
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def small_dataset(out: Path, s: dict) -> tuple[Path, Path]:
    """A phantom, its slice cache and splits (3 folds) under `out`."""
    n_hgg, n_lgg, shape = s["phantom"]
    root = make_phantom(out / "phantom", PhantomConfig(n_hgg=n_hgg, n_lgg=n_lgg, shape=shape),
                        progress=False)
    cache = prepare_cache(root, out / "cache", PrepConfig(image_size=s["image_size"]),
                          fmt="nifti", progress=False)
    table = pd.read_csv(cache.with_suffix(".csv"), dtype={"subject_id": str})
    splits = save_splits(make_splits(subject_table(table), SplitConfig(k_folds=3)),
                         out / "splits.csv")
    return cache, splits


def small_grid(cache: Path, splits: Path, s: dict, device: str) -> list:
    """Teacher and student baselines, KD and DKD students: 4 runs per fold."""
    return expand_grid({
        "base": {"cache": str(cache), "splits": str(splits), "epochs": s["epochs"],
                 "batch_size": s["batch_size"], "lr": 1e-3, "device": device,
                 "deterministic": True},
        "grid": {"fold": s["folds"]},
        "teachers": {"model": s["teacher"]},
        "students": {"model": s["student"], "distiller": [None, "kd", "dkd"],
                     "teacher": {"model": s["teacher"]}}})


def profile_runs_per_device(device: torch.device, size: int, batch: int) -> tuple[int, float]:
    """Default runs per GPU for the real-data profile's largest run (369 subjects x slices)."""
    configs, models, _ = bench_cuda.profile_runs(bench_cuda.PROFILES[0])
    n_slices = int(369 * bench_cuda.SLICES_PER_SUBJECT)
    footprint = max(run_footprint(c.model, size, batch, 4, n_slices, models.get(
        Path(c.teacher).name) if c.teacher else None) for c in configs)
    if device.type != "cuda":
        return 1, footprint / 2**30
    return default_runs_per_device(device, footprint), footprint / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="everything on the CPU, tiny")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check")
    parser.add_argument("--profiles", nargs="+", default=list(bench_cuda.PROFILES),
                        help="profiles the benchmark projects (default: the real-data ones)")
    args = parser.parse_args()
    started = time.perf_counter()
    s = DRY if args.dry_run else GPU
    device = resolve_device("cpu" if args.dry_run else "cuda")
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    lines = []

    print("== 1. benchmark table", flush=True)
    bench_args = argparse.Namespace(
        device=str(device), profiles=args.profiles, seconds=s["seconds"], warmup=s["warmup"],
        size=32 if args.dry_run else None, batch=4 if args.dry_run else None,
        slices_per_subject=bench_cuda.SLICES_PER_SUBJECT, slice_table=None,
        processes=s["processes"], compile=False, quick=args.dry_run,
        json=args.out / "bench.json")
    bench = bench_cuda.report(bench_args)
    n_default, footprint = profile_runs_per_device(device, bench["size"], bench["batch"])

    print("\n== 2. small grid twice, one run at a time, deterministic", flush=True)
    cache, splits = small_dataset(args.out / "data", s)
    configs = small_grid(cache, splits, s, str(device))
    one = [str(device)]
    timings = {}
    for name in ("a", "b"):
        start = time.perf_counter()
        train_grid(configs, args.out / name, one)
        timings[name] = time.perf_counter() - start
    ids = [run_id(c) for c in configs]
    twice = all(same_run(args.out / "a" / r, args.out / "b" / r) for r in ids)
    print(f"{len(ids)} runs, identical: {twice}; {timings['a']:.0f} s and {timings['b']:.0f} s")

    n = max(2, n_default) if not args.dry_run else 2
    many = (grid_devices(str(device), runs_per_device=n) if device.type == "cuda"
            else grid_devices("cpu", workers=n))
    print(f"\n== 3. the grid with {len(many)} runs at once on {device}", flush=True)
    start = time.perf_counter()
    train_grid(configs, args.out / "c", many)
    timings["c"] = time.perf_counter() - start
    together = all(same_run(args.out / "a" / r, args.out / "c" / r) for r in ids)
    print(f"identical to one at a time: {together}; {timings['c']:.0f} s vs {timings['a']:.0f} s")

    print("\n== 4. kill in the second epoch and resume", flush=True)
    cfg = load_train_config(configs[0])
    write_yaml(args.out / "run.yaml", cfg.to_dict())
    killed = subprocess.run([sys.executable, "-c", KILL_IN_SECOND_EPOCH,
                             str(args.out / "run.yaml"), str(args.out / "resume")], check=False)
    partial = (args.out / "resume" / f".tmp-{run_id(cfg)}" / "checkpoint.pt").is_file()
    resumed = fit(cfg, args.out / "resume", progress=False)
    kill_ok = killed.returncode == -9 and partial and same_run(args.out / "a" / resumed.name,
                                                                resumed)
    print(f"killed (exit {killed.returncode}), checkpoint left: {partial}, resumed identical: "
          f"{kill_ok}")

    total = time.perf_counter() - started
    lines += summary(bench, device, s, n_default, footprint, len(ids), twice, together,
                     len(many), timings, kill_ok, total, args.dry_run)
    text = "\n".join(lines)
    (args.out / "summary.md").write_text(text + "\n")
    (args.out / "summary.json").write_text(json.dumps(
        {"identical_twice": twice, "identical_together": together, "resume_identical": kill_ok,
         "timings_s": timings, "total_s": total, "runs_per_device_default": n_default}, indent=1))
    print("\n" + "=" * 30 + " summary (paste into the README) " + "=" * 30 + "\n" + text)
    if not (twice and together and kill_ok):
        sys.exit(1)


def summary(bench: dict, device: torch.device, s: dict, n_default: int, footprint: float,
            n_runs: int, twice: bool, together: bool, n_many: int, timings: dict, kill_ok: bool,
            total: float, dry: bool) -> list[str]:
    """The summary block as markdown lines."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    ok = {True: "yes", False: "**NO**"}
    head = f"{bench['device_name']}" + (" (DRY RUN on the CPU: figures mean nothing)" if dry
                                        else "")
    settings = (f"torch {bench['torch']}, CUDA {torch.version.cuda}, {bench['size']} px, batch "
                f"{bench['batch']}, 4 channels; `bash benchmarks/gpu_check.sh` took "
                f"{total / 60:.1f} min.")
    columns = ("| model | teacher | img/s deterministic | img/s not | eval img/s | peak GiB | "
               "estimated GiB |")
    out = [f"### GPU check: {head}, {when}", "", settings, "", columns, "|---" * 7 + "|"]
    for r in bench["rows"]:
        if r["teacher"] == "compile":
            continue
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        out.append(f"| {r['model']} | {r['teacher'] or '-'} | {r['det_ips']:,.0f} | "
                   f"{r['nondet_ips']:,.0f} | {r['eval_ips']:,.0f} | {peak} | "
                   f"{r['estimate_gib']:.2f} |")
    out.append("")
    for p in bench["projections"]:
        shared = (f"{p['hours_det_shared']:.2f} h with {p['runs_at_once']} runs of "
                  f"{bench['concurrency']['model']} at once" if p["runs_at_once"] > 1
                  else "no gain measured from several runs at once")
        out.append(f"- `{p['profile']}`: {p['runs']} runs x {p['epochs'][0]} epochs: "
                   f"{p['hours_det']:.2f} h deterministic, {p['hours_nondet']:.2f} h not, one "
                   f"run at a time; {shared}.")
    ips = bench["concurrency"]["ips"]
    first = next(iter(ips.values()))
    gains = ", ".join(f"{k}: {v:,.0f} img/s ({v / first:.2f}x)" for k, v in ips.items())
    several = (f"- Several runs per GPU ({bench['concurrency']['model']}, processes): {gains}. "
               f"Default runs per GPU for the real-data profile: {n_default} (estimated "
               f"{footprint:.1f} GiB per run).")
    grid = (f"- Small grid ({n_runs} runs, {s['student']} <- {s['teacher']}, {s['epochs']} "
            f"epochs) twice in deterministic mode: identical {ok[twice]}; with {n_many} runs at "
            f"once: identical {ok[together]}, {timings['c']:.0f} s against {timings['a']:.0f} s "
            "one at a time.")
    out += [several, grid,
            f"- Killed in epoch 2 and resumed: identical to the straight run {ok[kill_ok]}."]
    return out


if __name__ == "__main__":
    main()

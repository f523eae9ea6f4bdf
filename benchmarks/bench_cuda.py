"""Throughput of fit's exact training step on a GPU (or the CPU), and the GPU time it projects for
the real-data profiles.

For every (model, teacher) pair that the profiles' experiments train, at the profile's image size
and batch size with 4 channels, it times `kdlib.train.train_step` as `fit` runs it (augmentation,
the teacher's forward pass for a distilled student, autocast with a float32 head and loss, fused
AdamW, fit's memory formats: kdlib.device.uses_channels_last), after warm-up, with deterministic
settings on and off. It prints:
- training images/s per pair, evaluation images/s, and on CUDA the step's peak memory next to
  kdlib.device's estimate of it (the runs-per-device default rests on that estimate);
- per profile, the projected hours of the whole experiment on one device: the sum over its runs
  (taken from the profile's experiment through kdlib) of epochs x training slices / images/s plus
  per-run overhead (process start, loading the slices, per-epoch validation and checkpoint, the
  test pass). Each run's training, validation and test slices come from kdlib's splits code (the
  profile's design, folds and repeats) on BraTS2020's 293 HGG + 76 LGG subjects x slices per
  subject (`--slices-per-subject`, or `--slice-table` of a real cache for the exact counts);
- the gain of several runs per device: N processes training the experiment's most frequent pair
  at once, against one.

`python benchmarks/bench_cuda.py` (the GPU if there is one, else the CPU, same table);
`--quick` for tiny settings (32 px, batch 4, short timings; the default without a GPU): a check
that the script works, whose figures mean nothing; `--json PATH` also writes the results.
"""

from __future__ import annotations

import argparse
import ast
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from kdlib import CLASSES, MODALITIES
from kdlib.criterion import build_criterion
from kdlib.data.loader import load_tensors
from kdlib.data.splits import SplitConfig, fold_subjects, make_splits, split_pairs
from kdlib.device import (
    ACTIVATION_SLACK,
    BYTES_PER_PARAM,
    activation_bytes,
    autocast_dtype,
    determinism,
    make_optimizer,
    precision_name,
    resolve_device,
    to_run_device,
    uses_channels_last,
)
from kdlib.experiment import Experiment
from kdlib.identity import run_id
from kdlib.models import count_parameters, create_model
from kdlib.pipeline import list_notebooks, load_profile, notebook_parameters
from kdlib.teachers import FrozenTeacher
from kdlib.train import evaluate, lr_lambda, train_step
from kdlib.train_config import AugmentConfig

PROFILES = ("brats2020_nifti", "brats2020_h5")
BRATS_SUBJECTS = {"HGG": 293, "LGG": 76}  # the BraTS2020 training set
SLICES_PER_SUBJECT = 130.7
"""Usable slices per subject (brain fraction >= 0.05 of the brain-cropped frame), measured with
kdlib's phantom at the real 240x240x155 shape through prepare_cache at 128 px: 12 subjects,
124-137 slices each (HGG 132.3, LGG 129.0). A real cache gives its own with --slice-table."""
CHANNELS = len(MODALITIES)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- the profiles' experiments


def profile_experiment(name: str) -> tuple[Experiment, SplitConfig, dict]:
    """The Experiment and SplitConfig that `kdlib run --profile name` gives notebooks 01-03: the
    profile's experiment section, and its parameters over the notebooks' defaults."""
    values = {}
    for nb in list_notebooks()[:4]:
        for key, spec in notebook_parameters(nb).items():
            values.setdefault(key, ast.literal_eval(spec["default"]))
    values.update(load_profile(name)["parameters"])
    exp = Experiment.from_profile(name)
    values.update(exp.to_dict())
    split = SplitConfig(design=values["design"], k_folds=values["k_folds"],
                        repeats=values["repeats"], seed=values["split_seed"],
                        test_fraction=values["test_fraction"],
                        test_mode=values["test_mode"] or None)
    return exp, split, values


def split_slices(split: SplitConfig, configs: list, slice_table: Path | None,
                 per_subject: float) -> dict[tuple, dict[str, float]]:
    """Slices in train/val/test per (repeat, fold, ratio, seed) of the configs, from kdlib's splits
    on the BraTS2020 subjects (or those of a real slice table)."""
    if slice_table is not None:
        table = pd.read_csv(slice_table, dtype={"subject_id": str})
        counts = table.groupby("subject_id").size()
        subjects = table.drop_duplicates("subject_id")[["subject_id", "grade"]]
    else:
        grades = [g for g, n in BRATS_SUBJECTS.items() for _ in range(n)]
        subjects = pd.DataFrame({"subject_id": [f"BraTS20_Training_{i + 1:03d}"
                                                for i in range(len(grades))], "grade": grades})
        counts = pd.Series(per_subject, index=subjects["subject_id"])
    splits = make_splits(subjects, split)
    out = {}
    for key in sorted({slice_key(c) for c in configs}, key=str):
        repeat, fold, ratio, seed = key
        sets = fold_subjects(splits, fold, ratio=ratio, seed=seed, repeat=repeat)
        out[key] = {k: float(counts[v].sum()) for k, v in sets.items()}
    return out


def slice_key(cfg) -> tuple:
    """What decides a run's subjects: (repeat, fold, ratio, seed)."""
    return cfg.repeat, cfg.fold, cfg.ratio, cfg.seed


def profile_runs(name: str) -> tuple[list, dict, dict]:
    """(configs of the profile's experiment, {run id: model}, the profile's values), with the
    repeats and folds its splits give (as workbook.split_folds reads them from the splits file)."""
    exp, split, values = profile_experiment(name)
    grades = ["HGG"] * BRATS_SUBJECTS["HGG"] + ["LGG"] * BRATS_SUBJECTS["LGG"]
    subjects = pd.DataFrame({"subject_id": [f"S{i:03d}" for i in range(len(grades))],
                             "grade": grades})
    pairs = split_pairs(make_splits(subjects, split))
    configs = exp.configs("cache.h5", "splits.csv", folds=sorted({f for _, f in pairs}),
                          repeats=sorted({r for r, _ in pairs}))
    return configs, {run_id(c): c.model for c in configs}, {**values, "split": split}


def pair_of(cfg, models: dict) -> tuple[str, str | None]:
    return cfg.model, models.get(Path(cfg.teacher).name) if cfg.teacher else None


# ---------------------------------------------------------------- measurements


def _step_setup(model: str, teacher: str | None, size: int, batch: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4 * batch, CHANNELS, size, size, generator=g).half().to(device)
    y = torch.multinomial(torch.tensor([0.5, 0.35, 0.15]), 4 * batch, True, generator=g)
    net = to_run_device(create_model(model, in_channels=CHANNELS), device, model)
    t_net = FrozenTeacher(to_run_device(create_model(teacher, in_channels=CHANNELS), device,
                                        teacher)) if teacher else None
    crit = build_criterion("ce", "kd" if teacher else None, [50, 35, 15], 30)
    opt = make_optimizer(net.parameters(), 1e-3, 1e-4, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(0, 10**6))
    return net, t_net, crit, opt, sched, x, y.to(device)


def _time_steps(net, crit, opt, sched, x, y, kw: dict, device: torch.device, seconds: float,
                warmup: int) -> dict[str, float]:
    batch = len(x) // 4
    batches = torch.arange(len(x), device=device).view(4, batch)
    net.train()
    start = time.perf_counter()
    for i in range(warmup):
        train_step(net, crit, opt, sched, x, y, batches[i % 4], **kw)
    sync(device)
    first = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or steps < 2:
        for _ in range(4):
            train_step(net, crit, opt, sched, x, y, batches[steps % 4], **kw)
            steps += 1
        sync(device)
    ips = steps * batch / (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"train_ips": ips, "peak_bytes": peak, "warmup_s": first}


def measure_pair(model: str, teacher: str | None, size: int, batch: int, device: torch.device,
                 seconds: float, warmup: int, modes: tuple[bool, ...] = (True, False),
                 costs: bool = True, compile_model: bool = False) -> dict:
    """Fit's training step for (model, teacher) on the same networks in each deterministic mode
    of `modes`: {mode: {train_ips, peak_bytes (CUDA), warmup_s}}; with `costs` also the
    student's evaluation images/s and the seconds of one checkpoint save."""
    amp = autocast_dtype(device)
    net, t_net, crit, opt, sched, x, y = _step_setup(model, teacher, size, batch, device)
    step_net = torch.compile(net) if compile_model else net
    kw = {"epoch": 1, "teacher": t_net, "augment": AugmentConfig(), "amp": amp,
          "generator": torch.Generator().manual_seed(1),
          "channels_last": uses_channels_last(device, model),
          "scaler": torch.amp.GradScaler(device.type, enabled=amp == torch.float16)}
    out: dict = {}
    for det in modes:
        with determinism(det, device):
            out[det] = _time_steps(step_net, crit, opt, sched, x, y, kw, device, seconds, warmup)
    if costs:
        with determinism(True, device):
            evaluate(step_net, x, 4 * batch, amp, device.type == "cuda")  # warm-up
            sync(device)
            start = time.perf_counter()
            evaluate(step_net, x, 4 * batch, amp, device.type == "cuda")
            sync(device)
            out["eval_ips"] = len(x) / (time.perf_counter() - start)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()},
                       Path(tmp) / "checkpoint.pt")
        out["checkpoint_s"] = time.perf_counter() - start
    return out


def estimated_step_bytes(model: str, teacher: str | None, size: int, batch: int) -> float:
    """kdlib.device's estimate of a run's memory without the CUDA context and the data."""
    est = BYTES_PER_PARAM * count_parameters(model, in_channels=CHANNELS)
    est += 4 * count_parameters(teacher, in_channels=CHANNELS) if teacher else 0
    return est + ACTIVATION_SLACK * activation_bytes(model, size, batch, CHANNELS)


def load_rate(size: int, n: int, device: torch.device) -> float:
    """Slices/s of load_tensors from an HDF5 cache of n slices onto the device."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cache.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("images", data=np.zeros((n, CHANNELS, size, size), np.float16))
        table = pd.DataFrame({"row": np.arange(n), "label": CLASSES[0]})
        start = time.perf_counter()
        load_tensors(path, table, MODALITIES, device)
        sync(device)
        return n / (time.perf_counter() - start)


def startup_seconds(device: torch.device) -> float:
    """Wall time of a fresh Python process that imports kdlib's training code and touches the
    device (what each worker process of the grid pays once)."""
    code = f"import torch, kdlib.train; torch.zeros(1, device={str(device)!r}).sum().item()"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - start


def concurrent_ips(n: int, model: str, teacher: str | None, size: int, batch: int,
                   device: torch.device, seconds: float, warmup: int) -> float:
    """Summed training images/s of n processes training (model, teacher) on the device at once:
    each starts and warms up, then all measure together (they wait for a go on stdin)."""
    cmd = [sys.executable, __file__, "--worker", model, str(teacher), str(size), str(batch),
           str(device), str(seconds), str(warmup)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=env) for _ in range(n)]
    for p in procs:
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError(f"bench_cuda worker failed: {' '.join(cmd)}")
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    return sum(json.loads(p.communicate()[0].strip().splitlines()[-1])["ips"] for p in procs)


def worker(args: list[str]) -> None:
    """`--worker model teacher size batch device seconds warmup`: warm up, print `ready`, wait for
    a line on stdin, train for `seconds`, print {"ips": images/s}."""
    model, teacher, size, batch, device, seconds, warmup = args
    teacher = None if teacher == "None" else teacher
    size, batch, warmup, seconds = int(size), int(batch), int(warmup), float(seconds)
    dev = resolve_device(device)
    net, t_net, crit, opt, sched, x, y = _step_setup(model, teacher, size, batch, dev)
    amp = autocast_dtype(dev, "auto")
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == torch.float16)
    kw = {"epoch": 1, "teacher": t_net, "augment": AugmentConfig(), "amp": amp,
          "scaler": scaler, "generator": torch.Generator().manual_seed(1),
          "channels_last": uses_channels_last(dev, model)}
    batches = torch.arange(4 * batch, device=dev).view(4, batch)
    with determinism(True, dev):
        for i in range(warmup):
            train_step(net, crit, opt, sched, x, y, batches[i % 4], **kw)
        sync(dev)
        print("ready", flush=True)
        sys.stdin.readline()
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            train_step(net, crit, opt, sched, x, y, batches[steps % 4], **kw)
            steps += 1
            if steps % 4 == 0:
                sync(dev)
        sync(dev)
    print(json.dumps({"ips": steps * batch / (time.perf_counter() - start)}))


# ---------------------------------------------------------------- projection and report


def project_hours(configs: list, models: dict, slices: dict, rates: dict, costs: dict,
                  overhead: dict, deterministic: bool,
                  gain: tuple[tuple, float] = ((), 1.0)) -> float:
    """Hours of one device training `configs` (see the module docstring); the runs of pair
    gain[0] take 1 / gain[1] of their time (several runs of it at once), the others are as
    alone."""
    total = 0.0
    for cfg in configs:
        pair = pair_of(cfg, models)
        ips, c = rates[pair][deterministic]["train_ips"], costs[cfg.model]
        s = slices[slice_key(cfg)]
        run = cfg.epochs * (s["train"] / ips + s["val"] / c["eval_ips"] + c["checkpoint_s"])
        run += s["test"] / c["eval_ips"] + overhead["startup_s"] \
            + sum(s.values()) / overhead["load_slices_per_s"]
        total += run / gain[1] if pair == gain[0] else run
    return total / 3600


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cuda:N or cpu")
    parser.add_argument("--profiles", nargs="+", default=list(PROFILES))
    parser.add_argument("--seconds", type=float, default=2.0, help="time per throughput figure")
    parser.add_argument("--warmup", type=int, default=5, help="steps before timing")
    parser.add_argument("--size", type=int, help="image side (default: the profile's)")
    parser.add_argument("--batch", type=int, help="batch size (default: the profile's)")
    parser.add_argument("--slices-per-subject", type=float, default=SLICES_PER_SUBJECT)
    parser.add_argument("--slice-table", type=Path, help="a real cache's slice table (.csv)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks the script")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.device == "auto" and not torch.cuda.is_available() and not args.quick:
        print("bench_cuda: no CUDA GPU here, so the quick CPU version runs (--device cpu runs the "
              "full settings on the CPU: hours)")
        args.quick = True
    if args.quick:
        args.size, args.batch, args.seconds, args.warmup = 32, 4, 0.2, 1
        args.processes = [1, 2]
    report(args)


def report(args: argparse.Namespace) -> dict:
    """Measure and print the tables; returns (and with --json writes) the results."""
    device = resolve_device(args.device)
    runs = {name: profile_runs(name) for name in args.profiles}
    values = next(iter(runs.values()))[2]
    size, batch = args.size or values["image_size"], args.batch or values["batch_size"]
    pairs = collections.Counter(pair_of(c, m) for configs, m, _ in runs.values() for c in configs)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"bench_cuda: {device} ({name}), torch {torch.__version__}, "
          f"{precision_name(autocast_dtype(device))} autocast, {size} px, batch {batch}, "
          f"{CHANNELS} channels, {torch.get_num_threads()} torch threads{', quick' * args.quick}")
    print(f"{'model':<19} {'teacher':<18} {'params':>7} {'img/s det':>10} {'non-det':>9} "
          f"{'eval img/s':>11} {'peak GiB':>9} {'est. GiB':>9}")
    rates, costs, rows = {}, {}, []
    for (model, teacher), _ in sorted(pairs.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        m = measure_pair(model, teacher, size, batch, device, args.seconds, args.warmup,
                         costs=model not in costs)
        rates[(model, teacher)] = m
        costs.setdefault(model, {k: m[k] for k in ("eval_ips", "checkpoint_s") if k in m})
        r, rn = m[True], m[False]
        est = estimated_step_bytes(model, teacher, size, batch) / 2**30
        peak = r["peak_bytes"] / 2**30 if r["peak_bytes"] is not None else None
        rows.append({"model": model, "teacher": teacher, "det_ips": r["train_ips"],
                     "nondet_ips": rn["train_ips"], "eval_ips": costs[model]["eval_ips"],
                     "peak_gib": peak, "estimate_gib": est})
        print(f"{model:<19} {teacher or '-':<18} {count_parameters(model) / 1e6:>6.1f}M "
              f"{r['train_ips']:>10.0f} {rn['train_ips']:>9.0f} "
              f"{costs[model]['eval_ips']:>11.0f} "
              f"{'-' if peak is None else format(peak, '.2f'):>9} {est:>9.2f}", flush=True)
    if args.compile:
        for model in sorted({m for m, _ in pairs}):
            c = measure_pair(model, None, size, batch, device, args.seconds, args.warmup,
                             modes=(True,), compile_model=True)
            print(f"{model:<19} {'(torch.compile)':<18} {'':>7} {c[True]['train_ips']:>10.0f} "
                  f"{'':>9} {c['eval_ips']:>11.0f}   compile + warm-up "
                  f"{c[True]['warmup_s']:.0f} s", flush=True)
            rows.append({"model": model, "teacher": "compile", "det_ips": c[True]["train_ips"],
                         "compile_s": c[True]["warmup_s"]})
    overhead = {"startup_s": startup_seconds(device),
                "load_slices_per_s": load_rate(size, 256 if args.quick else 2048, device)}
    print(f"\nper-run overhead: process start-up {overhead['startup_s']:.1f} s, slices loaded "
          f"{overhead['load_slices_per_s']:,.0f}/s; per epoch: validation pass and checkpoint")
    (model, teacher), count = pairs.most_common(1)[0]
    print(f"\nseveral runs per device: {model}" + (f" <- {teacher}" if teacher else "")
          + f" ({count} runs of the experiments), deterministic")
    concurrency = {}
    for n in args.processes:
        concurrency[n] = concurrent_ips(n, model, teacher, size, batch, device, args.seconds,
                                        args.warmup)
        print(f"  {n} process(es): {concurrency[n]:,.0f} img/s in total, "
              f"{concurrency[n] / concurrency[args.processes[0]]:.2f}x", flush=True)
    best = max(concurrency, key=concurrency.get)
    gain = ((model, teacher), concurrency[best] / concurrency[args.processes[0]])
    projections = []
    for prof, (configs, models, values) in runs.items():
        ratios = sorted({c.ratio for c in configs}, key=lambda r: (r is not None, r or 0))
        slices = split_slices(values["split"], configs, args.slice_table, args.slices_per_subject)
        for ratio in ratios:
            part = [v for (_, _, r, _), v in slices.items() if r == ratio]
            train = [v["train"] for v in part]
            print(f"{prof}: ratio {'natural' if ratio is None else ratio}: training slices "
                  f"{np.mean(train):,.0f} (splits {min(train):,.0f}-{max(train):,.0f}), "
                  f"validation {np.mean([v['val'] for v in part]):,.0f}, test "
                  f"{np.mean([v['test'] for v in part]):,.0f}")
        hours = {det: project_hours(configs, models, slices, rates, costs, overhead, det)
                 for det in (True, False)}
        shared = project_hours(configs, models, slices, rates, costs, overhead, True, gain)
        epochs = sorted({c.epochs for c in configs})
        projections.append({"profile": prof, "runs": len(configs), "epochs": epochs,
                            "hours_det": hours[True], "hours_nondet": hours[False],
                            "runs_at_once": best, "hours_det_shared": shared})
        print(f"{prof}: {len(configs)} runs x {epochs} epochs on one {name}: "
              f"{hours[True]:.2f} h deterministic, {hours[False]:.2f} h not, one run at a time; "
              f"{shared:.2f} h deterministic with {best} runs of {model} at once"
              + (" (no gain measured)" if best == args.processes[0] else ""))
    results = {"device": str(device), "device_name": name, "torch": torch.__version__,
               "size": size, "batch": batch, "quick": args.quick, "rows": rows,
               "overhead": overhead, "projections": projections,
               "concurrency": {"model": model, "teacher": teacher,
                               "ips": {str(k): v for k, v in concurrency.items()}}}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()

"""Runs trained together (kdlib.stacked) against the same runs trained one at a time.

Training images/s of 1, 4 and 8 runs of cnn_xs and cnn_s trained together by
kdlib.stack.train_group_epoch (vmap: one vectorised forward/backward per batch, what fit_group does
on a GPU; loop: the models one after the other on the shared batch, what it does on the CPU)
against one run through kdlib.train.train_one_epoch, counted as runs x images / seconds, with fit's
step: augmentation on, CE, AdamW with its schedule. The demo's
shape by default: 40 px, batch 64, 4 channels, one CPU thread. `--teacher cnn_s` adds a KD teacher
that every run distils from (together: one teacher forward per batch for the group; alone: one per
run). Each figure is the best of `--repeats` alternating measurements (other processes load a shared
machine; the best is the least disturbed). On the CPU the seconds are this process's CPU time, so
that the others' load on a shared machine counts less (it still costs caches and memory bandwidth);
on a GPU, wall time. Prints figures, asserts nothing.

`--end-to-end` also trains the demo profile's runs of one fold at ratio 4 (its phantom, slice size,
epochs, teachers and students, from profiles/demo.yaml)
twice, one by one with kdlib.train.fit and as kdlib.stacked.group_configs + fit_group, and prints
the CPU and wall seconds of both (a few minutes on a quiet 2-core machine).

`python benchmarks/bench_stacked.py [--device cuda] [--runs 1 4 8] [--seconds 2] [--end-to-end]`;
benchmarks/bench_cuda.py gets the same table on a GPU from `stacked_table`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train

from kdlib.criterion import build_criterion
from kdlib.device import autocast_dtype, make_optimizer, to_run_device, uses_channels_last
from kdlib.models import create_model
from kdlib.profiles import load_profile
from kdlib.stack import Stack, train_group_epoch
from kdlib.stacked import fit_group, group_configs
from kdlib.teachers import FrozenTeacher
from kdlib.train import fit, lr_lambda, train_one_epoch
from kdlib.train_config import AugmentConfig

DEMO_CUT = {"ratios": [4], "folds": [0]}
"""The demo profile's experiment cut to one fold and its strongest ratio (its data as it is)."""


def _runs(name: str, n: int, channels: int, device: str, channels_last: bool):
    models = [create_model(name, in_channels=channels).to(device) for _ in range(n)]
    if channels_last:
        models = [m.to(memory_format=torch.channels_last) for m in models]
    opts = [make_optimizer(m.parameters(), 1e-3, 1e-4, torch.device(device)) for m in models]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(0, 10_000)) for o in opts]
    return models, opts, scheds


def _timed(fn, device: str) -> float:
    """Seconds of fn(): this process's CPU time on the CPU (other processes' load does not count),
    wall time on a GPU."""
    clock = time.perf_counter if device.startswith("cuda") else time.process_time
    bench_train._sync(device)
    t = clock()
    fn()
    bench_train._sync(device)
    return clock() - t


def measure(name: str, n_runs: int, teacher: str | None = None, size: int = 40, batch: int = 64,
            channels: int = 4, device: str = "cpu", amp: torch.dtype | bool | None = None,
            channels_last: bool = False, seconds: float = 2.0) -> dict[str, float]:
    """Images/s of `n_runs` runs of model `name` trained together (vmap: one vectorised
    forward/backward; loop: one after the other on the shared batch and teacher forward), and of
    one run trained alone (n runs alone take n times as long: the figure does not depend on n)."""
    x, y = bench_train.synthetic(batch * 4, size, channels, device)
    distiller = "kd" if teacher else None
    crit = build_criterion("ce", distiller, torch.bincount(y.cpu(), minlength=3).tolist(), 10)
    t_net = None
    if teacher:
        t_model = create_model(teacher, in_channels=channels)  # fit's format, or NCHW (--nchw)
        t_net = FrozenTeacher(to_run_device(t_model, torch.device(device), teacher)
                              if channels_last else t_model.to(device))
    kw = {"batch_size": batch, "epoch": 1, "augment": AugmentConfig(), "amp": amp,
          "channels_last": channels_last}
    gen = torch.Generator().manual_seed(1)
    models, opts, scheds = _runs(name, n_runs, channels, device, channels_last)
    stack, looped = Stack(models), Stack(models, vectorise=False)

    def vmapped(order: torch.Tensor) -> None:
        train_group_epoch(stack, [crit] * n_runs, opts, scheds, x, y, order,
                          teachers=[t_net] * n_runs, generator=gen, **kw)

    def loop(order: torch.Tensor) -> None:
        train_group_epoch(looped, [crit] * n_runs, opts, scheds, x, y, order,
                          teachers=[t_net] * n_runs, generator=gen, **kw)

    def alone(order: torch.Tensor) -> None:
        train_one_epoch(models[0], crit, opts[0], scheds[0], x, y, order, teacher=t_net,
                        generator=gen, **kw)

    out = {}
    for label, step, n_img in (("vmap", vmapped, n_runs), ("loop", loop, n_runs),
                               ("alone", alone, 1)):
        warm = torch.arange(2 * batch)
        step(warm)  # allocations, kernels
        per_batch = _timed(lambda: step(warm), device) / 2  # noqa: B023 - called right here
        n_batches = int(min(max(seconds / per_batch, 2), 200))
        order = torch.arange(4 * batch).repeat(n_batches // 4 + 1)[:n_batches * batch]
        out[label] = n_img * len(order) / _timed(lambda: step(order), device)  # noqa: B023
    return out


def stacked_table(models: Sequence[str] = ("cnn_xs", "cnn_s"), runs: Sequence[int] = (1, 4, 8),
                  teacher: str | None = None, size: int = 40, batch: int = 64, channels: int = 4,
                  device: str = "cpu", amp: torch.dtype | bool | None = None,
                  channels_last: bool | None = None, seconds: float = 2.0, repeats: int = 2
                  ) -> list[dict[str, float | str]]:
    """Rows (model, runs, vmap_img_s, loop_img_s, alone_img_s), each figure the best of `repeats`
    measurements (alone: of all the model's measurements, since it does not depend on the number
    of runs); what bench_cuda.py prints for a GPU. channels_last None: fit's memory format."""
    rows = []
    for name in models:
        nhwc = (uses_channels_last(torch.device(device), name) if channels_last is None
                else channels_last)
        found = []
        for n in runs:
            best = {"vmap": 0.0, "loop": 0.0, "alone": 0.0}
            for _ in range(repeats):
                got = measure(name, n, teacher, size, batch, channels, device, amp, nhwc, seconds)
                best = {k: max(best[k], got[k]) for k in best}
            found.append({"model": name, "runs": n, **{f"{k}_img_s": v for k, v in best.items()}})
        alone = max(r["alone_img_s"] for r in found)  # one run alone: the same figure for every n
        rows += [{**r, "alone_img_s": alone} for r in found]
    return rows


def print_table(rows: list[dict[str, float | str]]) -> None:
    """The rows as a fixed-width table."""
    print(f"{'model':<8} {'runs':>4} {'vmap img/s':>11} {'loop img/s':>11} {'alone img/s':>12} "
          f"{'vmap/alone':>11} {'loop/alone':>11}")
    for r in rows:
        print(f"{r['model']:<8} {r['runs']:>4} {r['vmap_img_s']:>11.0f} {r['loop_img_s']:>11.0f} "
              f"{r['alone_img_s']:>12.0f} {r['vmap_img_s'] / r['alone_img_s']:>10.2f}x "
              f"{r['loop_img_s'] / r['alone_img_s']:>10.2f}x", flush=True)


def end_to_end(device: str = "cpu", progress: bool = False) -> dict[str, float]:
    """CPU and wall seconds of the demo's runs of DEMO_CUT trained one by one (fit) and in groups
    (fit_group), in a temporary output root; also the number of runs and groups."""
    from kdlib import workbook
    from kdlib.experiment import Experiment

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["KDLIB_HOME"] = tmp
        par = load_profile("demo")["parameters"]
        workbook.get_dataset("bench", phantom={"n_hgg": par["phantom_hgg"], "n_lgg":
                                               par["phantom_lgg"], "shape": par["phantom_shape"]},
                             progress=progress)
        workbook.build_cache("bench", {"image_size": par["image_size"]}, progress=progress)
        workbook.build_splits("bench", {"k_folds": par["k_folds"]})
        exp = Experiment.from_profile("demo", DEMO_CUT)
        cfgs = [dataclasses.replace(c, device=device)
                for c in exp.configs(**workbook.data_settings("bench"), folds=[0])]
        groups = group_configs(cfgs)
        out.update(runs=len(cfgs), groups=len(groups))
        for label, train in (("alone", lambda d: [fit(c, d, progress) for c in cfgs]),
                             ("grouped", lambda d: [fit_group(g, d, progress) for g in groups])):
            cpu, wall = time.process_time(), time.perf_counter()
            train(Path(tmp) / label)
            out[f"{label}_cpu_s"] = time.process_time() - cpu
            out[f"{label}_wall_s"] = time.perf_counter() - wall
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--models", nargs="+", default=["cnn_xs", "cnn_s"])
    parser.add_argument("--runs", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--teacher", default=None, help="a KD teacher model every run distils from")
    parser.add_argument("--size", type=int, default=40, help="image side in pixels (the demo's)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per figure (best)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--nchw", action="store_true",
                        help="train in NCHW instead of fit's memory format (to compare the two)")
    parser.add_argument("--end-to-end", action="store_true",
                        help="also train the demo's runs of one fold, alone and grouped")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gpu = args.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        print("bench_stacked: no CUDA GPU here; nothing measured (use --device cpu)")
        return
    clock = "wall time" if gpu else "process CPU time"
    print(f"device {args.device}, {torch.get_num_threads()} torch thread(s), {args.size} px, "
          f"4 channels, batch {args.batch}, augmentation on, teacher {args.teacher}, {clock}")
    amp = autocast_dtype(torch.device(args.device))  # fit's: bf16 or fp16 on a GPU, None on a CPU
    print_table(stacked_table(args.models, args.runs, args.teacher, args.size, args.batch, 4,
                              args.device, amp, False if args.nchw else None, args.seconds,
                              args.repeats))
    if args.end_to_end:
        r = end_to_end(args.device)
        print(f"\ndemo runs of fold 0 at ratio 4: {r['runs']:.0f} runs in {r['groups']:.0f} groups")
        for label in ("alone", "grouped"):
            print(f"  {label:<8} {r[label + '_cpu_s']:7.1f} CPU s {r[label + '_wall_s']:7.1f} wall s")
        print(f"  CPU-time speed-up {r['alone_cpu_s'] / r['grouped_cpu_s']:.2f}x")


if __name__ == "__main__":
    main()

"""Training throughput on this machine's CPU, through kdlib's own loop (train_one_epoch).

1. images/s of forward + backward + AdamW step for the CNN ladder and resnet18 at 64 px, 4 channels,
   data already in memory, no augmentation, in NCHW and channels-last (what kdlib trains with on
   the CPU and on CUDA: kdlib.device.uses_channels_last);
2. one KD epoch (resnet18 teacher -> cnn_s student) with the teacher run on every batch vs with the
   teacher's logits computed once beforehand (cache_teacher_logits), plus that one-time cost.

Prints figures, asserts nothing. `python benchmarks/bench_train.py [--seconds 3]`; bench_cuda.py
runs the same measures on a GPU.
"""

from __future__ import annotations

import argparse
import time

import torch

from kdlib.criterion import build_criterion
from kdlib.data.loader import epoch_indices
from kdlib.models import count_parameters, create_model
from kdlib.teachers import FrozenTeacher
from kdlib.train import evaluate, lr_lambda, train_one_epoch
from kdlib.train_config import AugmentConfig

MODELS = ("cnn_xs", "cnn_s", "cnn_m", "cnn_l", "resnet18")


def synthetic(n: int, size: int, channels: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """n random float16 images and labels (class counts 50/35/15 %) on `device`."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, channels, size, size, generator=g).half().to(device)
    y = torch.multinomial(torch.tensor([0.5, 0.35, 0.15]), n, True, generator=g).to(device)
    return x, y


def _setup(name: str, channels: int, device: str, channels_last: bool, epochs: int = 1):
    model = create_model(name, in_channels=channels).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(0, 10_000))
    return model, opt, sched


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def throughput(name: str, size: int = 64, channels: int = 4, batch: int = 64, device: str = "cpu",
               amp: bool = False, channels_last: bool = False, seconds: float = 3.0) -> float:
    """Training images/s of model `name` (forward, backward, optimizer step) over ~`seconds`."""
    model, opt, sched = _setup(name, channels, device, channels_last)
    crit = build_criterion("ce", None, [50, 35, 15], 1)
    x, y = synthetic(batch * 4, size, channels, device)
    kw = {"batch_size": batch, "epoch": 1, "amp": amp, "channels_last": channels_last}
    order = torch.arange(2 * batch)
    train_one_epoch(model, crit, opt, sched, x, y, order, **kw)  # warm-up (allocations, kernels)
    _sync(device)
    t = time.perf_counter()
    train_one_epoch(model, crit, opt, sched, x, y, order, **kw)
    _sync(device)
    per_batch = (time.perf_counter() - t) / 2
    n_batches = int(min(max(seconds / per_batch, 3), 400))
    order = torch.arange(batch * 4).repeat(n_batches // 4 + 1)[: n_batches * batch]
    t = time.perf_counter()
    train_one_epoch(model, crit, opt, sched, x, y, order, **kw)
    _sync(device)
    return n_batches * batch / (time.perf_counter() - t)


def kd_epoch(teacher: str = "resnet18", student: str = "cnn_s", n: int = 512, size: int = 64,
             channels: int = 4, batch: int = 64, device: str = "cpu", amp: bool = False,
             channels_last: bool = False) -> dict[str, float]:
    """Seconds of one augmented KD epoch: teacher on every batch vs cached teacher logits."""
    x, y = synthetic(n, size, channels, device)
    t_model = create_model(teacher, in_channels=channels).to(device)
    if channels_last:
        t_model = t_model.to(memory_format=torch.channels_last)
    t_net = FrozenTeacher(t_model)
    crit = build_criterion("ce", "kd", torch.bincount(y.cpu(), minlength=3).tolist(), 1)
    out = {}
    for mode in ("teacher every batch", "cached logits"):
        model, opt, sched = _setup(student, channels, device, channels_last)
        cached = None
        _sync(device)
        t = time.perf_counter()
        if mode == "cached logits":
            cached = evaluate(t_net, x, 4 * batch, amp, channels_last)
            _sync(device)
            out["precompute teacher logits"] = time.perf_counter() - t
            t = time.perf_counter()
        order = epoch_indices(y, "none", torch.Generator().manual_seed(0))
        train_one_epoch(model, crit, opt, sched, x, y, order, batch_size=batch, epoch=1,
                        teacher=t_net, teacher_logits=cached, augment=AugmentConfig(),
                        generator=torch.Generator().manual_seed(1), amp=amp,
                        channels_last=channels_last)
        _sync(device)
        out[mode] = time.perf_counter() - t
    return out


def report(device: str = "cpu", amp: bool = False, channels_last: bool = True,
           seconds: float = 3.0, size: int = 64, batch: int = 64, kd_n: int = 512) -> None:
    """Print the throughput table (NCHW and channels-last) and the KD epoch comparison (in
    channels-last when `channels_last`)."""
    print(f"device {device}, bf16 autocast {amp}, {torch.get_num_threads()} torch threads, "
          f"{size} px, 4 channels, batch {batch}")
    print(f"{'model':<10} {'params':>10} {'NCHW img/s':>11} {'NHWC img/s':>11} {'NHWC/NCHW':>10}")
    for name in MODELS:
        nchw, nhwc = (throughput(name, size, 4, batch, device, amp, cl, seconds)
                      for cl in (False, True))
        print(f"{name:<10} {count_parameters(name):>10,} {nchw:>11.0f} {nhwc:>11.0f} "
              f"{nhwc / nchw:>9.2f}x", flush=True)
    res = kd_epoch(n=kd_n, size=size, batch=batch, device=device, amp=amp,
                   channels_last=channels_last)
    print(f"\nKD epoch, resnet18 -> cnn_s, {kd_n} images, augmentation on:")
    for k, v in res.items():
        print(f"  {k:<28} {v:7.2f} s")
    print(f"  speed-up of the epoch with cached logits: "
          f"{res['teacher every batch'] / res['cached logits']:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per throughput figure")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--size", type=int, default=64, help="image size in px (the demo: 40)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report("cpu", seconds=args.seconds, size=args.size)


if __name__ == "__main__":
    main()

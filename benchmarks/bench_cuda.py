"""The training and loader benchmarks on a CUDA GPU: bf16 autocast, channels_last, data on device.

Same measures as bench_train.py (training images/s of the CNN ladder and resnet18; a KD epoch with
the teacher on every batch vs cached teacher logits) and bench_loader.py (the whole cache as one
tensor on the GPU + augment_batch there, vs per-sample .npy + PIL + DataLoader workers feeding the
GPU). Without a GPU it says so and exits (status 0). `python benchmarks/bench_cuda.py
[--size 64] [--batch 256]`; `--device cpu` runs the same code on the CPU as a dry run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_loader
import bench_train

from kdlib import CLASSES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu for a dry run")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=3.0, help="time per throughput figure")
    parser.add_argument("--n", type=int, default=8192, help="slices for the loader and KD epoch")
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        print("bench_cuda: no CUDA GPU on this machine (torch.cuda.is_available() is False); "
              "nothing measured. Run it on a GPU machine, or use bench_train.py / "
              "bench_loader.py for the CPU figures.")
        sys.exit(0)
    if gpu:
        torch.backends.cudnn.benchmark = True
        print(f"GPU: {torch.cuda.get_device_name(args.device)}, torch {torch.__version__}")
    bench_train.report(args.device, amp=gpu, channels_last=gpu, seconds=args.seconds,
                       size=args.size, batch=args.batch, kd_n=args.n)
    bench_loader.SIZE = args.size
    with tempfile.TemporaryDirectory() as tmp:
        n_files = min(args.n, 4096)  # the per-sample path: fewer files, same img/s
        cache, table, _ = bench_loader.write_data(Path(tmp), args.n, npy=False)
        print(f"\nloader: {args.n} slices, 4 x {args.size} x {args.size}, batch {args.batch}, "
              "flips + rotation + intensity jitter")
        load_s, ips = bench_loader.in_memory(cache, table, torch.get_num_threads(), args.device,
                                             args.batch)
        print(f"{'in-memory on ' + args.device + ' + augment_batch':<44} {ips:9.0f} img/s"
              f"   (load_tensors once: {load_s:.2f} s)", flush=True)
        _, table_f, files = bench_loader.write_data(Path(tmp) / "npy", n_files)
        labels = table_f["label"].map(CLASSES.index).tolist()
        workers = min(8, os.cpu_count() or 1)
        ips = bench_loader.per_sample(files, labels, workers, args.device, args.batch)
        name = f"per-sample .npy + PIL, {workers} workers -> {args.device}"
        print(f"{name:<44} {ips:9.0f} img/s")


if __name__ == "__main__":
    main()

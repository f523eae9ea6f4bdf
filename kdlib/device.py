"""The device policy in one place: which device a run trains on, how many runs share a GPU, the
autocast precision, determinism, and the optimizer's kernels.

Precision: on CUDA the network body runs under autocast (bf16 where the GPU has native bf16,
else fp16 with a GradScaler; fp32 when asked), while the classifier head and the loss run in
float32 (`kdlib.models.Float32Linear`). The CPU always trains in float32.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import h5py
import torch

from kdlib.errors import ConfigError, RunError
from kdlib.identity import run_id
from kdlib.models import LADDER_BUILDERS, count_parameters, create_model
from kdlib.paths import resolve
from kdlib.train_config import PRECISIONS

CUBLAS_WORKSPACE = ":4096:8"
# Deterministic cuBLAS needs a fixed workspace. PyTorch reads CUBLAS_WORKSPACE_CONFIG once, when
# the process first creates a cuBLAS workspace (its first matmul on the GPU), and keeps that size;
# its determinism check reads the variable again at every matmul. Set inside fit(), it would pass
# the check while a notebook kernel that had already used the GPU kept the default workspace:
# silently non-deterministic. So it is set when kdlib imports its device policy, before kdlib makes
# any CUDA call (every kdlib path to the GPU imports this module); a value already set wins.
_CUDA_BEFORE_KDLIB = torch.cuda.is_initialized() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


MAX_RUNS_PER_DEVICE = 4
"""Default cap of concurrent runs per GPU. A static read estimated ~5.5 ms of CPU dispatch per
~1.7 ms of GPU work for mobilenet_v3_small (the grid's most common run): about 4 processes fill
the GPU; beyond that they only add memory. benchmarks/gpu_check.py measures 1, 2 and 4."""
CUDA_CONTEXT_BYTES = 600 * 2**20
"""GPU memory a process holds before its first tensor (CUDA context, cuDNN and cuBLAS handles)."""
GROUP_SIZE = 8
"""Default of the launcher's `group`: at most this many runs that share their data are trained
together in one task (kdlib.stacked.fit_group); on a GPU each worker then holds up to this many
runs' activations, which `grid_devices` counts."""
MEMORY_RESERVE = 0.1
"""Fraction of a GPU's total memory left free when choosing runs per device."""
ACTIVATION_SLACK = 1.25
"""Factor on the activations saved for backward: temporaries and allocator fragmentation."""
BYTES_PER_PARAM = 20
"""Student bytes per parameter: float32 weights, gradients, two AdamW moments, best-epoch copy."""


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; a CUDA device that is missing -> RunError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"device={name!r} but CUDA is not available here; use device: auto or cpu")
    return torch.device(name)


def free_memory(device: torch.device) -> None:
    """Collect garbage and return cached CUDA blocks (after an out-of-memory error)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- precision and determinism


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of the network body: None (float32) on the CPU or for fp32; bf16 where
    the GPU has native bf16 (Ampere or newer), else fp16; RunError for bf16 on a GPU without it."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is not valid; choose one of "
                          f"{list(PRECISIONS)}")
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    if precision == "bf16" and not native:
        raise RunError(f"precision='bf16' but {torch.cuda.get_device_name(device)} has no native "
                       "bf16 (it would be emulated, slowly); use precision: auto (fp16 with a "
                       "gradient scaler) or fp32")
    return torch.bfloat16 if native else torch.float16


def precision_name(dtype: torch.dtype | None) -> str:
    """`bf16`, `fp16` or `fp32` (None: no autocast)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def uses_channels_last(device: torch.device, model: str) -> bool:
    """Whether a run of `model` on `device` keeps its models and batches channels-last (NHWC): on
    CUDA (tensor cores), and on the CPU for the ladder CNNs, whose training steps oneDNN runs
    1.06-1.22x faster in NHWC at 40 px (torchvision models stay NCHW there: resnet18 is 0.73x;
    benchmarks/bench_train.py --size 40). NHWC sums in another order: the numbers agree with NCHW's to
    floating-point tolerance, not bit for bit."""
    return device.type == "cuda" or (device.type == "cpu" and model in LADDER_BUILDERS)


def to_run_device(model: torch.nn.Module, device: torch.device, name: str) -> torch.nn.Module:
    """`model` (of architecture `name`) on `device`, in the memory format its runs use there."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if uses_channels_last(device, name) else model


def numerics_identity(device: torch.device, dtype: torch.dtype | None, deterministic: bool,
                      compiled: bool, channels_last: bool) -> dict[str, Any]:
    """What besides the config and the data decides a run's numbers: the GPU model (None on the
    CPU), the autocast precision, deterministic mode, torch.compile and the memory format."""
    return {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "precision": precision_name(dtype), "deterministic": bool(deterministic),
            "compile": bool(compiled),
            "memory_format": "channels_last" if channels_last else "contiguous"}


def check_resume_numerics(now: Mapping[str, Any], then: Mapping[str, Any] | None,
                          folder: Path) -> None:
    """RunError when a run would resume on another GPU model or with other numerics settings
    than it started with (a checkpoint of an older kdlib, without them, is not checked)."""
    if not then:
        return
    diffs = [f"{k}: {then.get(k)!r} -> {now.get(k)!r}" for k in now if then.get(k) != now.get(k)]
    if diffs:
        raise RunError(f"cannot resume {folder}: it started with other numerics "
                       f"({'; '.join(diffs)}), and one run would mix both; resume it on the same "
                       "GPU model with the same precision, deterministic and compile settings (and "
                       f"the kdlib version it started with), or delete {folder} to start over")


@contextmanager
def determinism(deterministic: bool, device: torch.device | None = None) -> Iterator[None]:
    """Deterministic algorithms on, strictly (an op without a deterministic version raises), and
    cuDNN autotuning off; or the reverse. Restores the process's switches on exit."""
    if deterministic and device is not None and device.type == "cuda" and _CUDA_BEFORE_KDLIB:
        raise RunError("deterministic=True, but CUDA was in use before kdlib was imported, so "
                       "cuBLAS may run without the fixed workspace it needs to be deterministic; "
                       "restart the kernel and import kdlib before using the GPU, or export "
                       f"CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE} before starting Python")
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = previous[2]


def make_optimizer(params: Any, lr: float, weight_decay: float,
                   device: torch.device) -> torch.optim.AdamW:
    """AdamW; fused on CUDA (one kernel per step, and a GradScaler step without a host sync); on
    the CPU the foreach kernels, bit for bit the per-tensor loop's numbers in a fraction of its
    Python calls."""
    if device.type == "cuda":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


# ---------------------------------------------------------------- runs per device


@cache
def activation_bytes(model: str, image_size: int, batch_size: int, channels: int = 4) -> int:
    """Bytes of the activations one training step of `model` keeps for backward, at float32
    sizes (an upper bound under autocast), measured on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        net = create_model(model, in_channels=channels)
        x = torch.empty(batch_size, channels, image_size, image_size)
    state = {t.untyped_storage()._cdata for t in (*net.parameters(), *net.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata  # views of one tensor share a storage: count it once
        if key not in state:  # weights and BatchNorm statistics are not activations
            saved[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x)
    return sum(saved.values())


def run_footprint(model: str, image_size: int, batch_size: int, channels: int, n_slices: int,
                  teacher: str | None = None) -> int:
    """Estimated GPU memory (bytes) of one training run: the CUDA context, its slices on the device
    (float16), BYTES_PER_PARAM per student parameter, the teacher's float32 weights, and
    ACTIVATION_SLACK x `activation_bytes`."""
    total = CUDA_CONTEXT_BYTES + n_slices * channels * image_size**2 * 2
    total += BYTES_PER_PARAM * count_parameters(model, in_channels=channels)
    if teacher:
        total += 4 * count_parameters(teacher, in_channels=channels)
    act = activation_bytes(model, image_size, batch_size, channels)
    return int(total + ACTIVATION_SLACK * act)


def config_footprint(cfg: Any, teacher_model: str | None = None) -> int:
    """`run_footprint` of a TrainConfig, with every slice of its cache (train, val and test of a
    run are at most that) and the image size read from the cache file."""
    path = resolve(cfg.cache)
    try:
        with h5py.File(path, "r") as f:
            n_slices, _, size, _ = f["images"].shape
    except (OSError, KeyError):
        raise RunError(f"cache={cfg.cache!r}: cannot read the image shape of {path}; prepare the "
                       "slice cache first") from None
    return run_footprint(cfg.model, size, cfg.batch_size, len(cfg.modalities), n_slices,
                         teacher_model)


def available_cpus() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_runs_per_device(device: torch.device, footprint: int | None, n_devices: int = 1) -> int:
    """Concurrent runs on one GPU: as many as its free memory holds (after MEMORY_RESERVE) at
    `footprint` bytes each, at most one per CPU core of its share and MAX_RUNS_PER_DEVICE, at
    least 1; 1 when the footprint is unknown."""
    if footprint is None or footprint <= 0:
        return 1
    free, total = torch.cuda.mem_get_info(device)
    by_memory = int((free - MEMORY_RESERVE * total) // footprint)
    by_cpu = available_cpus() // max(n_devices, 1)
    return max(1, min(by_memory, by_cpu, MAX_RUNS_PER_DEVICE))


def _teacher_models(configs: Sequence[Any]) -> dict[str, str]:
    return {run_id(c): c.model for c in configs}


def grid_devices(device: str = "auto", workers: int = 1, runs_per_device: int | None = None,
                 configs: Sequence[Any] = (), group: int = GROUP_SIZE) -> list[str] | None:
    """The `devices` of the grid launcher; a device listed n times trains n runs at once.

    CPU (device cpu, or auto without CUDA): `workers` single-threaded processes (small CNNs train
    faster that way than in one multi-threaded process), or None for one in-process run at a
    time. CUDA: every GPU (auto, cuda) or the one named (cuda:N), each listed `runs_per_device`
    times; by default `default_runs_per_device` for that GPU and `group` times the largest run
    of `configs` (the launcher trains up to `group` runs together in one worker).
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers={workers!r} must be an integer >= 1")
    if runs_per_device is not None and (isinstance(runs_per_device, bool)
                                        or not isinstance(runs_per_device, int)
                                        or runs_per_device < 1):
        raise ConfigError(f"runs_per_device={runs_per_device!r} must be an integer >= 1, or None "
                          "to choose it from the free GPU memory")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return ["cpu"] * workers if workers > 1 else None
    if not device.startswith("cuda") and device != "auto":
        return None  # mps: one run at a time in this process
    resolve_device(device)  # RunError when CUDA is missing
    gpus = ([device] if device.startswith("cuda:")
            else [f"cuda:{i}" for i in range(torch.cuda.device_count())])
    footprint = None
    if runs_per_device is None and configs:
        teachers = _teacher_models(configs)
        footprint = group * max(config_footprint(c, teachers.get(Path(c.teacher).name)
                                                 if c.teacher else None) for c in configs)
    out: list[str] = []
    for gpu in gpus:
        n = runs_per_device or default_runs_per_device(torch.device(gpu), footprint, len(gpus))
        out += [gpu] * n
    return out

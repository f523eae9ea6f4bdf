"""kdlib.device: device resolution, runs per device, precision, determinism; CUDA queries are
monkeypatched stand-ins (this machine has no GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers_train import tiny_config, tiny_train_data

from kdlib import device as D
from kdlib.errors import ConfigError, RunError
from kdlib.models import count_parameters, create_model
from kdlib.train import TrainConfig

GiB = 2**30


@pytest.fixture
def gpus(monkeypatch):
    """A stand-in machine with CUDA GPUs: `gpus(free_gib, ...)` sets each GPU's free memory (of
    80 GiB) and the CPU cores (16)."""

    def make(*free_gib: float, cpus: int = 16) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(free_gib))
        monkeypatch.setattr(torch.cuda, "mem_get_info",
                            lambda dev: (int(free_gib[torch.device(dev).index or 0] * GiB),
                                         80 * GiB))
        monkeypatch.setattr(D, "available_cpus", lambda: cpus)

    return make


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert D.resolve_device("auto") == torch.device("cpu")
    assert D.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(RunError, match=r"device='cuda:1' but CUDA is not available.*auto or cpu"):
        D.resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert D.resolve_device("auto") == torch.device("cuda")
    assert D.resolve_device("cuda:1") == torch.device("cuda:1")


def test_grid_devices_on_the_cpu(monkeypatch):
    assert D.grid_devices("cpu", 2) == ["cpu", "cpu"]
    assert D.grid_devices("cpu", 1) is None
    with pytest.raises(ConfigError, match="workers=0"):
        D.grid_devices("cpu", 0)
    with pytest.raises(ConfigError, match="runs_per_device=0"):
        D.grid_devices("cpu", 1, runs_per_device=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert D.grid_devices("auto", 3) == ["cpu"] * 3
    with pytest.raises(RunError, match="CUDA is not available"):
        D.grid_devices("cuda", 1)


def test_grid_devices_on_gpus_with_a_setting(gpus):
    gpus(70, 70)
    assert D.grid_devices("auto", 4, runs_per_device=1) == ["cuda:0", "cuda:1"]
    assert D.grid_devices("cuda", 1, runs_per_device=3) == ["cuda:0"] * 3 + ["cuda:1"] * 3
    assert D.grid_devices("cuda:1", 2, runs_per_device=2) == ["cuda:1", "cuda:1"]  # that GPU only
    assert D.grid_devices("cuda") == ["cuda:0", "cuda:1"]  # nothing known of the runs: 1 each


def test_default_runs_per_device_from_free_memory_cpus_and_cap(gpus):
    gpus(40, 9.5, cpus=16)
    first, second = torch.device("cuda:0"), torch.device("cuda:1")
    # 40 GiB free - 8 GiB reserve = 32 GiB: 10 runs of 3 GiB fit, capped at MAX_RUNS_PER_DEVICE
    assert D.default_runs_per_device(first, 3 * GiB) == D.MAX_RUNS_PER_DEVICE == 4
    assert D.default_runs_per_device(first, 11 * GiB) == 2  # 32 // 11
    assert D.default_runs_per_device(second, 3 * GiB) == 0 + 1  # 1.5 GiB after the reserve
    assert D.default_runs_per_device(first, None) == 1
    gpus(40, cpus=3)
    assert D.default_runs_per_device(first, 3 * GiB) == 3  # one core per run
    gpus(40, 40, cpus=4)
    assert D.default_runs_per_device(first, 3 * GiB, n_devices=2) == 2  # the cores are shared


def test_grid_devices_default_is_per_device_from_the_largest_run(gpus, tmp_path):
    cache, splits = tiny_train_data(tmp_path)
    small = TrainConfig.from_dict(tiny_config(cache, splits, model="cnn_xs"))
    big = TrainConfig.from_dict(tiny_config(cache, splits, model="resnet50", batch_size=64))
    footprint = D.config_footprint(big)
    assert footprint > 1.6 * D.config_footprint(small)
    free = (8.0 + 2.5 * footprint / GiB, 8.0 + 1.5 * footprint / GiB)  # 8 GiB is the reserve
    gpus(*free)
    assert D.grid_devices("auto", configs=[small, big], group=1) == ["cuda:0"] * 2 + ["cuda:1"]
    assert D.grid_devices("auto", configs=[small], group=1) == ["cuda:0"] * 4 + ["cuda:1"] * 2
    assert D.grid_devices("auto", runs_per_device=1, configs=[small, big]) == ["cuda:0", "cuda:1"]
    # each worker trains up to `group` runs together: room for their activations and data
    gpus(8.0 + 2.5 * footprint / GiB * 2, 8.0 + 1.5 * footprint / GiB * 2)
    assert D.grid_devices("auto", configs=[small, big], group=2) == ["cuda:0"] * 2 + ["cuda:1"]
    assert D.grid_devices("auto", configs=[big]) == ["cuda:0", "cuda:1"]  # 8 runs: 1 per GPU


def test_run_footprint_adds_its_parts(tmp_path):
    act = D.activation_bytes("cnn_s", 32, 16, 2)
    base = D.run_footprint("cnn_s", 32, 16, 2, n_slices=0)
    assert base == int(D.CUDA_CONTEXT_BYTES + D.BYTES_PER_PARAM * count_parameters("cnn_s",
                                                                                  in_channels=2)
                       + D.ACTIVATION_SLACK * act)
    assert D.run_footprint("cnn_s", 32, 16, 2, n_slices=1000) - base == 1000 * 2 * 32 * 32 * 2
    teacher = D.run_footprint("cnn_s", 32, 16, 2, 0, teacher="resnet18") - base
    assert teacher == 4 * count_parameters("resnet18", in_channels=2)
    path = tmp_path / "c.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=np.zeros((10, 4, 8, 8), np.float16))
    cfg = TrainConfig.from_dict(tiny_config(path, tmp_path / "s.csv", modalities=["t1"]))
    assert D.config_footprint(cfg) == D.run_footprint("cnn_xs", 8, 8, 1, 10)
    with pytest.raises(RunError, match="cannot read the image shape"):
        D.config_footprint(TrainConfig.from_dict(tiny_config(tmp_path / "no.h5", path)))


def test_activation_bytes_by_hand():
    """cnn_xs keeps, per stage, the conv output (BatchNorm's input) and the BatchNorm output
    (ReLU runs in place, the next conv reads it), BatchNorm's batch mean and inverse std, plus
    the input and the pooled features that the classifier reads; float32, no weights."""
    b, s, c, f = 8, 32, 4, 4
    want = b * c * s * s * f + b * 32 * f
    for width, side in ((8, s // 2), (16, s // 4), (32, s // 8)):
        want += 2 * b * width * side * side * f + 2 * width * f
    assert D.activation_bytes("cnn_xs", s, b, c) == want
    assert D.activation_bytes("cnn_xs", s, 2 * b, c) > want


def test_autocast_dtype(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda:0")
    assert D.autocast_dtype(cpu, "bf16") is None  # the CPU trains in float32
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "Tesla V100")
    native = {"value": True}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native["value"] or including_emulation)
    assert D.autocast_dtype(gpu) == D.autocast_dtype(gpu, "bf16") == torch.bfloat16
    assert D.autocast_dtype(gpu, "fp16") == torch.float16
    assert D.autocast_dtype(gpu, "fp32") is None
    native["value"] = False  # pre-Ampere: bf16 only emulated
    assert D.autocast_dtype(gpu) == torch.float16
    with pytest.raises(RunError, match=r"bf16.*Tesla V100 has no native bf16.*auto.*fp32"):
        D.autocast_dtype(gpu, "bf16")
    with pytest.raises(ConfigError, match="precision='half'"):
        D.autocast_dtype(gpu, "half")
    assert [D.precision_name(d) for d in (torch.bfloat16, torch.float16, None)] == \
        ["bf16", "fp16", "fp32"]


def test_determinism_is_strict_and_restores_the_switches(monkeypatch):
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    with D.determinism(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert not torch.backends.cudnn.benchmark
    with D.determinism(False):
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before
    monkeypatch.setattr(D, "_CUDA_BEFORE_KDLIB", True)
    with (pytest.raises(RunError, match=r"CUDA was in use before kdlib.*CUBLAS_WORKSPACE_CONFIG"),
          D.determinism(True, torch.device("cuda"))):
        pass
    with D.determinism(True, torch.device("cpu")), D.determinism(False, torch.device("cuda")):
        pass  # only deterministic CUDA needs the workspace


@pytest.mark.parametrize("preset, want", [(None, D.CUBLAS_WORKSPACE), (":16:8", ":16:8")])
def test_cublas_workspace_is_set_when_kdlib_is_imported(preset, want):
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    if preset:
        env["CUBLAS_WORKSPACE_CONFIG"] = preset
    code = ("import os; before = os.environ.get('CUBLAS_WORKSPACE_CONFIG'); import kdlib.train; "
            "print(before, os.environ['CUBLAS_WORKSPACE_CONFIG'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).parents[1], check=True).stdout.split()
    assert out == [str(preset), want]


def test_fused_adamw_on_cuda_only():
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert D.make_optimizer(params, 1e-3, 0.0, torch.device("cuda")).defaults["fused"] is True
    cpu = D.make_optimizer(params, 1e-3, 0.0, torch.device("cpu"))
    assert not cpu.defaults["fused"] and cpu.defaults["foreach"]


def test_cpu_adamw_foreach_is_the_per_tensor_loop_bit_for_bit():
    x, y = torch.randn(16, 4, 16, 16), torch.randint(0, 3, (16,))
    weights = []
    for foreach in (True, False):
        torch.manual_seed(0)
        model = create_model("cnn_xs")
        opt = (D.make_optimizer(model.parameters(), 3e-3, 1e-4, torch.device("cpu")) if foreach
               else torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4,
                                      foreach=False))
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(*weights)


def test_channels_last_on_cuda_and_for_the_ladder_on_the_cpu():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert D.uses_channels_last(gpu, "resnet18") and D.uses_channels_last(gpu, "cnn_xs")
    assert D.uses_channels_last(cpu, "cnn_xs") and D.uses_channels_last(cpu, "cnn_l")
    assert not D.uses_channels_last(cpu, "resnet18")
    assert not D.uses_channels_last(torch.device("mps"), "cnn_xs")


def test_numerics_identity_and_resume_check(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "NVIDIA H200")
    gpu = D.numerics_identity(torch.device("cuda"), torch.bfloat16, True, False, True)
    assert gpu == {"gpu": "NVIDIA H200", "precision": "bf16", "deterministic": True,
                   "compile": False, "memory_format": "channels_last"}
    cpu = D.numerics_identity(torch.device("cpu"), None, True, False, True)
    assert cpu["gpu"] is None and cpu["precision"] == "fp32"
    assert D.numerics_identity(torch.device("cpu"), None, True, False, False)["memory_format"] \
        == "contiguous"
    nchw = {k: v for k, v in cpu.items() if k != "memory_format"}  # a CPU run of kdlib <= 0.1
    with pytest.raises(RunError, match=r"memory_format: None -> 'channels_last'"):
        D.check_resume_numerics(cpu, nchw, tmp_path)
    D.check_resume_numerics(gpu, dict(gpu), tmp_path)
    D.check_resume_numerics(gpu, None, tmp_path)  # a checkpoint of an older kdlib
    other = {**gpu, "gpu": "NVIDIA A100-SXM4-80GB", "deterministic": False}
    with pytest.raises(RunError, match=r"cannot resume .*gpu: 'NVIDIA A100-SXM4-80GB' -> "
                                       r"'NVIDIA H200'; deterministic: False -> True.*delete"):
        D.check_resume_numerics(gpu, other, tmp_path)


def test_free_memory_empties_the_cuda_cache(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty"))
    D.free_memory(torch.device("cpu"))
    assert calls == []
    D.free_memory(torch.device("cuda:0"))
    assert calls == ["empty"]

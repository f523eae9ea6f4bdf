"""kdlib.train: config validation, the loop, teachers and students end to end, resume, errors."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pandas as pd
import pytest
import torch
import yaml
from helpers_train import tiny_config, tiny_train_data

import kdlib.criterion
import kdlib.data.loader
import kdlib.device
import kdlib.train
from kdlib import CLASSES
from kdlib.errors import ConfigError, DataError, RunError
from kdlib.identity import run_id
from kdlib.metrics import PROB_COLUMNS as PROBS
from kdlib.models import create_model
from kdlib.results import load_history, load_predictions
from kdlib.runs import RUN_FILES
from kdlib.teachers import FrozenTeacher, load_teacher
from kdlib.train import fit
from kdlib.train_config import AugmentConfig, TrainConfig, load_train_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_train_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def teacher(data, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    return fit(tiny_config(*data, model="cnn_s"), runs, progress=False)


def _same_run(a, b):
    assert (a / "metrics.json").read_bytes() == (b / "metrics.json").read_bytes()
    assert (a / "predictions.csv").read_bytes() == (b / "predictions.csv").read_bytes()
    ha, hb = load_history(a).drop(columns="time_s"), load_history(b).drop(columns="time_s")
    pd.testing.assert_frame_equal(ha, hb, check_exact=True)
    sa = torch.load(a / "model.pt", weights_only=True)
    sb = torch.load(b / "model.pt", weights_only=True)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------- config


def test_config_defaults_roundtrip_and_yaml(data, tmp_path):
    cfg = TrainConfig.from_dict(tiny_config(*data, lr="1e-3", ratio=4))
    assert cfg.lr == 1e-3 and cfg.ratio == 4.0 and cfg.modalities == ("flair", "t1")
    assert cfg.augment.enabled and cfg.select_metric == "macro_f1" and cfg.sampler == "none"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_train_config(path) == cfg == load_train_config(cfg.to_dict())
    assert len({cfg, load_train_config(path)}) == 1
    off = TrainConfig.from_dict(tiny_config(*data, augment=False))
    assert not off.augment.enabled
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0


@pytest.mark.parametrize("over, match", [
    ({"modle": "cnn_s"}, r"unknown setting.*modle.*valid settings"),
    ({"model": "resnet1"}, r"unknown model 'resnet1'.*resnet18"),
    ({"task_loss": "ce2"}, r"task_loss='ce2'.*weighted_ce"),
    ({"distiller": "fitnet", "teacher": "x"}, r"distiller='fitnet'.*dkd"),
    ({"distiller": "kd"}, r"needs a teacher"),
    ({"teacher": "some-run"}, r"distiller is None"),
    ({"task_loss": "ldam_drw", "posthoc_tau": 1.0}, r"prior twice"),
    ({"sampler": "oversample", "posthoc_tau": 1.0}, r"resampled"),
    ({"sampler": "smote"}, r"sampler='smote'.*undersample"),
    ({"modalities": ["flair", "dwi"]}, r"modalities='dwi'.*t1ce"),
    ({"epochs": 0}, r"epochs=0"),
    ({"lr": "fast"}, r"lr=.fast. must be a number"),
    ({"augment": {"flip": True, "mixup": 1}}, r"mixup.*augment"),
    ({"loss_params": {"gamma": 2}}, r"gamma.*task_loss='ce'"),
    ({"task_loss": "focal", "loss_params": {"gamma": -1}}, r"gamma=-1"),
    ({"cache_teacher_logits": True}, r"needs a distiller"),
    ({"select_metric": "auc"}, r"select_metric='auc'.*macro_f1"),
    ({"ratio": 0.5}, r"ratio=0.5"),
    ({"repeat": -1}, r"repeat=-1"),
    ({"repeat": 1.5}, r"repeat=1.5 must be a whole number"),
    ({"augment": "yes"}, r"augment='yes'.*true, false, null or a mapping"),
    ({"augment": 1}, r"augment=1 .*true, false, null or a mapping"),
    ({"augment": [1]}, r"augment=\[1\].*true, false, null or a mapping"),
])
def test_config_errors_name_the_setting(data, over, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(tiny_config(*data, **over))


# ---------------------------------------------------------------- end to end


def test_teacher_run_folder(teacher):
    assert teacher.name.startswith("cnn_s-ce-f0-rnat-s0-")
    assert sorted(p.name for p in teacher.iterdir()) == sorted(RUN_FILES)
    pred = load_predictions(teacher)
    assert list(pred.columns) == ["subject_id", "slice", "label", *(f"p_{c}" for c in CLASSES),
                                  *(f"z_{c}" for c in CLASSES)]
    assert pred[[f"p_{c}" for c in CLASSES]].sum(axis=1).sub(1).abs().max() < 1e-6
    m = json.loads((teacher / "metrics.json").read_text())
    for key in ("macro_f1", "f1_LGG", "recall_LGG", "patient_balanced_accuracy", "best_epoch",
                "params", "train_n_LGG", "n_train_subjects", "n_test_slices", "n_val_slices"):
        assert key in m
    hist = load_history(teacher)
    for col in ("epoch", "lr", "train_loss", "train_task", "val_loss", "val_macro_f1",
                "val_balanced_accuracy", "val_f1_LGG", "val_recall_LGG", "time_s"):
        assert col in hist
    assert len(hist) == 2
    env = json.loads((teacher / "env.json").read_text())
    assert {"python", "torch", "torchvision", "git_commit", "device", "hostname"} <= set(env)
    assert yaml.safe_load((teacher / "config.yaml").read_text())["model"] == "cnn_s"
    assert torch.load(teacher / "model.pt", weights_only=True)  # weights-only loadable


@pytest.mark.parametrize("distiller, cached", [("kd", False), ("dkd", True)])
def test_distilled_student_end_to_end(data, teacher, tmp_path, distiller, cached):
    cfg = tiny_config(*data, distiller=distiller, teacher=str(teacher), cache_teacher_logits=cached)
    path = fit(cfg, tmp_path, progress=False)
    hist = load_history(path)
    terms = ["train_kd"] if distiller == "kd" else ["train_tckd", "train_nckd"]
    assert all(t in hist for t in terms) and (hist[terms[0]] > 0).all()
    m = json.loads((path / "metrics.json").read_text())
    assert m["teacher_params"] > m["params"] > 0
    assert not list(tmp_path.glob(".tmp-*"))


def test_posthoc_adjustment_applies_to_probabilities(data, tmp_path):
    path = fit(tiny_config(*data, posthoc_tau=1.0, epochs=1), tmp_path, progress=False)
    pred, m = load_predictions(path), json.loads((path / "metrics.json").read_text())
    counts = torch.tensor([m[f"train_n_{c}"] for c in CLASSES], dtype=torch.float64)
    z = torch.tensor(pred[[f"z_{c}" for c in CLASSES]].to_numpy())
    p = torch.softmax(z - torch.log(counts / counts.sum()), dim=1)
    assert torch.allclose(p, torch.tensor(pred[[f"p_{c}" for c in CLASSES]].to_numpy()), atol=1e-6)


def test_early_stopping_keeps_the_best_epoch(data, tmp_path, monkeypatch):
    real, f1 = kdlib.train.validation_scores, iter([0.5, 0.7, 0.6, 0.65, 0.9, 0.9])

    def scores(*args):
        return {**real(*args), "macro_f1": next(f1)}

    monkeypatch.setattr(kdlib.train, "validation_scores", scores)
    path = fit(tiny_config(*data, epochs=6, patience=2), tmp_path, progress=False)
    m = json.loads((path / "metrics.json").read_text())
    assert (m["best_epoch"], m["epochs_run"]) == (2, 4)
    assert load_history(path)["val_macro_f1"].tolist() == [0.5, 0.7, 0.6, 0.65]


def test_teacher_by_run_id_in_the_same_runs_dir(data, teacher):
    cfg = tiny_config(*data, distiller="bkd", teacher=teacher.name, epochs=1)
    assert fit(cfg, teacher.parent, progress=False).parent == teacher.parent


def test_same_seed_same_numbers_and_skip_finished(data, tmp_path, monkeypatch):
    cfg = tiny_config(*data, sampler="oversample", task_loss="focal")
    a = fit(cfg, tmp_path / "a", progress=False)
    b = fit(cfg, tmp_path / "b", progress=False)
    _same_run(a, b)
    stamp = (a / "metrics.json").stat().st_mtime_ns
    monkeypatch.setattr("kdlib.train._fit", lambda *a, **k: pytest.fail("finished run retrained"))
    assert fit(cfg, tmp_path / "a", progress=False) == a
    assert (a / "metrics.json").stat().st_mtime_ns == stamp


class Interrupt(Exception):
    pass


def _interrupt_at(monkeypatch, call: int):
    """Make the `call`-th augmented batch raise (mid-epoch), like a killed process."""
    real, count = kdlib.data.loader.augment_batch, [0]

    def augment(*args, **kw):
        count[0] += 1
        if count[0] == call:
            raise Interrupt
        return real(*args, **kw)

    monkeypatch.setattr(kdlib.data.loader, "augment_batch", augment)


def test_interrupted_run_resumes_to_identical_numbers(data, tmp_path, monkeypatch):
    cfg = tiny_config(*data, epochs=3, warmup_epochs=1)
    straight = fit(cfg, tmp_path / "straight", progress=False)
    _interrupt_at(monkeypatch, 4)  # 2 steps per epoch: the second step of epoch 2
    with pytest.raises(Interrupt):
        fit(cfg, tmp_path / "resumed", progress=False)
    tmp = tmp_path / "resumed" / f".tmp-{run_id(load_train_config(cfg))}"
    ckpt = torch.load(tmp / "checkpoint.pt", weights_only=True)
    assert ckpt["state"]["epoch"] == 1
    monkeypatch.undo()
    resumed = fit(cfg, tmp_path / "resumed", progress=False)
    assert not tmp.exists()
    _same_run(straight, resumed)


def test_resume_refuses_changed_data_or_config(data, tmp_path, monkeypatch):
    cache, splits = data
    own = shutil.copy(splits, tmp_path / "splits.csv")
    cfg = tiny_config(cache, own)
    _interrupt_at(monkeypatch, 3)
    with pytest.raises(Interrupt):
        fit(cfg, tmp_path, progress=False)
    monkeypatch.undo()
    df = pd.read_csv(own)
    df.loc[df.fold >= 0, "fold"] = 1 - df.loc[df.fold >= 0, "fold"]
    df.to_csv(own, index=False)
    with pytest.raises(RunError, match=r"cannot resume.*splits"):
        fit(cfg, tmp_path, progress=False)
    shutil.copy(splits, own)
    monkeypatch.setattr(kdlib.train, "run_id", lambda c: run_id(load_train_config(cfg)))
    with pytest.raises(RunError, match=r"cannot resume.*lr"):
        fit({**cfg, "lr": 0.1}, tmp_path, progress=False)


def test_nan_loss_stops_naming_epoch_and_step_and_keeps_checkpoint(data, tmp_path, monkeypatch):
    real = kdlib.train.build_criterion

    def build(*args, **kw):
        crit, calls = real(*args, **kw), [0]

        def criterion(zs, y, zt=None, epoch=0):
            out = crit(zs, y, zt, epoch=epoch)
            calls[0] += 1
            if calls[0] == 4:  # epoch 2, step 2
                out["loss"] = out["loss"] * float("nan")
            return out

        return criterion

    monkeypatch.setattr(kdlib.train, "build_criterion", build)
    cfg = tiny_config(*data, epochs=3)
    match = r"nan at epoch 2, step 2 of 2.*checkpoint \(epoch 1\) is kept"
    with pytest.raises(RunError, match=match):
        fit(cfg, tmp_path, progress=False)
    tmp = tmp_path / f".tmp-{run_id(load_train_config(cfg))}"
    assert torch.load(tmp / "checkpoint.pt", weights_only=True)["state"]["epoch"] == 1
    assert not (tmp_path / tmp.name[5:]).exists()


def test_missing_files_and_bad_teachers(data, teacher, tmp_path):
    cache, splits = data
    with pytest.raises(DataError, match=r"cache=.*does not exist"):
        fit(tiny_config(tmp_path / "no.h5", splits), tmp_path, progress=False)
    with pytest.raises(DataError, match=r"splits=.*does not exist"):
        fit(tiny_config(cache, tmp_path / "no.csv"), tmp_path, progress=False)
    with pytest.raises(ConfigError, match=r"repeat=1 is not a repeat of these splits.*\[0\]"):
        fit(tiny_config(cache, splits, repeat=1), tmp_path, progress=False)
    with pytest.raises(RunError, match=r"teacher 'cnn_l-ce-nope' not found.*train the teacher"):
        fit(tiny_config(cache, splits, distiller="kd", teacher="cnn_l-ce-nope"), tmp_path,
            progress=False)
    with pytest.raises(RunError, match=r"2 channel\(s\).*student uses 1"):
        fit(tiny_config(cache, splits, modalities=["flair"], distiller="kd", teacher=str(teacher)),
            tmp_path, progress=False)
    other = shutil.copytree(teacher, tmp_path / "two-class-teacher")
    torch.save(create_model("cnn_s", num_classes=2, in_channels=2).state_dict(), other / "model.pt")
    with pytest.raises(RunError, match=r"predicts 2 classes, the student 3"):
        fit(tiny_config(cache, splits, distiller="kd", teacher=str(other)), tmp_path,
            progress=False)
    assert not list(tmp_path.glob(".tmp-*"))  # nothing was started


def _edited_teacher(teacher, folder, **over):
    """A copy of the teacher run folder whose config.yaml says `over`."""
    other = shutil.copytree(teacher, folder)
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    (other / "config.yaml").write_text(yaml.safe_dump({**cfg, **over}))
    return other


def test_teacher_must_share_data_and_not_see_the_students_val_or_test(data, teacher, tmp_path):
    cache, splits = data
    load = lambda t: load_teacher(
        load_train_config(tiny_config(cache, splits, distiller="kd", teacher=str(t))), tmp_path,
        torch.device("cpu"))
    other_fold = _edited_teacher(teacher, tmp_path / "fold1-teacher", fold=1)
    with pytest.raises(RunError, match=r"teacher fold1-teacher.*fold 1.*BraTS20_Training_.*fold 0"):
        load(other_fold)
    with pytest.raises(RunError, match=r"teacher fold1-teacher.*fold 1"):
        fit(tiny_config(cache, splits, distiller="kd", teacher=str(other_fold)), tmp_path,
            progress=False)
    own = shutil.copy(splits, tmp_path / "other-splits.csv")
    other_splits = _edited_teacher(teacher, tmp_path / "splits-teacher", splits=str(own))
    with pytest.raises(RunError, match=r"splits.*other-splits.csv.*student.*splits.csv"):
        load(other_splits)
    other_repeat = _edited_teacher(teacher, tmp_path / "repeat-teacher", repeat=1)
    with pytest.raises(RunError, match=r"teacher repeat-teacher is of repeat 1, the student of "
                                       r"repeat 0; use a teacher of the student's repeat"):
        load(other_repeat)
    other_ratio = _edited_teacher(teacher, tmp_path / "ratio-teacher", ratio=2)
    assert load(other_ratio)[1] == other_ratio  # same fold, another ratio: allowed
    assert not list(tmp_path.glob(".tmp-*"))


def test_resume_refuses_another_kind_of_device(data, tmp_path, monkeypatch):
    cfg = tiny_config(*data, epochs=3)
    _interrupt_at(monkeypatch, 4)
    with pytest.raises(Interrupt):
        fit(cfg, tmp_path, progress=False)
    monkeypatch.undo()
    ckpt_path = tmp_path / f".tmp-{run_id(load_train_config(cfg))}" / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["identity"]["execution"] == {"device_type": "cpu", "autocast": False,
                                             "cpu_threads": torch.get_num_threads()}
    ckpt["identity"]["execution"] = {"device_type": "cuda", "autocast": True, "cpu_threads": None}
    torch.save(ckpt, ckpt_path)
    with pytest.raises(RunError, match=r"cannot resume.*started on cuda \(bf16 autocast\).*cpu.*"
                                       r"same kind of device.*delete"):
        fit(cfg, tmp_path, progress=False)


# ---------------------------------------------------------------- GPU behaviour, CPU stand-ins


def test_out_of_memory_is_a_run_error_naming_the_run_batch_size_and_fix(data, tmp_path,
                                                                         monkeypatch):
    real, count = kdlib.data.loader.augment_batch, [0]

    def augment(*args, **kw):
        count[0] += 1
        if count[0] == 3:  # epoch 2, step 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\n"
                                              "(the allocator's statistics)")
        return real(*args, **kw)

    freed = []
    monkeypatch.setattr(kdlib.data.loader, "augment_batch", augment)
    monkeypatch.setattr(kdlib.train, "free_memory", lambda dev: freed.append(str(dev)))
    before = torch.are_deterministic_algorithms_enabled()
    cfg = tiny_config(*data, epochs=3)
    rid = run_id(load_train_config(cfg))
    with pytest.raises(RunError, match=rf"run {rid} ran out of memory on cpu at batch_size=8 "
                                       r"\(evaluation batches of 32\): CUDA out of memory\. Tried "
                                       r"to allocate 2\.00 GiB; lower batch_size, or train fewer "
                                       r"runs at once on this device \(runs_per_device\); its "
                                       r"last finished epoch is kept") as err:
        fit(cfg, tmp_path, progress=False)
    assert "statistics" not in str(err.value) and err.value.__cause__ is None
    assert freed == ["cpu"] and torch.are_deterministic_algorithms_enabled() == before
    monkeypatch.undo()
    assert fit(cfg, tmp_path, progress=False) == tmp_path / rid  # resumes from epoch 1


def test_env_records_the_numerics(teacher):
    env = json.loads((teacher / "env.json").read_text())
    assert {k: env[k] for k in ("gpu", "precision", "deterministic", "compile",
                                "memory_format")} == \
        {"gpu": None, "precision": "fp32", "deterministic": True, "compile": False,
         "memory_format": "channels_last"}


def test_channels_last_on_the_cpu_agrees_with_nchw_to_float_tolerance(data, teacher, tmp_path,
                                                                      monkeypatch):
    """The CPU trains channels-last (faster oneDNN convolutions): the same run in NCHW sums in
    another order, so it agrees to floating-point tolerance, not bit for bit."""
    cfg = tiny_config(*data, distiller="kd", teacher=str(teacher), epochs=3)
    nhwc = fit(cfg, tmp_path / "nhwc", progress=False)
    for module in (kdlib.device, kdlib.train):  # the models, and the batches
        monkeypatch.setattr(module, "uses_channels_last", lambda device, model: False)
    nchw = fit(cfg, tmp_path / "nchw", progress=False)
    formats = [json.loads((p / "env.json").read_text())["memory_format"] for p in (nhwc, nchw)]
    assert formats == ["channels_last", "contiguous"]
    ha, hb = (load_history(p).drop(columns="time_s") for p in (nhwc, nchw))
    pd.testing.assert_frame_equal(ha, hb, check_exact=False, rtol=1e-5, atol=1e-6)
    pa, pb = (load_predictions(p)[list(PROBS)] for p in (nhwc, nchw))
    pd.testing.assert_frame_equal(pa, pb, check_exact=False, rtol=0, atol=1e-5)


def test_resume_refuses_another_gpu_model_or_determinism(data, tmp_path, monkeypatch):
    cfg = tiny_config(*data, epochs=3)
    _interrupt_at(monkeypatch, 4)
    with pytest.raises(Interrupt):
        fit(cfg, tmp_path, progress=False)
    monkeypatch.undo()
    with pytest.raises(RunError, match=r"cannot resume.*deterministic: True -> False"):
        fit({**cfg, "deterministic": False}, tmp_path, progress=False)  # same run id
    ckpt_path = tmp_path / f".tmp-{run_id(load_train_config(cfg))}" / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["identity"]["numerics"] == {"gpu": None, "precision": "fp32",
                                            "deterministic": True, "compile": False,
                                            "memory_format": "channels_last"}
    ckpt["identity"]["numerics"]["gpu"] = "NVIDIA A100-SXM4-80GB"
    torch.save(ckpt, ckpt_path)
    with pytest.raises(RunError, match=r"cannot resume.*gpu: 'NVIDIA A100-SXM4-80GB' -> None"):
        fit(cfg, tmp_path, progress=False)


def test_resume_refuses_another_cpu_thread_count(data, tmp_path, monkeypatch):
    cfg = tiny_config(*data, epochs=3)
    threads = torch.get_num_threads()
    _interrupt_at(monkeypatch, 4)
    with pytest.raises(Interrupt):
        fit(cfg, tmp_path, progress=False)
    monkeypatch.undo()
    torch.set_num_threads(threads + 1)
    try:
        with pytest.raises(RunError, match=rf"cannot resume.*started with {threads} CPU thread\(s\) "
                                           rf"and would continue with {threads + 1}.*"
                                           rf"set_num_threads\({threads}\)"):
            fit(cfg, tmp_path, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert fit(cfg, tmp_path, progress=False).is_dir()  # the same count resumes


def _step_inputs(model="cnn_xs", channels=2, n=8, size=32, optimizer_device="cpu"):
    """Model, optimizer (fit's for `optimizer_device`: fused AdamW for cuda), scheduler, x, y."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, channels, size, size, generator=g).half()
    y = torch.tensor([0, 1, 2, 0, 1, 2, 2, 0][:n])
    net = create_model(model, in_channels=channels)
    opt = kdlib.device.make_optimizer(net.parameters(), 1e-3, 1e-4, torch.device(optimizer_device))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return net, opt, sched, x, y


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)` before")
def test_grad_scaler_skips_a_step_whose_gradients_overflow():
    net, opt, sched, x, y = _step_inputs()

    def overflow(zs, yb, zt=None, epoch=0):
        return {"loss": zs.sum() * float("inf")}

    before = [p.detach().clone() for p in net.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    kdlib.train.train_step(net, overflow, opt, sched, x, y, torch.arange(4), epoch=1,
                           scaler=scaler)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert scaler.get_scale() == 512.0
    kdlib.train.train_step(net, overflow, opt, sched, x, y, torch.arange(4), epoch=1)
    assert any(not torch.isfinite(p).all() for p in net.parameters())  # unscaled: weights lost


def test_fp16_autocast_step_with_a_scaler_trains():
    net, opt, sched, x, y = _step_inputs()
    crit = kdlib.criterion.build_criterion("ce", None, [3, 3, 2], 1)
    scaler = torch.amp.GradScaler("cpu")
    before = [p.detach().clone() for p in net.parameters()]
    terms = kdlib.train.train_step(net, crit, opt, sched, x, y, torch.arange(8), epoch=1,
                                   amp=torch.float16, scaler=scaler)
    assert terms["loss"].dtype == torch.float32 and torch.isfinite(terms["loss"])
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


# aten ops that make the host wait for a CUDA device, and ops that strict deterministic mode
# rejects on CUDA (torch.use_deterministic_algorithms' list, as the aten ops a CNN step reaches)
SYNC_OPS = {"nonzero", "nonzero_static", "_local_scalar_dense", "item", "is_nonzero",
            "masked_select", "unique", "_unique2"}
CUDA_NONDETERMINISTIC_OPS = {
    "_adaptive_avg_pool2d_backward", "adaptive_max_pool2d_backward", "avg_pool3d_backward",
    "_adaptive_avg_pool3d_backward", "fractional_max_pool2d_backward", "max_unpool2d",
    "upsample_linear1d_backward", "upsample_bilinear2d_backward", "upsample_bicubic2d_backward",
    "reflection_pad1d_backward", "reflection_pad2d_backward", "reflection_pad3d_backward",
    "nll_loss2d_forward", "_ctc_loss_backward", "_embedding_bag_backward", "put_", "histc",
    "bincount", "kthvalue", "median", "grid_sampler_2d_backward", "cumsum", "scatter_reduce"}


class _OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "index" and any(getattr(i, "dtype", None) == torch.bool for i in args[1]):
            name = "index with a boolean mask"
        self.ops.add(name)
        return func(*args, **(kwargs or {}))


def _scan_step(model, task_loss, distiller, size=32):
    """Record the aten ops of fit's training step (augmentation, teacher, student, criterion,
    backward, fused AdamW as on CUDA, scheduler) and fail on a syncing or rejected one."""
    net, opt, sched, x, y = _step_inputs(model, size=size, optimizer_device="cuda")
    teacher = FrozenTeacher(create_model("cnn_xs", in_channels=2))
    crit = kdlib.criterion.build_criterion(task_loss, distiller, [3, 3, 2], 4)
    with _OpRecorder() as rec:
        kdlib.train.train_step(net, crit, opt, sched, x, y, torch.arange(8), epoch=1,
                               teacher=teacher if distiller else None,
                               augment=AugmentConfig(),
                               generator=torch.Generator().manual_seed(1))
    bad = rec.ops & (SYNC_OPS | CUDA_NONDETERMINISTIC_OPS | {"index with a boolean mask"})
    assert not bad, f"{model}, {task_loss}, {distiller}: {sorted(bad)}"
    assert "convolution_backward" in rec.ops  # the recorder saw the backward pass


@pytest.mark.parametrize("task_loss", sorted(kdlib.criterion.LOSSES))
@pytest.mark.parametrize("distiller", [None, *sorted(kdlib.criterion.DISTILLERS)])
def test_training_step_has_no_host_sync_and_no_op_strict_cuda_determinism_rejects(task_loss,
                                                                                  distiller):
    _scan_step("cnn_xs", task_loss, distiller)


@pytest.mark.parametrize("model", ["mobilenet_v3_small", "mobilenet_v2", "resnet18", "resnet50",
                                   "densenet121", "efficientnet_v2_s"])
def test_real_profile_models_step_without_host_sync_or_nondeterministic_ops(model):
    _scan_step(model, "ce", "dkd")


def test_compile_trains_the_compiled_model_and_saves_plain_weights(data, tmp_path, monkeypatch):
    """torch.compile on (dynamo's eager backend here: inductor takes minutes on this CPU)."""
    real, compiled = torch.compile, []

    def compile_eager(model, **kw):
        compiled.append(model)
        return real(model, backend="eager")

    monkeypatch.setattr(torch, "compile", compile_eager)
    path = fit(tiny_config(*data, epochs=1, compile=True), tmp_path, progress=False)
    assert len(compiled) == 1
    assert not isinstance(compiled[0], torch._dynamo.eval_frame.OptimizedModule)
    state = torch.load(path / "model.pt", weights_only=True)
    assert not any(k.startswith("_orig_mod") for k in state)
    assert json.loads((path / "env.json").read_text())["compile"] is True
    plain = fit(tiny_config(*data, epochs=1), tmp_path / "plain", progress=False)
    assert path.name == plain.name  # compile is an execution setting, not part of the run id

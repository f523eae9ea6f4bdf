"""One training loop for teachers, baselines and students: `train_one_epoch`, `evaluate`, `fit`.

A baseline is a student without a teacher; distillation adds the frozen teacher's logits to what
the criterion sees (kdlib.criterion.build_criterion). `fit` writes a run folder (kdlib.runs): it
trains in `runs_dir/.tmp-<run_id>`, checkpoints every epoch, resumes an interrupted run
bit-for-bit, and renames the folder to `runs_dir/<run_id>` when the test predictions and metrics
are written.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from kdlib import CLASSES, MINORITY
from kdlib.config import write_yaml
from kdlib.criterion import build_criterion, logit_scale
from kdlib.data import loader
from kdlib.data.folds import fold_data
from kdlib.device import (  # resolve_device is also re-exported
    autocast_dtype,
    check_resume_numerics,
    determinism,
    free_memory,
    make_optimizer,
    numerics_identity,
    resolve_device,
    uses_channels_last,
)
from kdlib.errors import DataError, RunError
from kdlib.identity import config_identity, run_id
from kdlib.lock import run_lock
from kdlib.metrics import run_metrics
from kdlib.models import count_parameters
from kdlib.predictions import predictions_frame, validation_scores
from kdlib.runs import (
    check_resume,
    data_fingerprint,
    execution_identity,
    finish_run,
    is_finished,
    save_atomic,
)
from kdlib.teachers import FrozenTeacher, build_model, load_teacher
from kdlib.train_config import AugmentConfig, TrainConfig, load_train_config


def _autocast(device: torch.device, amp: torch.dtype | bool | None):
    """Autocast to dtype `amp` on `device` (True: bf16); None or False: off (float32)."""
    dtype = torch.bfloat16 if amp is True or not amp else amp
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=bool(amp))


def _prepare(xb: torch.Tensor, channels_last: bool) -> torch.Tensor:
    xb = xb.float()
    return xb.contiguous(memory_format=torch.channels_last) if channels_last else xb


def batch_input(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor,
                augment: AugmentConfig | None, generator: torch.Generator | None,
                channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's inputs and labels: samples `idx` of x, y as float, augmented when enabled."""
    xb, yb = x[idx].float(), y[idx]
    if augment is not None and augment.enabled:
        xb = loader.augment_batch(xb, generator, augment.flip, augment.max_rotation_deg,
                                  augment.intensity_jitter)
    return _prepare(xb, channels_last), yb


def batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Split an epoch's sample order into batches; a trailing batch of one sample is dropped
    (BatchNorm cannot train on it)."""
    parts = list(torch.split(order, batch_size))
    return [b for b in parts if len(b) > 1]


def train_step(
    model: nn.Module, criterion: Callable[..., dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
    x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, *, epoch: int,
    teacher: nn.Module | None = None, teacher_logits: torch.Tensor | None = None,
    augment: AugmentConfig | None = None, generator: torch.Generator | None = None,
    amp: torch.dtype | bool | None = None, scaler: torch.amp.GradScaler | None = None,
    channels_last: bool = False,
) -> dict[str, torch.Tensor]:
    """One optimisation step on the samples `idx` (on x's device) of x, y in epoch `epoch`
    (from 1); returns the criterion's terms, left on the device (no host-device sync).

    The batch is augmented, the teacher (unless `teacher_logits` are given) and the student run
    under autocast to `amp`, their logits and the loss in float32; `scaler` (fp16) scales the loss.
    """
    xb, yb = batch_input(x, y, idx, augment, generator, channels_last)
    with _autocast(x.device, amp):
        if teacher_logits is not None:
            zt = teacher_logits[idx]
        elif teacher is not None:
            zt = teacher(xb).float()
        else:
            zt = None
        zs = model(xb).float()
    terms = criterion(zs, yb, zt, epoch=epoch - 1)  # the criterion counts epochs from 0
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(terms["loss"]).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        terms["loss"].backward()
        optimizer.step()
    scheduler.step()
    return terms


def train_one_epoch(
    model: nn.Module, criterion: Callable[..., dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
    x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, *, batch_size: int, epoch: int,
    teacher: nn.Module | None = None, teacher_logits: torch.Tensor | None = None,
    augment: AugmentConfig | None = None, generator: torch.Generator | None = None,
    amp: torch.dtype | bool | None = None, scaler: torch.amp.GradScaler | None = None,
    channels_last: bool = False, progress: bool = False,
) -> dict[str, float]:
    """One pass over `order` (indices into x, y) in epoch `epoch` (counted from 1) by
    `train_step`; returns the sample-mean of each loss term.

    The teacher (if any) sees the same augmented batch as the student, unless `teacher_logits`
    (precomputed on the un-augmented images, indexed like x) are given. Raises RunError naming the
    epoch and step when the loss is not finite.
    """
    model.train()
    sums: dict[str, torch.Tensor] = {}
    seen = 0
    steps = batches(loader.host_to_device(order, x.device), batch_size)
    losses = torch.empty(len(steps), device=x.device)  # checked once at the end: no sync per step
    bar = tqdm(steps, desc=f"epoch {epoch}", leave=False, disable=not progress)
    for step, idx in enumerate(bar, 1):
        terms = train_step(model, criterion, optimizer, scheduler, x, y, idx, epoch=epoch,
                           teacher=teacher, teacher_logits=teacher_logits, augment=augment,
                           generator=generator, amp=amp, scaler=scaler,
                           channels_last=channels_last)
        losses[step - 1] = terms["loss"].detach()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float() * len(idx)
        seen += len(idx)
    bad = torch.nonzero(~torch.isfinite(losses)).flatten().tolist()
    if bad:
        raise RunError(f"the loss became {losses[bad[0]].item()} at epoch {epoch}, step "
                       f"{bad[0] + 1} of {len(steps)}; training stopped (try a lower lr or check "
                       "the inputs)")
    return {k: float(v) / max(seen, 1) for k, v in sums.items()}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, batch_size: int = 256,
             amp: torch.dtype | bool | None = None, channels_last: bool = False) -> torch.Tensor:
    """Outputs (N, classes) of `model` in eval mode on x, float32 on x's device (autocast to `amp`
    for the body): the logits, except for a cosine head (ldam_drw), whose outputs times
    criterion.logit_scale are the logits."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(x), batch_size):
        with _autocast(x.device, amp):
            out.append(model(_prepare(x[start:start + batch_size], channels_last)).float())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty((0, len(CLASSES)), device=x.device)


def lr_lambda(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Per-step LR factor: linear warmup to 1 over `warmup_steps`, then cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _rng_states(gens: dict[str, torch.Generator], device: torch.device) -> dict[str, Any]:
    out = {f"gen_{k}": g.get_state() for k, g in gens.items()}
    out["torch_cpu"] = torch.get_rng_state()
    if device.type == "cuda":
        out["torch_cuda"] = torch.cuda.get_rng_state(device)
    return out


def _set_rng_states(states: dict[str, Any], gens: dict[str, torch.Generator],
                    device: torch.device) -> None:
    for k, g in gens.items():
        g.set_state(states[f"gen_{k}"])
    torch.set_rng_state(states["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in states:
        torch.cuda.set_rng_state(states["torch_cuda"], device)


def _better(metric: str, value: float, best: float | None) -> bool:
    if best is None or (math.isnan(best) and not math.isnan(value)):
        return True
    return value < best if metric == "loss" else value > best


def fit(cfg: TrainConfig | Mapping[str, Any] | str | Path, runs_dir: str | Path,
        progress: bool = True) -> Path:
    """Train one run and return its finished folder `runs_dir/<run_id>`.

    A finished run is returned at once (skipped); an unfinished one (`.tmp-<run_id>` with a
    checkpoint) resumes where its last epoch ended and ends with the same numbers as a straight run.
    Running out of GPU memory raises RunError naming the run, its batch size and the fix. Training
    holds the run's lock: a second process on the same run waits for it (kdlib.lock).
    """
    cfg = load_train_config(cfg)
    runs_dir = Path(runs_dir)
    rid = run_id(cfg)
    final, tmp = runs_dir / rid, runs_dir / f".tmp-{rid}"
    if is_finished(final):
        return final
    device = resolve_device(cfg.device)
    with determinism(cfg.deterministic, device):  # restores the process's switches afterwards
        try:
            with run_lock(runs_dir, rid):  # one process at a time trains a run (kdlib.lock)
                if is_finished(final):  # finished by the process we waited for
                    return final
                return _fit(cfg, runs_dir, rid, tmp, final, device, progress)
        except torch.cuda.OutOfMemoryError as err:
            oom = str(err).splitlines()[0] if str(err) else "out of memory"
    free_memory(device)  # outside the except clause: the traceback's tensors are released now
    kept = (f"; its last finished epoch is kept in {tmp} and resumes with the same batch_size"
            if (tmp / "checkpoint.pt").is_file() else "")
    raise RunError(f"run {rid} ran out of memory on {device} at batch_size={cfg.batch_size} "
                   f"(evaluation batches of {4 * cfg.batch_size}): {oom}; lower batch_size, or "
                   f"train fewer runs at once on this device (runs_per_device){kept}")


def _fit(cfg: TrainConfig, runs_dir: Path, rid: str, tmp: Path, final: Path,
         device: torch.device, progress: bool) -> Path:
    nhwc = uses_channels_last(device, cfg.model)
    torch.manual_seed(cfg.seed)  # the student's init first: a baseline and its students share it
    model = build_model(cfg, device)  # in its run's memory format
    gens = {"order": torch.Generator().manual_seed(cfg.seed),
            "augment": torch.Generator().manual_seed(cfg.seed + 1)}
    teacher, teacher_path = load_teacher(cfg, runs_dir, device) if cfg.teacher else (None, None)
    data = fold_data(cfg, device)
    (_, x_train, y_train), (_, x_val, y_val) = data["train"], data["val"]
    counts = loader.class_counts(y_train)
    if min(counts) == 0:
        raise DataError(f"the training set of fold {cfg.fold} (ratio {cfg.ratio}) has no slice "
                        f"of class {CLASSES[counts.index(0)]}; check the splits or use another "
                        "fold/ratio")
    criterion = build_criterion(cfg.task_loss, cfg.distiller, counts, cfg.epochs, cfg.loss_kw)
    scale = getattr(criterion, "logit_scale", None)  # model outputs -> logits (ldam_drw: s)
    if scale is None:  # a plain callable criterion
        scale = logit_scale(cfg.task_loss, cfg.loss_params)
    optimizer = make_optimizer(model.parameters(), cfg.lr, cfg.weight_decay, device)
    amp = autocast_dtype(device, cfg.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    net = torch.compile(model) if cfg.compile else model  # `model` holds the state_dict
    steps = len(batches(torch.arange(loader.epoch_length(y_train, cfg.sampler)), cfg.batch_size))
    if steps == 0:
        raise DataError(f"fold {cfg.fold} leaves {len(y_train)} training slice(s) for sampler "
                        f"{cfg.sampler!r}: not one batch of 2; check the splits and the cache")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.warmup_epochs * steps, cfg.epochs * steps))
    ev = (4 * cfg.batch_size, amp, nhwc)  # evaluate(): batch size, autocast, channels_last
    teacher_logits = None
    if teacher is not None and cfg.cache_teacher_logits:
        teacher_logits = evaluate(teacher, x_train, *ev)
    identity = {"config": config_identity(cfg),
                "data": data_fingerprint(data["cache"], data["splits"]),
                "execution": execution_identity(device),
                "numerics": numerics_identity(device, amp, cfg.deterministic, cfg.compile,
                                              nhwc)}
    state = {"epoch": 0, "best_epoch": 0, "best_score": None, "bad_epochs": 0, "stopped": False,
             "history": [], "best_model": None}
    ckpt_path = tmp / "checkpoint.pt"
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)  # RNG states: CPU
        check_resume(identity, ckpt["identity"], tmp)
        check_resume_numerics(identity["numerics"], ckpt["identity"].get("numerics"), tmp)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_states(ckpt["rng"], gens, device)
        if scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        state = ckpt["state"]
    else:
        tmp.mkdir(parents=True, exist_ok=True)
        write_yaml(tmp / "config.yaml", cfg.to_dict())
    todo = [] if state["stopped"] else range(state["epoch"] + 1, cfg.epochs + 1)
    bar = tqdm(todo, desc=rid, disable=not progress, initial=state["epoch"], total=cfg.epochs)
    for epoch in bar:
        start, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
        order = loader.epoch_indices(y_train, cfg.sampler, gens["order"])
        try:
            terms = train_one_epoch(
                net, criterion, optimizer, scheduler, x_train, y_train, order,
                batch_size=cfg.batch_size, epoch=epoch, teacher=teacher,
                teacher_logits=teacher_logits, augment=cfg.augment, generator=gens["augment"],
                amp=amp, scaler=scaler, channels_last=nhwc, progress=progress)
        except RunError as err:
            kept = (f"the last good checkpoint (epoch {state['epoch']}) is kept in {tmp}"
                    if state["epoch"] else f"no epoch finished; delete {tmp} to start over")
            raise RunError(f"run {rid}: {err}; {kept}") from None
        val = validation_scores(evaluate(net, x_val, *ev) * scale, y_val,
                                counts, cfg.posthoc_tau)
        row = {"epoch": epoch, "lr": lr,
               **{f"train_{k}": v for k, v in terms.items()},
               **{f"val_{k}": v for k, v in val.items()}, "time_s": time.perf_counter() - start}
        state["history"].append(row)
        state["epoch"] = epoch
        if _better(cfg.select_metric, val[cfg.select_metric], state["best_score"]):
            state.update(best_epoch=epoch, best_score=val[cfg.select_metric], bad_epochs=0,
                         best_model={k: v.detach().clone() for k, v in model.state_dict().items()})
        else:
            state["bad_epochs"] += 1
        bar.set_postfix(val_macro_f1=f"{val['macro_f1']:.3f}", best=state["best_epoch"])
        state["stopped"] = cfg.patience is not None and state["bad_epochs"] >= cfg.patience
        save_atomic(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "state": state,
            "identity": identity, "rng": _rng_states(gens, device)})
        if state["stopped"]:
            break
    bar.close()
    model.load_state_dict(state["best_model"])
    t_test, x_test, _ = data["test"]
    pred = predictions_frame(t_test, evaluate(net, x_test, *ev) * scale,
                             counts, cfg.posthoc_tau)
    return _finish(cfg, data, state, pred, counts, model, teacher, teacher_path, tmp, final, device,
                   identity["numerics"])


def _finish(cfg: TrainConfig, data: dict[str, Any], state: dict[str, Any], pred: pd.DataFrame,
            counts: list[int], model: nn.Module, teacher: FrozenTeacher | None,
            teacher_path: Path | None, tmp: Path, final: Path, device: torch.device,
            numerics: dict[str, Any]) -> Path:
    """metrics.json (the test metrics, sizes for the corrected t-test, parameters, best epoch) and
    the other files of the finished run; env.json also records the numerics (GPU model,
    precision, deterministic, compile)."""
    extras = {
        "best_epoch": state["best_epoch"], "epochs_run": state["epoch"],
        "params": count_parameters(model),
        **({"teacher_params": sum(p.numel() for p in teacher.parameters())}
           if teacher is not None else {}),
        **{f"train_n_{c}": n for c, n in zip(CLASSES, counts)},
        **{f"n_{part}_{what}": n for part in ("train", "val", "test")
           for what, n in (("subjects", data[part][0]["subject_id"].nunique()),
                           ("slices", len(data[part][0])))},
    }
    n_grade = data["train"][0].drop_duplicates("subject_id")["grade"].value_counts()
    extras["train_ratio"] = float(n_grade.get("HGG", 0) / max(n_grade.get(MINORITY, 0), 1))
    history = pd.DataFrame(state["history"])
    best_model = {k: v.detach().cpu() for k, v in state["best_model"].items()}
    return finish_run(tmp, final, pred, {**run_metrics(pred), **extras}, history, best_model,
                            {"device": str(device), "teacher_path": str(teacher_path or ""),
                             "train_time_s": float(history["time_s"].sum()), **numerics})

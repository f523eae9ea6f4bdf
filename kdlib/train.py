"""One training loop for teachers, baselines and students: `train_one_epoch`, `evaluate`, `fit`.

A baseline is a student without a teacher; distillation adds the frozen teacher's logits to what
the criterion sees (kdlib.criterion.build_criterion). `fit` writes a run folder (kdlib.runs): it
trains in `runs_dir/.tmp-<run_id>`, checkpoints every epoch, resumes an interrupted run
bit-for-bit, and renames the folder to `runs_dir/<run_id>` when the test predictions and metrics
are written.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from kdlib import CLASSES, MINORITY
from kdlib import runs as _runs
from kdlib.data import loader
from kdlib.errors import DataError, RunError
from kdlib.train_config import (  # also re-exported: kdlib.train is the entry point
    SELECT_METRICS,
    AugmentConfig,
    TrainConfig,
    load_train_config,
)


class FrozenTeacher(nn.Module):
    """A teacher that stays in eval mode by construction: no gradients, `.train()` is a no-op.

    Returns logits: the model's outputs times `scale` (s for a cosine-head ldam_drw teacher,
    else 1).
    """

    def __init__(self, model: nn.Module, scale: float = 1.0) -> None:
        super().__init__()
        self.model = model.requires_grad_(False)
        self.scale = scale
        super().train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * self.scale


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _prepare(xb: torch.Tensor, channels_last: bool) -> torch.Tensor:
    xb = xb.float()
    return xb.contiguous(memory_format=torch.channels_last) if channels_last else xb


def batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Split an epoch's sample order into batches; a trailing batch of one sample is dropped
    (BatchNorm cannot train on it)."""
    parts = list(torch.split(order, batch_size))
    return [b for b in parts if len(b) > 1]


def train_one_epoch(
    model: nn.Module, criterion: Callable[..., dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
    x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, *, batch_size: int, epoch: int,
    teacher: nn.Module | None = None, teacher_logits: torch.Tensor | None = None,
    augment: AugmentConfig | None = None, generator: torch.Generator | None = None,
    amp: bool = False, channels_last: bool = False, progress: bool = False,
) -> dict[str, float]:
    """One pass over `order` (indices into x, y) in epoch `epoch` (counted from 1); returns the
    sample-mean of each loss term.

    The teacher (if any) sees the same augmented batch as the student, unless `teacher_logits`
    (precomputed on the un-augmented images, indexed like x) are given. Raises RunError naming the
    epoch and step when the loss is not finite.
    """
    model.train()
    sums: dict[str, torch.Tensor] = {}
    seen = 0
    steps = batches(order.to(x.device), batch_size)
    losses = torch.empty(len(steps), device=x.device)  # checked once at the end: no sync per step
    bar = tqdm(steps, desc=f"epoch {epoch}", leave=False, disable=not progress)
    for step, idx in enumerate(bar, 1):
        xb, yb = x[idx].float(), y[idx]
        if augment is not None and augment.enabled:
            xb = loader.augment_batch(xb, generator, augment.flip, augment.max_rotation_deg,
                                      augment.intensity_jitter)
        xb = _prepare(xb, channels_last)
        with _autocast(x.device, amp):
            if teacher_logits is not None:
                zt = teacher_logits[idx]
            elif teacher is not None:
                zt = teacher(xb).float()
            else:
                zt = None
            zs = model(xb).float()
        terms = criterion(zs, yb, zt, epoch=epoch - 1)  # the criterion counts epochs from 0
        loss = terms["loss"]
        losses[step - 1] = loss.detach()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
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
def evaluate(model: nn.Module, x: torch.Tensor, batch_size: int = 256, amp: bool = False,
             channels_last: bool = False) -> torch.Tensor:
    """Outputs (N, classes) of `model` in eval mode on x, float32 on x's device: the logits, except
    for a cosine head (ldam_drw), whose outputs times criterion.logit_scale are the logits."""
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


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; a CUDA device that is missing -> RunError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"device={name!r} but CUDA is not available here; use device: auto or cpu")
    return torch.device(name)


def class_probabilities(logits: torch.Tensor, counts: list[int], tau: float | None) -> torch.Tensor:
    """Softmax of the logits, after post-hoc adjustment z - tau log(pi) when tau is set."""
    if tau is not None:
        from kdlib.losses import posthoc_adjust

        logits = posthoc_adjust(logits, counts, tau)
    return torch.softmax(logits.float(), dim=1)


def predictions_frame(table: pd.DataFrame, logits: torch.Tensor, counts: list[int],
                      tau: float | None) -> pd.DataFrame:
    """The predictions table: subject_id, slice, label, p_<class> (after any post-hoc adjustment)
    and z_<class> (the logits)."""
    z = logits.detach().float().cpu()
    p = class_probabilities(z, counts, tau).numpy().astype(np.float64)
    out = table[["subject_id", "slice", "label"]].reset_index(drop=True).copy()
    for i, c in enumerate(CLASSES):
        out[f"p_{c}"] = p[:, i]
    for i, c in enumerate(CLASSES):
        out[f"z_{c}"] = z[:, i].numpy().astype(np.float64)
    return out


def validation_scores(logits: torch.Tensor, y: torch.Tensor, counts: list[int],
                      tau: float | None) -> dict[str, float]:
    """Validation loss (plain CE of the raw logits) and slice metrics for history and selection."""
    from kdlib.metrics import slice_scores

    loss = F.cross_entropy(logits.float(), y).item() if len(y) else float("nan")
    p = class_probabilities(logits.cpu(), counts, tau).numpy()
    s = slice_scores(y.cpu().numpy(), p, ranking=False)
    return {"loss": loss, **{k: s[k] for k in SELECT_METRICS if k != "loss"}}


def build_model(cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The student (or teacher) network of a config, with a cosine head when its loss needs one."""
    from kdlib.criterion import needs_cosine_head
    from kdlib.models import create_model, set_cosine_head

    model = create_model(cfg.model, num_classes=len(CLASSES), in_channels=len(cfg.modalities),
                         weights=cfg.weights)
    if needs_cosine_head(cfg.task_loss):
        model = set_cosine_head(model)
    return model.to(device)


def load_teacher(cfg: TrainConfig, runs_dir: Path,
                 device: torch.device) -> tuple[FrozenTeacher, Path]:
    """Load the frozen teacher of `cfg` from its run folder; RunError when missing or mismatched
    (another cache or splits file, modalities, classes, or training subjects that are the student's
    validation or test subjects: see `check_teacher_subjects`)."""
    from kdlib.criterion import logit_scale

    folder = _runs.teacher_dir(cfg.teacher, runs_dir)
    tcfg = load_train_config(folder / "config.yaml")
    check_teacher_subjects(cfg, tcfg, folder.name)
    if len(tcfg.modalities) != len(cfg.modalities) or tcfg.modalities != cfg.modalities:
        raise RunError(f"teacher {folder} was trained on {len(tcfg.modalities)} channel(s) "
                       f"{list(tcfg.modalities)}, the student uses {len(cfg.modalities)} "
                       f"{list(cfg.modalities)}; train a teacher with the student's modalities")
    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    heads = [v for v in state.values() if v.ndim == 2]
    if heads and heads[-1].shape[0] != len(CLASSES):
        raise RunError(f"teacher {folder} predicts {heads[-1].shape[0]} classes, the student "
                       f"{len(CLASSES)} {list(CLASSES)}; use a teacher trained for these classes")
    model = build_model(dataclasses.replace(tcfg, weights=None), torch.device("cpu"))  # no download
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise RunError(f"teacher {folder}/model.pt does not fit model {tcfg.model!r}: "
                       f"{str(err).splitlines()[0]}") from None
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return FrozenTeacher(model, logit_scale(tcfg.task_loss, tcfg.loss_params)), folder


def check_teacher_subjects(cfg: TrainConfig, tcfg: TrainConfig, teacher: str) -> None:
    """RunError unless the teacher (config `tcfg`, run `teacher`) used the student's cache and
    splits file and none of its training subjects is a validation or test subject of the student
    (a teacher of the same repeat and fold at another ratio is fine; one of another fold is not)."""
    from kdlib.data.splits import check_no_leakage, fold_subjects, load_splits
    from kdlib.paths import resolve

    for name in ("cache", "splits"):
        mine, theirs = resolve(getattr(cfg, name)).resolve(), resolve(getattr(tcfg, name)).resolve()
        if mine != theirs:
            raise RunError(f"teacher {teacher} was trained with {name} {theirs}, the student uses "
                           f"{name} {mine}; train the teacher on the student's data")
    splits_path = resolve(cfg.splits)
    if not splits_path.is_file():
        return  # _split_data says so, naming the setting
    splits = load_splits(splits_path)
    if tcfg.repeat != cfg.repeat:
        raise RunError(f"teacher {teacher} is of repeat {tcfg.repeat}, the student of repeat "
                       f"{cfg.repeat}; use a teacher of the student's repeat and fold")
    student = fold_subjects(splits, cfg.fold, ratio=cfg.ratio, seed=cfg.seed, repeat=cfg.repeat)
    sets = {f"teacher {teacher} train": fold_subjects(splits, tcfg.fold, tcfg.ratio,
                                                      tcfg.seed, tcfg.repeat)["train"],
            "student val": student["val"], "student test": student["test"]}
    try:
        check_no_leakage(sets, fix=f"use a teacher of fold {cfg.fold}")
    except DataError as err:
        raise RunError(f"teacher {teacher} (fold {tcfg.fold}) trained on subjects the student "
                       f"(fold {cfg.fold}) validates or tests on: {err}") from None


def _split_data(cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """Tables and tensors of the train/val/test slices of the config's fold and ratio."""
    from kdlib.data.cache import load_slice_table
    from kdlib.data.splits import fold_subjects, load_splits
    from kdlib.paths import resolve

    cache, splits_path = resolve(cfg.cache), resolve(cfg.splits)
    if not cache.is_file():
        raise DataError(f"cache={cfg.cache!r}: {cache} does not exist; prepare the slice cache "
                        "first (kdlib.data.cache.prepare_cache) or fix the path")
    if not splits_path.is_file():
        raise DataError(f"splits={cfg.splits!r}: {splits_path} does not exist; write the splits "
                        "first (kdlib.data.splits.save_splits) or fix the path")
    table = load_slice_table(cache)
    splits = load_splits(splits_path)
    sets = fold_subjects(splits, cfg.fold, ratio=cfg.ratio, seed=cfg.seed, repeat=cfg.repeat)
    missing = sorted(set(splits["subject_id"]) - set(table["subject_id"]))
    if missing:
        raise DataError(f"{len(missing)} subject(s) of {splits_path} (e.g. {missing[0]}) have no "
                        f"slice in {cache}; the splits were made for another dataset")
    data: dict[str, Any] = {"cache": cache, "splits": splits_path}
    for part, subjects in sets.items():
        t = table[table["subject_id"].isin(set(subjects))].reset_index(drop=True)
        data[part] = (t, *loader.load_tensors(cache, t, cfg.modalities, device))
    return data


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
    """
    cfg = load_train_config(cfg)
    runs_dir = Path(runs_dir)
    rid = _runs.run_id(cfg)
    final, tmp = runs_dir / rid, runs_dir / f".tmp-{rid}"
    if _runs.is_finished(final):
        return final
    device = resolve_device(cfg.device)
    if cfg.deterministic and device.type == "cuda":  # cuBLAS needs it for reproducible matmuls
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not cfg.deterministic
    try:
        return _fit(cfg, runs_dir, rid, tmp, final, device, progress)
    finally:  # fit leaves the process's global switches as it found them
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = previous[2]


def _fit(cfg: TrainConfig, runs_dir: Path, rid: str, tmp: Path, final: Path,
         device: torch.device, progress: bool) -> Path:
    from kdlib.criterion import build_criterion, logit_scale

    cuda = device.type == "cuda"
    torch.manual_seed(cfg.seed)  # the student's init first: a baseline and its students share it
    model = build_model(cfg, device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    gens = {"order": torch.Generator().manual_seed(cfg.seed),
            "augment": torch.Generator().manual_seed(cfg.seed + 1)}
    teacher, teacher_path = load_teacher(cfg, runs_dir, device) if cfg.teacher else (None, None)
    data = _split_data(cfg, device)
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
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = len(batches(torch.arange(loader.epoch_length(y_train, cfg.sampler)), cfg.batch_size))
    if steps == 0:
        raise DataError(f"fold {cfg.fold} leaves {len(y_train)} training slice(s) for sampler "
                        f"{cfg.sampler!r}: not one batch of 2; check the splits and the cache")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.warmup_epochs * steps, cfg.epochs * steps))
    ev = (4 * cfg.batch_size, cuda, cuda)  # evaluate(): batch size, bf16 autocast, channels_last
    teacher_logits = None
    if teacher is not None and cfg.cache_teacher_logits:
        teacher_logits = evaluate(teacher, x_train, *ev)
    identity = {"config": _runs.config_identity(cfg),
                "data": _runs.data_fingerprint(data["cache"], data["splits"]),
                "execution": _runs.execution_identity(device)}
    state = {"epoch": 0, "best_epoch": 0, "best_score": None, "bad_epochs": 0, "stopped": False,
             "history": [], "best_model": None}
    ckpt_path = tmp / "checkpoint.pt"
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)  # RNG states: CPU
        _runs.check_resume(identity, ckpt["identity"], tmp)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_states(ckpt["rng"], gens, device)
        state = ckpt["state"]
    else:
        tmp.mkdir(parents=True, exist_ok=True)
        _runs.write_yaml(tmp / "config.yaml", cfg.to_dict())
    todo = [] if state["stopped"] else range(state["epoch"] + 1, cfg.epochs + 1)
    bar = tqdm(todo, desc=rid, disable=not progress, initial=state["epoch"], total=cfg.epochs)
    for epoch in bar:
        start, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
        order = loader.epoch_indices(y_train, cfg.sampler, gens["order"])
        try:
            terms = train_one_epoch(
                model, criterion, optimizer, scheduler, x_train, y_train, order,
                batch_size=cfg.batch_size, epoch=epoch, teacher=teacher,
                teacher_logits=teacher_logits,
                augment=cfg.augment, generator=gens["augment"], amp=cuda, channels_last=cuda,
                progress=progress)
        except RunError as err:
            kept = (f"the last good checkpoint (epoch {state['epoch']}) is kept in {tmp}"
                    if state["epoch"] else f"no epoch finished; delete {tmp} to start over")
            raise RunError(f"run {rid}: {err}; {kept}") from None
        val = validation_scores(evaluate(model, x_val, *ev) * scale, y_val,
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
        _runs.save_atomic(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "state": state, "identity": identity,
            "rng": _rng_states(gens, device)})
        if state["stopped"]:
            break
    bar.close()
    model.load_state_dict(state["best_model"])
    t_test, x_test, _ = data["test"]
    pred = predictions_frame(t_test, evaluate(model, x_test, *ev) * scale,
                             counts, cfg.posthoc_tau)
    return _finish(cfg, data, state, pred, counts, model, teacher, teacher_path, tmp, final, device)


def _finish(cfg: TrainConfig, data: dict[str, Any], state: dict[str, Any], pred: pd.DataFrame,
            counts: list[int], model: nn.Module, teacher: FrozenTeacher | None,
            teacher_path: Path | None, tmp: Path, final: Path, device: torch.device) -> Path:
    """metrics.json extras (sizes for the corrected t-test, parameters, best epoch) + the files."""
    from kdlib.models import count_parameters

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
    return _runs.finish_run(tmp, final, pred, extras, history, best_model,
                            {"device": str(device), "teacher_path": str(teacher_path or ""),
                             "train_time_s": float(history["time_s"].sum())})

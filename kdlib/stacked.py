"""Many runs trained at once: runs that see the same data share each batch, teacher and pass.

Runs of one student architecture on the same data (cache, splits, repeat, fold, ratio, seed, and
so the same sample order and augmentation) differ only in their loss, teacher, learning rate and
stopping. `fit_group` trains them in one process: each augmented batch is made once, each
teacher's forward runs once per batch for all its students, and the students' forward/backward is
one `torch.func.vmap` over their stacked parameters on a GPU (kdlib.stack; on the CPU the students
run one after the other on the shared batch, since oneDNN's grouped convolutions are slower than
separate ones). Run one after the other, students of different architectures can share a group
too (`mix_models`: the CPU launcher's choice), so that their common teachers run once per batch.
Each run keeps its own criterion, AdamW, schedule and gradient scaler (as `kdlib.train.fit`
builds them), early stopping, best epoch, checkpoint and run folder, and ends with the numbers
`fit` gives (bit for bit on the CPU, up to float rounding when vectorised). `group_configs` partitions
a plan into such groups.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from kdlib import CLASSES
from kdlib import runs as _runs
from kdlib.config import write_yaml
from kdlib.criterion import build_criterion, logit_scale, needs_cosine_head
from kdlib.data import loader
from kdlib.data.folds import fold_data
from kdlib.device import (
    autocast_dtype,
    check_resume_numerics,
    determinism,
    free_memory,
    make_optimizer,
    numerics_identity,
    resolve_device,
    uses_channels_last,
)
from kdlib.errors import ConfigError, DataError, RunError
from kdlib.identity import EXECUTION_SETTINGS, config_identity, run_id
from kdlib.lock import run_lock
from kdlib.predictions import predictions_frame, validation_scores
from kdlib.stack import Stack, detach_from_stack, stack_problem, train_group_epoch
from kdlib.teachers import build_model, load_teacher
from kdlib.train import (
    _better,
    _finish,
    _rng_states,
    _set_rng_states,
    batches,
    evaluate,
    fit,
    lr_lambda,
)
from kdlib.train_config import TrainConfig, load_train_config

log = logging.getLogger(__name__)

GROUP_SETTINGS: tuple[str, ...] = (
    "cache", "splits", "repeat", "fold", "ratio", "seed", "modalities", "model", "weights",
    "epochs", "batch_size", "sampler", "augment", "device", "deterministic", "precision",
    "compile")
"""Settings every run of a group shares: the same data, order, augmentation and architecture.
Losses, distillers, teachers, lr, weight decay, warm-up, patience, select_metric and posthoc_tau
may differ. A cosine head (ldam_drw) is another architecture, so it forms groups of its own.
With mix_models, model and weights may differ (and the head), the memory format may not."""
MODEL_SETTINGS: tuple[str, ...] = ("model", "weights")


# ---------------------------------------------------------------- grouping


def group_key(cfg: TrainConfig, mix_models: bool = False) -> dict[str, Any]:
    """The values of GROUP_SETTINGS (data paths normalised as in the run id) plus the head kind;
    mix_models: without the model settings and head, with the memory format on the CPU instead
    (runs trained one after the other share the batch in one format)."""
    ident = config_identity(cfg)  # cache and splits as the run id sees them
    key = {k: ident.get(k, getattr(cfg, k)) for k in GROUP_SETTINGS if k not in EXECUTION_SETTINGS}
    key.update({k: getattr(cfg, k) for k in EXECUTION_SETTINGS})
    if not mix_models:
        return {**key, "head": "cosine" if needs_cosine_head(cfg.task_loss) else "linear"}
    key = {k: v for k, v in key.items() if k not in MODEL_SETTINGS}
    return {**key, "channels_last": uses_channels_last(torch.device("cpu"), cfg.model)}


def mixes_models(cfgs: Sequence[TrainConfig]) -> bool:
    """True when the runs differ in model, weights or head kind."""
    return len({repr(group_key(c)) for c in cfgs}) > len({repr(group_key(c, True)) for c in cfgs})


def check_group(cfgs: Sequence[TrainConfig], mix_models: bool = False) -> None:
    """ConfigError naming the first setting in which two runs differ that must be shared, or a
    run that distils from a teacher trained in the same group."""
    first = group_key(cfgs[0], mix_models)
    for cfg in cfgs[1:]:
        key = group_key(cfg, mix_models)
        for name, value in key.items():
            if value != first[name]:
                raise ConfigError(
                    f"runs {run_id(cfgs[0])} and {run_id(cfg)} cannot be trained "
                    f"together: {name} is {first[name]!r} in one and {value!r} in the other; runs "
                    f"of a group share {list(GROUP_SETTINGS)} and the head kind; partition the "
                    "runs with kdlib.stacked.group_configs")
    ids = {run_id(c) for c in cfgs}
    for cfg in cfgs:
        if cfg.teacher and Path(cfg.teacher).name in ids:
            raise ConfigError(f"run {run_id(cfg)} distils from {Path(cfg.teacher).name}, "
                              "which is in the same group: train the teacher's group first "
                              "(kdlib.stacked.group_configs orders them)")


def group_configs(cfgs: Sequence[TrainConfig | dict], max_size: int | None = None,
                  mix_models: bool = False) -> list[list[TrainConfig]]:
    """Partition runs into groups `fit_group` can train, each at most `max_size` runs, listed so
    that every run comes after the group of its teacher (when the teacher is among `cfgs`).

    Runs with the same GROUP_SETTINGS and head kind form one group (baselines and distillers of a
    student together: the group then waits for their teachers; with mix_models, the runs of every
    architecture on the same data, teachers excepted, for training one after the other, so that
    students of several sizes share their teachers' passes); teachers of runs in `cfgs` are
    grouped apart from the other runs, and a run is never in its teacher's group. Should the
    groups' teachers form a cycle, runs are grouped per teacher depth instead. Duplicates (same
    run id) are dropped.
    """
    if max_size is not None and (not isinstance(max_size, int) or max_size < 1):
        raise ConfigError(f"max_size={max_size!r} must be a whole number >= 1 or None")
    by_id: dict[str, TrainConfig] = {}
    for c in map(load_train_config, cfgs):
        by_id.setdefault(run_id(c), c)
    parent = {rid: Path(c.teacher).name for rid, c in by_id.items()
              if c.teacher and Path(c.teacher).name in by_id}
    teachers = set(parent.values())  # grouped apart from students: never wait for another teacher
    keys = {rid: repr((sorted(group_key(c, mix_models and rid not in teachers).items()),
                       rid in teachers)) for rid, c in by_id.items()}

    def depth(rid: str, same_key: bool) -> int:  # teachers above rid (of its own kind only)
        t, n = parent.get(rid), 0
        while t is not None and n <= len(by_id) and (not same_key or keys[t] == keys[rid]):
            t, n = parent.get(t), n + 1
        return n

    for same_key in (True, False):
        label = {rid: (keys[rid], depth(rid, same_key)) for rid in by_id}
        level = dict.fromkeys(label.values(), 0)
        for _ in range(len(level) + 1):  # longest teacher chain between groups
            new = {g: 0 for g in level}
            for rid, t in parent.items():
                new[label[rid]] = max(new[label[rid]], level[label[t]] + 1)
            if new == level:
                break
            level = new
        else:
            continue  # the groups' teachers form a cycle: group per teacher depth
        break
    found: dict[tuple, list[TrainConfig]] = {}
    for rid, cfg in by_id.items():
        found.setdefault(label[rid], []).append(cfg)
    size = max_size or max(map(len, found.values()), default=1)
    ordered = sorted(found.items(), key=lambda item: level[item[0]])  # stable: plan order
    return [g[i:i + size] for _, g in ordered for i in range(0, len(g), size)]


# ---------------------------------------------------------------- fit_group


@dataclasses.dataclass
class _Member:
    """One run of a group: what `fit` holds in local variables."""

    cfg: TrainConfig
    rid: str
    tmp: Path
    final: Path
    model: nn.Module
    teacher: nn.Module | None = None
    teacher_path: Path | None = None
    criterion: Any = None
    scale: float = 1.0
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    teacher_logits: torch.Tensor | None = None
    identity: dict[str, Any] = dataclasses.field(default_factory=dict)
    state: dict[str, Any] = dataclasses.field(default_factory=dict)
    rng: dict[str, Any] | None = None

    @property
    def done(self) -> bool:
        return self.state["stopped"] or self.state["epoch"] >= self.cfg.epochs


def fit_group(cfgs: Sequence[TrainConfig | dict | str | Path], runs_dir: str | Path,
              progress: bool = True, vectorise: bool | None = None) -> list[Path]:
    """Train runs that share GROUP_SETTINGS together (one augmented batch and one teacher pass per
    step for all) and return their finished folders, in the order of `cfgs`; finished runs are
    skipped, interrupted ones resume from their checkpoints (written in `fit`'s format).

    ConfigError when the runs cannot share a group (see `group_configs`); RunError naming the runs
    whose loss became non-finite, after the others are finished. vectorise: one vmapped
    forward/backward for all runs (default: on CUDA, when the runs share their model; runs of
    several models are trained one after the other, with fit's numbers). Models that draw random
    numbers in training, or that vmap cannot run when vectorised (see
    `kdlib.stack.stack_problem`), are trained one by one with `fit`, said in a log line. Training holds every run's lock, as `fit`
    does (kdlib.lock). history.csv's time_s is the group's epoch time divided by its runs (their
    sum is the time spent).
    """
    cfgs = [load_train_config(c) for c in cfgs]
    if not cfgs:
        return []
    mixed = mixes_models(cfgs) and vectorise is not True  # vmap runs one model only
    check_group(cfgs, mix_models=mixed)
    runs_dir = Path(runs_dir)
    ids = [run_id(c) for c in cfgs]
    todo = list({rid: c for rid, c in zip(ids, cfgs)
                 if not _runs.is_finished(runs_dir / rid)}.values())
    if not todo:
        return [runs_dir / rid for rid in ids]
    device = resolve_device(todo[0].device)
    vectorise = device.type == "cuda" and not mixed if vectorise is None else vectorise
    with determinism(todo[0].deterministic, device):  # restores the process's switches
        try:
            with contextlib.ExitStack() as locks:  # fit's run locks, in one order: no deadlock
                for rid in sorted(run_id(c) for c in todo):
                    locks.enter_context(run_lock(runs_dir, rid))
                todo = [c for c in todo if not _runs.is_finished(runs_dir / run_id(c))]
                problem = _fit_stacked(todo, runs_dir, device, progress, vectorise) if todo else None
        except torch.cuda.OutOfMemoryError as err:
            oom = str(err).splitlines()[0] if str(err) else "out of memory"
        else:
            if problem:  # fit takes the locks again
                log.warning("%d run(s) of %s cannot be trained together: %s; training them one "
                            "by one with kdlib.train.fit", len(todo), todo[0].model, problem)
                for c in todo:
                    fit(c, runs_dir, progress)
            return [runs_dir / rid for rid in ids]
    free_memory(device)
    raise RunError(f"{len(todo)} run(s) of {todo[0].model} trained together ran out of memory on "
                   f"{device} at batch_size={todo[0].batch_size}: {oom}; train fewer runs "
                   "together (kdlib.stacked.group_configs(..., max_size=...)) or lower "
                   "batch_size; each run's last finished epoch is kept and resumes")


def _member(cfg: TrainConfig, runs_dir: Path, device: torch.device) -> _Member:
    rid = run_id(cfg)
    torch.manual_seed(cfg.seed)  # fit's order: the student's init first
    model = build_model(cfg, device)  # in its run's memory format
    teacher, teacher_path = load_teacher(cfg, runs_dir, device) if cfg.teacher else (None, None)
    return _Member(cfg, rid, runs_dir / f".tmp-{rid}", runs_dir / rid, model, teacher,
                   teacher_path)


def _setup(m: _Member, counts: list[int], steps: int, data: dict[str, Any],
           device: torch.device, amp: torch.dtype | None, nhwc: bool) -> None:
    """Criterion, optimizer, schedule, gradient scaler and state of a member, as in fit, from its
    checkpoint when there is one (`nhwc`: the group's memory format)."""
    cfg = m.cfg
    m.criterion = build_criterion(cfg.task_loss, cfg.distiller, counts, cfg.epochs, cfg.loss_kw)
    m.scale = getattr(m.criterion, "logit_scale", None) or logit_scale(cfg.task_loss,
                                                                       cfg.loss_params)
    m.optimizer = make_optimizer(m.model.parameters(), cfg.lr, cfg.weight_decay, device)
    m.scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    m.scheduler = torch.optim.lr_scheduler.LambdaLR(
        m.optimizer, lr_lambda(cfg.warmup_epochs * steps, cfg.epochs * steps))
    m.identity = {"config": config_identity(cfg),
                  "data": _runs.data_fingerprint(data["cache"], data["splits"]),
                  "execution": _runs.execution_identity(device),
                  "numerics": numerics_identity(device, amp, cfg.deterministic, cfg.compile,
                                                nhwc)}
    m.state = {"epoch": 0, "best_epoch": 0, "best_score": None, "bad_epochs": 0,
               "stopped": False, "history": [], "best_model": None}
    ckpt_path = m.tmp / "checkpoint.pt"
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        _runs.check_resume(m.identity, ckpt["identity"], m.tmp)
        check_resume_numerics(m.identity["numerics"], ckpt["identity"].get("numerics"), m.tmp)
        m.model.load_state_dict(ckpt["model"])
        m.optimizer.load_state_dict(ckpt["optimizer"])
        m.scheduler.load_state_dict(ckpt["scheduler"])
        if m.scaler.is_enabled():
            m.scaler.load_state_dict(ckpt["scaler"])
        m.state, m.rng = ckpt["state"], ckpt["rng"]
    else:
        m.tmp.mkdir(parents=True, exist_ok=True)
        write_yaml(m.tmp / "config.yaml", cfg.to_dict())


def _fit_stacked(cfgs: list[TrainConfig], runs_dir: Path, device: torch.device,
                 progress: bool, vectorise: bool) -> str | None:
    """Train the group; or return why it cannot be trained together (nothing written then)."""
    cfg = cfgs[0]
    nhwc = uses_channels_last(device, cfg.model)
    if any(uses_channels_last(device, c.model) != nhwc for c in cfgs):
        return f"its models do not share one memory format on {device}"
    members = [_member(c, runs_dir, device) for c in cfgs]
    data = fold_data(cfg, device)
    (_, x_train, y_train), (_, x_val, y_val) = data["train"], data["val"]
    problem = "compile: true compiles each model on its own" if cfg.compile else None
    if problem is None and len(x_train) > 1:  # one model of each architecture
        kinds = {(m.cfg.model, needs_cosine_head(m.cfg.task_loss)): m.model for m in members}
        problem = next(filter(None, (stack_problem(k, x_train, vectorise)
                                     for k in kinds.values())), None)
    if problem:
        return problem
    counts = loader.class_counts(y_train)
    if min(counts) == 0:
        raise DataError(f"the training set of fold {cfg.fold} (ratio {cfg.ratio}) has no slice "
                        f"of class {CLASSES[counts.index(0)]}; check the splits or use another "
                        "fold/ratio")
    steps = len(batches(torch.arange(loader.epoch_length(y_train, cfg.sampler)), cfg.batch_size))
    if steps == 0:
        raise DataError(f"fold {cfg.fold} leaves {len(y_train)} training slice(s) for sampler "
                        f"{cfg.sampler!r}: not one batch of 2; check the splits and the cache")
    amp = autocast_dtype(device, cfg.precision)
    ev = (4 * cfg.batch_size, amp, nhwc)  # evaluate(): batch size, autocast, channels_last
    teacher_logits: dict[Path, torch.Tensor] = {}  # one pass per teacher, shared
    for m in members:
        _setup(m, counts, steps, data, device, amp, nhwc)
        if m.teacher is not None and m.cfg.cache_teacher_logits:
            if m.teacher_path not in teacher_logits:
                teacher_logits[m.teacher_path] = evaluate(m.teacher, x_train, *ev)
            m.teacher_logits = teacher_logits[m.teacher_path]
    teachers = {m.teacher_path: m.teacher for m in members if m.teacher is not None}
    for m in members:  # one teacher object per folder: its forward runs once per step
        m.teacher = teachers.get(m.teacher_path)
    gens = {"order": torch.Generator().manual_seed(cfg.seed),
            "augment": torch.Generator().manual_seed(cfg.seed + 1)}
    for m in [m for m in members if m.done]:
        _finish_member(m, data, counts, ev, device)
    live = [m for m in members if not m.done]
    failed: list[str] = []
    if not live:
        return None
    start = min(live, key=lambda m: m.state["epoch"])
    if start.rng is not None:
        _set_rng_states(start.rng, gens, device)
    epoch = start.state["epoch"] + 1
    stack = None
    bar = tqdm(total=cfg.epochs, initial=epoch - 1, disable=not progress,
               desc=f"{len(live)} x {cfg.model}-f{cfg.fold}-s{cfg.seed}")
    while live:
        active = [m for m in live if m.state["epoch"] == epoch - 1]
        for m in active:
            _check_joins(m, gens, epoch)
        if stack is None:
            stack = Stack([m.model for m in active], vectorise)
        elif [id(m.model) for m in active] != [id(x) for x in stack.models]:
            stack.set_models([m.model for m in active])
        t0 = time.perf_counter()
        lrs = [m.optimizer.param_groups[0]["lr"] for m in active]
        order = loader.epoch_indices(y_train, cfg.sampler, gens["order"])
        terms, bad = train_group_epoch(
            stack, [m.criterion for m in active], [m.optimizer for m in active],
            [m.scheduler for m in active], x_train, y_train, order, batch_size=cfg.batch_size,
            epoch=epoch, teachers=[m.teacher for m in active],
            teacher_logits=[m.teacher_logits for m in active], augment=cfg.augment,
            generator=gens["augment"], amp=amp, scalers=[m.scaler for m in active],
            channels_last=nhwc, progress=progress)
        val_out = stack.evaluate(x_val, *ev)
        seconds = (time.perf_counter() - t0) / len(active)  # the group's time, shared out
        for i, m in enumerate(active):
            if i in bad:
                kept = (f"the last good checkpoint (epoch {m.state['epoch']}) is kept in {m.tmp}"
                        if m.state["epoch"] else f"no epoch finished; delete {m.tmp} to start over")
                failed.append(f"run {m.rid}: {bad[i]}; {kept}")
                continue
            val = validation_scores(val_out[i] * m.scale, y_val, counts, m.cfg.posthoc_tau)
            _record(m, epoch, lrs[i], terms[i], val, seconds, gens, device)
        ended = [(i in bad, m) for i, m in enumerate(active) if i in bad or m.done]
        live = [m for m in live if all(m is not e for _, e in ended)]
        for broken, m in ended:
            detach_from_stack(m.model)
            if not broken:
                _finish_member(m, data, counts, ev, device)
        bar.update(1)
        epoch += 1
    bar.close()
    if failed:
        raise RunError(f"{len(failed)} of {len(members)} run(s) trained together failed (the "
                       "others are finished): " + " | ".join(failed))
    return None


def _check_joins(m: _Member, gens: dict[str, torch.Generator], epoch: int) -> None:
    """A run resumed from a later checkpoint than the group's joins it at its epoch: its data
    streams must be where the group's are."""
    if m.rng is None or m.state["epoch"] == 0:
        return
    if not all(torch.equal(m.rng[f"gen_{k}"], g.get_state()) for k, g in gens.items()):
        raise RunError(f"cannot resume {m.tmp} in this group: at epoch {epoch} its sample order "
                       "differs from the group's; resume it alone with kdlib.train.fit")
    m.rng = None


def _record(m: _Member, epoch: int, lr: float, terms: dict[str, float], val: dict[str, float],
            seconds: float, gens: dict[str, torch.Generator], device: torch.device) -> None:
    """fit's bookkeeping after an epoch: history row, best epoch, early stopping, checkpoint."""
    cfg, state = m.cfg, m.state
    state["history"].append({"epoch": epoch, "lr": lr,
                             **{f"train_{k}": v for k, v in terms.items()},
                             **{f"val_{k}": v for k, v in val.items()}, "time_s": seconds})
    state["epoch"] = epoch
    if _better(cfg.select_metric, val[cfg.select_metric], state["best_score"]):
        state.update(best_epoch=epoch, best_score=val[cfg.select_metric], bad_epochs=0,
                     best_model={k: v.detach().clone() for k, v in m.model.state_dict().items()})
    else:
        state["bad_epochs"] += 1
    state["stopped"] = cfg.patience is not None and state["bad_epochs"] >= cfg.patience
    model_state = {k: v.detach().clone() for k, v in m.model.state_dict().items()}  # not views
    _runs.save_atomic(m.tmp / "checkpoint.pt", {
        "model": model_state, "optimizer": m.optimizer.state_dict(),
        "scheduler": m.scheduler.state_dict(), "scaler": m.scaler.state_dict(), "state": state,
        "identity": m.identity, "rng": _rng_states(gens, device)})


def _finish_member(m: _Member, data: dict[str, Any], counts: list[int], ev: tuple,
                   device: torch.device) -> None:
    m.model.load_state_dict(m.state["best_model"])
    t_test, x_test, _ = data["test"]
    pred = predictions_frame(t_test, evaluate(m.model, x_test, *ev) * m.scale, counts,
                             m.cfg.posthoc_tau)
    _finish(m.cfg, data, m.state, pred, counts, m.model, m.teacher, m.teacher_path, m.tmp,
            m.final, device, m.identity["numerics"])

"""The network of a config, and a finished run's network loaded back as a frozen teacher, with the
checks that the teacher fits its student (same data, modalities and classes; no subject leakage)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from kdlib import CLASSES
from kdlib.criterion import logit_scale, needs_cosine_head
from kdlib.data.splits import check_no_leakage, fold_subjects, load_splits
from kdlib.device import to_run_device
from kdlib.errors import DataError, RunError
from kdlib.models import create_model, set_cosine_head
from kdlib.paths import resolve
from kdlib.runs import teacher_dir
from kdlib.train_config import TrainConfig, load_train_config


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


def build_model(cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The student (or teacher) network of a config, with a cosine head when its loss needs one."""
    model = create_model(cfg.model, num_classes=len(CLASSES), in_channels=len(cfg.modalities),
                         weights=cfg.weights)
    if needs_cosine_head(cfg.task_loss):
        model = set_cosine_head(model)
    return to_run_device(model, device, cfg.model)


def load_teacher(cfg: TrainConfig, runs_dir: Path,
                 device: torch.device) -> tuple[FrozenTeacher, Path]:
    """Load the frozen teacher of `cfg` from its run folder; RunError when missing or mismatched
    (another cache or splits file, modalities, classes, or training subjects that are the student's
    validation or test subjects: see `check_teacher_subjects`)."""
    folder = teacher_dir(cfg.teacher, runs_dir)
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
    model = to_run_device(model, device, tcfg.model)
    return FrozenTeacher(model, logit_scale(tcfg.task_loss, tcfg.loss_params)), folder


def check_teacher_subjects(cfg: TrainConfig, tcfg: TrainConfig, teacher: str) -> None:
    """RunError unless the teacher (config `tcfg`, run `teacher`) used the student's cache and
    splits file and none of its training subjects is a validation or test subject of the student
    (a teacher of the same repeat and fold at another ratio is fine; one of another fold is not)."""
    for name in ("cache", "splits"):
        mine, theirs = resolve(getattr(cfg, name)).resolve(), resolve(getattr(tcfg, name)).resolve()
        if mine != theirs:
            raise RunError(f"teacher {teacher} was trained with {name} {theirs}, the student uses "
                           f"{name} {mine}; train the teacher on the student's data")
    splits_path = resolve(cfg.splits)
    if not splits_path.is_file():
        return  # kdlib.data.folds.fold_data says so, naming the setting
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

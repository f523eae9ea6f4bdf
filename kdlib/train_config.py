"""Settings of one training run: `TrainConfig` (frozen, validated on construction) and its parts.

Unknown keys, bad values and impossible combinations (a distiller without a teacher, post-hoc
adjustment on top of a prior-correcting loss, ...) raise ConfigError naming the setting and the
valid choices, before any data is loaded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdlib import CLASSES, MODALITIES, criterion, models
from kdlib.config import check_choice, check_range, from_dict, read_yaml, to_dict
from kdlib.data.loader import SAMPLERS
from kdlib.errors import ConfigError

SELECT_METRICS: tuple[str, ...] = (
    "macro_f1", "balanced_accuracy", "accuracy",
    *(f"f1_{c}" for c in CLASSES), *(f"recall_{c}" for c in CLASSES), "loss",
)
"""Validation quantities that pick the best epoch; all are maximised except `loss` (plain CE)."""

PRIOR_CORRECTING_LOSSES: tuple[str, ...] = ("logit_adjusted", "ldam_drw")
"""Task losses that already correct for the class prior: post-hoc adjustment would do it twice."""

PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp16", "fp32")
"""Autocast precision on CUDA (kdlib.device.autocast_dtype)."""

DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class AugmentConfig:
    """Batched augmentation (kdlib.data.loader.augment_batch); all zero/False switches it off."""

    flip: bool = True
    max_rotation_deg: float = 10.0
    intensity_jitter: float = 0.1

    def __post_init__(self) -> None:
        check_choice("augment.flip", self.flip, (True, False))
        check_range("augment.max_rotation_deg", self.max_rotation_deg, 0, 180)
        check_range("augment.intensity_jitter", self.intensity_jitter, 0, 1)

    @property
    def enabled(self) -> bool:
        return self.flip or self.max_rotation_deg > 0 or self.intensity_jitter > 0


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines one training run; its run id is a hash of these settings except
    the execution settings `device`, `deterministic`, `precision` and `compile`
    (kdlib.identity.run_id).

    cache, splits: the slice cache .h5 and the splits CSV (relative paths are taken from the
        output root, kdlib.paths.resolve).
    repeat, fold: the partition (repeat) and fold of the splits; fold is the test fold of a "cv"
        split table (validation: the next fold) and the validation fold of a "holdout" one (test:
        fold -1), see kdlib.data.splits.fold_subjects. ratio: the HGG:LGG subject ratio the
        training set is subsampled to (>= 1; None = natural).
    modalities: input channels, in this order. model, weights (None | "imagenet"): kdlib.models.
    task_loss, loss_params: kdlib.criterion.LOSSES and their settings; distiller (None | kd | dkd |
        bkd), distill_params: kdlib.criterion.DISTILLERS and their settings.
    teacher: the teacher's run folder, or its run id in the same runs dir (needs a distiller).
    cache_teacher_logits: compute the teacher's logits once, on the un-augmented training images.
        With augmentation on, the student then sees an augmented image but the teacher's answer for
        the plain one: one teacher forward less per step, but the soft target is no longer paired
        with the exact input (flips keep the label; small rotations and intensity jitter barely move
        a good teacher's logits). Off: the teacher sees the student's augmented batch.
    epochs, batch_size, lr, weight_decay, warmup_epochs: AdamW with a per-step linear warmup over
        warmup_epochs, then cosine decay to 0.
    sampler: none | oversample | undersample (kdlib.data.loader.epoch_indices).
    augment: AugmentConfig or its settings as a mapping; false switches augmentation off.
    select_metric: validation quantity that picks the best epoch (SELECT_METRICS); patience:
        stop after that many epochs without improvement (None = never).
    posthoc_tau: test-time (and validation) adjustment z - tau log(pi) of the probabilities.
    seed; device: auto | cpu | cuda | cuda:N | mps; deterministic: deterministic algorithms on,
        strictly (kdlib.device.determinism).
    precision (CUDA only; the CPU trains in float32): auto (bf16 where the GPU has it natively,
        else fp16 with a gradient scaler) | bf16 | fp16 | fp32; the classifier head and the loss
        are float32 in every case. compile: torch.compile the model (off by default).
    """

    cache: str
    splits: str
    repeat: int = 0
    fold: int = 0
    ratio: float | None = None
    modalities: tuple[str, ...] = MODALITIES
    model: str = "cnn_s"
    weights: str | None = None
    task_loss: str = "ce"
    loss_params: dict[str, Any] = field(default_factory=dict)
    distiller: str | None = None
    distill_params: dict[str, Any] = field(default_factory=dict)
    teacher: str | None = None
    cache_teacher_logits: bool = False
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    sampler: str = "none"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    select_metric: str = "macro_f1"
    patience: int | None = None
    posthoc_tau: float | None = None
    seed: int = 0
    device: str = "auto"
    deterministic: bool = True
    precision: str = "auto"
    compile: bool = False

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)
        for name in ("cache", "splits"):
            if not isinstance(getattr(self, name), (str, Path)) or not str(getattr(self, name)):
                raise ConfigError(f"{name} must be a file path, got {getattr(self, name)!r}")
            set_(name, Path(getattr(self, name)).as_posix())
        for name in ("repeat", "fold", "epochs", "batch_size", "warmup_epochs", "seed", "patience"):
            set_(name, _number(name, getattr(self, name), int, optional=name == "patience"))
        for name in ("lr", "weight_decay", "ratio", "posthoc_tau"):
            optional = name in ("ratio", "posthoc_tau")
            set_(name, _number(name, getattr(self, name), float, optional=optional))
        mods = (self.modalities,) if isinstance(self.modalities, str) else tuple(self.modalities)
        for m in mods:
            check_choice("modalities", m, MODALITIES)
        if not mods or len(set(mods)) != len(mods):
            raise ConfigError(f"modalities={list(mods)} must be a non-empty list of distinct names "
                              f"from {list(MODALITIES)}")
        set_("modalities", mods)
        for name in ("loss_params", "distill_params"):
            value = getattr(self, name) or {}
            if not isinstance(value, Mapping):
                raise ConfigError(f"{name} must be a mapping of settings, got {value!r}")
            set_(name, dict(value))
        aug = self.augment
        if aug is True or aug is None:
            aug = AugmentConfig() if aug else AugmentConfig(False, 0.0, 0.0)
        elif aug is False:
            aug = AugmentConfig(False, 0.0, 0.0)
        elif isinstance(aug, Mapping):
            aug = from_dict(AugmentConfig, aug, "augment")
        elif not isinstance(aug, AugmentConfig):
            raise ConfigError(f"augment={aug!r} is not valid; use true, false, null or a mapping of "
                              "settings (flip, max_rotation_deg, intensity_jitter)")
        set_("augment", aug)
        for name in ("cache_teacher_logits", "deterministic", "compile"):
            check_choice(name, getattr(self, name), (True, False))
        check_range("repeat", self.repeat, 0)
        check_range("fold", self.fold, 0)
        check_range("epochs", self.epochs, 1)
        check_range("batch_size", self.batch_size, 2)
        check_range("warmup_epochs", self.warmup_epochs, 0, self.epochs)
        check_range("lr", self.lr, 1e-12)
        check_range("weight_decay", self.weight_decay, 0)
        if self.ratio is not None:
            check_range("ratio", self.ratio, 1.0)
        if self.patience is not None:
            check_range("patience", self.patience, 1)
        check_choice("sampler", self.sampler, SAMPLERS)
        check_choice("select_metric", self.select_metric, SELECT_METRICS)
        check_choice("weights", self.weights, (None, "imagenet"))
        check_choice("precision", self.precision, PRECISIONS)
        if not isinstance(self.device, str) or not DEVICE_RE.match(self.device):
            raise ConfigError(f"device={self.device!r} is not valid; use auto, cpu, mps, cuda or "
                              "cuda:N")
        self._check_methods()

    def _check_methods(self) -> None:
        models.check_model_name(self.model)
        check_choice("task_loss", self.task_loss, sorted(criterion.LOSSES))
        check_choice("distiller", self.distiller, [None, *sorted(criterion.DISTILLERS)])
        if self.distiller and not self.teacher:
            raise ConfigError(f"distiller={self.distiller!r} needs a teacher (a run folder or a "
                              "run id)")
        if self.teacher and not self.distiller:
            raise ConfigError(f"teacher={self.teacher!r} is set but distiller is None; set "
                              f"distiller to one of {sorted(criterion.DISTILLERS)} or drop the "
                              "teacher")
        if self.distill_params and not self.distiller:
            raise ConfigError("distill_params are set but distiller is None")
        if self.cache_teacher_logits and not self.distiller:
            raise ConfigError("cache_teacher_logits=True needs a distiller and a teacher")
        if self.posthoc_tau is not None:
            if self.task_loss in PRIOR_CORRECTING_LOSSES:
                raise ConfigError(f"posthoc_tau with task_loss={self.task_loss!r} corrects the "
                                  "class prior twice; set posthoc_tau: null or task_loss: ce")
            if self.sampler != "none":
                raise ConfigError(f"posthoc_tau with sampler={self.sampler!r}: the resampled model "
                                  "no longer learns the training prior that post-hoc adjustment "
                                  "removes; use sampler: none")
        valid = criterion.LOSS_DEFAULTS[self.task_loss]
        bad = sorted(set(self.loss_params) - set(valid))
        if bad:
            raise ConfigError(f"loss_params {bad} are not settings of "
                              f"task_loss={self.task_loss!r}; valid: {sorted(valid)}")
        valid = criterion.DISTILLER_DEFAULTS.get(self.distiller, {})
        bad = sorted(set(self.distill_params) - set(valid))
        if bad:
            raise ConfigError(f"distill_params {bad} are not settings of "
                              f"distiller={self.distiller!r}; valid: {sorted(valid)}")
        clash = [k for k in set(self.loss_params) & set(self.distill_params)
                 if self.loss_params[k] != self.distill_params[k]]
        if clash:
            raise ConfigError(f"{sorted(clash)} differ between loss_params and distill_params; a "
                              "setting shared by the task loss and the distiller takes one value")
        # the values themselves are checked by the criterion: now, not after the data is loaded
        criterion.build_criterion(self.task_loss, self.distiller, [2, 2, 1], self.epochs,
                                  self.loss_kw)

    @property
    def loss_kw(self) -> dict[str, Any]:
        """loss_params and distill_params as the one flat dict build_criterion takes."""
        return {**self.loss_params, **self.distill_params}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build and validate from a plain dict (e.g. a YAML mapping)."""
        return from_dict(cls, values, "the training config")

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        """Build and validate from a YAML file of TrainConfig settings."""
        return from_dict(cls, read_yaml(path), str(path))

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (what config.yaml holds)."""
        return to_dict(self)

    def __hash__(self) -> int:  # the dict fields make the generated hash fail
        return hash(json.dumps(self.to_dict(), sort_keys=True, default=str))


def _number(name: str, value: Any, kind: type, optional: bool = False) -> Any:
    """Coerce a YAML value to int/float (YAML 1.1 reads `1e-3` as text), or raise ConfigError."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"{name}={value!r} must be a number ({kind.__name__})")
    try:
        out = kind(float(value)) if kind is float else int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} must be a number ({kind.__name__})") from None
    if kind is int and out != float(value):
        raise ConfigError(f"{name}={value!r} must be a whole number")
    return out


def load_train_config(source: TrainConfig | Mapping[str, Any] | str | Path) -> TrainConfig:
    """A TrainConfig from a TrainConfig, a dict of settings, or a YAML file path."""
    if isinstance(source, TrainConfig):
        return source
    if isinstance(source, Mapping):
        return TrainConfig.from_dict(source)
    return TrainConfig.from_yaml(source)

"""Registries of the kdlib.losses task losses and distillers, and the criterion built from them."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kdlib.errors import ConfigError, DataError, RunError
from kdlib.losses import (
    FOCAL_WEIGHTS,
    _counts,
    bkd,
    ce,
    class_balanced,
    dkd,
    focal,
    kd,
    ldam_drw,
    logit_adjusted,
    weighted_ce,
)

LOSSES: dict[str, Callable[..., Tensor]] = {
    "ce": ce,
    "weighted_ce": weighted_ce,
    "class_balanced": class_balanced,
    "focal": focal,
    "logit_adjusted": logit_adjusted,
    "ldam_drw": ldam_drw,
}
DISTILLERS: dict[str, Callable[..., dict[str, Tensor]]] = {"kd": kd, "dkd": dkd, "bkd": bkd}

# Arguments the criterion supplies itself; every other keyword argument is a setting.
_CONTEXT = ("logits", "logits_s", "logits_t", "target", "task", "class_counts", "epoch", "epochs")


def _settings(fn: Callable) -> dict[str, Any]:
    params = inspect.signature(fn).parameters.values()
    return {
        p.name: p.default for p in params if p.name not in _CONTEXT and p.default is not p.empty
    }


LOSS_DEFAULTS: dict[str, dict[str, Any]] = {name: _settings(fn) for name, fn in LOSSES.items()}
"""Settings of each task loss with their defaults (from the function signatures)."""
DISTILLER_DEFAULTS: dict[str, dict[str, Any]] = {n: _settings(fn) for n, fn in DISTILLERS.items()}
"""Settings of each distiller with their defaults. `beta` is the class-balanced beta everywhere."""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_VALID: dict[str, tuple[Callable[[Any], bool], str]] = {
    "alpha": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "beta": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "T": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "tau": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "gamma": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "s": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "max_margin": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "drw_start": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "a": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "b": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "warmup": (lambda v: _is_number(v) and v >= 1, "a number of epochs >= 1"),
    "weights": (lambda v: v in FOCAL_WEIGHTS, f"one of {list(FOCAL_WEIGHTS)}"),
    "original": (lambda v: isinstance(v, bool), "true or false"),
}


def needs_cosine_head(task_loss: str) -> bool:
    """True when the task loss expects cosine logits (`models.set_cosine_head`): ldam_drw."""
    return task_loss == "ldam_drw"


def logit_scale(task_loss: str, params: Mapping[str, Any] | None = None) -> float:
    """Factor from model outputs to logits: s for ldam_drw's cosine logits, else 1.

    Multiply model outputs by it for probabilities, post-hoc adjustment and teacher logits.
    """
    if not needs_cosine_head(task_loss):
        return 1.0
    return float((params or {}).get("s", LOSS_DEFAULTS["ldam_drw"]["s"]))


def _call(fn: Callable, context: dict[str, Any], settings: dict[str, Any]) -> Any:
    wanted = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in context.items() if k in wanted}, **settings)


@dataclass(frozen=True)
class Criterion:
    """Task loss plus optional distiller with fixed class counts; see `build_criterion`."""

    task_loss: str
    distiller: str | None
    class_counts: tuple[int, ...]
    epochs: int
    task_params: dict[str, Any]
    distiller_params: dict[str, Any]
    _counts_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def logit_scale(self) -> float:
        """s for ldam_drw (cosine logits), 1 otherwise; see `logit_scale`."""
        return logit_scale(self.task_loss, self.task_params)

    def _counts_on(self, device: torch.device) -> Tensor:
        if device not in self._counts_cache:  # one host-to-device copy per device, not per step
            self._counts_cache[device] = _counts(self.class_counts).to(device)
        return self._counts_cache[device]

    def __call__(
        self, logits_s: Tensor, target: Tensor, logits_t: Tensor | None = None, epoch: int = 0
    ) -> dict[str, Tensor]:
        """{"loss": total to backpropagate, one detached entry per term as it enters the total}."""
        n_classes = len(self.class_counts)
        if logits_s.ndim != 2 or logits_s.shape[1] != n_classes:
            raise RunError(
                f"student logits have shape {tuple(logits_s.shape)}; expected (B, {n_classes})"
            )
        counts = self._counts_on(logits_s.device)
        context = {
            "logits": logits_s,
            "target": target,
            "class_counts": counts,
            "epoch": epoch,
            "epochs": self.epochs,
        }
        task = _call(LOSSES[self.task_loss], context, self.task_params)
        if self.distiller is None:
            return {"loss": task, "task": task.detach()}
        if logits_t is None:
            raise RunError(
                f"distiller {self.distiller!r} needs the teacher's logits: call "
                "criterion(logits_s, target, logits_t=teacher(x), epoch=epoch)"
            )
        if logits_t.shape != logits_s.shape:
            raise RunError(
                f"teacher logits {tuple(logits_t.shape)} and student logits "
                f"{tuple(logits_s.shape)} differ in shape"
            )
        context.update(logits_s=logits_s * self.logit_scale, logits_t=logits_t, task=task)
        out = _call(DISTILLERS[self.distiller], context, self.distiller_params)
        return {k: (v if k == "loss" else v.detach()) for k, v in out.items()}


def _check_params(params: Mapping[str, Any], task_loss: str, distiller: str | None) -> None:
    task_keys = set(LOSS_DEFAULTS[task_loss])
    kd_keys = set(DISTILLER_DEFAULTS[distiller]) if distiller else set()
    unknown = sorted(set(params) - task_keys - kd_keys)
    if unknown:
        raise ConfigError(
            f"unknown loss setting(s) {unknown} for task_loss={task_loss!r}, "
            f"distiller={distiller!r};"
            f" valid: {task_loss}: {sorted(task_keys)}, {distiller}: {sorted(kd_keys)}"
        )
    for key, value in params.items():
        ok, what = _VALID[key]
        if not ok(value):
            raise ConfigError(f"loss setting {key}={value!r} is not valid; use {what}")
    if params.get("original") and "alpha" in params:
        raise ConfigError(
            "kd with original=True fixes alpha=0.1 (no T^2); remove the alpha setting"
        )


def build_criterion(
    task_loss: str,
    distiller: str | None,
    class_counts: Sequence[int],
    epochs: int,
    params: Mapping[str, Any] | None = None,
) -> Criterion:
    """Criterion for `task_loss` (LOSSES) with optional `distiller` (DISTILLERS or None/"none").

    params is one flat dict of settings; each goes to the task loss and/or distiller that has it
    (LOSS_DEFAULTS, DISTILLER_DEFAULTS); missing ones take their defaults.
    """
    if task_loss not in LOSSES:
        raise ConfigError(f"task_loss={task_loss!r} is not valid; choose one of {list(LOSSES)}")
    if distiller == "none":
        distiller = None
    if distiller is not None and distiller not in DISTILLERS:
        raise ConfigError(
            f"distiller={distiller!r} is not valid; choose one of {list(DISTILLERS)} or None"
        )
    counts = tuple(class_counts)
    if len(counts) < 2 or not all(hasattr(n, "__index__") for n in counts):
        raise ConfigError(f"class_counts={list(counts)} must be one integer count per class (>= 2)")
    counts = tuple(int(n) for n in counts)
    empty = [c for c, n in enumerate(counts) if n < 1]
    if empty:
        raise DataError(
            f"class_counts={list(counts)}: class(es) {empty} have no training example; every "
            "class needs at least one (check the fold and the imbalance ratio)"
        )
    if not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs={epochs!r} must be an integer >= 1")
    params = dict(params or {})
    _check_params(params, task_loss, distiller)
    task_params = {**LOSS_DEFAULTS[task_loss]}
    task_params.update({k: v for k, v in params.items() if k in task_params})
    kd_params = {**DISTILLER_DEFAULTS[distiller]} if distiller else {}
    kd_params.update({k: v for k, v in params.items() if k in kd_params})
    return Criterion(task_loss, distiller, counts, epochs, task_params, kd_params)

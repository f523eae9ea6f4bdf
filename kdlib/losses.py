"""Imbalance-aware task losses and distillation losses, each citing the paper that defines it.

Conventions: logits (B, C) are cast to float32; target (B,) holds class indices;
class_counts holds n_c, the training count of class c. Every loss is a batch mean: a weighted
loss is sum_i w_{y_i} l_i / B (PyTorch's weighted `cross_entropy` divides by sum_i w_{y_i}
instead). KL terms are KL(teacher || student) averaged over the batch ("batchmean").
Teacher logits are detached: the teacher is never trained by these losses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlib.errors import ConfigError

Counts = Sequence[int] | Tensor

FOCAL_WEIGHTS = ("none", "balanced", "class_balanced")
DKD_PAPER_EPOCHS = 240
"""DKD's warm-up (20 epochs) is given for its 240-epoch CIFAR schedule; kdlib scales it."""
ORIGINAL_KD_ALPHA = 0.1
"""Weight of the KL term in the original project's KD loss (no T^2 factor)."""


# ---------------------------------------------------------------- class weights and priors


def _counts(class_counts: Counts, like: Tensor | None = None) -> Tensor:
    device = like.device if like is not None else None
    return torch.as_tensor(class_counts, dtype=torch.float32, device=device)


def class_priors(class_counts: Counts, like: Tensor | None = None) -> Tensor:
    """pi_c = n_c / N."""
    n = _counts(class_counts, like)
    return n / n.sum()


def balanced_weights(class_counts: Counts, like: Tensor | None = None) -> Tensor:
    """w_c = N / (C n_c), scikit-learn's "balanced" weights (the original project's)."""
    n = _counts(class_counts, like)
    return n.sum() / (len(n) * n)


def class_balanced_weights(
    class_counts: Counts, beta: float = 0.9999, like: Tensor | None = None
) -> Tensor:
    """w_c = (1 - b) / (1 - b^n_c), normalised to sum C (Cui et al., CVPR 2019)."""
    n = _counts(class_counts, like)
    n = n if n.device.type == "mps" else n.double()  # 1 - b^n loses digits in float32
    w = (1.0 - beta) / (1.0 - beta**n)
    return (w * len(n) / w.sum()).float()


# ---------------------------------------------------------------- task losses


def cross_entropy(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean over the batch of w_{y_i} * CE(z_i, y_i) (divides by B, not by the sum of weights)."""
    per_sample = F.cross_entropy(logits.float(), target, reduction="none")
    if weight is not None:
        per_sample = per_sample * weight.to(per_sample.device)[target]
    return per_sample.mean()


def ce(logits: Tensor, target: Tensor) -> Tensor:
    """Plain cross-entropy, batch mean."""
    return cross_entropy(logits, target)


def weighted_ce(logits: Tensor, target: Tensor, class_counts: Counts) -> Tensor:
    """CE with w_c = N / (C n_c), batch mean sum_i w_{y_i} CE_i / B (the original project's)."""
    return cross_entropy(logits, target, balanced_weights(class_counts, logits))


def class_balanced(
    logits: Tensor, target: Tensor, class_counts: Counts, beta: float = 0.9999
) -> Tensor:
    """Class-balanced CE: weights (1 - b)/(1 - b^n_c) summing to C, batch mean (Cui et al. 2019)."""
    return cross_entropy(logits, target, class_balanced_weights(class_counts, beta, logits))


def focal(
    logits: Tensor,
    target: Tensor,
    class_counts: Counts | None = None,
    gamma: float = 2.0,
    weights: str = "none",
    beta: float = 0.9999,
) -> Tensor:
    """Focal loss -w_y (1 - p_y)^gamma log p_y, mean over the batch (Lin et al., ICCV 2017).

    weights: "none", "balanced" (N / (C n_c)) or "class_balanced" (Cui et al., with beta).
    At gamma = 0 it equals `cross_entropy` with the same weights.
    """
    log_p = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
    per_sample = -log_p
    if gamma:  # (1 - p)^0 would give 0 * inf gradients at p = 1
        per_sample = per_sample * (-torch.expm1(log_p)).clamp(min=0.0) ** gamma
    if weights != "none":
        if class_counts is None:
            raise ConfigError(f"focal with weights={weights!r} needs class_counts")
        if weights == "balanced":
            w = balanced_weights(class_counts, logits)
        else:
            w = class_balanced_weights(class_counts, beta, logits)
        per_sample = per_sample * w[target]
    return per_sample.mean()


def logit_adjusted(
    logits: Tensor, target: Tensor, class_counts: Counts, tau: float = 1.0
) -> Tensor:
    """Logit-adjusted CE: CE(z + tau log pi, y), batch mean (Menon et al., ICLR 2021).

    At tau = 1 it equals Balanced Softmax CE(z + log n, y) (Ren et al., NeurIPS 2020).
    """
    log_pi = torch.log(class_priors(class_counts, logits))
    return cross_entropy(logits.float() + tau * log_pi, target)


def ldam_margins(
    class_counts: Counts, max_margin: float = 0.5, like: Tensor | None = None
) -> Tensor:
    """LDAM margins Delta_c proportional to n_c^(-1/4), the largest equal to max_margin."""
    m = _counts(class_counts, like) ** -0.25
    return m * (max_margin / m.max())


def drw_epoch(epochs: int, drw_start: float = 0.8) -> int:
    """First (0-based) epoch of deferred re-weighting: ceil(drw_start * epochs) (160 of 200)."""
    return math.ceil(drw_start * epochs - 1e-9)


def ldam_drw(
    logits: Tensor,
    target: Tensor,
    class_counts: Counts,
    epoch: int = 0,
    epochs: int = 1,
    s: float = 30.0,
    max_margin: float = 0.5,
    drw_start: float = 0.8,
    beta: float = 0.9999,
) -> Tensor:
    """LDAM-DRW: CE(s (z - Delta_y onehot), y) on cosine logits z (Cao et al., NeurIPS 2019).

    From epoch `drw_epoch(epochs, drw_start)` on, each sample is weighted by the class-balanced
    weight of its class (beta); batch mean like every loss here. Needs `models.set_cosine_head`.
    """
    z = logits.float()
    delta = ldam_margins(class_counts, max_margin, z)
    is_target = torch.arange(z.shape[1], device=z.device)[None, :] == target[:, None]
    z = z - torch.where(is_target, delta[target][:, None], 0.0)  # one_hot checks on the host
    weight = None
    if epoch >= drw_epoch(epochs, drw_start):
        weight = class_balanced_weights(class_counts, beta, z)
    return cross_entropy(s * z, target, weight)


def posthoc_adjust(logits: Tensor, class_counts: Counts, tau: float = 1.0) -> Tensor:
    """Post-hoc logit adjustment z - tau log pi: predict argmax of it (Menon et al., ICLR 2021)."""
    return logits.float() - tau * torch.log(class_priors(class_counts, logits))


# ---------------------------------------------------------------- distillation terms


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction not in ("mean", "none"):
        raise ConfigError(f"reduction={reduction!r} is not valid; choose 'mean' or 'none'")
    return per_sample.mean() if reduction == "mean" else per_sample


def _kl_log(log_p_t: Tensor, log_p_s: Tensor) -> Tensor:
    """Per-sample KL(p_t || p_s) from log-probabilities (exact at probabilities that underflow)."""
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)


def soft_kl(logits_s: Tensor, logits_t: Tensor, T: float = 1.0, reduction: str = "mean") -> Tensor:
    """KL(p_t^T || p_s^T) with p^T = softmax(z / T), no T^2 factor (Hinton et al. 2015)."""
    log_s = F.log_softmax(logits_s.float() / T, dim=1)
    log_t = F.log_softmax(logits_t.detach().float() / T, dim=1)
    return _reduce(_kl_log(log_t, log_s), reduction)


def _split_target(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(target logit (B,), non-target logits (B, C-1) in class order) of logits already divided
    by T. Gathers, not boolean masks: no host-device sync on a GPU."""
    others = torch.arange(logits.shape[1] - 1, device=logits.device)[None, :]
    others = others + (others >= target[:, None]).long()  # class j, skipping the target
    return logits.gather(1, target[:, None]).squeeze(1), logits.gather(1, others)


def _binary_log_probs(logits: Tensor, target: Tensor) -> Tensor:
    """log [p_gt, 1 - p_gt] (B, 2), computed as log-sum-exps so it stays finite."""
    z_gt, z_nt = _split_target(logits, target)
    lse = torch.logsumexp(logits, dim=1)
    return torch.stack([z_gt - lse, torch.logsumexp(z_nt, dim=1) - lse], dim=1)


def tckd(
    logits_s: Tensor, logits_t: Tensor, target: Tensor, T: float = 4.0, reduction: str = "mean"
) -> Tensor:
    """Target-class KD: T^2 KL(b_t || b_s), b = [p_gt, 1 - p_gt] at T (Zhao et al., CVPR 2022)."""
    log_s = _binary_log_probs(logits_s.float() / T, target)
    log_t = _binary_log_probs(logits_t.detach().float() / T, target)
    return _reduce(T**2 * _kl_log(log_t, log_s), reduction)


def nckd(
    logits_s: Tensor, logits_t: Tensor, target: Tensor, T: float = 4.0, reduction: str = "mean"
) -> Tensor:
    """Non-target KD: T^2 KL of the softmax over non-target classes (Zhao et al., CVPR 2022)."""
    _, nt_s = _split_target(logits_s.float() / T, target)
    _, nt_t = _split_target(logits_t.detach().float() / T, target)
    kl = _kl_log(F.log_softmax(nt_t, dim=1), F.log_softmax(nt_s, dim=1))
    return _reduce(T**2 * kl, reduction)


def dkd_warmup(epochs: int, warmup: int = 20) -> int:
    """DKD's warm-up scaled to the run: warmup / 240 * epochs rounded half up, at least 1."""
    return max(1, int(warmup / DKD_PAPER_EPOCHS * epochs + 0.5))


def balanced_teacher_log_probs(
    logits_t: Tensor, class_counts: Counts, T: float = 2.0, beta: float = 0.9999
) -> Tensor:
    """log p~, p~_c = w_c p_t,c^T / sum_j w_j p_t,j^T with class-balanced w (Zhang et al. 2021)."""
    w = class_balanced_weights(class_counts, beta, logits_t)
    return F.log_softmax(logits_t.detach().float() / T + torch.log(w), dim=1)


# ---------------------------------------------------------------- distillers


def kd(
    logits_s: Tensor,
    logits_t: Tensor,
    task: Tensor,
    alpha: float = 0.9,
    T: float = 4.0,
    original: bool = False,
) -> dict[str, Tensor]:
    """KD: (1 - alpha) task + alpha T^2 KL(p_t^T || p_s^T), batch mean (Hinton et al. 2015).

    original=True reproduces the original project: 0.9 task + 0.1 KL, no T^2 (alpha is ignored).
    """
    kl = soft_kl(logits_s, logits_t, T)
    if original:
        terms = {"task": (1 - ORIGINAL_KD_ALPHA) * task, "kd": ORIGINAL_KD_ALPHA * kl}
    else:
        terms = {"task": (1 - alpha) * task, "kd": alpha * T**2 * kl}
    return {"loss": terms["task"] + terms["kd"], **terms}


def dkd(
    logits_s: Tensor,
    logits_t: Tensor,
    target: Tensor,
    task: Tensor,
    epoch: int = 0,
    epochs: int = DKD_PAPER_EPOCHS,
    a: float = 1.0,
    b: float = 8.0,
    T: float = 4.0,
    warmup: int = 20,
) -> dict[str, Tensor]:
    """DKD: task + min((epoch + 1) / W, 1) (a TCKD + b NCKD) (Zhao et al., CVPR 2022).

    W = dkd_warmup(epochs, warmup). epoch counts from 0 here; DKD's code counts from 1, hence
    epoch + 1: the first epoch already distils with factor 1 / W.
    """
    ramp = min((epoch + 1) / dkd_warmup(epochs, warmup), 1.0)
    terms = {
        "task": task,
        "tckd": ramp * a * tckd(logits_s, logits_t, target, T),
        "nckd": ramp * b * nckd(logits_s, logits_t, target, T),
    }
    return {"loss": terms["task"] + terms["tckd"] + terms["nckd"], **terms}


def bkd(
    logits_s: Tensor,
    logits_t: Tensor,
    task: Tensor,
    class_counts: Counts,
    alpha: float = 1.0,
    T: float = 2.0,
    beta: float = 0.9999,
) -> dict[str, Tensor]:
    """Balanced KD: task + alpha T^2 KL(p~_t || p_s^T), p~_t the class-balanced re-weighted,
    renormalised teacher probabilities (Zhang et al. 2021)."""
    log_t = balanced_teacher_log_probs(logits_t, class_counts, T, beta)
    log_s = F.log_softmax(logits_s.float() / T, dim=1)
    terms = {"task": task, "kd": alpha * T**2 * _kl_log(log_t, log_s).mean()}
    return {"loss": terms["task"] + terms["kd"], **terms}

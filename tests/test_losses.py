"""kdlib.losses as their papers define them, against hand-computed values (numpy/math) and identities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers_losses import (
    COUNTS,
    EXTREME,
    ZT,
    Y,
    Z,
    cb_weights,
    close,
    kl_rows,
    nll,
    softmax,
    split_target_masked,
    t,
    yt,
)

from kdlib import criterion as C
from kdlib import losses as L
from kdlib.errors import ConfigError

# ------------------------------------------------------------ task losses, hand-computed


def test_ce_by_hand():
    manual = np.mean(
        [-math.log(math.exp(Z[i, Y[i]]) / sum(math.exp(v) for v in Z[i])) for i in range(4)]
    )
    close(L.ce(t(Z), yt()), manual)


def test_weighted_ce_divides_by_batch_size_not_by_weight_sum():
    w = np.array([830 / (3 * 500), 830 / (3 * 300), 830 / (3 * 30)])
    per = nll(Z)
    ours = L.weighted_ce(t(Z), yt(), COUNTS)
    close(ours, (w[Y] * per).sum() / 4)
    torch_default = F.cross_entropy(t(Z), yt(), weight=t(w))  # divides by sum of w_y
    close(torch_default, (w[Y] * per).sum() / w[Y].sum())
    assert abs(float(ours) - float(torch_default)) > 0.1


def test_balanced_and_class_balanced_weights():
    close(L.balanced_weights(COUNTS), [830 / 1500, 830 / 900, 830 / 90])
    w = L.class_balanced_weights(COUNTS, 0.9999)
    close(w, cb_weights(COUNTS))
    close(float(w.sum()), 3.0)
    assert w[2] > w[1] > w[0]
    close(L.class_balanced_weights([7, 7, 7], 0.9), [1, 1, 1])


def test_class_balanced_by_hand():
    w = cb_weights(COUNTS, 0.999)
    close(L.class_balanced(t(Z), yt(), COUNTS, beta=0.999), (w[Y] * nll(Z)).mean())


def test_focal_by_hand():
    p = softmax(Z)[np.arange(4), Y]
    manual = np.mean(-((1 - p) ** 2) * np.log(p))
    close(L.focal(t(Z), yt(), gamma=2.0), manual)
    w = cb_weights(COUNTS)
    manual_w = np.mean(-w[Y] * (1 - p) ** 1 * np.log(p))
    close(L.focal(t(Z), yt(), COUNTS, gamma=1.0, weights="class_balanced"), manual_w)


def test_weighted_focal_at_gamma_zero_equals_weighted_ce():
    close(
        L.focal(t(Z), yt(), COUNTS, gamma=0.0, weights="balanced"),
        L.weighted_ce(t(Z), yt(), COUNTS),
    )
    close(L.focal(t(Z), yt(), gamma=0.0), L.ce(t(Z), yt()))
    close(
        L.focal(t(Z), yt(), COUNTS, gamma=0.0, weights="class_balanced"),
        L.class_balanced(t(Z), yt(), COUNTS),
    )


def test_logit_adjusted_by_hand_and_balanced_softmax_identity():
    pi = np.array(COUNTS) / 830
    close(L.logit_adjusted(t(Z), yt(), COUNTS, tau=2.0), nll(Z + 2.0 * np.log(pi)).mean())
    n = np.array(COUNTS, dtype=float)
    balanced_softmax = np.mean(
        [-math.log(n[Y[i]] * math.exp(Z[i, Y[i]]) / sum(n * np.exp(Z[i]))) for i in range(4)]
    )
    close(L.logit_adjusted(t(Z), yt(), COUNTS, tau=1.0), balanced_softmax)
    close(L.ce(t(Z) + torch.log(t(n)), yt()), balanced_softmax)  # CE(z + log n, y)
    close(L.logit_adjusted(t(Z), yt(), COUNTS, tau=0.0), L.ce(t(Z), yt()))


def test_ldam_margins_and_drw_switch():
    m = np.array(COUNTS, dtype=float) ** -0.25
    delta = 0.5 * m / m.max()
    close(L.ldam_margins(COUNTS), delta)
    close(float(L.ldam_margins(COUNTS)[2]), 0.5)  # the rarest class gets the largest margin
    assert L.drw_epoch(200) == 160  # Cao et al.: 200 epochs, re-weighting from epoch 160
    assert L.drw_epoch(10) == 8 and L.drw_epoch(7) == 6 and L.drw_epoch(1) == 1

    cos = Z / 3.0  # cosine logits lie in [-1, 1]
    zm = cos.copy()
    zm[np.arange(4), Y] -= delta[Y]
    plain = nll(30 * zm).mean()
    reweighted = (cb_weights(COUNTS)[Y] * nll(30 * zm)).mean()
    close(L.ldam_drw(t(cos), yt(), COUNTS, epoch=7, epochs=10), plain, 1e-4)
    close(L.ldam_drw(t(cos), yt(), COUNTS, epoch=8, epochs=10), reweighted, 1e-4)


def test_posthoc_adjust():
    pi = np.array(COUNTS) / 830
    close(L.posthoc_adjust(t(Z), COUNTS), Z - np.log(pi))
    close(L.posthoc_adjust(t(Z), COUNTS, tau=0.5), Z - 0.5 * np.log(pi))
    z = t([[1.0, 0.9, 0.8]])  # borderline: the adjustment moves the decision to the rare class
    assert int(z.argmax()) == 0 and int(L.posthoc_adjust(z, COUNTS).argmax()) == 2


# ------------------------------------------------------------ distillation


def test_soft_kl_by_hand():
    T = 4.0
    manual = kl_rows(softmax(ZT / T), softmax(Z / T))
    close(L.soft_kl(t(Z), t(ZT), T, reduction="none"), manual)
    close(L.soft_kl(t(Z), t(ZT), T), manual.mean())


def test_kd_default_by_hand():
    T, alpha = 4.0, 0.9
    task = nll(Z).mean()
    kl = kl_rows(softmax(ZT / T), softmax(Z / T)).mean()
    out = L.kd(t(Z), t(ZT), L.ce(t(Z), yt()))
    close(out["task"], (1 - alpha) * task)
    close(out["kd"], alpha * T**2 * kl)
    close(out["loss"], (1 - alpha) * task + alpha * T**2 * kl)


def test_kd_original_switch_reproduces_original_project():
    T = 4.0
    w = np.array([830 / 1500, 830 / 900, 830 / 90])
    task = (w[Y] * nll(Z)).mean()  # the original project's weighted CE
    kl = kl_rows(softmax(ZT / T), softmax(Z / T)).mean()
    crit = C.build_criterion("weighted_ce", "kd", COUNTS, 10, {"original": True, "T": T})
    out = crit(t(Z), yt(), t(ZT))
    close(out["loss"], 0.9 * task + 0.1 * kl)  # alpha = 0.1 on KL, no T^2
    close(out["kd"], 0.1 * kl)
    with pytest.raises(ConfigError, match="alpha"):
        C.build_criterion("ce", "kd", COUNTS, 10, {"original": True, "alpha": 0.5})


def test_tckd_nckd_by_hand():
    T = 2.0
    ps, pt = softmax(Z / T), softmax(ZT / T)
    i = 1  # target 1: non-target classes 0 and 2
    bs, bt = np.array([ps[i, 1], 1 - ps[i, 1]]), np.array([pt[i, 1], 1 - pt[i, 1]])
    qs, qt = ps[i, [0, 2]] / ps[i, [0, 2]].sum(), pt[i, [0, 2]] / pt[i, [0, 2]].sum()
    close(L.tckd(t(Z), t(ZT), yt(), T, reduction="none")[i], T**2 * (bt * np.log(bt / bs)).sum())
    close(L.nckd(t(Z), t(ZT), yt(), T, reduction="none")[i], T**2 * (qt * np.log(qt / qs)).sum())


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_equals_tckd_plus_weighted_nckd(T):
    """Zhao et al. 2022, eq. (3): T^2 KL = TCKD + (1 - p_t,gt) NCKD, per sample."""
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(16, 5, generator=g) * 3, torch.randn(16, 5, generator=g) * 3
    y = torch.randint(0, 5, (16,), generator=g)
    kd_term = T**2 * L.soft_kl(zs, zt, T, reduction="none")
    pt_gt = torch.softmax(zt / T, dim=1).gather(1, y[:, None]).squeeze(1)
    rhs = L.tckd(zs, zt, y, T, "none") + (1 - pt_gt) * L.nckd(zs, zt, y, T, "none")
    close(kd_term, rhs.numpy(), 1e-4)


@pytest.mark.parametrize("classes", [2, 3, 7])
def test_gathered_split_target_equals_the_boolean_mask_version(classes, monkeypatch):
    g = torch.Generator().manual_seed(classes)
    zs = (torch.randn(64, classes, generator=g) * 5).requires_grad_()
    zt = torch.randn(64, classes, generator=g) * 5
    y = torch.randint(0, classes, (64,), generator=g)
    for got, want in zip(L._split_target(zs, y), split_target_masked(zs, y)):
        assert got.shape == want.shape and torch.equal(got, want)
    terms = ["task", "tckd", "nckd", "loss"]
    task = F.cross_entropy(zs, y)
    new = L.dkd(zs, zt, y, task, epoch=3, epochs=10)
    grad_new = torch.autograd.grad(new["loss"], zs, retain_graph=True)[0]
    monkeypatch.setattr(L, "_split_target", split_target_masked)
    old = L.dkd(zs, zt, y, task, epoch=3, epochs=10)
    grad_old = torch.autograd.grad(old["loss"], zs)[0]
    for k in terms:
        torch.testing.assert_close(new[k], old[k], rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_new, grad_old, rtol=0, atol=1e-6)


def test_dkd_warmup_scaling():
    assert L.dkd_warmup(240) == 20  # DKD's own schedule
    assert L.dkd_warmup(24) == 2 and L.dkd_warmup(100) == 8 and L.dkd_warmup(30) == 3
    assert L.dkd_warmup(5) == 1 and L.dkd_warmup(1) == 1
    full = L.dkd(t(Z), t(ZT), yt(), L.ce(t(Z), yt()), epoch=100, epochs=240)
    close(full["tckd"], L.tckd(t(Z), t(ZT), yt(), 4.0))
    close(full["nckd"], 8 * L.nckd(t(Z), t(ZT), yt(), 4.0))
    first = L.dkd(t(Z), t(ZT), yt(), L.ce(t(Z), yt()), epoch=0, epochs=240)
    close(first["nckd"], float(full["nckd"]) / 20)  # epoch 0 is DKD's epoch 1: factor 1/20
    crit = C.build_criterion("ce", "dkd", COUNTS, 24, {})
    ramp = [float(crit(t(Z), yt(), t(ZT), epoch=e)["tckd"]) for e in range(4)]
    close(ramp, [float(full["tckd"]) / 2] + [float(full["tckd"])] * 3)


def test_bkd_reweights_and_renormalises_teacher():
    T, beta = 2.0, 0.9999
    w = cb_weights(COUNTS, beta)
    pt = softmax(ZT / T)
    p_tilde = w * pt / (w * pt).sum(axis=1, keepdims=True)
    got = L.balanced_teacher_log_probs(t(ZT), COUNTS, T, beta).exp()
    close(got, p_tilde)
    close(got.sum(dim=1), np.ones(4))
    assert (got[:, 2] > torch.softmax(t(ZT) / T, dim=1)[:, 2]).all()  # mass moves to the rare class
    out = L.bkd(t(Z), t(ZT), L.ce(t(Z), yt()), COUNTS)
    kl = kl_rows(p_tilde, softmax(Z / T)).mean()
    close(out["kd"], 1.0 * T**2 * kl)
    close(out["loss"], nll(Z).mean() + T**2 * kl)
    even = L.bkd(t(Z), t(ZT), L.ce(t(Z), yt()), [5, 5, 5])  # equal counts: plain KD term
    close(even["kd"], T**2 * L.soft_kl(t(Z), t(ZT), T))


# ------------------------------------------------------------ numerics and a toy problem


def test_focal_gradient_finite_with_gamma_below_one():
    zs = EXTREME.clone().requires_grad_()
    L.focal(zs, yt(), COUNTS, gamma=0.5, weights="balanced").backward()
    assert torch.isfinite(zs.grad).all()


def _blobs(counts, seed):
    rng = np.random.default_rng(seed)
    means = np.array([[0.0, 0.0], [2.0, 0.0], [1.0, 1.6]])
    x = np.concatenate([rng.normal(means[c], 1.0, (n, 2)) for c, n in enumerate(counts)])
    y = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def _minority_recall(task_loss: str) -> float:
    x, y = _blobs(COUNTS, seed=1)
    x_test, y_test = _blobs([1000, 1000, 1000], seed=2)
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    crit = C.build_criterion(task_loss, None, COUNTS, 1, {})
    for _ in range(300):
        opt.zero_grad()
        crit(model(x), y)["loss"].backward()
        opt.step()
    with torch.no_grad():
        pred = model(x_test).argmax(dim=1)
    return float((pred[y_test == 2] == 2).float().mean())


def test_logit_adjustment_raises_minority_recall_on_a_toy_problem():
    ce_recall, la_recall = _minority_recall("ce"), _minority_recall("logit_adjusted")
    assert la_recall > ce_recall + 0.2, (ce_recall, la_recall)

"""kdlib.criterion: registries and defaults, validation, and the criterion's terms and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_losses import COUNTS, EXTREME, ZT, Z, close, kl_rows, nll, softmax, t, yt

from kdlib import criterion as C
from kdlib import losses as L
from kdlib.errors import ConfigError, DataError, RunError

# ------------------------------------------------------------ criterion


def test_criterion_terms_sum_to_loss_and_keys():
    keys = {
        None: {"loss", "task"},
        "kd": {"loss", "task", "kd"},
        "bkd": {"loss", "task", "kd"},
        "dkd": {"loss", "task", "tckd", "nckd"},
    }
    for distiller, expected in keys.items():
        for task_loss in C.LOSSES:
            crit = C.build_criterion(task_loss, distiller, COUNTS, 10, {})
            zs = t(Z).requires_grad_()
            zt = t(ZT).requires_grad_()
            out = crit(zs, yt(), zt if distiller else None, epoch=9)
            assert set(out) == expected
            close(out["loss"], sum(float(v) for k, v in out.items() if k != "loss"))
            assert all(not v.requires_grad for k, v in out.items() if k != "loss")
            out["loss"].backward()
            assert zs.grad is not None and zt.grad is None  # the teacher is never trained


def test_criterion_kd_on_logit_adjusted_task():
    crit = C.build_criterion("logit_adjusted", "kd", COUNTS, 5, {"alpha": 0.5, "T": 2.0})
    out = crit(t(Z), yt(), t(ZT))
    pi = np.array(COUNTS) / 830
    manual = (
        0.5 * nll(Z + np.log(pi)).mean() + 0.5 * 4 * kl_rows(softmax(ZT / 2), softmax(Z / 2)).mean()
    )
    close(out["loss"], manual)


def test_criterion_ldam_scales_student_logits_for_distillation():
    crit = C.build_criterion("ldam_drw", "kd", COUNTS, 10, {"s": 10.0})
    assert crit.logit_scale == 10.0 and C.logit_scale("ce") == 1.0
    cos = t(Z / 3.0)
    out = crit(cos, yt(), t(ZT))
    close(out["kd"], 0.9 * 16 * float(L.soft_kl(cos * 10.0, t(ZT), 4.0)))
    assert C.needs_cosine_head("ldam_drw") and not C.needs_cosine_head("focal")


def test_defaults_follow_the_spec():
    assert C.DISTILLER_DEFAULTS["kd"] == {"alpha": 0.9, "T": 4.0, "original": False}
    assert C.DISTILLER_DEFAULTS["dkd"] == {"a": 1.0, "b": 8.0, "T": 4.0, "warmup": 20}
    assert C.DISTILLER_DEFAULTS["bkd"] == {"alpha": 1.0, "T": 2.0, "beta": 0.9999}
    assert C.LOSS_DEFAULTS["focal"]["gamma"] == 2.0 and C.LOSS_DEFAULTS["logit_adjusted"] == {
        "tau": 1.0
    }
    assert C.LOSS_DEFAULTS["ldam_drw"] == {
        "s": 30.0,
        "max_margin": 0.5,
        "drw_start": 0.8,
        "beta": 0.9999,
    }
    assert C.LOSS_DEFAULTS["ce"] == {} and C.LOSS_DEFAULTS["class_balanced"] == {"beta": 0.9999}
    crit = C.build_criterion("class_balanced", "bkd", COUNTS, 3, {"beta": 0.99, "T": 3})
    assert crit.task_params == {"beta": 0.99} and crit.distiller_params == {
        "alpha": 1.0,
        "T": 3,
        "beta": 0.99,
    }


def test_errors_name_the_valid_choices():
    with pytest.raises(ConfigError, match="logit_adjusted"):
        C.build_criterion("balanced_softmax", None, COUNTS, 3, {})
    with pytest.raises(ConfigError, match="dkd"):
        C.build_criterion("ce", "fitnet", COUNTS, 3, {})
    with pytest.raises(ConfigError, match=r"'tau'"):
        C.build_criterion("logit_adjusted", None, COUNTS, 3, {"temperature": 2})
    with pytest.raises(ConfigError, match="alpha"):
        C.build_criterion("ce", None, COUNTS, 3, {"alpha": 0.5})  # kd setting without a distiller
    for bad in ({"alpha": 1.5}, {"T": 0}, {"original": "yes"}):
        with pytest.raises(ConfigError, match="not valid"):
            C.build_criterion("ce", "kd", COUNTS, 3, bad)
    with pytest.raises(ConfigError, match="weights"):
        C.build_criterion("focal", None, COUNTS, 3, {"weights": "inverse"})
    with pytest.raises(DataError, match="no training example"):
        C.build_criterion("ce", None, [10, 5, 0], 3, {})
    with pytest.raises(ConfigError, match="epochs"):
        C.build_criterion("ce", None, COUNTS, 0, {})
    crit = C.build_criterion("ce", "none", COUNTS, 3, {})
    assert crit.distiller is None
    with pytest.raises(RunError, match="teacher"):
        C.build_criterion("ce", "dkd", COUNTS, 3, {})(t(Z), yt())
    with pytest.raises(RunError, match="shape"):
        crit(torch.zeros(4, 5), yt())


# ------------------------------------------------------------ numerics


@pytest.mark.parametrize("task_loss", list(C.LOSSES))
@pytest.mark.parametrize("distiller", [None, *C.DISTILLERS])
def test_finite_gradients_for_extreme_logits(task_loss, distiller):
    crit = C.build_criterion(task_loss, distiller, COUNTS, 10, {})
    zs = EXTREME.clone().requires_grad_()
    zt = -EXTREME.flip(0) if distiller else None
    for epoch in (0, 9):  # before and after DRW / DKD warm-up
        zs.grad = None
        out = crit(zs, yt(), zt, epoch=epoch)
        assert all(torch.isfinite(v) for v in out.values()), out
        out["loss"].backward()
        assert torch.isfinite(zs.grad).all()

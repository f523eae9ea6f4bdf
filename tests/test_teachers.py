"""kdlib.teachers: the network of a config and the frozen teacher (loading a teacher from its run
folder, and its checks, run end to end in test_train.py)."""

from __future__ import annotations

import torch
from helpers_train import tiny_config

from kdlib import CLASSES
from kdlib.models import CosineLinear, create_model
from kdlib.teachers import FrozenTeacher, build_model
from kdlib.train_config import TrainConfig


def test_frozen_teacher_stays_in_eval_mode():
    t = FrozenTeacher(create_model("cnn_xs", in_channels=2))
    t.train()
    assert not t.training and not t.model.training
    assert not any(p.requires_grad for p in t.parameters())
    assert not t(torch.randn(3, 2, 16, 16)).requires_grad


def test_frozen_teacher_scales_the_outputs_to_logits():
    model = create_model("cnn_xs", in_channels=2).eval()
    x = torch.randn(2, 2, 16, 16)
    torch.testing.assert_close(FrozenTeacher(model, scale=30.0)(x), model(x) * 30.0)


def test_build_model_follows_the_config():
    cfg = TrainConfig.from_dict(tiny_config("c.h5", "s.csv", modalities=["flair", "t1", "t2"]))
    model = build_model(cfg, torch.device("cpu"))
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, len(CLASSES))
    assert not any(isinstance(m, CosineLinear) for m in model.modules())
    ldam = build_model(TrainConfig.from_dict(tiny_config("c.h5", "s.csv", task_loss="ldam_drw")),
                       torch.device("cpu"))
    assert any(isinstance(m, CosineLinear) for m in ldam.modules())

"""kdlib.stack: stacked models give each model's outputs, gradients and BatchNorm statistics."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from kdlib.criterion import build_criterion
from kdlib.models import create_model
from kdlib.stack import Stack, detach_from_stack, stack_problem, train_group_epoch
from kdlib.train import lr_lambda, train_one_epoch


def _models(n: int, name: str = "cnn_xs") -> list[torch.nn.Module]:
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(create_model(name, in_channels=2))
    return out


def test_stack_gives_each_models_outputs_gradients_and_running_stats():
    models = _models(3)
    alone = copy.deepcopy(models)
    stack = Stack(models)
    x, y = torch.randn(6, 2, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    z = stack(x, train=True)
    sum(F.cross_entropy(z[i], y) for i in range(3)).backward()
    stack.grads_to_models()
    for i, (m, ref) in enumerate(zip(models, alone)):
        out = ref(x)
        F.cross_entropy(out, y).backward()
        assert torch.allclose(z[i], out, atol=1e-6, rtol=0)
        for (name, p), q in zip(m.named_parameters(), ref.parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=0), name
        for b, c in zip(m.buffers(), ref.buffers()):  # BatchNorm running stats, in the model
            assert torch.allclose(b.float(), c.float(), atol=1e-7, rtol=0)
        assert torch.allclose(stack.evaluate(x)[i], ref.eval()(x), atol=1e-6, rtol=0)


def test_set_models_restacks_and_detach_gives_a_model_its_own_tensors():
    models = _models(3)
    stack = Stack(models)
    stack.set_models(models[1:])
    assert stack.params["fc.weight"].shape[0] == 2
    with torch.no_grad():
        stack.params["fc.weight"][0].fill_(1.0)  # the stack's tensors are the models' tensors
    assert torch.equal(models[1].fc.weight, torch.ones_like(models[1].fc.weight))
    before = models[1].fc.weight.detach().clone()
    detach_from_stack(models[1])
    with torch.no_grad():
        stack.params["fc.weight"][0].fill_(2.0)
    assert torch.equal(models[1].fc.weight, before)


@pytest.mark.parametrize("vectorise, scaled", [(True, False), (False, False), (False, True),
                                               (True, True)])
def test_train_group_epoch_matches_train_one_epoch_per_model(vectorise, scaled):
    scaler = lambda: torch.amp.GradScaler("cpu", init_scale=2.0**8, enabled=scaled)  # fp16 path
    torch.manual_seed(0)
    x, y = torch.randn(20, 2, 16, 16).half(), torch.randint(0, 3, (20,))
    counts = torch.bincount(y, minlength=3).tolist()
    crits = [build_criterion(loss, None, counts, 2) for loss in ("ce", "focal", "logit_adjusted")]
    models, alone = _models(3), _models(3)
    opts = [torch.optim.AdamW(m.parameters(), lr=lr) for m, lr in zip(models, (1e-3, 3e-3, 1e-2))]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(2, 10)) for o in opts]
    order = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    scalers = [scaler() for _ in models]
    terms, bad = train_group_epoch(Stack(models, vectorise), crits, opts, scheds, x, y, order,
                                   batch_size=8, epoch=1, scalers=scalers)
    assert bad == {}
    for i, (m, crit, lr) in enumerate(zip(alone, crits, (1e-3, 3e-3, 1e-2))):
        opt = torch.optim.AdamW(m.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(2, 10))
        own = scaler()
        ref = train_one_epoch(m, crit, opt, sched, x, y, order, batch_size=8, epoch=1, scaler=own)
        tol = 1e-6 if vectorise else 0.0  # one after the other: fit's kernels, bit for bit
        assert terms[i].keys() == ref.keys()
        assert all(abs(terms[i][k] - ref[k]) <= tol for k in ref)
        for p, q in zip(models[i].parameters(), m.parameters()):
            assert torch.allclose(p, q, atol=tol, rtol=0)
        assert opts[i].state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
        assert scalers[i].state_dict() == own.state_dict()


def test_stack_problem_names_random_ops_and_accepts_the_ladder():
    x = torch.randn(2, 2, 32, 32)
    assert stack_problem(create_model("cnn_s", in_channels=2), x) is None
    assert stack_problem(create_model("resnet18", in_channels=2), x) is None  # BatchNorm: fine
    dropout = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Dropout(0.5),
                                  torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    state = torch.get_rng_state()
    for vectorise in (True, False):
        assert "random numbers" in stack_problem(dropout, x, vectorise)
    assert torch.equal(torch.get_rng_state(), state)


def test_stack_problem_names_an_op_vmap_cannot_run():
    class ItemCall(torch.nn.Module):  # .item() reads a value: not possible under vmap
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 3, 1)

        def forward(self, x):
            z = self.conv(x).mean((2, 3))
            return z * z.sum().item()

    x = torch.randn(2, 2, 4, 4)
    assert "vmap cannot run it" in stack_problem(ItemCall(), x)
    assert stack_problem(ItemCall(), x, vectorise=False) is None

"""Models of one architecture stacked: one vmapped forward/backward for all, an epoch of them.

`Stack` runs N models as one: their parameters and buffers are stacked and `torch.func.vmap` over
`functional_call` evaluates all of them on a batch (the functorch model-ensembling recipe; Horace
He and Richard Zou, functorch, 2021), or runs them one after the other (vectorise=False: faster
on a CPU, where oneDNN's grouped convolutions are slower than separate ones). `train_group_epoch`
is `kdlib.train.train_one_epoch` for a Stack: one augmented batch and one forward per teacher for
all models, each model with its own criterion, optimizer and schedule.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from kdlib import CLASSES
from kdlib.data import loader
from kdlib.train import _autocast, _prepare, batch_input, batches
from kdlib.train_config import AugmentConfig


class Stack:
    """Models of one architecture as stacked tensors, run by one vmapped `functional_call`.

    Each model's parameters and buffers become views into the stacked tensors, so the model's own
    optimizer, `state_dict` and `load_state_dict` keep working; BatchNorm updates each model's
    running statistics in train mode (the buffers are stacked too, vmapped with in_dims=0).
    vectorise=False runs the models one after the other instead (same interface and results).
    """

    def __init__(self, models: Sequence[nn.Module], vectorise: bool = True) -> None:
        self.vectorise = vectorise
        self.template = copy.deepcopy(models[0]).to("meta")
        self.set_models(models)

        def one(params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
            return functional_call(self.template, (params, buffers), (x,))

        self._forward = vmap(one, in_dims=(0, 0, None), randomness="error")

    def set_models(self, models: Sequence[nn.Module]) -> None:
        """Stack these models' current parameters and buffers (e.g. after one left the group)."""
        self.models = list(models)
        self.params: dict[str, torch.Tensor] = {}
        if not self.vectorise:
            return
        self._named = [dict(m.named_parameters()) for m in self.models]
        named_buffers = [dict(m.named_buffers()) for m in self.models]
        self.params = {n: torch.stack([p[n].data for p in self._named]).requires_grad_()
                       for n in self._named[0]}
        self.buffers = {n: torch.stack([b[n].data for b in named_buffers])
                        for n in named_buffers[0]}
        for i in range(len(self.models)):
            for n, p in self._named[i].items():
                p.data = self.params[n].data[i]
            for n, b in named_buffers[i].items():
                b.data = self.buffers[n][i]

    def __call__(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        """Outputs (models, N, classes) of every model on the same batch x."""
        if not self.vectorise:
            return torch.stack([m.train(train)(x) for m in self.models])
        self.template.train(train)
        return self._forward(self.params, self.buffers, x.contiguous())  # vmap: no channels_last

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def grads_to_models(self) -> None:
        """Hand each model its slice of the stacked gradients (views, no copy)."""
        if not self.vectorise:
            return
        for n, stacked in self.params.items():
            for i, named in enumerate(self._named):
                named[n].grad = None if stacked.grad is None else stacked.grad[i]

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, batch_size: int = 256, amp: bool = False,
                 channels_last: bool = False) -> torch.Tensor:
        """Outputs (models, N, classes) in eval mode, float32: `kdlib.train.evaluate` for all."""
        out = [torch.empty((len(self.models), 0, len(CLASSES)), device=x.device)]
        for start in range(0, len(x), batch_size):
            with _autocast(x.device, amp):
                xb = _prepare(x[start:start + batch_size], channels_last)
                out.append(self(xb, train=False).float())
        return torch.cat(out, dim=1)


def detach_from_stack(model: nn.Module) -> nn.Module:
    """Give a model that was in a Stack its own tensors again (in place; returns it)."""
    for t in (*model.parameters(), *model.buffers()):
        t.data = t.data.clone()
    return model


def stack_problem(model: nn.Module, x: torch.Tensor, vectorise: bool = True) -> str | None:
    """Why runs of `model` cannot be trained together with the numbers they get alone, or None.

    A model that draws random numbers (dropout, stochastic depth) cannot: its runs would share the
    global generator's draws. Vectorised, neither can one with an op vmap cannot run. x: a sample
    batch (two of its images are used; the global generator is left as it was).
    """
    xb = _prepare(x[:2].float(), False)
    cuda = xb.device.type == "cuda"
    before = torch.get_rng_state(), torch.cuda.get_rng_state(xb.device) if cuda else None
    with torch.no_grad():
        copy.deepcopy(model).train()(xb)
    after = torch.get_rng_state(), torch.cuda.get_rng_state(xb.device) if cuda else None
    torch.set_rng_state(before[0])
    if cuda:
        torch.cuda.set_rng_state(before[1], xb.device)
    if not all(a is None or torch.equal(a, b) for a, b in zip(before, after)):
        return "it draws random numbers in training (e.g. dropout)"
    if not vectorise:
        return None
    try:
        Stack([copy.deepcopy(model), copy.deepcopy(model)])(xb, train=True).sum().backward()
    except Exception as err:  # noqa: BLE001 - any failure means: train these runs one by one
        return f"vmap cannot run it ({type(err).__name__}: {str(err).splitlines()[0]})"
    return None


def train_group_epoch(
    stack: Stack, criteria: Sequence[Callable[..., dict[str, torch.Tensor]]],
    optimizers: Sequence[torch.optim.Optimizer],
    schedulers: Sequence[torch.optim.lr_scheduler.LRScheduler],
    x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, *, batch_size: int, epoch: int,
    teachers: Sequence[nn.Module | None] | None = None,
    teacher_logits: Sequence[torch.Tensor | None] | None = None,
    augment: AugmentConfig | None = None, generator: torch.Generator | None = None,
    amp: torch.dtype | bool | None = None,
    scalers: Sequence[torch.amp.GradScaler | None] | None = None, channels_last: bool = False,
    progress: bool = False,
) -> tuple[list[dict[str, float]], dict[int, str]]:
    """`kdlib.train.train_one_epoch` for every model of the stack at once, on one shared batch
    sequence; model i has criteria[i], optimizers[i], schedulers[i], scalers[i] (fp16) and
    teacher i (a teacher object used by several models runs once per step).

    Returns each model's sample-mean loss terms and {model index: message} for the models whose
    loss was not finite (the others are unaffected: their gradients are independent).
    """
    n = len(stack.models)
    teachers = list(teachers or [None] * n)
    cached = list(teacher_logits or [None] * n)
    scalers = [s if s is not None and s.is_enabled() else None for s in scalers or [None] * n]
    sums: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    seen = 0
    steps = batches(loader.host_to_device(order, x.device), batch_size)
    losses = torch.empty((len(steps), n), device=x.device)
    bar = tqdm(steps, desc=f"epoch {epoch}", leave=False, disable=not progress)
    for step, idx in enumerate(bar, 1):
        xb, yb = batch_input(x, y, idx, augment, generator, channels_last)
        with _autocast(x.device, amp):
            zt: dict[int, torch.Tensor] = {}
            for t, c in zip(teachers, cached):
                key = id(c) if c is not None else id(t)
                if key not in zt and (c is not None or t is not None):
                    zt[key] = c[idx] if c is not None else t(xb).float()
            zs = stack(xb, train=True).float()
        total = 0.0
        for i in range(n):
            key = id(cached[i]) if cached[i] is not None else id(teachers[i])
            terms = criteria[i](zs[i], yb, zt.get(key), epoch=epoch - 1)
            total = total + (terms["loss"] if scalers[i] is None else scalers[i].scale(terms["loss"]))
            losses[step - 1, i] = terms["loss"].detach()
            for k, v in terms.items():
                sums[i][k] = sums[i].get(k, 0.0) + v.detach().float() * len(idx)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        stack.zero_grad()
        total.backward()
        stack.grads_to_models()
        for opt, sched, scaler in zip(optimizers, schedulers, scalers):
            if scaler is None:
                opt.step()
            else:  # unscales and checks this model's gradients only
                scaler.step(opt)
                scaler.update()
            sched.step()
        seen += len(idx)
    bad = {}
    for i in range(n):
        wrong = torch.nonzero(~torch.isfinite(losses[:, i])).flatten().tolist()
        if wrong:
            bad[i] = (f"the loss became {losses[wrong[0], i].item()} at epoch {epoch}, step "
                      f"{wrong[0] + 1} of {len(steps)}; training stopped (try a lower lr or check "
                      "the inputs)")
    return [{k: float(v) / max(seen, 1) for k, v in s.items()} for s in sums], bad

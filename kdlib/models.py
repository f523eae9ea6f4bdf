"""Models by name: a ladder of small CNNs plus every torchvision classification model.

`create_model("resnet18", num_classes=3, in_channels=4)` adapts the first convolution to the
number of MRI channels and the classifier to the number of classes, and makes the classifier run
in float32 outside autocast (`Float32Linear`), so logits never leave a model in bf16.
`set_cosine_head` gives the cosine-normalised classifier that `ldam_drw` needs (float32 as well).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from kdlib.errors import ConfigError, RunError

if TYPE_CHECKING:
    import torchvision


def _torchvision() -> Any:
    """torchvision, imported on first use: its import takes about 2 s (it loads torch._dynamo),
    which the ladder CNNs, the training workers and the analysis notebooks do not need."""
    import torchvision

    return torchvision


@functools.cache
def torchvision_names() -> tuple[str, ...]:
    """Every torchvision classification model: `list_models(module=torchvision.models)`."""
    tv = _torchvision()
    return tuple(tv.models.list_models(module=tv.models))

TABLE_MODELS: tuple[str, ...] = (
    "mobilenet_v3_small",
    "mobilenet_v2",
    "efficientnet_b0",
    "resnet18",
    "densenet121",
    "efficientnet_v2_s",
    "resnet50",
    "convnext_tiny",
)
"""torchvision models that `model_table` lists next to the ladder (the original project's)."""

# The ladder: (stage widths, convolutions per stage). Each stage halves the resolution.
LADDER_SPECS: dict[str, tuple[tuple[int, ...], int]] = {
    "cnn_xs": ((8, 16, 32), 1),
    "cnn_s": ((12, 24, 48), 2),
    "cnn_m": ((32, 64, 128), 2),
    "cnn_l": ((64, 128, 256), 2),
}

# Models with auxiliary heads: built without them (a training loop expects one logits tensor).
_AUX_MODELS = ("googlenet", "inception_v3")


def _check_args(num_classes: int, in_channels: int) -> None:
    if not isinstance(in_channels, int) or not 1 <= in_channels <= 4:
        raise ConfigError(
            f"in_channels={in_channels!r} is not valid; use 1..4 (one per MRI modality: "
            "flair, t1, t1ce, t2)"
        )
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes={num_classes!r} is not valid; use an integer >= 2")


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def ladder_cnn(
    widths: Sequence[int], depth: int, num_classes: int = 3, in_channels: int = 4
) -> nn.Sequential:
    """Plain CNN: per stage `depth` conv-BN-ReLU blocks (first one stride 2), GAP, linear head."""
    _check_args(num_classes, in_channels)
    blocks, c_in = [], in_channels
    for width in widths:
        for i in range(depth):
            blocks.append(_conv_bn_relu(c_in, width, stride=2 if i == 0 else 1))
            c_in = width
    return nn.Sequential(
        OrderedDict(
            features=nn.Sequential(*blocks),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            fc=nn.Linear(c_in, num_classes),
        )
    )


def _ladder(name: str, num_classes: int, in_channels: int, weights: str | None) -> nn.Module:
    if weights is not None:
        raise ConfigError(f"model {name!r} has no pretrained weights; use weights=None")
    widths, depth = LADDER_SPECS[name]
    return ladder_cnn(widths, depth, num_classes, in_channels)


def adapt_conv_weight(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """RGB filters (out, 3, kh, kw) -> (out, k, kh, kw): their mean repeated k times, times 3/k.

    The k-channel filter applied to a grey image copied to k channels gives what the RGB filter
    gives on that grey image copied to 3 channels.
    """
    mean = weight.mean(dim=1, keepdim=True)
    return (mean * (3.0 / in_channels)).repeat(1, in_channels, 1, 1)


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """(dotted name, module) of the first Conv2d that reads the 3-channel input."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            return name, module
    raise ConfigError(f"{type(model).__name__} has no 3-channel Conv2d to adapt to in_channels")


def replace_first_conv(model: nn.Module, in_channels: int, pretrained: bool) -> nn.Module:
    """Swap the input convolution for one with `in_channels` inputs (in place; returns the model).

    Pretrained: weights from `adapt_conv_weight`. Random: Kaiming-normal (fan_out, as ResNet,
    MobileNet and EfficientNet initialise their convolutions).
    """
    if in_channels == 3:
        return model
    name, old = first_conv(model)
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        old.kernel_size,
        old.stride,
        old.padding,
        old.dilation,
        old.groups,
        old.bias is not None,
        old.padding_mode,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    with torch.no_grad():
        if pretrained:
            new.weight.copy_(adapt_conv_weight(old.weight, in_channels))
        else:
            nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
        if old.bias is not None and pretrained:
            new.bias.copy_(old.bias)
        elif old.bias is not None:
            new.bias.zero_()
    model.set_submodule(name, new)
    return model


def final_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """(dotted name, module) of the classifier: the last nn.Linear registered in the model."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ConfigError(
            f"{type(model).__name__} has no nn.Linear classifier (SqueezeNet ends in a Conv2d); "
            "choose another model for ldam_drw / a cosine head"
        )
    return found[-1]


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Give the classifier `num_classes` outputs (in place; returns the model)."""
    if isinstance(model, _torchvision().models.SqueezeNet):
        old = model.classifier[1]
        model.classifier[1] = nn.Conv2d(old.in_channels, num_classes, 1, device=old.weight.device)
        return model
    name, old = final_linear(model)
    model.set_submodule(name, nn.Linear(old.in_features, num_classes, device=old.weight.device))
    return model


def _drop_aux_heads(model: nn.Module) -> nn.Module:
    if hasattr(model, "aux_logits"):
        model.aux_logits = False
        for attr in ("aux1", "aux2", "AuxLogits"):
            if hasattr(model, attr):
                setattr(model, attr, None)
    return model


def imagenet_weights(name: str) -> torchvision.models.WeightsEnum:
    """The DEFAULT ImageNet weights of torchvision model `name` (nothing is downloaded)."""
    return _torchvision().models.get_model_weights(name).DEFAULT


def _torchvision_model(
    name: str, num_classes: int = 3, in_channels: int = 4, weights: str | None = None
) -> nn.Module:
    _check_args(num_classes, in_channels)
    extra = {"transform_input": False} if name in _AUX_MODELS else {}
    if weights is None:
        if name in _AUX_MODELS:
            extra.update(aux_logits=False, init_weights=True)
        model = _torchvision().models.get_model(name, weights=None, num_classes=num_classes,
                                                **extra)
        return replace_first_conv(model, in_channels, pretrained=False)
    if weights != "imagenet":
        raise ConfigError(f"weights={weights!r} is not valid; use None or 'imagenet'")
    enum = imagenet_weights(name)
    try:
        model = _torchvision().models.get_model(name, weights=enum, **extra)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        raise RunError(
            f"could not load ImageNet weights for {name!r} ({err}); download {enum.url} into "
            f"{torch.hub.get_dir()}/checkpoints/ on a machine with internet, or use weights=None"
        ) from None
    model = replace_head(_drop_aux_heads(model), num_classes)
    return replace_first_conv(model, in_channels, pretrained=True)


def cnn_xs(num_classes: int = 3, in_channels: int = 4, weights: str | None = None) -> nn.Module:
    """Smallest ladder CNN (about 6k parameters)."""
    return _ladder("cnn_xs", num_classes, in_channels, weights)


def cnn_s(num_classes: int = 3, in_channels: int = 4, weights: str | None = None) -> nn.Module:
    """Small ladder CNN (about 41k parameters)."""
    return _ladder("cnn_s", num_classes, in_channels, weights)


def cnn_m(num_classes: int = 3, in_channels: int = 4, weights: str | None = None) -> nn.Module:
    """Medium ladder CNN (about 290k parameters)."""
    return _ladder("cnn_m", num_classes, in_channels, weights)


def cnn_l(num_classes: int = 3, in_channels: int = 4, weights: str | None = None) -> nn.Module:
    """Large ladder CNN (about 1.1M parameters)."""
    return _ladder("cnn_l", num_classes, in_channels, weights)


LADDER: tuple[str, ...] = tuple(LADDER_SPECS)

LADDER_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "cnn_xs": cnn_xs,
    "cnn_s": cnn_s,
    "cnn_m": cnn_m,
    "cnn_l": cnn_l,
}
"""Ladder name -> builder(num_classes=3, in_channels=4, weights=None)."""


def model_names() -> tuple[str, ...]:
    """Every valid model name: the ladder, then `torchvision_names()`."""
    return (*LADDER, *torchvision_names())


def model_builder(name: str) -> Callable[..., nn.Module]:
    """builder(num_classes=3, in_channels=4, weights=None) of model `name` (ConfigError if unknown)."""
    check_model_name(name)
    return LADDER_BUILDERS.get(name) or functools.partial(_torchvision_model, name)


def check_model_name(name: str) -> None:
    """ConfigError for a name that is neither a ladder CNN nor a torchvision classification model."""
    if name in LADDER_BUILDERS or name in torchvision_names():
        return
    close = difflib.get_close_matches(str(name), list(model_names()), n=3)
    hint = f" Did you mean {close}?" if close else ""
    raise ConfigError(
        f"unknown model {name!r}.{hint} Valid names: the ladder {list(LADDER)} or any torchvision "
        "classification model (torchvision.models.list_models(module=torchvision.models)), "
        f"e.g. {list(TABLE_MODELS)}"
    )


def create_model(
    name: str, num_classes: int = 3, in_channels: int = 4, weights: str | None = None
) -> nn.Module:
    """Build model `name` for `in_channels` MRI channels and `num_classes` classes.

    weights: None (random init) or "imagenet" (torchvision's DEFAULT weights; the first conv is
    adapted by `adapt_conv_weight`, the classifier is new). The classifier is a `Float32Linear`.
    """
    if weights == "none":
        weights = None
    model = model_builder(name)(num_classes=num_classes, in_channels=in_channels, weights=weights)
    return float32_head(model)


@functools.cache
def _count_by_name(name: str, num_classes: int, in_channels: int) -> int:
    try:
        with torch.device("meta"):  # no memory, no init cost
            model = create_model(name, num_classes, in_channels)
    except (NotImplementedError, RuntimeError):  # e.g. RegNet reads tensor values while building
        model = create_model(name, num_classes, in_channels)
    return count_parameters(model)


def count_parameters(
    model_or_name: nn.Module | str, num_classes: int = 3, in_channels: int = 4
) -> int:
    """Number of trainable parameters of a model, or of `create_model(name, ...)` (cached)."""
    if isinstance(model_or_name, nn.Module):
        return sum(p.numel() for p in model_or_name.parameters() if p.requires_grad)
    check_model_name(model_or_name)
    return _count_by_name(model_or_name, num_classes, in_channels)


def model_table(
    names: Sequence[str] | None = None, num_classes: int = 3, in_channels: int = 4
) -> pd.DataFrame:
    """DataFrame (name, source, params) sorted by size; default: the ladder plus TABLE_MODELS."""
    names = list(names) if names is not None else [*LADDER, *TABLE_MODELS]
    rows = [
        {
            "name": n,
            "source": "ladder" if n in LADDER_SPECS else "torchvision",
            "params": count_parameters(n, num_classes, in_channels),
        }
        for n in names
    ]
    return pd.DataFrame(rows).sort_values("params", ignore_index=True)


def full_precision(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context that switches autocast off on x's device (no-op where autocast does not exist)."""
    if torch.amp.is_autocast_available(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


class Float32Linear(nn.Linear):
    """nn.Linear computed in float32 outside autocast, on float32 inputs: under bf16 autocast the
    logits would otherwise be rounded to bf16 (spacing 0.03-0.06 at typical magnitudes: ties in
    AUC and AP). Same parameters and state_dict keys as nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with full_precision(x):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias)


def float32_head(model: nn.Module) -> nn.Module:
    """Make the classifier (`final_linear`) a Float32Linear sharing its parameters (in place;
    returns the model). A model without a Linear classifier (SqueezeNet) is returned unchanged."""
    try:
        name, old = final_linear(model)
    except ConfigError:
        return model
    if isinstance(old, Float32Linear):
        return model
    with torch.device("meta"):  # no memory, and the RNG is not drawn
        new = Float32Linear(old.in_features, old.out_features, bias=old.bias is not None)
    new.weight = old.weight
    if old.bias is not None:
        new.bias = old.bias
    model.set_submodule(name, new)
    return model


class CosineLinear(nn.Module):
    """Cosine classifier: logits = <x/|x|, w_c/|w_c|>, in [-1, 1], no bias (Cao et al. 2019);
    computed in float32 outside autocast (the loss multiplies the cosines by s = 30)."""

    def __init__(self, in_features: int, out_features: int, weight: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        init = torch.empty(out_features, in_features) if weight is None else weight.detach().clone()
        if weight is None:
            nn.init.kaiming_uniform_(init, a=5**0.5)
        self.weight = nn.Parameter(init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with full_precision(x):
            return F.linear(F.normalize(x.float(), dim=1), F.normalize(self.weight.float(), dim=1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def set_cosine_head(model: nn.Module) -> nn.Module:
    """Replace the final Linear by a CosineLinear starting from its weights (for ldam_drw).

    A model that already has a cosine head is returned unchanged.
    """
    if any(isinstance(m, CosineLinear) for m in model.modules()):
        return model
    name, old = final_linear(model)
    model.set_submodule(name, CosineLinear(old.in_features, old.out_features, old.weight))
    return model

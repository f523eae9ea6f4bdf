"""Models by name: the CNN ladder, torchvision models adapted to 1-4 channels, cosine head."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models._api import WeightsEnum

from kdlib import models as M
from kdlib.errors import ConfigError, RunError


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", M.LADDER)
def test_ladder_forward_every_channel_count(name):
    for c in range(1, 5):
        model = M.create_model(name, num_classes=3, in_channels=c).eval()
        with torch.no_grad():
            assert model(torch.randn(2, c, 64, 64)).shape == (2, 3)


def test_ladder_parameter_span():
    params = [M.count_parameters(n) for n in M.LADDER]
    assert params == sorted(params)
    assert params[-1] / params[0] >= 30
    assert 3_000 < params[0] < 10_000 and 500_000 < params[-1] < 2_000_000


@pytest.mark.parametrize(
    "name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "densenet121"]
)
def test_torchvision_models_adapt_channels_and_classes(name):
    for c in (1, 4):
        model = M.create_model(name, num_classes=3, in_channels=c).eval()
        stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        assert stem.in_channels == c
        with torch.no_grad():
            assert model(torch.randn(2, c, 32, 32)).shape == (2, 3)


def test_auxiliary_heads_are_dropped():
    model = M.create_model("googlenet", in_channels=1).train()
    out = model(torch.randn(2, 1, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3)


def test_models_registry_covers_torchvision():
    names = torchvision.models.list_models(module=torchvision.models)
    assert set(names) <= set(M.model_names()) and set(M.LADDER) <= set(M.model_names())


def test_adapt_conv_weight_math():
    conv3 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    grey = torch.randn(2, 1, 9, 9)
    for k in (1, 2, 4):
        w = M.adapt_conv_weight(conv3.weight.detach(), k)
        assert w.shape == (8, k, 3, 3)
        expected = conv3.weight.detach().mean(dim=1, keepdim=True) * 3 / k
        torch.testing.assert_close(w, expected.repeat(1, k, 1, 1))
        # a grey image copied to k channels gives what the RGB filter gives on it copied to 3
        out_k = nn.functional.conv2d(grey.repeat(1, k, 1, 1), w, padding=1)
        out_3 = conv3(grey.repeat(1, 3, 1, 1)).detach()
        torch.testing.assert_close(out_k, out_3, rtol=1e-4, atol=1e-5)


def test_replace_first_conv_and_head_on_a_stand_in_pretrained_model():
    model = torchvision.models.resnet18(
        weights=None
    )  # random 1000-class model in place of ImageNet
    rgb = model.conv1.weight.detach().clone()
    M.replace_head(M.replace_first_conv(model, 4, pretrained=True), 3)
    assert model.conv1.in_channels == 4 and model.fc.out_features == 3
    torch.testing.assert_close(model.conv1.weight, M.adapt_conv_weight(rgb, 4))
    assert M.replace_first_conv(model, 3, pretrained=True) is model  # 3 channels: unchanged


def _random_state_dict(weights, *args, **kwargs):
    """Stands in for a download: the state dict of a random 1000-class model of that family."""
    name = {
        "ResNet18_Weights": "resnet18",
        "GoogLeNet_Weights": "googlenet",
        "SqueezeNet1_1_Weights": "squeezenet1_1",
    }[type(weights).__name__]
    extra = {"aux_logits": True, "init_weights": False} if name == "googlenet" else {}
    return torchvision.models.get_model(name, weights=None, **extra).state_dict()


def test_imagenet_weights_path_without_download(monkeypatch):
    assert M.imagenet_weights("resnet18") is torchvision.models.ResNet18_Weights.DEFAULT
    monkeypatch.setattr(WeightsEnum, "get_state_dict", _random_state_dict)
    model = M.create_model("resnet18", num_classes=3, in_channels=1, weights="imagenet")
    assert model.conv1.in_channels == 1 and model.fc.out_features == 3
    for name in ("googlenet", "squeezenet1_1"):  # auxiliary heads dropped; a Conv2d classifier
        model = M.create_model(name, in_channels=2, weights="imagenet").train()
        out = model(torch.randn(2, 2, 64, 64))
        assert isinstance(out, torch.Tensor) and out.shape == (2, 3)


def test_failed_download_is_a_run_error(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(RunError, match="weights=None"):
        M.create_model("resnet18", weights="imagenet")


def test_cosine_head_bounded():
    for name in ("cnn_s", "resnet18"):
        model = M.set_cosine_head(M.create_model(name, in_channels=2)).eval()
        with torch.no_grad():
            out = model(torch.randn(4, 2, 32, 32) * 100)
        assert out.shape == (4, 3) and out.abs().max() <= 1 + 1e-5
        assert M.set_cosine_head(model) is model  # idempotent
    head = M.CosineLinear(5, 3)
    x = torch.randn(6, 5)
    torch.testing.assert_close(
        head(x), nn.functional.normalize(x, dim=1) @ nn.functional.normalize(head.weight, dim=1).T
    )
    with pytest.raises(ConfigError, match="Linear"):
        M.set_cosine_head(M.create_model("squeezenet1_0"))


def test_final_linear_finds_the_classifier():
    name, layer = M.final_linear(M.create_model("mobilenet_v3_small"))
    assert name == "classifier.3" and layer.out_features == 3
    assert M.final_linear(M.create_model("cnn_xs"))[0] == "fc"


def test_count_parameters_by_name_matches_built_model():
    for name in ("cnn_m", "resnet18", "regnet_x_400mf"):  # regnet cannot be built on "meta"
        assert M.count_parameters(name, in_channels=1) == M.count_parameters(
            M.create_model(name, in_channels=1)
        )
    frozen = M.create_model("cnn_xs")
    frozen.fc.requires_grad_(False)
    assert M.count_parameters(frozen) == M.count_parameters("cnn_xs") - (32 * 3 + 3)


def test_model_table():
    table = M.model_table(["cnn_xs", "resnet18", "cnn_l"])
    assert list(table.columns) == ["name", "source", "params"]
    assert list(table["name"]) == ["cnn_xs", "cnn_l", "resnet18"]
    assert list(table["source"]) == ["ladder", "ladder", "torchvision"]


def test_errors():
    with pytest.raises(ConfigError, match="cnn_xs") as err:
        M.create_model("resnet19")
    assert "list_models" in str(err.value) and "resnet18" in str(err.value)
    for bad in (0, 5):
        with pytest.raises(ConfigError, match="in_channels"):
            M.create_model("cnn_xs", in_channels=bad)
    with pytest.raises(ConfigError, match="weights"):
        M.create_model("resnet18", weights="imagenet21k")
    with pytest.raises(ConfigError, match="pretrained"):
        M.create_model("cnn_s", weights="imagenet")
    with pytest.raises(ConfigError, match="num_classes"):
        M.create_model("cnn_s", num_classes=1)


@pytest.mark.parametrize("name", ["cnn_s", "resnet18", "mobilenet_v3_small"])
def test_logits_are_float32_under_bf16_autocast_and_equal_the_float32_head(name):
    model = M.create_model(name, in_channels=2).eval()
    _, head = M.final_linear(model)
    assert isinstance(head, M.Float32Linear)
    seen = {}
    head.register_forward_hook(lambda mod, args, out: seen.update(features=args[0]))
    x = torch.randn(4, 2, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert seen["features"].dtype == torch.bfloat16  # the body did run under autocast
    assert logits.dtype == torch.float32
    want = nn.functional.linear(seen["features"].float(), head.weight, head.bias)
    assert torch.equal(logits, want)


def test_float32_head_keeps_parameters_state_dict_and_initialisation():
    torch.manual_seed(0)
    model = M.create_model("cnn_s")
    after = torch.rand(3)
    torch.manual_seed(0)
    plain = M.model_builder("cnn_s")()
    assert type(plain.fc) is nn.Linear and torch.equal(after, torch.rand(3))
    assert list(model.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in model.state_dict().items())
    assert M.float32_head(model) is model and M.float32_head(M.create_model("squeezenet1_0"))


def test_cosine_head_is_float32_under_bf16_autocast():
    model = M.set_cosine_head(M.create_model("cnn_s", in_channels=2)).eval()
    head = model.fc
    assert isinstance(head, M.CosineLinear)
    seen = {}
    head.register_forward_hook(lambda mod, args, out: seen.update(features=args[0]))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cosines = model(torch.randn(4, 2, 32, 32))
    assert seen["features"].dtype == torch.bfloat16 and cosines.dtype == torch.float32
    want = nn.functional.normalize(seen["features"].float(), dim=1) @ \
        nn.functional.normalize(head.weight, dim=1).T
    torch.testing.assert_close(cosines, want, rtol=0, atol=1e-6)

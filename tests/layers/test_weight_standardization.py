"""Weight Standardization (Qiao et al. 2019) against the paper's equation, in float64."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import normlab
from normlab.layers.weight_standardization import (
    WeightStandardizedConv1d,
    WeightStandardizedConv2d,
    WeightStandardizedConv3d,
)

# (class, constructor keywords, input shape): groups, stride, padding modes, no bias
CASES = [
    (WeightStandardizedConv1d, dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
     (3, 4, 9)),
    (WeightStandardizedConv2d, dict(in_channels=4, out_channels=6, kernel_size=3, stride=2,
                                    groups=2, bias=False), (2, 4, 7, 7)),
    (WeightStandardizedConv2d, dict(in_channels=3, out_channels=5, kernel_size=3, padding=1,
                                    padding_mode="reflect"), (2, 3, 5, 5)),
    (WeightStandardizedConv3d, dict(in_channels=2, out_channels=3, kernel_size=2, dilation=2),
     (2, 2, 5, 5, 5)),
]
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def reference_kernels(weight, eps=1e-12):
    """The paper's eq. 2 kernel by kernel, in float64: W_i - mean(W_i) over its fan-in,
    divided by its (population) standard deviation, floored at eps."""
    kernels = torch.empty_like(weight, dtype=torch.float64)
    for i, kernel in enumerate(weight.double()):
        mean = kernel.sum() / kernel.numel()
        std = torch.sqrt(((kernel - mean) ** 2).sum() / kernel.numel())
        kernels[i] = (kernel - mean) / max(float(std), eps)
    return kernels


def reference(layer, x):
    """The torch convolution with the standardized kernels, with the layer's geometry."""
    spatial = layer.weight.dim() - 2
    padding = layer.padding
    if layer.padding_mode != "zeros":
        x = F.pad(x, [p for p in reversed(layer.padding) for _ in range(2)],
                  mode=layer.padding_mode)
        padding = 0
    return CONV[spatial](x.double(), reference_kernels(layer.weight.detach()),
                         None if layer.bias is None else layer.bias.detach().double(),
                         layer.stride, padding, layer.dilation, layer.groups)


def built(cls, kwargs):
    torch.manual_seed(0)
    layer = cls(**kwargs, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.mul_(3.0).add_(0.7)  # kernels far from mean 0 and std 1
        if layer.bias is not None:
            layer.bias.uniform_(-1, 1)
    return layer


@pytest.mark.parametrize("cls,kwargs,shape", CASES)
def test_matches_the_papers_equation_in_float64(cls, kwargs, shape):
    layer = built(cls, kwargs)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-12, atol=1e-12)
    rows = layer.standardized_weight().flatten(1)
    torch.testing.assert_close(rows.mean(1), torch.zeros(len(rows), dtype=torch.float64),
                               rtol=0, atol=1e-14)
    torch.testing.assert_close(rows.std(1, correction=0),
                               torch.ones(len(rows), dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("cls,kwargs,shape", CASES)
def test_gradcheck(cls, kwargs, shape):
    layer = built(cls, kwargs)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    names = [name for name, _ in layer.named_parameters()]

    def fn(x, *values):
        return torch.func.functional_call(layer, dict(zip(names, values)), (x,))

    params = tuple(p.detach().requires_grad_() for p in layer.parameters())
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), *params))


def test_a_constant_kernel_standardizes_to_zero_with_finite_gradients():
    layer = WeightStandardizedConv2d(1, 2, 1, dtype=torch.float64)  # fan-in 1: constant
    x = torch.randn(2, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    torch.testing.assert_close(out, layer.bias.view(1, -1, 1, 1).expand_as(out).detach())
    out.sum().backward()
    assert torch.isfinite(layer.weight.grad).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("cls,kwargs,shape", CASES)
def test_from_module_keeps_the_raw_kernels_so_the_function_changes_as_documented(
        cls, kwargs, shape):
    torch.manual_seed(0)
    conv = cls.plain_type(**kwargs, dtype=torch.float64)
    layer = cls.from_module(conv)
    assert not cls.from_module_keeps_function
    assert torch.equal(layer.weight, conv.weight)
    assert (layer.bias is None) == (conv.bias is None)
    if conv.bias is not None:
        assert torch.equal(layer.bias, conv.bias)
    assert (layer.stride, layer.padding, layer.dilation, layer.groups, layer.padding_mode) == \
        (conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode)
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(layer(x), conv(x), rtol=1e-3, atol=1e-3)


def test_from_module_refuses_another_layer_type_and_eps_must_be_positive():
    with pytest.raises(TypeError, match="expects an nn.Conv2d, got Conv1d"):
        WeightStandardizedConv2d.from_module(nn.Conv1d(2, 2, 3))
    with pytest.raises(ValueError, match="eps"):
        WeightStandardizedConv1d(2, 2, 3, eps=0.0)


@pytest.mark.parametrize("cls,kwargs,shape", CASES)
def test_to_plain_is_the_torch_conv_with_the_standardized_kernels(cls, kwargs, shape):
    layer = built(cls, kwargs)
    plain = layer.to_plain()
    assert type(plain) is cls.plain_type
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(plain(x), layer(x), rtol=1e-12, atol=1e-12)


def test_paired_with_group_norm_by_convert_and_folded_into_plain_layers():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 5 * 5, 4))
    grouped = normlab.convert(model, "group", num_groups=4)
    ws = normlab.convert(grouped, "weight_standardization", keep_activation_norm=True)
    assert [type(m) for m in ws] == [WeightStandardizedConv2d, nn.GroupNorm, nn.ReLU,
                                    nn.Flatten, nn.Linear]  # a Linear stays: convs only
    assert normlab.convert_sync(ws) is ws and type(ws[0]) is WeightStandardizedConv2d
    folded = normlab.fold(ws)
    assert type(folded[0]) is nn.Conv2d
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(folded(x), copy.deepcopy(ws).eval()(x), rtol=1e-5, atol=1e-5)


def test_each_sample_is_computed_alone():
    layer = built(WeightStandardizedConv2d, dict(in_channels=2, out_channels=3, kernel_size=3))
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    batched = layer(x)
    for i in range(4):
        torch.testing.assert_close(layer(x[i:i + 1]), batched[i:i + 1], rtol=1e-12, atol=1e-12)

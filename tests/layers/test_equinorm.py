import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import normlab
from conftest import no_kernel, skip_unless_ci
from normlab import models
from normlab._ext import loader as _native
from normlab.functional import equi_norm, equilibrium_shift_scale
from normlab.functional import equinorm as equinorm_functional
from normlab.layers.equinorm import (
    EquiNormConv1d,
    EquiNormConv2d,
    EquiNormConv3d,
    EquiNormLinear,
    balance_signs_,
)


@pytest.fixture(autouse=True, params=["compiled", "eager"])
def kernel_transform(request, monkeypatch):
    """Every test runs twice: with the kernel transform compiled (csrc/equinorm.cpp, CPU
    float32/float64) and on the eager torch path, its specification."""
    if request.param == "eager":
        monkeypatch.setattr(_native, "for_tensor", no_kernel)
    elif _native.module("equinorm", openmp=True) is None:
        skip_unless_ci("the compiled equinorm kernel could not be built on this machine")
    return request.param


FOR_TENSOR = _native.for_tensor  # as imported, before any test patches it


def reference_weight(x, w, stride, out_hw, single_pass, groups=1):
    """w'' of seed 004 section 4, term by term with loops; output channel d sees the input
    channels of its group only. In 1 or 3 spatial dims as in 2: positions H x W become
    those of the input (and output), stride^2 the stride to the power of the dims."""
    batch = x.shape[0]
    channels_out, channels_in = w.shape[0], w.shape[1]  # channels_in per group
    kernel_positions = w[0, 0].numel()
    r = batch * math.prod(out_hw) * stride ** len(out_hw)
    result = torch.empty_like(w)
    for d in range(channels_out):
        first = d // (channels_out // groups) * channels_in  # the group's first input channel
        v = [x[:, first + c].sum() for c in range(channels_in)]
        w_dc = [w[d, c].sum() for c in range(channels_in)]
        b = -sum(v[c] * w_dc[c] for c in range(channels_in)) / (kernel_positions * sum(v))
        if single_pass:
            w_prime = [w[d, c][w[d, c] > 0].sum() + b * (w[d, c] > 0).sum()
                       for c in range(channels_in)]
        else:
            w_prime = [(w[d, c] + b)[w[d, c] + b > 0].sum() for c in range(channels_in)]
        s = r / sum(v[c] * w_prime[c] for c in range(channels_in))
        result[d] = s * (w[d] + b)
    return result


def conv_with(layer, x, weight):
    return layer._apply_weight(x, weight)


@pytest.mark.parametrize("single_pass", [True, False])
@pytest.mark.parametrize("stride,padding,padding_mode", [
    (1, 1, "circular"), (1, 1, "zeros"), (2, 1, "zeros"), (1, 0, "zeros"), (2, 0, "reflect")])
def test_conv_matches_the_papers_equations(single_pass, stride, padding, padding_mode):
    torch.manual_seed(0)
    layer = EquiNormConv2d(3, 5, 3, stride, padding, padding_mode=padding_mode,
                           single_pass=single_pass, dtype=torch.float64)
    with torch.no_grad():
        layer.gain.uniform_(0.5, 2)
        layer.bias.normal_()
    x = torch.rand(4, 3, 9, 9, dtype=torch.float64)
    y = layer(x)
    reference = reference_weight(x, layer.weight.detach(), stride, y.shape[2:], single_pass)
    expected = conv_with(layer, x, layer.gain.detach().view(-1, 1, 1, 1) * reference)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)


EQUINORM_CONVS = {1: EquiNormConv1d, 2: EquiNormConv2d, 3: EquiNormConv3d}


@pytest.mark.parametrize("single_pass", [True, False])
@pytest.mark.parametrize("dims,size", [(1, 11), (3, 6)])
@pytest.mark.parametrize("stride,padding,padding_mode,groups", [
    (1, 1, "circular", 1), (2, 1, "zeros", 1), (2, 0, "reflect", 1), (1, 1, "zeros", 2)])
def test_conv1d_and_conv3d_match_the_papers_equations(single_pass, dims, size, stride, padding,
                                                      padding_mode, groups):
    torch.manual_seed(10)
    layer = EQUINORM_CONVS[dims](4, 6, 3, stride, padding, groups=groups,
                                 padding_mode=padding_mode, single_pass=single_pass,
                                 dtype=torch.float64)
    with torch.no_grad():
        layer.gain.uniform_(0.5, 2)
        layer.bias.normal_()
    x = torch.rand(3, 4, *(size,) * dims, dtype=torch.float64)
    y = layer(x)
    reference = reference_weight(x, layer.weight.detach(), stride, y.shape[2:], single_pass,
                                 groups)
    gain = layer.gain.detach().view(-1, *[1] * (dims + 1))
    pad = [padding] * 2 * dims
    padded = x if padding_mode == "zeros" else F.pad(x, pad, mode=padding_mode)
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    expected = conv(padded, gain * reference, layer.bias.detach(), stride,
                    padding if padding_mode == "zeros" else 0, 1, groups)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dims,shape", [(1, (8, 4, 12)), (3, (4, 4, 5, 5, 5))])
def test_circular_two_pass_constraints_hold_in_1d_and_3d(dims, shape):
    """The balance in 1 and 3 spatial dims: each output channel has mean 0 over batch and
    positions, and its positive weights contribute r = batch x positions."""
    torch.manual_seed(11)
    layer = EQUINORM_CONVS[dims](4, 5, 3, padding=1, padding_mode="circular",
                                 single_pass=False, dtype=torch.float64)
    x = torch.rand(shape, dtype=torch.float64)
    positions = (0, *range(2, 2 + dims))
    y = layer(x)  # gain 1 and bias 0: the output before the affine
    torch.testing.assert_close(y.mean(positions), torch.zeros(5, dtype=torch.float64),
                               rtol=0, atol=1e-14)
    shift, scale = equilibrium_shift_scale(layer.weight, x.mean(positions), 1.0,
                                           single_pass=False)
    per_channel = (-1,) + (1,) * (dims + 1)
    w2 = scale.view(per_channel) * (layer.weight + shift.view(per_channel))
    r = math.prod(shape) // shape[1]
    positive = conv_with(layer, x, w2.clamp(min=0)).sum(positions)
    negative = conv_with(layer, x, w2.clamp(max=0)).sum(positions)
    torch.testing.assert_close(positive, torch.full((5,), float(r), dtype=torch.float64),
                               rtol=1e-13, atol=0)
    torch.testing.assert_close(negative, -positive, rtol=1e-13, atol=0)


@pytest.mark.parametrize("single_pass", [True, False])
@pytest.mark.parametrize("dims", [1, 3])
def test_gradcheck_conv1d_and_conv3d(single_pass, dims):
    torch.manual_seed(12)
    layer = EQUINORM_CONVS[dims](4, 4, 2, stride=2, padding=1, groups=2,
                                 single_pass=single_pass, dtype=torch.float64)
    x = torch.rand(2, 4, *(3,) * dims, dtype=torch.float64, requires_grad=True)

    def fn(x, weight, gain, bias):
        return torch.func.functional_call(
            layer, {"weight": weight, "gain": gain, "bias": bias}, (x,))
    assert torch.autograd.gradcheck(fn, (x, layer.weight, layer.gain, layer.bias))


@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_and_conv3d_take_the_kernel_path_of_the_fixture(dims, kernel_transform,
                                                                 monkeypatch):
    """The compiled transform sees a kernel as rows x (in_channels / groups x positions), so
    it serves every dim: under the "compiled" fixture it runs for Conv1d/3d, under "eager"
    it does not (the other tests of this file then check both paths against the paper)."""
    calls = []
    compiled = equinorm_functional._CompiledEquiNorm
    original = compiled.forward

    def spy(*args):
        calls.append(args[1].shape)  # the weight
        return original(*args)
    monkeypatch.setattr(compiled, "forward", staticmethod(spy))
    layer = EQUINORM_CONVS[dims](3, 4, 3, padding=1)
    layer(torch.rand(2, 3, *(5,) * dims)).sum().backward()
    assert calls == ([(4, 3, *(3,) * dims)] if kernel_transform == "compiled" else [])


def test_conv1d_and_conv3d_check_their_input_and_need_an_input_size_to_fold():
    with pytest.raises(ValueError, match=r"EquiNormConv1d: expected input of shape "
                                         r"\(N, 3, L\), got \(3, 5\)"):
        EquiNormConv1d(3, 4, 3)(torch.rand(3, 5))
    with pytest.raises(ValueError, match=r"EquiNormConv3d: expected input of shape "
                                         r"\(N, 3, D, H, W\), got \(2, 3, 5, 5\)"):
        EquiNormConv3d(3, 4, 3)(torch.rand(2, 3, 5, 5))
    with pytest.raises(ValueError, match=r"padding must be an int or a tuple of 3 ints"):
        EquiNormConv3d(3, 4, 3, padding="same")
    with pytest.raises(ValueError, match=r"pass input_size=\(D, H, W\)"):
        EquiNormConv3d(3, 4, 3, stride=2).to_plain()
    layer = EquiNormConv3d(3, 4, 3, stride=2, padding=1, dtype=torch.float64)
    layer(torch.rand(2, 3, 5, 6, 7, dtype=torch.float64))  # moves running_mean
    layer.eval()
    x = torch.rand(2, 3, 5, 6, 7, dtype=torch.float64)
    plain = layer.to_plain(input_size=(5, 6, 7))
    assert type(plain) is nn.Conv3d
    torch.testing.assert_close(plain(x), layer(x))


def unequal_channel_means(shape):
    """Non-negative input whose channels have clearly different means (1/4 to 4)."""
    scale = torch.logspace(-0.6, 0.6, shape[1], dtype=torch.float64).flip(0)
    return torch.rand(shape, dtype=torch.float64) * scale.view(1, -1, 1, 1)


@pytest.mark.parametrize("single_pass", [True, False])
@pytest.mark.parametrize("groups,stride,padding,dilation", [
    (2, 1, 1, 1), (3, 2, 1, 1), (1, 1, 2, 2), (2, 2, 1, 3), (1, 1, 0, (1, 2))])
def test_grouped_and_dilated_conv_match_the_loop_reference_in_training(
        single_pass, groups, stride, padding, dilation):
    # Unequal channel means: a group reading another group's statistics changes b and s.
    torch.manual_seed(8)
    layer = EquiNormConv2d(6, 6, 3, stride, padding, dilation, groups, single_pass=single_pass,
                           dtype=torch.float64)
    with torch.no_grad():
        layer.gain.uniform_(0.5, 2)
        layer.bias.normal_()
    x = unequal_channel_means((4, 6, 11, 11))
    y = layer(x)
    assert layer.training
    reference = reference_weight(x, layer.weight.detach(), stride, y.shape[2:], single_pass,
                                 groups)
    expected = conv_with(layer, x, layer.gain.detach().view(-1, 1, 1, 1) * reference)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("single_pass", [True, False])
def test_gradcheck_grouped_dilated_conv_with_unequal_channel_means(single_pass):
    torch.manual_seed(9)
    layer = EquiNormConv2d(4, 4, 3, stride=2, padding=2, dilation=2, groups=2,
                           single_pass=single_pass, dtype=torch.float64)
    x = unequal_channel_means((2, 4, 5, 5)).requires_grad_(True)

    def fn(x, weight, gain, bias):
        return torch.func.functional_call(
            layer, {"weight": weight, "gain": gain, "bias": bias}, (x,))
    assert torch.autograd.gradcheck(fn, (x, layer.weight, layer.gain, layer.bias))


@pytest.mark.parametrize("single_pass", [True, False])
def test_linear_is_the_single_position_case(single_pass):
    torch.manual_seed(0)
    linear = EquiNormLinear(6, 4, single_pass=single_pass, dtype=torch.float64)
    x = torch.rand(10, 6, dtype=torch.float64)
    reference = reference_weight(x.view(10, 6, 1, 1), linear.weight.detach().view(4, 6, 1, 1),
                                 1, (1, 1), single_pass)
    torch.testing.assert_close(linear(x), x @ reference.view(4, 6).T + linear.bias.detach())
    # extra leading dims are more positions of the same batch
    x3 = torch.rand(5, 2, 6, dtype=torch.float64)
    torch.testing.assert_close(linear(x3).reshape(10, 4), linear(x3.reshape(10, 6)))


def test_circular_two_pass_constraints_hold_to_float64_precision():
    """Each output channel: mean 0 over batch and positions; positive weights contribute r."""
    torch.manual_seed(1)
    layer = EquiNormConv2d(4, 6, 3, padding=1, padding_mode="circular", single_pass=False,
                           dtype=torch.float64)
    x = torch.rand(8, 4, 10, 10, dtype=torch.float64)
    y = layer(x)  # gain 1 and bias 0: the output before the affine
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(6, dtype=torch.float64),
                               rtol=0, atol=1e-14)
    shift, scale = equilibrium_shift_scale(layer.weight, x.mean((0, 2, 3)), 1.0,
                                           single_pass=False)
    w2 = scale.view(-1, 1, 1, 1) * (layer.weight + shift.view(-1, 1, 1, 1))
    r = 8 * 10 * 10
    positive = conv_with(layer, x, w2.clamp(min=0)).sum((0, 2, 3))
    negative = conv_with(layer, x, w2.clamp(max=0)).sum((0, 2, 3))
    torch.testing.assert_close(positive, torch.full((6,), float(r), dtype=torch.float64),
                               rtol=1e-13, atol=0)
    torch.testing.assert_close(negative, -positive, rtol=1e-13, atol=0)


@pytest.mark.parametrize("single_pass", [True, False])
@pytest.mark.parametrize("cls,shape", [(EquiNormConv2d, (6, 4, 8, 8)), (EquiNormLinear, (6, 4))])
def test_invariant_to_scaling_a_channel_kernel_and_the_input(single_pass, cls, shape):
    torch.manual_seed(2)
    args = (4, 5, 3) if cls is EquiNormConv2d else (4, 5)
    layer = cls(*args, single_pass=single_pass, dtype=torch.float64)
    x = torch.rand(shape, dtype=torch.float64)
    y = layer(x)
    with torch.no_grad():
        layer.weight[2] *= 7.5
    torch.testing.assert_close(layer(x), y)
    torch.testing.assert_close(layer(0.01 * x), y)


@pytest.mark.parametrize("cls,shape", [(EquiNormConv2d, (5, 3, 6, 6)), (EquiNormLinear, (5, 3))])
def test_eval_is_independent_of_the_other_samples_and_deterministic(cls, shape):
    torch.manual_seed(3)
    layer = cls(*((3, 4, 3) if cls is EquiNormConv2d else (3, 4)))
    layer(torch.rand(shape) * 3)  # a training step moves running_mean
    layer.eval()
    x = torch.rand(shape)
    other = torch.cat([x[:1], 10 * torch.rand(shape)[1:]])
    torch.testing.assert_close(layer(x)[:1], layer(other)[:1])
    torch.testing.assert_close(layer(x[:1]), layer(x)[:1])
    assert torch.equal(layer(x), layer(x))


def test_running_mean_follows_momentum_and_replaces_the_batch_in_eval():
    layer = EquiNormConv2d(3, 4, 3, padding=1, momentum=0.25, dtype=torch.float64)
    x = torch.rand(6, 3, 5, 5, dtype=torch.float64)
    y_train = layer(x)
    torch.testing.assert_close(layer.running_mean, 0.75 + 0.25 * x.mean((0, 2, 3)))
    layer.running_mean.copy_(x.mean((0, 2, 3)))
    torch.testing.assert_close(layer.eval()(x), y_train)


def test_stat_fraction_takes_the_statistics_from_the_start_of_the_batch():
    torch.manual_seed(4)
    layer = EquiNormConv2d(3, 4, 3, padding=1, stat_fraction=0.25, dtype=torch.float64)
    x = torch.rand(8, 3, 5, 5, dtype=torch.float64)
    changed = torch.cat([x[:2], 5 * torch.rand(6, 3, 5, 5, dtype=torch.float64)])
    torch.testing.assert_close(layer(x)[:2], layer(changed)[:2])
    full = EquiNormConv2d(3, 4, 3, padding=1, dtype=torch.float64)
    full.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x)[:2], full(x[:2]))


@pytest.mark.parametrize("single_pass", [True, False])
def test_gradcheck_float64(single_pass):
    torch.manual_seed(5)
    conv = EquiNormConv2d(2, 2, 3, stride=2, padding=1, single_pass=single_pass,
                          dtype=torch.float64)
    linear = EquiNormLinear(3, 2, single_pass=single_pass, dtype=torch.float64)
    for layer, shape in [(conv, (2, 2, 4, 4)), (linear, (3, 3))]:
        x = torch.rand(shape, dtype=torch.float64, requires_grad=True)
        params = (layer.weight, layer.gain, layer.bias)

        def fn(x, weight, gain, bias, layer=layer):
            return torch.func.functional_call(
                layer, {"weight": weight, "gain": gain, "bias": bias}, (x,))
        assert torch.autograd.gradcheck(fn, (x, *params))


def test_init_mixes_signs_in_every_output_channel():
    torch.manual_seed(6)
    weight = torch.randn(50, 2)
    weight[:20] = weight[:20].abs()
    weight[20:40] = -weight[20:40].abs()
    magnitudes = weight.abs().clone()
    balance_signs_(weight)
    assert ((weight > 0).any(1) & (weight < 0).any(1)).all()
    torch.testing.assert_close(weight.abs(), magnitudes)
    layer = EquiNormConv2d(1, 64, (1, 2))  # 2 weights per channel: half would be one-signed
    flat = layer.weight.detach().flatten(1)
    assert ((flat > 0).any(1) & (flat < 0).any(1)).all()


@pytest.mark.parametrize("single_pass", [True, False])
def test_degenerate_channel_warns_and_stays_finite(single_pass):
    layer = EquiNormConv2d(2, 3, 3, padding=1, single_pass=single_pass)
    with torch.no_grad():
        layer.weight[1] = 0.3  # constant kernel: w + b = 0, no positive weights
    x = torch.rand(4, 2, 5, 5, requires_grad=True)
    with pytest.warns(RuntimeWarning, match=r"output channel\(s\) \[1\]"):
        y = layer(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(layer.weight.grad).all()
    with pytest.warns(RuntimeWarning, match="input sum"):
        y_zero = layer(torch.zeros(4, 2, 5, 5))
    torch.testing.assert_close(y_zero, layer.bias.detach().view(1, 3, 1, 1).expand_as(y_zero))


def test_fallback_does_not_flip_with_the_rows_scale():
    # Found by tests/test_properties.py: a row of one sign cancels its shift to
    # rounding noise, whose sign chose the fallback's: scaling the row by 10
    # flipped the channel's output (EquiNormLinear(3, 3), eval, row 0.31, 0.47, 0.13).
    row = torch.tensor([[0.31, 0.47, 0.13]], dtype=torch.float64)
    mean = torch.ones(3, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="contribution"):
        scales = [equilibrium_shift_scale(row * factor, mean, 1.0)[1] * factor
                  for factor in (1, 3, 7, 10)]
    for scale in scales:
        torch.testing.assert_close(scale, scales[0])


def test_gradient_is_exact_where_a_denominator_falls_back():
    # Found by tests/test_properties.py: the fallback denominators had no
    # gradient, so a channel whose weights share one sign got a weight gradient
    # that was not its output's (not orthogonal to its row, though the output
    # is invariant to the row's scale).
    weight = torch.tensor([[-0.07, -0.46, -0.2], [0.4, -0.3, 0.1]], dtype=torch.float64,
                          requires_grad=True)
    mean = torch.tensor([0.5, 1.5, 0.7], dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=r"output channel\(s\) \[0\]"):  # single-pass
        assert torch.autograd.gradcheck(lambda w: equilibrium_shift_scale(w, mean, 1.0),
                                        (weight,))


@pytest.mark.parametrize("single_pass", [True, False])
def test_the_kernel_gradient_is_autograds_where_each_denominator_falls_back(single_pass,
                                                                           monkeypatch):
    """Row 0 shares one sign (its contribution falls back to its floor), the input means
    of group 1 cancel (its input sum falls back): the compiled transform's output and
    gradients against autograd through the eager path (gradcheck cannot cross the floors'
    band of ~1e-8 with its finite differences; the test above checks the eager path)."""
    if _native.module("equinorm", openmp=True) is None:
        skip_unless_ci("the compiled equinorm kernel could not be built on this machine")
    weight = torch.tensor([[-0.07, -0.46, -0.2], [0.4, -0.3, 0.1], [0.2, -0.5, 0.3],
                           [-0.1, 0.6, -0.2]], dtype=torch.float64, requires_grad=True)
    mean = torch.tensor([0.5, 1.5, 0.7, 0.9, -0.4, -0.5], dtype=torch.float64,
                        requires_grad=True)
    gain = torch.tensor([1.2, 0.8, 1.1, 0.9], dtype=torch.float64, requires_grad=True)
    projection = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    results = []
    for for_tensor in (FOR_TENSOR, no_kernel):
        monkeypatch.setattr(_native, "for_tensor", for_tensor)
        with pytest.warns(RuntimeWarning) as caught:
            out = equi_norm(weight, mean, gain, 1.3, groups=2, single_pass=single_pass)
        said = " ".join(str(w.message) for w in caught)
        assert "input sum" in said and "channel(s) [2, 3]" in said and "contribution" in said
        results.append([out, *torch.autograd.grad(out, (weight, mean, gain), projection)])
    for compiled, eager in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-12,
                                   atol=1e-12 * eager.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_rows_give_finite_outputs_and_gradients(dtype):
    # Found by tests/test_properties.py: a row of weights near 1e-33 in float32
    # made 1 / contribution^2 overflow in backward: NaN weight gradients.
    torch.manual_seed(0)
    linear = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        linear.weight[0] = torch.tensor([3e-33, -1e-33, 2e-33])
    reference = EquiNormLinear.from_module(linear.double())
    layer = EquiNormLinear.from_module(linear.to(dtype))
    x = torch.rand(4, 3, dtype=torch.float64) + 0.5
    projection = torch.randn(4, 2, dtype=torch.float64)
    out = layer(x.to(dtype))
    (out * projection.to(dtype)).sum().backward()
    expected = reference(x)
    (expected * projection).sum().backward()
    torch.testing.assert_close(out.double(), expected, rtol=0,
                               atol=2e-2 * expected.abs().max().item())
    for param in (layer.weight, layer.gain):
        assert torch.isfinite(param.grad).all()
    # the healthy row's gradient as in float64
    torch.testing.assert_close(layer.weight.grad[1].double(), reference.weight.grad[1],
                               rtol=0, atol=2e-2 * reference.weight.grad[1].abs().max().item())


def test_tiny_row_whose_scale_exceeds_float32_stays_finite():
    # Found by tests/test_properties.py: for a float32 row near 4e-34, batch
    # statistics can make s = 1 / sum_c m_c w'_dc exceed float32 (inf), and
    # gain * s * (w + b) gave NaN outputs; s^ (w / max|w| + b^) does not overflow.
    linear = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[2.0510e-34, 4.1175e-34]]))
    x = torch.tensor([[0.0154, -0.0029], [0.003, 0.011]], dtype=torch.float64)
    outputs = []
    for dtype in (torch.float32, torch.float64):
        layer = EquiNormLinear.from_module(linear.to(dtype))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # one-signed row: single-pass fallback
            out = layer(x.to(dtype))
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(layer.weight.grad).all()
        outputs.append(out.double())
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-3, atol=0)


def test_healthy_layer_does_not_warn():
    layer = EquiNormConv2d(4, 8, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.rand(2, 4, 6, 6))


def test_bad_arguments_and_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"stat_fraction must be in \(0, 1\]"):
        EquiNormConv2d(3, 4, 3, stat_fraction=0)
    with pytest.raises(ValueError, match=r"stat_fraction must be in \(0, 1\]"):
        EquiNormLinear(3, 4, stat_fraction=1.5)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        EquiNormLinear(3, 4, momentum=-0.1)
    with pytest.raises(ValueError, match="at least 2 weights per output channel"):
        EquiNormLinear(1, 4)
    with pytest.raises(ValueError, match="groups must divide"):
        EquiNormConv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="padding must be an int or a tuple of 2 ints"):
        EquiNormConv2d(3, 4, 3, padding="same")
    with pytest.raises(ValueError, match="padding_mode must be"):
        EquiNormConv2d(3, 4, 3, padding_mode="mirror")
    with pytest.raises(ValueError,
                       match=r"expected input of shape \(N, 3, H, W\), got \(2, 4, 5, 5\)"):
        EquiNormConv2d(3, 4, 3)(torch.rand(2, 4, 5, 5))
    with pytest.raises(ValueError, match=r"expected input \(N, \*, 3\), got \(3,\)"):
        EquiNormLinear(3, 4)(torch.rand(3))
    with pytest.raises(TypeError, match="input dtype torch.float64 does not match"):
        EquiNormLinear(3, 4)(torch.rand(2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point input"):
        EquiNormLinear(3, 4)(torch.ones(2, 3, dtype=torch.long))


@pytest.mark.parametrize("source", [
    nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False),
    nn.Conv2d(4, 6, 1, stride=2), nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.Linear(5, 3),
    nn.Conv1d(4, 6, 3, padding=1, padding_mode="reflect"), nn.Conv3d(4, 6, 3, padding=1)])
def test_from_module_computes_the_source_minus_its_kernel_means_in_eval(source):
    """The documented choice: in eval mode at the initial running means, EquiNorm computes
    the source with each output channel's kernel mean removed (exact for zero-mean kernels)."""
    is_conv = not isinstance(source, nn.Linear)
    dims = source.weight.dim() - 2
    cls = EQUINORM_CONVS[dims] if is_conv else EquiNormLinear
    source = source.double()
    x = (torch.rand(3, 4, *(6,) * dims) if is_conv else torch.rand(7, 5)).double()

    def without_bias(weight):
        return source._conv_forward(x, weight, None) if is_conv else F.linear(x, weight)

    layer = cls.from_module(source)
    assert layer.training and (layer.bias is None) == (source.bias is None)
    kernel_means = source.weight.detach().flatten(1).mean(1)
    kernel_means = kernel_means.view(-1, *[1] * (source.weight.dim() - 1))
    mean_part = without_bias(kernel_means.expand_as(source.weight))
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(x), source(x) - mean_part)
        source.weight -= kernel_means
        torch.testing.assert_close(cls.from_module(source).eval()(x), source(x))


def test_state_dict_round_trips_and_repr():
    layer = EquiNormConv2d(3, 4, 3, padding=1, stat_fraction=0.5, single_pass=False)
    layer(torch.rand(4, 3, 6, 6))
    assert set(layer.state_dict()) == {"weight", "gain", "bias", "running_mean"}
    copy = EquiNormConv2d(3, 4, 3, padding=1, stat_fraction=0.5, single_pass=False)
    copy.load_state_dict(layer.state_dict())
    x = torch.rand(2, 3, 6, 6)
    assert torch.equal(copy.eval()(x), layer.eval()(x))
    assert "stat_fraction=0.5" in repr(layer) and "single_pass=False" in repr(layer)
    assert "in_features=3, out_features=4" in repr(EquiNormLinear(3, 4))
    layer.reset_parameters()
    assert torch.equal(layer.running_mean, torch.ones(3)) and torch.equal(layer.gain,
                                                                           torch.ones(4))


def test_float32_and_bfloat16_autocast_agree_with_float64():
    torch.manual_seed(7)
    layer = EquiNormConv2d(8, 8, 3, padding=1, dtype=torch.float64)
    x = torch.rand(4, 8, 8, 8, dtype=torch.float64)
    expected = layer(x)
    layer32 = layer.float()
    torch.testing.assert_close(layer32(x.float()), expected.float(), rtol=1e-4, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer32(x.float().bfloat16())
    assert low.dtype == torch.bfloat16
    assert (low.float() - expected.float()).abs().max() < 0.05 * expected.abs().max()


@pytest.mark.parametrize("single_pass", [True, False])
def test_converted_cifar_resnet_trains(single_pass):
    torch.manual_seed(0)
    # Non-negative inputs, as seed 004 (5.2) recommends for the first layer.
    images, labels = torch.rand(32, 3, 16, 16), torch.randint(0, 10, (32,))
    model = normlab.convert(models.cifar_resnet(depth=8, width=8, norm="batch"), "equinorm",
                            single_pass=single_pass)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, (EquiNormConv2d, EquiNormLinear)) for m in model.modules()) == 10
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-3:]) / 3 < 0.9 * losses[0]


def test_registered_and_exported():
    method = normlab.registry.get("equinorm")
    assert method.family == "weight"
    assert method.replaces == {nn.Linear: EquiNormLinear, nn.Conv1d: EquiNormConv1d,
                               nn.Conv2d: EquiNormConv2d, nn.Conv3d: EquiNormConv3d}
    assert normlab.EquiNormConv2d is EquiNormConv2d and normlab.EquiNormLinear is EquiNormLinear
    assert normlab.EquiNormConv1d is EquiNormConv1d and normlab.EquiNormConv3d is EquiNormConv3d

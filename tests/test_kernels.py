"""normlab.kernels against the plain-torch expressions they stand for.

These helpers borrow torch's batch-norm and clamp kernels, some through
undocumented aten ops; a torch release that changes one fails here.
"""

import pytest
import torch

from conftest import no_kernel, skip_unless_ci
from normlab._ext import loader as _native
from normlab.functional.aten_helpers import (
    batch_norm_backward,
    batch_statistics,
    clamp_backward,
    column_sums,
    row_sums,
    scale_shift,
)


def test_scale_shift_is_a_per_row_affine_map():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    scale, shift = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    expected = x * scale[..., None] + shift[..., None]
    torch.testing.assert_close(scale_shift(x, scale, shift), expected)
    # in place: the result lands in x's own buffer
    assert scale_shift(x, scale, shift, out=x) is x
    torch.testing.assert_close(x, expected)


def test_row_sums_are_the_dot_product_and_the_sum_of_each_row():
    torch.manual_seed(0)
    a, b = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 4, 5, dtype=torch.float64)
    dot, total = row_sums(a, b)
    torch.testing.assert_close(dot, (a * b).sum(-1))
    torch.testing.assert_close(total, a.sum(-1))


def test_column_sums_are_the_sums_over_dim_0_in_the_tensors_dtype():
    torch.manual_seed(0)
    for dtype in (torch.float64, torch.float32):
        a = torch.randn(7, 3, dtype=dtype)
        sums = column_sums(a)
        assert sums.dtype == dtype
        torch.testing.assert_close(sums, a.sum(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert column_sums(a).dtype == torch.float32


def test_clamp_backward_passes_the_gradient_strictly_inside_the_limits():
    x = torch.tensor([-3.0, -2.0, -1.5, 0.0, 1.999, 2.0, 2.5], dtype=torch.float64)
    grad = torch.arange(1.0, 8.0, dtype=torch.float64)
    inside = (x > -2.0) & (x < 2.0)
    expected = torch.where(inside, grad, 0.0)
    torch.testing.assert_close(clamp_backward(grad, x, 2.0), expected)
    # in place, over the clamped tensor itself
    assert clamp_backward(grad, x, 2.0, out=x) is x
    torch.testing.assert_close(x, expected)


@pytest.fixture(params=["compiled", "torch"])
def statistics_path(request, monkeypatch):
    """Batch statistics on the compiled channel moments (csrc/activations.cpp, CPU float32
    and float64) and on torch's batch_norm_update_stats."""
    if request.param == "torch":
        monkeypatch.setattr(_native, "for_tensor", no_kernel)
    elif _native.module("activations", openmp=True) is None:
        skip_unless_ci("the compiled activations kernel could not be built on this machine")
    return request.param


def test_batch_statistics_are_the_mean_and_biased_variance_and_update_the_running_ones(
        statistics_path):
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    running_mean = torch.randn(3, dtype=torch.float64)
    running_var = torch.rand(3, dtype=torch.float64) + 0.5
    momentum = 0.1
    expected_running = ((1 - momentum) * running_mean + momentum * x.detach().mean((0, 2, 3)),
                        (1 - momentum) * running_var + momentum * x.detach().var((0, 2, 3)))

    mean, var = batch_statistics(x, running_mean, running_var, momentum)

    torch.testing.assert_close(mean, x.detach().mean((0, 2, 3)))
    torch.testing.assert_close(var, x.detach().var((0, 2, 3), unbiased=False))
    assert not mean.requires_grad and not var.requires_grad
    torch.testing.assert_close((running_mean, running_var), expected_running)


def test_float32_batch_statistics_stay_accurate_with_a_large_channel_offset(statistics_path):
    torch.manual_seed(1)
    # rows longer than the compiled path's summing block (256), channels far from 0
    x = torch.randn(5, 3, 20, 30) * torch.tensor([0.01, 1.0, 100.0]).view(1, 3, 1, 1) \
        + torch.tensor([1e3, -1e4, 5.0]).view(1, 3, 1, 1)
    exact = x.double()
    mean, var = batch_statistics(x, torch.zeros(3), torch.ones(3), 0.1)
    assert mean.dtype == var.dtype == torch.float32
    torch.testing.assert_close(mean.double(), exact.mean((0, 2, 3)), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), exact.var((0, 2, 3), unbiased=False), rtol=1e-4,
                               atol=0)


@pytest.mark.parametrize("shape", [(300, 3), (300, 3, 1), (3, 3, 10, 10)])
def test_compiled_float32_moments_stay_accurate_with_an_outlier_first(shape):
    # The compiled moments of (N, C) inputs (read as one row of N positions per channel) and of
    # channels_last ones sum deviations from a center; the first value lies 6 deviations out,
    # which as the center cost the float32 moments an order of magnitude (the mean: 1.3e-6).
    kernel = _native.module("activations", openmp=True)
    if kernel is None:
        skip_unless_ci("the compiled activations kernel could not be built on this machine")
    torch.manual_seed(2)
    view = (1, 3) + (1,) * (len(shape) - 2)
    scale, offset = torch.tensor([0.01, 1.0, 3.0]), torch.tensor([1e3, -1e4, 5.0])
    x = torch.randn(shape) * scale.view(view) + offset.view(view)
    x.view(shape[0], 3, -1)[0, :, 0] = offset + 6 * scale
    if len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    exact = x.double()
    dims = [0] + list(range(2, len(shape)))
    mean, var = kernel.channel_moments(x)
    torch.testing.assert_close(mean, exact.mean(dims), rtol=1e-7, atol=0)
    torch.testing.assert_close(var, exact.var(dims, unbiased=False), rtol=1e-5, atol=0)


def test_batch_norm_backward_is_the_gradient_of_the_affine_batch_norm():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    eps = 1e-3
    mean = x.mean((0, 2, 3), keepdim=True)
    inv_std = (x.var((0, 2, 3), unbiased=False, keepdim=True) + eps).rsqrt()
    y = (x - mean) * inv_std * weight[:, None, None] + bias[:, None, None]
    grad = torch.randn_like(y)

    got = batch_norm_backward(grad, x.detach(), weight.detach(), mean.detach().flatten(),
                              inv_std.detach().flatten())

    torch.testing.assert_close(got, torch.autograd.grad(y, (x, weight, bias), grad))

import pytest
import torch
from torch.nn import functional as F

from normlab.functional import row_norms, weight_norm_linear
from normlab.functional import row_scaled_conv as weight_normalized_conv2d
from normlab.functional import row_scaled_linear as weight_normalized_linear
from normlab.functional.fastnorm import tracked_sq_norms, with_logical_gradient

F64 = torch.float64


def test_weight_normalized_linear_matches_normalized_rows_and_its_gradient():
    torch.manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64)
    weight = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    gain = torch.rand(4, dtype=torch.float64) + 0.5
    bias = torch.randn(4, dtype=torch.float64)
    reference = x @ (gain[:, None] * weight / weight.norm(dim=1, keepdim=True)).T + bias
    z = weight_normalized_linear(x, weight, gain, weight.norm(dim=1).reciprocal(), bias)
    assert torch.allclose(z, reference)
    assert torch.autograd.gradcheck(
        lambda w: weight_normalized_linear(x, w, gain, w.norm(dim=1).reciprocal(), bias),
        (weight,))
    # the weight-normalization gradient is orthogonal to each row
    z.sum().backward()
    assert torch.allclose((weight.grad * weight).sum(1), torch.zeros(4, dtype=torch.float64),
                          atol=1e-12)


@pytest.mark.parametrize("input_mean", [0.0, 0.4])
@pytest.mark.parametrize("with_bias", [True, False])
def test_weight_norm_linear_matches_the_normalized_rows_and_gradchecks(input_mean, with_bias):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    gain = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_(True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True) if with_bias else None
    unit_rows = weight / torch.sqrt((weight * weight).sum(1, keepdim=True))
    reference = (x - input_mean) @ (gain[:, None] * unit_rows).T
    reference = reference + bias if with_bias else reference
    assert torch.allclose(weight_norm_linear(x, weight, gain, bias, input_mean), reference,
                          atol=1e-12)
    inputs = (x, weight, gain) + ((bias,) if with_bias else ())
    assert torch.autograd.gradcheck(
        lambda x, w, g, *b: weight_norm_linear(x, w, g, *(b or (None,)), input_mean), inputs)


def test_weight_norm_linear_zero_row_and_autocast_gradients_follow_autograds():
    """Against the autograd composition: a zero row (norm at its floor: no gradient through
    it) and bfloat16 autocast, where both keep the matmuls in bfloat16."""
    torch.manual_seed(0)
    x, gain, bias = torch.randn(6, 8), torch.rand(5) + 0.5, torch.randn(5)
    for autocast in (False, True):
        weight = torch.randn(5, 8)
        if not autocast:  # its gradient is 1 / eps times the others': no common tolerance
            weight[2] = 0
        grads = []
        for fused in (True, False):
            params = [t.clone().requires_grad_(True) for t in (x, weight, gain, bias)]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                if fused:
                    z = weight_norm_linear(*params)
                else:
                    z = weight_normalized_linear(params[0], params[1], params[2],
                                                 row_norms(params[1]).reciprocal(), params[3])
            z.backward(torch.linspace(-1, 1, z.numel()).view_as(z))
            grads.append([z.detach()] + [p.grad for p in params])
        for fused, composed in zip(*grads):
            assert fused.dtype == composed.dtype and torch.isfinite(fused).all()
            tolerance = 2e-2 * composed.abs().max() if autocast else 1e-5
            assert torch.allclose(fused, composed, atol=tolerance)


def test_weight_normalized_conv2d_matches_normalized_kernels_and_its_gradient():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    weight = torch.randn(4, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    gain = torch.rand(4, dtype=torch.float64) + 0.5
    bias = torch.randn(4, dtype=torch.float64)
    geometry = dict(stride=2, padding=1, dilation=1, groups=2)

    def normalized(w):
        return weight_normalized_conv2d(x, w, gain, w.flatten(1).norm(dim=1).reciprocal(),
                                        bias, **geometry)

    kernels = torch.stack([g * w / w.norm() for g, w in zip(gain, weight)])
    assert torch.allclose(normalized(weight), F.conv2d(x, kernels, bias, **geometry))
    assert torch.autograd.gradcheck(normalized, (weight,))
    normalized(weight).sum().backward()
    assert torch.allclose((weight.grad * weight).sum((1, 2, 3)),
                          torch.zeros(4, dtype=torch.float64), atol=1e-12)


def test_row_norms_value_gradient_and_zero_rows():
    torch.manual_seed(0)
    for shape in ((5, 7), (4, 2, 3, 3)):
        weight = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        reference = torch.stack([torch.sqrt((w * w).sum()) for w in weight])
        assert torch.allclose(row_norms(weight), reference)
        assert torch.autograd.gradcheck(row_norms, (weight,))
    weight = torch.randn(3, 4, dtype=torch.float64)
    weight[1] = 0
    weight.requires_grad_(True)
    norms = row_norms(weight, eps=1e-12)
    assert norms[1] == 1e-12
    norms.sum().backward()
    assert torch.equal(weight.grad[1], torch.zeros(4, dtype=torch.float64))
    assert torch.allclose(weight.grad[0], weight[0] / weight[0].norm())


def test_batch_renorm_returns_new_running_statistics_and_leaves_its_inputs():
    # In place, torch.compile's partitioner may recompute r and d from the updated
    # buffers in the backward (pytorch/pytorch#197039).
    from normlab.functional import batch_renorm

    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, dtype=torch.float64)
    running_mean, running_var = torch.zeros(3, dtype=torch.float64), torch.ones(3,
                                                                             dtype=torch.float64)
    out, new_mean, new_var = batch_renorm(x, running_mean, running_var, training=True,
                                          momentum=0.1)
    assert torch.equal(running_mean, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(running_var, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(new_mean, 0.1 * x.mean((0, 2)))
    torch.testing.assert_close(new_var, 0.9 + 0.1 * x.var((0, 2)))
    # in eval, the statistics pass through
    _, same_mean, same_var = batch_renorm(x, new_mean, new_var)
    assert same_mean is new_mean and same_var is new_var


def test_online_norm_layer_scale_matches_its_formula_and_gradchecks():
    # "ls" of Online Normalization: each sample over sqrt(mean of its squares + eps)
    from normlab.functional.online_norm import LayerScale

    z = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    eps = 1e-3
    expected = z / (z.pow(2).mean((1, 2), keepdim=True) + eps).sqrt()
    torch.testing.assert_close(LayerScale.apply(z, eps), expected, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(lambda t: LayerScale.apply(t, eps), (z,))
    vectors = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: LayerScale.apply(t, eps), (vectors,))
    assert LayerScale.apply(torch.randn(0, 4, 5), eps).shape == (0, 4, 5)  # an empty batch


@pytest.mark.parametrize("row_scale", [1.0, 2.5])
def test_fastnorm_logical_gradient_is_the_weight_normalization_gradient_of_w(row_scale):
    """Through with_logical_gradient (FastNorm's dense mode) autograd gives V the true
    gradient of W = s V (gradcheck with s = 1, where W = V), orthogonal to each row, and for
    s != 1 the same gradient: the function depends on W's direction only."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, dtype=F64)
    gain = torch.rand(4, dtype=F64) + 0.5
    bias = torch.randn(4, dtype=F64)
    weight = torch.randn(4, 5, dtype=F64, requires_grad=True)
    scale = torch.full((4,), row_scale, dtype=F64)

    def fast(w):  # t tracked = exact here, so perturbing w must move the output as WN does
        inv_norm_stored = w.detach().norm(dim=1).reciprocal()
        return weight_normalized_linear(
            x, with_logical_gradient(w, inv_norm_stored, scale), gain, inv_norm_stored, bias)
    if row_scale == 1.0:
        assert torch.autograd.gradcheck(fast, (weight,))
    fast(weight).sum().backward()
    logical = (weight * scale[:, None]).detach().requires_grad_(True)
    torch.nn.functional.linear(x, gain[:, None] * logical / logical.norm(dim=1, keepdim=True),
                               bias).sum().backward()
    assert torch.allclose(weight.grad, logical.grad)
    assert torch.allclose((weight.grad * weight).sum(1), torch.zeros(4, dtype=F64), atol=1e-12)


def test_fastnorm_tracked_sq_norms_match_the_explicit_update():
    torch.manual_seed(0)
    m, n, batch, lr, wd = 6, 9, 5, 0.3, 0.1
    weight = torch.randn(m, n, dtype=F64)
    gain = torch.rand(m, dtype=F64) + 0.5
    inv_norm = weight.norm(dim=1).reciprocal()
    h = torch.randn(batch, n, dtype=F64)
    delta = torch.randn(batch, m, dtype=F64)
    grad = torch.zeros_like(weight)  # seed 000 eq. 2, summed over the samples
    for b in range(batch):
        for i in range(m):
            p = weight[i] @ h[b]
            a = delta[b, i] * gain[i] * inv_norm[i]
            grad[i] += a * (h[b] - inv_norm[i] ** 2 * p * weight[i])
    updated = (1 - lr * wd) * weight - lr * grad
    a = delta * gain * inv_norm
    a_dot_p = (a * (h @ weight.T)).sum(0)
    tracked = tracked_sq_norms(inv_norm.pow(-2), h, a, a_dot_p, inv_norm**2 * a_dot_p, lr, wd)
    expected = updated.norm(dim=1).square()
    assert ((tracked - expected).abs().max() / expected.abs().max()).item() < 1e-12


import pytest
import torch
from torch import nn

import normlab
from conftest import no_kernel, skip_unless_ci, torch_threads
from normlab._ext import loader as _native
from normlab.functional import batch_renorm
from normlab.layers.batch_renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d


def reference_renorm(x, running_mean, running_var, weight, bias, eps, r_max, d_max):
    """The paper's training-mode equations, channel by channel, r and d as constants."""
    outs = []
    for c in range(x.shape[1]):
        xc = x[:, c]
        mean_b, var_b = xc.mean(), xc.var(unbiased=False)
        sigma_b, sigma = (var_b + eps).sqrt(), (running_var[c] + eps).sqrt()
        r = (sigma_b / sigma).detach().clamp(1 / r_max, r_max)
        d = ((mean_b - running_mean[c]) / sigma).detach().clamp(-d_max, d_max)
        outs.append(weight[c] * ((xc - mean_b) / sigma_b * r + d) + bias[c])
    return torch.stack(outs, 1)


def make(cls, c, **kw):
    torch.manual_seed(0)
    layer = cls(c, **kw).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    return layer


@pytest.mark.parametrize("cls,shape", [(BatchRenorm2d, (6, 3, 4, 4)), (BatchRenorm1d, (8, 3)),
                                       (BatchRenorm1d, (5, 3, 7)),
                                       (BatchRenorm3d, (3, 3, 2, 3, 4))])
def test_matches_reference_in_output_gradients_and_running_stats(cls, shape):
    layer = make(cls, shape[1], r_max=1.5, d_max=0.5, momentum=0.1)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.3).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    mean0, var0 = layer.running_mean.clone(), layer.running_var.clone()
    expected = reference_renorm(x_ref, mean0, var0, layer.weight, layer.bias, layer.eps,
                                1.5, 0.5)
    out = layer(x)
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    params = (layer.weight, layer.bias)
    grads = torch.autograd.grad(out, (x, *params), grad)
    expected_grads = torch.autograd.grad(expected, (x_ref, *params), grad)
    for name, got, want in zip(("x", "weight", "bias"), grads, expected_grads):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), name
    axes = [0] + list(range(2, x.dim()))
    assert torch.allclose(layer.running_mean, 0.9 * mean0 + 0.1 * x.detach().mean(axes))
    assert torch.allclose(layer.running_var, 0.9 * var0 + 0.1 * x.detach().var(axes))


def test_clipping_is_active_in_the_reference_case():
    # r and d of the case above hit their limits for some channels, so both branches are tested.
    layer = make(BatchRenorm2d, 3)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64) * 2 + 0.3
    sigma_b = x.var((0, 2, 3), unbiased=False).add(layer.eps).sqrt()
    r = sigma_b / (layer.running_var + layer.eps).sqrt()
    assert (r > 1.5).any()


@pytest.mark.parametrize("cls,shape", [(BatchRenorm2d, (4, 3, 3, 3)),
                                       (BatchRenorm3d, (2, 3, 2, 3, 3))])
def test_gradcheck_where_r_and_d_are_clipped(cls, shape):
    # r and d sit at their limits (running statistics far from the batch), so treating them
    # as constants is the true gradient; momentum=0 keeps the statistics fixed between calls.
    layer = make(cls, 3, momentum=0.0, r_max=2.0, d_max=1.0)
    with torch.no_grad():
        layer.running_mean.fill_(50.0)
        layer.running_var.fill_(100.0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_limits_one_and_zero_give_batch_norm():
    torch.manual_seed(1)
    renorm, batch_norm = BatchRenorm2d(4, r_max=1.0, d_max=0.0), nn.BatchNorm2d(4)
    with torch.no_grad():
        renorm.running_mean.uniform_(-1, 1)
        renorm.running_var.uniform_(0.5, 2)
        renorm.weight.uniform_(0.5, 1.5)
        batch_norm.weight.copy_(renorm.weight)
    x = torch.randn(8, 4, 5, 5, requires_grad=True)
    x_bn = x.detach().clone().requires_grad_(True)
    out, out_bn = renorm(x), batch_norm(x_bn)
    assert torch.allclose(out, out_bn, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_bn.backward(grad)
    assert torch.allclose(x.grad, x_bn.grad, atol=1e-5)


def test_eval_uses_running_stats_and_is_deterministic():
    layer = make(BatchRenorm2d, 3).eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    mean, var = layer.running_mean.clone(), layer.running_var.clone()
    expected = ((x - mean[:, None, None]) / (var[:, None, None] + layer.eps).sqrt()
                * layer.weight[:, None, None] + layer.bias[:, None, None])
    assert torch.allclose(layer(x), expected) and torch.equal(layer(x), layer(x))
    assert torch.equal(layer.running_mean, mean) and torch.equal(layer.running_var, var)


def test_limits_are_plain_attributes_that_can_be_ramped():
    layer = BatchRenorm1d(3, r_max=1.0, d_max=0.0)
    layer.r_max, layer.d_max = 3.0, 5.0
    assert "r_max=3.0, d_max=5.0" in repr(layer)
    layer.r_max = 0.5
    with pytest.raises(ValueError, match="r_max must be >= 1"):
        layer(torch.randn(4, 3))


def test_state_dict_dtypes_and_autocast():
    layer = BatchRenorm2d(3)
    layer(torch.randn(4, 3, 2, 2))
    restored = BatchRenorm2d(3)
    restored.load_state_dict(layer.state_dict())
    assert torch.equal(restored.running_var, layer.running_var)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(4, 3, 2, 2).bfloat16())
    assert out.dtype == torch.bfloat16 and layer.running_mean.dtype == torch.float32


@pytest.mark.parametrize("training", [True, False])
def test_layer_moved_to_bfloat16_computes_in_float32(training):
    # Found by tests/test_properties.py: after .to(torch.bfloat16) the float32
    # kernel met bfloat16 buffers ("mixed dtype (CPU)"), in both modes. The running
    # statistics stay float32 (the layer keeps its statistics in at least float32).
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64)
    reference = make(BatchRenorm2d, 3).to(torch.bfloat16).double().train(training)
    layer = make(BatchRenorm2d, 3).to(torch.bfloat16).train(training)
    out = layer(x.bfloat16())
    assert out.dtype == torch.bfloat16 and layer.running_mean.dtype == torch.float32
    expected = reference(x.bfloat16().double())
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(layer, name).double(), getattr(reference, name)
                                   .bfloat16().double(), rtol=1e-2, atol=1e-2)


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="4-D input"):
        BatchRenorm2d(3)(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"BatchRenorm3d expects a 5-D input"):
        BatchRenorm3d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="expects 3 channels"):
        BatchRenorm1d(3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchRenorm1d(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="momentum must be in"):
        BatchRenorm1d(3, momentum=2.0)


def test_registry_and_convert():
    assert isinstance(normlab.create("batch_renorm", 5, dim=1), BatchRenorm1d)
    assert type(normlab.create("batch_renorm", 5, dim=3)) is BatchRenorm3d
    assert normlab.BatchRenorm3d is BatchRenorm3d
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    converted = normlab.convert(model, "batch_renorm", r_max=1.0)
    assert isinstance(converted[1], BatchRenorm2d) and converted[1].r_max == 1.0
    assert converted(torch.randn(2, 3, 5, 5)).shape == (2, 4, 3, 3)


def test_saves_for_backward_what_batch_norm_saves_plus_per_channel_constants():
    from normlab.experiments.memory import saved_bytes

    channels = 8
    x = torch.randn(4, channels, 6, 6, requires_grad=True)
    renorm, batch_norm = saved_bytes(BatchRenorm2d(channels), x), saved_bytes(
        nn.BatchNorm2d(channels), x)
    assert batch_norm >= x.numel() * x.element_size()
    # beyond BatchNorm's input and statistics: r and d, one float per channel each
    assert renorm <= batch_norm + 2 * channels * x.element_size(), (renorm, batch_norm)


def branch_batch():
    """A batch whose five channels put r above r_max = 2, r below 1 / r_max, d above
    d_max = 1, d below -d_max, and both inside their limits (running statistics 0, 1)."""
    torch.manual_seed(3)
    scale = torch.tensor([4.0, 0.2, 1.0, 1.0, 1.2], dtype=torch.float64)
    shift = torch.tensor([0.0, 0.0, 3.0, -3.0, 0.3], dtype=torch.float64)
    return torch.randn(16, 5, 3, dtype=torch.float64) * scale[:, None] + shift[:, None]


@pytest.mark.parametrize("affine", [True, False])
def test_each_clip_branch_and_the_affine_gradients_match_the_reference(affine):
    layer = BatchRenorm1d(5, r_max=2.0, d_max=1.0, affine=affine).double()
    if affine:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)
    x = branch_batch().requires_grad_(True)
    batch_mean, batch_var = x.detach().mean((0, 2)), x.detach().var((0, 2), unbiased=False)
    r = (batch_var + layer.eps).sqrt() / (1 + layer.eps) ** 0.5
    d = batch_mean / (1 + layer.eps) ** 0.5
    # Channel by channel: r high, r low, d high, d low, nothing clipped.
    assert r[0] > 2 and r[1] < 0.5 and (0.5 < r[2:]).all() and (r[2:] < 2).all()
    assert d[2] > 1 and d[3] < -1 and (d[[0, 1, 4]].abs() < 1).all()

    # The reference gets its own copies of the parameters, so their gradients are compared.
    weight = (layer.weight if affine else torch.ones(5, dtype=torch.float64)).detach().clone()
    bias = (layer.bias if affine else torch.zeros(5, dtype=torch.float64)).detach().clone()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    expected = reference_renorm(x_ref, layer.running_mean.clone(), layer.running_var.clone(),
                                weight, bias, layer.eps, 2.0, 1.0)
    out = layer(x)
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    if affine:
        assert torch.allclose(layer.weight.grad, weight.grad, rtol=1e-10, atol=1e-12)
        assert torch.allclose(layer.bias.grad, bias.grad, rtol=1e-10, atol=1e-12)
    else:
        assert layer.weight is None and layer.bias is None and list(layer.parameters()) == []


# -- torch BatchNorm's contract ---------------------------------------------------------------
PAIRS = [(BatchRenorm1d, nn.BatchNorm1d, (6, 3, 5)), (BatchRenorm2d, nn.BatchNorm2d, (4, 3, 3, 3)),
         (BatchRenorm3d, nn.BatchNorm3d, (2, 3, 2, 3, 3))]


@pytest.mark.parametrize("cls,torch_cls,shape", PAIRS)
def test_loads_a_trained_torch_batch_norm_state_dict_strictly_and_computes_its_function(
        cls, torch_cls, shape):
    torch.manual_seed(0)
    batch_norm = torch_cls(3)
    with torch.no_grad():
        batch_norm.weight.uniform_(0.5, 1.5)
        batch_norm.bias.uniform_(-0.5, 0.5)
    for _ in range(3):
        batch_norm(torch.randn(shape) * 2 + 1)
    renorm = cls(3)
    renorm.load_state_dict(batch_norm.state_dict(), strict=True)
    assert isinstance(renorm, nn.modules.batchnorm._BatchNorm)
    assert int(renorm.num_batches_tracked) == 3
    x = torch.randn(shape)
    torch.testing.assert_close(renorm.eval()(x), batch_norm.eval()(x), rtol=1e-6, atol=1e-6)
    torch_cls(3).load_state_dict(renorm.state_dict(), strict=True)  # and back
    for track in (True, False):  # the same keys with and without running statistics
        assert cls(3, track_running_stats=track).state_dict().keys() == \
            torch_cls(3, track_running_stats=track).state_dict().keys()


def test_momentum_none_is_the_cumulative_average_of_the_batches():
    layer = BatchRenorm2d(3, momentum=None)
    batches = [torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(i)) * (i + 1) + i
               for i in range(5)]
    for x in batches:
        layer(x)
    assert int(layer.num_batches_tracked) == 5
    dims = (0, 2, 3)
    torch.testing.assert_close(layer.running_mean, torch.stack([x.mean(dims) for x in batches])
                               .mean(0))
    torch.testing.assert_close(layer.running_var, torch.stack([x.var(dims) for x in batches])
                               .mean(0))
    assert "momentum=None" in repr(layer)
    layer.reset_running_stats()
    assert int(layer.num_batches_tracked) == 0


@pytest.mark.parametrize("cls,torch_cls,shape", PAIRS)
def test_without_running_statistics_it_is_batch_norm_in_training_and_evaluation(
        cls, torch_cls, shape):
    torch.manual_seed(1)
    renorm = cls(3, track_running_stats=False).double()
    batch_norm = torch_cls(3, track_running_stats=False).double()
    with torch.no_grad():
        renorm.weight.uniform_(0.5, 1.5)
        renorm.bias.uniform_(-0.5, 0.5)
    batch_norm.load_state_dict(renorm.state_dict(), strict=True)
    assert renorm.running_mean is None and renorm.num_batches_tracked is None
    assert renorm.eval_affine_form() is None  # nothing for fold to merge
    for training in (True, False):
        renorm.train(training)
        batch_norm.train(training)
        x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).requires_grad_(True)
        out, expected = renorm(x), batch_norm(x)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, (x, renorm.weight, renorm.bias), grad)
        want = torch.autograd.grad(expected, (x, batch_norm.weight, batch_norm.bias), grad)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        cls(3, track_running_stats=False).eval()(torch.randn((1, 3) + (1,) * (len(shape) - 2)))


def test_swa_update_bn_recomputes_the_statistics_as_the_cumulative_average_of_the_loader():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), BatchRenorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 1),
                          nn.Flatten(2), BatchRenorm1d(4, momentum=0.2))
    norms = [model[1], model[5]]
    for norm in norms:  # statistics from before, which update_bn must discard
        with torch.no_grad():
            norm.running_mean.fill_(7.0)
            norm.running_var.fill_(9.0)
        norm.num_batches_tracked.fill_(11)
    inputs = {norm: [] for norm in norms}  # what each normalizer sees, recorded independently
    for norm in norms:
        norm.register_forward_pre_hook(lambda module, args: inputs[module].append(args[0]))
    loader = [torch.randn(5, 2, 6, 6) * 2 + 1 for _ in range(3)]
    loader = loader[:2] + [(loader[2], torch.zeros(5))]  # a (data, target) batch too
    model.eval()
    torch.optim.swa_utils.update_bn(loader, model)
    assert not model.training and [n.momentum for n in norms] == [0.01, 0.2]
    for norm in norms:
        seen = inputs[norm]
        assert len(seen) == 3 and int(norm.num_batches_tracked) == 3
        dims = [0] + list(range(2, seen[0].dim()))
        torch.testing.assert_close(norm.running_mean,
                                   torch.stack([x.mean(dims) for x in seen]).mean(0))
        torch.testing.assert_close(norm.running_var,
                                   torch.stack([x.var(dims) for x in seen]).mean(0))


# -- the compiled training step (csrc/activations.cpp) against the eager path ---------------------
COMPILED_CASES = [
    (BatchRenorm1d, (2, 70), None),  # (N, C) at batch 2, more channels than one block (64)
    (BatchRenorm1d, (300, 130), None),  # (N, C): blocks of channels on two threads
    (BatchRenorm1d, (1, 5, 7), None),  # batch 1
    (BatchRenorm1d, (3, 5, 300), None),  # rows longer than the kernel's summing block (256)
    (BatchRenorm1d, (8, 9, 1), None),  # one position per sample, read as (N, C)
    (BatchRenorm2d, (2, 5, 6, 7), None),
    (BatchRenorm2d, (1, 72, 5, 7), torch.channels_last),
    (BatchRenorm2d, (2, 72, 5, 7), torch.channels_last),
    (BatchRenorm3d, (2, 5, 2, 3, 4), torch.channels_last_3d),
]


def spread_batches(shape, memory_format, count=2):
    """float64 batches whose channels range from scale 0.2 to 3 and mean -2 to 2, so that r and
    d clip at both limits against the running statistics of `make` (r_max 1.5, d_max 0.5)."""
    generator = torch.Generator().manual_seed(0)
    view = (1, -1) + (1,) * (len(shape) - 2)
    scale = torch.linspace(0.2, 3.0, shape[1], dtype=torch.float64).view(view)
    shift = torch.linspace(-2.0, 2.0, shape[1], dtype=torch.float64).view(view)
    return [(torch.randn(shape, generator=generator, dtype=torch.float64) * scale + shift)
            .contiguous(memory_format=memory_format or torch.contiguous_format)
            for _ in range(count)]


def clips_at_both_limits(layer, x) -> bool:
    """Whether the first training step of `layer` on `x` clips r above and below and d."""
    dims = [0] + list(range(2, x.dim()))
    sigma = (layer.running_var + layer.eps).sqrt()
    r = (x.var(dims, unbiased=False) + layer.eps).sqrt() / sigma
    d = (x.mean(dims) - layer.running_mean) / sigma
    return bool((r > layer.r_max).any() and (r < 1 / layer.r_max).any()
                and (d.abs() > layer.d_max).any())


def renorm_steps(cls, dtype, batches, grads):
    """Outputs, input gradients, parameter gradients and running statistics over training
    steps of `make`'s layer in `dtype`, on two threads; outputs keep the inputs' layout."""
    layer = make(cls, batches[0].shape[1], r_max=1.5, d_max=0.5, momentum=0.1).to(dtype)
    assert clips_at_both_limits(layer, batches[0].to(dtype))
    record = []
    with torch_threads(2):
        for x, grad in zip(batches, grads):
            x = x.to(dtype, copy=True).requires_grad_(True)
            out = layer(x)
            assert [st for st, n in zip(out.stride(), x.shape) if n > 1] == \
                [st for st, n in zip(x.stride(), x.shape) if n > 1]
            out.backward(grad.to(dtype))
            record += [out.detach(), x.grad]
    return record + [p.grad for p in layer.parameters()] + [layer.running_mean,
                                                            layer.running_var]


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("cls,shape,memory_format", COMPILED_CASES)
def test_the_compiled_step_computes_what_the_eager_path_computes(cls, shape, memory_format,
                                                                dtype, rtol, monkeypatch):
    """Outputs (in the input's layout), input and parameter gradients and running statistics
    over two training steps, r and d clipped at both limits, the first output gradient not
    contiguous, two threads: within rtol of the tensor's scale of the eager path's, plus in
    float32 twice the eager path's own distance from float64. That term matters at batch 2
    only, where a channel's two values can lie close: its inverse std is then large and the
    float32 rounding of its mean moves its outputs by ~1e-5 of the scale in either path."""
    kernel = _native.module("activations", openmp=True)
    if kernel is None:
        skip_unless_ci("the compiled activations kernel could not be built on this machine")
    calls = []
    monkeypatch.setattr(kernel, "batch_renorm_train",
                        lambda *args, train=kernel.batch_renorm_train:
                        calls.append(args[0].shape) or train(*args))
    batches = spread_batches(shape, memory_format)
    reverse = list(reversed(range(len(shape))))  # the first gradient in the reverse layout
    grads = [torch.randn([shape[d] for d in reverse], dtype=torch.float64).permute(reverse),
             torch.randn(shape, dtype=torch.float64)]
    compiled = renorm_steps(cls, dtype, batches, grads)
    assert calls == [shape, shape]  # the compiled step ran, once per step
    monkeypatch.setattr(_native, "for_tensor", no_kernel)
    eager, exact = renorm_steps(cls, dtype, batches, grads), \
        renorm_steps(cls, torch.float64, batches, grads)
    assert calls == [shape, shape]
    for got, want, reference in zip(compiled, eager, exact):
        assert got.dtype == want.dtype == dtype
        rounding = (want.double() - reference).abs().max()
        assert (got - want).abs().max() <= rtol * want.abs().max() + 2 * rounding


@pytest.mark.parametrize("shape,memory_format", [((5, 3), None), ((2, 3, 4), None),
                                                 ((2, 3, 3, 3), torch.channels_last)])
def test_gradcheck_of_input_weight_and_bias_on_each_layout_where_r_and_d_are_clipped(
        shape, memory_format, passes):
    # as test_gradcheck_where_r_and_d_are_clipped: r and d at their limits are constants
    torch.manual_seed(0)
    running_mean, running_var = torch.full((3,), 50.0, dtype=torch.float64), \
        torch.full((3,), 100.0, dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64).contiguous(
        memory_format=memory_format or torch.contiguous_format).requires_grad_(True)
    weight = torch.rand(3, dtype=torch.float64).add(0.5).requires_grad_(True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def renorm(x, weight, bias):
        return batch_renorm(x, running_mean, running_var, weight, bias, training=True,
                            momentum=0.0, r_max=2.0, d_max=1.0)[0]

    assert torch.autograd.gradcheck(renorm, (x, weight, bias))


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1)])
def test_one_value_per_channel_raises_in_training_on_each_path(shape, passes):
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchRenorm1d(3)(torch.randn(shape))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nn.BatchNorm1d(3)(torch.randn(shape))  # as torch's BatchNorm does


@pytest.mark.parametrize("shape,memory_format", [((8, 4), None), ((8, 4, 3), None),
                                                 ((2, 4, 3, 3), torch.channels_last)])
def test_the_output_takes_in_place_operations_as_batch_norms_does(shape, memory_format, passes):
    # nn.ReLU(inplace=True) after the layer: an autograd function's output that is a view of
    # another tensor it made would refuse it
    layer = (BatchRenorm1d if len(shape) < 4 else BatchRenorm2d)(4)
    x = torch.randn(shape).contiguous(memory_format=memory_format or torch.contiguous_format)
    x.requires_grad_(True)
    out = layer(x)
    expected = torch.autograd.grad(out.relu().sum(), x, retain_graph=True)[0]
    out.relu_().sum().backward()
    torch.testing.assert_close(x.grad, expected)


def test_first_order_gradients_under_create_graph_and_no_second_order(passes):
    layer = BatchRenorm1d(4)
    x = torch.randn(8, 4, requires_grad=True)
    (grad,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    (plain,) = torch.autograd.grad(BatchRenorm1d(4)(x).pow(2).sum(), x)
    torch.testing.assert_close(grad, plain)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad.sum().backward()

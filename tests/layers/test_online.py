
import pytest
import torch
from torch import nn

import normlab
from conftest import no_kernel, skip_unless_ci, torch_threads
from normlab._ext import loader as _native
from normlab.functional.online_norm import _linear_scan_eager, linear_scan
from normlab.layers.online import OnlineNorm1d, OnlineNorm2d, OnlineNorm3d


def reference_stream(layer, batches, grads):
    """A per-sample loop written from the issue's equations, float64, state carried over.

    Returns per batch: output, input gradient; and the final (mu, var, u, v), weight and bias
    grads.
    The error compensation (ac/ls) is differentiated by autograd: its gradient is a true one.
    """
    a_f, a_b, eps = layer.alpha_fwd, layer.alpha_bkw, layer.eps
    c = layer.num_features
    mu, var = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    u, v = torch.zeros_like(mu), torch.zeros_like(mu)
    gamma = layer.weight.detach() if layer.affine else torch.ones_like(mu)
    beta = layer.bias.detach() if layer.affine else torch.zeros_like(mu)
    outs, grads_x = [], []
    grad_weight, grad_bias = torch.zeros_like(mu), torch.zeros_like(mu)
    for x, grad in zip(batches, grads):
        x, grad = x.reshape(x.shape[0], c, -1), grad.reshape(x.shape[0], c, -1)
        out_b, grad_x_b = [], []
        for xt, gt in zip(x, grad):
            m, s2 = xt.mean(-1), xt.var(-1, unbiased=False)
            sigma = (var + eps).sqrt()
            y = (xt - mu[:, None]) / sigma[:, None]
            var = a_f * var + (1 - a_f) * s2 + a_f * (1 - a_f) * (m - mu) ** 2
            mu = a_f * mu + (1 - a_f) * m
            z = (gamma[:, None] * y + beta[:, None]).requires_grad_(True)
            if layer.ecm == "ac":
                out = z.clamp(-layer.clamp_val, layer.clamp_val)
            elif layer.ecm == "ls":
                out = z / (z.square().mean() + layer.ls_eps).sqrt()
            else:
                out = z * 1
            (grad_z,) = torch.autograd.grad(out, z, gt)
            grad_weight += (grad_z * y).sum(-1)
            grad_bias += grad_z.sum(-1)
            g = grad_z * gamma[:, None]
            g_tilde = g - (1 - a_b) * v[:, None] * y
            v = v + (g_tilde * y).mean(-1)
            x_prime = g_tilde / sigma[:, None] - (1 - a_b) * u[:, None]
            u = u + x_prime.mean(-1)
            out_b.append(out.detach())
            grad_x_b.append(x_prime)
        outs.append(torch.stack(out_b))
        grads_x.append(torch.stack(grad_x_b))
    return outs, grads_x, (mu, var, u, v), grad_weight, grad_bias


def run_layer(layer, batches, grads):
    outs, grads_x = [], []
    for x, grad in zip(batches, grads):
        x = x.clone().requires_grad_(True)
        out = layer(x)
        out.backward(grad)
        outs.append(out.detach().reshape(x.shape[0], layer.num_features, -1))
        grads_x.append(x.grad.reshape(x.shape[0], layer.num_features, -1))
    state = (layer.running_mean, layer.running_var, layer.mean_control, layer.correlation_control)
    return outs, grads_x, state


def assert_close(actual, expected, rtol):
    scale = expected.abs().max().clamp(min=1e-300)
    assert (actual - expected).abs().max() <= rtol * scale, (actual - expected).abs().max()


def random_layer(cls, c, dtype=torch.float64, **kw):
    layer = cls(c, **kw).to(dtype)
    if layer.affine:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)
    return layer


@pytest.mark.parametrize("cls,shape,kw", [
    (OnlineNorm2d, (7, 3, 4, 5), {}),
    (OnlineNorm2d, (7, 3, 4, 5), {"ecm": "ac", "clamp_val": 1.5}),
    (OnlineNorm2d, (7, 3, 4, 5), {"ecm": "ls", "affine": False}),
    (OnlineNorm1d, (9, 4), {"ecm": None, "alpha_fwd": 0.8, "alpha_bkw": 0.7}),
    (OnlineNorm1d, (5, 4, 6), {"ecm": "ac", "clamp_val": 1.0, "alpha_fwd": 0.9}),
    (OnlineNorm1d, (6, 4, 5), {"ecm": "ls", "alpha_fwd": 0.9}),
    # batch 1 and 2, and (N, C) inputs with each error compensation: the compiled path's
    # other loops (one sample per call; rows of one position, stream and pass fused)
    (OnlineNorm2d, (1, 3, 4, 5), {"clamp_val": 1.5}),
    (OnlineNorm2d, (2, 3, 4, 5), {"ecm": "ls"}),
    (OnlineNorm1d, (1, 4), {"ecm": "ac", "clamp_val": 1.0, "alpha_fwd": 0.5}),
    (OnlineNorm1d, (9, 4), {"ecm": "ac", "clamp_val": 1.0, "alpha_fwd": 0.8}),
    (OnlineNorm1d, (9, 4), {"ecm": "ls", "alpha_fwd": 0.8, "affine": False}),
    # volumes, which the passes see as (N, C, D * H * W) rows; batch 1 as in 3-D U-Nets
    (OnlineNorm3d, (5, 3, 2, 3, 4), {"clamp_val": 1.5}),
    (OnlineNorm3d, (1, 3, 3, 2, 4), {"ecm": "ls", "alpha_fwd": 0.9}),
    (OnlineNorm3d, (4, 2, 2, 2, 3), {"ecm": None, "affine": False, "alpha_fwd": 0.8}),
])
def test_matches_per_sample_reference_over_consecutive_batches(cls, shape, kw, passes):
    torch.manual_seed(0)
    layer = random_layer(cls, shape[1], **kw)
    batches = [torch.randn(shape, dtype=torch.float64) * 2 + 1 for _ in range(3)]
    grads = [torch.randn(shape, dtype=torch.float64) for _ in range(3)]
    ref_out, ref_grad, ref_state, ref_weight_grad, ref_bias_grad = reference_stream(
        layer, batches, grads)
    outs, grads_x, state = run_layer(layer, batches, grads)
    for got, want in zip(outs + grads_x + list(state), ref_out + ref_grad + list(ref_state)):
        assert_close(got, want, 1e-10)
    if layer.affine:
        assert_close(layer.weight.grad, ref_weight_grad, 1e-10)
        assert_close(layer.bias.grad, ref_bias_grad, 1e-10)


def test_clamp_is_active_in_the_reference_case():
    # The "ac" case above must exercise the clamp, or it would test nothing.
    torch.manual_seed(0)
    layer = random_layer(OnlineNorm2d, 3, clamp_val=1.5)
    out = layer(torch.randn(7, 3, 4, 5, dtype=torch.float64) * 2 + 1)
    assert (out.abs() == 1.5).float().mean() > 0.05


def test_one_batch_of_n_equals_n_batches_of_one(passes):
    torch.manual_seed(1)
    x, grad = torch.randn(6, 3, 4, 4, dtype=torch.float64) + 2, torch.randn(6, 3, 4, 4,
                                                                            dtype=torch.float64)
    whole = random_layer(OnlineNorm2d, 3, clamp_val=2.0)
    single = OnlineNorm2d(3, clamp_val=2.0).double()
    single.load_state_dict(whole.state_dict())
    out_whole, grad_whole, state_whole = run_layer(whole, [x], [grad])
    out_single, grad_single, state_single = run_layer(single, list(x.split(1)),
                                                      list(grad.split(1)))
    assert_close(torch.cat(out_single), out_whole[0], 1e-12)
    assert_close(torch.cat(grad_single), grad_whole[0], 1e-12)
    for got, want in zip(state_single, state_whole):
        assert_close(got, want, 1e-12)
    assert_close(single.weight.grad, whole.weight.grad, 1e-12)
    assert_close(single.bias.grad, whole.bias.grad, 1e-12)


@pytest.mark.parametrize("cls,shape", [
    (OnlineNorm2d, (6, 5, 30, 11)),
    (OnlineNorm2d, (1, 5, 30, 11)),
    (OnlineNorm2d, (2, 5, 30, 11)),
    # (N, C): several blocks of channels, each on its own thread
    (OnlineNorm1d, (300, 260)),
    (OnlineNorm3d, (3, 5, 4, 9, 10)),
    (OnlineNorm3d, (1, 5, 4, 9, 10)),
])
@pytest.mark.parametrize("kw", [{}, {"ecm": "ls"}, {"ecm": None, "affine": False},
                                {"clamp_val": 0.7, "affine": False}])
def test_the_compiled_passes_compute_what_the_eager_path_computes(cls, shape, kw, monkeypatch):
    """float32, rows longer than the kernel's summing block (256), a gradient that is not
    contiguous, two threads: outputs, gradients and state agree to float32 rounding."""
    if _native.module("activations", openmp=True) is None:
        skip_unless_ci("the compiled activations kernel could not be built on this machine")
    torch.manual_seed(4)
    batches = [torch.randn(shape) * 3 + 1 for _ in range(2)]
    grads = [torch.randn(shape[1:]).expand(shape) for _ in range(2)]
    results = []
    for for_tensor in (_native.for_tensor, no_kernel):
        monkeypatch.setattr(_native, "for_tensor", for_tensor)
        torch.manual_seed(5)
        layer = random_layer(cls, shape[1], dtype=torch.float32, alpha_fwd=0.9, **kw)
        with torch.no_grad():
            if layer.affine:
                layer.weight.mul_(3)  # large enough that the default clamp at 5 acts
        with torch_threads(2):
            outs, grads_x, state = run_layer(layer, batches, grads)
        params = [p.grad for p in layer.parameters()]
        results.append(outs + grads_x + list(state) + params)
    if kw.get("ecm", "ac") == "ac":
        assert (results[1][0].abs() == layer.clamp_val).any()
    for got, want in zip(*results):
        assert_close(got, want, 1e-5)


@pytest.mark.parametrize("cls, shape", [
    (OnlineNorm2d, (1024, 4, 3, 3)),
    # (N, C): 1 / sqrt(sigma2 + eps) in float32, the weight and bias gradients summed in
    # float32 over blocks of 256 samples
    (OnlineNorm1d, (1024, 4)),
])
def test_float32_batch_of_1024_is_stable_against_float64_reference(cls, shape):
    torch.manual_seed(2)
    layer64 = random_layer(cls, 4, alpha_fwd=0.99, alpha_bkw=0.9)
    layer32 = cls(4, alpha_fwd=0.99, alpha_bkw=0.9)
    layer32.load_state_dict(layer64.state_dict())
    x = torch.randn(shape, dtype=torch.float64) * 3 + 5
    grad = torch.randn(shape, dtype=torch.float64)
    ref_out, ref_grad, ref_state, ref_weight_grad, ref_bias_grad = reference_stream(
        layer64, [x], [grad])
    outs, grads_x, state = run_layer(layer32, [x.float()], [grad.float()])
    assert_close(outs[0].double(), ref_out[0], 1e-5)
    assert_close(grads_x[0].double(), ref_grad[0], 1e-5)
    for got, want in zip(state, ref_state):
        assert_close(got.double(), want, 1e-5)
    assert_close(layer32.weight.grad.double(), ref_weight_grad, 1e-5)
    assert_close(layer32.bias.grad.double(), ref_bias_grad, 1e-5)


def test_float32_moments_stay_accurate_with_a_large_channel_offset():
    # The per-sample variance is E[x^2] - E[x]^2: check its cancellation at mean/std = 100.
    torch.manual_seed(4)
    x = torch.randn(16, 4, 8, 8, dtype=torch.float64) + 100
    layer64 = OnlineNorm2d(4, ecm=None, alpha_fwd=0.9).double()
    layer32 = OnlineNorm2d(4, ecm=None, alpha_fwd=0.9)
    for _ in range(5):
        out64, out32 = layer64(x), layer32(x.float())
    assert_close(out32.double(), out64, 1e-3)
    assert_close(layer32.running_var.double(), layer64.running_var, 1e-3)


@pytest.mark.parametrize("coef_shape", ["full", "column", "scalar"])
def test_linear_scan_matches_sequential_loop_with_zero_and_negative_coefficients(coef_shape):
    """Both paths: the compiled loop (linear_scan on CPU float64) and the eager scan."""
    torch.manual_seed(3)
    coef = {"full": torch.randn(37, 5, dtype=torch.float64),
            "column": torch.randn(37, 1, dtype=torch.float64),
            "scalar": torch.tensor(-0.7, dtype=torch.float64)}[coef_shape]
    if coef.dim():
        coef[10] = 0
    drive, init = torch.randn(37, 5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    h, expected = init, []
    for c, d in zip(coef.expand(drive.shape), drive):
        h = c * h + d
        expected.append(h)
    assert_close(_linear_scan_eager(coef, drive, init), torch.stack(expected), 1e-12)
    if _native.module("scan") is None:
        skip_unless_ci("the compiled scan kernel could not be built on this machine")
    assert_close(linear_scan(coef, drive, init), torch.stack(expected), 1e-12)


def test_batch_size_one_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), OnlineNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    x = torch.randn(32, 10)
    target = (x[:, :5].sum(1) > 0).long()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    epoch_losses = []
    for _ in range(5):
        total = 0.0
        for xi, ti in zip(x.split(1), target.split(1)):
            loss = nn.functional.cross_entropy(model(xi), ti)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        epoch_losses.append(total / len(x))
    assert epoch_losses[-1] < 0.7 * epoch_losses[0]


def test_eval_is_deterministic_and_leaves_state_unchanged():
    torch.manual_seed(0)
    layer = OnlineNorm2d(3)
    layer(torch.randn(8, 3, 4, 4) * 2 + 1)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.eval()
    x = torch.randn(4, 3, 4, 4)
    out = layer(x)
    assert torch.equal(out, layer(x))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, state[key])
    expected = (x - layer.running_mean[:, None, None]) / (
        layer.running_var[:, None, None] + layer.eps).sqrt()
    assert torch.allclose(out, expected.clamp(-5, 5), atol=1e-6)


def reference_eval(layer, x):
    """Eval mode from the equations: running statistics, affine map, then the ECM per sample."""
    flat = x.reshape(x.shape[0], layer.num_features, -1)
    y = (flat - layer.running_mean[:, None]) / (layer.running_var[:, None] + layer.eps).sqrt()
    z = y * layer.weight[:, None] + layer.bias[:, None] if layer.affine else y
    if layer.ecm == "ac":
        z = z.clamp(-layer.clamp_val, layer.clamp_val)
    elif layer.ecm == "ls":
        z = z / (z.square().mean((1, 2), keepdim=True) + layer.ls_eps).sqrt()
    return z.reshape(x.shape)


@pytest.mark.parametrize("cls,shape,kw", [
    (OnlineNorm2d, (4, 3, 5, 5), {"ecm": "ls"}),
    (OnlineNorm2d, (4, 3, 5, 5), {"ecm": "ac", "affine": False, "clamp_val": 1.0}),
    (OnlineNorm2d, (4, 3, 5, 5), {"ecm": "ls", "affine": False}),
    (OnlineNorm1d, (5, 3), {"ecm": "ac", "clamp_val": 1.0}),
    (OnlineNorm1d, (5, 3, 6), {"ecm": "ls"}),
    (OnlineNorm1d, (5, 3, 6), {"ecm": None, "affine": False}),
    (OnlineNorm3d, (3, 3, 2, 3, 4), {"ecm": "ac", "clamp_val": 1.0}),
    (OnlineNorm3d, (3, 3, 2, 3, 4), {"ecm": "ls"}),
])
def test_eval_matches_reference_for_each_ecm_affine_and_rank(cls, shape, kw):
    torch.manual_seed(5)
    layer = random_layer(cls, shape[1], alpha_fwd=0.5, **kw)
    for _ in range(3):  # move the running statistics away from (0, 1)
        layer(torch.randn(shape, dtype=torch.float64) * 3 + 2)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.eval()
    x = torch.randn(shape, dtype=torch.float64) * 3 + 2
    out = layer(x)
    assert_close(out, reference_eval(layer, x), 1e-12)
    assert torch.equal(out, layer(x))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, state[key]), key
    if kw["ecm"] == "ac":  # the clamp is exercised, or the "ac" cases would test nothing
        assert (out.abs() == 1.0).any()


def test_state_dict_round_trips():
    torch.manual_seed(0)
    layer = OnlineNorm1d(5)
    x = torch.randn(4, 5, requires_grad=True)
    layer(x).sum().backward()
    restored = OnlineNorm1d(5)
    restored.load_state_dict(layer.state_dict())
    assert set(layer.state_dict()) == {"weight", "bias", "running_mean", "running_var",
                                       "mean_control", "correlation_control"}
    for key, value in restored.state_dict().items():
        assert torch.equal(value, layer.state_dict()[key])
    assert layer.mean_control.abs().sum() > 0 and layer.running_mean.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_volume_layer_loads_strictly_what_it_saves_in_its_dtype(dtype):
    torch.manual_seed(0)
    layer = random_layer(OnlineNorm3d, 3, dtype=dtype)
    layer(torch.randn(2, 3, 2, 3, 4, dtype=dtype)).sum().backward()
    restored = OnlineNorm3d(3).to(dtype)
    restored.load_state_dict(layer.state_dict(), strict=True)
    for key, value in layer.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    # the statistics stay float32 in a bfloat16 layer, as saved
    assert {b.dtype for b in restored.buffers()} == {torch.float32}
    assert layer.correlation_control.abs().sum() > 0


@pytest.mark.parametrize("ecm", ["ac", "ls", None])
def test_bfloat16_autocast_keeps_float32_state_and_input_dtype(ecm):
    torch.manual_seed(0)
    layer, ref = OnlineNorm2d(4, ecm=ecm), OnlineNorm2d(4, ecm=ecm)
    x = torch.randn(6, 4, 5, 5) + 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf16 = layer(x.bfloat16())
        out_f32 = OnlineNorm2d(4, ecm=ecm)(x)
    assert out_bf16.dtype == torch.bfloat16 and out_f32.dtype == torch.float32
    assert all(b.dtype == torch.float32 for b in layer.buffers())
    expected = ref(x.bfloat16().float())
    assert torch.allclose(out_bf16.float(), expected, atol=3e-2)
    assert torch.allclose(layer.running_var, ref.running_var, rtol=1e-5)


def test_zero_variance_input_stays_finite():
    layer = OnlineNorm2d(2, alpha_fwd=0.5)
    for _ in range(30):  # running variance decays towards 0 on constant input
        x = torch.zeros(4, 2, 3, 3, requires_grad=True)
        layer(x).sum().backward()
        assert torch.isfinite(x.grad).all()
    assert layer.running_var.max() < 1e-8
    assert torch.isfinite(layer(torch.ones(1, 2, 3, 3))).all()


def test_bad_input_and_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="4-D input"):
        OnlineNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="2 or 3-D input"):
        OnlineNorm1d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="expects 3 channels"):
        OnlineNorm2d(3)(torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match=r"OnlineNorm3d expects a 5-D input .* \(2, 3, 4, 4\)"):
        OnlineNorm3d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(TypeError, match="floating-point"):
        OnlineNorm1d(3)(torch.ones(2, 3, dtype=torch.long))
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"alpha_fwd must be in \(0, 1\)"):
            OnlineNorm2d(3, alpha_fwd=bad)
        with pytest.raises(ValueError, match=r"alpha_bkw must be in \(0, 1\)"):
            OnlineNorm2d(3, alpha_bkw=bad)
    with pytest.raises(ValueError, match="ecm must be one of"):
        OnlineNorm2d(3, ecm="bn")


@pytest.mark.parametrize("name", ["eps", "ls_eps", "clamp_val"])
@pytest.mark.parametrize("bad", [0.0, -1e-3])
def test_non_positive_eps_ls_eps_and_clamp_val_raise(name, bad):
    with pytest.raises(ValueError, match=f"OnlineNorm2d: {name} must be > 0, got {bad}"):
        OnlineNorm2d(3, **{name: bad})


def test_reset_running_stats_clears_the_control_process_after_a_backward():
    torch.manual_seed(0)
    layer = OnlineNorm2d(3)
    x = (torch.randn(4, 3, 2, 2) + 3).requires_grad_(True)
    layer(x).backward(torch.randn(4, 3, 2, 2))
    buffers = ("running_mean", "running_var", "mean_control", "correlation_control")
    # Every buffer has moved, so resetting it is observable.
    assert all((getattr(layer, name) != initial).all()
               for name, initial in zip(buffers, (0, 1, 0, 0)))
    layer.reset_running_stats()
    for name, initial in zip(buffers, (0, 1, 0, 0)):
        assert torch.equal(getattr(layer, name), torch.full((3,), float(initial))), name


def test_repr_and_reset():
    layer = OnlineNorm2d(3, ecm="ls")
    assert repr(layer) == ("OnlineNorm2d(3, alpha_fwd=0.999, alpha_bkw=0.99, eps=1e-05, "
                           "affine=True, ecm='ls', ls_eps=1e-05, clamp_val=5.0)")
    layer(torch.randn(2, 3, 2, 2) + 3)
    layer.reset_parameters()
    assert layer.running_mean.abs().sum() == 0 and torch.equal(layer.running_var, torch.ones(3))


def test_registry_create_and_convert_cnn():
    assert isinstance(normlab.create("online", 8, dim=1), OnlineNorm1d)
    assert isinstance(normlab.create("online", 8, dim=2, ecm="ls"), OnlineNorm2d)
    assert isinstance(normlab.create("online", 8, dim=3), OnlineNorm3d)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    online = normlab.convert(model, "online")
    assert isinstance(online[1], OnlineNorm2d)
    assert online(torch.randn(1, 3, 6, 6)).shape == (1, 2)
    assert isinstance(normlab.convert(online, "batch")[1], nn.BatchNorm2d)
    assert normlab.OnlineNorm1d is OnlineNorm1d and normlab.OnlineNorm3d is OnlineNorm3d


def saved_tensors(module, x):
    """The distinct tensors (one per storage) autograd keeps for the backward of module(x)."""
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor
        return tensor

    x = x.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(x)
    return list(saved.values())


def saved_tensor_bytes(module, x):
    """Bytes of the distinct tensors autograd keeps for the backward of module(x)."""
    return sum(t.untyped_storage().nbytes() for t in saved_tensors(module, x))


def test_backward_keeps_one_activation_sized_tensor_like_batch_norm():
    x = torch.randn(8, 16, 16, 16)
    online, batch_norm = saved_tensor_bytes(OnlineNorm2d(16), x), saved_tensor_bytes(
        nn.BatchNorm2d(16), x)
    activation = x.numel() * x.element_size()
    assert activation <= batch_norm < 1.1 * activation
    # the input (the compiled step) or the normalized output (the eager path), plus four
    # float64 scalars per (sample, channel)
    assert online <= batch_norm + 4 * 8 * 8 * 16


@pytest.mark.parametrize("affine", [True, False])
def test_saves_one_activation_sized_tensor_plus_per_sample_channel_scalars(affine):
    samples, channels = 4, 3
    x = torch.randn(samples, channels, 5, 5)
    saved = saved_tensors(OnlineNorm2d(channels, affine=affine), x)
    sizes = sorted(t.numel() for t in saved)
    # x (the compiled step) or the normalized output y (the eager path); the rest
    # (statistics, weight, bias) at most four per (n, c)
    assert sizes[-1] == x.numel() and sizes[-2] <= 4 * samples * channels, [tuple(t.shape)
                                                                           for t in saved]


@pytest.mark.parametrize("cls, x", [
    (OnlineNorm2d, torch.randn(4, 3, 5, 5)),
    (OnlineNorm2d, torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last)),
    # (N, C): the backward replays the stream from the state before the batch
    (OnlineNorm1d, torch.randn(6, 3)),
])
def test_the_compiled_step_saves_x_itself_where_the_spec_saves_a_fresh_y(cls, x):
    # one activation-sized buffer fewer written per step (the output only, as BatchNorm)
    if _native.module("activations", openmp=True) is None:
        skip_unless_ci("the compiled activations kernel could not be built on this machine")
    x = x.clone().requires_grad_(True)  # a fresh leaf: the parameter is shared by the runs
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        cls(3)(x)
    activations = [t for t in saved if t.numel() == x.numel()]
    assert [t.untyped_storage().data_ptr() for t in activations] == [x.data_ptr()]
    # beside it, the weight, the bias and the record: for (N, C), two scalars per channel
    others = sum(t.numel() for t in saved if t.numel() != x.numel())
    assert others <= 2 * 3 + (2 * 3 if x.dim() == 2 else 4 * x.shape[0] * 3)


@pytest.mark.parametrize("ecm", ["ac", "ls", None])
@pytest.mark.parametrize("cls, x", [
    (OnlineNorm2d, torch.randn(4, 3, 5, 5)),
    (OnlineNorm2d, torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last)),
    (OnlineNorm1d, torch.randn(6, 3)),
])
def test_the_output_gradient_given_stays_unchanged(cls, x, ecm):
    # the compiled backward writes grad_x over layer scaling's gradient, its own buffer: never
    # over the one it is given
    x = x.clone().requires_grad_(True)  # a fresh leaf: the parameter is shared by the runs
    grad = torch.randn_like(x)
    given = grad.clone()
    cls(3, ecm=ecm)(x).backward(grad)
    assert torch.equal(grad, given)
    assert x.grad.data_ptr() != grad.data_ptr()

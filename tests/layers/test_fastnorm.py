import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import weight_norm

import normlab
from normlab import FastNormLinear, FastNormSGD, training
from normlab.layers import fastnorm
from normlab.layers.fastnorm import (
    DEFAULT_RENORM_EVERY,
    RENORM_DRIFT_BOUND,
    _TrackedInverseNorm,
    tracked_sq_norms,
)

F64 = torch.float64


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def reference_forward(x, weight, gain, bias):
    """Seed 000 eq. 1 written out: z_i = gain_i (W_i . x) / ||W_i|| + bias_i."""
    rows = [gain[i] * (x @ weight[i]) / weight[i].square().sum().sqrt() + bias[i]
            for i in range(weight.shape[0])]
    return torch.stack(rows, dim=-1)


@pytest.fixture
def step_modes(monkeypatch):
    """Records, per FastNormLinear step, whether the norms were tracked (True) or explicit."""
    modes = []
    finish = FastNormLinear._finish_step

    def spy(self, sq_norms):
        modes.append(sq_norms is not None)
        finish(self, sq_norms)
    monkeypatch.setattr(FastNormLinear, "_finish_step", spy)
    return modes


def test_from_module_keeps_the_function_with_unit_rows():
    torch.manual_seed(0)
    linear = nn.Linear(7, 5).double()
    layer = FastNormLinear.from_module(linear)
    x = torch.randn(3, 7, dtype=F64)
    assert torch.allclose(layer(x), linear(x))
    assert torch.allclose(layer.gain, linear.weight.norm(dim=1))
    assert torch.allclose(layer.explicit_norms(), torch.ones(5, dtype=F64))
    assert torch.equal(layer.inv_norm, torch.ones(5, dtype=F64))
    assert torch.allclose(layer(x), reference_forward(x, layer.weight, layer.gain, layer.bias))


def test_forward_matches_the_equation_with_unnormalized_rows_and_leading_dims():
    torch.manual_seed(0)
    layer = FastNormLinear(6, 4).double()
    with torch.no_grad():
        layer.weight.mul_(torch.rand(4, 1, dtype=F64) * 3 + 0.5)
        layer.inv_norm.copy_(layer.explicit_norms().reciprocal())
    layer.renormalize()  # declares the edited weight; the function must not change
    x = torch.randn(2, 3, 6, dtype=F64)
    assert torch.allclose(layer(x), reference_forward(x, layer.weight, layer.gain, layer.bias))


def test_zero_row_of_the_source_is_guarded():
    linear = nn.Linear(4, 3)
    with torch.no_grad():
        linear.weight[1] = 0
    layer = FastNormLinear.from_module(linear)
    x = torch.randn(2, 4)
    assert torch.isfinite(layer.weight).all() and layer.gain[1] == 0
    assert torch.allclose(layer(x), linear(x))


def test_tracked_inverse_norm_gives_the_weight_normalization_gradient():
    torch.manual_seed(0)
    x = torch.randn(3, 5, dtype=F64)
    gain = torch.rand(4, dtype=F64) + 0.5
    bias = torch.randn(4, dtype=F64)
    weight = torch.randn(4, 5, dtype=F64, requires_grad=True)

    def fast(w):  # t tracked = exact here, so perturbing w must move the output as WN does
        inv_norm = _TrackedInverseNorm.apply(w, w.detach().norm(dim=1).reciprocal())
        return normlab.functional.weight_normalized_linear(x, w, gain, inv_norm, bias)
    assert torch.autograd.gradcheck(fast, (weight,))
    fast(weight).sum().backward()
    assert torch.allclose((weight.grad * weight).sum(1), torch.zeros(4, dtype=F64), atol=1e-12)


def test_input_gradient_is_eq7():
    torch.manual_seed(0)
    layer = FastNormLinear(5, 4).double()
    x = torch.randn(3, 5, dtype=F64, requires_grad=True)
    delta = torch.randn(3, 4, dtype=F64)
    layer(x).backward(delta)
    expected = (delta * layer.gain * layer.inv_norm) @ layer.weight  # W^T (t . gain . delta)
    assert torch.allclose(x.grad, expected)


def test_tracked_sq_norms_match_the_explicit_update():
    torch.manual_seed(0)
    m, n, batch, lr, wd = 6, 9, 5, 0.3, 0.1
    weight = torch.randn(m, n, dtype=F64)
    gain = torch.rand(m, dtype=F64) + 0.5
    inv_norm = weight.norm(dim=1).reciprocal()
    h = torch.randn(batch, n, dtype=F64)
    delta = torch.randn(batch, m, dtype=F64)
    outputs = (h @ weight.T) * gain * inv_norm
    grad = torch.zeros_like(weight)  # seed 000 eq. 2, summed over the samples
    for b in range(batch):
        for i in range(m):
            p = weight[i] @ h[b]
            a = delta[b, i] * gain[i] * inv_norm[i]
            grad[i] += a * (h[b] - inv_norm[i] ** 2 * p * weight[i])
    updated = (1 - lr * wd) * weight - lr * grad
    tracked = tracked_sq_norms(inv_norm.pow(-2), inv_norm, gain, h, outputs, delta, lr, wd)
    assert relative(tracked, updated.norm(dim=1).square()) < 1e-12


def twin_mlps(batch_norm_free_width=12, seed=0):
    """A FastNorm MLP and torch's weight_norm MLP computing the same function,
    v = the FastNorm rows (unit norm), g = the gains."""
    torch.manual_seed(seed)
    plain = nn.Sequential(nn.Linear(8, batch_norm_free_width), nn.ReLU(),
                          nn.Linear(batch_norm_free_width, 3)).double()
    fast = normlab.convert(plain, "fastnorm", renorm_every=None)
    explicit = copy.deepcopy(plain)
    for index in (0, 2):
        weight_norm(explicit[index])
        with torch.no_grad():
            explicit[index].parametrizations.weight.original0.copy_(fast[index].gain[:, None])
            explicit[index].parametrizations.weight.original1.copy_(fast[index].weight)
    return fast, explicit


def train_twins_and_compare(steps, batch_size, weight_decay, momentum=0.0, lr=0.3):
    fast, explicit = twin_mlps()
    fast_opt = FastNormSGD(fast.parameters(), lr=lr, weight_decay=weight_decay,
                           momentum=momentum)
    explicit_opt = torch.optim.SGD(explicit.parameters(), lr=lr, weight_decay=weight_decay,
                                   momentum=momentum)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(batch_size, 8, dtype=F64, generator=generator)
        y = torch.randint(0, 3, (batch_size,), generator=generator)
        for model, optimizer in ((fast, fast_opt), (explicit, explicit_opt)):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    x = torch.randn(32, 8, dtype=F64, generator=generator)
    assert relative(fast(x), explicit(x)) < 1e-9
    for index in (0, 2):
        layer = fast[index]
        effective = layer.weight * (layer.gain * layer.inv_norm)[:, None]
        assert relative(effective, explicit[index].weight) < 1e-9
        assert relative(layer.tracked_norms(), layer.explicit_norms()) < 1e-9
        assert (layer.explicit_norms() - 1).abs().max() > 1e-3  # the norms moved from 1


@pytest.mark.parametrize("batch_size", [1, 16])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
def test_equivalent_to_explicit_weight_norm_for_1000_steps(batch_size, weight_decay,
                                                           step_modes):
    train_twins_and_compare(1000, batch_size, weight_decay)
    assert all(step_modes)  # every step tracked, none computed


def test_momentum_is_equivalent_through_the_hybrid_mode(step_modes):
    train_twins_and_compare(20, 4, 1e-3, momentum=0.9)
    assert step_modes and not any(step_modes)


def test_batches_above_max_tracked_batch_use_the_hybrid_mode(step_modes):
    layer = FastNormLinear(6, 4, max_tracked_batch=8, dtype=F64)
    optimizer = FastNormSGD(layer.parameters(), lr=0.5)
    for batch_size in (8, 9):
        optimizer.zero_grad()
        layer(torch.randn(batch_size, 6, dtype=F64)).square().sum().backward()
        optimizer.step()
        assert relative(layer.tracked_norms(), layer.explicit_norms()) < 1e-12
    assert step_modes == [True, False]


def test_gradient_accumulation_and_unrecorded_backward_stay_exact(step_modes):
    torch.manual_seed(0)
    layer = FastNormLinear(6, 4, dtype=F64)
    optimizer = FastNormSGD(layer.parameters(), lr=0.5)
    for _ in range(2):  # two backwards accumulate: still low rank, still tracked
        layer(torch.randn(3, 6, dtype=F64)).square().sum().backward()
    optimizer.step()
    layer.zero_grad()  # torch's zero_grad, not the optimizer's: stale records are dropped
    layer(torch.randn(3, 6, dtype=F64)).square().sum().backward()
    optimizer.step()
    layer.eval()  # eval-mode forward records nothing: the gradient is unexplained
    optimizer.zero_grad()
    layer(torch.randn(3, 6, dtype=F64)).square().sum().backward()
    optimizer.step()
    assert step_modes == [True, True, False]
    assert relative(layer.tracked_norms(), layer.explicit_norms()) < 1e-12


def test_renormalization_resets_t_and_keeps_the_function():
    torch.manual_seed(0)
    layer = FastNormLinear(6, 4, renorm_every=3).double()
    optimizer = FastNormSGD(layer.parameters(), lr=1.0)
    x = torch.randn(5, 6, dtype=F64)
    for step in range(1, 4):
        optimizer.zero_grad()
        layer(torch.randn(2, 6, dtype=F64)).square().sum().backward()
        optimizer.step()
        if step < 3:
            assert layer.explicit_norms().min() > 1 and int(layer.steps_since_renorm) == step
    assert torch.equal(layer.inv_norm, torch.ones(4, dtype=F64))
    assert torch.allclose(layer.explicit_norms(), torch.ones(4, dtype=F64))
    layer.eval()
    before = layer(x)
    with torch.no_grad():
        layer.weight.mul_(3)
        layer.inv_norm.div_(3)
    layer.renormalize()  # on demand
    assert torch.allclose(layer(x), before)


def small_mlp(dtype, **kw):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).to(dtype)
    return normlab.convert(plain, "fastnorm", **kw)


def train_bfloat16_and_check_drift(steps, **kw):
    # Unit rows made in float32, then rounded to bfloat16, as model.to() does.
    model = small_mlp(torch.float32, **kw).to(torch.bfloat16)
    assert model[0].inv_norm.dtype == torch.float32  # kept: bfloat16 would stall the tracking
    optimizer = FastNormSGD(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        x = torch.randn(16, 32, generator=generator).to(torch.bfloat16)
        y = torch.randint(0, 10, (16,), generator=generator)
        loss = F.cross_entropy(model(x).float(), y)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 25 == 24:
            for layer in (model[0], model[2]):
                explicit = layer.weight.double().norm(dim=1)
                drift = (layer.tracked_norms().double() / explicit - 1).abs().max()
                assert drift <= RENORM_DRIFT_BOUND
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert FastNormLinear(3, 2, dtype=torch.bfloat16).inv_norm.dtype == torch.float32
    return model


def test_bfloat16_training_stays_finite_and_within_the_drift_bound():
    model = train_bfloat16_and_check_drift(100, renorm_every=40)
    assert int(model[0].steps_since_renorm) == 20  # renormalized at 40 and 80


def test_bfloat16_drift_bound_holds_with_the_default_renorm_every():
    train_bfloat16_and_check_drift(DEFAULT_RENORM_EVERY + 200)


def test_float32_and_bfloat16_autocast():
    model = small_mlp(torch.float32)
    optimizer = FastNormSGD(model.parameters(), lr=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(4, 32))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out.sum().backward()
    optimizer.step()
    assert relative(model[0].tracked_norms(), model[0].explicit_norms()) < 1e-2


def test_foreign_optimizer_is_detected():
    layer = FastNormLinear(6, 4)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(2, 6)).square().sum().backward()
    optimizer.step()
    with pytest.raises(RuntimeError, match="changed outside FastNormSGD"):
        layer(torch.randn(2, 6))
    layer.renormalize()
    assert torch.isfinite(layer(torch.randn(2, 6))).all()


def test_fastnormsgd_rejects_what_it_cannot_honour():
    params = FastNormLinear(3, 2).parameters
    with pytest.raises(ValueError, match="lr must be > 0"):
        FastNormSGD(params(), lr=0.0)
    with pytest.raises(ValueError, match="weight_decay >= 0 and 0 <= momentum < 1"):
        FastNormSGD(params(), lr=0.1, weight_decay=-1)
    with pytest.raises(ValueError, match="0 <= momentum < 1"):
        FastNormSGD(params(), lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="lr \\* weight_decay must be < 1"):
        FastNormSGD(params(), lr=1.0, weight_decay=1.0)
    with pytest.raises(ValueError, match="finite number"):
        FastNormSGD(params(), lr=float("nan"))
    with pytest.raises(ValueError, match="nesterov"):
        FastNormSGD([{"params": list(params()), "nesterov": True}], lr=0.1)


def test_bad_arguments_and_inputs_are_named():
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        FastNormLinear(0, 3)
    with pytest.raises(ValueError, match="renorm_every must be a positive int or None"):
        FastNormLinear(3, 3, renorm_every=0)
    layer = FastNormLinear(3, 2)
    with pytest.raises(ValueError, match=r"expected input of shape \(\*, 3\), got \(2, 4\)"):
        layer(torch.randn(2, 4))
    with pytest.raises(ValueError, match="floating-point input, got torch.int64"):
        layer(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="expects an nn.Linear"):
        FastNormLinear.from_module(nn.Conv2d(1, 1, 1))


def test_state_dict_round_trips_and_deepcopy_trains():
    model = small_mlp(torch.float64, renorm_every=5)
    optimizer = FastNormSGD(model.parameters(), lr=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(4, 32, dtype=F64)).square().sum().backward()
        optimizer.step()
    assert set(model[0].state_dict()) == {"weight", "gain", "bias", "inv_norm",
                                          "steps_since_renorm"}
    restored = small_mlp(torch.float64, renorm_every=5)
    restored.load_state_dict(model.state_dict())
    model.eval(), restored.eval()
    x = torch.randn(3, 32, dtype=F64)
    assert torch.equal(restored(x), model(x)) and torch.equal(model(x), model(x))
    assert int(restored[0].steps_since_renorm) == 2
    twin = copy.deepcopy(model).train()
    twin_opt = FastNormSGD(twin.parameters(), lr=0.5)
    twin(x).square().sum().backward()
    twin_opt.step()
    assert relative(twin[0].tracked_norms(), twin[0].explicit_norms()) < 1e-12


def test_registered_and_built_by_the_training_loop():
    assert normlab.FastNormLinear is fastnorm.FastNormLinear
    config = training.TrainConfig(task="digits-mlp", norm="fastnorm", momentum=0.9)
    model = training.build_model(config)
    assert [type(m) for m in model if isinstance(m, FastNormLinear)] == [FastNormLinear] * 2
    assert isinstance(training.build_optimizer(model, config), FastNormSGD)
    assert f"renorm_every={DEFAULT_RENORM_EVERY}" in repr(model[1])
